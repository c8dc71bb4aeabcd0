"""The C request loop (csrc/nbd_loop.c, pymirror/nbd/cloop.py): chosen by
default and by ``PYMIRROR_NBD_ENGINE``; drains on stop and on a pair's
removal (requests in flight finish, those received but not started get
ESHUTDOWN); a request that waits never holds up the others; requests up to
64 MiB (nbd-tester-client's ``integrityhuge`` through libnbd); two clients
racing on the same tracks during a restore keep every invariant.

Slow requests are made with the pair's I/O barrier (``hold_io``): writes
and flushes wait at it in C, reads go on."""
from __future__ import annotations

import importlib.util
import os
import random
import sys
import threading
import time
from pathlib import Path

import pytest

import pymirror
from pymirror.nbd import NBDServer
from pymirror.nbd import cloop
from pymirror.nbd import protocol as P

_spec = importlib.util.spec_from_file_location("nbd_util", Path(__file__).with_name("nbd_util.py"))
nbd_util = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("nbd_util", nbd_util)
_spec.loader.exec_module(nbd_util)
_spec = importlib.util.spec_from_file_location("pagecache", Path(__file__).with_name("pagecache.py"))
pagecache = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("pagecache", pagecache)
_spec.loader.exec_module(pagecache)
RawClient = nbd_util.RawClient
connect = nbd_util.connect

SIZE = 4 << 20
TRACK = 64 << 10
PATTERN = bytes(range(256)) * (SIZE // 256)


def patterned_pair(size=SIZE):
    pair = pymirror.Pair.memory(size, TRACK)
    pair.write(0, (PATTERN * (size // SIZE + 1))[:size])
    pair.establish().wait()
    pair.split()
    return pair


@pytest.fixture
def counted(monkeypatch):
    """How many connections the C loop served."""
    served = []
    real = cloop.serve

    def serve(conn):
        done = real(conn)
        served.append(done)
        return done

    monkeypatch.setattr(cloop, "serve", serve)
    return served


def test_the_engine_is_c_by_default_and_python_on_request(tmp_path, monkeypatch, counted):
    pair = patterned_pair()
    monkeypatch.delenv("PYMIRROR_NBD_ENGINE", raising=False)
    for env, want in ((None, True), ("python", False), ("C", True)):
        if env is not None:
            monkeypatch.setenv("PYMIRROR_NBD_ENGINE", env)
        with NBDServer(pair, socket_path=str(tmp_path / "s")) as server:
            c, _, _ = connect(server.socket_path)
            c.request(P.CMD_READ, 10, 4, cookie=1)
            assert c.reply(4) == (0, 1, PATTERN[10:14])
            c.request(P.CMD_DISC)
            assert c.closed()
            deadline = time.monotonic() + 5
            while server.connections and time.monotonic() < deadline:
                time.sleep(0.01)
        assert counted[-1] is want, env
    with NBDServer(pair, socket_path=str(tmp_path / "s"), engine="python") as server:
        connect(server.socket_path)[0].close()
    with pytest.raises(ValueError, match="engine 'uring'"):
        NBDServer(pair, socket_path=str(tmp_path / "s"), engine="uring")
    pair.close()


def test_shutdown_drains_the_c_loop(tmp_path, counted):
    """One thread: a FLUSH waits at the barrier (in flight), the READ behind
    it is received but not started: the FLUSH finishes, the READ gets
    ESHUTDOWN, the connection closes."""
    pair = patterned_pair()
    server = NBDServer(pair, socket_path=str(tmp_path / "s"))
    server.c_threads = 1
    server.start()
    c, _, _ = connect(server.socket_path)
    idle, _, _ = connect(server.socket_path)
    with pair.hold_io():
        c.sock.sendall(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE, 1, 0, 5) + b"drain"
                       + P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, 2, 0, 4))
        time.sleep(0.2)                                      # the write waits at the barrier
        t = threading.Thread(target=server.shutdown)
        t.start()
        time.sleep(0.2)
    assert c.reply()[:2] == (0, 1)                           # in flight: finished
    assert c.reply()[:2] == (P.ESHUTDOWN, 2)                 # received, not started
    assert c.closed() and idle.closed()
    t.join(10)
    assert not t.is_alive() and server.connections == 0
    assert pair.read(0, 5) == b"drain"
    assert counted and all(counted)
    pair.close()


def test_remove_pair_drains_its_c_clients(tmp_path, counted):
    a, b = patterned_pair(), patterned_pair()
    server = NBDServer(socket_path=str(tmp_path / "s"))
    server.c_threads = 1
    server.add_pair("a", a)
    server.add_pair("b", b)
    server.start()
    ca, _, _ = connect(server.socket_path, "a", structured=True)
    cb, _, _ = connect(server.socket_path, "b")
    with a.hold_io():
        ca.sock.sendall(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_FLUSH, 1, 0, 0)
                        + P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, 2, 0, 4))
        time.sleep(0.2)
        remover = threading.Thread(target=server.remove_pair, args=("a",), kwargs={"timeout": 10})
        remover.start()
        time.sleep(0.2)
        for i in range(3):                                   # b goes on meanwhile
            cb.request(P.CMD_READ, i, 4, cookie=10 + i)
            assert cb.reply(4) == (0, 10 + i, PATTERN[i:i + 4])
    assert ca.reply()[:2] == (0, 1)
    assert ca.reply(4)[:2] == (P.ESHUTDOWN, 2) and "shutting down" in ca.message
    assert ca.closed()
    remover.join(10)
    assert server.pairs() == ["b"]
    server.shutdown()
    a.close()
    b.close()


