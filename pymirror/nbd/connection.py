"""One client connection in the transmission phase: receiving requests,
carrying them out on a small leader/follower pool, sending replies.

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

Commands: READ, WRITE (FUA), FLUSH, TRIM and WRITE_ZEROES (FUA; both zero
the range, with a hole punched unless WRITE_ZEROES has NO_HOLE: a trimmed
range reads as zeroes on every side the write reaches), BLOCK_STATUS
(REQ_ONE; the contexts selected at handshake, see status.py), DISC.  A client that breaks the protocol (bad magic, a write
larger than 64 MiB, a truncated request) is dropped; nothing half-received
is written or acknowledged; the server and the other connections go on.
A request the pair's current state forbids gets an error reply (see
exports.py), never a disconnect.  ``stop()`` (server shutdown, or the
pair's removal) reads no further requests: those received but not started
get ESHUTDOWN, those being carried out finish, then the connection closes.
"""
from __future__ import annotations

import socket
import threading
import time
from typing import Any, Callable, Optional

from . import cloop
from . import protocol as P
from . import tls
from .exports import Export, PairEntry, errno_of
from .handshake import Handshake
from .status import block_status_chunks

_Closed = P.Closed

# the command flags each command accepts (FUA is valid on every command once
# SEND_FUA is advertised; NO_HOLE only on WRITE_ZEROES)
_ALLOWED_FLAGS = {
    P.CMD_READ: P.CMD_FLAG_FUA,
    P.CMD_WRITE: P.CMD_FLAG_FUA,
    P.CMD_FLUSH: P.CMD_FLAG_FUA,
    P.CMD_TRIM: P.CMD_FLAG_FUA,
    P.CMD_WRITE_ZEROES: P.CMD_FLAG_FUA | P.CMD_FLAG_NO_HOLE,
    P.CMD_BLOCK_STATUS: P.CMD_FLAG_FUA | P.CMD_FLAG_REQ_ONE,
}

_SMALL = 64 << 10          # requests up to this size are not counted against max_inflight
_KEEP = 4 << 20            # a worker keeps a buffer up to this size between requests
_RECV_BUFFER = 256 << 10   # request headers (and small payloads) are read in chunks this large
HANDSHAKE_TIMEOUT = 30.0   # a client must finish option haggling within this time
_BATCH_PARTS = 256         # replies held back are sent when there are this many parts ...
_BATCH_BYTES = 256 << 10   # ... or bytes (the size of a worker's READ arena)


class Buffer:
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


