"""Clients stay connected while their pair changes state: what each export
answers in each state (raw protocol), and a real client (libnbd, in this
process) that rides a whole cycle -- establish, split, restore (protected),
pause, resume, done, establish, split, establish, cancel -- writing and
reading back all the while."""
from __future__ import annotations

import errno
import importlib.util
import os
import random
import sys
import threading
import time
from pathlib import Path

import pytest

import pymirror
from pymirror import CopyConfig
from pymirror.nbd import NBDServer
from pymirror.nbd import protocol as P

pytestmark = pytest.mark.usefixtures("nbd_engine")     # each test on the C and the Python loop

_spec = importlib.util.spec_from_file_location("nbd_util", Path(__file__).with_name("nbd_util.py"))
nbd_util = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("nbd_util", nbd_util)
_spec.loader.exec_module(nbd_util)
RawClient = nbd_util.RawClient
connect = nbd_util.connect

SIZE = 4 << 20
TRACK = 64 << 10
SLOW = CopyConfig(rate=1)          # a job that stays in progress until its rate is lifted
FAST = CopyConfig(rate=0)


def finish(job):
    job.set_rate(0)
    assert job.wait(timeout=60)


def probe(c, base):
    """What the export answers now: READ, WRITE, WRITE_ZEROES, TRIM, FLUSH
    (the writes put back the bytes that are there, so nothing changes)."""
    out = {}
    c.request(P.CMD_READ, base, 4, cookie=1)
    err, _, data = c.reply(4)
    out["read"] = err
    c.read_message = c.message if err else ""
    keep = data if err == 0 else None
    if keep is None:
        keep = bytes(4)
    c.request(P.CMD_WRITE, base, 4, keep, cookie=2)
    out["write"] = c.reply()[0]
    c.request(P.CMD_WRITE_ZEROES, SIZE - 4096, 4096, cookie=3)
    out["zeroes"] = c.reply()[0]
    c.request(P.CMD_TRIM, 0, 4096, cookie=4)
    out["trim"] = c.reply()[0]
    c.request(P.CMD_FLUSH, cookie=5)
    out["flush"] = c.reply()[0]
    return out


OK = {"read": 0, "write": 0, "zeroes": 0, "trim": 0, "flush": 0}
NO_WRITES = {"read": 0, "write": P.EPERM, "zeroes": P.EPERM, "trim": P.EPERM, "flush": 0}
NOTHING = {"read": P.EIO, "write": P.EPERM, "zeroes": P.EPERM, "trim": P.EPERM, "flush": 0}


def test_each_export_in_each_state(tmp_path):
    pair = pymirror.Pair.memory(SIZE, TRACK)
    pair.write(0, os.urandom(SIZE))
    pair.establish(config=FAST).wait()
    pair.split()
    server = NBDServer(socket_path=str(tmp_path / "s")).start()
    server.add_pair("p", pair)
    std, _, std_flags = connect(server.socket_path, "p", structured=True)
    mirror, _, m_flags = connect(server.socket_path, "p/mirror", structured=True)   # writable: split
    assert not m_flags & P.TFLAG_READ_ONLY and not std_flags & P.TFLAG_READ_ONLY
    late = None                                         # a mirror client connected while established
    seen = []

    def check(label, mirror_rule, late_rule=None):
        assert probe(std, 0) == OK, label
        got = probe(mirror, 8192)
        assert got == mirror_rule, (label, got)
        if mirror_rule["read"]:                                     # the reasons reach the client
            assert "the pair is syncing" in mirror.read_message, mirror.read_message
        if mirror_rule["trim"]:
            assert f"the pair is {pair.state}" in mirror.message, mirror.message
        if late is not None and late_rule is not None:
            assert probe(late, 16384) == late_rule, label
        seen.append(label)

    def mirror_open_now():
        c = RawClient(server.socket_path)
        c.greet()
        try:
            c.go("p/mirror", opt=P.OPT_INFO)
            return True
        except LookupError:
            return False
        finally:
            c.close()

    check("split", OK)
    job = pair.establish(incremental=True, config=SLOW)
    assert pair.state == "syncing" and not mirror_open_now()
    check("syncing", NOTHING)
    job.pause()
    check("syncing, paused", NOTHING)
    job.resume()
    finish(job)
    assert pair.state == "established" and mirror_open_now()
    check("established", NO_WRITES)
    late, _, late_flags = connect(server.socket_path, "p/mirror", structured=True)
    assert late_flags & P.TFLAG_READ_ONLY                          # read-only: fixed at handshake
    pair.split()
    check("split again", OK, NO_WRITES)                              # late stays read-only
    before = pair.mirror_read(0, SIZE)
    job = pair.restore(protect=True, config=SLOW)
    check("restoring (protected)", NO_WRITES, NO_WRITES)
    job.pause()
    check("restoring, paused", NO_WRITES, NO_WRITES)
    job.resume()
    finish(job)
    assert pair.state == "restored"
    assert pair.mirror_read(0, SIZE) == before                     # the protected mirror is unchanged
    check("restored", OK, NO_WRITES)
    finish(pair.establish(incremental=True, config=FAST))
    pair.split()
    job = pair.restore(protect=False, config=SLOW)
    check("restoring (unprotected)", NO_WRITES, NO_WRITES)
    finish(job)
    assert pair.state == "established"
    check("established after an unprotected restore", NO_WRITES, NO_WRITES)
    assert server.clients("p") == 3 and server.connections == 3    # nobody was disconnected
    assert len(seen) == 10
    server.shutdown()
    pair.close()


