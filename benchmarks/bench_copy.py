"""A full restore and a full establish with the DEFAULT settings, against
the copies a user could make instead, in the same run (issue 12).

Run:  pytest benchmarks/bench_copy.py --benchmark-only -s
      PM_BENCH_SIZES=2048,8192 (MiB) and PM_BENCH_REPS=3 pick sizes and reps.
Every rep drops the page cache first (then waits PM_BENCH_SETTLE seconds, 3:
see SETTLE_S), ends with the data durable, and the reps are interleaved:
each round runs every contender once, in turn.

Contenders (source: the pair's mirror for a restore, its standard for an
establish; each peer writes a fresh file beside it):
- pymirror in process: ``restore().wait(); flush()`` (``establish``) on an open pair;
- pymirror as a whole command: ``pymirror restore META`` (``establish``),
  the console script (of the wheel-installed virtualenv PM_BENCH_VENV, else
  beside this interpreter), interpreter start, open, copy, commit and exit
  included; once with
  everything cold, once with the interpreter's and the package's files
  read back into the page cache after the drop (the volumes stay cold);
- ``cp --reflink=never`` + ``sync FILE``;  ``nbdcopy SRC DST`` + ``sync FILE``;
- ``dd iflag=direct oflag=direct bs=4M`` + ``sync FILE``;
- ``fastcopy`` (benchmarks/fastcopy.c, built here): the fastest durable copy
  we could write for this machine: 2 threads on contiguous stripes,
  copy_file_range in 4 MiB pieces, the source read as a sequential stream,
  write-behind, the copied pages dropped from the page cache, fdatasync.
  Unlike the other peers, which write a fresh file as they do by default
  (nbdcopy truncates its target), fastcopy writes over an allocated file, as
  pymirror's copy writes over the target volume.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import pymirror
from pymirror import CopyConfig

MiB = 1 << 20
REPS = int(os.environ.get("PM_BENCH_REPS", "3"))
SIZES = [int(s) for s in os.environ.get("PM_BENCH_SIZES", "2048").split(",")]
HERE = Path(__file__).resolve().parent
# Seconds to wait after each cache drop.  The build machine is a VM with free
# page reporting: memory the guest frees (a dropped cache) is handed back to
# the host about 2 s later, and that work then runs during whichever copy
# comes next (docs/copier.md, "Large copies").  Without the wait the first
# contender of each round, after the round before's copies, paid for it (a
# 2 GiB establish: 2.5 and 3.1 s against 1.65 s when it came later).
SETTLE_S = float(os.environ.get("PM_BENCH_SETTLE", "3"))
# The command as users run it: the console script of an installed pymirror.
# PM_BENCH_VENV names a virtualenv with pymirror installed from a wheel (what
# `pip install pymirror` gives: benchmarks/wheel_venv.sh makes one from this
# checkout); by default the console script beside this interpreter (here an
# editable install, whose interpreter may load more at start: see README).
VENV_BIN = Path(os.environ["PM_BENCH_VENV"]) / "bin" if os.environ.get("PM_BENCH_VENV") else Path(sys.executable).parent
PYMIRROR = [str(VENV_BIN / "pymirror")]
PYTHON = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable


def build_fastcopy(folder: Path) -> str:
    exe = folder / "fastcopy"
    subprocess.run(["gcc", "-O2", "-pthread", "-o", str(exe), str(HERE / "fastcopy.c")], check=True)
    return str(exe)


def make_pair(folder: Path, size: int) -> Path:
    """A split pair of two equal files of random data; returns the meta path."""
    std, mir = folder / "std.img", folder / "mir.img"
    rng = np.random.default_rng(0)
    chunk = rng.integers(0, 256, 16 * MiB, dtype=np.uint8).tobytes()
    with open(std, "wb") as fh:
        for off in range(0, size, len(chunk)):
            fh.write(chunk[: min(len(chunk), size - off)])
    shutil.copyfile(std, mir)
    meta = folder / "pair.meta"
    with pymirror.Pair.create(meta, std, mir) as pair:
        pair.establish(assume_equal=True)
        pair.split()
    return meta


# The command children run as after a wheel install, which writes bytecode:
# this environment sets PYTHONDONTWRITEBYTECODE (every start would compile
# the package's modules), so it is dropped for them and the first one writes it.
CHILD_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
ELAPSED = re.compile(r"copied in ([0-9.]+) s")


def run_child(argv: list[str], out: "list[str] | None" = None) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of a child process.  The RSS comes from
    GNU time when installed (a forked Python child would report the
    benchmark's own RSS from before its exec), else 0.  ``out``, if given,
    receives the child's standard output."""
    timer = shutil.which("time") or ("/usr/bin/time" if os.path.exists("/usr/bin/time") else None)
    rss_file = Path(os.environ.get("TMPDIR", "/tmp")) / f"pm-bench-rss-{os.getpid()}"
    wrapped = [timer, "-f", "%M", "-o", str(rss_file)] + argv if timer else argv
    t0 = time.perf_counter()
    # cwd="/": a `python -c` child would import the source tree from the working directory
    proc = subprocess.run(wrapped, stdout=subprocess.PIPE if out is not None else subprocess.DEVNULL,
                          stderr=subprocess.PIPE, cwd="/", env=CHILD_ENV)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, f"{argv[0]} failed: {proc.stderr.decode().strip()[-300:]}"
    if out is not None:
        out.append(proc.stdout.decode())
    rss = 0.0
    if timer:
        rss = int(rss_file.read_text().split()[-1]) / 1024
        rss_file.unlink()
    return seconds, rss


