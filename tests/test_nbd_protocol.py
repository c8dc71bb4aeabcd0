"""The NBD server against a hand-written client: the handshake, every
command in simple and structured replies, every way a client can break the
protocol (a good client connected at the same time must be unaffected), the
parallel request path, shutdown, and the server's own options."""
from __future__ import annotations

import errno
import importlib.util
import os
import socket
import struct
import sys
import threading
import time
from pathlib import Path

import pytest

import pymirror
import pymirror.nbd.connection as connection_module
from pymirror.nbd import NBDServer
from pymirror.nbd import protocol as P

pytestmark = pytest.mark.usefixtures("nbd_engine")     # each test on the C and the Python loop

_spec = importlib.util.spec_from_file_location("nbd_util", Path(__file__).with_name("nbd_util.py"))
nbd_util = importlib.util.module_from_spec(_spec)
sys.modules["nbd_util"] = nbd_util
_spec.loader.exec_module(nbd_util)
RawClient = nbd_util.RawClient
connect = nbd_util.connect

SIZE = 4 << 20
TRACK = 64 << 10
PATTERN = bytes(range(256)) * (SIZE // 256)


def patterned_pair():
    pair = pymirror.Pair.memory(SIZE, TRACK)
    pair.write(0, PATTERN)
    pair.establish().wait()
    pair.split()
    return pair


@pytest.fixture
def served(tmp_path):
    pair = patterned_pair()
    server = NBDServer(pair, socket_path=str(tmp_path / "nbd.sock")).start()
    yield pair, server
    server.shutdown()
    pair.close()


class SlowPair:
    """The real pair with slow host I/O (duck-typed: the server needs nothing
    else), and a record of flushes and commits."""

    def __init__(self, pair, delay):
        self._pair = pair
        self.delay = delay
        self.calls = []

    def __getattr__(self, name):
        return getattr(self._pair, name)

    def readinto(self, offset, buf):
        time.sleep(self.delay)
        self._pair.readinto(offset, buf)

    def write(self, offset, data, *, fua=False):
        time.sleep(self.delay)
        self._pair.write(offset, data, fua=fua)

    def flush(self):
        self.calls.append("flush")
        self._pair.flush()

    def commit(self):
        self.calls.append("commit")
        self._pair.commit()


# -- the handshake --------------------------------------------------------------------

def test_handshake_list_info_and_flags(served):
    pair, server = served
    c = RawClient(server.socket_path)
    assert c.greet() == P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES
    c.option(P.OPT_LIST)
    replies = c.opt_replies()
    assert replies[-1][0] == P.REP_ACK and all(r == P.REP_SERVER for r, _ in replies[:-1])
    listed = {}
    for _, data in replies[:-1]:
        (n,) = struct.unpack_from(">I", data)
        listed[data[4:4 + n].decode()] = data[4 + n:].decode()
    assert list(listed) == ["", "standard", "mirror"]
    assert "standard volume" in listed["standard"] and "split" in listed["mirror"]

    with pytest.raises(LookupError, match=str(P.REP_ERR_UNKNOWN)):
        c.go("nothing", opt=P.OPT_INFO)
    with pytest.raises(LookupError, match=str(P.REP_ERR_UNKNOWN)):
        c.go("nothing")                                    # GO on an unknown export: the client may go on
    c.option(P.OPT_INFO, struct.pack(">I", 50) + b"short")            # name length beyond the data
    assert c.opt_replies() == [(P.REP_ERR_INVALID, b"bad name length")]
    c.option(P.OPT_LIST, b"junk")
    assert c.opt_replies()[0][0] == P.REP_ERR_INVALID
    for unsupported in (P.OPT_STARTTLS, P.OPT_EXTENDED_HEADERS, 4242):
        c.option(unsupported)
        assert c.opt_replies()[0][0] == P.REP_ERR_UNSUP
    c.option(P.OPT_LIST_META_CONTEXT, struct.pack(">II", 0, 0))     # before structured replies
    assert c.opt_replies()[0][0] == P.REP_ERR_INVALID

    info = c.go("mirror", infos=(P.INFO_NAME, P.INFO_DESCRIPTION, P.INFO_BLOCK_SIZE), opt=P.OPT_INFO)
    assert info[P.INFO_NAME] == "mirror" and "writable" in info[P.INFO_DESCRIPTION]
    assert info[P.INFO_BLOCK_SIZE] == (1, TRACK, 64 << 20)           # any byte range; whole tracks preferred
    assert not info[P.INFO_EXPORT][1] & P.TFLAG_READ_ONLY              # split: the mirror is writable

    info = c.go("standard")
    size, flags = info[P.INFO_EXPORT]
    assert size == SIZE and info[P.INFO_BLOCK_SIZE] == (1, TRACK, 64 << 20)
    want = (P.TFLAG_HAS_FLAGS | P.TFLAG_SEND_FLUSH | P.TFLAG_SEND_FUA | P.TFLAG_SEND_TRIM
            | P.TFLAG_SEND_WRITE_ZEROES | P.TFLAG_CAN_MULTI_CONN)
    assert flags == want
    c.request(P.CMD_READ, 0, 4)
    assert c.reply(4) == (0, 7, PATTERN[:4])
    c.close()


def test_structured_replies_and_meta_contexts(served):
    pair, server = served
    c = RawClient(server.socket_path)
    c.greet()
    c.option(P.OPT_STRUCTURED_REPLY, b"x")
    assert c.opt_replies()[0][0] == P.REP_ERR_INVALID
    c.negotiate_structured()
    query = struct.pack(">I", 0) + struct.pack(">I", 1) + struct.pack(">I", 15) + b"base:allocation"
    for opt in (P.OPT_LIST_META_CONTEXT, P.OPT_SET_META_CONTEXT):
        c.option(opt, query)
        assert c.opt_replies() == [(P.REP_META_CONTEXT, struct.pack(">I", 1) + b"base:allocation"),
                                   (P.REP_ACK, b"")]
        c.option(opt, query[:-3])
        assert c.opt_replies()[0][0] == P.REP_ERR_INVALID
    c.option(P.OPT_SET_META_CONTEXT, struct.pack(">I", 4) + b"nope" + struct.pack(">I", 0))
    assert c.opt_replies()[0][0] == P.REP_ERR_UNKNOWN
    c.option(P.OPT_SET_META_CONTEXT, struct.pack(">II", 0, 0))        # no query: selects none
    assert c.opt_replies() == [(P.REP_ACK, b"")]
    c.go("")
    c.request(P.CMD_READ, 100, 1000, cookie=3)
    assert c.reply(1000) == (0, 3, PATTERN[100:1100])
    c.request(P.CMD_READ, 100, 0, cookie=4)                            # nothing to carry: a NONE chunk
    assert c.reply() == (0, 4, b"")
    c.request(P.CMD_READ, SIZE - 1, 2, cookie=5)
    assert c.reply(2)[:2] == (P.EINVAL, 5) and "beyond the end" in c.message
    c.request(P.CMD_WRITE, SIZE, 1, b"!", cookie=6)
    assert c.reply()[:2] == (P.ENOSPC, 6) and "beyond the end" in c.message
    c.request(P.CMD_BLOCK_STATUS, 0, 4096, cookie=8)                   # no contexts were selected
    assert c.reply()[:2] == (P.EINVAL, 8)
    c.request(P.CMD_READ, 0, 8, cookie=9)
    assert c.reply(8) == (0, 9, PATTERN[:8])


def test_export_name_with_and_without_zeroes(served):
    pair, server = served
    for cflags, tail in ((P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES, 0), (P.FLAG_C_FIXED_NEWSTYLE, 124)):
        c = RawClient(server.socket_path)
        c.greet(cflags)
        c.option(P.OPT_EXPORT_NAME, b"mirror")
        size, flags = struct.unpack(">QH", c.recv(10))
        assert size == SIZE and flags & P.TFLAG_HAS_FLAGS and not flags & P.TFLAG_READ_ONLY
        assert c.recv(tail) == bytes(tail)
        c.request(P.CMD_READ, 0, 4)
        assert c.reply(4) == (0, 7, PATTERN[:4])                      # no stray bytes before it
        c.close()


def test_bad_handshakes(served):
    pair, server = served
    c = RawClient(server.socket_path)
    c.greet()
    c.sock.sendall(struct.pack(">QII", 0x1234, P.OPT_GO, 0))        # bad option magic
    assert c.closed()
    c = RawClient(server.socket_path)
    c.recv(18)
    c.sock.sendall(struct.pack(">I", 0x80))                          # unknown client flags
    assert c.closed()
    c = RawClient(server.socket_path)
    c.greet()
    c.option(P.OPT_ABORT)
    assert c.opt_reply()[1] == P.REP_ACK
    c = RawClient(server.socket_path)
    c.greet()
    c.option(P.OPT_EXPORT_NAME, b"nope")                             # unknown: the only answer is closing
    assert c.closed()
    c = RawClient(server.socket_path)
    c.greet()
    c.sock.sendall(P.OPT_HEADER.pack(P.IHAVEOPT, P.OPT_GO, 1 << 30))  # absurd option length
    assert c.closed()
    good, _, _ = connect(server.socket_path)
    good.request(P.CMD_READ, 0, 4)
    assert good.reply(4) == (0, 7, PATTERN[:4])


def test_a_silent_client_is_dropped_after_the_handshake_timeout(served, monkeypatch):
    pair, server = served
    monkeypatch.setattr(connection_module, "HANDSHAKE_TIMEOUT", 0.3)
    c = RawClient(server.socket_path)
    c.recv(18)                                                        # then says nothing
    t0 = time.monotonic()
    assert c.closed()
    assert time.monotonic() - t0 < 5


def test_mirror_export_exists_once_established(tmp_path):
    pair = pymirror.Pair.memory(SIZE, TRACK)
    with NBDServer(pair, socket_path=str(tmp_path / "s")) as server:
        assert server.export_names() == ["", "standard"]
        c = RawClient(server.socket_path)
        c.greet()
        with pytest.raises(LookupError):
            c.go("mirror")
    pair.close()


# -- the transmission phase ------------------------------------------------------------

@pytest.mark.parametrize("structured", [False, True])
def test_read_write_flush_zeroes_trim(served, structured):
    pair, server = served
    c, _, _ = connect(server.socket_path, structured=structured)
    c.request(P.CMD_WRITE, 1000, 5, b"hello", flags=P.CMD_FLAG_FUA, cookie=1)
    assert c.reply()[:2] == (0, 1)
    c.request(P.CMD_READ, 998, 9, cookie=2)
    err, cookie, data = c.reply(9)
    assert (err, cookie) == (0, 2) and data == bytes([230, 231]) + b"hello" + bytes([237, 238])
    c.request(P.CMD_WRITE_ZEROES, 2000, 100, flags=P.CMD_FLAG_NO_HOLE | P.CMD_FLAG_FUA, cookie=3)
    assert c.reply()[0] == 0 and pair.read(2000, 100) == bytes(100)
    before = pair.read(0, 8192)
    c.request(P.CMD_TRIM, 0, 4096, flags=P.CMD_FLAG_FUA, cookie=4)
    assert c.reply()[:2] == (0, 4)
    assert pair.read(0, 8192) == bytes(4096) + before[4096:]         # trimmed bytes read as zeroes
    c.request(P.CMD_FLUSH, cookie=5)
    assert c.reply()[:2] == (0, 5)
    c.request(P.CMD_WRITE, 0, 0, cookie=6)                            # empty requests are fine
    assert c.reply()[:2] == (0, 6)
    c.request(P.CMD_READ, SIZE, 0, cookie=10)
    assert c.reply()[:2] == (0, 10)
    big = os.urandom(3 << 20)                                         # larger than the receive buffer
    c.request(P.CMD_WRITE, 12345, len(big), big, cookie=11)
    assert c.reply()[:2] == (0, 11)
    c.request(P.CMD_READ, 12345, len(big), cookie=12)
    assert c.reply(len(big)) == (0, 12, big)
    c.request(P.CMD_DISC)
    assert c.closed()
    assert pair.read(12345, len(big)) == big


@pytest.mark.parametrize("structured", [False, True])
def test_errors_keep_the_connection(served, structured):
    pair, server = served
    c, _, _ = connect(server.socket_path, structured=structured)
    before = pair.read(0, SIZE)
    cases = [
        (P.CMD_READ, SIZE - 10, 20, b"", 0, P.EINVAL),                  # past the end
        (P.CMD_READ, 2 ** 64 - 1, 1, b"", 0, P.EINVAL),                 # offset + length overflows 64 bits
        (P.CMD_WRITE, SIZE - 2, 4, b"abcd", 0, P.ENOSPC),              # the payload is consumed
        (P.CMD_WRITE_ZEROES, SIZE - 2, 4, b"", 0, P.ENOSPC),
        (P.CMD_TRIM, SIZE, 1, b"", 0, P.EINVAL),
        (P.CMD_READ, 0, (64 << 20) + 1, b"", 0, P.EINVAL),              # larger than the maximum
        (99, 0, 0, b"", 0, P.EINVAL),                                   # unknown command
        (P.CMD_CACHE, 0, 4096, b"", 0, P.EINVAL),                       # not advertised
        (P.CMD_READ, 0, 4, b"", P.CMD_FLAG_DF, P.EINVAL),               # flags not advertised
        (P.CMD_WRITE, 0, 4, b"wxyz", P.CMD_FLAG_NO_HOLE, P.EINVAL),     # NO_HOLE is for WRITE_ZEROES
        (P.CMD_WRITE_ZEROES, 0, 4, b"", P.CMD_FLAG_FAST_ZERO, P.EINVAL),
        (P.CMD_FLUSH, 0, 0, b"", 1 << 9, P.EINVAL),
    ]
    for i, (cmd, off, length, data, flags, want) in enumerate(cases):
        c.request(cmd, off, length, data, flags=flags, cookie=100 + i)
        assert c.reply()[:2] == (want, 100 + i), (cmd, off, length, flags)
        if structured:
            assert c.message                                          # a reason for a human
    c.request(P.CMD_READ, 0, 4, cookie=5)                             # still in sync
    assert c.reply(4) == (0, 5, PATTERN[:4])
    assert pair.read(0, SIZE) == before


@pytest.mark.parametrize("structured", [False, True])
def test_failing_store_errors_reach_the_client(served, structured):
    pair, server = served
    c, _, _ = connect(server.socket_path, structured=structured)
    pair.standard.inject_fault("read", 2 * TRACK, TRACK, errno.EIO)
    pair.standard.inject_fault("write", 5 * TRACK, TRACK, errno.ENOSPC)
    c.request(P.CMD_READ, 2 * TRACK + 10, 100, cookie=1)
    assert c.reply(100)[:2] == (P.EIO, 1)
    c.request(P.CMD_WRITE, 5 * TRACK, 4096, bytes(4096), cookie=2)
    assert c.reply()[:2] == (P.ENOSPC, 2)
    pair.standard.clear_faults()
    c.request(P.CMD_READ, 2 * TRACK + 10, 100, cookie=3)
    assert c.reply(100) == (0, 3, PATTERN[2 * TRACK + 10:2 * TRACK + 110])


@pytest.mark.parametrize("breakage", ["bad-magic", "huge-write", "truncated-header", "truncated-write",
                                      "vanish-mid-write"])
def test_protocol_breakage_drops_only_that_client(served, breakage):
    pair, server = served
    good, _, _ = connect(server.socket_path)
    bad, _, _ = connect(server.socket_path)
    before = pair.read(0, SIZE)
    if breakage == "bad-magic":
        bad.sock.sendall(struct.pack(">IHHQQI", 0xDEADBEEF, 0, P.CMD_READ, 1, 0, 4))
    elif breakage == "huge-write":
        bad.request(P.CMD_WRITE, 0, (64 << 20) + 1, b"x" * 100)
    elif breakage == "truncated-header":
        bad.sock.sendall(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE, 1, 0, 4)[:10])
        bad.sock.shutdown(socket.SHUT_WR)
    elif breakage == "truncated-write":
        bad.request(P.CMD_WRITE, 0, 1000, b"y" * 500)                 # half a payload, then no more
        bad.sock.shutdown(socket.SHUT_WR)
    else:
        bad.request(P.CMD_WRITE, 0, 3 << 20, b"z" * (1 << 20))        # a large write, a third sent, then gone
        time.sleep(0.1)
        bad.sock.close()
    if breakage != "vanish-mid-write":
        assert bad.closed()
    for i in range(3):
        good.request(P.CMD_READ, 0, 8, cookie=9 + i)
        assert good.reply(8) == (0, 9 + i, PATTERN[:8])
    assert pair.read(0, SIZE) == before                              # nothing half-written
    deadline = time.monotonic() + 5
    while server.connections > 1 and time.monotonic() < deadline:     # the bad one is gone
        time.sleep(0.02)
    assert server.connections == 1
    good.close()


