"""FUA-light: host flushes and FUA writes through the NBD export, before and
after, against nbdkit and qemu-nbd, same run, reps interleaved.

Run:  pytest benchmarks/bench_fua.py --benchmark-only -s
      (PM_BENCH_MIB=4 export size, PM_BENCH_REPS=3, PM_BENCH_SECONDS=5 per fio run)
      CI runs it with --benchmark-disable: 1 MiB, one rep, 1 s.

Servers, each over its own copy of a zeroed image, on unix sockets:
  pymirror        ``pymirror serve`` of an established pair (FUA-light)
  pymirror-full   the same with PYMIRROR_FLUSH_FULL_COMMIT=1: every flush and
                  FUA write commits the metadata fully, as before FUA-light
  nbdkit          ``nbdkit file``
  qemu-nbd        ``qemu-nbd -t``
Figures (medians):
  fsync_iops      fio's nbd engine, 4 KiB random writes at qd1, ``--fsync=1``
                  (an NBD FLUSH after every write)
  fua_iops        the same writes with FUA on every one: fio's nbd engine sends
                  none, so each server is reached through ``nbdkit --filter=fua
                  nbd fuamode=force`` (the same proxy for all four)
  tester_s        the nbd-tester-client ``flush`` pattern, from libnbd's Python
                  binding: 1 KiB writes over the whole export in order, every
                  4th with FUA, a FLUSH after every 16 (seconds; lower is better)
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import textwrap
import time

import pytest

import pymirror

MiB = 1 << 20
NAMES = ("pymirror", "pymirror-full", "nbdkit", "qemu-nbd")
SYSTEM_PYTHON = "/usr/bin/python3"      # Debian's, with python3-libnbd

TESTER = textwrap.dedent('''
    import sys, time, nbd
    uri, size = sys.argv[1], int(sys.argv[2])
    h = nbd.NBD()
    h.connect_uri(uri)
    buf = bytes(range(256)) * 4
    t0 = time.perf_counter()
    for i, off in enumerate(range(0, size, 1024)):
        h.pwrite(buf, off, nbd.CMD_FLAG_FUA if i % 4 == 3 else 0)
        if i % 16 == 15:
            h.flush()
    h.flush()
    print(time.perf_counter() - t0)
    h.shutdown()
''')


def need(tool):
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} is missing: apt-get install qemu-utils nbdkit libnbd-bin fio python3-libnbd")
    return tool


def wait_for(path, proc, what):
    t0 = time.monotonic()
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() - t0 > 30:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.05)


class Servers:
    def __init__(self, d, size):
        self.d, self.size = d, size
        self.procs = {}
        self.sock = {n: str(d / f"{n}.sock") for n in NAMES}
        self.fua_sock = {n: str(d / f"{n}.fua.sock") for n in NAMES}

    def start(self):
        d = self.d
        for name in ("pymirror", "pymirror-full"):
            env = dict(os.environ)
            env.pop("PYMIRROR_FLUSH_FULL_COMMIT", None)
            if name == "pymirror-full":
                env["PYMIRROR_FLUSH_FULL_COMMIT"] = "1"
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "pymirror", "serve", str(d / f"{name}.meta"), "--socket", self.sock[name]],
                cwd=str(d), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs["nbdkit"] = subprocess.Popen(
            [need("nbdkit"), "-f", "-U", self.sock["nbdkit"], "file", f"file={d / 'nbdkit.img'}"])
        self.procs["qemu-nbd"] = subprocess.Popen(
            [need("qemu-nbd"), "-k", self.sock["qemu-nbd"], "-f", "raw", "-t", "-e", "16", str(d / "qemu.img")])
        for n in NAMES:
            wait_for(self.sock[n], self.procs[n], n)
            self.procs[n + "/fua"] = subprocess.Popen(
                [need("nbdkit"), "-f", "-U", self.fua_sock[n], "--filter=fua", "nbd",
                 f"socket={self.sock[n]}", "fuamode=force"])
            wait_for(self.fua_sock[n], self.procs[n + "/fua"], n + " FUA proxy")

    def uri(self, name, fua=False):
        return f"nbd+unix:///?socket={(self.fua_sock if fua else self.sock)[name]}"

    def stop(self):
        for p in reversed(list(self.procs.values())):
            p.terminate()
            p.wait(timeout=60)


@pytest.fixture
def servers(tmp_path, benchmark):
    size = (1 if benchmark.disabled else int(os.environ.get("PM_BENCH_MIB", "4"))) * MiB
    for name in ("nbdkit.img", "qemu.img"):
        pymirror.Volume.create(tmp_path / name, size).close()
    for name in ("pymirror", "pymirror-full"):
        std, mir = tmp_path / f"{name}.std.img", tmp_path / f"{name}.mir.img"
        pymirror.Volume.create(std, size).close()
        pymirror.Volume.create(mir, size).close()
        with pymirror.Pair.create(tmp_path / f"{name}.meta", std, mir) as p:
            p.establish(assume_equal=True)          # two zeroed images: established, mirrored
    s = Servers(tmp_path, size)
    s.start()
    yield s
    s.stop()


def fio_write_iops(uri, runtime, fsync):
    cmd = [need("fio"), "--name=w", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k",
           "--iodepth=1", f"--runtime={runtime}", "--time_based", "--output-format=json"]
    if fsync:
        cmd.append("--fsync=1")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600).stdout
    return json.loads(out[out.index("{"):])["jobs"][0]["write"]["iops"]


def run_tester(d, uri, size):
    script = d / "tester.py"
    script.write_text(TESTER)
    if not os.path.exists(SYSTEM_PYTHON) or subprocess.run(
            [SYSTEM_PYTHON, "-c", "import nbd"], capture_output=True).returncode != 0:
        pytest.fail("python3-libnbd is missing: apt-get install python3-libnbd")
    out = subprocess.run([SYSTEM_PYTHON, str(script), uri, str(size)], check=True, capture_output=True,
                         text=True, timeout=1200).stdout
    return float(out.strip())


def test_fua_light_against_peers(benchmark, servers, tools):
    reps = 1 if benchmark.disabled else int(os.environ.get("PM_BENCH_REPS", "3"))
    runtime = 1 if benchmark.disabled else int(os.environ.get("PM_BENCH_SECONDS", "5"))
    res = {n: {"fsync_iops": [], "fua_iops": [], "tester_s": []} for n in NAMES}
    load = [os.getloadavg()[0]]
    for _ in range(reps):
        for n in NAMES:                                    # interleaved
            res[n]["fsync_iops"].append(fio_write_iops(servers.uri(n), runtime, fsync=True))
            res[n]["fua_iops"].append(fio_write_iops(servers.uri(n, fua=True), runtime, fsync=False))
            res[n]["tester_s"].append(run_tester(servers.d, servers.uri(n), servers.size))
        load.append(os.getloadavg()[0])
    benchmark.pedantic(lambda: run_tester(servers.d, servers.uri("pymirror"), min(servers.size, MiB)),
                       rounds=1, iterations=1)
    med = {n: {k: round(statistics.median(v), 3 if k == "tester_s" else None) for k, v in r.items()}
           for n, r in res.items()}
    ratios = {
        "fsync_iops_after_vs_before": round(med["pymirror"]["fsync_iops"] / med["pymirror-full"]["fsync_iops"], 2),
        "fua_iops_after_vs_before": round(med["pymirror"]["fua_iops"] / med["pymirror-full"]["fua_iops"], 2),
        "tester_before_vs_after": round(med["pymirror-full"]["tester_s"] / med["pymirror"]["tester_s"], 2),
    }
    for peer in ("nbdkit", "qemu-nbd"):
        for n in ("pymirror", "pymirror-full"):
            ratios[f"tester_{n}_vs_{peer}"] = round(med[n]["tester_s"] / med[peer]["tester_s"], 2)
            ratios[f"fsync_iops_{n}_vs_{peer}"] = round(med[n]["fsync_iops"] / med[peer]["fsync_iops"], 2)
            ratios[f"fua_iops_{n}_vs_{peer}"] = round(med[n]["fua_iops"] / med[peer]["fua_iops"], 2)
    tools.record("fua_light", {
        "size_mib": servers.size // MiB, "reps": reps, "fio_seconds": runtime, "medians": med, "ratios": ratios,
        "all": res, "load_average_1min": [round(x, 1) for x in load],
        "units": "IOPS for *_iops, seconds for tester_s"})
    assert all(v > 0 for r in med.values() for v in r.values())
