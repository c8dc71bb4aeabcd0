"""Restore speed against the peers of the same run.

Run:  pytest benchmarks/bench_restore.py --benchmark-only -s
Each figure alternates pymirror and its baseline (A B A B ...), page cache
dropped before each rep, and reports the ratio of the medians.
"""
from __future__ import annotations

import os
import subprocess
import threading
import time

import numpy as np
import pytest

import pymirror
from pymirror import CopyConfig

REPS = int(os.environ.get("PM_BENCH_REPS", "3"))
MiB = 1 << 20


def make_split_pair(folder, size, track_size=64 << 10):
    std, mir = folder / "std.img", folder / "mir.img"
    rng = np.random.default_rng(0)
    with pymirror.Volume.create(std, size, track_size) as v:
        chunk = rng.integers(0, 256, 8 * MiB, dtype=np.uint8).tobytes()
        for off in range(0, size, len(chunk)):
            v.write(off, chunk[: min(len(chunk), size - off)])
    pymirror.Volume.create(mir, size, track_size).close()
    pair = pymirror.Pair.create(folder / "pair.meta", std, mir, track_size=track_size)
    pair.establish(config=CopyConfig(batch_size=4 * MiB)).wait()
    pair.split()
    return pair


def test_full_restore_vs_cp(benchmark, tools, tmp_path, scale):
    drop_caches, median, peak_rss_mib, record, timed = (
        tools.drop_caches, tools.median, tools.peak_rss_mib, tools.record, tools.timed)
    size = int(2048 * MiB * scale)
    pair = make_split_pair(tmp_path, size)
    cfg = CopyConfig(copiers=2, batch_size=4 * MiB)
    dst = tmp_path / "cp.out"

    def cp():
        if dst.exists():
            dst.unlink()
        subprocess.run(["cp", "--reflink=never", pair.mirror.path, str(dst)], check=True)

    def restore():
        pair.restore(config=cfg).wait()
        pair.flush()

    def restore_sync():
        restore()

    def cp_sync():
        cp()
        subprocess.run(["sync", str(dst)], check=False)

    ours, theirs = [], []
    cold = True
    for _ in range(REPS if not benchmark.disabled else 1):
        cold &= drop_caches()
        theirs.append(timed(cp_sync))
        cold &= drop_caches()
        ours.append(timed(restore_sync))
    benchmark.pedantic(restore, setup=lambda: (drop_caches(), None)[1], rounds=1, iterations=1)
    ratio = median(theirs) / median(ours)
    record("full_restore_vs_cp", {
        "size_mib": size // MiB, "cache": "cold" if cold else "hot", "reps": len(ours),
        "pymirror_MBps": round(size / median(ours) / 1e6), "cp_MBps": round(size / median(theirs) / 1e6),
        "ratio_vs_cp": round(ratio, 3), "copy_buffer_bound_mib": cfg.copiers * cfg.batch_size // MiB,
    })
    pair.close()


def test_incremental_one_percent_vs_full(benchmark, tools, tmp_path, scale):
    drop_caches, median, peak_rss_mib, record, timed = (
        tools.drop_caches, tools.median, tools.peak_rss_mib, tools.record, tools.timed)
    size = int(1024 * MiB * scale)
    pair = make_split_pair(tmp_path, size)
    tracks = pair.tracks
    rng = np.random.default_rng(1)
    cfg = CopyConfig(copiers=2, batch_size=4 * MiB)

    def damage():
        for t in rng.choice(tracks, size=max(1, tracks // 100), replace=False).tolist():
            pair.write(int(t) * pair.track_size, b"\xff" * 512)

    full, incr = [], []
    for _ in range(REPS if not benchmark.disabled else 1):
        damage()
        drop_caches()
        incr.append(timed(lambda: pair.restore(incremental=True, config=cfg).wait()))
        drop_caches()
        full.append(timed(lambda: pair.restore(incremental=False, config=cfg).wait()))
    damage()
    benchmark.pedantic(lambda: pair.restore(incremental=True, config=cfg).wait(), rounds=1, iterations=1)
    record("incremental_1pct_vs_full", {
        "size_mib": size // MiB, "tracks": tracks, "changed_tracks": max(1, tracks // 100),
        "incremental_s": round(median(incr), 4), "full_s": round(median(full), 4),
        "ratio_incremental_over_full": round(median(incr) / median(full), 4),
    })
    pair.close()


@pytest.mark.parametrize("size_name", ["64MiB", "1TiB"])
def test_time_to_first_read(benchmark, tools, tmp_path, size_name):
    drop_caches, median, peak_rss_mib, record, timed = (
        tools.drop_caches, tools.median, tools.peak_rss_mib, tools.record, tools.timed)
    size = {"64MiB": 64 * MiB, "1TiB": 1 << 40}[size_name]
    std, mir = tmp_path / "std.img", tmp_path / "mir.img"
    pymirror.Volume.create(std, size).close()
    pymirror.Volume.create(mir, size).close()
    pair = pymirror.Pair.create(tmp_path / "pair.meta", std, mir)
    pair.establish(assume_equal=True)   # both blank: no initial copy needed
    pair.split()
    pair.mirror_write(0, b"m" * 4096)
    times = []

    def first_read():
        t0 = time.perf_counter()
        job = pair.restore(incremental=False, config=CopyConfig(rate=1 << 20))
        assert pair.read(0, 4096) == b"m" * 4096
        times.append(time.perf_counter() - t0)
        job.pause()

    # One restore per pair: a full restore of 1 TiB cannot be finished here,
    # so measure the first one only.
    benchmark.pedantic(first_read, rounds=1, iterations=1)
    record(f"first_read_after_restore_{size_name}", {
        "size": size, "seconds": round(times[0], 6), "peak_rss_mib": round(peak_rss_mib(), 1),
    })
    pair.close()


def test_random_read_latency_during_restore(benchmark, tools, tmp_path, scale):
    drop_caches, median, peak_rss_mib, record, timed = (
        tools.drop_caches, tools.median, tools.peak_rss_mib, tools.record, tools.timed)
    size = int(1024 * MiB * scale)
    pair = make_split_pair(tmp_path, size)
    rng = np.random.default_rng(3)
    n = 2000 if not benchmark.disabled else 100
    offsets = (rng.integers(0, size // 4096, n) * 4096).tolist()
    buf = bytearray(4096)

    def latencies():
        out = []
        for off in offsets:
            t0 = time.perf_counter()
            pair.readinto(off, buf)
            out.append(time.perf_counter() - t0)
        return np.array(out)

    drop_caches()
    idle = latencies()
    for t in range(0, pair.tracks, 2):
        pair.write(t * pair.track_size, b"\x01" * 16)
    drop_caches()
    job = pair.restore(config=CopyConfig(copiers=2, batch_size=4 * MiB))
    busy = benchmark.pedantic(latencies, rounds=1, iterations=1)
    still_running = job.progress.running
    job.wait()
    record("read_latency_4k_during_restore", {
        "size_mib": size // MiB, "reads": n, "restore_still_running_at_end": still_running,
        "idle_p50_us": round(float(np.median(idle)) * 1e6, 1), "idle_p99_us": round(float(np.percentile(idle, 99)) * 1e6, 1),
        "restore_p50_us": round(float(np.median(busy)) * 1e6, 1), "restore_p99_us": round(float(np.percentile(busy, 99)) * 1e6, 1),
    })
    pair.close()