def test_a_client_rides_a_whole_cycle_with_libnbd(tmp_path):
    """libnbd handles on the standard and on the mirror stay connected from
    the first establish to the last; every read returns what the model
    says; the standard never errors; the mirror export answers EPERM to
    writes while the protected restore runs and EIO to reads while it is
    overwritten by an establish."""
    nbd = nbd_util.libnbd()
    rng = random.Random(10)
    std_v = pymirror.Volume.create(tmp_path / "std.img", SIZE)
    mir_v = pymirror.Volume.create(tmp_path / "mir.img", SIZE)
    std_v.close()
    mir_v.close()
    pair = pymirror.Pair.create(tmp_path / "p.meta", tmp_path / "std.img", tmp_path / "mir.img")
    events = []
    server = NBDServer(socket_path=str(tmp_path / "s"), on_event=lambda k, d: events.append((k, d["export"])))
    server.start()
    server.add_pair("vol", pair)
    model = bytearray(SIZE)                  # what the standard must read as
    mirror_model = None                      # what the mirror must read as (once it is independent)

    h = nbd.NBD()
    h.connect_uri(server.export_uri("vol"))
    assert h.get_size() == SIZE and not h.is_read_only() and h.can_multi_conn()

    def host_writes(n=20):
        for _ in range(n):
            off = rng.randrange(0, SIZE - 70000)
            data = rng.randbytes(rng.choice((512, 4096, TRACK, 70000)))
            h.pwrite(data, off, nbd.CMD_FLAG_FUA if rng.random() < 0.2 else 0)
            model[off:off + len(data)] = data
        h.flush()
        assert h.pread(SIZE, 0) == model

    def fails(call, code):
        try:
            call()
        except nbd.Error as e:
            assert e.errnum == code, e
        else:
            raise AssertionError("no error")

    # establish: the standard is used at once; the mirror cannot be opened yet
    host_writes()
    job = pair.establish(config=SLOW)
    host_writes()
    m_try = nbd.NBD()
    fails(lambda: m_try.connect_uri(server.export_uri("vol/mirror")), errno.ENOENT)
    finish(job)
    assert pair.mirror_read(0, SIZE) == model
    ro = nbd.NBD()                                                    # read-only: established
    ro.connect_uri(server.export_uri("vol/mirror"))
    assert ro.is_read_only() and ro.pread(SIZE, 0) == model
    ro.set_strict_mode(0)                                             # send the write anyway
    fails(lambda: ro.pwrite(b"x", 0), errno.EPERM)
    host_writes()
    assert ro.pread(SIZE, 0) == model                                 # host writes are mirrored

    # split: the mirror is a volume of its own; damage it through NBD
    pair.split()
    mirror_model = bytearray(model)
    host_writes()
    m = nbd.NBD()
    m.connect_uri(server.export_uri("vol/mirror"))
    assert not m.is_read_only()
    for _ in range(10):
        off = rng.randrange(0, SIZE - 4096)
        data = rng.randbytes(4096)
        m.pwrite(data, off)
        mirror_model[off:off + 4096] = data
    m.flush()
    assert m.pread(SIZE, 0) == mirror_model and ro.pread(SIZE, 0) == mirror_model

    # restore, protected and incremental: the standard reads as the mirror at once
    job = pair.restore(incremental=True, protect=True, config=SLOW)
    model[:] = mirror_model
    assert h.pread(SIZE, 0) == model
    host_writes()
    fails(lambda: m.pwrite(b"no", 0), errno.EPERM)
    fails(lambda: m.zero(4096, 0), errno.EPERM)
    assert m.pread(SIZE, 0) == mirror_model
    job.pause()
    host_writes()
    fails(lambda: m.pwrite(b"no", 100), errno.EPERM)
    job.resume()
    host_writes(5)
    finish(job)
    assert pair.state == "restored"
    assert h.pread(SIZE, 0) == model
    assert pair.mirror_read(0, SIZE) == mirror_model                  # untouched by the restore
    m.pwrite(b"after", 0)                                             # writable again
    mirror_model[0:5] = b"after"
    assert ro.pread(5, 0) == b"after"

    # establish again: the mirror is being overwritten, then equals the standard
    job = pair.establish(incremental=True, config=SLOW)
    fails(lambda: m.pread(4, 0), errno.EIO)
    fails(lambda: m.pwrite(b"no", 0), errno.EPERM)
    host_writes()
    finish(job)
    host_writes()
    assert m.pread(SIZE, 0) == model and ro.pread(SIZE, 0) == model
    assert pair.verify() == []

    # split, establish, cancel: the mirror is a volume of its own again, not an image
    pair.split()
    host_writes()
    job = pair.establish(config=SLOW)
    fails(lambda: m.pread(4, 0), errno.EIO)
    host_writes()
    pair.cancel()
    assert pair.state == "split" and pair.mirror_invalid > 0
    m.pread(SIZE, 0)                                                  # readable, and writable (opened so)
    m.pwrite(b"mine", 0)
    host_writes()
    finish(pair.establish(incremental=True, config=SLOW))
    assert m.pread(SIZE, 0) == model and pair.mirror_invalid == 0

    # nobody was disconnected, nobody reconnected
    assert server.clients("vol") == 3
    assert [k for k, _ in events] == ["client-connected"] * 3
    for handle in (h, m, ro):
        handle.shutdown()
    server.shutdown()
    assert sorted(e for k, e in events if k == "client-disconnected") == ["vol", "vol/mirror", "vol/mirror"]
    pair.close()


