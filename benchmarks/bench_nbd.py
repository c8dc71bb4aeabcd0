"""The NBD export against qemu-nbd and nbdkit serving the same bytes, in the
same run, reps interleaved (pymirror, qemu-nbd, nbdkit, pymirror, ...).

Run:  pytest benchmarks/bench_nbd.py --benchmark-only -s
      (PM_BENCH_MIB=1024 volume size, PM_BENCH_REPS=3 reps, PM_BENCH_SECONDS=4 per fio run)
Figures (medians over reps), all over unix sockets, client and server on the
same machine:
  read       sequential read, ``nbdcopy URI null:`` (4 connections), MB/s
  write      sequential write, ``nbdcopy --flush file URI``, MB/s (rep 0,
             ``write_first``, is the first write after a split for pymirror)
  qd1, qd32  4 KiB random reads, fio's nbd engine, page cache hot, IOPS
  cold_qd1, cold_qd32   the same with the served files dropped from the page
             cache first (``posix_fadvise(DONTNEED)`` on those files only)
  cpu_us_qd32  server CPU time per request in the hot qd32 run (µs)
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np
import pytest

import pymirror

MiB = 1 << 20
NAMES = ("pymirror", "qemu-nbd", "nbdkit")


def need(tool):
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} is missing: apt-get install qemu-utils nbdkit libnbd-bin fio")
    return tool


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Servers:
    """One server of each kind; each serves its own copy of the same bytes."""

    def __init__(self, d, size):
        self.d = d
        self.size = size
        self.procs = {}
        self.sock = {n: str(d / f"{n}.sock") for n in NAMES}
        self.files = {"pymirror": [d / "std.img", d / "mir.img"], "qemu-nbd": [d / "qemu.img"],
                      "nbdkit": [d / "nbdkit.img"]}

    def start(self):
        d = self.d
        self.procs["pymirror"] = subprocess.Popen(
            [sys.executable, "-m", "pymirror", "serve", str(d / "pair.meta"), "--socket", self.sock["pymirror"]],
            cwd=str(d), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs["qemu-nbd"] = subprocess.Popen(
            [need("qemu-nbd"), "-k", self.sock["qemu-nbd"], "-f", "raw", "-t", "-e", "16", str(d / "qemu.img")])
        self.procs["nbdkit"] = subprocess.Popen(
            [need("nbdkit"), "-f", "-U", self.sock["nbdkit"], "file", f"file={d / 'nbdkit.img'}"])
        t0 = time.monotonic()
        for s in self.sock.values():
            while not os.path.exists(s):
                if time.monotonic() - t0 > 30:
                    raise TimeoutError(s)
                time.sleep(0.05)

    def uri(self, name):
        return f"nbd+unix:///?socket={self.sock[name]}"

    def hot(self, name):
        for f in self.files[name]:
            subprocess.run(["cat", str(f)], stdout=subprocess.DEVNULL, check=True)

    def cold(self, name):
        for f in self.files[name]:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

    def stop(self):
        for p in self.procs.values():
            p.terminate()
        for p in self.procs.values():
            p.wait(timeout=60)


@pytest.fixture
def servers(tmp_path, benchmark):
    size = (64 if benchmark.disabled else int(os.environ.get("PM_BENCH_MIB", "1024"))) * MiB
    rng = np.random.default_rng(0)
    with open(tmp_path / "src.bin", "wb") as fh:
        for _ in range(size // (8 * MiB)):
            fh.write(rng.integers(0, 256, 8 * MiB, dtype=np.uint8).tobytes())
    for name in ("std.img", "mir.img", "qemu.img", "nbdkit.img"):
        shutil.copyfile(tmp_path / "src.bin", tmp_path / name)
    with pymirror.Pair.create(tmp_path / "pair.meta", tmp_path / "std.img", tmp_path / "mir.img") as p:
        p.establish(assume_equal=True)       # both sides hold src.bin already
        p.split()
    s = Servers(tmp_path, size)
    s.start()
    yield s
    s.stop()


def timed(cmd):
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    return time.perf_counter() - t0


def fio_iops(uri, qd, runtime):
    out = subprocess.run([need("fio"), "--name=r", "--ioengine=nbd", f"--uri={uri}", "--rw=randread", "--bs=4k",
                          f"--iodepth={qd}", f"--runtime={runtime}", "--time_based", "--output-format=json"],
                         check=True, capture_output=True, text=True, timeout=600).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]["read"]
    return job["iops"], job["total_ios"]


def test_nbd_against_peers(benchmark, servers, tools):
    reps = 1 if benchmark.disabled else int(os.environ.get("PM_BENCH_REPS", "3"))
    runtime = 1 if benchmark.disabled else int(os.environ.get("PM_BENCH_SECONDS", "4"))
    src = str(servers.d / "src.bin")
    keys = ("write_first", "write", "read", "qd1", "qd32", "cpu_us_qd32", "cold_qd1", "cold_qd32")
    res = {n: {k: [] for k in keys} for n in NAMES}
    for rep in range(reps):
        for n in NAMES:
            uri, r = servers.uri(n), res[n]
            r["write_first" if rep == 0 else "write"].append(
                servers.size / timed([need("nbdcopy"), "--flush", src, uri]) / 1e6)
            servers.hot(n)
            r["read"].append(servers.size / timed([need("nbdcopy"), uri, "null:"]) / 1e6)
            r["qd1"].append(fio_iops(uri, 1, runtime)[0])
            cpu0 = cpu_seconds(servers.procs[n].pid)
            iops, ios = fio_iops(uri, 32, runtime)
            r["qd32"].append(iops)
            r["cpu_us_qd32"].append((cpu_seconds(servers.procs[n].pid) - cpu0) / ios * 1e6)
            for qd in (1, 32):
                servers.cold(n)
                r[f"cold_qd{qd}"].append(fio_iops(uri, qd, runtime)[0])
    benchmark.pedantic(lambda: timed([need("nbdcopy"), servers.uri("pymirror"), "null:"]), rounds=1, iterations=1)
    med = {n: {k: round(statistics.median(v), 1 if k.startswith("cpu") else None) for k, v in r.items() if v}
           for n, r in res.items()}
    ratios = {}
    for peer in NAMES[1:]:
        for k in med["pymirror"]:
            if k in med[peer] and med[peer][k]:
                ratios[f"{k}_vs_{peer}"] = round(med["pymirror"][k] / med[peer][k], 2)
    tools.record("nbd_vs_peers", {
        "size_mib": servers.size // MiB, "reps": reps, "fio_seconds": runtime, "medians": med, "ratios": ratios,
        "all": {n: {k: [round(x, 1) for x in v] for k, v in r.items() if v} for n, r in res.items()},
        "units": "MB/s for read/write, IOPS for qd*, µs of server CPU per request for cpu_us_qd32"})