@pytest.mark.parametrize("handoff_after", [NBDServer.handoff_after, 0.0])
def test_pipelined_requests_in_any_mode(served, handoff_after):
    """Many requests sent at once, answered in any order, each correctly;
    ``handoff_after=0`` counts every request as slow, which forces the
    parallel path (leadership passed on, several workers)."""
    pair, server = served
    server.handoff_after = handoff_after
    c, _, _ = connect(server.socket_path, structured=handoff_after == 0)
    expect = {}
    batch = bytearray()
    half = SIZE // 2
    for i in range(300):
        if i % 3 == 0:                                                # writes: the upper half, each its own range
            off, data = half + (i // 3) * 20000, os.urandom(1 + i * 211 % 19999)
            batch += P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE, i, off, len(data)) + data
            expect[i] = ("w", off, data)
        else:                                                         # reads: the lower half
            off = (i * 7919) % (half - 4096)
            batch += P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, i, off, 4096)
            expect[i] = ("r", off, None)
    sender = threading.Thread(target=c.sock.sendall, args=(bytes(batch),))
    sender.start()
    seen = set()
    for _ in expect:
        magic = c.recv(4)
        if magic == struct.pack(">I", P.SIMPLE_REPLY_MAGIC):
            err, cookie = struct.unpack(">IQ", c.recv(12))
            kind, off, _ = expect[cookie]
            data = c.recv(4096) if kind == "r" else b""
        else:
            flags, rtype, cookie, length = struct.unpack(">HHQI", c.recv(16))
            assert rtype == P.REPLY_TYPE_OFFSET_DATA and flags & P.REPLY_FLAG_DONE
            err, (off2,), data = 0, struct.unpack(">Q", c.recv(8)), c.recv(length - 8)
            kind, off, _ = expect[cookie]
            assert off2 == off
        assert err == 0 and cookie not in seen
        seen.add(cookie)
        if kind == "r":
            assert data == PATTERN[off:off + 4096]
    sender.join()
    for kind, off, data in expect.values():
        if kind == "w":
            assert pair.read(off, len(data)) == data


