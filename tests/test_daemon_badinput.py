"""Bad input on the control socket: each gets a clear error reply (or, for a
line too long to frame, an error and a close), and neither the daemon nor
its other clients notice."""
from __future__ import annotations

import importlib.util
import json
import socket
import sys
import time
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("test_daemon_util", Path(__file__).with_name("test_daemon_util.py"))
U = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("test_daemon_util", U)
_spec.loader.exec_module(U)


@pytest.fixture
def running(tmp_path):
    meta = U.make_pair(tmp_path, "p", fill=b"Z")
    d = U.DaemonProc(tmp_path, nbd=False).start(meta)
    yield d
    if d.proc.poll() is None:
        assert d.stop() == 0
    assert "Traceback" not in d.log_text()


def healthy(d) -> None:
    """The daemon still answers, and the pair is as it was."""
    with d.client(timeout=10) as c:
        assert c.pair("p").query()["state"] == "new"


@pytest.mark.parametrize("line, cls, words", [
    (b"{not json", "InvalidRequest", "not valid JSON"),
    (b"\xff\xfe\x00", "InvalidRequest", "not valid JSON"),
    (b"[1, 2]", "InvalidRequest", "JSON object"),
    (b'"split"', "InvalidRequest", "JSON object"),
    (b'{"arguments": {}}', "InvalidRequest", "execute"),
    (b'{"execute": 7}', "InvalidRequest", "execute"),
    (b'{"execute": "split", "extra": 1}', "InvalidRequest", "unknown member 'extra'"),
    (b'{"execute": "frobnicate", "id": 3}', "CommandNotFound", "unknown verb 'frobnicate'"),
    (b'{"execute": "split", "arguments": [1]}', "InvalidArgument", "'arguments' must be a JSON object"),
    (b'{"execute": "split", "arguments": {}}', "InvalidArgument", "'name' is required"),
    (b'{"execute": "split", "arguments": {"name": 5}}', "InvalidArgument", "must be a string"),
    (b'{"execute": "split", "arguments": {"name": "p", "force": true}}', "InvalidArgument", "unknown argument 'force'"),
    (b'{"execute": "establish", "arguments": {"name": "p", "incremental": "yes"}}', "InvalidArgument", "true or false"),
    (b'{"execute": "establish", "arguments": {"name": "p", "rate": -5}}', "InvalidArgument", "bytes"),
    (b'{"execute": "establish", "arguments": {"name": "p", "rate": 1.5}}', "InvalidArgument", "bytes"),
    (b'{"execute": "establish", "arguments": {"name": "p", "copiers": 1000}}', "InvalidArgument", "copiers"),
    (b'{"execute": "restore", "arguments": {"name": "p", "read_policy": "psychic"}}', "InvalidArgument", "read_policy"),
    (b'{"execute": "wait", "arguments": {"name": "p", "timeout": "soon"}}', "InvalidArgument", "seconds"),
    (b'{"execute": "group-create", "arguments": {"name": "G", "pairs": "p"}}', "InvalidArgument", "list"),
    (b'{"execute": "group-create", "arguments": {"name": "a/b", "pairs": ["p"]}}', "InvalidArgument", "bad name"),
    (b'{"execute": "query", "arguments": {"name": "ghost"}}', "NoSuchPair", "ghost"),
    (b'{"execute": "attach", "arguments": {"meta": "/nonexistent/x.meta"}}', "OSError", "no such"),
    (b'{"execute": "subscribe", "arguments": {"pair": 3}}', "InvalidArgument", "string"),
])
def test_bad_requests_get_an_error_reply_and_change_nothing(running, line, cls, words):
    s, f = U.raw_control(running.control)
    try:
        reply = U.rpc(s, f, line)
        assert set(reply) == {"id", "error"}, reply
        assert reply["error"]["class"] == cls, reply
        assert words.lower() in reply["error"]["desc"].lower(), reply
        assert "\n" not in reply["error"]["desc"]
        # the same connection still works
        ok = U.rpc(s, f, b'{"execute": "query", "arguments": {"name": "p"}, "id": "after"}')
        assert ok["id"] == "after" and ok["return"]["state"] == "new"
    finally:
        s.close()
    healthy(running)


