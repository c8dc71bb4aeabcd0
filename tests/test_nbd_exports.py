"""Many pairs in one NBD server: export names, listing, adding and removing
pairs under connected clients, and the client events."""
from __future__ import annotations

import importlib.util
import os
import struct
import sys
import threading
import time
from pathlib import Path

import pytest

import pymirror
from pymirror.nbd import NBDServer, check_pair_name
from pymirror.nbd import protocol as P

pytestmark = pytest.mark.usefixtures("nbd_engine")     # each test on the C and the Python loop

_spec = importlib.util.spec_from_file_location("nbd_util", Path(__file__).with_name("nbd_util.py"))
nbd_util = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("nbd_util", nbd_util)
_spec.loader.exec_module(nbd_util)
RawClient = nbd_util.RawClient
connect = nbd_util.connect
list_exports = nbd_util.list_exports

SIZE = 1 << 20
TRACK = 64 << 10


def filled_pair(byte, size=SIZE, established=True):
    pair = pymirror.Pair.memory(size, TRACK)
    pair.write(0, bytes([byte]) * size)
    if established:
        pair.establish().wait()
    return pair


class Events:
    """An on_event hook that records, and lets a test wait for, events."""

    def __init__(self):
        self.seen = []
        self.cond = threading.Condition()

    def __call__(self, kind, data):
        with self.cond:
            self.seen.append((kind, dict(data)))
            self.cond.notify_all()

    def wait_for(self, kind, export, timeout=5):
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for k, d in self.seen:
                    if k == kind and d["export"] == export:
                        return d
                left = deadline - time.monotonic()
                assert left > 0, f"no {kind} event for {export!r}: {self.seen}"
                self.cond.wait(left)


@pytest.fixture
def multi(tmp_path):
    events = Events()
    server = NBDServer(socket_path=str(tmp_path / "nbd.sock"), on_event=events).start()
    pairs = {}
    yield server, pairs, events
    server.shutdown()
    for p in pairs.values():
        p.close()


def wait_until(cond, timeout=5):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# -- names --------------------------------------------------------------------------------

@pytest.mark.parametrize("name, error", [
    ("", "must not be empty"),
    ("a/b", "contains '/'"),
    ("x" * 256, "at most 255 bytes"),
    ("é" * 128, "at most 255 bytes"),        # 256 bytes of UTF-8
    ("tab\there", "control character"),
    ("nul\x00", "control character"),
    ("\udcff", "surrogate"),
])
def test_bad_pair_names_are_refused(tmp_path, name, error):
    server = NBDServer(socket_path=str(tmp_path / "s"))
    pair = pymirror.Pair.memory(SIZE, TRACK)
    with pytest.raises(ValueError, match=error):
        server.add_pair(name, pair)
    assert server.pairs() == []
    with pytest.raises(TypeError):
        check_pair_name(b"bytes")
    pair.close()


def test_name_rules_and_conflicts(multi):
    server, pairs, _ = multi
    pairs["a"] = filled_pair(1)
    server.add_pair("a", pairs["a"])
    with pytest.raises(ValueError, match="already exported"):
        server.add_pair("a", filled_pair(2, established=False))
    with pytest.raises(ValueError, match="already exported as 'a'"):
        server.add_pair("b", pairs["a"])
    assert check_pair_name("x" * 255) == "x" * 255
    legacy = NBDServer(pairs["a"], socket_path=server.socket_path + "2")
    with pytest.raises(ValueError, match="made for one pair"):
        legacy.add_pair("c", pairs["a"])
    with pytest.raises(KeyError, match="no pair named 'zzz'"):
        server.remove_pair("zzz")
    with pytest.raises(KeyError):
        server.clients("zzz")


