"""Why a cold 4 KiB random-read figure moves: pymirror serve against nbdkit
file on cold data, with what the device and the servers did in each rep.

    python benchmarks/nbd_cold_diag.py DIR [--reps 6] [--seconds 4] [--qd 32]
                                           [--throttle IOPS] [--threads N] [--tls]

Each rep drops the served files from the page cache, waits 3 s (as
bench_nbd.py does), then runs fio's nbd engine (4 KiB random reads) against
each server in turn, the order rotated.  Per rep it prints:

  iops     the client's figure
  devr     reads the disk completed per request (/sys/block/DEV/stat; the
           disk is shared, so other tenants' reads count too)
  kib      KiB per disk read
  dev_ms   the disk's time per read (its queue included)
  inflight reads in flight at the disk, sampled every 0.1 s
  threads  the server's threads, most seen
  cs, sc   context switches and system calls of the server per request
           (``perf stat``; omitted without perf)

The last lines give the ratio of the medians and, since the disk's speed
drifts over minutes (this VM's: 2-3x between reps, for every server), the
median of the per-rep ratios (each rep runs the two servers back to back)
with a 95% bootstrap interval: the figure to trust on a drifting disk.

--tls runs both servers with x509 TLS (bench_nbd.make_certs; fio as nobody
as in bench_nbd.py).  --throttle caps the disk's read IOPS for both servers (a blkio cgroup: the
cgroup-v1 ``blkio.throttle.read_iops_device``, or cgroup v2 ``io.max``):
a deliberately slow device.  --threads sets pymirror's threads per
connection (NBDServer.c_threads; 16, nbdkit's number, by default).
--throttle needs root (a cgroup), and perf may.  DIR gets 3 GiB of files:
remove it afterwards.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_nbd as b  # noqa: E402
from conftest import drop_file  # noqa: E402

SIZE = 1 << 30
SERVE = """
import sys, signal, threading, pymirror
from pymirror.nbd import NBDServer
pair = pymirror.Pair.open(sys.argv[1])
tls = dict(tls="require", tls_certs=sys.argv[4]) if len(sys.argv) > 4 else {}
server = NBDServer(pair, socket_path=sys.argv[2], **tls)
server.c_threads = int(sys.argv[3])
server.start()
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *a: stop.set())
stop.wait()
server.shutdown()
pair.close()
"""


def disk_of(path: Path) -> str:
    dev = os.stat(path).st_dev
    link = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    if not link.exists():
        sys.exit(f"nbd_cold_diag: {path} is not on a disk's file system (tmpfs, overlay?): choose another DIR")
    name = link.resolve()
    return name.parent.name if (name / "partition").exists() else name.name


def disk_stat(disk: str):
    v = list(map(int, open(f"/sys/block/{disk}/stat").read().split()))
    return v[0], v[2], v[3]                   # reads completed, sectors read, ms spent reading


def throttle(pids, iops, disk):
    major_minor = open(f"/sys/block/{disk}/dev").read().strip()
    v1 = Path("/sys/fs/cgroup/blkio")
    if v1.is_dir():
        cg = v1 / "pm-cold-diag"
        cg.mkdir(exist_ok=True)
        (cg / "blkio.throttle.read_iops_device").write_text(f"{major_minor} {iops}\n")
    else:
        cg = Path("/sys/fs/cgroup/pm-cold-diag")
        cg.mkdir(exist_ok=True)
        (cg / "io.max").write_text(f"{major_minor} riops={iops}\n")
    for pid in pids:
        (cg / "cgroup.procs").write_text(str(pid))


def throttle_or_exit(pids, iops, disk):
    try:
        throttle(pids, iops, disk)
    except OSError as e:
        sys.exit(f"nbd_cold_diag: --throttle needs a blkio cgroup it may write (root): {e.strerror}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--qd", type=int, default=32)
    ap.add_argument("--throttle", type=int, default=0, metavar="IOPS")
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--tls", action="store_true")
    a = ap.parse_args()
    d = a.dir
    d.mkdir(parents=True, exist_ok=True)
    disk = disk_of(d)
    files = {"pymirror": [d / "std.img", d / "mir.img"], "nbdkit": [d / "kit.img"]}
    if not (d / "kit.img").exists():
        b.make_files(d, SIZE, ["std.img", "mir.img", "kit.img"])
    meta = d / "pair.meta"
    meta.unlink(missing_ok=True)
    b.make_pair(meta, d / "std.img", d / "mir.img")
    sockdir, prefix, tls_pm, tls_kit, scheme = d, [], [], [], "nbd"
    if a.tls:
        certs = d / "certs"
        if not certs.exists():
            for f in ("certs", "client"):
                shutil.rmtree(d / f, ignore_errors=True)
            b.make_certs(d)
        sockdir, prefix = b.fio_tls_dir(d / "client")
        tls_pm, tls_kit, scheme = [str(certs)], ["--tls=require", f"--tls-certificates={certs}"], "nbds"
    socks = {n: sockdir / f"{n}.sock" for n in files}
    for s in socks.values():
        s.unlink(missing_ok=True)
    procs = {"pymirror": subprocess.Popen([sys.executable, "-c", SERVE, str(meta), str(socks["pymirror"]),
                                           str(a.threads)] + tls_pm, cwd=str(d)),
             "nbdkit": subprocess.Popen([b.need("nbdkit"), "-f", "-U", str(socks["nbdkit"])] + tls_kit
                                        + ["file", f"file={d / 'kit.img'}"], stderr=subprocess.DEVNULL)}
    perf = shutil.which("perf")
    rows = {n: [] for n in procs}
    try:
        for s in socks.values():
            while not s.exists():
                time.sleep(0.05)
            os.chmod(s, 0o777)
        if a.throttle:
            throttle_or_exit([p.pid for p in procs.values()], a.throttle, disk)
        order = list(procs)
        for rep in range(a.reps):
            for n in order[rep % 2:] + order[:rep % 2]:
                for f in files[n]:
                    drop_file(f)
                time.sleep(b.SETTLE_S)
                pid = procs[n].pid
                pst = None
                (d / "perf.txt").unlink(missing_ok=True)
                if perf:
                    pst = subprocess.Popen([perf, "stat", "-x,", "-e", "context-switches,raw_syscalls:sys_enter",
                                            "-p", str(pid), "-o", str(d / "perf.txt")],
                                           stderr=subprocess.DEVNULL)
                    time.sleep(0.3)
                samples, stop = [], threading.Event()

                def sample():
                    while not stop.wait(0.1):
                        inflight = int(open(f"/sys/block/{disk}/inflight").read().split()[0])
                        samples.append((inflight, len(os.listdir(f"/proc/{pid}/task"))))
                t = threading.Thread(target=sample)
                t.start()
                d0 = disk_stat(disk)
                iops, ios = b.fio_iops(f"{scheme}+unix:///?socket={socks[n]}", a.qd, a.seconds, prefix)
                d1 = disk_stat(disk)
                stop.set()
                t.join()
                reads = max(1, d1[0] - d0[0])
                r = {"iops": round(iops), "devr": round((d1[0] - d0[0]) / ios, 3),
                     "kib": round((d1[1] - d0[1]) / 2 / reads, 1), "dev_ms": round((d1[2] - d0[2]) / reads, 3),
                     "inflight": round(statistics.mean(i for i, _ in samples), 1) if samples else 0,
                     "threads": max((k for _, k in samples), default=0)}
                if pst is not None:
                    pst.send_signal(2)
                    pst.wait()
                    lines = (d / "perf.txt").read_text().splitlines() if (d / "perf.txt").exists() else []
                    for line in lines:               # none if perf may not watch the server
                        f = line.strip().split(",")
                        if len(f) > 3 and f[0].isdigit():
                            r["cs" if f[2] == "context-switches" else "sc"] = round(int(f[0]) / ios, 2)
                rows[n].append(r)
                print(rep, n, r, flush=True)
        for n, rs in rows.items():
            print("median", n, {k: statistics.median(x[k] for x in rs) for k in rs[0] if all(k in x for x in rs)})
        print("pymirror / nbdkit, ratio of the medians:",
              round(statistics.median(x["iops"] for x in rows["pymirror"])
                    / statistics.median(x["iops"] for x in rows["nbdkit"]), 2))
        ratios = [p["iops"] / k["iops"] for p, k in zip(rows["pymirror"], rows["nbdkit"])]
        rng = random.Random(0)
        boot = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(2000))
        print("pymirror / nbdkit, median of the per-rep ratios:", round(statistics.median(ratios), 2),
              f"(95% interval {boot[50]:.2f}-{boot[1949]:.2f}; every rep: {[round(r, 2) for r in ratios]})")
    finally:
        for p in procs.values():
            p.terminate()
            p.wait(60)
        if sockdir != d:
            shutil.rmtree(sockdir, ignore_errors=True)


if __name__ == "__main__":
    main()