def test_clients_stay_across_cancel(tmp_path):
    pair = pymirror.Pair.memory(SIZE, TRACK)
    pair.write(0, b"\x11" * SIZE)
    pair.establish(config=FAST).wait()
    pair.split()
    with NBDServer(socket_path=str(tmp_path / "s")) as server:
        server.add_pair("c", pair)
        std, _, _ = connect(server.socket_path, "c", structured=True)
        mirror, _, _ = connect(server.socket_path, "c/mirror", structured=True)
        job = pair.establish(config=SLOW)
        assert probe(mirror, 0) == NOTHING and probe(std, 0) == OK
        pair.cancel()
        assert pair.state == "split" and not job.progress.running
        assert probe(std, 0) == OK
        assert probe(mirror, 0) == OK                     # split: its data is inconsistent, but it is a volume
        assert server.clients("c") == 2
    pair.close()


def test_standard_clients_never_see_an_error_while_states_change(tmp_path):
    """Clients of the standard race the pair's state changes (real threads):
    every write and read succeeds, whatever the state at that instant."""
    pair = pymirror.Pair.memory(SIZE, TRACK)
    pair.establish(config=FAST).wait()
    with NBDServer(socket_path=str(tmp_path / "s")) as server:
        server.add_pair("r", pair)
        stop = threading.Event()
        failed = []
        done = [0] * 4

        ready = threading.Barrier(5)

        def client(k):
            c, _, _ = connect(server.socket_path, "r", structured=True)
            ready.wait()
            i = 0
            while not stop.is_set():
                off = (k * 64 + i % 64) * 8192
                data = bytes([k, i % 251]) * 2048
                c.request(P.CMD_WRITE, off, len(data), data, cookie=i)
                err = c.reply()[0]
                c.request(P.CMD_READ, off, len(data), cookie=i)
                err2 = c.reply(len(data))[0]
                if err or err2:
                    failed.append((k, i, err, err2, c.message))
                i += 1
            done[k] = i
            c.close()

        threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        [t.start() for t in threads]
        ready.wait()
        nap = 0.03
        for n in range(5):
            pair.split()
            time.sleep(nap)
            job = pair.restore(protect=bool(n % 2), config=SLOW)          # every track: stays in progress
            time.sleep(nap)
            job.pause()
            time.sleep(nap)
            job.resume()
            finish(job)
            time.sleep(nap)
            if pair.state == "restored":
                job = pair.establish(config=SLOW)
                time.sleep(nap)
                finish(job)
        stop.set()
        [t.join(30) for t in threads]
        assert not failed, failed[:3]
        assert min(done) > 20, done
    pair.close()