def test_exports_of_many_pairs(multi):
    server, pairs, _ = multi
    pairs["a"] = filled_pair(0xA1)
    pairs["b"] = filled_pair(0xB2, size=2 * SIZE, established=False)     # new: no mirror export yet
    pairs["ü ñ"] = filled_pair(0xC3)
    pairs["ü ñ"].split()
    server.add_pair("a", pairs["a"])
    # one pair: "" is its standard, and INFO_NAME says which
    assert [n for n, _ in list_exports(server.socket_path)] == ["", "a", "a/mirror"]
    c = RawClient(server.socket_path)
    c.greet()
    assert c.go("", infos=(P.INFO_NAME,), opt=P.OPT_INFO)[P.INFO_NAME] == "a"
    server.add_pair("b", pairs["b"])
    server.add_pair("ü ñ", pairs["ü ñ"])
    listed = list_exports(server.socket_path)
    assert [n for n, _ in listed] == ["a", "a/mirror", "b", "ü ñ", "ü ñ/mirror"]
    desc = dict(listed)
    assert "pair a: the standard" in desc["a"] and "established, read-only" in desc["a/mirror"]
    assert "split, writable" in desc["ü ñ/mirror"]
    assert server.pairs() == ["a", "b", "ü ñ"]
    # two or more pairs: "" names none of them, and the reply says why
    with pytest.raises(LookupError, match=str(P.REP_ERR_UNKNOWN)):
        c.go("", opt=P.OPT_INFO)
    for name in ("standard", "mirror", "b/mirror", "a/", "/mirror", "a/mirror/mirror", "c"):
        with pytest.raises(LookupError, match=str(P.REP_ERR_UNKNOWN)):
            c.go(name, opt=P.OPT_INFO)
    c.option(P.OPT_INFO, struct.pack(">I", 2) + b"\xff\xfe" + struct.pack(">H", 0))   # not UTF-8
    assert c.opt_replies()[0][0] == P.REP_ERR_UNKNOWN
    c.close()
    for name, byte, size in (("a", 0xA1, SIZE), ("a/mirror", 0xA1, SIZE), ("b", 0xB2, 2 * SIZE),
                             ("ü ñ", 0xC3, SIZE), ("ü ñ/mirror", 0xC3, SIZE)):
        c, got_size, flags = connect(server.socket_path, name, structured=True)
        assert got_size == size
        c.request(P.CMD_READ, 100, 4, cookie=1)
        assert c.reply(4) == (0, 1, bytes([byte]) * 4), name
        assert bool(flags & P.TFLAG_READ_ONLY) == (name == "a/mirror")
        c.close()
    c = RawClient(server.socket_path)                    # the old EXPORT_NAME option works by name too
    c.greet()
    c.option(P.OPT_EXPORT_NAME, "ü ñ/mirror".encode())
    assert struct.unpack(">QH", c.recv(10))[0] == SIZE
    c.close()
    assert server.export_uri("ü ñ/mirror") == f"nbd+unix:///%C3%BC%20%C3%B1/mirror?socket={server.socket_path}"


def test_writes_reach_the_right_pair(multi):
    server, pairs, _ = multi
    for name in ("one", "two"):
        pairs[name] = filled_pair(0)
        pairs[name].split()
        server.add_pair(name, pairs[name])
    clients = {n: connect(server.socket_path, n)[0] for n in ("one", "two", "one/mirror", "two/mirror")}
    for i, (n, c) in enumerate(clients.items()):
        c.request(P.CMD_WRITE, 4096 * i, 5, n[:5].encode().ljust(5, b"."), cookie=i)
        assert c.reply()[:2] == (0, i)
    assert pairs["one"].read(0, 5) == b"one.." and pairs["one"].read(4096, 5) == bytes(5)
    assert pairs["two"].read(4096, 5) == b"two.." and pairs["two"].read(0, 5) == bytes(5)
    assert pairs["one"].mirror_read(8192, 5) == b"one/m" and pairs["two"].mirror_read(8192, 5) == bytes(5)
    assert pairs["two"].mirror_read(12288, 5) == b"two/m"
    assert server.clients("one") == 2 and server.clients("two") == 2


class SlowPair:
    """A pair whose host I/O takes ``delay`` seconds (duck-typed)."""

    def __init__(self, pair, delay):
        self._pair, self.delay = pair, delay

    def __getattr__(self, name):
        return getattr(self._pair, name)

    def write(self, offset, data, *, fua=False):
        time.sleep(self.delay)
        self._pair.write(offset, data, fua=fua)