class Connection(Handshake):
    def __init__(self, server: Any, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.export: Optional[Export] = None
        self.entry: Optional[PairEntry] = None    # the pair whose export it uses (server lock)
        self.export_name = ""                    # the name it asked for, canonical
        self.peer: dict[str, Any] = {}            # who connected (listener.peer_of)
        self.structured = False
        self.meta_contexts: dict[int, str] = {}  # selected at handshake (SET_META_CONTEXT)
        self.meta_export: Optional[bytes] = None
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
        self._cloop: Any = None                 # the C request loop serving it (cloop.py)
        self._tls: Any = None                   # the TLS session after STARTTLS (tls.py)

    def start(self) -> None:
        threading.Thread(target=self._first, name="nbd-conn", daemon=True).start()

    def stop(self) -> None:
        """Read no further requests; answer those already received with ESHUTDOWN."""
        self._stopping = True
        cloop.stop(self)
        try:
            self.sock.shutdown(socket.SHUT_RD)   # wakes a leader waiting for the next request
        except OSError:
            pass

    def abort(self) -> None:
        self._closing = True
        cloop.abort(self)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # -- sending ----------------------------------------------------------------
    def _send(self, data: Any) -> None:
        if self._tls is not None:        # the handshake after STARTTLS (tls.py)
            self._tls.sendall(data)
            return
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

    def _reply(self, buf: Buffer, header: bytes, data: Optional[memoryview] = None) -> None:
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

    def _flush_replies(self, buf: Buffer) -> None:
        if buf.pending:
            parts, total = buf.pending, buf.pending_bytes
            buf.pending, buf.pending_bytes = [], 0
            self._sendv(parts, total)
        buf.arena_used = 0

    def _read_buffer(self, buf: Buffer, n: int) -> memoryview:
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

    def _error(self, buf: Buffer, cookie: int, error: int, message: str) -> None:
        if self.structured:
            self._reply(buf, P.error_chunk(cookie, error, message))
        else:
            self._reply(buf, P.simple_reply(cookie, error))

    # -- receiving --------------------------------------------------------------
    def _recv_exact(self, n: int) -> bytes:
        """Handshake only: exactly ``n`` bytes straight from the socket."""
        if self._tls is not None:
            return self._tls.recv_exact(n)
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

    def _need(self, n: int, buf: Buffer) -> None:
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

    def _recv_payload(self, dst: memoryview, buf: Buffer) -> None:
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

    def _read_request(self, buf: Buffer) -> Optional[tuple[int, int, int, int, int, Optional[memoryview]]]:
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
            self.sock.settimeout(HANDSHAKE_TIMEOUT)
            self.export = self._handshake()
            self.sock.settimeout(None)
            tls.transmission(self)
        except Exception:  # noqa: BLE001 - _Closed, OSError, a timeout: no transmission phase
            self.export = None
        if self.export is None or cloop.serve(self):     # the C request loop (cloop.py), or no export
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
        buf = Buffer()
        try:
            self._work(buf)
        except Exception:  # noqa: BLE001 - a bug must not leave the connection hanging
            self.abort()
        finally:
            self._leave()

    def _work(self, buf: Buffer) -> None:
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
                tls.release(self)
            finally:
                self.server._forget(self)
                self.done.set()

    # -- carrying out a request ---------------------------------------------------
    def _execute(self, req: tuple[int, int, int, int, int, Optional[memoryview]], buf: Buffer) -> None:
        cmd, flags, cookie, offset, length, payload = req
        try:
            self._carry_out(cmd, flags, cookie, offset, length, payload, buf)
        finally:
            if cmd in (P.CMD_READ, P.CMD_WRITE) and length <= P.MAX_REQUEST:
                self._release(length)

    def _carry_out(self, cmd: int, flags: int, cookie: int, offset: int, length: int,
                   payload: Optional[memoryview], buf: Buffer) -> None:
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
                    self._error(buf, cookie, errno_of(exc, False), str(exc))
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
        if cmd == P.CMD_BLOCK_STATUS:
            self._block_status(buf, cookie, flags, offset, length)
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
            # zeroes, deallocated unless NO_HOLE asks to keep them allocated
            self._call(buf, cookie, False, ex.write_zeroes, offset, length,
                       fua=bool(flags & P.CMD_FLAG_FUA), punch=not flags & P.CMD_FLAG_NO_HOLE)
        elif ex.write_refusal is not None and (why := ex.write_refusal()) is not None:
            self._error(buf, cookie, P.EPERM, why)
        else:
            # TRIM zeroes and deallocates, like a write of zeroes: it marks
            # CHANGED and reaches the mirror where writes do, so no side keeps
            # old bytes that the other no longer has (established sides stay
            # equal; a later incremental copy knows the range changed)
            self._call(buf, cookie, False, ex.write_zeroes, offset, length,
                       fua=bool(flags & P.CMD_FLAG_FUA), punch=True)

    def _block_status(self, buf: Buffer, cookie: int, flags: int, offset: int, length: int) -> None:
        ex = self.export
        assert ex is not None
        if not self.structured or not self.meta_contexts or ex.block_status is None:
            self._error(buf, cookie, P.EINVAL, "block status needs structured replies and a metadata "
                                               "context selected with NBD_OPT_SET_META_CONTEXT")
        elif length == 0 or offset + length > ex.size:
            self._error(buf, cookie, P.EINVAL, f"a block status of {length} bytes at {offset} is empty or "
                                               f"ends beyond the end of the export ({ex.size} bytes)")
        else:
            try:
                chunks = block_status_chunks(ex, self.meta_contexts, cookie, offset, length,
                                             bool(flags & P.CMD_FLAG_REQ_ONE))
            except Exception as exc:  # noqa: BLE001 - mapped to an NBD error
                self._error(buf, cookie, errno_of(exc, False), str(exc))
                return
            self._reply(buf, chunks)

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

    def _call(self, buf: Buffer, cookie: int, large: bool, fn: Callable[..., None],
              *args: Any, **kw: Any) -> None:
        try:
            self._timed(large, fn, *args, **kw)
        except Exception as exc:  # noqa: BLE001 - every failure becomes an NBD error
            self._error(buf, cookie, errno_of(exc, True), str(exc))
        else:
            self._reply(buf, P.simple_reply(cookie, 0))