@pytest.mark.parametrize("kind", ["restore", "establish"])
@pytest.mark.parametrize("size_mib", SIZES)
def test_default_copy_vs_peers(benchmark, tools, tmp_path, scale, kind, size_mib):
    size = int(size_mib * MiB * scale)
    meta = make_pair(tmp_path, size)
    src = tmp_path / ("mir.img" if kind == "restore" else "std.img")
    out = tmp_path / "peer.out"
    fast_out = tmp_path / "fast.out"          # allocated once, overwritten by every fastcopy rep
    subprocess.run(["cp", "--reflink=never", str(src), str(fast_out)], check=True)
    fastcopy = build_fastcopy(tmp_path)
    have_nbdcopy = shutil.which("nbdcopy") is not None

    def settle() -> None:
        tools.drop_caches()
        if not benchmark.disabled:
            time.sleep(SETTLE_S)

    def fresh_out() -> None:
        if out.exists():
            out.unlink()

    def peer(argv: list[str], target: Path = out):
        def go() -> tuple[float, float]:
            fresh_out()
            settle()
            t, rss = run_child(argv)
            t0 = time.perf_counter()
            subprocess.run(["sync", str(target)], check=True)
            return t + time.perf_counter() - t0, rss
        return go

    def in_process() -> tuple[float, float]:
        fresh_out()
        with pymirror.Pair.open(meta) as pair:
            if kind == "establish" and pair.state != "split":
                pair.split()
            settle()
            t0 = time.perf_counter()
            job = pair.restore() if kind == "restore" else pair.establish()
            assert job.wait(timeout=600)
            pair.flush()
            t = time.perf_counter() - t0
            if kind == "establish":
                pair.split()            # ready for the next rep
        return t, tools.peak_rss_mib()

    def prepare_command() -> None:
        fresh_out()
        if kind == "establish":
            with pymirror.Pair.open(meta) as pair:
                if pair.state != "split":
                    pair.split()
        settle()

    overhead: dict[str, list[float]] = {"pymirror_command": [], "pymirror_command_warm_interpreter": []}

    def timed_command(name: str) -> tuple[float, float]:
        """Run the command; note its cost beyond the copy it reports (its
        wall time minus the job's own elapsed time, printed in its summary):
        interpreter start, imports, open, close, exit."""
        printed: list[str] = []
        t, r = run_child(PYMIRROR + [kind, str(meta)], printed)
        m = ELAPSED.search(printed[0])
        assert m, f"no elapsed time in the command's summary: {printed[0]!r}"
        overhead[name].append(t - float(m.group(1)))
        return t, r

    def command() -> tuple[float, float]:
        prepare_command()
        return timed_command("pymirror_command")

    def command_warm() -> tuple[float, float]:
        """The same command after the cache drop, but with the interpreter,
        the package and its libraries read back into the page cache first (by
        an untimed ``import pymirror.cli``): a user's second command.  The
        volumes stay cold."""
        prepare_command()
        subprocess.run([PYTHON, "-c", "import pymirror.command, pymirror.cli, pymirror.pair, pymirror._core"],
                       check=True, cwd="/", env=CHILD_ENV)
        return timed_command("pymirror_command_warm_interpreter")

    contenders = {
        "pymirror": in_process,
        "pymirror_command": command,
        "pymirror_command_warm_interpreter": command_warm,
        "cp": peer(["cp", "--reflink=never", str(src), str(out)]),
        "dd_direct": peer(["dd", f"if={src}", f"of={out}", "bs=4M", "iflag=direct", "oflag=direct", "status=none"]),
        "fastcopy": peer([fastcopy, str(src), str(fast_out), "2", "4"], target=fast_out),
    }
    if have_nbdcopy:
        contenders["nbdcopy"] = peer(["nbdcopy", str(src), str(out)])
    times: dict[str, list[float]] = {k: [] for k in contenders}
    rss: dict[str, float] = {k: 0.0 for k in contenders}
    reps = REPS if not benchmark.disabled else 1
    for _ in range(reps):
        for name, fn in contenders.items():
            t, r = fn()
            times[name].append(t)
            rss[name] = max(rss[name], r)
    fresh_out()
    fast_out.unlink()
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)

    med = {k: tools.median(v) for k, v in times.items()}
    ours = med["pymirror"]
    fastest_peer = min(v for k, v in med.items() if not k.startswith("pymirror"))
    load = os.getloadavg()
    record = {
        "kind": kind, "size_mib": size // MiB, "reps": reps, "settings": "defaults", "settle_s": SETTLE_S,
        "load_avg_1min_at_end": round(load[0], 2),
        "median_s": {k: round(v, 3) for k, v in med.items()},
        "all_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "pymirror_MBps": round(size / ours / 1e6),
        "ratio_vs": {k: round(v / ours, 3) for k, v in med.items() if k != "pymirror"},
        "command_vs": {k: round(v / med["pymirror_command"], 3) for k, v in med.items()
                       if not k.startswith("pymirror")},
        "ratio_vs_fastest_peer": round(fastest_peer / ours, 3),
        # the command's wall time minus the copy it reports, per rep (median)
        "command_overhead_s": round(tools.median(overhead["pymirror_command"]), 3),
        "command_overhead_warm_interpreter_s": round(tools.median(overhead["pymirror_command_warm_interpreter"]), 3),
        "command_overhead_all_s": {k: [round(x, 3) for x in v] for k, v in overhead.items()},
        "command": PYMIRROR[0],
        "child_or_self_peak_rss_mib": {k: round(v, 1) for k, v in rss.items()},
        # copy buffers (copiers x batch) and the page-residency windows of
        # the page-cache eviction (copiers x one byte per 4 KiB page of
        # batch + 2 batches + 64 MiB: 17 KiB each; csrc/evict.c)
        "copy_buffer_bound_mib": 2 * 4,
        "evict_window_bound_kib": 2 * (((4 + 8 + 64) << 20) // 4096) // 1024,
    }
    tools.record(f"copy_{kind}_{size // MiB}MiB", record)
