"""The NBD export against qemu-nbd and nbdkit serving the same file, in the
same run, reps interleaved (pymirror, qemu-nbd, nbdkit, pymirror, ...).

Run:  pytest benchmarks/bench_nbd.py --benchmark-only -s
Figures (medians): sequential read (nbdcopy export -> null:), sequential
write (nbdcopy file -> export, first writes after a split and rewrites),
4 KiB random-read IOPS at queue depth 1 and 32 (fio's nbd engine).
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


def need(tool):
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} is missing: apt-get install qemu-utils nbdkit libnbd-bin fio")
    return tool


def wait_socket(path, timeout=20.0):
    t0 = time.monotonic()
    while not os.path.exists(path):
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(path)
        time.sleep(0.05)


class Servers:
    def __init__(self, d, size):
        self.d = d
        self.size = size
        self.procs = []
        self.sock = {n: str(d / f"{n}.sock") for n in ("pymirror", "qemu-nbd", "nbdkit")}

    def start(self):
        d = self.d
        self.procs.append(subprocess.Popen([sys.executable, "-m", "pymirror", "serve", str(d / "pair.meta"),
                                            "--socket", self.sock["pymirror"]], cwd=str(d),
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        self.procs.append(subprocess.Popen([need("qemu-nbd"), "-k", self.sock["qemu-nbd"], "-f", "raw", "-t",
                                            "-e", "16", str(d / "peer.img")]))
        self.procs.append(subprocess.Popen([need("nbdkit"), "-f", "-U", self.sock["nbdkit"], "file",
                                            f"file={d / 'peer.img'}"]))
        for s in self.sock.values():
            wait_socket(s)

    def uri(self, name):
        return f"nbd+unix:///?socket={self.sock[name]}"

    def stop(self):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait(timeout=30)


@pytest.fixture
def servers(tmp_path, benchmark):
    size = (64 if benchmark.disabled else 1024) * MiB
    rng = np.random.default_rng(0)
    with open(tmp_path / "src.bin", "wb") as fh:
        for _ in range(size // (8 * MiB)):
            fh.write(rng.integers(0, 256, 8 * MiB, dtype=np.uint8).tobytes())
    pymirror.Volume.create(tmp_path / "std.img", size).close()
    pymirror.Volume.create(tmp_path / "mir.img", size).close()
    pymirror.Volume.create(tmp_path / "peer.img", size).close()
    with pymirror.Pair.create(tmp_path / "pair.meta", tmp_path / "std.img", tmp_path / "mir.img") as p:
        p.establish(assume_equal=True)
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
                          "--size=64M", f"--iodepth={qd}", f"--runtime={runtime}", "--time_based",
                          "--output-format=json"], check=True, capture_output=True, text=True, timeout=600).stdout
    return json.loads(out[out.index("{"):])["jobs"][0]["read"]["iops"]


def test_nbd_against_peers(benchmark, servers, tools):
    names = ["pymirror", "qemu-nbd", "nbdkit"]
    reps = 1 if benchmark.disabled else int(os.environ.get("PM_BENCH_REPS", "3"))
    runtime = 1 if benchmark.disabled else 4
    src = str(servers.d / "src.bin")
    res = {n: {"write_first": [], "write": [], "read": [], "qd1": [], "qd32": []} for n in names}
    for rep in range(reps):
        for n in names:
            key = "write_first" if rep == 0 else "write"
            res[n][key].append(servers.size / timed([need("nbdcopy"), "--flush", src, servers.uri(n)]) / 1e6)
            res[n]["read"].append(servers.size / timed([need("nbdcopy"), servers.uri(n), "null:"]) / 1e6)
            res[n]["qd1"].append(fio_iops(servers.uri(n), 1, runtime))
            res[n]["qd32"].append(fio_iops(servers.uri(n), 32, runtime))
    benchmark.pedantic(lambda: timed([need("nbdcopy"), servers.uri("pymirror"), "null:"]), rounds=1, iterations=1)
    med = {n: {k: round(statistics.median(v)) for k, v in r.items() if v} for n, r in res.items()}
    ratios = {}
    for peer in ("qemu-nbd", "nbdkit"):
        for k in med["pymirror"]:
            if k in med[peer] and med[peer][k]:
                ratios[f"{k}_vs_{peer}"] = round(med["pymirror"][k] / med[peer][k], 2)
    tools.record("nbd_vs_peers", {"size_mib": servers.size // MiB, "reps": reps, "medians": med,
                                  "ratios": ratios, "units": "MB/s for read/write, IOPS for qd1/qd32"})
