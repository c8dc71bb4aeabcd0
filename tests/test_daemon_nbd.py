"""The daemon's NBD exports: a client of the standard stays connected
across every verb; detach disconnects cleanly; SIGKILL mid-restore with a
client writing loses nothing acknowledged; a group split of 100 pairs is
dependent-write consistent; qemu rides over a daemon restart."""
from __future__ import annotations

import importlib.util
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import pymirror
from pymirror import errors

_spec = importlib.util.spec_from_file_location("test_daemon_util", Path(__file__).with_name("test_daemon_util.py"))
U = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("test_daemon_util", U)
_spec.loader.exec_module(U)
MiB = U.MiB
BLOCK = 4096


@pytest.fixture
def daemon(tmp_path):
    d = U.DaemonProc(tmp_path, nbd=True)
    yield d
    if d.proc is not None and d.proc.poll() is None:
        assert d.stop() == 0
    assert "Traceback" not in d.log_text()


def pattern(tag: int, n: int = BLOCK) -> bytes:
    return (tag.to_bytes(8, "little") * (n // 8))[:n]


def test_a_standard_client_stays_connected_across_every_verb(tmp_path, daemon):
    size = 8 * MiB
    meta = U.make_pair(tmp_path, "p", size=size, fill=b"\x01")
    daemon.start(meta)
    c = daemon.client()
    with daemon.client() as w:
        stream = w.events("p", timeout=5)
        nbd = U.Nbd(daemon.nbd, "p")
        assert nbd.size == size
        first = next(stream)
        assert first["event"] == "client-connected" and first["data"]["export"] == "p"
    assert c.status("p")["pairs"][0]["clients"] == 1
    expect: dict[int, bytes] = {}
    fill = b"\x01" * BLOCK
    rng = random.Random(5)
    tag = [0]

    def io_round():
        for _ in range(16):
            tag[0] += 1
            off = rng.randrange(size // BLOCK) * BLOCK
            nbd.write(off, pattern(tag[0]))
            expect[off] = pattern(tag[0])
        for off, data in rng.sample(sorted(expect.items()), min(8, len(expect))):
            assert nbd.read(off, BLOCK) == data
        assert nbd.read(0, BLOCK) == expect.get(0, fill)

    p = c.pair("p")
    io_round()
    p.establish(rate=4 * MiB)
    io_round()
    p.pause()
    io_round()
    p.resume()
    io_round()
    q = p.cancel()                                  # ends the establish: split, mirror inconsistent
    assert q["state"] == "split" and q["mirror_invalid"] > 0
    io_round()
    p.establish(incremental=True, wait=True)
    io_round()
    p.split()
    at_split = dict(expect)                         # the mirror's image
    io_round()
    # damage the standard, then restore it under the connected client: the
    # standard goes back to the mirror's image, then takes the new writes
    nbd.write(0, b"\xee" * BLOCK)
    p.restore(incremental=True, rate=4 * MiB)
    expect = at_split
    io_round()
    assert p.wait(timeout=60) == "done"
    io_round()
    assert p.query()["state"] == "restored"
    p.establish(incremental=True, wait=True)
    io_round()
    assert p.verify()["equal"] is True
    for off in range(0, size, BLOCK):
        assert nbd.read(off, BLOCK) == expect.get(off, fill)
    assert c.status("p")["pairs"][0]["clients"] == 1          # never reconnected
    nbd.close()
    c.close()


def test_mirror_export_follows_the_pair_rules(tmp_path, daemon):
    meta = U.make_pair(tmp_path, "m", size=2 * MiB, fill=b"\x02")
    daemon.start(meta)
    with daemon.client() as c:
        c.pair("m").establish(wait=True)
        c.pair("m").split()
        mir = U.Nbd(daemon.nbd, "m/mirror")                  # writable while split
        mir.write(0, b"\x03" * BLOCK)
        c.pair("m").restore(incremental=True, rate=1 * MiB)   # protected: the mirror is write-disabled
        with pytest.raises(U.NbdError) as ei:
            mir.write(BLOCK, b"\x04" * BLOCK)
        assert ei.value.code == mir.P.EPERM
        assert mir.read(0, BLOCK) == b"\x03" * BLOCK          # still connected, reads allowed
        c.pair("m").set_rate(0)
        assert c.pair("m").wait(timeout=30) == "done"
        mir.close()


def test_detach_disconnects_its_clients_cleanly_and_others_go_on(tmp_path, daemon):
    a = U.make_pair(tmp_path, "a", fill=b"\x05")
    b = U.make_pair(tmp_path, "b", fill=b"\x06")
    daemon.start(a, b)
    na, nb = U.Nbd(daemon.nbd, "a"), U.Nbd(daemon.nbd, "b")
    na.write(0, b"x" * BLOCK, fua=True)
    with daemon.client() as c:
        c.detach("a")
        with pytest.raises((U.NbdError, ConnectionError, OSError)):
            na.read(0, BLOCK)
        assert nb.read(0, BLOCK) == b"\x06" * BLOCK
        with pytest.raises(LookupError):
            U.Nbd(daemon.nbd, "a")                            # no longer exported
        c.attach(a)
        na2 = U.Nbd(daemon.nbd, "a")
        assert na2.read(0, BLOCK) == b"x" * BLOCK
        c.pair("b").unexport()
        with pytest.raises(LookupError):
            U.Nbd(daemon.nbd, "b")
        c.pair("b").export()
        U.Nbd(daemon.nbd, "b").close()
        na2.close()
    nb.close()


def test_sigkill_mid_restore_with_a_client_writing_loses_nothing(tmp_path, daemon):
    size = 32 * MiB
    meta = U.make_pair(tmp_path, "k", size=size, fill=b"\x11")     # the image the mirror will keep
    daemon.start(meta)
    c = daemon.client()
    c.pair("k").establish(wait=True)
    c.pair("k").split()
    nbd = U.Nbd(daemon.nbd, "k")
    for off in range(0, size, MiB):                                  # damage every track of the standard
        nbd.write(off, b"\x22" * MiB)
    nbd.flush()
    c.pair("k").restore(rate=4 * MiB)                               # protected, slow: ~8 s
    acked: dict[int, bytes] = {}
    inflight: list[tuple[int, bytes]] = []    # the one write sent when the daemon died: may or may not land
    stop = threading.Event()

    def writer():
        rng = random.Random(7)
        n = 0
        while not stop.is_set():
            n += 1
            off = rng.randrange(size // 4 // BLOCK) * BLOCK     # a quarter: the rest is left to the copier
            data = pattern(1000 + n)
            inflight[:] = [(off, data)]
            try:
                nbd.write(off, data, fua=True)
            except (OSError, ConnectionError, U.NbdError, AssertionError):
                return
            acked[off] = data
            inflight.clear()
            time.sleep(0.002)

    t = threading.Thread(target=writer)
    t.start()
    time.sleep(1.5)
    pending_before = c.pair("k").query()["job"]["tracks_pending"]
    c.close()
    daemon.kill()
    stop.set()
    t.join(10)
    assert pending_before > 128 and len(acked) > 10
    with pymirror.Pair.open(meta) as pair:                            # what the crash left
        assert pair.state == "restoring" and pair.progress.tracks_pending > 0
    daemon.start()                                                   # the state dir brings the pair back
    with daemon.client() as c:
        assert c.pair("k").wait(timeout=120) == "done"              # resumed by itself
        assert "resuming the interrupted restore" in daemon.log_text()
        assert c.pair("k").query()["state"] == "restored"
    check = U.Nbd(daemon.nbd, "k")
    for off in range(0, size, BLOCK):
        got = check.read(off, BLOCK)
        ok = [acked.get(off, b"\x11" * BLOCK)] + [d for o, d in inflight if o == off]
        assert got in ok, f"block at {off}"
    check.close()
    with open(tmp_path / "k.bcv", "rb") as fh:                     # protected: the mirror never changed
        assert fh.read() == b"\x11" * size


def test_group_split_of_100_pairs_is_dependent_write_consistent(tmp_path, daemon):
    n_pairs, size = 100, 256 << 10
    metas = [U.make_pair(tmp_path, f"q{i:03d}", size=size) for i in range(n_pairs)]
    daemon.start(*metas)
    c = daemon.client()
    names = [f"q{i:03d}" for i in range(n_pairs)]
    c.group_create("G", names)
    r = c.pair("G").establish(wait=True)
    assert all(q["state"] == "established" for q in r["pairs"].values())
    writers, per_writer = 4, 8
    logs: list[list[tuple[int, int]]] = [[] for _ in range(writers)]     # (pair index, seq), in ack order
    stop = threading.Event()
    started = threading.Barrier(writers + 1)

    def writer(w: int) -> None:
        mine = [w * 25 + j for j in range(per_writer)]                    # 8 pairs of its own range
        conns = {i: U.Nbd(daemon.nbd, names[i]) for i in mine}
        rng = random.Random(w)
        seq = 0
        started.wait()
        while not stop.is_set():
            seq += 1
            i = rng.choice(mine)
            conns[i].write(w * BLOCK, pattern(seq))    # each write issued only after the previous was acked
            logs[w].append((i, seq))
        for conn in conns.values():
            conn.close()

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    started.wait()
    time.sleep(0.5)
    r = c.pair("G").split()
    time.sleep(0.3)
    stop.set()
    for t in threads:
        t.join(30)
    assert all(q["state"] == "split" for q in r["pairs"].values()) and r["held_seconds"] is not None
    for w in range(writers):
        mirror_seq = {}
        for i in {i for i, _ in logs[w]}:
            with open(tmp_path / f"{names[i]}.bcv", "rb") as fh:
                fh.seek(w * BLOCK)
                mirror_seq[i] = int.from_bytes(fh.read(8), "little")
        cut = max(mirror_seq.values())
        assert 0 < cut < logs[w][-1][1], "the split did not land inside the writer's run"
        last_before_cut: dict[int, int] = {}
        for i, seq in logs[w]:
            if seq <= cut:
                last_before_cut[i] = seq
        for i in mirror_seq:
            assert mirror_seq[i] == last_before_cut.get(i, 0), \
                f"writer {w}: pair {names[i]} holds {mirror_seq[i]}, the image at {cut} needs {last_before_cut.get(i, 0)}"
    c.close()


def test_qemu_rides_over_a_daemon_restart(tmp_path, daemon):
    nu = U.nbd_util()
    qemu_io = nu.need("qemu-io")
    meta = U.make_pair(tmp_path, "vm", size=4 * MiB, fill=b"\x00")
    daemon.start(meta)
    opts = (f"driver=nbd,server.type=unix,server.path={daemon.nbd},export=vm,reconnect-delay=30")
    cmds = ["write -P 0x41 0 64k", "flush", "sleep 3000", "write -P 0x42 64k 64k", "flush",
            "read -P 0x41 0 64k", "read -P 0x42 64k 64k"]
    args = [qemu_io, "--image-opts", opts]
    for cmd in cmds:
        args += ["-c", cmd]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(1.0)                   # inside the sleep: the first write is done
    assert daemon.stop() == 0
    daemon.start()                    # back within qemu's reconnect-delay
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "Pattern verification failed" not in out and "error" not in out.lower(), out
    assert out.count("wrote 65536/65536 bytes") == 2 and out.count("read 65536/65536 bytes") == 2, out
    with daemon.client() as c:
        kinds = [e["event"] for e in c.history("vm")]
    assert "client-connected" in kinds


def test_who_may_connect_socket_modes_and_loopback_tcp(tmp_path, daemon):
    import socket
    import stat

    meta = U.make_pair(tmp_path, "only", fill=b"\x07")
    with socket.socket() as s:                    # a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    daemon.start(meta, extra=("--listen", f"127.0.0.1:{port}"))
    assert stat.S_IMODE(os.stat(daemon.nbd).st_mode) == 0o660
    assert stat.S_IMODE(os.stat(daemon.control).st_mode) == 0o600
    nu = U.nbd_util()
    for address, name in ((daemon.nbd, ""), (daemon.nbd, "only"), (("127.0.0.1", port), "only")):
        c, size, _ = nu.connect(address, name)      # "" is the standard while the daemon holds one pair
        assert size == 2 * MiB
        c.close()
    with daemon.client() as c:
        assert any(u.startswith("nbd://127.0.0.1:") for u in c.status()["daemon"]["nbd"])
    assert daemon.stop() == 0
    # a TCP listener on a non-loopback address needs --allow-remote
    other = U.DaemonProc(tmp_path / "o", nbd=False) if (tmp_path / "o").mkdir() is None else None
    other.start(extra=("--listen", f"0.0.0.0:{port}"), wait=False)
    assert other.proc.wait(30) == 2
    text = other.log_text()
    assert "allow" in text and "Traceback" not in text and len(text.strip().splitlines()) <= 3


def test_online_verify_while_a_client_writes_an_established_pair(tmp_path, daemon):
    size = 8 * MiB
    meta = U.make_pair(tmp_path, "ov", size=size, fill=b"\x09")
    daemon.start(meta)
    with daemon.client() as c:
        c.pair("ov").establish(wait=True)
        nbd = U.Nbd(daemon.nbd, "ov")
        stop = threading.Event()
        count = [0]

        def writer():
            rng = random.Random(3)
            while not stop.is_set():
                nbd.write(rng.randrange(size // BLOCK) * BLOCK, pattern(rng.randrange(1 << 30)))
                count[0] += 1

        t = threading.Thread(target=writer)
        t.start()
        try:
            rounds = 0
            while rounds < 3 or (count[0] < 200 and rounds < 200):
                v = c.pair("ov").verify()
                assert v["equal"] is True, v["differing"]    # established: the sides stay equal
                rounds += 1
        finally:
            stop.set()
            t.join(10)
        assert count[0] >= 200            # the verifies did run under writes
        nbd.close()
        c.pair("ov").split()
        with open(tmp_path / "ov.std", "r+b") as fh:          # a real difference is still found
            fh.seek(5 * MiB)
            fh.write(b"\xfe" * 10)
        assert c.pair("ov").verify()["differing"] == [80]
