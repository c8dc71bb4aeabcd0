"""An NBD server for a pair: the standard volume (exports ``""`` and
``"standard"``) and the mirror (``"mirror"``), for any NBD client.

Design
------
The data moves in C (``Pair.readinto``/``write``: one crossing, the GIL
released, arbitrated against the restore per track); Python parses requests
and sends replies.  The cost that matters is therefore per request, and the
two workloads pull in opposite directions:

* one request at a time (qd 1), or requests served from the page cache: the
  fastest server is one thread that reads a request, carries it out and
  replies, with no hand-off between threads (a hand-off costs a futex wake
  and a GIL transfer, several times the cost of a cached 4 KiB read);
* many requests in flight that wait for the disk (a cold qd 32 workload, a
  FLUSH): the requests must run in parallel, or the connection is as slow as
  one disk request at a time.

So each connection runs a small *leader/follower* pool.  The thread holding
``_recv_lock`` is the leader: it reads the next request (with a WRITE's
whole payload) into its own buffer.  Then, if more requests are waiting or
in progress *and* requests have lately been slow (a quarter of the recent
ones spent over ``handoff_after`` off the CPU), or this one is a FLUSH or
FUA, it passes leadership on (waking an idle follower, or starting one, up
to ``max_workers``) and carries the request out in parallel with the next
one.  Otherwise it carries it out itself and goes on reading, holding the
reply back until it must wait for the client: a run of requests that
arrived together costs one ``recv`` and one ``sendmsg``.  Replies are
serialised by ``_send_lock``; a READ's data goes out from the buffer it was
read into (no copy).  Memory is bounded per connection: a receive buffer,
one buffer and one reply arena per worker, and large requests in flight
capped at ``max_inflight`` bytes (the leader waits, which pushes back on
the client).

Lock order: ``_recv_lock`` before ``_state``; ``_send_lock`` is taken alone.

Protocol: fixed newstyle handshake with ``OPT_GO``, ``OPT_INFO``,
``OPT_EXPORT_NAME``, ``OPT_LIST``, ``OPT_ABORT`` and
``OPT_STRUCTURED_REPLY`` (a READ is answered by one OFFSET_DATA chunk, an
error by an ERROR chunk with a message); meta contexts are listed and set
as none.  Commands: READ, WRITE (FUA), FLUSH, TRIM (an advisory no-op),
WRITE_ZEROES (FUA, NO_HOLE), DISC.  A client that breaks the protocol (bad
magic, a write larger than 32 MiB, a truncated request) is dropped; nothing
half-received is written or acknowledged; the server and the other
connections go on.  See docs/nbd.md.
"""
from __future__ import annotations

import errno
import ipaddress
import os
import socket
import stat
import struct
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Callable, Optional, Type

from .. import errors
from . import protocol as P

_SERVER_FLAGS = P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES
_CLIENT_FLAGS = P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES

# the command flags each command accepts (FUA is valid on every command once
# SEND_FUA is advertised; NO_HOLE only on WRITE_ZEROES)
_ALLOWED_FLAGS = {
    P.CMD_READ: P.CMD_FLAG_FUA,
    P.CMD_WRITE: P.CMD_FLAG_FUA,
    P.CMD_FLUSH: P.CMD_FLAG_FUA,
    P.CMD_TRIM: P.CMD_FLAG_FUA,
    P.CMD_WRITE_ZEROES: P.CMD_FLAG_FUA | P.CMD_FLAG_NO_HOLE,
}

