"""NBD_CMD_BLOCK_STATUS: the metadata contexts an export offers and the
replies to a block status request.

Contexts (ids fixed for the server's life):

* ``base:allocation`` (id 1), on every export: the standard NBD context.
  Flags ``NBD_STATE_HOLE`` (1: not allocated) and ``NBD_STATE_ZERO`` (2:
  reads as zeroes), from the stores' own reports (SEEK_DATA/SEEK_HOLE on
  files; a block device or a memory volume is all data).  During a restore a
  track not yet restored is described by the mirror, where its reads go.
* ``pymirror:pending`` (id 2), on a standard export: flag 1 for a track
  still PENDING (not yet restored: a read of it is served from the mirror),
  0 for a local one.  Everything is 0 outside a restore.

The extents come from the C core (``pm_pair_block_status``, through
:mod:`pymirror.blockstatus`); this module only packs them.
"""
from __future__ import annotations

import struct
from typing import Any

from . import protocol as P

ALLOCATION = "base:allocation"
PENDING = "pymirror:pending"
_IDS = {ALLOCATION: 1, PENDING: 2}
_CONTEXT = {ALLOCATION: "allocation", PENDING: "pending"}
STATE_HOLE = 1
STATE_ZERO = 2
MAX_EXTENTS = 2048          # descriptors per context in one reply (the client asks again for the rest)
_ALLOC_FLAGS = {0: 0, 1: STATE_HOLE | STATE_ZERO, 2: STATE_ZERO}   # data, hole, zero
_DESCRIPTOR = struct.Struct(">II")


def contexts_for(export: Any) -> dict[int, str]:
    """The contexts ``export`` offers: id -> name."""
    names = [ALLOCATION] + ([PENDING] if export.side == "standard" else [])
    return {_IDS[n]: n for n in names}


def block_status_chunks(export: Any, contexts: dict[int, str], cookie: int, offset: int, length: int,
                        req_one: bool) -> bytes:
    """The structured reply chunks (the last one flagged DONE) answering a
    block status request for the selected ``contexts``."""
    parts = []
    items = sorted(contexts.items())
    for i, (cid, name) in enumerate(items):
        extents = export.block_status(offset, length, _CONTEXT[name], 1 if req_one else MAX_EXTENTS)
        if not extents:                                # nothing could be described: say "data"/"local"
            extents = [(offset, length, 0)]
        if name == ALLOCATION:
            flags = [_ALLOC_FLAGS.get(kind, 0) for _, _, kind in extents]
        else:
            flags = [1 if kind else 0 for _, _, kind in extents]
        body = b"".join(_DESCRIPTOR.pack(n, f) for (_, n, _), f in zip(extents, flags))
        done = P.REPLY_FLAG_DONE if i == len(items) - 1 else 0
        parts.append(P.STRUCTURED_REPLY.pack(P.STRUCTURED_REPLY_MAGIC, done, P.REPLY_TYPE_BLOCK_STATUS, cookie,
                                             4 + len(body)) + struct.pack(">I", cid) + body)
    return b"".join(parts)