def test_libnbd_clients_of_a_removed_pair_are_let_go_cleanly(tmp_path):
    """remove_pair under a real client with requests in flight: each is
    answered (data, or ESHUTDOWN), then the connection ends, which the
    client sees as an error, not a hang; another pair's client notices nothing."""
    nbd = nbd_util.libnbd()
    a, b = pymirror.Pair.memory(SIZE, TRACK), pymirror.Pair.memory(SIZE, TRACK)
    a.write(0, b"\xaa" * SIZE)
    b.write(0, b"\xbb" * SIZE)
    server = NBDServer(socket_path=str(tmp_path / "s"))
    # at most 4 requests carried out at once on the C loop, so that some of
    # the 16 are surely received but not started when the removal begins
    server.c_threads = 4
    with server:
        server.add_pair("a", a)
        server.add_pair("b", b)
        ha, hb = nbd.NBD(), nbd.NBD()
        ha.connect_uri(server.export_uri("a"))
        hb.connect_uri(server.export_uri("b"))
        bufs = [nbd.Buffer(1 << 20) for _ in range(16)]
        cookies = [ha.aio_pread(buf, (i % 4) << 20) for i, buf in enumerate(bufs)]
        with server._lock:
            conns = list(server._registry.get("a").clients)
        remover = threading.Thread(target=server.remove_pair, args=("a",), kwargs={"timeout": 20})
        t0 = time.monotonic()
        remover.start()
        # the client reads no reply before the removal has stopped its
        # connection (the replies fill the socket meanwhile, so nothing more
        # is started): otherwise every request could finish first
        while not all(c._stopping for c in conns) and time.monotonic() - t0 < 10:
            time.sleep(0.001)
        while ha.aio_in_flight() and time.monotonic() - t0 < 20:     # the client reads its replies
            try:
                ha.poll(1)
            except nbd.Error:
                break                                                  # the server closed the connection
        remover.join(20)
        assert not remover.is_alive() and time.monotonic() - t0 < 15   # drained, not cut off at the timeout
        outcomes = []
        for buf, ck in zip(bufs, cookies):
            try:
                done = ha.aio_command_completed(ck)
            except nbd.Error as e:
                outcomes.append(e.errnum)
                continue
            if done:
                assert buf.to_bytearray() == b"\xaa" * (1 << 20)
                outcomes.append("data")
            else:
                outcomes.append("lost with the connection")
        # every request had been received (libnbd sent them at once): each is answered
        assert set(outcomes) <= {"data", errno.ESHUTDOWN} and errno.ESHUTDOWN in outcomes, outcomes
        try:
            ha.pread(4, 0)
            raise AssertionError("the removed pair's connection still answers")
        except nbd.Error:
            pass
        assert hb.pread(4, 0) == b"\xbb" * 4
        assert server.clients("b") == 1 and server.pairs() == ["b"]
        hb.shutdown()
    a.close()
    b.close()
