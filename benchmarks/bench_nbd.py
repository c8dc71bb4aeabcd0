"""The NBD export against qemu-nbd and nbdkit serving the same bytes, in the
same run, reps interleaved, each rep in a rotated order (pymirror, qemu-nbd,
nbdkit; then qemu-nbd, nbdkit, pymirror; ...), so no contender always runs
first or right after the same other one.

Run:  pytest benchmarks/bench_nbd.py --benchmark-only -s
      (PM_BENCH_MIB=1024 volume size, PM_BENCH_REPS=3 reps, PM_BENCH_SECONDS=4 per fio run)
Figures (medians over reps), all over unix sockets, client and server on the
same machine:
  read       sequential read, ``nbdcopy URI null:`` (4 connections), MB/s,
             the median of READ_RUNS (3) copies in each rep: one copy of
             1 GiB takes 0.2-1.4 s, too short for one sample a rep
  read_ceiling  the same from ``nbdkit --filter=noextents null``, a server
             that reads no disk and copies nothing (with TLS, with TLS on):
             what the client, the socket and (with TLS) the encryption
             allow on this machine, measured in every rep
  write      sequential write, ``nbdcopy --flush file URI``, MB/s (rep 0,
             ``write_first``, is the first write after a split for pymirror)
  qd1, qd32  4 KiB random reads, fio's nbd engine, page cache hot, IOPS
  cold_qd1, cold_qd32   the same with the served files dropped from the page
             cache first (``posix_fadvise(DONTNEED)`` on those files only),
             then PM_BENCH_SETTLE seconds (3) of waiting, as bench_copy.py
             does: this VM hands freed memory back to its host about 2 s
             after it is freed, and that work otherwise lands on whichever
             cold run comes next.  A rep's cold runs come after all its hot
             ones, server after server, seconds apart: this VM's disk is
             shared, and its speed drifts 2-3x over minutes for every server
             alike (benchmarks/nbd_cold_diag.py shows it), so a cold figure
             is also given as the median of its per-rep ratios
             (``cold_qd32_vs_nbdkit_per_rep``)
  cpu_us_qd32  server CPU time per request in the hot qd32 run (µs)
With TLS (``test_nbd_tls_against_peers``) the same figures: fio's nbd engine
cannot be given a certificate directory in its URI (libnbd refuses a URI that
names a local file), so fio finds the CA where libnbd looks by default
($HOME/.pki/libnbd); as root, where libnbd would look in /etc/pki instead,
fio runs as nobody with HOME pointing there (``Servers.fio_prefix``).
"""
from __future__ import annotations

import concurrent.futures
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

import pymirror

MiB = 1 << 20
# pymirror: the C request loop (the default); pymirror-py: the Python loop
# (PYMIRROR_NBD_ENGINE=python), the same code otherwise
NAMES = ("pymirror", "pymirror-py", "qemu-nbd", "nbdkit")
SETTLE_S = float(os.environ.get("PM_BENCH_SETTLE", "3"))   # after each drop (see the docstring)
READ_RUNS = 3                                               # nbdcopy copies per rep (see the docstring)


def need(tool):
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} is missing: apt-get install qemu-utils nbdkit libnbd-bin fio")
    return tool


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fio_tls_dir(client_dir):
    """A directory fio can reach as nobody, for its sockets and libnbd's
    default CA directory (see the docstring), and the command prefix that
    runs fio there: (directory, prefix).  The caller removes it."""
    pub = Path(tempfile.mkdtemp(prefix="pm-bench-tls-"))
    home = pub / "home"
    (home / ".pki" / "libnbd").mkdir(parents=True)
    shutil.copy(Path(client_dir) / "ca-cert.pem", home / ".pki" / "libnbd" / "ca-cert.pem")
    for root, dirs, files in os.walk(pub):
        os.chmod(root, 0o755)
        for f in files:
            os.chmod(os.path.join(root, f), 0o644)
    prefix = ["env", f"HOME={home}"]
    if os.geteuid() == 0:
        prefix = [need("setpriv"), "--reuid=65534", "--regid=65534", "--clear-groups"] + prefix
    return pub, prefix


