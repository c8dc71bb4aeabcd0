"""The cost of the commit protocol: 4 KiB random host writes after a split
(first writes to clean tracks, then rewrites), with the metadata and its
write-intent commits, against the same writes to a pair with no metadata.

Run:  pytest benchmarks/bench_durability.py --benchmark-only -s
4 writer threads (group commit shares commits between them); page cache hot;
reps interleaved (with, without, with, ...).
"""
from __future__ import annotations

import os
import statistics
import threading
import time

import numpy as np

import pymirror

MiB = 1 << 20


def run_writes(pair, offsets, threads=4):
    data = os.urandom(4096)
    parts = [offsets[i::threads] for i in range(threads)]
    barrier = threading.Barrier(threads + 1)

    def worker(part):
        barrier.wait()
        for off in part:
            pair.write(off, data)

    ts = [threading.Thread(target=worker, args=(p,)) for p in parts]
    for t in ts:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in ts:
        t.join()
    return len(offsets) / (time.perf_counter() - t0)


def test_durability_cost(benchmark, tmp_path, tools):
    size = (64 if benchmark.disabled else 1024) * MiB
    n = 2000 if benchmark.disabled else 20000
    reps = 1 if benchmark.disabled else int(os.environ.get("PM_BENCH_REPS", "3"))
    res = {"first_meta": [], "first_none": [], "rewrite_meta": [], "rewrite_none": []}
    commits = []
    for rep in range(reps):
        for kind in ("meta", "none"):
            d = tmp_path / f"{kind}{rep}"
            d.mkdir()
            pymirror.Volume.create(d / "s.img", size).close()
            pymirror.Volume.create(d / "m.img", size).close()
            meta = d / "p.meta" if kind == "meta" else None
            pair = pymirror.Pair.create(meta, d / "s.img", d / "m.img")
            pair.establish(assume_equal=True)
            pair.split()
            tracks = pair.tracks
            rng = np.random.default_rng(rep)
            # first writes: each to a different clean track
            offs = (rng.choice(tracks, size=min(n, tracks), replace=False) * pair.track_size
                    + rng.integers(0, pair.track_size // 4096, size=min(n, tracks)) * 4096).tolist()
            res[f"first_{kind}"].append(run_writes(pair, offs))
            # rewrites: the same tracks again
            res[f"rewrite_{kind}"].append(run_writes(pair, rng.permutation(offs).tolist()))
            if kind == "meta":
                commits.append(pair.progress.commits)
            pair.close()
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    med = {k: round(statistics.median(v)) for k, v in res.items()}
    tools.record("durability_cost", {
        "size_mib": size // MiB, "writes": n, "threads": 4, "reps": reps, "iops_medians": med,
        "commits_per_run": commits,
        "ratio_first_writes": round(med["first_meta"] / med["first_none"], 3),
        "ratio_rewrites": round(med["rewrite_meta"] / med["rewrite_none"], 3),
    })