def test_slow_requests_run_in_parallel(tmp_path):
    """Requests that wait (for a disk, here a sleep) overlap on one connection."""
    pair = patterned_pair()
    slow = SlowPair(pair, 0.02)
    with NBDServer(slow, socket_path=str(tmp_path / "s")) as server:
        c, _, _ = connect(server.socket_path)
        n = 40
        t0 = time.monotonic()
        c.sock.sendall(b"".join(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, i, i * 4096, 4096)
                                for i in range(n)))
        for _ in range(n):
            err, cookie, data = c.reply(4096)
            assert err == 0 and data == PATTERN[cookie * 4096:(cookie + 1) * 4096]
        elapsed = time.monotonic() - t0
        assert elapsed < 0.6 * n * slow.delay, f"{elapsed:.2f} s: the requests did not overlap"
    pair.close()


def test_multi_conn_writers_then_one_flush(served):
    pair, server = served
    clients = [connect(server.socket_path)[0] for _ in range(4)]
    payloads = [os.urandom(256 << 10) for _ in clients]

    def work(i):
        c = clients[i]
        for k in range(4):
            c.request(P.CMD_WRITE, (i * 4 + k) * (256 << 10), 256 << 10, payloads[i], cookie=k)
        for _ in range(4):
            assert c.reply()[0] == 0

    ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    clients[0].request(P.CMD_FLUSH, cookie=99)                        # covers every connection's writes
    assert clients[0].reply()[:2] == (0, 99)
    for i, p in enumerate(payloads):
        for k in range(4):
            assert pair.read((i * 4 + k) * (256 << 10), 256 << 10) == p


