"""What a side of a pair holds, as extents: allocation (data, holes and
zeroes as the stores report them) and the tracks a restore has not yet
brought over (``pending``).  The C core does the work
(``pm_pair_block_status``, one call per batch of extents, the GIL
released); the NBD export packs the result into ``NBD_CMD_BLOCK_STATUS``
replies for the ``base:allocation`` and ``pymirror:pending`` contexts.

Kinds: for ``"allocation"`` :data:`DATA` (0), :data:`HOLE` (1: not
allocated, reads as zeroes) or :data:`ZERO` (2: reads as zeroes); for
``"pending"`` 1 (still PENDING: a read is served from the other side) or 0
(local).  During a restore a PENDING track of the standard is described by
the mirror's allocation, since that is what a read returns.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._native import ffi, lib

if TYPE_CHECKING:  # pragma: no cover
    from .pair import Pair

DATA, HOLE, ZERO = 0, 1, 2
CONTEXTS = {"allocation": 0, "pending": 1}
SIDES = {"standard": 0, "mirror": 1}
_BATCH = 1024


def block_status(pair: "Pair", offset: int, length: int, *, context: str = "allocation",
                 side: str = "standard", max_extents: int = 0) -> list[tuple[int, int, int]]:
    """Extents ``(offset, length, kind)`` covering ``[offset, offset+length)``
    in order, adjacent ones of one kind merged; at most ``max_extents`` if
    given (then they may cover less: the caller asks again)."""
    if context not in CONTEXTS:
        raise ValueError(f"context must be one of {', '.join(CONTEXTS)}, got {context!r}")
    if side not in SIDES:
        raise ValueError(f"side must be 'standard' or 'mirror', got {side!r}")
    if offset < 0 or length < 0:
        raise ValueError(f"offset and length must not be negative (got {offset}, {length})")
    out: list[tuple[int, int, int]] = []
    buf: Any = ffi.new("struct pm_extent[]", _BATCH)
    pos, end = offset, offset + length
    while pos < end:
        want = _BATCH if not max_extents else min(_BATCH, max_extents - len(out))
        if want <= 0:
            break
        n = pair._run("block status of", lib.pm_pair_block_status, SIDES[side], CONTEXTS[context],
                      pos, end - pos, buf, want)
        if n <= 0:
            break
        for i in range(n):
            e = buf[i]
            if out and out[-1][2] == e.kind and out[-1][0] + out[-1][1] == e.offset:
                last = out.pop()
                out.append((last[0], last[1] + int(e.length), last[2]))
            else:
                out.append((int(e.offset), int(e.length), int(e.kind)))
        pos = out[-1][0] + out[-1][1]
    return out
