"""Full restore of an RBD image from another RBD image, against `rbd cp` of
the same source image and librbd's own copy through the Python bindings
(``rbd.Image.copy``, and ``deep_copy``), in the same run, reps interleaved.

Run:  pytest benchmarks/bench_rbd.py --benchmark-only -s -p no:cacheprovider
      PM_BENCH_RBD_MIB=1024 image size, PM_BENCH_REPS=3 reps, PM_BENCH_RBD_QD=4,8,16,32 queue depths
Quick mode (``--benchmark-disable``, as CI runs it): 32 MiB, 1 rep, qd 8.

The cluster is the tests' one-node Ceph cluster (tests/services/ceph.py: one
monitor, one memstore OSD, so "the network" is loopback and "the disk" is
RAM).  Every contender reads the same source image and writes a new image
of the same size; the target is removed after each run.

- pymirror: a pair whose standard is a fresh image and whose mirror is the
  source (established with ``assume_equal``, then split: no copy), then the
  whole command ``pymirror restore META`` as a user runs it (start-up, cluster
  connection, the copy, the final flush and metadata commit), timed from the
  outside, its peak RSS from wait4.  Default copy settings (4 copiers x 4 MiB
  batches for remote stores); the queue depth from the URI (``?qd=N``).
- pymirror in process: the same restore through the API in the benchmark's
  process (volumes opened before the clock starts; stops after the flush).
- ``rbd cp``: the rbd CLI (librbd's copy: 10 concurrent object copies).
- ``rbd.Image.copy`` / ``deep_copy``: the same library call from Debian's
  python3-rbd (run with /usr/bin/python3, which has the bindings), connection
  included.

Ratios are peer time / pymirror time (> 1: pymirror is faster).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

import pymirror

MiB = 1 << 20
HERE = Path(__file__).resolve().parent
SYSTEM_PYTHON = "/usr/bin/python3"


def _load_ceph():
    spec = importlib.util.spec_from_file_location("pymirror_bench_ceph", HERE.parent / "tests" / "services" / "ceph.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("pymirror_bench_ceph", mod)
    spec.loader.exec_module(mod)
    return mod


PYCOPY = r"""
import sys, time, rados, rbd
conf, pool, src, dst, how = sys.argv[1:6]
t0 = time.perf_counter()
c = rados.Rados(conffile=conf)
c.connect()
io = c.open_ioctx(pool)
with rbd.Image(io, src, read_only=True) as im:
    if how == "deep_copy":
        im.deep_copy(io, dst)
    else:
        im.copy(io, dst)
io.close()
c.shutdown()
print(time.perf_counter() - t0)
"""


def run_timed(args, env, cwd):
    """(seconds, peak RSS MiB) of one child process, which must succeed.
    The RSS comes from /usr/bin/time (a child forked from this process
    would start with this process's high-water mark)."""
    timer = shutil.which("time") or "/usr/bin/time"
    t0 = time.perf_counter()
    p = subprocess.run([timer, "-f", "maxrss_kib=%M", *map(str, args)], env=env, cwd=cwd, capture_output=True,
                       text=True)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} failed ({p.returncode}): {p.stderr[-400:]}")
    kib = [ln for ln in p.stderr.splitlines() if ln.startswith("maxrss_kib=")]
    return dt, int(kib[-1].split("=")[1]) / 1024 if kib else float("nan")


