"""The fixed newstyle handshake: option haggling until the client picks an
export (OPT_GO or OPT_EXPORT_NAME) or gives up (OPT_ABORT).

Options answered: GO and INFO (INFO_EXPORT and INFO_BLOCK_SIZE always,
INFO_NAME and INFO_DESCRIPTION when asked; an unknown or unavailable export
gets NBD_REP_ERR_UNKNOWN with the reason, and the client may try another),
EXPORT_NAME (an unknown export closes the connection: the protocol allows no
other answer), LIST, STRUCTURED_REPLY, LIST/SET_META_CONTEXT (the contexts
of ``blockstatus.contexts_for``: ``base:allocation`` on every export,
``pymirror:pending`` on a standard export), ABORT; anything else
NBD_REP_ERR_UNSUP.  While the server shuts
down every option but ABORT gets NBD_REP_ERR_SHUTDOWN.
"""
from __future__ import annotations

import struct
from typing import Any, Optional

from . import protocol as P
from . import tls
from .exports import Export
from .status import contexts_for

SERVER_FLAGS = P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES
CLIENT_FLAGS = P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES


def transmission_flags(export: Export) -> int:
    # CAN_MULTI_CONN: a FLUSH on any connection flushes the whole volume
    # and commits the metadata, so it covers writes completed on all of them
    f = P.TFLAG_HAS_FLAGS | P.TFLAG_SEND_FLUSH | P.TFLAG_SEND_FUA | P.TFLAG_CAN_MULTI_CONN
    if export.readonly:
        f |= P.TFLAG_READ_ONLY
    else:
        f |= P.TFLAG_SEND_TRIM | P.TFLAG_SEND_WRITE_ZEROES
    return f