class Servers:
    """One server of each kind; each serves its own copy of the same bytes."""

    def __init__(self, d, size, drop_file, tls=None):
        self.d = d
        self.drop_file = drop_file         # conftest's: one file out of the page cache
        self.size = size
        self.tls = tls                     # (server dir, client dir) of x509 certificates, or None
        self.names = NAMES if tls is None else ("pymirror", "qemu-nbd", "nbdkit")
        self.procs = {}
        self.fio_prefix = []
        sockdir = d
        if tls is not None:
            self.pub, self.fio_prefix = fio_tls_dir(tls[1])
            sockdir = self.pub
        self.sock = {n: str(sockdir / f"{n}.sock") for n in self.names + ("ceiling",)}
        self.files = {"pymirror": [d / "std.img", d / "mir.img"], "pymirror-py": [d / "std2.img", d / "mir2.img"],
                      "qemu-nbd": [d / "qemu.img"], "nbdkit": [d / "nbdkit.img"]}

    def start(self):
        d = self.d
        tls_pm, tls_qemu, tls_kit = [], [], []
        if self.tls:
            tls_pm = ["--tls=require", f"--tls-certs={self.tls[0]}"]
            tls_qemu = ["--object", f"tls-creds-x509,id=tls0,endpoint=server,dir={self.tls[0]},verify-peer=off",
                        "--tls-creds", "tls0"]
            tls_kit = ["--tls=require", f"--tls-certificates={self.tls[0]}"]
        for name, meta, env in (("pymirror", "pair.meta", "c"), ("pymirror-py", "pair2.meta", "python")):
            if name in self.names:
                self.procs[name] = subprocess.Popen(
                    [sys.executable, "-m", "pymirror", "serve", str(d / meta), "--socket", self.sock[name]] + tls_pm,
                    cwd=str(d), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    env=dict(os.environ, PYMIRROR_NBD_ENGINE=env))
        self.procs["qemu-nbd"] = subprocess.Popen(
            [need("qemu-nbd"), "-k", self.sock["qemu-nbd"], "-f", "raw", "-t", "-e", "16"] + tls_qemu
            + [str(d / "qemu.img")])
        self.procs["nbdkit"] = subprocess.Popen(
            [need("nbdkit"), "-f", "-U", self.sock["nbdkit"]] + tls_kit + ["file", f"file={d / 'nbdkit.img'}"])
        self.procs["ceiling"] = subprocess.Popen(
            [need("nbdkit"), "-f", "-U", self.sock["ceiling"]] + tls_kit
            + ["--filter=noextents", "null", f"size={self.size}"])
        t0 = time.monotonic()
        for s in self.sock.values():
            while not os.path.exists(s):
                if time.monotonic() - t0 > 30:
                    raise TimeoutError(s)
                time.sleep(0.05)
            os.chmod(s, 0o777)          # fio may connect as nobody (fio_prefix)

    def uri(self, name):
        if self.tls:
            return f"nbds+unix:///?socket={self.sock[name]}&tls-certificates={self.tls[1]}"
        return f"nbd+unix:///?socket={self.sock[name]}"

    def fio_uri(self, name):
        """fio's URI: with TLS, no certificate directory (see the docstring)."""
        return f"nbds+unix:///?socket={self.sock[name]}" if self.tls else self.uri(name)

    def hot(self, name):
        """The served file in the page cache (a pair serves its standard)."""
        subprocess.run(["cat", str(self.files[name][0])], stdout=subprocess.DEVNULL, check=True)

    def cold(self, name):
        for f in self.files[name]:
            self.drop_file(f)
        time.sleep(SETTLE_S)

    def stop(self):
        for p in self.procs.values():
            p.terminate()
        for p in self.procs.values():
            p.wait(timeout=60)
        if self.tls is not None:
            shutil.rmtree(self.pub, ignore_errors=True)