@pytest.fixture(scope="module")
def cluster():
    ceph = _load_ceph()
    root = Path(tempfile.mkdtemp(prefix="pm-bench-ceph-"))
    gib = max(3, 2 * int(os.environ.get("PM_BENCH_RBD_MIB", "1024")) // 1024 + 2)
    try:
        c = ceph.start_cluster(root, gib)
    except Exception as exc:   # the benchmark must keep running in CI: fail, do not skip
        pytest.fail(f"cannot start the one-node Ceph cluster: {exc}", pytrace=False)
    try:
        yield c
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


def fill_source(uri: str, size: int) -> None:
    """Random data on every byte (no zero block for a sparse copy to skip)."""
    rng = np.random.default_rng(5)
    block = rng.integers(0, 256, 64 * MiB, dtype=np.uint8)
    with pymirror.Volume.open(uri) as v:
        for off in range(0, size, 64 * MiB):
            n = min(64 * MiB, size - off)
            chunk = block[:n].copy()
            chunk[:8] = np.frombuffer(off.to_bytes(8, "little"), dtype=np.uint8)
            v.write(off, chunk.tobytes())
        v.flush()


def test_rbd_full_restore_vs_rbd_cp(cluster, benchmark, tools, tmp_path):
    quick = benchmark.disabled
    size = (32 if quick else int(os.environ.get("PM_BENCH_RBD_MIB", "1024"))) * MiB
    reps = 1 if quick else int(os.environ.get("PM_BENCH_REPS", "3"))
    qds = [8] if quick else [int(x) for x in os.environ.get("PM_BENCH_RBD_QD", "4,8,16,32").split(",")]
    env = dict(cluster.env)
    conf = str(cluster.conf)
    src = cluster.create_image(size, "src")
    fill_source(cluster.uri(src), size)
    have_pyrbd = subprocess.run([SYSTEM_PYTHON, "-c", "import rbd, rados"], capture_output=True).returncode == 0
    if not have_pyrbd and os.environ.get("CI", "").lower() == "true":
        pytest.fail("python3-rbd (Debian) is not importable by /usr/bin/python3")
    pycopies = ["copy", "deep_copy"] if have_pyrbd else []
    times: dict[str, list[float]] = {f"pymirror qd{q}": [] for q in qds}
    times.update({f"in process qd{q}": [] for q in qds})
    times.update({"rbd cp": []}, **{f"rbd.Image.{h}": [] for h in pycopies})
    rss: dict[str, float] = {}
    load = []

    def pymirror_run(qd: int) -> None:
        dst = cluster.create_image(size, "dst")
        meta = tmp_path / f"{dst}.meta"
        std_uri = cluster.uri(dst, qd=qd, timeout=60)
        mir_uri = cluster.uri(src, qd=qd, timeout=60)
        with pymirror.Pair.create(meta, std_uri, mir_uri) as pair:
            pair.establish(assume_equal=True)
            pair.split()
        dt, r = run_timed([sys.executable, "-m", "pymirror", "restore", str(meta)], env, tempfile.gettempdir())
        with pymirror.Pair.open(meta) as pair:
            assert pair.state == "restored"
            if quick:
                assert pair.verify() == []
            else:   # spot checks: the first, a middle and the last MiB
                for off in (0, size // 2, size - MiB):
                    assert pair.read(off, MiB) == pair.mirror_read(off, MiB)
        times[f"pymirror qd{qd}"].append(dt)
        rss[f"pymirror qd{qd}"] = max(rss.get(f"pymirror qd{qd}", 0), r)
        meta.unlink()
        cluster.remove_image(dst)

    def in_process(qd: int) -> None:
        """The same restore through the API in this process: no start-up,
        no connection set-up (opened before the clock starts); the clock
        stops after close() (final commit and flush)."""
        dst = cluster.create_image(size, "dsti")
        pair = pymirror.Pair.create(None, cluster.uri(dst, qd=qd, timeout=60), cluster.uri(src, qd=qd, timeout=60))
        pair.establish(assume_equal=True)
        pair.split()
        t0 = time.perf_counter()
        assert pair.restore(protect=True).wait(timeout=600)
        pair.flush()
        times[f"in process qd{qd}"].append(time.perf_counter() - t0)
        pair.close()
        cluster.remove_image(dst)

    def rbd_cp() -> None:
        dst = cluster.new_image_name("cp")
        dt, r = run_timed(["rbd", "cp", "--no-progress", f"rbd/{src}", f"rbd/{dst}"], env, tempfile.gettempdir())
        times["rbd cp"].append(dt)
        rss["rbd cp"] = max(rss.get("rbd cp", 0), r)
        cluster.remove_image(dst)

    def py_copy(how: str) -> None:
        dst = cluster.new_image_name("py")
        dt, r = run_timed([SYSTEM_PYTHON, "-c", PYCOPY, conf, "rbd", src, dst, how], env, tempfile.gettempdir())
        times[f"rbd.Image.{how}"].append(dt)
        rss[f"rbd.Image.{how}"] = max(rss.get(f"rbd.Image.{how}", 0), r)
        cluster.remove_image(dst)

    for _ in range(reps):
        for q in qds:
            pymirror_run(q)
            in_process(q)
        rbd_cp()
        for how in pycopies:
            py_copy(how)
        load.append(os.getloadavg()[0])
    cluster.remove_image(src)

    med = {k: tools.median(v) for k, v in times.items()}
    best_qd = min(qds, key=lambda q: med[f"pymirror qd{q}"])
    best = med[f"pymirror qd{best_qd}"]
    best_in = min(qds, key=lambda q: med[f"in process qd{q}"])
    result = {
        "size_mib": size // MiB, "reps": reps, "best_qd": best_qd,
        "seconds_median": {k: round(v, 3) for k, v in med.items()},
        "seconds_all": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "mb_per_s_best": round(size / best / 1e6, 1),
        "ratio_rbd_cp": round(med["rbd cp"] / best, 3),
        "best_qd_in_process": best_in,
        "ratio_rbd_cp_in_process": round(med["rbd cp"] / med[f"in process qd{best_in}"], 3),
        "peak_rss_mib_by_command": {k: round(v, 1) for k, v in rss.items()},
        "load_avg_1min": [round(x, 2) for x in load],
    }
    for how in pycopies:
        result[f"ratio_{how}"] = round(med[f"rbd.Image.{how}"] / best, 3)
    tools.record("rbd_full_restore", result)
    benchmark.extra_info.update(result)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    # the floor is 0.9 x `rbd cp` (target >= 1.0): reported, not asserted (a loaded
    # machine moves single reps by 2x; benchmarks/README.md has the figures and the load)
    if not quick:   # at 32 MiB the interpreter's start-up is most of the command's time
        print(f"\nfloor 0.9 x rbd cp: whole command {'met' if result['ratio_rbd_cp'] >= 0.9 else 'NOT met'}, "
              f"in process {'met' if result['ratio_rbd_cp_in_process'] >= 0.9 else 'NOT met'}")
