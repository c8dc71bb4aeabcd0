"""The NBD server against a hand-written client: the handshake, every
command, and every way a client can break the protocol.  A good client
connected at the same time must be unaffected."""
from __future__ import annotations

import importlib.util
import struct
import sys
from pathlib import Path

import pytest

import pymirror
from pymirror.nbd import NBDServer
from pymirror.nbd import protocol as P

_spec = importlib.util.spec_from_file_location("nbd_util", Path(__file__).with_name("nbd_util.py"))
nbd_util = importlib.util.module_from_spec(_spec)
sys.modules["nbd_util"] = nbd_util
_spec.loader.exec_module(nbd_util)
RawClient = nbd_util.RawClient

SIZE = 4 << 20
TRACK = 64 << 10


@pytest.fixture
def served(tmp_path):
    pair = pymirror.Pair.memory(SIZE, TRACK)
    pair.write(0, bytes(range(256)) * (SIZE // 256))
    pair.establish().wait()
    pair.split()
    server = NBDServer(pair, socket_path=str(tmp_path / "nbd.sock")).start()
    yield pair, server
    server.shutdown()
    pair.close()


def connect(server, name=""):
    c = RawClient(server.socket_path)
    c.greet()
    size, flags = c.go(name)
    return c, size, flags


def test_handshake_list_info_and_flags(served):
    pair, server = served
    c = RawClient(server.socket_path)
    assert c.greet() == P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES
    c.option(P.OPT_LIST)
    names = []
    while True:
        _, rtype, data = c.opt_reply()
        if rtype == P.REP_ACK:
            break
        assert rtype == P.REP_SERVER
        names.append(data[4:4 + struct.unpack_from(">I", data)[0]].decode())
    assert names == ["", "standard", "mirror"]
    c.option(P.OPT_STRUCTURED_REPLY)
    assert c.opt_reply()[1] == P.REP_ERR_UNSUP
    c.option(P.OPT_INFO, struct.pack(">I", 7) + b"nothing" + struct.pack(">H", 0))
    assert c.opt_reply()[1] == P.REP_ERR_UNKNOWN
    c.option(P.OPT_INFO, struct.pack(">I", 50) + b"short")   # name length beyond the data
    assert c.opt_reply()[1] == P.REP_ERR_INVALID
    size, flags = c.go("standard")
    assert size == SIZE
    assert flags & P.TFLAG_CAN_MULTI_CONN and flags & P.TFLAG_SEND_FUA and not flags & P.TFLAG_READ_ONLY
    c.close()


def test_read_write_flush_zeroes_trim(served):
    pair, server = served
    c, _, _ = connect(server)
    c.request(P.CMD_WRITE, 1000, 5, b"hello", flags=P.CMD_FLAG_FUA, cookie=1)
    assert c.reply()[:2] == (0, 1)
    c.request(P.CMD_READ, 998, 9, cookie=2)
    err, cookie, data = c.reply(9)
    assert (err, cookie) == (0, 2) and data == bytes([230, 231]) + b"hello" + bytes([237, 238])
    c.request(P.CMD_WRITE_ZEROES, 2000, 100, cookie=3)
    assert c.reply()[0] == 0 and pair.read(2000, 100) == bytes(100)
    c.request(P.CMD_TRIM, 0, 4096, cookie=4)
    assert c.reply()[0] == 0
    c.request(P.CMD_FLUSH, cookie=5)
    assert c.reply()[0] == 0
    c.request(P.CMD_DISC)
    assert c.closed()


def test_errors_keep_the_connection(served):
    pair, server = served
    c, _, _ = connect(server)
    before = pair.read(0, SIZE)
    c.request(P.CMD_READ, SIZE - 10, 20, cookie=1)
    assert c.reply() [:2] == (P.EINVAL, 1)
    c.request(P.CMD_WRITE, SIZE - 2, 4, b"abcd", cookie=2)          # payload is consumed
    assert c.reply()[:2] == (P.ENOSPC, 2)
    c.request(P.CMD_READ, 0, (32 << 20) + 1, cookie=3)
    assert c.reply()[:2] == (P.EINVAL, 3)
    c.request(99, cookie=4)
    assert c.reply()[:2] == (P.EINVAL, 4)
    c.request(P.CMD_READ, 0, 4, cookie=5)                             # still in sync
    assert c.reply(4) == (0, 5, bytes(range(4)))
    assert pair.read(0, SIZE) == before


@pytest.mark.parametrize("breakage", ["bad-magic", "huge-write", "truncated-header", "truncated-write"])
def test_protocol_breakage_drops_only_that_client(served, breakage):
    pair, server = served
    good, _, _ = connect(server)
    bad, _, _ = connect(server)
    before = pair.read(0, SIZE)
    if breakage == "bad-magic":
        bad.sock.sendall(struct.pack(">IHHQQI", 0xDEADBEEF, 0, P.CMD_READ, 1, 0, 4))
    elif breakage == "huge-write":
        bad.request(P.CMD_WRITE, 0, 64 << 20, b"x" * 100)
    elif breakage == "truncated-header":
        bad.sock.sendall(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE, 1, 0, 4)[:10])
        bad.sock.shutdown(1)
    else:
        bad.request(P.CMD_WRITE, 0, 1000, b"y" * 500)                 # half a payload, then gone
        bad.sock.shutdown(1)
    assert bad.closed()
    good.request(P.CMD_READ, 0, 8, cookie=9)
    assert good.reply(8) == (0, 9, bytes(range(8)))
    assert pair.read(0, SIZE) == before                              # nothing half-written
    good.close()


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
    c.option(P.OPT_EXPORT_NAME, b"mirror")
    size, flags = struct.unpack(">QH", c.recv(10))
    assert size == SIZE and not flags & P.TFLAG_READ_ONLY            # split: the mirror is writable


def test_mirror_export_is_read_only_during_a_protected_restore(served):
    pair, server = served
    job = pair.restore(config=pymirror.CopyConfig(rate=1))           # stays in progress
    c, _, flags = connect(server, "mirror")
    assert flags & P.TFLAG_READ_ONLY
    c.request(P.CMD_WRITE, 0, 4, b"nope", cookie=1)
    assert c.reply()[:2] == (P.EPERM, 1)
    c.request(P.CMD_READ, 0, 4, cookie=2)
    assert c.reply(4) == (0, 2, bytes(range(4)))
    job.set_rate(0)
    job.wait()


def test_server_options_are_checked(tmp_path):
    pair = pymirror.Pair.memory(SIZE, TRACK)
    with pytest.raises(ValueError, match="loopback"):
        NBDServer(pair, host="0.0.0.0", port=0)
    with pytest.raises(ValueError):
        NBDServer(pair)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError):
        NBDServer(pair, socket_path=str(tmp_path / "file")).start()
    with NBDServer(pair, host="127.0.0.1", port=0) as s:
        assert s.uri.startswith("nbd://127.0.0.1:")
    pair.close()