def make_files(d, size, names=("std.img", "mir.img", "std2.img", "mir2.img", "qemu.img", "nbdkit.img")):
    rng = np.random.default_rng(0)
    with open(d / "src.bin", "wb") as fh:
        for _ in range(size // (8 * MiB)):
            fh.write(rng.integers(0, 256, 8 * MiB, dtype=np.uint8).tobytes())
    for name in names:
        shutil.copyfile(d / "src.bin", d / name)


def make_pair(meta, std, mir):
    with pymirror.Pair.create(meta, std, mir) as p:
        p.establish(assume_equal=True)       # both sides hold src.bin already
        p.split()


def bench_size(benchmark):
    return (64 if benchmark.disabled else int(os.environ.get("PM_BENCH_MIB", "1024"))) * MiB


@pytest.fixture
def servers(tmp_path, benchmark, tools):
    size = bench_size(benchmark)
    make_files(tmp_path, size)
    make_pair(tmp_path / "pair.meta", tmp_path / "std.img", tmp_path / "mir.img")
    make_pair(tmp_path / "pair2.meta", tmp_path / "std2.img", tmp_path / "mir2.img")
    s = Servers(tmp_path, size, tools.drop_file)
    s.start()
    yield s
    s.stop()


def make_certs(d):
    """A CA and a server certificate for localhost (certtool, Debian gnutls-bin):
    (the servers' directory, the clients' directory)."""
    need("certtool")
    srv, cli = d / "certs", d / "client"
    srv.mkdir()
    cli.mkdir()
    (d / "ca.info").write_text("cn = bench CA\nca\ncert_signing_key\nexpiration_days = 3\n")
    (d / "srv.info").write_text("cn = localhost\ndns_name = localhost\ntls_www_server\nencryption_key\n"
                                "signing_key\nexpiration_days = 3\n")
    run = functools.partial(subprocess.run, check=True, capture_output=True)
    run(["certtool", "--generate-privkey", "--outfile", str(d / "ca-key.pem")])
    run(["certtool", "--generate-self-signed", "--load-privkey", str(d / "ca-key.pem"), "--template",
         str(d / "ca.info"), "--outfile", str(srv / "ca-cert.pem")])
    run(["certtool", "--generate-privkey", "--outfile", str(srv / "server-key.pem")])
    run(["certtool", "--generate-certificate", "--load-ca-certificate", str(srv / "ca-cert.pem"),
         "--load-ca-privkey", str(d / "ca-key.pem"), "--load-privkey", str(srv / "server-key.pem"),
         "--template", str(d / "srv.info"), "--outfile", str(srv / "server-cert.pem")])
    shutil.copy(srv / "ca-cert.pem", cli / "ca-cert.pem")
    return srv, cli


@pytest.fixture
def tls_servers(tmp_path, benchmark, tools):
    size = bench_size(benchmark)
    make_files(tmp_path, size, ("std.img", "mir.img", "qemu.img", "nbdkit.img"))
    make_pair(tmp_path / "pair.meta", tmp_path / "std.img", tmp_path / "mir.img")
    s = Servers(tmp_path, size, tools.drop_file, tls=make_certs(tmp_path))
    s.start()
    yield s
    s.stop()


def timed(cmd):
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    return time.perf_counter() - t0


def read_mbs(servers, uri):
    """Sequential read with nbdcopy, MB/s: the median of READ_RUNS copies."""
    return statistics.median(servers.size / timed([need("nbdcopy"), uri, "null:"]) / 1e6 for _ in range(READ_RUNS))


def fio_iops(uri, qd, runtime, prefix=()):
    out = subprocess.run([*prefix, need("fio"), "--name=r", "--ioengine=nbd", f"--uri={uri}", "--rw=randread", "--bs=4k",
                          f"--iodepth={qd}", f"--runtime={runtime}", "--time_based", "--output-format=json"],
                         check=True, capture_output=True, text=True, timeout=600).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]["read"]
    return job["iops"], job["total_ios"]


def test_nbd_against_peers(benchmark, servers, tools):
    run_against_peers(benchmark, servers, tools, "nbd_c_vs_peers", cold=True)


def test_nbd_tls_against_peers(benchmark, tls_servers, tools):
    """Every figure of test_nbd_against_peers with TLS (x509) on all three:
    pymirror --tls=require, qemu-nbd --tls-creds, nbdkit --tls=require."""
    run_against_peers(benchmark, tls_servers, tools, "nbd_tls_vs_peers", cold=True)