def test_ids_of_any_json_type_come_back(running):
    s, f = U.raw_control(running.control)
    for ident in (1, "x", None, [1, {"a": 2}], 2.5):
        reply = U.rpc(s, f, json.dumps({"execute": "status", "id": ident}).encode())
        assert reply["id"] == ident and "return" in reply
    s.close()


def test_a_line_over_one_mib_is_refused_and_that_client_closed(running):
    other = running.client()
    s, f = U.raw_control(running.control)
    big = b'{"execute": "status", "arguments": {"name": "' + b"x" * (1 << 20) + b'"}}\n'
    try:
        s.sendall(big)
    except (BrokenPipeError, ConnectionResetError):
        pass                    # the daemon may close before reading it all
    reply = json.loads(f.readline())
    assert reply["error"]["class"] == "InvalidRequest" and "longer than" in reply["error"]["desc"]
    assert f.readline() == b""   # closed
    s.close()
    # a line just under the limit is read and answered
    s, f = U.raw_control(running.control)
    pad = b" " * ((1 << 20) - 64)
    s.sendall(b'{"execute": "status", "id": 9' + pad + b"}\n")
    assert json.loads(f.readline())["id"] == 9
    s.close()
    assert other.pair("p").query()["state"] == "new"
    other.close()
    healthy(running)


def test_a_waiting_client_that_vanishes_frees_its_thread(running):
    with running.client() as c:
        base = c.status()["daemon"]["control_clients"]
    slow = U.make_pair(Path(running.state_dir).parent, "slow", size=16 * U.MiB, fill=b"Y")
    with running.client() as c:
        c.attach(slow)
        c.pair("slow").establish(rate=1 * U.MiB)
        c.pair("slow").pause()                   # paused by request: a wait would go on for ever
    for _ in range(5):
        s, f = U.raw_control(running.control)
        s.sendall(b'{"execute": "wait", "arguments": {"name": "slow"}, "id": 1}\n')
        time.sleep(0.1)
        f.close()
        s.close()
    with running.client() as c:
        U.wait_until(lambda: c.status()["daemon"]["control_clients"] == base, timeout=10,
                     what="the waits of departed clients to end")
        c.pair("slow").cancel()
        c.detach("slow")


def test_clients_that_vanish_mid_request(running):
    for payload in (b'{"execute": "que', b'{"execute": "status"', b'{"execute": "verify", "arguments": {"name": "p"}}\n',
                    b'{"execute": "wait", "arguments": {"name": "p", "timeout": 5}}\n'):
        s, f = U.raw_control(running.control)
        s.sendall(payload)
        s.close()
    # a client that never reads its replies, sending requests
    s, _ = U.raw_control(running.control)
    s.setblocking(False)
    try:
        for _ in range(2000):
            s.send(b'{"execute": "status"}\n')
    except BlockingIOError:
        pass
    healthy(running)
    s.close()
    time.sleep(0.2)
    healthy(running)


def test_a_hundred_idle_clients_do_not_hurt(running):
    idle = [U.raw_control(running.control) for _ in range(100)]
    half_written = idle[:50]
    for s, _ in half_written:
        s.sendall(b'{"execute": "st')          # a request left half written
    t0 = time.monotonic()
    with running.client() as c:
        for _ in range(20):
            assert c.pair("p").query()["state"] == "new"
        assert c.status()["daemon"]["control_clients"] >= 101
    assert time.monotonic() - t0 < 10           # generous: only "not stuck"
    # the idle ones still work
    s, f = idle[-1]
    assert U.rpc(s, f, b'{"execute": "find", "arguments": {"pair": "p"}, "id": 1}')["return"] == "p"
    for s, _ in idle:
        s.close()
    healthy(running)


def test_events_to_a_client_that_does_not_read_are_dropped_not_blocking(running, tmp_path):
    s, f = U.raw_control(running.control)
    assert U.rpc(s, f, b'{"execute": "subscribe", "id": 1}')["return"] == {"pairs": None}
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    with running.client() as c:
        for _ in range(30):                      # a few hundred events the subscriber never reads
            c.pair("p").verify()
        assert c.pair("p").query()["state"] == "new"
    s.close()
    healthy(running)
