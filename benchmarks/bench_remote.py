"""A full restore between two NBD exports against ``nbdcopy`` between the
same two exports, in the same run, reps interleaved (issue 14).

Run:  pytest benchmarks/bench_remote.py --benchmark-only -s
      PM_BENCH_MIB=1024 (volume size), PM_BENCH_REPS=3, PM_BENCH_SERVER=nbdkit|qemu-nbd,
      PM_BENCH_SETTINGS="qd=8;qd=16;..." (the URI parameters of the pymirror runs)
Quick mode (CI): ``--benchmark-disable`` runs it at 1/32 of the size, once.

Two servers (``nbdkit file`` by default, or ``qemu-nbd -e 16``) serve two
files on unix sockets: ``src`` (random data) and ``dst``.  Each round runs,
in turn:
- ``nbdcopy --flush SRC DST`` (libnbd's own copier; 4 connections when the
  server offers multi-conn, several requests in flight on each);
- for each setting, ``pymirror`` in a child process: a pair whose standard
  is DST and whose mirror is SRC (metadata local), opened, fully restored
  (the copy and the commits, flushes included), closed.  The time is the
  restore's (open and close excluded; nbdcopy's connection setup, a few ms,
  is in its time); the peak RSS is the child's (GNU time).
Figures: medians over reps, MB/s of volume size, and pymirror/nbdcopy ratios
of the medians.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import pymirror

MiB = 1 << 20
REPS = int(os.environ.get("PM_BENCH_REPS", "3"))
SIZE_MIB = int(os.environ.get("PM_BENCH_MIB", "1024"))
SERVER = os.environ.get("PM_BENCH_SERVER", "nbdkit")
SETTINGS = os.environ.get("PM_BENCH_SETTINGS", "qd=1;qd=4;qd=8;qd=16;qd=8&conns=1").split(";")

CHILD = r"""
import json, resource, sys, time
import pymirror
meta = sys.argv[1]
with pymirror.Pair.open(meta) as pair:
    t0 = time.perf_counter()
    assert pair.restore().wait(timeout=3600)
    t = time.perf_counter() - t0
print(json.dumps({"seconds": t}))
"""


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is missing: apt-get install qemu-utils nbdkit libnbd-bin")
    return path


class Server:
    def __init__(self, kind: str, img: Path, sock: Path) -> None:
        if kind == "qemu-nbd":
            argv = [need("qemu-nbd"), "-k", str(sock), "-f", "raw", "-t", "-e", "16", "--cache=writeback", str(img)]
        else:
            argv = [need("nbdkit"), "-f", "-U", str(sock), "file", f"file={img}"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self.uri = f"nbd+unix:///?socket={sock}"
        deadline = time.monotonic() + 15
        while not sock.exists():
            assert self.proc.poll() is None and time.monotonic() < deadline, f"{kind} did not start"
            time.sleep(0.02)
        time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def timed_child(argv: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MiB, stdout) of a child process."""
    timer = shutil.which("time") or ("/usr/bin/time" if os.path.exists("/usr/bin/time") else None)
    rss_file = Path(os.environ.get("TMPDIR", "/tmp")) / f"pm-bench-remote-rss-{os.getpid()}"
    wrapped = [timer, "-f", "%M", "-o", str(rss_file)] + argv if timer else argv
    t0 = time.perf_counter()
    proc = subprocess.run(wrapped, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/", text=True)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, f"{argv[0]} failed: {proc.stderr.strip()[-400:]}"
    rss = 0.0
    if timer:
        rss = int(rss_file.read_text().split()[-1]) / 1024
        rss_file.unlink()
    return seconds, rss, proc.stdout


def test_restore_between_nbd_exports_vs_nbdcopy(benchmark, tools, tmp_path, scale):
    nbdcopy = need("nbdcopy")
    size = int(SIZE_MIB * MiB * scale)
    reps = REPS if not benchmark.disabled else 1
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    chunk = np.random.default_rng(0).integers(0, 256, 16 * MiB, dtype=np.uint8).tobytes()
    with open(src, "wb") as fh:
        for off in range(0, size, len(chunk)):
            fh.write(chunk[: min(len(chunk), size - off)])
    with open(dst, "wb") as fh:
        fh.truncate(size)
    servers = [Server(SERVER, src, tmp_path / "src.sock"), Server(SERVER, dst, tmp_path / "dst.sock")]
    try:
        s_uri, d_uri = servers[0].uri, servers[1].uri
        metas = {}
        for i, setting in enumerate(SETTINGS):
            meta = tmp_path / f"pair{i}.meta"
            with pymirror.Pair.create(meta, f"{d_uri}&{setting}", f"{s_uri}&{setting}") as pair:
                pair.establish(assume_equal=True)    # a bookkeeping start: the restore below copies all
                pair.split()
            metas[setting] = meta
        times: dict[str, list[float]] = {"nbdcopy": []}
        rss: dict[str, float] = {"nbdcopy": 0.0}
        for setting in SETTINGS:
            times[setting], rss[setting] = [], 0.0
        for _ in range(reps):
            t, r, _out = timed_child([nbdcopy, "--flush", s_uri, d_uri])
            times["nbdcopy"].append(t)
            rss["nbdcopy"] = max(rss["nbdcopy"], r)
            for setting in SETTINGS:
                _t, r, out = timed_child([sys.executable, "-c", CHILD, str(metas[setting])])
                times[setting].append(json.loads(out)["seconds"])
                rss[setting] = max(rss[setting], r)
        # the last restore left DST equal to SRC
        with open(src, "rb") as a, open(dst, "rb") as b:
            assert a.read(4 * MiB) == b.read(4 * MiB)
        med = {k: tools.median(v) for k, v in times.items()}
        mbs = {k: round(size / v / 1e6, 1) for k, v in med.items()}
        ratio = {k: round(med["nbdcopy"] / v, 3) for k, v in med.items() if k != "nbdcopy"}
        best = max(ratio, key=lambda k: ratio[k])
        load = os.getloadavg()
        result = {"server": SERVER, "size_mib": size // MiB, "reps": reps, "mb_s": mbs, "ratio_vs_nbdcopy": ratio,
                  "best_setting": best, "best_ratio": ratio[best],
                  "child_peak_rss_mib": {k: round(v, 1) for k, v in rss.items()},
                  "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
                  "loadavg_1_5_15": [round(x, 2) for x in load]}
        tools.record(f"remote_restore_{SERVER}", result)
        benchmark.extra_info.update(result)
        benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    finally:
        for s in servers:
            s.stop()