def test_remove_pair_drains_its_clients_and_spares_the_others(multi):
    server, pairs, events = multi
    pairs["a"], pairs["b"] = filled_pair(0xAA), filled_pair(0xBB)
    slow = SlowPair(pairs["a"], 0.4)
    server.add_pair("a", slow)
    server.add_pair("b", pairs["b"])
    a, _, _ = connect(server.socket_path, "a")
    a_mirror, _, _ = connect(server.socket_path, "a/mirror", structured=True)
    b, _, _ = connect(server.socket_path, "b")
    haggling = RawClient(server.socket_path)           # in the handshake: it has picked no pair yet
    haggling.greet()
    assert server.clients("a") == 2 and server.clients("b") == 1
    a.sock.sendall(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE, 1, 0, 5) + b"drain"
                   + P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, 2, 0, 4))
    time.sleep(0.15)                                   # the write is being carried out
    remover = threading.Thread(target=server.remove_pair, args=("a",), kwargs={"timeout": 10})
    remover.start()
    assert a.reply()[:2] == (0, 1)                     # in flight: finished and answered
    assert a.reply()[:2] == (P.ESHUTDOWN, 2)           # received, not started: ESHUTDOWN
    assert a.closed() and a_mirror.closed()
    # meanwhile pair b's client goes on
    for i in range(5):
        b.request(P.CMD_READ, i, 4, cookie=10 + i)
        assert b.reply(4) == (0, 10 + i, b"\xbb" * 4)
    remover.join(10)
    assert not remover.is_alive()
    assert pairs["a"].read(0, 5) == b"drain"
    assert server.pairs() == ["b"]
    with pytest.raises(KeyError):
        server.clients("a")
    # new connections to a's exports are refused; the client in the handshake may pick b
    for name in ("a", "a/mirror"):
        with pytest.raises(LookupError, match=str(P.REP_ERR_UNKNOWN)):
            haggling.go(name, opt=P.OPT_INFO)
    assert haggling.go("")[P.INFO_EXPORT][0] == SIZE      # b is the only pair now: "" is b
    haggling.request(P.CMD_READ, 0, 4)
    assert haggling.reply(4) == (0, 7, b"\xbb" * 4)
    assert [n for n, _ in list_exports(server.socket_path)] == ["", "b", "b/mirror"]
    events.wait_for("client-disconnected", "a")
    events.wait_for("client-disconnected", "a/mirror")
    assert not [d for k, d in events.seen if k == "client-disconnected" and d["pair"] == "b"]
    # the name can be used again
    server.add_pair("a", pairs["a"])
    c, _, _ = connect(server.socket_path, "a")
    c.request(P.CMD_READ, 0, 5)
    assert c.reply(5) == (0, 7, b"drain")
    b.request(P.CMD_READ, 0, 4, cookie=99)
    assert b.reply(4) == (0, 99, b"\xbb" * 4)


def test_remove_pair_cuts_off_a_client_that_reads_no_replies(multi):
    server, pairs, _ = multi
    pairs["a"] = filled_pair(1)
    server.add_pair("a", pairs["a"])
    c, _, _ = connect(server.socket_path, "a")
    c.sock.setsockopt(__import__("socket").SOL_SOCKET, __import__("socket").SO_RCVBUF, 4096)
    # reads whose replies nobody takes: the server's sends block
    c.sock.sendall(b"".join(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, i, 0, 1 << 20) for i in range(64)))
    time.sleep(0.3)
    t0 = time.monotonic()
    server.remove_pair("a", timeout=0.5)
    assert time.monotonic() - t0 < 8
    assert server.pairs() == [] and server.connections == 0


# -- events ---------------------------------------------------------------------------------

def test_client_events(multi):
    server, pairs, events = multi
    pairs["p"] = filled_pair(7)
    server.add_pair("p", pairs["p"])
    c, _, _ = connect(server.socket_path, "p/mirror")
    got = events.wait_for("client-connected", "p/mirror")
    assert got["pair"] == "p" and got["pid"] == os.getpid() and got["uid"] == os.getuid()
    assert got["peer"] == f"unix pid {os.getpid()} uid {os.getuid()}"
    e = RawClient(server.socket_path)
    e.greet()
    e.option(P.OPT_EXPORT_NAME, b"")                  # "" names the one pair's standard
    e.recv(10)
    assert events.wait_for("client-connected", "p")["pair"] == "p"
    c.request(P.CMD_DISC)
    assert c.closed()
    assert events.wait_for("client-disconnected", "p/mirror")["pid"] == os.getpid()
    e.close()
    events.wait_for("client-disconnected", "p")
    listing = RawClient(server.socket_path)           # never picks an export: no events
    listing.greet()
    listing.option(P.OPT_ABORT)
    listing.opt_reply()
    time.sleep(0.1)
    assert [k for k, _ in events.seen] == ["client-connected", "client-connected",
                                           "client-disconnected", "client-disconnected"]


def test_events_over_tcp_and_a_failing_hook(tmp_path):
    pair = filled_pair(3)
    calls = []

    def hook(kind, data):
        calls.append((kind, data))
        raise RuntimeError("the hook is broken")

    with NBDServer(port=0, on_event=hook) as server:
        server.add_pair("t", pair)
        c, size, _ = connect(server.tcp_address, "t")
        c.request(P.CMD_READ, 0, 4)
        assert c.reply(4) == (0, 7, b"\x03" * 4)          # the hook's failure broke nothing
        kind, data = calls[0]
        port = c.sock.getsockname()[1]
        assert kind == "client-connected" and data["export"] == "t" and data["peer"] == f"127.0.0.1:{port}"
        c.close()
        wait_until(lambda: len(calls) == 2)
        assert calls[1][0] == "client-disconnected"
    pair.close()


