"""TLS for the NBD server: ``tls="off"|"on"|"require"`` with x509
certificates (a directory in the layout qemu-nbd and nbdkit use:
``ca-cert.pem`` (optional), ``server-cert.pem``, ``server-key.pem``) or a
PSK file (psktool's ``username:hexkey`` lines), negotiated with
``NBD_OPT_STARTTLS``.  With ``verify_peer`` (x509 only, nbdkit's
``--tls-verify-peer``, qemu-nbd's ``verify-peer=on``) a client must present
a certificate signed by the CA of ``ca-cert.pem`` (and not revoked by
``ca-crl.pem`` if the directory has one), or its TLS handshake fails.

Python's ssl module has no PSK and cannot hand a session to C, so the
session is GnuTLS's, made in C (csrc/nbd_tls.c, GnuTLS loaded at run time):
after the STARTTLS acknowledgement the rest of the handshake reads and
writes through :class:`Session`, and the C request loop serves the
transmission phase over the same session.

* ``off``: STARTTLS is not offered (NBD_REP_ERR_UNSUP), as before.
* ``on``: a client may upgrade; plain clients are served too.
* ``require``: before STARTTLS every option but ABORT gets
  NBD_REP_ERR_TLS_REQD (and NBD_OPT_EXPORT_NAME, which cannot be refused,
  closes the connection).
"""
from __future__ import annotations

import logging
import os
import socket
import struct
from typing import Any, Optional

from .._native import check, ffi, last_error, lib
from . import protocol as P

MODES = ("off", "on", "require")
REP_ERR_TLS_REQD = (1 << 31) + 5
HANDSHAKE_MS = 30_000

log = logging.getLogger("pymirror.nbd")


class Credentials:
    """A server's TLS credentials (loaded once, at server creation)."""

    def __init__(self, mode: str = "off", certs: Optional[str] = None, psk: Optional[str] = None,
                 verify_peer: bool = False) -> None:
        if mode not in MODES:
            raise ValueError(f"tls must be one of {', '.join(MODES)}, not {mode!r}")
        self.mode = mode
        self.kind = ""
        self.verify_peer = bool(verify_peer)
        self.ptr: Any = None
        if mode == "off":
            if certs or psk:
                raise ValueError("--tls-certs/--tls-psk need --tls=on or --tls=require")
            if verify_peer:
                raise ValueError("--tls-verify-peer needs --tls=on or --tls=require with --tls-certs DIR")
            return
        if bool(certs) == bool(psk):
            raise ValueError(f"--tls={mode} needs either --tls-certs DIR (x509) or --tls-psk FILE (PSK)")
        if verify_peer and psk:
            raise ValueError("--tls-verify-peer checks x509 client certificates: it needs --tls-certs DIR, "
                             "not --tls-psk (a PSK client is already authenticated by its key)")
        out = ffi.new("pm_tls_creds **")
        if certs:
            path = os.fspath(certs)
            flags = lib.PM_TLS_VERIFY_PEER if verify_peer else 0
            check(lib.pm_tls_creds_x509(os.fsencode(path), flags, out), path)
            self.kind = "x509"
        else:
            path = os.fspath(psk)   # type: ignore[arg-type]
            check(lib.pm_tls_creds_psk(os.fsencode(path), out), path)
            self.kind = "psk"
        self.ptr = ffi.gc(out[0], lib.pm_tls_creds_free)

    @property
    def enabled(self) -> bool:
        return self.mode != "off"


class Session:
    """One connection's TLS session: what the handshake reads and writes
    once STARTTLS is acknowledged (the C loop uses ``ptr``)."""

    def __init__(self, ptr: Any, creds: Credentials) -> None:
        self.ptr = ptr
        self._creds = creds               # the session borrows them

    def sendall(self, data: Any) -> None:
        mv = memoryview(data).cast("B")
        sent = 0
        while sent < mv.nbytes:
            k = lib.pm_tls_send(self.ptr, ffi.from_buffer(mv[sent:]), mv.nbytes - sent)
            if k <= 0:
                raise P.Closed("cannot send over TLS")
            sent += k

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray(n)
        got = 0
        while got < n:
            k = lib.pm_tls_recv(self.ptr, ffi.from_buffer(buf) + got, n - got)
            if k <= 0:
                raise P.Closed("the client disconnected (TLS)")
            got += k
        return bytes(buf)

    @property
    def user(self) -> str:
        """PSK: the client's user name; x509 with verify_peer: its certificate's DN; else ""."""
        return ffi.string(lib.pm_tls_user(self.ptr)).decode("utf-8", "replace")

    def close(self) -> None:
        ptr, self.ptr = self.ptr, None
        if ptr is not None:
            lib.pm_tls_free(ptr)


def intercept(conn: Any, opt: int, data: bytes) -> bool:
    """The TLS part of option haggling, before the option's own handling:
    True when this option was answered here."""
    creds: Optional[Credentials] = getattr(conn.server, "tls_credentials", None)
    if creds is None or not creds.enabled:
        return False                        # STARTTLS falls through to "unsupported"
    if opt == P.OPT_STARTTLS:
        if conn._tls is not None:
            conn._opt(opt, P.REP_ERR_INVALID, b"TLS is already on")
        elif data:
            conn._opt(opt, P.REP_ERR_INVALID, b"STARTTLS takes no data")
        else:
            conn._opt(opt, P.REP_ACK)
            _start(conn, creds)
        return True
    if conn._tls is None and creds.mode == "require" and opt != P.OPT_ABORT:
        if opt == P.OPT_EXPORT_NAME:
            raise P.Closed("EXPORT_NAME before STARTTLS on a server that requires TLS")
        conn._opt(opt, REP_ERR_TLS_REQD, b"this server requires TLS: send NBD_OPT_STARTTLS first")
        return True
    return False


def _start(conn: Any, creds: Credentials) -> None:
    sock: socket.socket = conn.sock
    timeout = sock.gettimeout()
    sock.settimeout(None)                   # GnuTLS wants a blocking socket ...
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", int(timeout or 0), 0))
    out = ffi.new("pm_tls **")
    rc = lib.pm_tls_start(creds.ptr, sock.fileno(), HANDSHAKE_MS, out)
    if rc < 0:
        why = last_error()
        peer = (getattr(conn, "peer", None) or {}).get("peer", "?")
        log.warning("nbd: %s: %s", peer, why)
        raise P.Closed(why)
    conn._tls = Session(out[0], creds)
    user = conn._tls.user
    if isinstance(getattr(conn, "peer", None), dict):
        conn.peer["tls"] = creds.kind
        if user:
            conn.peer["tls_user"] = user          # a PSK user, or a verified certificate's DN
    # whatever was negotiated in the clear is forgotten (the protocol's rule)
    conn.structured = False


def transmission(conn: Any) -> None:
    """Before the transmission phase: no receive timeout on a TLS socket."""
    if conn._tls is not None:
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 0))


def release(conn: Any) -> None:
    tls = getattr(conn, "_tls", None)
    if tls is not None:
        tls.close()