def test_a_waiting_request_holds_up_no_other(tmp_path, counted):
    """A WRITE waits (the barrier); 30 READs sent after it are answered
    meanwhile, on the same connection; then the WRITE is."""
    pair = patterned_pair()
    with NBDServer(pair, socket_path=str(tmp_path / "s")) as server:
        c, _, _ = connect(server.socket_path)
        with pair.hold_io():
            c.request(P.CMD_WRITE, 0, 4, b"slow", cookie=1000)
            c.sock.sendall(b"".join(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, i, i * 4096 + 8, 4096)
                                    for i in range(30)))
            for _ in range(30):
                err, cookie, data = c.reply(4096)
                assert err == 0 and cookie < 30 and data == PATTERN[cookie * 4096 + 8:cookie * 4096 + 4104]
        assert c.reply()[:2] == (0, 1000)
        assert pair.read(0, 4) == b"slow"
    assert all(counted)
    pair.close()


def file_pair(tmp_path, size=SIZE):
    std, mir = tmp_path / "std.img", tmp_path / "mir.img"
    std.write_bytes(PATTERN[:size])
    mir.write_bytes(PATTERN[:size])
    pair = pymirror.Pair.create(tmp_path / "p.meta", std, mir)
    pair.establish(assume_equal=True)
    pair.split()
    return pair


def threads_now():
    return len(os.listdir("/proc/self/task"))