def run_against_peers(benchmark, servers, tools, record_as, cold):
    reps = 1 if benchmark.disabled else int(os.environ.get("PM_BENCH_REPS", "3"))
    runtime = 1 if benchmark.disabled else int(os.environ.get("PM_BENCH_SECONDS", "4"))
    src = str(servers.d / "src.bin")
    keys = ("write_first", "write", "read", "qd1", "qd32", "cpu_us_qd32", "cold_qd1", "cold_qd32")
    names = servers.names
    res = {n: {k: [] for k in keys} for n in names}
    ceiling = []
    for rep in range(reps):
        for n in names[rep % len(names):] + names[:rep % len(names)]:
            uri, r = servers.uri(n), res[n]
            r["write_first" if rep == 0 else "write"].append(
                servers.size / timed([need("nbdcopy"), "--flush", src, uri]) / 1e6)
            servers.hot(n)
            r["read"].append(read_mbs(servers, uri))
            furi, fp = servers.fio_uri(n), servers.fio_prefix
            r["qd1"].append(fio_iops(furi, 1, runtime, fp)[0])
            cpu0 = cpu_seconds(servers.procs[n].pid)
            iops, ios = fio_iops(furi, 32, runtime, fp)
            r["qd32"].append(iops)
            r["cpu_us_qd32"].append((cpu_seconds(servers.procs[n].pid) - cpu0) / ios * 1e6)
        # the cold runs of a rep together, so the servers' are seconds apart:
        # the disk's speed drifts over minutes (see the docstring)
        for n in (names[rep % len(names):] + names[:rep % len(names)]) if cold else ():
            for qd in (1, 32):
                servers.cold(n)
                res[n][f"cold_qd{qd}"].append(fio_iops(servers.fio_uri(n), qd, runtime, servers.fio_prefix)[0])
        ceiling.append(read_mbs(servers, servers.uri("ceiling")))
    benchmark.pedantic(lambda: timed([need("nbdcopy"), servers.uri("pymirror"), "null:"]), rounds=1, iterations=1)
    med = {n: {k: round(statistics.median(v), 1 if k.startswith("cpu") else None) for k, v in r.items() if v}
           for n, r in res.items()}
    ratios = {}
    for peer in names[1:]:
        for k in med["pymirror"]:
            if k in med[peer] and med[peer][k]:
                ratios[f"{k}_vs_{peer}"] = round(med["pymirror"][k] / med[peer][k], 2)
    for k in ("cold_qd1", "cold_qd32") if cold else ():
        per_rep = [a / b for a, b in zip(res["pymirror"][k], res["nbdkit"][k])]
        ratios[f"{k}_vs_nbdkit_per_rep"] = round(statistics.median(per_rep), 2)
    med["ceiling"] = {"read": round(statistics.median(ceiling))}
    for n in ("pymirror", "nbdkit"):
        ratios[f"read_{n}_vs_ceiling"] = round(med[n]["read"] / med["ceiling"]["read"], 2)
    tools.record(record_as, {
        "size_mib": servers.size // MiB, "reps": reps, "read_runs": READ_RUNS, "fio_seconds": runtime,
        "medians": med, "ratios": ratios, "ceiling_read": [round(x, 1) for x in ceiling],
        "all": {n: {k: [round(x, 1) for x in v] for k, v in r.items() if v} for n, r in res.items()},
        "units": "MB/s for read/write, IOPS for qd*, µs of server CPU per request for cpu_us_qd32",
        "load_average": os.getloadavg()})


FOUR_PAIRS = """
import sys, signal, threading
import pymirror
from pymirror.nbd import NBDServer
server = NBDServer(socket_path=sys.argv[1])
pairs = [pymirror.Pair.open(m) for m in sys.argv[2:]]
for i, p in enumerate(pairs):
    server.add_pair(f"p{i}", p)
server.start()
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *a: stop.set())
stop.wait()
server.shutdown()
"""


def test_nbd_four_pairs_one_process(benchmark, tmp_path, tools):
    """Four pairs exported from one pymirror process, four clients at once,
    against four nbdkit processes: aggregate sequential read (four nbdcopy;
    the median of READ_RUNS in each rep) and 4 KiB random reads at qd 32
    (four fio), hot; the two go first in turn."""
    size = bench_size(benchmark) // 4
    reps = 1 if benchmark.disabled else int(os.environ.get("PM_BENCH_REPS", "3"))
    runtime = 1 if benchmark.disabled else int(os.environ.get("PM_BENCH_SECONDS", "4"))
    d = tmp_path
    names = [f"{k}{i}.img" for i in range(4) for k in ("std", "mir", "kit")]
    make_files(d, size, names)
    metas = []
    for i in range(4):
        make_pair(d / f"p{i}.meta", d / f"std{i}.img", d / f"mir{i}.img")
        metas.append(str(d / f"p{i}.meta"))
    procs = {"pymirror": [subprocess.Popen([sys.executable, "-c", FOUR_PAIRS, str(d / "pm.sock")] + metas, cwd=str(d))]}
    procs["nbdkit"] = [subprocess.Popen([need("nbdkit"), "-f", "-U", str(d / f"kit{i}.sock"), "file",
                                         f"file={d / f'kit{i}.img'}"]) for i in range(4)]
    uris = {"pymirror": [f"nbd+unix:///p{i}?socket={d / 'pm.sock'}" for i in range(4)],
            "nbdkit": [f"nbd+unix:///?socket={d / f'kit{i}.sock'}" for i in range(4)]}
    try:
        t0 = time.monotonic()
        for s in [d / "pm.sock"] + [d / f"kit{i}.sock" for i in range(4)]:
            while not os.path.exists(s):
                assert time.monotonic() - t0 < 60, s
                time.sleep(0.05)
        for i in range(4):
            for k in ("std", "mir", "kit"):
                subprocess.run(["cat", str(d / f"{k}{i}.img")], stdout=subprocess.DEVNULL, check=True)
        res = {n: {"read": [], "qd32": []} for n in procs}
        for rep in range(reps):
            for n in list(procs)[rep % 2:] + list(procs)[:rep % 2]:
                reads = []
                for _ in range(READ_RUNS):
                    t = time.perf_counter()
                    ps = [subprocess.Popen([need("nbdcopy"), u, "null:"]) for u in uris[n]]
                    assert all(p.wait(600) == 0 for p in ps)
                    reads.append(4 * size / (time.perf_counter() - t) / 1e6)
                res[n]["read"].append(statistics.median(reads))
                with concurrent.futures.ThreadPoolExecutor(4) as ex:
                    res[n]["qd32"].append(sum(i for i, _ in ex.map(lambda u: fio_iops(u, 32, runtime), uris[n])))
    finally:
        for ps in procs.values():
            for p in ps:
                p.terminate()
                p.wait(60)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    med = {n: {k: round(statistics.median(v)) for k, v in r.items()} for n, r in res.items()}
    tools.record("nbd_four_pairs", {
        "size_mib_each": size // MiB, "reps": reps, "fio_seconds": runtime, "medians": med,
        "ratios": {k: round(med["pymirror"][k] / med["nbdkit"][k], 2) for k in med["nbdkit"]},
        "all": {n: {k: [round(x) for x in v] for k, v in r.items()} for n, r in res.items()},
        "load_average": os.getloadavg(), "units": "aggregate MB/s (read), aggregate IOPS (qd32)"})


