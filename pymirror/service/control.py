"""The control socket: binding it safely, and one thread per client.

Binding: the socket is bound inside a fresh private directory (mode 0700)
next to its final path, chmod'ed to 0600 there, then renamed into place, so
there is no instant at which it exists with wider permissions (and no
process-wide umask change).  A socket left by a daemon that died is
replaced; one that answers is refused with the pid of the process behind it.

Clients: a thread reads each client's requests and answers them in order;
the events a client subscribed to are queued (bounded: a client that does
not read loses events, and is told so by an ``events-lost`` event, but never
slows the daemon) and written by a second thread, started on ``subscribe``.
Writes to one client are serialised by its ``_send_lock``.
"""
from __future__ import annotations

import collections
import logging
import os
import select
import socket
import stat
import struct
import tempfile
import threading
import time
from typing import Any, Callable, Deque, Optional

from .events import EventHub
from .paths import make_private_dir
from .protocol import (MAX_LINE, DaemonError, InvalidArgument, InvalidRequest, LineReader, decode, encode,
                       error_reply, event)

log = logging.getLogger("pymirror.daemon")

Dispatch = Callable[[str, dict[str, Any]], Any]
_current = threading.local()     # the connection whose request this thread is carrying out


def client_alive() -> bool:
    """False once the client whose request this thread carries out has gone
    (long waits use it to stop waiting for nobody)."""
    conn = getattr(_current, "conn", None)
    return True if conn is None else conn.alive()
QUEUE_LIMIT = 4096           # events queued per client before it starts losing them
_REQUEST_KEYS = {"execute", "arguments", "id"}


def peer_pid(sock: socket.socket) -> Optional[int]:
    try:
        pid, _uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                               struct.calcsize("3i")))
        return pid or None
    except (OSError, AttributeError):
        return None