def test_mirror_export_is_read_only_during_a_protected_restore(served):
    pair, server = served
    job = pair.restore(config=pymirror.CopyConfig(rate=1))           # stays in progress
    c, _, flags = connect(server.socket_path, "mirror")
    assert flags & P.TFLAG_READ_ONLY and not flags & (P.TFLAG_SEND_TRIM | P.TFLAG_SEND_WRITE_ZEROES)
    before = pair.mirror_read(0, SIZE)
    for i, cmd in enumerate((P.CMD_WRITE, P.CMD_WRITE_ZEROES, P.CMD_TRIM)):
        c.request(cmd, 0, 4, b"nope" if cmd == P.CMD_WRITE else b"", cookie=i)
        assert c.reply()[:2] == (P.EPERM, i)
    c.request(P.CMD_READ, 0, 4, cookie=9)
    assert c.reply(4) == (0, 9, PATTERN[:4])
    assert pair.mirror_read(0, SIZE) == before
    job.set_rate(0)
    job.wait()


def test_readonly_server(tmp_path):
    pair = patterned_pair()
    with NBDServer(pair, socket_path=str(tmp_path / "s"), readonly=True) as server:
        for name in ("", "mirror"):
            c, _, flags = connect(server.socket_path, name)
            assert flags & P.TFLAG_READ_ONLY
            c.request(P.CMD_WRITE, 0, 4, b"nope", cookie=1)
            assert c.reply()[:2] == (P.EPERM, 1)
            c.request(P.CMD_FLUSH, cookie=2)
            assert c.reply()[:2] == (0, 2)
    assert pair.read(0, SIZE) == PATTERN
    pair.close()


