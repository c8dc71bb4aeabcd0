"""io_uring or a thread pool for the store I/O of the C request loop
(issue 15: "a small thread pool or io_uring -- measure which is better
here").  The C loop (csrc/nbd_loop.c) carries requests out on up to 16
threads per connection, each doing synchronous pread/pwrite on the store.

Run:  flock /work/bench.lock pytest benchmarks/bench_uring.py --benchmark-only -s
      (PM_BENCH_MIB=2048 file size, PM_BENCH_REPS=3, PM_BENCH_SECONDS=5 per fio run)

1. ``test_io_uring_works_here``: a tiny C probe calls io_uring_setup(2)
   through syscall(2) (no liburing needed) and reads one block through the
   ring: does io_uring work in this kernel and container at all?  (Where it
   does not, it records why and the other two skip.)
2. ``test_io_uring_vs_threads_on_a_file``: fio on one file, buffered like the
   store (``--direct=0 --fadvise_hint=0``), reps interleaved:
   ``--invalidate=0`` (fio would otherwise drop the file from the page cache
   before every job, making "hot" cold), reps interleaved:
   ``psync`` with 16 threads (the pool: 16 requests at once), ``io_uring``
   at ``iodepth=32`` (one thread), and both at queue depth 1; 4 KiB random
   reads hot (file in the page cache) and cold (dropped from it first,
   ``posix_fadvise(DONTNEED)`` on the file only), the cold ones also with
   O_DIRECT, and 256 KiB sequential writes made durable (``end_fsync``;
   MB/s by the wall clock, fsync included).  CPU per I/O: fio's whole
   process (every thread, io_uring's kernel workers included) from
   ``wait4``'s rusage, divided by the I/Os.
3. ``test_io_uring_vs_threads_in_an_nbd_server``: qemu-nbd is built both
   ways (``--aio=threads``, its pool, or ``--aio=io_uring``): the same server
   over NBD, fio's nbd engine, 4 KiB random reads hot and cold at qd 1 and
   qd 32, with pymirror's C loop in the same run; server CPU per request.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

import pymirror

MiB = 1 << 20

PROBE = r"""
#include <errno.h>
#include <fcntl.h>
#include <linux/io_uring.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(int argc, char **argv)
{
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    int ring = (int)syscall(__NR_io_uring_setup, 4, &p);
    if (ring < 0) { printf("setup: %s\n", strerror(errno)); return 1; }
    size_t sqsz = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    size_t cqsz = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    if (p.features & IORING_FEAT_SINGLE_MMAP) { if (cqsz > sqsz) sqsz = cqsz; cqsz = sqsz; }
    char *sq = mmap(0, sqsz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, ring, IORING_OFF_SQ_RING);
    char *cq = (p.features & IORING_FEAT_SINGLE_MMAP) ? sq
             : mmap(0, cqsz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, ring, IORING_OFF_CQ_RING);
    struct io_uring_sqe *sqes = mmap(0, p.sq_entries * sizeof *sqes, PROT_READ | PROT_WRITE,
                                     MAP_SHARED | MAP_POPULATE, ring, IORING_OFF_SQES);
    if (sq == MAP_FAILED || cq == MAP_FAILED || sqes == MAP_FAILED) { printf("mmap: %s\n", strerror(errno)); return 1; }
    int fd = open(argv[1], O_RDONLY);
    static char buf[4096];
    unsigned *tail = (unsigned *)(sq + p.sq_off.tail), *array = (unsigned *)(sq + p.sq_off.array);
    unsigned t = *tail, idx = t & *(unsigned *)(sq + p.sq_off.ring_mask);
    memset(&sqes[idx], 0, sizeof sqes[idx]);
    sqes[idx].opcode = IORING_OP_READ;
    sqes[idx].fd = fd;
    sqes[idx].addr = (unsigned long)buf;
    sqes[idx].len = sizeof buf;
    array[idx] = idx;
    __atomic_store_n(tail, t + 1, __ATOMIC_RELEASE);
    int n = (int)syscall(__NR_io_uring_enter, ring, 1, 1, IORING_ENTER_GETEVENTS, NULL, 0);
    if (n < 0) { printf("enter: %s\n", strerror(errno)); return 1; }
    unsigned head = *(unsigned *)(cq + p.cq_off.head);
    struct io_uring_cqe *cqe = (struct io_uring_cqe *)(cq + p.cq_off.cqes) + (head & *(unsigned *)(cq + p.cq_off.ring_mask));
    printf("ok: features %#x, read %d bytes\n", p.features, cqe->res);
    return cqe->res == (int)sizeof buf ? 0 : 1;
}
"""


def need(tool):
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} is missing: apt-get install gcc fio qemu-utils")
    return tool


def reps():
    return int(os.environ.get("PM_BENCH_REPS", "3"))


def seconds(benchmark):
    return 1 if benchmark.disabled else int(os.environ.get("PM_BENCH_SECONDS", "5"))


def file_size(benchmark):
    return (64 if benchmark.disabled else int(os.environ.get("PM_BENCH_MIB", "2048"))) * MiB


def make_file(path, size):
    with open(path, "wb") as fh:
        block = os.urandom(8 * MiB)
        for _ in range(size // len(block)):
            fh.write(block)
        os.fsync(fh.fileno())


def hot(path):
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)


def run_measured(cmd):
    """Run cmd; (stdout, wall seconds)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=900)
    wall = time.perf_counter() - t0
    # communicate() reaped it: its rusage is in RUSAGE_CHILDREN; read it per run
    assert p.returncode == 0, err
    return out, wall


