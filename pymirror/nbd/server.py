"""An NBD server for a pair: the standard volume (exports ``""`` and
``"standard"``) and the mirror (``"mirror"``), for any NBD client.

One thread per connection reads a request, carries it out (the data moves
in C with the GIL released, arbitrated against the restore per track), and
replies.  Requests of different connections run in parallel; clients open
several connections for parallelism (``CAN_MULTI_CONN`` is advertised: a
flush on any connection makes every completed write durable, with the
metadata covering it).

Handshake: fixed newstyle, with ``OPT_GO``, ``OPT_INFO``, ``OPT_EXPORT_NAME``,
``OPT_LIST`` and ``OPT_ABORT``; other options get ``NBD_REP_ERR_UNSUP`` (so
clients use simple replies).  Commands: READ, WRITE (FUA), FLUSH, TRIM (an
advisory no-op), WRITE_ZEROES (FUA), DISC.

A client that breaks the protocol (bad magic, a write larger than 32 MiB,
a truncated request) is dropped; nothing half-received is written or
acknowledged; the server and the other connections go on.
"""
from __future__ import annotations

import errno
import ipaddress
import os
import socket
import stat
import struct
import threading
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Callable, Optional, Type

from .. import errors
from . import protocol as P

_SERVER_FLAGS = P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES


class _Closed(Exception):
    """The peer went away or broke the protocol: drop the connection."""


@dataclass
class _Export:
    name: str
    description: str
    readonly: bool
    size: int
    readinto: Callable[[int, Any], None]
    write: Callable[..., None]
    write_zeroes: Callable[..., None]
    flush: Callable[[], None]


