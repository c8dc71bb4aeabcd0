"""The service's costs, measured against a baseline of the same run.

Run:  pytest benchmarks/bench_service.py --benchmark-only -s
      (PM_BENCH_SPLITS=20 group splits, PM_BENCH_SECONDS=5 of baseline writes)

1. Host I/O held by a group split of 100 pairs (issue 10, item 7): NBD
   clients keep writing 4 KiB blocks to the group's pairs through the
   daemon's NBD socket (one thread per CPU, each over 10 of the pairs, one
   request at a time); the latency of every write is kept. First a stretch
   with no split (the baseline), then cycles of `split G` / `establish G
   --incremental` through the control socket. Reported: p50, p99 and max of
   the baseline writes, of the writes that overlapped a split request (sent
   before the split's reply came back and finished after it was sent), and
   the barrier's own hold time (`held_seconds` in the split's reply).
2. The cost of a CLI command through the daemon: `pymirror query NAME --json`
   routed to the daemon against `pymirror query META --json` on a pair no
   daemon holds (a second daemon-less copy of the same pair), each a fresh
   process, interleaved; and the same two in-process (a client round trip
   against Pair.open + query + close).
"""
from __future__ import annotations

import importlib.util
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pymirror
from pymirror.report import query_dict
from pymirror.volume import Volume

KiB, MiB = 1 << 10, 1 << 20
BLOCK = 4 * KiB

_spec = importlib.util.spec_from_file_location(
    "nbd_util", Path(__file__).resolve().parents[1] / "tests" / "nbd_util.py")
nbd_util = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("nbd_util", nbd_util)
_spec.loader.exec_module(nbd_util)
P = nbd_util.P


def make_pair(d: Path, name: str, size: int) -> Path:
    std, bcv, meta = d / f"{name}.std", d / f"{name}.bcv", d / f"{name}.meta"
    for path in (std, bcv):
        Volume.create(str(path), size, 64 * KiB).close()
    pymirror.Pair.create(str(meta), str(std), str(bcv)).close()
    return meta


class Daemon:
    def __init__(self, d: Path, metas: list[Path]) -> None:
        self.control = str(d / "control.sock")
        self.nbd = str(d / "nbd.sock")
        self.log = open(d / "daemon.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pymirror.service", "--control", self.control, "--state-dir", str(d / "state"),
             "--socket", self.nbd, *map(str, metas)], stdout=self.log, stderr=subprocess.STDOUT, cwd="/")
        deadline = time.monotonic() + 120
        while True:
            try:
                pymirror.connect(self.control).close()
                return
            except pymirror.MirrorError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError((d / "daemon.log").read_text())
                time.sleep(0.1)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(120) == 0
        self.log.close()


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def summary(xs: list[float]) -> dict[str, float]:
    return {"n": len(xs), "p50_ms": round(pct(xs, 0.5) * 1e3, 3), "p99_ms": round(pct(xs, 0.99) * 1e3, 3),
            "max_ms": round(max(xs) * 1e3, 3) if xs else float("nan")}


