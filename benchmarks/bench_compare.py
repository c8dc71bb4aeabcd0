"""Comparing the two sides (issue 16 item 1), against baselines of the same run.

Run:  pytest benchmarks/bench_compare.py --benchmark-only -s
(quick, as CI does:  pytest benchmarks/bench_compare.py --benchmark-disable)

- compare-restore of a 2 GiB pair whose mirror differs in 1 % of its tracks
  (scattered, written behind the pair's back) against a full restore of the
  same pair: reps alternate, page cache dropped before each, data durable at
  the end (``flush``).  A compare reads both sides whole, so it should cost
  about one read of each: the figure is the ratio of the medians.
- ``pymirror verify`` (a whole process, as a user runs it) against ``cmp`` of
  the two images, cold and hot, with the verify process's peak RSS.
"""
from __future__ import annotations

import os
import random
import subprocess
import sys
import tempfile
import time

import numpy as np

import pymirror
from pymirror import CopyConfig

REPS = int(os.environ.get("PM_BENCH_REPS", "3"))
MiB = 1 << 20
# the size; PM_BENCH_COMPARE_MIB overrides it (a smaller disk: the run needs 2x this free)
SIZE_MIB = int(os.environ.get("PM_BENCH_COMPARE_MIB", "2048"))
TS = 64 << 10


def make_pair(folder, size):
    std, mir = folder / "std.img", folder / "mir.img"
    rng = np.random.default_rng(0)
    chunk = rng.integers(0, 256, 8 * MiB, dtype=np.uint8).tobytes()
    for path in (std, mir):
        with open(path, "wb") as f:
            for off in range(0, size, len(chunk)):
                f.write(chunk[: min(len(chunk), size - off)])
    pair = pymirror.Pair.create(folder / "pair.meta", std, mir, track_size=TS)
    pair.establish(assume_equal=True)
    pair.split()
    return pair


def damage_mirror(pair, fraction, seed):
    """Change `fraction` of the mirror's tracks (one 4 KiB piece each) with the
    pair closed to them: straight into the image file."""
    rnd = random.Random(seed)
    tracks = rnd.sample(range(pair.tracks), max(1, int(pair.tracks * fraction)))
    fd = os.open(pair.mirror.path, os.O_WRONLY)
    try:
        for t in tracks:
            os.pwrite(fd, rnd.randbytes(4096), t * TS + rnd.randrange(0, TS - 4096 + 1, 4096))
        os.fsync(fd)
    finally:
        os.close(fd)
    return len(tracks)


def test_compare_restore_vs_full_restore(benchmark, tools, tmp_path, scale):
    drop_caches, median, record, timed = tools.drop_caches, tools.median, tools.record, tools.timed
    size = int(SIZE_MIB * MiB * scale)
    pair = make_pair(tmp_path, size)
    cfg = CopyConfig(copiers=2, batch_size=4 * MiB)
    damaged = []

    def compare_restore():
        pair.restore(config=cfg, compare=True).wait()
        pair.flush()

    def full_restore():
        pair.restore(config=cfg).wait()
        pair.flush()

    def read_both():      # "a read of each side": the floor of any compare
        subprocess.run(f"cat '{pair.standard.path}' '{pair.mirror.path}' > /dev/null", shell=True, check=True)

    ours, full, copied, reads = [], [], [], []
    cold = True
    for rep in range(REPS if not benchmark.disabled else 1):
        damaged.append(damage_mirror(pair, 0.01, rep))
        cold &= drop_caches()
        reads.append(timed(read_both))
        cold &= drop_caches()
        ours.append(timed(compare_restore))
        p = pair.progress
        assert p.tracks_copied == damaged[-1] and pair.verify() == []
        copied.append(p.bytes_written)
        cold &= drop_caches()
        full.append(timed(full_restore))
    damage_mirror(pair, 0.01, 99)
    benchmark.pedantic(compare_restore, setup=lambda: (drop_caches(), None)[1], rounds=1, iterations=1)
    record("compare_restore_vs_full", {
        "size_mib": size // MiB, "cache": "cold" if cold else "hot", "reps": len(ours),
        "differing_tracks": damaged[0], "tracks": pair.tracks, "bytes_copied": copied[0],
        "compare_restore_s": round(median(ours), 3), "full_restore_s": round(median(full), 3),
        "ratio_compare_to_full": round(median(ours) / median(full), 3),
        "read_both_sides_s": round(median(reads), 3),
        "ratio_compare_to_read_both": round(median(ours) / median(reads), 3),
        "compare_read_MBps_both_sides": round(2 * size / median(ours) / 1e6),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    })
    pair.close()