# -- shutdown -----------------------------------------------------------------------------

def test_shutdown_finishes_requests_in_progress_and_refuses_the_rest(tmp_path):
    pair = patterned_pair()
    slow = SlowPair(pair, 0.4)
    server = NBDServer(slow, socket_path=str(tmp_path / "s")).start()
    c, _, _ = connect(server.socket_path)
    idle, _, _ = connect(server.socket_path)
    haggling = RawClient(server.socket_path)
    haggling.greet()
    c.sock.sendall(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE, 1, 0, 5) + b"drain"
                   + P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, 2, 0, 4))
    time.sleep(0.15)                                                  # the write is being carried out
    t = threading.Thread(target=server.shutdown)
    t0 = time.monotonic()
    t.start()
    assert c.reply()[:2] == (0, 1)                                    # finished
    assert c.reply()[:2] == (P.ESHUTDOWN, 2)                          # received, not started
    assert c.closed() and idle.closed()
    try:
        haggling.option(P.OPT_LIST)
        assert haggling.opt_replies()[0][0] == P.REP_ERR_SHUTDOWN
    except ConnectionError:
        pass                                                          # or already gone: both are allowed
    t.join(10)
    assert time.monotonic() - t0 < 5
    assert not t.is_alive() and server.connections == 0
    assert pair.read(0, 5) == b"drain"
    assert slow.calls[-2:] == ["flush", "commit"]
    assert not os.path.exists(server.socket_path)
    server.shutdown()                                                 # idempotent
    pair.close()