def voluntary_switches():
    """{thread id: voluntary context switches} of this process's threads."""
    out = {}
    for t in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{t}/status") as f:
                out[t] = next(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt_switches"))
        except (FileNotFoundError, ProcessLookupError):
            pass                                # the thread ended meanwhile
    return out


def uncached(fd, off, length):
    """Drop a clean file from the page cache until [off, off+length) is out
    (tests/pagecache.py); False if this file system keeps its pages (tmpfs)."""
    return pagecache.drop(fd, off, length)


def test_short_reads_take_the_fast_paths(tmp_path, counted):
    """nbd_loop.c, keep_receiving: a short READ of uncached data, with
    nothing else waiting, is carried out by the thread that read it, so a
    client at queue depth 1 on cold data is served by one thread (none is
    woken or started); cached reads read right.  Cold requests that overlap
    grow the pool as before, and a WRITE held at the barrier still holds up
    none of the reads sent after it."""
    pair = file_pair(tmp_path)
    fd = os.open(tmp_path / "std.img", os.O_RDONLY)
    os.fsync(fd)                              # clean pages: they can be dropped
    try:
        _short_reads_take_the_fast_paths(pair, fd, tmp_path)
    finally:                                  # a skip too: no pair left for the collector
        os.close(fd)
        pair.close()
    assert all(counted)


def _short_reads_take_the_fast_paths(pair, fd, tmp_path):
    with NBDServer(pair, socket_path=str(tmp_path / "s")) as server:
        c, _, _ = connect(server.socket_path)
        time.sleep(0.1)                       # the server's side of the handshake is over
        before = threads_now()
        rng = random.Random(1)
        for i in range(100):                  # cold, one at a time
            off = rng.randrange(SIZE // 65536) * 65536
            length = rng.choice((512, 4096, 65536))
            if not uncached(fd, off, length):
                pytest.skip("this file system keeps its pages cached: no cold read to make")
            c.request(P.CMD_READ, off, length, cookie=i)
            assert c.reply(length) == (0, i, PATTERN[off:off + length])
        assert threads_now() == before
        for i in range(200):                  # hot: the usual way
            off = rng.randrange(SIZE - 70000)
            length = rng.choice((1, 512, 4096, 65536))
            c.request(P.CMD_READ, off, length, cookie=i)
            assert c.reply(length) == (0, i, PATTERN[off:off + length])
        # a burst of 30 cold reads at once: the connection takes more threads
        uncached(fd, 0, 30 * 4096)
        c.sock.sendall(b"".join(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, i, i * 4096, 4096)
                                for i in range(30)))
        got = sorted(c.reply(4096)[:2] for _ in range(30))
        assert got == [(0, i) for i in range(30)]
        assert threads_now() > before
        # the pool has grown: cold reads one at a time still wake none of
        # the threads that wait for the receive lock (the reader keeps it)
        me = str(threading.get_native_id())
        s0 = voluntary_switches()
        for i in range(40):
            off = rng.randrange(SIZE // 65536) * 65536
            uncached(fd, off, 4096)
            c.request(P.CMD_READ, off, 4096, cookie=i)
            assert c.reply(4096) == (0, i, PATTERN[off:off + 4096])
        s1 = voluntary_switches()
        woken = sorted(s1[t] - s0[t] for t in s1 if t in s0 and t != me)
        # the reader sleeps at least once a read (on the disk); a read the
        # check left partly cached may hand the lock over once, so two
        # threads may share that; the others stay asleep (before this rule
        # each request woke one of them: 8 to 24 wake-ups each)
        assert woken[-1] >= 20 and sum(woken[:-2]) < 10, woken
        # a write waits at the barrier; reads sent one by one are answered meanwhile
        with pair.hold_io():
            c.request(P.CMD_WRITE, 0, 4, b"slow", cookie=1000)
            for i in range(10):
                uncached(fd, 8192 + i * 4096, 4096)
                c.request(P.CMD_READ, 8192 + i * 4096, 4096, cookie=i)
                assert c.reply(4096) == (0, i, PATTERN[8192 + i * 4096:12288 + i * 4096])
        assert c.reply()[:2] == (0, 1000)
        assert pair.read(0, 4) == b"slow"
        c.request(P.CMD_READ, 0, 8, cookie=5)   # the write is seen
        assert c.reply(8) == (0, 5, b"slow" + PATTERN[4:8])
        c.close()


def test_a_cold_read_beside_a_running_request_goes_to_the_pool(tmp_path, counted):
    """nbd_loop.c, keep_receiving: the reader keeps a cold read only when no
    other request is being carried out (a client at queue depth 1).  With a
    WRITE held at the barrier, cold reads sent one at a time, each with
    nothing behind it on the socket, are handed over: the threads take
    turns at the socket, so the wake-ups are shared among them (kept, one
    thread would take them all, as in test_short_reads_take_the_fast_paths).
    Every read is answered while the write waits, and right."""
    pair = file_pair(tmp_path)
    fd = os.open(tmp_path / "std.img", os.O_RDONLY)
    os.fsync(fd)
    try:
        with NBDServer(pair, socket_path=str(tmp_path / "s")) as server:
            c, _, _ = connect(server.socket_path)
            if not uncached(fd, 0, 30 * 4096):    # a cold burst: the pool grows first
                pytest.skip("this file system keeps its pages cached: no cold read to make")
            c.sock.sendall(b"".join(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, i, i * 4096, 4096)
                                    for i in range(30)))
            assert sorted(c.reply(4096)[:2] for _ in range(30)) == [(0, i) for i in range(30)]
            me = str(threading.get_native_id())
            with pair.hold_io():
                c.request(P.CMD_WRITE, 0, 4, b"slow", cookie=1000)
                time.sleep(0.05)                  # the write is at the barrier
                s0 = voluntary_switches()
                for i in range(30):
                    off = (i + 1) * 65536
                    if not uncached(fd, off, 4096):
                        pytest.skip("this file system keeps its pages cached: no cold read to make")
                    c.request(P.CMD_READ, off, 4096, cookie=i)
                    assert c.reply(4096) == (0, i, PATTERN[off:off + 4096])
                s1 = voluntary_switches()
            assert c.reply()[:2] == (0, 1000)
            woken = sorted(s1[t] - s0[t] for t in s1 if t in s0 and t != me)
            # kept, the others share fewer than 10 (the fast-path test's bound)
            assert sum(woken[:-1]) >= 20, woken
            c.close()
    finally:
        os.close(fd)
        pair.close()
    assert all(counted)


def test_hot_reads_are_served_by_the_thread_that_reads_them(tmp_path, counted):
    """nbd_loop.c, keep_receiving: a READ of at most 1 MiB whose data is all
    in the page cache is read at once (RWF_NOWAIT) by the thread holding the
    receive lock, which then reads the next request itself: a burst of hot
    reads starts no thread and wakes none (before, each request was handed
    to the pool: the burst started threads).  Reads not all cached, and
    writes, still go to the pool; every reply is right and in order of its
    cookie's data."""
    pair = file_pair(tmp_path)
    fd = os.open(tmp_path / "std.img", os.O_RDONLY)
    try:
        os.pread(fd, SIZE, 0)                     # all of it cached
        with NBDServer(pair, socket_path=str(tmp_path / "s")) as server:
            c, _, _ = connect(server.socket_path)
            time.sleep(0.1)
            before = threads_now()
            rng = random.Random(3)
            for burst in range(20):
                reqs = [(i, rng.randrange(SIZE - (1 << 20)), rng.choice((1, 512, 4096, 65536, 1 << 20)))
                        for i in range(32)]
                c.sock.sendall(b"".join(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, i, off, n)
                                        for i, off, n in reqs))
                for i, off, n in reqs:                # one thread: the replies come in order
                    assert c.reply(n) == (0, i, PATTERN[off:off + n])
            assert threads_now() == before
            # a write among them goes to the pool; reads after it see it
            c.request(P.CMD_WRITE, 4096, 4, b"new!", cookie=99)
            assert c.reply()[:2] == (0, 99)
            c.request(P.CMD_READ, 4094, 8, cookie=100)
            assert c.reply(8) == (0, 100, PATTERN[4094:4096] + b"new!" + PATTERN[4100:4102])
            c.close()
    finally:
        os.close(fd)
        pair.close()
    assert all(counted)