_SMALL = 64 << 10          # requests up to this size are not counted against max_inflight
_KEEP = 4 << 20            # a worker keeps a buffer up to this size between requests
_RECV_BUFFER = 256 << 10   # request headers (and small payloads) are read in chunks this large
_HANDSHAKE_TIMEOUT = 30.0  # a client must finish option haggling within this time
_BATCH_PARTS = 256         # replies held back are sent when there are this many parts ...
_BATCH_BYTES = 256 << 10   # ... or bytes (the size of a worker's READ arena)


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
    if isinstance(exc, errors.ClosedError):
        return P.ESHUTDOWN
    if isinstance(exc, errors.RangeError):
        return P.EINVAL
    if isinstance(exc, MemoryError):
        return P.ENOMEM
    if isinstance(exc, OSError):
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return P.ENOSPC
        if exc.errno in (errno.EPERM, errno.EACCES, errno.EROFS):
            return P.EPERM
        if exc.errno == errno.EINVAL:
            return P.EINVAL
    return P.EIO


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class NBDServer:
    """Serve ``pair`` over NBD on a unix socket or on TCP.

    ``start()`` binds, listens and returns; connections are handled on
    background threads until ``shutdown()``.  TCP binds 127.0.0.1 unless
    ``host`` is given; a non-loopback host also needs ``allow_remote`` (the
    export has no authentication and no TLS).  ``readonly`` exports every
    volume read-only.
    """

    # threads per connection, started only as slow requests queue up.  More
    # threads overlap more disk waits, but every runnable thread competes for
    # the GIL and the CPUs: on 2 vCPUs, 4 served cold random reads 25% faster
    # than 16 (benchmarks/README.md).  Twice the CPUs, 4 to 16.
    max_workers = min(16, max(4, 2 * (os.cpu_count() or 1)))
    max_inflight = 64 << 20       # bytes of large requests in flight per connection
    max_connections = 128
    handoff_after = 30e-6         # a request slower than this (s) counts as waiting for the disk

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
                                 "pass allow_remote (CLI: --allow-remote) to expose the volume to the network "
                                 "(the export has no authentication and no TLS)")
            if port is not None and not 0 <= port < 65536:
                raise ValueError(f"port {port} is outside 0..65535")
        self.pair = pair
        self.socket_path = os.path.abspath(socket_path) if socket_path else None
        self.host, self.port = host, port
        self.readonly = readonly
        self._listener: Optional[socket.socket] = None
        self._accept_thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self._conns: set["_Connection"] = set()
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._owns_socket_file = False

    # -- exports --------------------------------------------------------------
    def export(self, name: str) -> Optional[_Export]:
        """The export called ``name``, or None."""
        p = self.pair
        if name in ("", "standard"):
            return _Export("standard", "pymirror: the standard volume", self.readonly, p.size,
                           p.readinto, p.write, p.write_zeroes, p.flush)
        if name == "mirror" and p.state not in ("new", "syncing"):
            ro = self.readonly or not p.mirror_writable
            return _Export("mirror", f"pymirror: the mirror ({p.state}, {'read-only' if ro else 'writable'})",
                           ro, p.size, p.mirror_readinto, p.mirror_write, p.mirror_write_zeroes,
                           p.mirror_flush)
        return None

    def export_names(self) -> list[str]:
        return [n for n in ("", "standard", "mirror") if self.export(n) is not None]

    # -- lifecycle ------------------------------------------------------------
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
    def connections(self) -> int:
        with self._lock:
            return len(self._conns)

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
        try:
            s.bind(path)
        except BaseException:
            s.close()
            raise
        self._owns_socket_file = True
        return s

    def start(self) -> "NBDServer":
        """Bind and listen; connections are served on background threads."""
        if self._listener is not None:
            return self
        if self.socket_path is not None:
            s = self._bind_unix()
        else:
            family = socket.AF_INET6 if self.host and ":" in self.host else socket.AF_INET
            s = socket.socket(family, socket.SOCK_STREAM)
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((self.host, self.port or 0))
            except BaseException:
                s.close()
                raise
            self.port = s.getsockname()[1]
        s.listen(64)
        self._listener = s
        self._accept_thread = threading.Thread(target=self._accept_loop, name="nbd-accept", daemon=True)
        self._accept_thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve until ``shutdown()`` (from another thread or a signal handler) completes."""
        self.start()
        self._stopped.wait()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                time.sleep(0.01)   # EMFILE and the like: do not spin
                continue
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._stopping.is_set() or len(self._conns) >= self.max_connections:
                    sock.close()
                    continue
                conn = _Connection(self, sock)
                self._conns.add(conn)
            conn.start()

    def _forget(self, conn: "_Connection") -> None:
        with self._lock:
            self._conns.discard(conn)

    def shutdown(self, drain: bool = True, timeout: float = 30.0) -> None:
        """Stop accepting; let the requests being carried out finish (with
        ``drain``; requests received but not started get ``ESHUTDOWN``);
        flush and commit the pair; close every connection and the socket.
        Idempotent; the pair stays open (its owner closes it)."""
        with self._lock:
            if self._stopping.is_set():
                first = False
            else:
                self._stopping.set()
                first = True
            conns = list(self._conns)
        if not first:
            self._stopped.wait(timeout)
            return
        try:
            if self._listener is not None:
                try:
                    self._listener.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                self._listener.close()
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
            if self._accept_thread is not None:
                self._accept_thread.join(timeout)
            for step in (self.pair.flush, self.pair.mirror_flush, self.pair.commit):
                try:
                    step()
                except Exception:  # noqa: BLE001 - a closed pair, or a state without a mirror to flush
                    pass
            if self._owns_socket_file and self.socket_path is not None:
                try:
                    os.unlink(self.socket_path)
                except FileNotFoundError:
                    pass
        finally:
            self._stopped.set()

    def __enter__(self) -> "NBDServer":
        return self.start()

    def __exit__(self, et: Optional[Type[BaseException]], ev: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self.shutdown()


class _Buffer:
    """A worker's reusable I/O buffer, and the replies it holds back while
    it carries out a run of requests that arrived together (sent with one
    ``sendmsg``; READ data for them goes into ``arena``)."""

    __slots__ = ("view", "corked", "pending", "pending_bytes", "arena", "arena_used")

    def __init__(self) -> None:
        self.view = memoryview(bytearray(0))
        self.corked = False
        self.pending: list[Any] = []
        self.pending_bytes = 0
        self.arena: Optional[memoryview] = None
        self.arena_used = 0

    def get(self, n: int) -> memoryview:
        if n <= len(self.view):
            return self.view[:n]
        if n > _KEEP:
            return memoryview(bytearray(n))
        size = max(_SMALL, 1 << (n - 1).bit_length())
        self.view = memoryview(bytearray(size))
        return self.view[:n]


class _Connection:
    def __init__(self, server: NBDServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.export: Optional[_Export] = None
        self.structured = False
        self.done = threading.Event()
        self._recv_lock = threading.Lock()      # held by the leader (reads requests)
        self._send_lock = threading.Lock()      # serialises replies
        self._state = threading.Condition(threading.Lock())   # the counters below
        self._threads = 1
        self._idle = 0
        self._executing = 0                     # requests carried out by threads that passed leadership on
        self._inflight = 0
        self._closing = False                   # no more requests will be read
        self._stopping = False                  # the server shuts down: answer ESHUTDOWN
        self._slow = 0.0                        # share of recent requests that waited over handoff_after
        self._rbuf = bytearray(_RECV_BUFFER)
        self._rview = memoryview(self._rbuf)
        self._rpos = 0
        self._rend = 0
        self._large_writes = False              # the last write was large

    def start(self) -> None:
        threading.Thread(target=self._first, name="nbd-conn", daemon=True).start()

    def stop(self) -> None:
        """Read no further requests; answer those already received with ESHUTDOWN."""
        self._stopping = True
        try:
            self.sock.shutdown(socket.SHUT_RD)   # wakes a leader waiting for the next request
        except OSError:
            pass

    def abort(self) -> None:
        self._closing = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # -- sending ----------------------------------------------------------------
    def _send(self, data: Any) -> None:
        with self._send_lock:
            try:
                self.sock.sendall(data)
            except OSError as exc:
                raise _Closed(f"cannot send: {exc}") from None

    def _send2(self, header: bytes, data: memoryview) -> None:
        """A header and its payload in one system call (no copy)."""
        total = len(header) + data.nbytes
        with self._send_lock:
            try:
                sent = self.sock.sendmsg((header, data))
                if sent < total:     # interrupted: finish piece by piece
                    if sent < len(header):
                        self.sock.sendall(header[sent:])
                        sent = len(header)
                    self.sock.sendall(data[sent - len(header):])
            except OSError as exc:
                raise _Closed(f"cannot send: {exc}") from None

    def _sendv(self, parts: list[Any], total: int) -> None:
        """Send ``total`` bytes in ``parts``, in order, with one system call
        unless the socket takes less."""
        with self._send_lock:
            try:
                sent = self.sock.sendmsg(parts)
                while sent < total:
                    total -= sent
                    while sent >= len(parts[0]):
                        sent -= len(parts.pop(0))
                    if sent:
                        parts[0] = memoryview(parts[0])[sent:]
                    sent = self.sock.sendmsg(parts)
            except OSError as exc:
                raise _Closed(f"cannot send: {exc}") from None

    def _reply(self, buf: _Buffer, header: bytes, data: Optional[memoryview] = None) -> None:
        """Send a reply now, or hold it in ``buf``'s batch while corked."""
        if buf.corked:
            buf.pending.append(header)
            buf.pending_bytes += len(header)
            if data is not None:
                buf.pending.append(data)
                buf.pending_bytes += data.nbytes
            if len(buf.pending) >= _BATCH_PARTS or buf.pending_bytes >= _BATCH_BYTES:
                self._flush_replies(buf)
        elif data is None:
            self._send(header)
        else:
            self._send2(header, data)

    def _flush_replies(self, buf: _Buffer) -> None:
        if buf.pending:
            parts, total = buf.pending, buf.pending_bytes
            buf.pending, buf.pending_bytes = [], 0
            self._sendv(parts, total)
        buf.arena_used = 0

    def _read_buffer(self, buf: _Buffer, n: int) -> memoryview:
        """Where a READ's data goes: the worker's buffer, or while corked a
        slice of the batch arena (the reply is sent later)."""
        if buf.corked and n <= _BATCH_BYTES:
            if buf.arena is None:
                buf.arena = memoryview(bytearray(_BATCH_BYTES))
            if buf.arena_used + n > _BATCH_BYTES:
                self._flush_replies(buf)
            view = buf.arena[buf.arena_used:buf.arena_used + n]
            buf.arena_used += n
            return view
        if buf.corked:                   # too big to hold back: send what is held, then this one directly
            self._flush_replies(buf)
            buf.corked = False
        return buf.get(n)

    def _error(self, buf: _Buffer, cookie: int, error: int, message: str) -> None:
        if self.structured:
            self._reply(buf, P.error_chunk(cookie, error, message))
        else:
            self._reply(buf, P.simple_reply(cookie, error))

    # -- receiving --------------------------------------------------------------
    def _recv_exact(self, n: int) -> bytes:
        """Handshake only: exactly ``n`` bytes straight from the socket."""
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.sock.recv_into(view[got:], n - got)
            if k == 0:
                raise _Closed("the client disconnected")
            got += k
        return bytes(buf)

    def _fill(self, view: memoryview) -> int:
        """One receive into ``view``; 0 means the client is gone.  Once
        stopping, only data already received is taken."""
        if self._stopping:
            try:
                return self.sock.recv_into(view, 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return 0
        return self.sock.recv_into(view)

    def _need(self, n: int, buf: _Buffer) -> None:
        """Leader only: at least ``n`` bytes in the receive buffer.  Replies
        held back go out before waiting for the client."""
        avail = self._rend - self._rpos
        if avail >= n:
            return
        if buf.pending:
            self._flush_replies(buf)
        if self._rpos:
            if avail:
                self._rbuf[:avail] = self._rview[self._rpos:self._rend]
            self._rpos, self._rend = 0, avail
        # After a large write, expect another: take just the header, so its
        # payload goes straight into a worker's buffer instead of through
        # this one (a copy saved); otherwise take all there is.
        end = n if self._large_writes else len(self._rbuf)
        while self._rend < n:
            k = self._fill(self._rview[self._rend:end])
            if k == 0:
                raise _Closed("the client disconnected")
            self._rend += k

    def _recv_payload(self, dst: memoryview, buf: _Buffer) -> None:
        """Leader only: a WRITE's payload, whole (first what is buffered)."""
        n = dst.nbytes
        k = min(n, self._rend - self._rpos)
        if k:
            dst[:k] = self._rview[self._rpos:self._rpos + k]
            self._rpos += k
        if k < n and buf.pending:
            self._flush_replies(buf)
        while k < n:
            got = self._fill(dst[k:])
            if got == 0:
                raise _Closed("the client disconnected in the middle of a write")
            k += got

    def _reserve(self, n: int) -> None:
        if n <= _SMALL:
            return
        with self._state:
            while self._inflight and self._inflight + n > self.server.max_inflight:
                self._state.wait()
            self._inflight += n

    def _release(self, n: int) -> None:
        if n <= _SMALL:
            return
        with self._state:
            self._inflight -= n
            self._state.notify()

    def _read_request(self, buf: _Buffer) -> Optional[tuple[int, int, int, int, int, Optional[memoryview]]]:
        """Leader only: the next request, a WRITE with its whole payload;
        None for DISC.  Raises _Closed on a broken or vanished client."""
        self._need(P.REQUEST.size, buf)
        magic, flags, cmd, cookie, offset, length = P.REQUEST.unpack_from(self._rbuf, self._rpos)
        self._rpos += P.REQUEST.size
        if magic != P.REQUEST_MAGIC:
            raise _Closed("bad request magic")
        if cmd == P.CMD_DISC:
            return None
        payload = None
        if length > _SMALL and buf.pending:
            self._flush_replies(buf)      # _reserve may wait: hold nothing back meanwhile
        self._large_writes = cmd == P.CMD_WRITE and length > _SMALL
        if cmd == P.CMD_WRITE:
            if length > P.MAX_REQUEST:
                raise _Closed("write larger than the maximum")   # the payload cannot be skipped safely
            self._reserve(length)
            try:
                payload = buf.get(length)
                self._recv_payload(payload, buf)
            except BaseException:
                self._release(length)
                raise
        elif cmd == P.CMD_READ and length <= P.MAX_REQUEST:
            self._reserve(length)
        return cmd, flags, cookie, offset, length, payload

    # -- the connection's threads ---------------------------------------------------
    def _first(self) -> None:
        try:
            self.sock.settimeout(_HANDSHAKE_TIMEOUT)
            self.export = self._handshake()
            self.sock.settimeout(None)
        except Exception:  # noqa: BLE001 - _Closed, OSError, a timeout: no transmission phase
            self.export = None
        if self.export is None:
            self._closing = True
            self._leave()
            return
        self._serve()

    def _spawn_locked(self) -> None:
        """Start one more worker if none is idle (``_state`` held)."""
        if self._idle or self._threads >= self.server.max_workers or self._closing:
            return
        self._threads += 1
        try:
            threading.Thread(target=self._serve, name="nbd-worker", daemon=True).start()
        except RuntimeError:     # cannot start a thread: carry on with those there are
            self._threads -= 1

    def _serve(self) -> None:
        buf = _Buffer()
        try:
            self._work(buf)
        except Exception:  # noqa: BLE001 - a bug must not leave the connection hanging
            self.abort()
        finally:
            self._leave()

    def _work(self, buf: _Buffer) -> None:
        recv_lock = self._recv_lock
        while True:
            with self._state:
                self._idle += 1
            recv_lock.acquire()
            with self._state:
                self._idle -= 1
            leading = True
            try:
                while not self._closing:
                    try:
                        req = self._read_request(buf)
                    except _Closed:
                        # the client left or broke the protocol: read nothing more;
                        # requests already received finish, then the last thread closes
                        self._closing = True
                        return
                    if req is None:          # DISC: likewise
                        self._closing = True
                        return
                    durable = req[0] == P.CMD_FLUSH or req[1] & P.CMD_FLAG_FUA
                    if (self._rend > self._rpos or self._executing) and (self._slow > 0.25 or durable):
                        self._flush_replies(buf)
                        buf.corked = False
                        with self._state:
                            self._spawn_locked()
                            self._executing += 1
                        leading = False
                        recv_lock.release()
                    else:
                        # carried out here: its reply may wait for the next
                        # receive, so a run of requests is answered at once
                        buf.corked = True
                        if durable:
                            self._flush_replies(buf)    # do not hold replies over a disk wait
                    try:
                        self._execute(req, buf)
                    finally:
                        if not leading:
                            with self._state:
                                self._executing -= 1
                    if not leading:
                        break
                else:
                    return
            except _Closed:                  # a reply could not be sent: the client is gone
                self.abort()
                return
            finally:
                buf.corked = False
                if buf.pending:
                    try:
                        self._flush_replies(buf)
                    except _Closed:
                        self.abort()
                if leading:
                    recv_lock.release()

    def _leave(self) -> None:
        with self._state:
            self._threads -= 1
            last = self._threads == 0
            self._state.notify_all()
        if last:
            try:
                self.sock.close()
            finally:
                self.server._forget(self)
                self.done.set()

    # -- carrying out a request ---------------------------------------------------
    def _execute(self, req: tuple[int, int, int, int, int, Optional[memoryview]], buf: _Buffer) -> None:
        cmd, flags, cookie, offset, length, payload = req
        try:
            self._carry_out(cmd, flags, cookie, offset, length, payload, buf)
        finally:
            if cmd in (P.CMD_READ, P.CMD_WRITE) and length <= P.MAX_REQUEST:
                self._release(length)

    def _carry_out(self, cmd: int, flags: int, cookie: int, offset: int, length: int,
                   payload: Optional[memoryview], buf: _Buffer) -> None:
        ex = self.export
        assert ex is not None
        if self._stopping:
            self._error(buf, cookie, P.ESHUTDOWN, "the server is shutting down")
            return
        allowed = _ALLOWED_FLAGS.get(cmd)
        if allowed is None:
            self._error(buf, cookie, P.EINVAL, f"unknown or unsupported command {cmd}")
            return
        if flags & ~allowed:
            self._error(buf, cookie, P.EINVAL, f"unsupported command flags {flags:#x} for command {cmd}")
            return
        end = offset + length
        if cmd == P.CMD_READ:
            if length > P.MAX_REQUEST:
                self._error(buf, cookie, P.EINVAL,
                            f"a read of {length} bytes is larger than the maximum {P.MAX_REQUEST}")
            elif end > ex.size:
                self._error(buf, cookie, P.EINVAL, f"a read of {length} bytes at {offset} ends beyond "
                                                   f"the end of the export ({ex.size} bytes)")
            else:
                try:
                    data = self._read_buffer(buf, length)
                    self._timed(length > _SMALL, ex.readinto, offset, data)
                except Exception as exc:  # noqa: BLE001 - mapped to an NBD error
                    self._error(buf, cookie, _errno_of(exc), str(exc))
                    return
                if self.structured:
                    if length:
                        self._reply(buf, P.offset_data_header(cookie, offset, length), data)
                    else:
                        self._reply(buf, P.none_chunk(cookie))
                else:
                    self._reply(buf, P.simple_reply(cookie, 0), data)
            return
        if cmd == P.CMD_FLUSH:
            self._call(buf, cookie, False, ex.flush)
            return
        # WRITE, WRITE_ZEROES, TRIM: they change the export
        if ex.readonly:
            self._error(buf, cookie, P.EPERM, f"the {ex.name} export is read-only")
        elif end > ex.size:
            self._error(buf, cookie, P.ENOSPC if cmd != P.CMD_TRIM else P.EINVAL,
                        f"{length} bytes at {offset} end beyond the end of the export ({ex.size} bytes)")
        elif cmd == P.CMD_WRITE:
            self._call(buf, cookie, length > _SMALL, ex.write, offset, payload,
                       fua=bool(flags & P.CMD_FLAG_FUA))
        elif cmd == P.CMD_WRITE_ZEROES:
            # NO_HOLE needs nothing: zeroes are always written, nothing is ever punched
            self._call(buf, cookie, False, ex.write_zeroes, offset, length,
                       fua=bool(flags & P.CMD_FLAG_FUA))
        else:
            # TRIM is advisory: the bytes stay as they were, which the protocol
            # allows (a client may assume nothing about trimmed bytes).  Nothing
            # was written, so FUA has nothing to make durable.
            self._reply(buf, P.simple_reply(cookie, 0))

    def _timed(self, large: bool, fn: Callable[..., None], *args: Any, **kw: Any) -> None:
        """Call ``fn`` and note whether it waited: its time off the CPU went
        over ``handoff_after``.  ``_slow`` is the share of recent requests that
        did (an average of 0/1 samples, so one stall, say a preemption, cannot
        switch modes; a run of disk waits does within a few requests).  A
        small request's wall time is its waiting; a large one's also counts
        its copying, which more threads would not speed up, so its thread
        CPU time is taken off (reading that clock costs a system call)."""
        clock = time.perf_counter
        if large:
            c0, t0 = time.thread_time(), clock()
            fn(*args, **kw)
            waited = clock() - t0 - (time.thread_time() - c0)
        else:
            t0 = clock()
            fn(*args, **kw)
            waited = clock() - t0
        self._slow += ((waited > self.server.handoff_after) - self._slow) * 0.0625

    def _call(self, buf: _Buffer, cookie: int, large: bool, fn: Callable[..., None],
              *args: Any, **kw: Any) -> None:
        try:
            self._timed(large, fn, *args, **kw)
        except Exception as exc:  # noqa: BLE001 - every failure becomes an NBD error
            self._error(buf, cookie, _errno_of(exc), str(exc))
        else:
            self._reply(buf, P.simple_reply(cookie, 0))

    # -- the handshake ---------------------------------------------------------------
    def _opt(self, opt: int, reply: int, data: bytes = b"") -> None:
        self._send(P.opt_reply(opt, reply, data))

    def _handshake(self) -> Optional[_Export]:
        self._send(struct.pack(">QQH", P.NBDMAGIC, P.IHAVEOPT, _SERVER_FLAGS))
        (cflags,) = struct.unpack(">I", self._recv_exact(4))
        if cflags & ~_CLIENT_FLAGS:
            raise _Closed("unknown client flags")
        no_zeroes = bool(cflags & P.FLAG_C_NO_ZEROES)
        while True:
            magic, opt, length = P.OPT_HEADER.unpack(self._recv_exact(P.OPT_HEADER.size))
            if magic != P.IHAVEOPT:
                raise _Closed("bad option magic")
            if length > P.MAX_OPTION:
                raise _Closed("option data too long")
            data = self._recv_exact(length) if length else b""
            if opt == P.OPT_EXPORT_NAME:
                export = None if self._stopping else self.server.export(data.decode("utf-8", "replace"))
                if export is None:
                    raise _Closed("unknown export")   # the protocol's only answer here
                tail = b"" if no_zeroes else bytes(124)
                self._send(struct.pack(">QH", export.size, self._tflags(export)) + tail)
                return export
            if opt == P.OPT_ABORT:
                self._opt(opt, P.REP_ACK)
                return None
            if self._stopping:
                self._opt(opt, P.REP_ERR_SHUTDOWN, b"the server is shutting down")
            elif opt == P.OPT_LIST:
                self._list(opt, data)
            elif opt in (P.OPT_INFO, P.OPT_GO):
                export = self._info(opt, data)
                if export is not None and opt == P.OPT_GO:
                    return export
            elif opt == P.OPT_STRUCTURED_REPLY:
                if data:
                    self._opt(opt, P.REP_ERR_INVALID, b"STRUCTURED_REPLY takes no data")
                else:
                    self.structured = True
                    self._opt(opt, P.REP_ACK)
            elif opt in (P.OPT_LIST_META_CONTEXT, P.OPT_SET_META_CONTEXT):
                self._meta_context(opt, data)
            else:
                self._opt(opt, P.REP_ERR_UNSUP, f"option {opt} is not supported".encode())

    def _list(self, opt: int, data: bytes) -> None:
        if data:
            self._opt(opt, P.REP_ERR_INVALID, b"LIST takes no data")
            return
        for name in self.server.export_names():
            export = self.server.export(name)
            assert export is not None
            raw = name.encode()
            self._opt(opt, P.REP_SERVER, struct.pack(">I", len(raw)) + raw + export.description.encode())
        self._opt(opt, P.REP_ACK)

    def _meta_context(self, opt: int, data: bytes) -> None:
        """No metadata contexts are offered: a well-formed query gets an
        empty answer (it is not an error to select none)."""
        if not self.structured:
            self._opt(opt, P.REP_ERR_INVALID, b"negotiate structured replies first")
            return
        try:
            (nlen,) = struct.unpack_from(">I", data)
            name = data[4:4 + nlen]
            (count,) = struct.unpack_from(">I", data, 4 + nlen)
            pos = 8 + nlen
            for _ in range(count):
                (qlen,) = struct.unpack_from(">I", data, pos)
                pos += 4 + qlen
            if len(name) != nlen or pos != len(data):
                raise struct.error("lengths do not add up")
        except struct.error:
            self._opt(opt, P.REP_ERR_INVALID, b"malformed meta context request")
            return
        if self.server.export(name.decode("utf-8", "replace")) is None:
            self._opt(opt, P.REP_ERR_UNKNOWN, b"no such export")
            return
        self._opt(opt, P.REP_ACK)

    def _tflags(self, export: _Export) -> int:
        # CAN_MULTI_CONN: a FLUSH on any connection flushes the whole volume
        # and commits the metadata, so it covers writes completed on all of them
        f = P.TFLAG_HAS_FLAGS | P.TFLAG_SEND_FLUSH | P.TFLAG_SEND_FUA | P.TFLAG_CAN_MULTI_CONN
        if export.readonly:
            f |= P.TFLAG_READ_ONLY
        else:
            f |= P.TFLAG_SEND_TRIM | P.TFLAG_SEND_WRITE_ZEROES
        return f

    def _info(self, opt: int, data: bytes) -> Optional[_Export]:
        if len(data) < 6:
            self._opt(opt, P.REP_ERR_INVALID, b"short INFO/GO request")
            return None
        (nlen,) = struct.unpack_from(">I", data)
        if 4 + nlen + 2 > len(data):
            self._opt(opt, P.REP_ERR_INVALID, b"bad name length")
            return None
        name = data[4:4 + nlen].decode("utf-8", "replace")
        (nreq,) = struct.unpack_from(">H", data, 4 + nlen)
        if 4 + nlen + 2 + 2 * nreq != len(data):
            self._opt(opt, P.REP_ERR_INVALID, b"bad information request count")
            return None
        requests = set(struct.unpack_from(f">{nreq}H", data, 4 + nlen + 2))
        export = self.server.export(name)
        if export is None:
            self._opt(opt, P.REP_ERR_UNKNOWN, f"no export named {name!r}; try '', 'standard' or 'mirror'".encode())
            return None
        self._opt(opt, P.REP_INFO, struct.pack(">HQH", P.INFO_EXPORT, export.size, self._tflags(export)))
        if P.INFO_NAME in requests:
            self._opt(opt, P.REP_INFO, struct.pack(">H", P.INFO_NAME) + export.name.encode())
        if P.INFO_DESCRIPTION in requests:
            self._opt(opt, P.REP_INFO, struct.pack(">H", P.INFO_DESCRIPTION) + export.description.encode())
        # Block sizes, always stated: any byte range works (minimum 1), whole
        # tracks are best (a partial write of a track not yet restored merges
        # it first), at most 32 MiB per request.
        track = int(getattr(self.server.pair, "track_size", 4096))
        preferred = min(max(4096, 1 << (track - 1).bit_length()), P.MAX_REQUEST)
        self._opt(opt, P.REP_INFO, struct.pack(">HIII", P.INFO_BLOCK_SIZE, 1, preferred, P.MAX_REQUEST))
        self._opt(opt, P.REP_ACK)
        return export
