"""FUA-light (docs/format.md): a flush or FUA write that needs no PENDING
clear recorded syncs the data and commits no metadata (its write-intent is
durable already); while a restore clears PENDING bits, each flush commits
fully.  Counted with ``Progress.commits``; crash safety of both paths is the
crash harness's (csrc/tests/test_crash.c: flush/FUA scenarios)."""
from __future__ import annotations

import pymirror

TRACK = 64 << 10
SIZE = 64 * TRACK


def make_pair(tmp_path):
    for n in ("s", "m"):
        pymirror.Volume.create(tmp_path / f"{n}.img", SIZE).close()
    return pymirror.Pair.create(tmp_path / "p.meta", tmp_path / "s.img", tmp_path / "m.img")


def test_flush_and_fua_in_a_durable_region_commit_nothing(tmp_path):
    with make_pair(tmp_path) as pair:
        pair.establish(assume_equal=True)
        pair.write(0, b"a" * 4096)                    # the region's first write: one intent commit
        c0 = pair.progress.commits
        for i in range(20):
            pair.write(4096 * i, b"b" * 4096, fua=True)
            pair.flush()
        assert pair.progress.commits == c0           # 40 durability points, no metadata write
        pair.split()
        c1 = pair.progress.commits
        pair.mirror_write(0, b"c" * 4096)            # a new region on the mirror: one intent commit
        pair.mirror_flush()
        pair.mirror_write(4096, b"d" * 4096, fua=True)
        assert pair.progress.commits == c1 + 1


def test_flushes_commit_fully_while_a_restore_clears_pending(tmp_path):
    with make_pair(tmp_path) as pair:
        pair.establish(assume_equal=True)
        pair.split()
        pair.mirror_write(0, b"m" * SIZE)
        job = pair.restore(config=pymirror.CopyConfig(rate=8 * TRACK))   # slow: many tracks left
        pair.write(40 * TRACK, b"h" * TRACK)         # a whole PENDING track: a host clear
        c0 = pair.progress.commits
        pair.flush()
        assert pair.progress.commits >= c0 + 1       # the clear is committed with the flush
        c1 = pair.progress.commits
        pair.flush()                                 # nothing cleared since? the copier may have
        assert pair.progress.commits - c1 <= 1
        job.set_rate(0)
        job.wait()
        pair.flush()
        c2 = pair.progress.commits
        for _ in range(5):
            pair.flush()
        assert pair.progress.commits == c2           # the restore is over: light again
        assert pair.read(40 * TRACK, TRACK) == b"h" * TRACK
