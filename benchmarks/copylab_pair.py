"""Drive the real copier (an experiment beside copylab.py): full restores
or establishes of one file-backed pair, each rep in a fresh process, with
the copier's temporary PM_COPY_LAB switches per variant, interleaved with
nbdcopy; page cache dropped before each rep, data durable at the end.

    flock /work/bench.lock python benchmarks/copylab_pair.py DIR SIZE_MIB REPS KIND VARIANT...

VARIANT: "name=" (the defaults), "name=copiers:3,batch_size:8388608,pace:off"
(CopyConfig fields), "nbdcopy", or "fastcopy" (benchmarks/fastcopy.c over an
allocated copy).  While the copier's choices were measured, "name=FLAGS"
also set PM_COPY_LAB, a temporary switch of the copier (removed since).
Each pymirror rep prints its phases: the call, the job's own elapsed time,
the wait, the flush.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from copylab import make_file   # this script's folder is on sys.path

MiB = 1 << 20
HERE = Path(__file__).resolve().parent
CHILD = r"""
import sys, time, pymirror
meta, kind, conf = sys.argv[1], sys.argv[2], sys.argv[3]
cfg = {}
for item in filter(None, conf.split(",")):
    k, _, v = item.partition(":")
    cfg[k] = int(v) if v.isdigit() else v
with pymirror.Pair.open(meta) as pair:
    if pair.state != "split":
        pair.split()
    open("/proc/sys/vm/drop_caches", "w").write("3\n")
    time.sleep(3)
    config = pymirror.CopyConfig(**cfg)
    t0 = time.perf_counter()
    job = pair.restore(config=config) if kind == "restore" else pair.establish(config=config)
    t1 = time.perf_counter()
    assert job.wait(timeout=900)
    t2 = time.perf_counter()
    pair.flush()
    t = time.perf_counter() - t0
    elapsed = pair.progress.elapsed
    if kind == "establish":
        pair.split()
print(f"call {t1 - t0:.3f} job {elapsed:.3f} wait {t2 - t0:.3f} flush {t - (t2 - t0):.3f}")
print(t)
"""


def main() -> None:
    import pymirror
    folder, size, reps, kind, variants = (Path(sys.argv[1]), int(sys.argv[2]) * MiB, int(sys.argv[3]),
                                          sys.argv[4], sys.argv[5:])
    folder.mkdir(parents=True, exist_ok=True)
    std, mir, meta, fresh = folder / "dst.img", folder / "src.img", folder / "lab.meta", folder / "fresh.img"
    make_file(mir, size)
    make_file(std, size)
    if not meta.exists():
        with pymirror.Pair.create(meta, std, mir) as pair:
            pair.establish(assume_equal=True)
            pair.split()
    times: dict[str, list[float]] = {}
    for rep in range(reps):
        for v in variants:
            name, _, flags = v.partition("=")
            subprocess.run(["sync"], check=True)
            phases = ""
            if name == "fastcopy":
                exe = folder / "fastcopy"
                if not exe.exists():
                    subprocess.run(["gcc", "-O2", "-pthread", "-o", str(exe), str(HERE / "fastcopy.c")], check=True)
                fast = folder / "fast.img"
                if not fast.exists():
                    subprocess.run(["cp", "--reflink=never", str(mir), str(fast)], check=True)
                Path("/proc/sys/vm/drop_caches").write_text("3\n")
                time.sleep(3)
                t0 = time.perf_counter()
                subprocess.run([str(exe), str(mir if kind == "restore" else std), str(fast), "2", "4"], check=True)
                subprocess.run(["sync", str(fast)], check=True)
                t = time.perf_counter() - t0
            elif name == "nbdcopy":
                if fresh.exists():
                    fresh.unlink()
                Path("/proc/sys/vm/drop_caches").write_text("3\n")
                time.sleep(3)
                t0 = time.perf_counter()
                subprocess.run(["nbdcopy", str(mir if kind == "restore" else std), str(fresh)], check=True)
                subprocess.run(["sync", str(fresh)], check=True)
                t = time.perf_counter() - t0
                fresh.unlink()
            else:
                out = subprocess.run([sys.executable, "-c", CHILD, str(meta), kind, flags], check=True,
                                     stdout=subprocess.PIPE, cwd="/").stdout.decode().splitlines()
                t, phases = float(out[-1]), out[-2]
            times.setdefault(name, []).append(t)
            print(f"rep {rep} {name:>12}: {t:6.2f} s  {size / t / 1e6:5.0f} MB/s  load {os.getloadavg()[0]:.2f}  {phases}",
                  flush=True)
    print("medians:", ", ".join(f"{k} {statistics.median(v):.2f} s" for k, v in times.items()))


if __name__ == "__main__":
    main()