def test_a_pair_closed_under_a_busy_c_connection(tmp_path, counted):
    """close() waits for the requests using the pair, then the connection
    answers ESHUTDOWN without touching the freed pair."""
    pair = patterned_pair()
    with NBDServer(pair, socket_path=str(tmp_path / "s")) as server:
        stop = threading.Event()
        errors, shut = [], []

        def hammer():
            c, _, _ = connect(server.socket_path)
            i = 0
            while not stop.is_set():
                c.request(P.CMD_WRITE if i % 2 else P.CMD_READ, (i * 4096) % SIZE, 4096,
                          os.urandom(4096) if i % 2 else b"", cookie=i)
                err, cookie, _ = c.reply(0 if i % 2 else 4096)
                if cookie != i or err not in (0, P.ESHUTDOWN):
                    errors.append((i, cookie, err))
                if err == P.ESHUTDOWN:
                    shut.append(i)
                    break
                i += 1
            c.close()

        ts = [threading.Thread(target=hammer) for _ in range(3)]
        [t.start() for t in ts]
        time.sleep(0.3)
        pair.close()
        time.sleep(0.1)
        stop.set()
        [t.join(10) for t in ts]
        assert not errors and len(shut) == 3                   # each client was told, none was cut off
    assert all(counted)


def test_large_requests_integrityhuge(tmp_path):
    """What nbd-tester-client's integrityhuge does: 40 MiB writes and reads
    (several in flight), at odd offsets, checked byte for byte, with
    structured replies and without; 64 MiB is the most, and advertised."""
    nbd = nbd_util.libnbd()
    size = 160 << 20
    pair = pymirror.Pair.memory(size, TRACK)
    with NBDServer(pair, socket_path=str(tmp_path / "s")) as server:
        for structured in (True, False):
            h = nbd.NBD()
            h.set_request_structured_replies(structured)
            h.connect_uri(server.uri)
            assert h.get_block_size(nbd.SIZE_MAXIMUM) == 64 << 20
            assert h.get_structured_replies_negotiated() == structured
            rng = random.Random(structured)
            huge = 40 << 20
            blobs = {off: rng.randbytes(huge) for off in (0, 40 << 20 | 12345, size - huge)}
            for off, d in blobs.items():                    # all three in flight at once
                h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(d)), off)
            while h.aio_in_flight() > 0:
                h.poll(-1)
            for off, data in blobs.items():
                assert h.pread(huge, off) == data
            whole = h.pread(64 << 20, size - (64 << 20))
            assert whole[-huge:] == blobs[size - huge]
            with pytest.raises(nbd.Error):
                h.pread((64 << 20) + 1, 0)                   # over the advertised maximum
            h.shutdown()
        assert pair.read(size - huge, huge) == blobs[size - huge]
    pair.close()