def test_tcp_loopback(tmp_path):
    pair = patterned_pair()
    with NBDServer(pair, port=0) as server:
        host, port = server.address
        assert host == "127.0.0.1" and port > 0 and server.uri == f"nbd://127.0.0.1:{port}"
        c, size, _ = connect((host, port), structured=True)
        c.request(P.CMD_WRITE, 10, 3, b"tcp", cookie=1)
        assert c.reply()[:2] == (0, 1)
        c.request(P.CMD_READ, 8, 6, cookie=2)
        assert c.reply(6) == (0, 2, PATTERN[8:10] + b"tcp" + PATTERN[13:14])
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 5                                  # the idle connection did not hold shutdown
    assert c.closed()
    pair.close()


def test_server_options_are_checked(tmp_path):
    pair = pymirror.Pair.memory(SIZE, TRACK)
    with pytest.raises(ValueError, match="loopback"):
        NBDServer(pair, host="0.0.0.0", port=0)
    with pytest.raises(ValueError, match="loopback"):
        NBDServer(pair, host="192.0.2.1", port=10809)
    with pytest.raises(ValueError):
        NBDServer(pair)
    with pytest.raises(ValueError):
        NBDServer(pair, port=70000)
    NBDServer(pair, host="0.0.0.0", port=0, allow_remote=True)       # allowed, not started
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError):
        NBDServer(pair, socket_path=str(tmp_path / "file")).start()
    assert (tmp_path / "file").read_text() == "x"
    stale = str(tmp_path / "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(stale)                                                     # a socket file nobody listens on
    s.close()
    with NBDServer(pair, socket_path=stale) as live:
        with pytest.raises(OSError) as e:
            NBDServer(pair, socket_path=stale).start()                # somebody does now
        assert e.value.errno == errno.EADDRINUSE
        c, _, _ = connect(live.socket_path)
        c.close()
    with NBDServer(pair, host="::1", port=0) as s6:
        assert s6.uri.startswith("nbd://[::1]:")
    pair.close()


def test_connection_limit(served):
    pair, server = served
    server.max_connections = 2
    a, _, _ = connect(server.socket_path)
    b, _, _ = connect(server.socket_path)
    c = RawClient(server.socket_path)
    assert c.closed()
    a.close()
    deadline = time.monotonic() + 5
    while server.connections > 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    d, _, _ = connect(server.socket_path)
    d.request(P.CMD_READ, 0, 4)
    assert d.reply(4) == (0, 7, PATTERN[:4])


def test_replies_survive_partial_sends():
    """sendmsg may take less than offered (a signal, a timeout): the rest
    follows, in order, whatever the split."""
    import random

    class Trickle:
        def __init__(self, seed):
            self.out = bytearray()
            self.rng = random.Random(seed)

        def sendmsg(self, parts):
            data = b"".join(bytes(p) for p in parts)
            n = self.rng.randint(1, len(data))
            self.out += data[:n]
            return n

        def sendall(self, data):
            self.out += bytes(data)

    pair = pymirror.Pair.memory(SIZE, TRACK)
    for seed in range(50):
        sock = Trickle(seed)
        conn = connection_module.Connection(NBDServer(pair, port=0), sock)
        parts = [os.urandom(random.Random(seed * 7 + i).randint(1, 300)) for i in range(1 + seed % 9)]
        parts = [memoryview(p) if i % 2 else p for i, p in enumerate(parts)]
        conn._sendv(list(parts), sum(len(p) for p in parts))
        assert sock.out == b"".join(bytes(p) for p in parts)
        buf = connection_module.Buffer()
        buf.corked = True
        view = conn._read_buffer(buf, 5)
        view[:] = b"abcde"
        conn._reply(buf, b"HDR", view)
        conn._reply(buf, b"ERR")
        assert sock.out == b"".join(bytes(p) for p in parts)          # held back
        conn._flush_replies(buf)
        assert sock.out.endswith(b"HDRabcdeERR") and not buf.pending
    pair.close()
