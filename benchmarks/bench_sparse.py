"""Sparse volumes cost what their data costs (issue 13 item 4).

Run:  pytest benchmarks/bench_sparse.py --benchmark-only -s
Quick (CI):  pytest benchmarks/bench_sparse.py --benchmark-disable

A 16 GiB pair whose mirror holds 1 % data (1 MiB chunks at random places,
holes elsewhere) and whose standard holds 1 % other data (host writes since
the split) is fully restored, durable, cache dropped; interleaved with it, a
full restore of a dense pair (random data everywhere) of DENSE_GIB, whose
time is scaled to 16 GiB by size (the disk here cannot hold two dense 16 GiB
volumes beside the other work; the dense restore of 4 GiB already takes the
same buffered path as one of 16 GiB, docs/copier.md).  Reported: the sparse
restore's time as a share of the dense one's (per byte of volume), and the
standard's allocation (st_blocks) before and after, against the mirror's.
"""
from __future__ import annotations

import os

import numpy as np

import pymirror
from pymirror import CopyConfig

REPS = int(os.environ.get("PM_BENCH_REPS", "5"))
MiB = 1 << 20
GiB = 1 << 30
SPARSE_GIB = 16
DENSE_GIB = 4
CHUNK = MiB


def allocated(path) -> int:
    return os.stat(path).st_blocks * 512


def make_sparse_pair(folder, size, rng):
    std, mir = folder / "std.img", folder / "mir.img"
    pymirror.Volume.create(std, size).close()
    pymirror.Volume.create(mir, size).close()
    pair = pymirror.Pair.create(folder / "pair.meta", std, mir)
    pair.establish(assume_equal=True)          # two blank volumes
    pair.split()
    chunks = size // CHUNK
    picks = rng.choice(chunks, size=2 * max(1, chunks // 100), replace=False)
    mirror_chunks, host_chunks = picks[: len(picks) // 2], picks[len(picks) // 2:]
    data = rng.integers(0, 256, CHUNK, dtype=np.uint8).tobytes()
    for c in sorted(mirror_chunks.tolist()):
        pair.mirror_write(int(c) * CHUNK, data)
    pair.mirror_flush()
    return pair, std, mir, host_chunks


def host_writes(pair, chunks):
    """The standard drifts: 1 % other data, which the restore must remove."""
    junk = b"\xee" * CHUNK
    for c in chunks.tolist():
        pair.write(int(c) * CHUNK, junk)
    pair.flush()


def make_dense_pair(folder, size, rng):
    folder.mkdir()
    std, mir = folder / "std.img", folder / "mir.img"
    pymirror.Volume.create(std, size).close()
    with pymirror.Volume.create(mir, size) as v:
        chunk = rng.integers(0, 256, 8 * MiB, dtype=np.uint8).tobytes()
        for off in range(0, size, len(chunk)):
            v.write(off, chunk[: min(len(chunk), size - off)])
        v.flush()
    pair = pymirror.Pair.create(folder / "pair.meta", std, mir)
    pair.establish(assume_equal=True)           # not true, but the restore overwrites the standard anyway
    pair.split()
    return pair


def test_sparse_restore_vs_dense(benchmark, tools, tmp_path, scale):
    drop_caches, median, record, timed = tools.drop_caches, tools.median, tools.record, tools.timed
    rng = np.random.default_rng(7)
    sparse_size = int(SPARSE_GIB * GiB * scale)
    dense_size = int(DENSE_GIB * GiB * scale)
    sparse, std, mir, host_chunks = make_sparse_pair(tmp_path, sparse_size, rng)
    dense = make_dense_pair(tmp_path / "dense", dense_size, rng)
    cfg = CopyConfig()                            # the defaults

    def restore(pair):
        assert pair.restore(config=cfg).wait()
        pair.flush()

    sparse_s, dense_s, before, after = [], [], [], []
    for _ in range(REPS if not benchmark.disabled else 1):
        host_writes(sparse, host_chunks)
        before.append(allocated(std))
        drop_caches()
        sparse_s.append(timed(lambda: restore(sparse)))
        after.append(allocated(std))
        assert sparse.state == "restored"
        sparse.split()
        drop_caches()
        dense_s.append(timed(lambda: restore(dense)))
        dense.split()
    p = sparse.progress
    # the restored standard is the mirror: the same allocation map, the same data where there is data
    assert sparse.block_status(side="standard") == sparse.block_status(side="mirror")
    for off, n, kind in sparse.block_status(side="mirror")[:50]:
        if kind == 0:
            assert sparse.read(off, n) == sparse.mirror_read(off, n)
    host_writes(sparse, host_chunks)
    benchmark.pedantic(lambda: restore(sparse), setup=lambda: (drop_caches(), None)[1], rounds=1, iterations=1)
    dense_per_byte = median(dense_s) / dense_size
    full_equiv = dense_per_byte * sparse_size
    record("sparse_restore_1pct_vs_full", {
        "sparse_size_mib": sparse_size // MiB, "dense_size_mib": dense_size // MiB, "reps": len(sparse_s),
        "sparse_restore_s": round(median(sparse_s), 3), "dense_restore_s": round(median(dense_s), 3),
        "dense_scaled_to_sparse_size_s": round(full_equiv, 2),
        "ratio_sparse_over_full": round(median(sparse_s) / full_equiv, 4),
        "mirror_allocated_mib": round(allocated(mir) / MiB, 1),
        "standard_allocated_before_mib": round(median(before) / MiB, 1),
        "standard_allocated_after_mib": round(median(after) / MiB, 1),
        "standard_allocated_after_pct": round(100 * median(after) / sparse_size, 2),
        "bytes_written_mib": round(p.bytes_written / MiB, 1), "bytes_zeroed_mib": round(p.bytes_zeroed / MiB, 1),
        "loadavg": [round(x, 1) for x in os.getloadavg()],
    })
    sparse.close()
    dense.close()