def bind_private(path: str) -> socket.socket:
    """A listening unix socket at ``path`` with mode 0600 from its first instant."""
    parent = os.path.dirname(path) or "."
    make_private_dir(parent)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise DaemonError(f"control socket {path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(2.0)
        try:
            probe.connect(path)
        except OSError:
            log.info("replacing the stale control socket %s (no daemon answers on it)", path)
        else:
            pid = peer_pid(probe)
            who = f" (pid {pid})" if pid else ""
            raise DaemonError(f"another pymirror daemon is listening on {path}{who}; "
                              f"stop it first or give another --control path")
        finally:
            probe.close()
    tmpdir = tempfile.mkdtemp(prefix=".control.", dir=parent)
    tmp = os.path.join(tmpdir, "s")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(tmp)
        os.chmod(tmp, 0o600)
        s.listen(128)
        os.rename(tmp, path)
    except BaseException:
        s.close()
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    finally:
        os.rmdir(tmpdir)
    return s


class ControlServer:
    max_clients = 1024

    def __init__(self, path: str, dispatch: Dispatch, hub: EventHub) -> None:
        self.path = path
        self.dispatch = dispatch
        self.hub = hub
        self._listener: Optional[socket.socket] = None
        self._ino: Optional[int] = None
        self._lock = threading.Lock()
        self._conns: set[Connection] = set()
        self._stopping = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.greeting: dict[str, Any] = {}
        self.members: Callable[[str], list[str]] = lambda name: [name]

    def start(self, greeting: dict[str, Any]) -> None:
        self.greeting = greeting
        self._listener = bind_private(self.path)
        self._ino = os.stat(self.path).st_ino
        self._thread = threading.Thread(target=self._accept, name="control-accept", daemon=True)
        self._thread.start()

    @property
    def clients(self) -> int:
        with self._lock:
            return len(self._conns)

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                self._stopping.wait(0.05)    # EMFILE and the like: do not spin
                continue
            with self._lock:
                if self._stopping.is_set() or len(self._conns) >= self.max_clients:
                    sock.close()
                    continue
                conn = Connection(self, sock)
                self._conns.add(conn)
            threading.Thread(target=conn.run, name="control-client", daemon=True).start()

    def forget(self, conn: "Connection") -> None:
        with self._lock:
            self._conns.discard(conn)

    def stop(self) -> None:
        self._stopping.set()
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
        try:
            if self._ino is not None and os.stat(self.path).st_ino == self._ino:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            c.close()
        if self._thread is not None:
            self._thread.join(5)


class Connection:
    def __init__(self, server: ControlServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.pid = peer_pid(sock)
        self._send_lock = threading.Lock()
        self._cond = threading.Condition(threading.Lock())
        self._queue: Deque[dict[str, Any]] = collections.deque()
        self._lost = 0
        self._token: Optional[int] = None
        self._writer: Optional[threading.Thread] = None
        self._writing = False
        self._closed = False

    # -- sending ------------------------------------------------------------
    def send(self, msg: dict[str, Any]) -> None:
        data = encode(msg)
        with self._send_lock:
            self.sock.sendall(data)

    def _on_event(self, msg: dict[str, Any]) -> None:
        with self._cond:
            if len(self._queue) >= QUEUE_LIMIT:
                self._lost += 1
                return
            self._queue.append(msg)
            self._cond.notify_all()

    def _write_events(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._lost and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                lost, self._lost = self._lost, 0
                batch = list(self._queue)
                self._queue.clear()
                self._writing = True
            if lost:
                batch.append(event("events-lost", {"count": lost}))
            try:
                for msg in batch:
                    self.send(msg)
            except OSError:
                return
            finally:
                with self._cond:
                    self._writing = False
                    self._cond.notify_all()

    def subscribe(self, pairs: Any) -> None:
        if self._token is not None:
            self.server.hub.unsubscribe(self._token)
        self._token = self.server.hub.subscribe(self._on_event, pairs)
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_events, name="control-events", daemon=True)
            self._writer.start()

    def unsubscribe(self, drain: bool = False) -> None:
        """Stop events; with ``drain``, also wait (briefly) until those already
        queued are written, so that none follows the reply."""
        if self._token is not None:
            self.server.hub.unsubscribe(self._token)
            self._token = None
        if drain:
            with self._cond:
                deadline = time.monotonic() + 5.0
                while (self._queue or self._writing) and not self._closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)

    def alive(self) -> bool:
        """Whether the client is still there (EOF not yet seen)."""
        if self._closed:
            return False
        try:
            ready, _, _ = select.select([self.sock], [], [], 0)
            if not ready:
                return True
            return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
        except BlockingIOError:
            return True
        except (OSError, ValueError):
            return False

    # -- receiving ----------------------------------------------------------
    def run(self) -> None:
        _current.conn = self
        log.debug("control client connected (pid %s)", self.pid)
        try:
            self.send(self.server.greeting)
            reader = LineReader(self.sock, MAX_LINE)
            while True:
                try:
                    line = reader.readline()
                except InvalidRequest as exc:
                    log.warning("control client (pid %s): %s; closing it", self.pid, exc)
                    self.send({"id": None, "error": error_reply(exc)})
                    self._linger()
                    return
                if line is None:
                    return
                if line.strip():
                    self.send(self._handle(line))
        except OSError:
            pass          # the client went away, mid-request or not: nothing to answer
        finally:
            self.close()
            self.server.forget(self)
            log.debug("control client gone (pid %s)", self.pid)

    def _linger(self, seconds: float = 2.0) -> None:
        """Close gently after an error reply: stop sending, then read and drop
        what the client is still sending (for at most ``seconds``), so that
        closing with unread data does not reset the connection and destroy
        the reply before the client reads it."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
            self.sock.settimeout(seconds)
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline and self.sock.recv(1 << 16):
                pass
        except OSError:
            pass

    def _handle(self, line: bytes) -> dict[str, Any]:
        ident = None
        try:
            req = decode(line)
            ident = req.get("id")
            extra = set(req) - _REQUEST_KEYS
            if extra:
                raise InvalidRequest(f"unknown member {sorted(extra)[0]!r} in the request "
                                     f"(a request has execute, arguments and id)")
            verb = req.get("execute")
            if not isinstance(verb, str) or not verb:
                raise InvalidRequest("'execute' must name a verb (a string)")
            args = req.get("arguments", {})
            if args is None:
                args = {}
            if not isinstance(args, dict):
                raise InvalidArgument(f"'arguments' must be a JSON object, got {type(args).__name__}")
            if verb == "subscribe":
                return {"id": ident, "return": self._subscribe(args)}
            if verb == "unsubscribe":
                if args:
                    raise InvalidArgument(f"unsubscribe takes no arguments, got {sorted(args)[0]!r}")
                self.unsubscribe(drain=True)
                return {"id": ident, "return": {}}
            return {"id": ident, "return": self.server.dispatch(verb, args)}
        except Exception as exc:  # noqa: BLE001 - every failure becomes an error reply
            err = error_reply(exc)
            if err["class"] == "InternalError":
                log.exception("control request failed: %s", line[:200])
            return {"id": ident, "error": err}

    def _subscribe(self, args: dict[str, Any]) -> dict[str, Any]:
        extra = set(args) - {"pair"}
        if extra:
            raise InvalidArgument(f"subscribe: unknown argument {sorted(extra)[0]!r}")
        pair = args.get("pair")
        if pair is not None and not isinstance(pair, str):
            raise InvalidArgument("subscribe: 'pair' must be a string (a pair or group name)")
        members = self.server.members(pair) if pair is not None else None
        self.subscribe(frozenset(members) if members is not None else None)
        return {"pairs": sorted(members) if members is not None else None}

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self.unsubscribe()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