def test_unix_socket_and_tcp_at_once(tmp_path):
    pair = filled_pair(5)
    with NBDServer(socket_path=str(tmp_path / "s"), port=0) as server:
        server.add_pair("x", pair)
        u, _, _ = connect(server.socket_path, "x")
        t, _, _ = connect(server.tcp_address, "x/mirror")
        for c in (u, t):
            c.request(P.CMD_READ, 0, 2)
            assert c.reply(2) == (0, 7, b"\x05\x05")
        assert server.clients("x") == 2
    assert u.closed() and t.closed()
    assert not os.path.exists(tmp_path / "s")
    pair.close()


def test_pairs_added_and_removed_while_clients_come_and_go(multi):
    """Threads connect, read and leave while pairs are added and removed:
    every reply is right or the connection was refused or drained."""
    server, pairs, _ = multi
    for i in range(4):
        pairs[f"p{i}"] = filled_pair(i)
        server.add_pair(f"p{i}", pairs[f"p{i}"])
    stop = threading.Event()
    failures = []

    def client(k):
        while not stop.is_set():
            name = f"p{k % 4}"
            try:
                c, _, _ = connect(server.socket_path, name)
            except (LookupError, ConnectionError):
                continue
            try:
                for j in range(20):
                    c.request(P.CMD_READ, j, 3, cookie=j)
                    err, cookie, data = c.reply(3)
                    if err:
                        assert err == P.ESHUTDOWN
                        break
                    assert (cookie, data) == (j, bytes([k % 4]) * 3)
            except ConnectionError:
                pass
            except AssertionError as e:
                failures.append(e)
            finally:
                c.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
    [t.start() for t in threads]
    for _ in range(6):
        server.remove_pair("p1", timeout=5)
        server.remove_pair("p2", timeout=5)
        server.add_pair("p1", pairs["p1"])
        server.add_pair("p2", pairs["p2"])
    stop.set()
    [t.join(10) for t in threads]
    assert not failures, failures[:3]
    assert server.pairs() == ["p0", "p3", "p1", "p2"]


def test_a_pair_closed_under_the_server_harms_no_other(multi):
    """The daemon closes a pair only after remove_pair, but if one is closed
    while exported, its clients get ESHUTDOWN and the others go on."""
    server, pairs, _ = multi
    pairs["live"] = filled_pair(9)
    gone = filled_pair(8)
    gone.split()
    server.add_pair("gone", gone)
    server.add_pair("live", pairs["live"])
    std, _, _ = connect(server.socket_path, "gone", structured=True)
    mirror, _, _ = connect(server.socket_path, "gone/mirror", structured=True)
    gone.close()
    for c in (std, mirror):
        c.request(P.CMD_READ, 0, 4, cookie=1)
        assert c.reply(4)[:2] == (P.ESHUTDOWN, 1)
        c.request(P.CMD_WRITE, 0, 4, b"dead", cookie=2)
        assert c.reply()[:2] == (P.ESHUTDOWN, 2)
    mirror.request(P.CMD_TRIM, 0, 4096, cookie=3)
    assert mirror.reply()[:2] == (P.EPERM, 3) and "closed" in mirror.message
    assert [n for n, _ in list_exports(server.socket_path)] == ["gone", "live", "live/mirror"]
    c = RawClient(server.socket_path)
    c.greet()
    with pytest.raises(LookupError):
        c.go("gone/mirror")
    assert c.go("live")[P.INFO_EXPORT][0] == SIZE
    server.remove_pair("gone", timeout=5)
    assert server.pairs() == ["live"]


def test_a_pair_exported_read_only(multi):
    server, pairs, _ = multi
    pairs["ro"], pairs["rw"] = filled_pair(1), filled_pair(2)
    pairs["ro"].split()
    server.add_pair("ro", pairs["ro"], readonly=True)
    server.add_pair("rw", pairs["rw"])
    for name, ro in (("ro", True), ("ro/mirror", True), ("rw", False)):
        c, _, flags = connect(server.socket_path, name)
        assert bool(flags & P.TFLAG_READ_ONLY) == ro, name
        c.request(P.CMD_WRITE, 0, 1, b"w", cookie=1)
        assert c.reply()[:2] == ((P.EPERM if ro else 0), 1)
    assert pairs["ro"].read(0, 1) == b"\x01" and pairs["ro"].mirror_read(0, 1) == b"\x01"
    assert pairs["rw"].read(0, 1) == b"w"