def test_two_clients_racing_on_the_same_tracks_during_a_restore(tmp_path):
    """Two clients write interleaved 4 KiB blocks of the same tracks (each
    write merges a track not yet restored) and read them back while the
    restore copies; at the end every block holds its last write and every
    other byte the mirror's image, and establish/verify finds the two sides
    equal."""
    size = 8 << 20
    pair = pymirror.Pair.memory(size, TRACK)
    image = os.urandom(size)
    pair.write(0, image)
    pair.establish().wait()
    pair.split()
    pair.write(0, bytes(size))                               # the standard drifts from the image
    job = pair.restore(config=pymirror.CopyConfig(rate=2 << 20))
    model = bytearray(image)
    lock = threading.Lock()
    failures = []
    with NBDServer(pair, socket_path=str(tmp_path / "s")) as server:
        def client(k):
            rng = random.Random(k)
            c, _, _ = connect(server.socket_path, structured=k == 1)
            try:
                for i in range(150):
                    track = rng.randrange(size // TRACK)
                    block = rng.randrange(TRACK // 4096 // 2) * 2 + k    # client k: even or odd blocks
                    off = track * TRACK + block * 4096
                    data = rng.randbytes(4096)
                    c.request(P.CMD_WRITE, off, 4096, data, cookie=i)
                    if c.reply()[:2] != (0, i):
                        failures.append(("write", k, i))
                    with lock:
                        model[off:off + 4096] = data
                    c.request(P.CMD_READ, track * TRACK, TRACK, cookie=i)
                    err, cookie, got = c.reply(TRACK)
                    mine = got[block * 4096:(block + 1) * 4096]
                    if err or cookie != i or mine != data:
                        failures.append(("read", k, i, err))
            finally:
                c.close()

        ts = [threading.Thread(target=client, args=(k,)) for k in (0, 1)]
        [t.start() for t in ts]
        [t.join(60) for t in ts]
        assert not failures, failures[:3]
        job.set_rate(0)
        job.wait()
    assert pair.state == "restored"
    assert pair.read(0, size) == bytes(model)
    pair.establish().wait()
    assert pair.verify() == []
    pair.close()