def children_cpu():
    import resource
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


_probe: dict = {}


def probe(tmp_path):
    """(works, what the probe printed), once per session."""
    if not _probe:
        src = tmp_path / "probe.c"
        src.write_text(PROBE)
        exe = tmp_path / "probe"
        subprocess.run([need("gcc"), "-O2", str(src), "-o", str(exe)], check=True)
        data = tmp_path / "data"
        data.write_bytes(os.urandom(4096))
        out = subprocess.run([str(exe), str(data)], capture_output=True, text=True)
        _probe.update(works=out.returncode == 0, probe=(out.stdout + out.stderr).strip())
    return _probe


def need_uring(tmp_path):
    got = probe(tmp_path)
    if not got["works"]:
        pytest.skip(f"io_uring does not work here: {got['probe']}")


def test_io_uring_works_here(tmp_path, tools):
    got = probe(tmp_path)
    disabled = Path("/proc/sys/kernel/io_uring_disabled")
    tools.record("uring_probe", dict(got, kernel=os.uname().release,
                                     io_uring_disabled=disabled.read_text().strip() if disabled.exists() else None))


# fio's engines: the pool (psync, one request per thread) and io_uring
ENGINES = {
    "psync_16_threads": ["--ioengine=psync", "--numjobs=16", "--thread"],
    "io_uring_qd32": ["--ioengine=io_uring", "--iodepth=32"],
    "psync_qd1": ["--ioengine=psync"],
    "io_uring_qd1": ["--ioengine=io_uring", "--iodepth=1"],
}


_overhead: dict = {}


def fio_overhead(path, engine, mode):
    """The CPU seconds fio spends on the same job with one I/O (start-up,
    threads, layout checks): taken off each run, so that what is left is
    the CPU of the I/O.  Measured once per engine and mode, median of 3."""
    key = (engine, mode)
    if key not in _overhead:
        cmd = [need("fio"), "--name=j", f"--filename={path}", "--output-format=json", "--fadvise_hint=0",
               "--group_reporting", "--bs=4k", "--io_size=4k", "--rw=" + ("write" if mode == "write" else "randread"),
               f"--direct={1 if mode == 'cold_direct' else 0}"] + ENGINES[engine]
        costs = []
        for _ in range(3):
            cpu0 = children_cpu()
            run_measured(cmd)
            costs.append(children_cpu() - cpu0)
        _overhead[key] = statistics.median(costs)
    return _overhead[key]


def fio_file(path, engine, mode, size, runtime):
    common = [need("fio"), "--name=j", f"--filename={path}", "--output-format=json", "--fadvise_hint=0",
              "--invalidate=0",                 # fio drops the file from the page cache by default
              "--group_reporting"] + ENGINES[engine]
    if mode == "write":
        size = min(size, 1 << 30)              # 1 GiB written per run
        jobs = 16 if "16" in engine else 1
        part = size // jobs
        common += ["--rw=write", "--bs=256k", "--direct=0", "--end_fsync=1", f"--size={part}",
                   f"--offset_increment={part}"]
    else:
        common += ["--rw=randread", "--bs=4k", f"--direct={1 if mode == 'cold_direct' else 0}",
                   f"--size={size}", f"--runtime={runtime}", "--time_based"]
    cpu0 = children_cpu()
    out, wall = run_measured(common)
    cpu = children_cpu() - cpu0 - fio_overhead(path, engine, mode)
    job = json.loads(out[out.index("{"):])["jobs"][0]
    io = job["write" if mode == "write" else "read"]
    ios = io["total_ios"]
    res = {"cpu_us_per_io": round(cpu / max(1, ios) * 1e6, 2)}
    if mode == "write":
        res["mb_s"] = round(size / wall / 1e6, 1)       # fsync included
    else:
        res["iops"] = round(io["iops"])
    return res