# `pymirror ARGS`, reporting the process's own peak RSS (VmHWM) on its last stderr line.
# (wait4's ru_maxrss would not do: a child's high-water mark starts at its
# parent's, this benchmark process, and survives the exec.)
_CLI_HWM = ("import sys\nfrom pymirror.cli import main\ntry:\n    main(sys.argv[1:])\nfinally:\n"
            "    sys.stderr.write([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0])\n")


def _run_rss(cmd):
    """Run cmd; (seconds, exit code, peak RSS in MiB when it is a pymirror
    command, else None)."""
    ours = cmd[:3] == [sys.executable, "-m", "pymirror"]
    if ours:
        cmd = [sys.executable, "-c", _CLI_HWM, *cmd[3:]]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          cwd=tempfile.gettempdir())          # the installed package, not the tree
    seconds = time.perf_counter() - t0
    rss = None
    if ours:
        line = proc.stderr.strip().splitlines()[-1]          # "VmHWM:    12345 kB"
        rss = int(line.split()[1]) / 1024
    return seconds, proc.returncode, rss


def test_verify_vs_cmp(benchmark, tools, tmp_path, scale):
    drop_caches, median, record = tools.drop_caches, tools.median, tools.record
    size = int(SIZE_MIB * MiB * scale)
    pair = make_pair(tmp_path, size)        # two equal images: both tools read everything
    meta = pair.meta_path
    a, b = pair.standard.path, pair.mirror.path
    pair.close()
    verify = [sys.executable, "-m", "pymirror", "verify", meta]
    cmp = ["cmp", a, b]
    figures = {}
    _, code, idle_rss = _run_rss([sys.executable, "-m", "pymirror", "query", meta])
    assert code == 0
    figures["query_peak_rss_mib"] = round(idle_rss, 1)     # the interpreter and the package alone
    for cache in ("cold", "hot"):
        ours, theirs, rss = [], [], []
        for _ in range(REPS if not benchmark.disabled else 1):
            if cache == "cold":
                drop_caches()
            t, code, _ = _run_rss(cmp)
            assert code == 0
            theirs.append(t)
            if cache == "cold":
                drop_caches()
            t, code, peak = _run_rss(verify)
            assert code == 0
            ours.append(t)
            rss.append(peak)
        figures[cache] = {"verify_s": round(median(ours), 3), "cmp_s": round(median(theirs), 3),
                          "verify_MBps": round(2 * size / median(ours) / 1e6),
                          "cmp_MBps": round(2 * size / median(theirs) / 1e6),
                          "ratio_cmp_time_to_verify_time": round(median(theirs) / median(ours), 3),
                          "verify_peak_rss_mib": round(max(rss), 1)}
    benchmark.pedantic(lambda: _run_rss(verify), rounds=1, iterations=1)
    # the C compare alone, in this process (no interpreter start): hot
    with pymirror.Pair.open(meta) as p:
        t0 = time.perf_counter()
        assert p.verify() == []
        figures["in_process_hot_MBps"] = round(2 * size / (time.perf_counter() - t0) / 1e6)
    record("verify_vs_cmp", {"size_mib": size // MiB, "reps": REPS if not benchmark.disabled else 1,
                             "load_avg_1m": round(os.getloadavg()[0], 2), **figures})
