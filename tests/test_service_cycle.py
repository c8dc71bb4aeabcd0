"""A whole cycle under real clients, driven from another shell.

A ``pymirror daemon`` holds a pair and serves its NBD exports.  A libnbd
client (Debian's python3-libnbd, in its own process) keeps writing the
standard and reading back what it wrote, on one connection, for the whole
cycle; fio (nbd engine, ``verify=crc32c``) joins for the second half.
CLI subprocesses drive the cycle: split -> damage through the mirror export
-> restore --incremental -> watch until done -> verify -> establish.

Checked: no client error and no reconnection; every acknowledged write is
readable afterwards (or, for a write made between the split and the restore,
replaced by the mirror's image, which is what a restore is for); the mirror
is byte-for-byte unchanged across the protected restore; the damage is on
the standard after the restore; the sides are equal at the end.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("cli_util", Path(__file__).with_name("cli_util.py"))
cli_util = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("cli_util", cli_util)
_spec.loader.exec_module(cli_util)
run, SYSTEM_PYTHON = cli_util.run, cli_util.SYSTEM_PYTHON

MiB = 1 << 20
SIZE = 32 * MiB
TRACK = 64 << 10
W = (0, 16 * MiB)            # the libnbd writer's region
D = (16 * MiB, 24 * MiB)     # damaged through the mirror export while split
E = (24 * MiB, 32 * MiB)     # fio's region (from the restore on)

# The writer: one connection for its whole life.  Each write is logged with
# the monotonic times it was sent and acknowledged; right after it, the block
# is read back and must be what was written, unless a restore (which may
# revert it) overlapped.  On "stop" it reads every block it wrote and checks
# it against what the cycle allows; it prints a JSON report.
WRITER = r'''
import hashlib, json, os, random, struct, sys, time
import nbd

uri, start, end, ctl = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
BS = 4096
h = nbd.NBD()
h.connect_uri(uri)
hist = {}
errors, bad = [], []
rng = random.Random(11)
seq = reads_checked = 0

def mark(name):
    try:
        with open(os.path.join(ctl, name)) as f:
            return float(f.read())
    except (FileNotFoundError, ValueError):
        return None

def digest(b):
    return hashlib.sha256(b).hexdigest()

open(os.path.join(ctl, "writer-ready"), "w").close()
while not os.path.exists(os.path.join(ctl, "stop")):
    b = rng.randrange(start // BS, end // BS)
    seq += 1
    data = struct.pack("<QQ", seq, b) + rng.randbytes(BS - 16)
    t0 = time.monotonic()
    try:
        h.pwrite(data, b * BS)
        t1 = time.monotonic()
        back = h.pread(BS, b * BS)
        if seq % 64 == 0:
            h.flush()
    except nbd.Error as exc:
        errors.append(f"block {b}: {exc}")
        break
    t2 = time.monotonic()
    hist.setdefault(b, []).append((t0, t1, digest(data)))
    r0, r1 = mark("restore-begin"), mark("restore-end")
    overlapped = r0 is not None and t2 > r0 and (r1 is None or t0 < r1)
    if not overlapped:
        reads_checked += 1
        if back != data:
            bad.append({"block": b, "why": "read back right after its write differs", "seq": seq})

# every block it wrote: what may it hold now?
s0, s1, r0, r1 = mark("split-begin"), mark("split-end"), mark("restore-begin"), mark("restore-end")
zero = digest(bytes(BS))
if None in (s0, s1, r0, r1):
    hist = {}                                         # the cycle did not get that far
    errors.append("the cycle stopped before the restore")
for b, ws in sorted(hist.items()):
    after = [w for w in ws if w[0] >= r1]
    if after:
        allowed = {after[-1][2]}                      # written after the restore began: kept
    else:
        before = [w for w in ws if w[1] <= s0]
        allowed = {before[-1][2] if before else zero}  # the image at the split (the mirror's)
        allowed |= {w[2] for w in ws if w[0] < s1 and w[1] > s0}   # in flight at the split
        allowed |= {w[2] for w in ws if w[0] < r1 and w[1] > r0}   # in flight at the restore
    try:
        got = digest(h.pread(BS, b * BS))
    except nbd.Error as exc:
        errors.append(f"final read of block {b}: {exc}")
        break
    if got not in allowed:
        bad.append({"block": b, "why": "final content is not one the cycle allows", "writes": len(ws)})
h.shutdown()
print(json.dumps({"writes": seq, "reads_checked": reads_checked, "blocks": len(hist),
                  "errors": errors, "bad": bad[:20], "bad_count": len(bad)}))
'''

READ_HASH = r'''
import hashlib, sys
import nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
start, end = int(sys.argv[2]), int(sys.argv[3])
s = hashlib.sha256()
for off in range(start, end, 1 << 20):
    s.update(h.pread(min(1 << 20, end - off), off))
h.shutdown()
print(s.hexdigest())
'''


def nbd_hash(sock: Path, export: str, start: int = 0, end: int = SIZE) -> str:
    proc = subprocess.run([SYSTEM_PYTHON, "-c", READ_HASH, cli_util.nbd_uri(sock, export), str(start), str(end)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def damage_pattern() -> bytes:
    word = b"damage through the mirror export "
    n = D[1] - D[0]
    return (word * (n // len(word) + 1))[:n]


def stamp(ctl: Path, name: str) -> None:
    (ctl / name).write_text(repr(time.monotonic()))


def tracks_of(region: tuple[int, int]) -> set[int]:
    return set(range(region[0] // TRACK, region[1] // TRACK))


@pytest.mark.real_client
def test_cycle_under_a_writing_client(tmp_path):
    cli_util.need_libnbd()
    fio = cli_util.which("fio")
    if fio is None:
        msg = "fio is not installed (Debian package fio)"
        if cli_util.os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
            pytest.fail(msg + ": CI must install it (.ci/run)")
        pytest.skip(msg)
    run("create", tmp_path / "s.img", "--size", str(SIZE))
    run("create", tmp_path / "m.img", "--size", str(SIZE))
    meta = tmp_path / "cyc.meta"
    run("pair", meta, "--standard", tmp_path / "s.img", "--mirror", tmp_path / "m.img")
    run("establish", meta, "--assume-equal")
    daemon = cli_util.Daemon(tmp_path, meta)
    ctl = tmp_path / "ctl"
    ctl.mkdir()
    writer = fio_proc = None

    def pm(*args, **kw):
        return run("--control", daemon.control, *args, **kw)
    try:
        uri = cli_util.nbd_uri(daemon.nbd, "cyc")
        writer = subprocess.Popen([SYSTEM_PYTHON, "-c", WRITER, uri, str(W[0]), str(W[1]), str(ctl)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while not (ctl / "writer-ready").exists():
            assert writer.poll() is None and time.monotonic() < deadline, writer.communicate()
            time.sleep(0.05)
        time.sleep(1.0)

        # split, from another shell
        stamp(ctl, "split-begin")
        pm("split", "cyc")
        stamp(ctl, "split-end")
        time.sleep(1.0)

        # damage through the mirror export, then remember the mirror
        cli_util.nbd_write(daemon.nbd, "cyc/mirror", D[0], damage_pattern())
        mirror_before = nbd_hash(daemon.nbd, "cyc/mirror")

        # restore the standard from the mirror while the writer goes on
        stamp(ctl, "restore-begin")
        out = pm("restore", "cyc", "--incremental", "--no-wait", "--rate", "8M")
        stamp(ctl, "restore-end")
        assert out.stdout.startswith("cyc: restore started (")
        fio_proc = subprocess.Popen(
            [fio, "--name=cycle", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k",
             f"--offset={E[0]}", f"--size={E[1] - E[0]}", "--iodepth=4", "--verify=crc32c",
             "--verify_backlog=16", "--verify_fatal=1", "--time_based", "--runtime=8",
             "--output-format=json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)

        watched = pm("watch", "cyc", "--until-done", timeout=300)
        assert "restore done" in watched.stdout.splitlines()[-1], watched.stdout
        st = json.loads(pm("status", "--json").stdout)
        assert st["pairs"][0]["state"] == "restored"
        assert st["pairs"][0]["clients"] >= 1, st

        # the protected restore left the mirror as it was; the damage is on the standard
        assert nbd_hash(daemon.nbd, "cyc/mirror") == mirror_before
        assert nbd_hash(daemon.nbd, "cyc", *D) == nbd_hash(daemon.nbd, "cyc/mirror", *D)

        # verify: only tracks the clients wrote since the restore may differ
        v = pm("verify", "cyc", "--json", check=False)
        assert v.returncode in (0, 1), v.stderr
        differing = set(json.loads(v.stdout)["differing"])
        assert differing <= tracks_of(W) | tracks_of(E), sorted(differing - tracks_of(W) - tracks_of(E))

        out = pm("establish", "cyc", "--incremental")
        assert out.stdout.startswith("establish complete: the pair is established")

        fio_out, fio_err = fio_proc.communicate(timeout=120)
        assert fio_proc.returncode == 0, fio_err
        job = json.loads(fio_out[fio_out.index("{"):])["jobs"][0]
        assert job["error"] == 0 and job["write"]["io_bytes"] > 0, fio_err
    finally:
        (ctl / "stop").touch()
        report_text = ""
        if writer is not None:
            report_text, werr = writer.communicate(timeout=300)
        if fio_proc is not None and fio_proc.poll() is None:
            fio_proc.kill()
            fio_proc.wait()
        code = daemon.stop()
    report = json.loads(report_text)
    assert report["errors"] == [], report           # no client error, one connection throughout
    assert report["bad_count"] == 0, report
    assert report["writes"] > 100 and report["reads_checked"] > 100, report
    assert code == 0, daemon.output()
    # after the daemon committed and closed the pair: equal, established, damage restored
    assert run("verify", meta).returncode == 0
    assert json.loads(run("query", meta, "--json").stdout)["state"] == "established"
    with open(tmp_path / "s.img", "rb") as f:
        f.seek(D[0])
        assert f.read(D[1] - D[0]) == damage_pattern()