class Writers:
    """Threads writing 4 KiB blocks to the group's pairs, one request at a
    time each; every write kept as (start, end)."""

    def __init__(self, nbd: str, names: list[str], threads: int) -> None:
        self.samples: list[list[tuple[float, float]]] = [[] for _ in range(threads)]
        self.stop = threading.Event()
        self.conns = [[nbd_util.connect(nbd, names[(t * 10 + j) % len(names)])[0] for j in range(10)]
                      for t in range(threads)]
        self.threads = [threading.Thread(target=self._run, args=(t,)) for t in range(threads)]
        for th in self.threads:
            th.start()

    def _run(self, t: int) -> None:
        conns, out = self.conns[t], self.samples[t]
        data = bytes([t + 1]) * BLOCK
        i = 0
        while not self.stop.is_set():
            c = conns[i % len(conns)]
            off = (i // len(conns)) % 16 * BLOCK
            t0 = time.perf_counter()
            c.request(P.CMD_WRITE, off, BLOCK, data, cookie=i)
            err, _, _ = c.reply()
            t1 = time.perf_counter()
            assert err == 0, err
            out.append((t0, t1))
            i += 1

    def finish(self) -> list[tuple[float, float]]:
        self.stop.set()
        for th in self.threads:
            th.join(60)
        for row in self.conns:
            for c in row:
                c.close()
        return [s for row in self.samples for s in row]


def test_group_split_hold_and_cli_cost(benchmark, tmp_path, tools):
    quick = benchmark.disabled
    n_pairs = 100
    splits = 3 if quick else int(os.environ.get("PM_BENCH_SPLITS", "20"))
    base_seconds = 1.0 if quick else float(os.environ.get("PM_BENCH_SECONDS", "5"))
    names = [f"p{i:03d}" for i in range(n_pairs)]
    metas = [make_pair(tmp_path, n, 256 * KiB) for n in names]
    lonely = make_pair(tmp_path, "lonely", 256 * KiB)        # held by no daemon: the CLI acts locally
    daemon = Daemon(tmp_path, metas)
    try:
        client = pymirror.connect(daemon.control)
        client.group_create("G", names)
        client.execute("establish", name="G", assume_equal=None, wait=True)
        # -- 1. write latency without and with group splits ---------------------
        writers = Writers(daemon.nbd, names, threads=max(1, min(4, os.cpu_count() or 1)))
        time.sleep(0.3)
        t_base0 = time.perf_counter()
        time.sleep(base_seconds)
        t_base1 = time.perf_counter()
        windows, holds, rtts = [], [], []
        for _ in range(splits):
            t0 = time.perf_counter()
            r = client.execute("split", name="G")
            t1 = time.perf_counter()
            windows.append((t0, t1))
            rtts.append(t1 - t0)
            holds.append(r["held_seconds"])
            time.sleep(0.2)
            client.execute("establish", name="G", incremental=True, wait=True)
            time.sleep(0.2)
        samples = writers.finish()
        base = [e - s for s, e in samples if t_base0 <= s and e <= t_base1]
        during = [e - s for s, e in samples if any(s < w1 and e > w0 for w0, w1 in windows)]
        # -- 2. a CLI command through the daemon vs. local ------------------------
        exe = [sys.executable, "-m", "pymirror", "--control", daemon.control]
        reps = 3 if quick else 15
        via, local = [], []
        for _ in range(reps):
            # cwd="/": `python -m` puts the working directory first on sys.path,
            # and the benchmark measures the installed package, not the source tree
            via.append(tools.timed(lambda: subprocess.run(exe + ["query", "p000", "--json"], check=True,
                                                          capture_output=True, cwd="/")))
            local.append(tools.timed(lambda: subprocess.run(exe + ["query", str(lonely), "--json"], check=True,
                                                            capture_output=True, cwd="/")))
        rt_via, rt_local = [], []
        for _ in range(reps * 10):
            rt_via.append(tools.timed(lambda: client.execute("query", name="p000")))

            def local_query():
                with pymirror.Pair.open(lonely) as p:
                    query_dict(p)
            rt_local.append(tools.timed(local_query))
        benchmark.pedantic(lambda: client.execute("query", name="p000"), rounds=1, iterations=1)
        client.close()
    finally:
        daemon.stop()
    tools.record("service_group_split_and_cli", {
        "pairs": n_pairs, "splits": splits, "writer_threads": len(writers.threads),
        "write_latency_no_split": summary(base),
        "write_latency_overlapping_a_split": summary(during),
        "p99_ratio_split_vs_none": round(pct(during, 0.99) / pct(base, 0.99), 2),
        "barrier_hold_ms": {"median": round(statistics.median(holds) * 1e3, 3), "max": round(max(holds) * 1e3, 3)},
        "split_request_ms": {"median": round(statistics.median(rtts) * 1e3, 3), "max": round(max(rtts) * 1e3, 3)},
        "cli_query_ms": {"through_daemon": round(statistics.median(via) * 1e3, 1),
                         "local": round(statistics.median(local) * 1e3, 1)},
        "in_process_query_ms": {"client_round_trip": round(statistics.median(rt_via) * 1e3, 3),
                                "open_query_close": round(statistics.median(rt_local) * 1e3, 3)},
    })
