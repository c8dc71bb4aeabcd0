"""What a whole `pymirror restore|establish META` costs beyond its copy, for
one or more installed pymirrors (virtualenvs), interleaved, cold and warm.

    python benchmarks/command_overhead.py META KIND REPS VENV [VENV ...]

Each rep, for each virtualenv in turn: the pair is made ready (split, by the
first virtualenv's python), the page cache dropped and 1 s waited; "warm"
then reads the interpreter and the package back in (an untimed import), as
bench_copy.py does; the command runs, and its cost beyond the copy is its
wall time minus the copy time it prints ("copied in X s").  Prints the
medians in ms.  Run under the benchmark lock (it drops the page cache).
"""
from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import time

ELAPSED = re.compile(r"copied in ([0-9.]+) s")
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
READY = """
import sys, pymirror
with pymirror.Pair.open(sys.argv[1]) as p:
    if p.state in ("restoring", "syncing"):
        p.resume().wait()
    if p.state != "split":
        if p.state != "established":
            p.establish().wait()
        p.split()
"""


def drop() -> None:
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
    time.sleep(1.0)


def once(venv: str, meta: str, kind: str, warm: bool) -> float:
    subprocess.run([f"{venv}/bin/python", "-c", READY, meta], check=True, cwd="/", env=ENV)
    drop()
    if warm:
        subprocess.run([f"{venv}/bin/python", "-c", "import pymirror.command, pymirror.cli, pymirror.pair, pymirror._core"],
                       check=True, cwd="/", env=ENV)
    t0 = time.perf_counter()
    out = subprocess.run([f"{venv}/bin/pymirror", kind, meta], check=True, cwd="/", env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout
    wall = time.perf_counter() - t0
    m = ELAPSED.search(out)
    assert m, out
    return wall - float(m.group(1))


def main() -> None:
    meta, kind, reps, venvs = os.path.abspath(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4:]
    got: dict[tuple[str, bool], list[float]] = {(v, w): [] for v in venvs for w in (False, True)}
    for _ in range(reps):
        for warm in (False, True):
            for v in venvs:
                got[(v, warm)].append(once(v, meta, kind, warm))
    for (v, warm), xs in got.items():
        print(f"{kind} {'warm' if warm else 'cold'} {v}: median {1e3 * statistics.median(xs):.0f} ms "
              f"({', '.join(f'{1e3 * x:.0f}' for x in xs)})")
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