class Handshake:
    """The handshake half of a connection (a mixin of ``Connection``, which
    supplies ``server``, ``_send``, ``_recv_exact``, ``_stopping`` and
    ``structured``)."""

    server: Any
    structured: bool
    _stopping: bool
    meta_contexts: dict[int, str]      # selected by SET_META_CONTEXT: id -> name
    meta_export: Optional[bytes]       # ... for this export name

    def _send(self, data: Any) -> None:
        raise NotImplementedError

    def _recv_exact(self, n: int) -> bytes:
        raise NotImplementedError

    def _opt(self, opt: int, reply: int, data: bytes = b"") -> None:
        self._send(P.opt_reply(opt, reply, data))

    def _handshake(self) -> Optional[Export]:
        """The export the client chose (the connection is attached to it), or None."""
        self._send(struct.pack(">QQH", P.NBDMAGIC, P.IHAVEOPT, SERVER_FLAGS))
        (cflags,) = struct.unpack(">I", self._recv_exact(4))
        if cflags & ~CLIENT_FLAGS:
            raise P.Closed("unknown client flags")
        no_zeroes = bool(cflags & P.FLAG_C_NO_ZEROES)
        while True:
            magic, opt, length = P.OPT_HEADER.unpack(self._recv_exact(P.OPT_HEADER.size))
            if magic != P.IHAVEOPT:
                raise P.Closed("bad option magic")
            if length > P.MAX_OPTION:
                raise P.Closed("option data too long")
            data = self._recv_exact(length) if length else b""
            if tls.intercept(self, opt, data):        # STARTTLS, and TLS required (tls.py)
                continue
            if opt == P.OPT_EXPORT_NAME:
                if self.meta_export != bytes(data):
                    self.meta_contexts = {}          # selected for another export
                export: Optional[Export] = None if self._stopping else self.server._attach(self, data)[0]
                if export is None:
                    raise P.Closed("unknown export")   # the protocol's only answer here
                tail = b"" if no_zeroes else bytes(124)
                self._send(struct.pack(">QH", export.size, transmission_flags(export)) + tail)
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
                    if self.meta_export is not None and self.meta_export != _go_name(data):
                        self.meta_contexts = {}      # selected for another export
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
        for export in self.server._listing():
            raw = export.name.encode()
            self._opt(opt, P.REP_SERVER, struct.pack(">I", len(raw)) + raw + export.description.encode())
        self._opt(opt, P.REP_ACK)

    def _meta_context(self, opt: int, data: bytes) -> None:
        """LIST answers the contexts the export offers that match the
        queries (all of them for no query; ``base:`` or ``pymirror:`` for a
        namespace); SET selects those named exactly (none for no query),
        replacing an earlier selection, for the export it names."""
        if not self.structured:
            self._opt(opt, P.REP_ERR_INVALID, b"negotiate structured replies first")
            return
        try:
            (nlen,) = struct.unpack_from(">I", data)
            name = data[4:4 + nlen]
            (count,) = struct.unpack_from(">I", data, 4 + nlen)
            pos = 8 + nlen
            queries = []
            for _ in range(count):
                (qlen,) = struct.unpack_from(">I", data, pos)
                queries.append(bytes(data[pos + 4:pos + 4 + qlen]))
                pos += 4 + qlen
            if len(name) != nlen or pos != len(data) or any(len(q) > P.MAX_STRING for q in queries):
                raise struct.error("lengths do not add up")
        except struct.error:
            self._opt(opt, P.REP_ERR_INVALID, b"malformed meta context request")
            return
        export, why = self.server._resolve(bytes(name))
        if export is None:
            self._opt(opt, P.REP_ERR_UNKNOWN, why.encode()[:P.MAX_STRING])
            return
        offered = contexts_for(export)
        if opt == P.OPT_SET_META_CONTEXT:
            wanted = {q.decode("utf-8", "replace") for q in queries}
            chosen = {cid: cname for cid, cname in offered.items() if cname in wanted}
            self.meta_contexts = chosen
            self.meta_export = bytes(name)
        elif not queries:
            chosen = dict(offered)
        else:
            chosen = {}
            for q in queries:
                text = q.decode("utf-8", "replace")
                for cid, cname in offered.items():
                    if cname == text or (text.endswith(":") and cname.startswith(text)):
                        chosen[cid] = cname
        for cid, cname in sorted(chosen.items()):
            self._opt(opt, P.REP_META_CONTEXT, struct.pack(">I", cid) + cname.encode())
        self._opt(opt, P.REP_ACK)

    def _info(self, opt: int, data: bytes) -> Optional[Export]:
        if len(data) < 6:
            self._opt(opt, P.REP_ERR_INVALID, b"short INFO/GO request")
            return None
        (nlen,) = struct.unpack_from(">I", data)
        if 4 + nlen + 2 > len(data):
            self._opt(opt, P.REP_ERR_INVALID, b"bad name length")
            return None
        raw = bytes(data[4:4 + nlen])
        (nreq,) = struct.unpack_from(">H", data, 4 + nlen)
        if 4 + nlen + 2 + 2 * nreq != len(data):
            self._opt(opt, P.REP_ERR_INVALID, b"bad information request count")
            return None
        requests = set(struct.unpack_from(f">{nreq}H", data, 4 + nlen + 2))
        # GO attaches the connection to the export before answering, so a
        # pair being removed can never gain a client it does not know of
        found: tuple[Optional[Export], str] = (self.server._attach(self, raw) if opt == P.OPT_GO
                                               else self.server._resolve(raw))
        export, why = found
        if export is None:
            self._opt(opt, P.REP_ERR_UNKNOWN, why.encode()[:P.MAX_STRING])
            return None
        self._opt(opt, P.REP_INFO, struct.pack(">HQH", P.INFO_EXPORT, export.size, transmission_flags(export)))
        if P.INFO_NAME in requests:
            self._opt(opt, P.REP_INFO, struct.pack(">H", P.INFO_NAME) + export.name.encode())
        if P.INFO_DESCRIPTION in requests:
            self._opt(opt, P.REP_INFO, struct.pack(">H", P.INFO_DESCRIPTION) + export.description.encode())
        # Block sizes, always stated: any byte range works (minimum 1), whole
        # tracks are best (a partial write of a track not yet restored merges
        # it first), at most 64 MiB per request (nbdkit's limit).
        self._opt(opt, P.REP_INFO, struct.pack(">HIII", P.INFO_BLOCK_SIZE, 1, export.preferred, P.MAX_REQUEST))
        self._opt(opt, P.REP_ACK)
        return export


def _go_name(data: bytes) -> bytes:
    (nlen,) = struct.unpack_from(">I", data)
    return bytes(data[4:4 + nlen])
