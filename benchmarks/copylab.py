"""Drive benchmarks/copylab.c (an experiment, not a benchmark of pymirror):
cold, durable copies of one file with different knobs, interleaved, to find
what the copier needs for large jobs (docs/copier.md, "Large jobs").

    flock /work/bench.lock python benchmarks/copylab.py DIR SIZE_MIB REPS VARIANT...

VARIANT is "name=copylab options" (e.g. "cur=-t 2 -c 4096 -a 2 -w 1"),
"nbdcopy", "cp", or "name@fresh=options" to copy into a fresh sparse file
instead of over the existing target's blocks.  Every rep drops the page
cache first and ends with ``sync DST``; prints seconds per rep and the
median, and a few /proc/vmstat deltas (reclaim, host-visible faults).
"""
from __future__ import annotations

import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MiB = 1 << 20
VMSTAT_KEYS = ("pgscan_kswapd", "pgscan_direct", "pgsteal_kswapd", "pgsteal_direct", "allocstall_normal",
               "nr_dirty_threshold", "pgmajfault", "workingset_refault_file")


def vmstat() -> dict[str, int]:
    out = {}
    for line in Path("/proc/vmstat").read_text().splitlines():
        k, v = line.split()
        out[k] = int(v)
    return out


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def make_file(path: Path, size: int) -> None:
    if path.exists() and path.stat().st_size == size:
        return
    chunk = os.urandom(16 * MiB)
    with open(path, "wb") as fh:
        for off in range(0, size, len(chunk)):
            fh.write(chunk[: min(len(chunk), size - off)])
        os.fsync(fh.fileno())


def main() -> None:
    folder, size, reps, variants = Path(sys.argv[1]), int(sys.argv[2]) * MiB, int(sys.argv[3]), sys.argv[4:]
    folder.mkdir(parents=True, exist_ok=True)
    exe = folder / "copylab"
    subprocess.run(["gcc", "-O2", "-pthread", "-o", str(exe), str(HERE / "copylab.c")], check=True)
    src, dst, fresh = folder / "src.img", folder / "dst.img", folder / "fresh.img"
    make_file(src, size)
    make_file(dst, size)
    times: dict[str, list[float]] = {}
    for rep in range(reps):
        for v in variants:
            name, _, opts = v.partition("=")
            target = dst
            if name.endswith("@fresh") or name in ("nbdcopy", "cp"):
                target = fresh
                if fresh.exists():
                    fresh.unlink()
                if name not in ("nbdcopy", "cp"):
                    with open(fresh, "wb") as fh:
                        fh.truncate(size)
            if name == "nbdcopy":
                argv = ["nbdcopy", str(src), str(target)]
            elif name == "cp":
                argv = ["cp", "--reflink=never", str(src), str(target)]
            else:
                argv = [str(exe), str(src), str(target)] + shlex.split(opts)
            drop_caches()
            time.sleep(1)
            before = vmstat()
            t0 = time.perf_counter()
            subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
            subprocess.run(["sync", str(target)], check=True)
            t = time.perf_counter() - t0
            after = vmstat()
            delta = {k: after.get(k, 0) - before.get(k, 0) for k in VMSTAT_KEYS if k != "nr_dirty_threshold"}
            times.setdefault(name, []).append(t)
            print(f"rep {rep} {name:>14}: {t:6.2f} s  {size / t / 1e6:5.0f} MB/s  "
                  + " ".join(f"{k}={v}" for k, v in delta.items() if v), flush=True)
    if fresh.exists():
        fresh.unlink()
    print("medians:", ", ".join(f"{k} {statistics.median(v):.2f} s" for k, v in times.items()))
    print("load", os.getloadavg())


if __name__ == "__main__":
    main()