def test_nbd_first_write_after_split(benchmark, tmp_path, tools):
    """The first write after a split, each rep on a freshly split pair (a new
    ``pymirror serve`` per rep), against nbdkit file and qemu-nbd writing the
    same bytes: ``nbdcopy --flush src URI``, the served files and the source
    dropped from the page cache first.  pymirror pays its durable
    write-intent here (docs/format.md: group commit and mark-ahead); the
    peers keep no such record."""
    size = bench_size(benchmark)
    reps = 1 if benchmark.disabled else int(os.environ.get("PM_BENCH_REPS", "3"))
    d = tmp_path
    make_files(d, size, ["kit.img", "qemu.img"] + [f"{k}{i}.img" for i in range(reps) for k in ("std", "mir")])
    for i in range(reps):
        make_pair(d / f"p{i}.meta", d / f"std{i}.img", d / f"mir{i}.img")
    peers = {"nbdkit": subprocess.Popen([need("nbdkit"), "-f", "-U", str(d / "kit.sock"), "file",
                                         f"file={d / 'kit.img'}"]),
             "qemu-nbd": subprocess.Popen([need("qemu-nbd"), "-k", str(d / "qemu.sock"), "-f", "raw", "-t",
                                           "-e", "16", str(d / "qemu.img")])}
    files = {"nbdkit": [d / "kit.img"], "qemu-nbd": [d / "qemu.img"]}
    res = {"pymirror": [], "nbdkit": [], "qemu-nbd": []}

    def wait_for(sock):
        t0 = time.monotonic()
        while not os.path.exists(sock):
            assert time.monotonic() - t0 < 30, sock
            time.sleep(0.05)

    def cold(paths):
        for f in list(paths) + [d / "src.bin"]:
            tools.drop_file(f)

    def write(sock):
        return size / timed([need("nbdcopy"), "--flush", str(d / "src.bin"), f"nbd+unix:///?socket={sock}"]) / 1e6

    try:
        for name in peers:
            wait_for(d / ("kit.sock" if name == "nbdkit" else "qemu.sock"))
        for i in range(reps):
            sock = d / f"pm{i}.sock"
            pm = subprocess.Popen([sys.executable, "-m", "pymirror", "serve", str(d / f"p{i}.meta"), "--socket",
                                   str(sock)], cwd=str(d), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                wait_for(sock)
                cold([d / f"std{i}.img", d / f"mir{i}.img"])
                res["pymirror"].append(write(sock))
            finally:
                pm.terminate()
                pm.wait(60)
            for name in peers:
                cold(files[name])
                res[name].append(write(d / ("kit.sock" if name == "nbdkit" else "qemu.sock")))
    finally:
        for p in peers.values():
            p.terminate()
            p.wait(60)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    med = {n: round(statistics.median(v)) for n, v in res.items()}
    tools.record("nbd_first_write", {
        "size_mib": size // MiB, "reps": reps, "medians": med,
        "ratios": {f"vs_{p}": round(med["pymirror"] / med[p], 2) for p in peers},
        "all": {n: [round(x) for x in v] for n, v in res.items()},
        "load_average": os.getloadavg(), "units": "MB/s"})