def test_io_uring_vs_threads_on_a_file(benchmark, tmp_path, tools):
    need_uring(tmp_path)
    size = file_size(benchmark)
    runtime = seconds(benchmark)
    path = tmp_path / "data.img"
    make_file(path, size)
    modes = ("hot", "cold", "cold_direct", "write")
    runs = {m: {e: [] for e in ENGINES} for m in modes}
    load = [os.getloadavg()[0]]
    for rep in range(reps()):
        for mode in modes:
            order = list(ENGINES)
            order = order[rep % len(order):] + order[:rep % len(order)]       # interleaved, rotated
            for engine in order:
                if mode == "write" and engine.endswith("qd1") and engine.startswith("io_uring"):
                    continue
                (hot if mode == "hot" else tools.drop_file)(path)
                runs[mode][engine].append(fio_file(path, engine, mode, size, runtime))
        load.append(os.getloadavg()[0])
    result = {"size_mib": size // MiB, "seconds": runtime, "reps": reps(), "load_avg": load, "runs": runs,
              "fio_overhead_cpu_s": {" ".join(k): round(v, 3) for k, v in _overhead.items()}, "median": {}}
    for mode, engines in runs.items():
        for engine, rs in engines.items():
            if rs:
                result["median"][f"{mode} {engine}"] = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)     # the figures are fio's, recorded above
    tools.record("uring_vs_threads_file", result)


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fio_nbd(sock, qd, runtime):
    out = subprocess.run([need("fio"), "--name=r", "--ioengine=nbd", f"--uri=nbd+unix:///?socket={sock}",
                          "--rw=randread", "--bs=4k", f"--iodepth={qd}", f"--runtime={runtime}", "--time_based",
                          "--output-format=json"], check=True, capture_output=True, text=True, timeout=600).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]["read"]
    return job["iops"], job["total_ios"]


def test_io_uring_vs_threads_in_an_nbd_server(benchmark, tmp_path, tools):
    need_uring(tmp_path)
    size = file_size(benchmark) // 2
    runtime = seconds(benchmark)
    d = tmp_path
    files = {"qemu-nbd threads": d / "q1.img", "qemu-nbd io_uring": d / "q2.img", "pymirror": d / "std.img"}
    for f in files.values():
        make_file(f, size)
    shutil.copyfile(files["pymirror"], d / "mir.img")
    with pymirror.Pair.create(str(d / "pair.meta"), str(d / "std.img"), str(d / "mir.img")) as p:
        p.establish(assume_equal=True)
        p.split()
    sock = {n: str(d / f"{i}.sock") for i, n in enumerate(files)}
    procs = {
        "qemu-nbd threads": [need("qemu-nbd"), "-k", sock["qemu-nbd threads"], "-f", "raw", "-t", "-e", "16",
                             "--aio=threads", str(files["qemu-nbd threads"])],
        "qemu-nbd io_uring": [need("qemu-nbd"), "-k", sock["qemu-nbd io_uring"], "-f", "raw", "-t", "-e", "16",
                              "--aio=io_uring", str(files["qemu-nbd io_uring"])],
        "pymirror": [sys.executable, "-m", "pymirror", "serve", str(d / "pair.meta"), "--socket", sock["pymirror"]],
    }
    running = {n: subprocess.Popen(cmd, cwd=str(d), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for n, cmd in procs.items()}
    try:
        t0 = time.monotonic()
        for s in sock.values():
            while not os.path.exists(s):
                assert time.monotonic() - t0 < 30, s
                time.sleep(0.05)
        figures = ("hot_qd1", "hot_qd32", "cold_qd1", "cold_qd32")
        runs = {f: {n: [] for n in procs} for f in figures}
        cpu = {n: [] for n in procs}
        load = [os.getloadavg()[0]]
        for rep in range(reps()):
            names = list(procs)
            names = names[rep % len(names):] + names[:rep % len(names)]
            for fig in figures:
                qd = 32 if fig.endswith("32") else 1
                for n in names:
                    (hot if fig.startswith("hot") else tools.drop_file)(files[n])
                    if n == "pymirror":
                        tools.drop_file(d / "mir.img")
                    c0 = cpu_seconds(running[n].pid)
                    iops, ios = fio_nbd(sock[n], qd, runtime)
                    if fig == "hot_qd32":
                        cpu[n].append((cpu_seconds(running[n].pid) - c0) / ios * 1e6)
                    runs[fig][n].append(round(iops))
            load.append(os.getloadavg()[0])
    finally:
        for p in running.values():
            p.terminate()
        for p in running.values():
            p.wait(60)
    med = {f: {n: statistics.median(v) for n, v in rs.items()} for f, rs in runs.items()}
    med["cpu_us_hot_qd32"] = {n: round(statistics.median(v), 2) for n, v in cpu.items()}
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    tools.record("uring_vs_threads_nbd", {"size_mib": size // MiB, "seconds": runtime, "reps": reps(),
                                          "load_avg": load, "runs": runs, "median": med})