def _errno_of(exc: BaseException) -> int:
    """The NBD error for an exception raised by the pair."""
    if isinstance(exc, errors.ReadOnlyError):
        return P.EPERM
    if isinstance(exc, errors.RangeError):
        return P.EINVAL
    if isinstance(exc, MemoryError):
        return P.ENOMEM
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return P.ENOSPC
    if isinstance(exc, OSError) and exc.errno in (errno.EPERM, errno.EACCES, errno.EROFS):
        return P.EPERM
    if isinstance(exc, (errors.ClosedError, errors.StateError)):
        return P.ESHUTDOWN if isinstance(exc, errors.ClosedError) else P.EIO
    return P.EIO


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class NBDServer:
    """Serve ``pair`` over NBD on a unix socket (default) or TCP.

    ``start()`` binds and listens and returns; connections are handled on
    background threads until ``shutdown()``.  TCP binds only loopback
    addresses unless ``allow_remote`` is given.
    """

    def __init__(self, pair: Any, *, socket_path: Optional[str] = None, host: Optional[str] = None,
                 port: Optional[int] = None, allow_remote: bool = False, readonly: bool = False) -> None:
        if socket_path is None and host is None and port is None:
            raise ValueError("give a unix socket path or a TCP port to serve on")
        if socket_path is not None and (host is not None or port is not None):
            raise ValueError("serve on a unix socket or on TCP, not both")
        if socket_path is None:
            host = host or "127.0.0.1"
            if not allow_remote and not _is_loopback(host):
                raise ValueError(f"refusing to serve on {host}, which is not a loopback address: "
                                 "pass allow_remote (CLI: --allow-remote) to expose the volume to the network")
        self.pair = pair
        self.socket_path = os.path.abspath(socket_path) if socket_path else None
        self.host, self.port = host, port
        self.readonly = readonly
        self._listener: Optional[socket.socket] = None
        self._accept_thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self._conns: set["_Connection"] = set()
        self._stopping = threading.Event()
        self._owns_socket_file = False

    # -- exports --------------------------------------------------------------
    def export(self, name: str) -> Optional[_Export]:
        p = self.pair
        if name in ("", "standard"):
            return _Export("standard", "the standard volume", self.readonly, p.size,
                           p.readinto, p.write, p.write_zeroes, p.flush)
        if name == "mirror" and p.state not in ("new", "syncing"):
            return _Export("mirror", f"the mirror ({p.state})", self.readonly or not p.mirror_writable,
                           p.size, p.mirror_readinto, p.mirror_write, p.mirror_write_zeroes, p.mirror_flush)
        return None

    def export_names(self) -> list[str]:
        return [n for n in ("", "standard", "mirror") if self.export(n) is not None]

    # -- lifecycle ------------------------------------------------------------
    @property
    def uri(self) -> str:
        if self.socket_path is not None:
            return f"nbd+unix:///?socket={self.socket_path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"nbd://{host}:{self.port}"

    @property
    def address(self) -> Any:
        return self.socket_path if self.socket_path is not None else (self.host, self.port)

    def _bind_unix(self) -> socket.socket:
        path = self.socket_path
        assert path is not None
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise FileExistsError(errno.EEXIST, "exists and is not a socket; refusing to replace it", path)
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)   # stale: nothing listens on it
            else:
                raise OSError(errno.EADDRINUSE, "another server is listening on this socket", path)
            finally:
                probe.close()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(path)
        self._owns_socket_file = True
        return s

    def start(self) -> "NBDServer":
        if self.socket_path is not None:
            s = self._bind_unix()
        else:
            family = socket.AF_INET6 if self.host and ":" in self.host else socket.AF_INET
            s = socket.socket(family, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((self.host, self.port or 0))
            self.port = s.getsockname()[1]
        s.listen(64)
        self._listener = s
        self._accept_thread = threading.Thread(target=self._accept_loop, name="nbd-accept", daemon=True)
        self._accept_thread.start()
        return self

    def serve_forever(self) -> None:
        if self._listener is None:
            self.start()
        self._stopping.wait()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                continue
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Connection(self, sock)
            with self._lock:
                if self._stopping.is_set():
                    sock.close()
                    return
                self._conns.add(conn)
            conn.thread.start()

    def _forget(self, conn: "_Connection") -> None:
        with self._lock:
            self._conns.discard(conn)

    def shutdown(self, drain: bool = True, timeout: float = 30.0) -> None:
        """Stop accepting, let requests in flight finish (``drain``), flush
        and commit, and close every connection."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            c.stop(drain)
        for c in conns:
            c.thread.join(timeout)
        if self._accept_thread is not None:
            self._accept_thread.join(timeout)
        try:
            self.pair.flush()
            self.pair.commit()
        except Exception:  # a closed or failing pair: nothing more to save here
            pass
        if self._owns_socket_file and self.socket_path is not None:
            try:
                os.unlink(self.socket_path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> "NBDServer":
        if self._listener is None:
            self.start()
        return self

    def __exit__(self, et: Optional[Type[BaseException]], ev: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self.shutdown()


class _Connection:
    def __init__(self, server: NBDServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.thread = threading.Thread(target=self._run, name="nbd-conn", daemon=True)
        self._busy = threading.Lock()     # held while a request is carried out
        self._stop = False

    # -- socket helpers ---------------------------------------------------------
    def _recv_exact(self, n: int, into: Optional[memoryview] = None) -> memoryview:
        buf = into if into is not None else memoryview(bytearray(n))
        got = 0
        while got < n:
            k = self.sock.recv_into(buf[got:], n - got)
            if k == 0:
                raise _Closed("the client disconnected")
            got += k
        return buf

    def _send(self, *parts: Any) -> None:
        try:
            if len(parts) == 1:
                self.sock.sendall(parts[0])
                return
            total = sum(memoryview(p).nbytes for p in parts)
            sent = self.sock.sendmsg(parts)
            if sent < total:    # rare: finish with sendall on the remainder
                joined = memoryview(b"".join(bytes(p) for p in parts))
                self.sock.sendall(joined[sent:])
        except OSError as exc:
            raise _Closed(f"cannot send: {exc}") from None

    def stop(self, drain: bool) -> None:
        self._stop = True
        try:
            # wakes a recv waiting for the next request; a request being
            # carried out finishes first (it holds _busy) when draining
            self.sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass
        if drain:
            with self._busy:
                pass

    # -- the connection ---------------------------------------------------------
    def _run(self) -> None:
        try:
            export = self._handshake()
            if export is not None:
                self._transmission(export)
        except (_Closed, OSError):
            pass
        finally:
            try:
                self.sock.close()
            finally:
                self.server._forget(self)

    def _handshake(self) -> Optional[_Export]:
        self._send(struct.pack(">QQH", P.NBDMAGIC, P.IHAVEOPT, _SERVER_FLAGS))
        (cflags,) = struct.unpack(">I", self._recv_exact(4))
        if cflags & ~(P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES):
            raise _Closed("unknown client flags")
        no_zeroes = bool(cflags & P.FLAG_C_NO_ZEROES)
        while True:
            magic, opt, length = P.OPT_HEADER.unpack(self._recv_exact(P.OPT_HEADER.size))
            if magic != P.IHAVEOPT:
                raise _Closed("bad option magic")
            if length > 64 << 10:
                raise _Closed("option data too long")
            data = bytes(self._recv_exact(length)) if length else b""
            if opt == P.OPT_EXPORT_NAME:
                export = self.server.export(data.decode("utf-8", "replace"))
                if export is None:
                    raise _Closed("unknown export")   # the protocol's only answer here
                tail = b"" if no_zeroes else bytes(124)
                self._send(struct.pack(">QH", export.size, self._tflags(export)) + tail)
                return export
            if opt == P.OPT_ABORT:
                self._send(P.opt_reply(opt, P.REP_ACK))
                return None
            if opt == P.OPT_LIST:
                if data:
                    self._send(P.opt_reply(opt, P.REP_ERR_INVALID, b"LIST takes no data"))
                    continue
                for name in self.server.export_names():
                    raw = name.encode()
                    self._send(P.opt_reply(opt, P.REP_SERVER, struct.pack(">I", len(raw)) + raw))
                self._send(P.opt_reply(opt, P.REP_ACK))
                continue
            if opt in (P.OPT_INFO, P.OPT_GO):
                export = self._info(opt, data)
                if export is not None and opt == P.OPT_GO:
                    return export
                continue
            self._send(P.opt_reply(opt, P.REP_ERR_UNSUP, b"option not supported"))

    def _tflags(self, export: _Export) -> int:
        f = (P.TFLAG_HAS_FLAGS | P.TFLAG_SEND_FLUSH | P.TFLAG_SEND_FUA | P.TFLAG_CAN_MULTI_CONN)
        if export.readonly:
            f |= P.TFLAG_READ_ONLY
        else:
            f |= P.TFLAG_SEND_TRIM | P.TFLAG_SEND_WRITE_ZEROES
        return f

    def _info(self, opt: int, data: bytes) -> Optional[_Export]:
        if len(data) < 6:
            self._send(P.opt_reply(opt, P.REP_ERR_INVALID, b"short INFO/GO request"))
            return None
        (nlen,) = struct.unpack_from(">I", data)
        if 4 + nlen + 2 > len(data):
            self._send(P.opt_reply(opt, P.REP_ERR_INVALID, b"bad name length"))
            return None
        name = data[4:4 + nlen].decode("utf-8", "replace")
        (nreq,) = struct.unpack_from(">H", data, 4 + nlen)
        if 4 + nlen + 2 + 2 * nreq != len(data):
            self._send(P.opt_reply(opt, P.REP_ERR_INVALID, b"bad information request count"))
            return None
        requests = set(struct.unpack_from(f">{nreq}H", data, 4 + nlen + 2))
        export = self.server.export(name)
        if export is None:
            self._send(P.opt_reply(opt, P.REP_ERR_UNKNOWN, f"no export named {name!r}".encode()))
            return None
        self._send(P.opt_reply(opt, P.REP_INFO, struct.pack(">HQH", P.INFO_EXPORT, export.size,
                                                            self._tflags(export))))
        if P.INFO_NAME in requests:
            self._send(P.opt_reply(opt, P.REP_INFO, struct.pack(">H", P.INFO_NAME) + export.name.encode()))
        if P.INFO_DESCRIPTION in requests:
            self._send(P.opt_reply(opt, P.REP_INFO, struct.pack(">H", P.INFO_DESCRIPTION)
                                   + export.description.encode()))
        # Always state block sizes: any byte range works (minimum 1), whole
        # tracks are best (no merge during a restore), 32 MiB at most.
        preferred = max(4096, min(int(getattr(self.server.pair, "track_size", 4096)), 1 << 20))
        self._send(P.opt_reply(opt, P.REP_INFO, struct.pack(">HIII", P.INFO_BLOCK_SIZE, 1, preferred,
                                                            P.MAX_REQUEST)))
        self._send(P.opt_reply(opt, P.REP_ACK))
        return export

    def _reply(self, cookie: int, error: int, data: Any = None) -> None:
        header = P.SIMPLE_REPLY.pack(P.SIMPLE_REPLY_MAGIC, error, cookie)
        if data is None:
            self._send(header)
        else:
            self._send(header, data)

    def _transmission(self, export: _Export) -> None:
        header = memoryview(bytearray(P.REQUEST.size))
        size = export.size
        while not self._stop:
            try:
                self._recv_exact(P.REQUEST.size, header)
            except _Closed:
                return
            magic, flags, cmd, cookie, offset, length = P.REQUEST.unpack(header)
            if magic != P.REQUEST_MAGIC:
                raise _Closed("bad request magic")
            in_range = offset + length <= size
            fua = bool(flags & P.CMD_FLAG_FUA)
            if cmd == P.CMD_WRITE:
                if length > P.MAX_REQUEST:
                    raise _Closed("write larger than the maximum")   # payload cannot be skipped safely
                payload = self._recv_exact(length)                   # whole, before anything is written
                with self._busy:
                    if export.readonly:
                        self._reply(cookie, P.EPERM)
                    elif not in_range:
                        self._reply(cookie, P.ENOSPC)
                    else:
                        self._call(cookie, export.write, offset, payload, fua=fua)
            elif cmd == P.CMD_READ:
                with self._busy:
                    if length > P.MAX_REQUEST:
                        self._reply(cookie, P.EINVAL)
                    elif not in_range:
                        self._reply(cookie, P.EINVAL)
                    else:
                        buf = bytearray(length)
                        try:
                            export.readinto(offset, buf)
                        except Exception as exc:  # noqa: BLE001 - mapped to an NBD error
                            self._reply(cookie, _errno_of(exc))
                        else:
                            self._reply(cookie, 0, buf)
            elif cmd == P.CMD_FLUSH:
                with self._busy:
                    self._call(cookie, export.flush)
            elif cmd == P.CMD_WRITE_ZEROES:
                with self._busy:
                    if export.readonly:
                        self._reply(cookie, P.EPERM)
                    elif not in_range:
                        self._reply(cookie, P.ENOSPC)
                    else:
                        self._call(cookie, export.write_zeroes, offset, length, fua=fua)
            elif cmd == P.CMD_TRIM:
                with self._busy:
                    # advisory: the bytes stay as they are, which the protocol allows
                    if export.readonly:
                        self._reply(cookie, P.EPERM)
                    elif not in_range:
                        self._reply(cookie, P.EINVAL)
                    elif fua:
                        self._call(cookie, export.flush)
                    else:
                        self._reply(cookie, 0)
            elif cmd == P.CMD_DISC:
                return
            else:
                with self._busy:
                    self._reply(cookie, P.EINVAL)

    def _call(self, cookie: int, fn: Callable[..., None], *args: Any, **kw: Any) -> None:
        try:
            fn(*args, **kw)
        except Exception as exc:  # noqa: BLE001 - every failure becomes an NBD error
            self._reply(cookie, _errno_of(exc))
        else:
            self._reply(cookie, 0)
