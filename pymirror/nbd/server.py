"""An NBD server for pairs: each pair's standard volume and its mirror, for
any NBD client.  This file holds the server's life (start, the pairs it
holds, shutdown); the phases of a connection live in their own files:

=============  ======================================================
listener.py    sockets: where it listens, the unix socket's mode and
               group, loopback-only TCP, accepting
exports.py     export names, the pairs behind them, the state rules
handshake.py   option haggling until the client picks an export
connection.py  the transmission phase: requests, the worker pool, replies
protocol.py    the protocol's numbers and packing
=============  ======================================================

Two forms, one class:

* ``NBDServer(pair, socket_path=...)``: one pair, exports ``""`` and
  ``"standard"`` (the standard volume) and ``"mirror"`` -- what ``pymirror
  serve`` and ``--socket`` on a long command use.
* ``NBDServer(socket_path=...)`` then ``add_pair(NAME, pair)``: any number of
  pairs, exports ``NAME`` and ``NAME/mirror`` (and ``""`` while exactly one
  pair is held); ``remove_pair(NAME)`` disconnects that pair's clients
  cleanly and leaves the others alone.  This is the daemon's form.

See docs/nbd.md.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from types import TracebackType
from typing import Any, Callable, Optional, Type, Union
from urllib.parse import quote

from . import cloop
from . import listener as L
from .connection import Connection
from .exports import Export, Registry, check_pair_name
from .tls import Credentials as TLSCredentials

log = logging.getLogger("pymirror.nbd")

EventHook = Callable[[str, dict[str, Any]], None]


class NBDServer:
    """Serve pairs over NBD on a unix socket and/or on TCP.

    ``start()`` binds, listens and returns; connections are handled on
    background threads until ``shutdown()``.  A unix socket gets
    ``socket_mode`` (0660) and, with ``socket_group`` (a name or a gid), that
    group, from the moment it appears.  TCP binds 127.0.0.1 unless ``host``
    is given; a non-loopback host also needs ``allow_remote`` (and without
    ``tls="require"`` a warning is logged).  ``tls``, ``tls_certs``,
    ``tls_psk`` and ``tls_verify_peer`` set up TLS (tls.py, docs/nbd.md).
    ``readonly`` exports every volume
    read-only.  ``on_event(kind, data)`` is called, from the server's
    threads, with ``"client-connected"`` / ``"client-disconnected"`` and a
    dict holding ``export``, ``pair`` and ``peer``; it must not block.
    """

    # threads per connection, started only as slow requests queue up.  More
    # threads overlap more disk waits, but every runnable thread competes for
    # the GIL and the CPUs: on 2 vCPUs, 4 served cold random reads 25% faster
    # than 16 (benchmarks/README.md).  Twice the CPUs, 4 to 16.
    max_workers = min(16, max(4, 2 * (os.cpu_count() or 1)))
    max_inflight = 64 << 20       # bytes of large requests in flight per connection
    max_connections = 128
    handoff_after = 30e-6         # a request slower than this (s) counts as waiting for the disk
    # the C request loop (cloop.py, the default engine): threads per
    # connection, started as requests overlap (benchmarks/README.md)
    c_threads = 16
    engine: Optional[str] = None  # "c" or "python"; None: $PYMIRROR_NBD_ENGINE, else "c"

    def __init__(self, pair: Any = None, *, socket_path: Optional[str] = None, host: Optional[str] = None,
                 port: Optional[int] = None, allow_remote: bool = False, readonly: bool = False,
                 socket_mode: int = 0o660, socket_group: Union[str, int, None] = None,
                 on_event: Optional[EventHook] = None, engine: Optional[str] = None,
                 tls: str = "off", tls_certs: Optional[str] = None, tls_psk: Optional[str] = None,
                 tls_verify_peer: bool = False) -> None:
        if engine is not None:
            self.engine = engine
            cloop.engine_of(self)          # a ValueError for an unknown engine
        if socket_path is None and host is None and port is None:
            raise ValueError("give a unix socket path or a TCP port to serve on")
        self.socket_mode = L.check_mode(socket_mode)
        if socket_path is None and socket_group is not None:
            raise ValueError("socket_group applies to a unix socket; give socket_path")
        self._gid = L.resolve_group(socket_group)
        self.host: Optional[str] = None
        if host is not None or port is not None:
            self.host = L.check_tcp(host, port, allow_remote)
        # TLS (tls.py): credentials loaded now, so a bad file fails here
        self.tls_credentials = TLSCredentials(tls, tls_certs, tls_psk, tls_verify_peer)
        self.tls_warning: Optional[str] = None
        if self.host is not None and not L.is_loopback(self.host) and tls != "require":
            if tls == "off":
                self.tls_warning = (f"warning: serving on {self.host} without TLS: anyone who can reach it can "
                                    "read and write the volumes in the clear (add --tls=require with --tls-certs "
                                    "or --tls-psk)")
            else:
                self.tls_warning = (f"warning: serving on {self.host} with --tls=on: clients that skip TLS are "
                                    "served in the clear, unauthenticated (use --tls=require)")
            log.warning("%s", self.tls_warning)
        self.port = port
        self.pair = pair
        self.socket_path = os.path.abspath(socket_path) if socket_path else None
        self.readonly = readonly
        self.on_event = on_event
        self._registry = Registry()
        if pair is not None:
            self._registry.set_legacy(pair, readonly)
        self._listeners: list[L.Listener] = []
        self._socket_ident: Optional[tuple[int, int]] = None
        self._started = False
        self._lock = threading.Lock()     # the registry, the connections, each entry's clients
        self._conns: set[Connection] = set()
        self._stopping = threading.Event()
        self._stopped = threading.Event()

    # -- pairs ------------------------------------------------------------------
    def add_pair(self, name: str, pair: Any, *, readonly: Optional[bool] = None) -> None:
        """Export ``pair`` as ``name`` (its standard) and ``name/mirror``,
        read-only if ``readonly`` (default: the server's ``readonly``).
        Works before or after ``start()``; a ValueError for a bad or taken name."""
        check_pair_name(name)
        with self._lock:
            if self._stopping.is_set():
                raise RuntimeError("the NBD server is shut down; start another")
            self._registry.add(name, pair, self.readonly if readonly is None else bool(readonly))
        log.info("nbd: exporting pair %s as %r and %r", name, name, name + "/mirror")

    def remove_pair(self, name: str, timeout: float = 30.0) -> None:
        """Stop exporting pair ``name``: new connections to its exports are
        refused at once; its clients' requests being carried out finish,
        those received but not started get ``ESHUTDOWN``, then the
        connections close (cut off after ``timeout`` seconds if a client does
        not read its replies).  The pair is flushed and committed, not closed.
        Other pairs' clients are not affected.  KeyError for an unknown name."""
        with self._lock:
            entry = self._registry.get(name)
            if entry.removing:
                raise ValueError(f"pair {name!r} is already being removed")
            entry.removing = True
            conns = list(entry.clients)
        try:
            self._disconnect(conns, True, timeout)
            _flush_pair(entry.pair)
        finally:
            with self._lock:
                self._registry.entries.pop(name, None)
        log.info("nbd: stopped exporting pair %s (%d client(s) disconnected)", name or "standard", len(conns))

    def pairs(self) -> list[str]:
        """The names of the pairs being exported (``[""]`` for a server made with one pair)."""
        with self._lock:
            return [e.name for e in self._registry.live()]

    def clients(self, name: str) -> int:
        """How many connections use pair ``name``'s exports now."""
        with self._lock:
            return len(self._registry.get(name).clients)

    # -- exports ----------------------------------------------------------------
    def export(self, name: str) -> Optional[Export]:
        """The export called ``name`` as a client connecting now would get it, or None."""
        with self._lock:
            return self._registry.resolve(name.encode("utf-8", "surrogateescape"))[0]

    def export_names(self) -> list[str]:
        return [e.name for e in self._listing()]

    def export_uri(self, name: str = "") -> str:
        """The NBD URI of export ``name`` (on the unix socket if there is one)."""
        path = "/" + quote(name, safe="/")
        if self.socket_path is not None:
            return f"nbd+unix://{path}?socket={self.socket_path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"nbd://{host}:{self.port}{path if name else ''}"

    def _listing(self) -> list[Export]:
        with self._lock:
            return self._registry.listing()

    def _resolve(self, raw: bytes) -> tuple[Optional[Export], str]:
        with self._lock:
            return self._registry.resolve(raw)

    def _attach(self, conn: Connection, raw: bytes) -> tuple[Optional[Export], str]:
        """Resolve the name and count ``conn`` as a client of its pair, in one
        step under the lock (so ``remove_pair`` sees every client it must stop)."""
        with self._lock:
            export, why = self._registry.resolve(raw)
            if export is None:
                return export, why
            entry = export.entry
            assert entry is not None and conn.entry is None
            entry.clients.add(conn)
            conn.entry = entry
            conn.export_name = export.name
        self._emit("client-connected", conn, export.name)
        return export, why

    def _emit(self, kind: str, conn: Connection, export_name: str) -> None:
        entry = conn.entry
        log.info("nbd: %s %s export %r", conn.peer.get("peer", "?"),
                 "connected to" if kind == "client-connected" else "disconnected from", export_name)
        hook = self.on_event
        if hook is None:
            return
        data: dict[str, Any] = {"export": export_name, "pair": entry.name if entry else None}
        data.update(conn.peer)
        try:
            hook(kind, data)
        except Exception:  # noqa: BLE001 - a failing hook must not break the connection
            log.exception("nbd: the on_event hook failed for %s", kind)

    # -- lifecycle --------------------------------------------------------------
    @property
    def uri(self) -> str:
        """The NBD URI of the default export (append an export name for others)."""
        if self.socket_path is not None:
            return f"nbd+unix:///?socket={self.socket_path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"nbd://{host}:{self.port}"

    @property
    def address(self) -> Any:
        """The socket path, or ``(host, port)`` (the port chosen once started)."""
        return self.socket_path if self.socket_path is not None else (self.host, self.port)

    @property
    def tcp_address(self) -> Optional[tuple[str, int]]:
        """``(host, port)`` when serving on TCP (the port chosen once started)."""
        return (self.host, self.port or 0) if self.host is not None else None

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._conns)

    def start(self) -> "NBDServer":
        """Bind and listen; connections are served on background threads."""
        if self._started:
            return self
        if self._stopping.is_set():
            raise RuntimeError("the NBD server is shut down; start another")
        socks: list[socket.socket] = []
        try:
            if self.socket_path is not None:
                s, self._socket_ident = L.bind_unix(self.socket_path, self.socket_mode, self._gid)
                socks.append(s)
            if self.host is not None:
                s = L.bind_tcp(self.host, self.port)
                socks.append(s)
                self.port = s.getsockname()[1]
        except BaseException:
            for s in socks:
                s.close()
            if self._socket_ident is not None and self.socket_path is not None:
                L.remove_unix(self.socket_path, self._socket_ident)
            raise
        self._started = True
        for s in socks:
            self._listeners.append(L.Listener(s, self._accepted, self._stopping))
        return self

    def serve_forever(self) -> None:
        """Serve until ``shutdown()`` (from another thread or a signal handler) completes."""
        self.start()
        self._stopped.wait()

    def _accepted(self, sock: socket.socket) -> None:
        with self._lock:
            if self._stopping.is_set() or len(self._conns) >= self.max_connections:
                sock.close()
                return
            conn = Connection(self, sock)
            self._conns.add(conn)
        conn.peer = L.peer_of(sock)
        conn.start()

    def _forget(self, conn: Connection) -> None:
        with self._lock:
            self._conns.discard(conn)
            entry = conn.entry
            if entry is not None:
                entry.clients.discard(conn)
        if entry is not None:
            self._emit("client-disconnected", conn, conn.export_name)

    def _disconnect(self, conns: list[Connection], drain: bool, timeout: float) -> None:
        for c in conns:
            c.stop()
        if not drain:
            for c in conns:
                c.abort()
        deadline = time.monotonic() + timeout
        for c in conns:
            if not c.done.wait(max(0.0, deadline - time.monotonic())):
                c.abort()     # a client that does not read its replies: cut it off
        for c in conns:
            c.done.wait(5.0)

    def shutdown(self, drain: bool = True, timeout: float = 30.0) -> None:
        """Stop accepting; let the requests being carried out finish (with
        ``drain``; requests received but not started get ``ESHUTDOWN``);
        flush and commit every pair; close every connection and the socket.
        Idempotent; the pairs stay open (their owner closes them)."""
        with self._lock:
            first = not self._stopping.is_set()
            self._stopping.set()
            conns = list(self._conns)
            pairs = [e.pair for e in self._registry.entries.values()]
        if not first:
            self._stopped.wait(timeout)
            return
        try:
            for lst in self._listeners:
                lst.close()
            self._disconnect(conns, drain, timeout)
            for lst in self._listeners:
                lst.thread.join(timeout)
            for p in pairs:
                _flush_pair(p)
            if self._socket_ident is not None and self.socket_path is not None:
                L.remove_unix(self.socket_path, self._socket_ident)
        finally:
            self._stopped.set()

    def __enter__(self) -> "NBDServer":
        return self.start()

    def __exit__(self, et: Optional[Type[BaseException]], ev: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self.shutdown()


def _flush_pair(pair: Any) -> None:
    for step in (pair.flush, pair.mirror_flush, pair.commit):
        try:
            step()
        except Exception:  # noqa: BLE001 - a closed pair, or a state without a mirror to flush
            pass


__all__ = ["NBDServer"]
