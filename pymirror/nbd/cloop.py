"""The transmission phase in C (csrc/nbd_loop.c): once the Python handshake
has chosen an export, the connection's socket, the pair and what was
negotiated go to C, which reads requests, carries them out on the pair and
replies with no Python and no GIL per request.

The C loop is the default.  ``PYMIRROR_NBD_ENGINE=python`` (or
``NBDServer(engine="python")``) keeps the Python loop of connection.py,
which is also used for an export whose pair is not a :class:`pymirror.Pair`
(a test's duck-typed wrapper: C can only call a real pair).

Lifetime.  The C connection holds the pair's C pointer while it runs, not a
counted call: ``Pair.close()`` calls this connection's closing hook first,
which waits for the requests using the pair and makes later ones answer
``ESHUTDOWN`` (as the Python loop does for a closed pair).  ``stop`` and
``abort`` from other threads and the final free are serialised by a lock,
so neither touches a freed connection.
"""
from __future__ import annotations

import os
import threading
from typing import Any, Optional

from .._handle import _OPEN
from .._native import check, ffi, lib

ENGINES = ("c", "python")


def engine_of(server: Any) -> str:
    """The engine a server uses: its ``engine`` if set, else
    ``$PYMIRROR_NBD_ENGINE``, else ``"c"``."""
    name = getattr(server, "engine", None) or os.environ.get("PYMIRROR_NBD_ENGINE", "") or "c"
    name = name.lower()
    if name not in ENGINES:
        raise ValueError(f"NBD engine {name!r} is not one of {', '.join(ENGINES)}")
    return name


def _real_pair(pair: Any) -> bool:
    from ..pair import Pair
    return type(pair) is Pair or isinstance(pair, Pair)


class CConnection:
    """The C side of one connection (created and run by ``serve``)."""

    def __init__(self) -> None:
        self.ptr: Any = None
        self.lock = threading.Lock()       # ptr's users versus its free

    def call(self, fn: Any) -> None:
        with self.lock:
            if self.ptr is not None:
                fn(self.ptr)


def serve(conn: Any) -> bool:
    """Run ``conn``'s transmission phase in C until it ends.  False (nothing
    done) when this connection must use the Python loop."""
    ex = conn.export
    entry = ex.entry
    pair = entry.pair if entry is not None else None
    tls = getattr(conn, "_tls", None)
    if pair is None or not _real_pair(pair):
        # only the C loop speaks TLS: a wrapped pair over TLS cannot be served
        return tls is not None
    if tls is None and engine_of(conn.server) != "c":
        return False
    flags = (lib.PM_NBD_STRUCTURED if conn.structured else 0) | (lib.PM_NBD_READONLY if ex.readonly else 0)
    side = lib.PM_STANDARD if ex.side == "standard" else lib.PM_MIRROR
    threads = max(1, min(64, int(getattr(conn.server, "c_threads", 16))))
    cc = CConnection()
    out = ffi.new("pm_nbd_conn **")
    key = id(conn)
    with pair._lock:
        if pair._state != _OPEN or pair._cptr is None:       # closing or closed: the Python loop answers ESHUTDOWN
            return False
        rc = lib.pm_nbd_conn_new(conn.sock.fileno(), pair._cptr, side, flags,
                                  ex.name.encode("utf-8", "surrogateescape"), threads,
                                 tls.ptr if tls is not None else ffi.NULL, out)
        if rc < 0:                      # no memory: the Python loop can still try
            return False
        cc.ptr = out[0]
        pair.__dict__.setdefault("_closing_hooks", {})[key] = lambda: cc.call(lib.pm_nbd_conn_detach)
    # the meta contexts selected at handshake (SET_META_CONTEXT: id -> name)
    contexts = {name: cid for cid, name in (getattr(conn, "meta_contexts", None) or {}).items()}
    if contexts and conn.structured:
        check(lib.pm_nbd_conn_set_contexts(cc.ptr, contexts.get("base:allocation", -1),
                                           contexts.get("pymirror:pending", -1)))
    conn._cloop = cc
    if conn._stopping:                       # stop() came before _cloop was visible to it
        cc.call(lib.pm_nbd_conn_stop)
    try:
        lib.pm_nbd_conn_run(cc.ptr)          # the GIL is released for the whole connection
    finally:
        with pair._lock:
            pair.__dict__.get("_closing_hooks", {}).pop(key, None)
        with cc.lock:
            ptr, cc.ptr = cc.ptr, None
            conn.c_requests = int(lib.pm_nbd_conn_requests(ptr))
            lib.pm_nbd_conn_free(ptr)
    return True


def stop(conn: Any) -> None:
    cc: Optional[CConnection] = getattr(conn, "_cloop", None)
    if cc is not None:
        cc.call(lib.pm_nbd_conn_stop)


def abort(conn: Any) -> None:
    cc: Optional[CConnection] = getattr(conn, "_cloop", None)
    if cc is not None:
        cc.call(lib.pm_nbd_conn_abort)
