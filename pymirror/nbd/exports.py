"""The exports a server offers: their names, and what each may do in each
state of its pair.

Names
-----
A server made with one pair (``NBDServer(pair)``, as ``pymirror serve``
does) keeps the historical names: ``""`` and ``"standard"`` for the
standard volume, ``"mirror"`` for the mirror.  A server holding pairs added
by name (``add_pair(NAME, pair)``, as the daemon does) exports ``NAME`` (the
standard) and ``NAME/mirror``, and ``""`` as the standard while it holds
exactly one pair.  A pair name is 1 to 255 bytes of UTF-8, with no ``/`` and
no control characters, so every export name fits the protocol's 4096 bytes
and a name never reads as another pair's mirror.

State rules (fixed at handshake, checked again per request)
------------------------------------------------------------
* The standard export is there in every state and never refuses I/O for a
  state: the pair arbitrates it against the copy.
* The mirror export can be opened while the mirror is a readable image:
  ``established``, ``split``, ``restoring``, ``restored``.  While ``new``,
  ``syncing`` or ``detached`` (a failing mirror, no image of anything) it is
  not listed and OPT_GO/INFO answer NBD_REP_ERR_UNKNOWN with the reason.
* Its read-only flag is decided when the client connects: writable when the
  pair's mirror is writable then (``split``, ``restored``).  The state may
  change under a connected client: the client stays connected, and a
  request the state now forbids gets an error reply -- a WRITE,
  WRITE_ZEROES or TRIM ``EPERM``, a READ (only ``syncing`` forbids one:
  the mirror is being overwritten) ``EIO``.
"""
from __future__ import annotations

import dataclasses
import errno
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .. import errors
from . import protocol as P

MIRROR = "/mirror"                 # a pair's mirror export is NAME + MIRROR
MAX_PAIR_NAME = 255                # bytes of UTF-8
_MIRROR_READABLE = ("established", "split", "restoring", "restored")
_MIRROR_WRITABLE = ("split", "restored")


def check_pair_name(name: Any) -> str:
    """``name`` if it can name a pair's exports; else a ValueError that says why."""
    if not isinstance(name, str):
        raise TypeError(f"a pair name is a str, not {type(name).__name__}")
    if not name:
        raise ValueError("a pair name must not be empty (the export \"\" is the default export)")
    if "/" in name:
        raise ValueError(f"pair name {name!r} contains '/' (NAME/mirror names the mirror export)")
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in name):
        raise ValueError(f"pair name {name!r} contains a control character or a lone surrogate")
    size = len(name.encode("utf-8"))
    if size > MAX_PAIR_NAME:
        raise ValueError(f"pair name is {size} bytes long; at most {MAX_PAIR_NAME} bytes of UTF-8")
    return name


@dataclass(eq=False)
class Export:
    """One export as a connection sees it: fixed at handshake."""
    name: str                       # as INFO_NAME and the events report it
    side: str                       # "standard" or "mirror"
    description: str
    readonly: bool                  # the flag advertised at handshake
    size: int
    preferred: int                  # the preferred block size
    readinto: Callable[[int, Any], None]
    write: Callable[..., None]
    write_zeroes: Callable[..., None]
    flush: Callable[[], None]
    write_refusal: Optional[Callable[[], Optional[str]]] = None   # the mirror: why it may not be written now
    entry: Optional["PairEntry"] = field(default=None, repr=False)
    # (offset, length, context, max_extents) -> [(offset, length, kind)] (pymirror.blockstatus)
    block_status: Optional[Callable[[int, int, str, int], list[tuple[int, int, int]]]] = \
        field(default=None, repr=False)


class PairEntry:
    """A pair the server holds, and the connections using its exports."""

    def __init__(self, name: str, pair: Any, readonly: bool, legacy: bool = False) -> None:
        self.name = name
        self.pair = pair
        self.readonly = readonly
        self.legacy = legacy
        self.clients: set[Any] = set()     # connections past the handshake (server lock)
        self.removing = False

    def _names(self) -> tuple[str, str]:
        if self.legacy:
            return "standard", "mirror"
        return self.name, self.name + MIRROR

    def standard(self) -> Export:
        p = self.pair
        track = int(getattr(p, "track_size", 4096))
        what = "the standard volume" if self.legacy else f"pair {self.name}: the standard volume"
        return Export(self._names()[0], "standard", f"pymirror: {what}", self.readonly, p.size,
                      _preferred(track), p.readinto, p.write, p.write_zeroes, p.flush, None, self,
                      _status(p, "standard"))

    def mirror(self) -> tuple[Optional[Export], str]:
        """The mirror export, or None and why it cannot be opened now."""
        p = self.pair
        name = self._names()[1]
        try:
            state = p.state
        except errors.ClosedError:
            return None, f"export {name!r} is not available: the pair is closed"
        if state not in _MIRROR_READABLE:
            return None, (f"export {name!r} is not available while the pair is {state}: the mirror "
                          "is exported when established, split, restoring or restored")
        ro = self.readonly or state not in _MIRROR_WRITABLE       # the state read once
        what = "the mirror" if self.legacy else f"pair {self.name}: the mirror"
        track = int(getattr(p, "track_size", 4096))
        return Export(name, "mirror", f"pymirror: {what} ({state}, {'read-only' if ro else 'writable'})",
                      ro, p.size, _preferred(track), p.mirror_readinto, p.mirror_write,
                      p.mirror_write_zeroes, p.mirror_flush, _mirror_writable(p, name), self,
                      _status(p, "mirror")), ""


def _status(pair: Any, side: str) -> Callable[[int, int, str, int], list[tuple[int, int, int]]]:
    def status(offset: int, length: int, context: str, max_extents: int) -> list[tuple[int, int, int]]:
        from ..blockstatus import block_status
        return block_status(pair, offset, length, context=context, side=side, max_extents=max_extents)
    return status


def _preferred(track: int) -> int:
    # whole tracks never need a merge during a restore
    return min(max(4096, 1 << (track - 1).bit_length()), P.MAX_REQUEST)


def _mirror_writable(pair: Any, name: str) -> Callable[[], Optional[str]]:
    """None while the mirror may be written, else the reason (for a TRIM,
    which writes nothing and so is checked here, not by the pair)."""
    def refusal() -> Optional[str]:
        try:
            state = pair.state
        except errors.ClosedError:
            return "the pair is closed"
        if state in _MIRROR_WRITABLE:
            return None
        return f"the {name} export may not be written while the pair is {state} " \
               "(the mirror is writable when split or restored)"
    return refusal


class Registry:
    """Export names -> pairs.  Not locked: the server holds its lock."""

    def __init__(self) -> None:
        self.entries: dict[str, PairEntry] = {}
        self.legacy: Optional[PairEntry] = None

    def set_legacy(self, pair: Any, readonly: bool) -> None:
        self.legacy = PairEntry("", pair, readonly, legacy=True)
        self.entries[""] = self.legacy

    def add(self, name: str, pair: Any, readonly: bool) -> PairEntry:
        if self.legacy is not None:
            raise ValueError("this server was made for one pair (NBDServer(pair)); "
                             "make it with NBDServer() to add pairs by name")
        if name in self.entries:
            raise ValueError(f"a pair named {name!r} is already exported")
        for e in self.entries.values():
            if e.pair is pair:
                raise ValueError(f"this pair is already exported as {e.name!r}")
        entry = self.entries[name] = PairEntry(name, pair, readonly)
        return entry

    def get(self, name: str) -> PairEntry:
        try:
            return self.entries[name]
        except KeyError:
            raise KeyError(f"no pair named {name!r} is exported") from None

    def live(self) -> list[PairEntry]:
        return [e for e in self.entries.values() if not e.removing]

    def resolve(self, raw: bytes) -> tuple[Optional[Export], str]:
        """The export a client asked for by name, or None and the reason."""
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None, "export names are UTF-8; this one is not"
        if self.legacy is not None:
            e = self.legacy
            if e.removing:
                return None, "the pair is being removed from the server"
            if name in ("", "standard"):
                return e.standard(), ""
            if name == "mirror":
                return e.mirror()
            return None, f"no export named {name!r}; try '', 'standard' or 'mirror'"
        if name == "":
            live = self.live()
            if len(live) == 1:
                return live[0].standard(), ""
            return None, (f"the default export \"\" names the standard when the server holds one pair; "
                          f"it holds {len(live)}: name one of {self._examples()}")
        pair_name, is_mirror = (name[:-len(MIRROR)], True) if name.endswith(MIRROR) else (name, False)
        entry = self.entries.get(pair_name)
        if entry is None:
            return None, f"no export named {name!r}; exports: {self._examples()}"
        if entry.removing:
            return None, f"pair {pair_name!r} is being removed from the server"
        if is_mirror:
            return entry.mirror()
        return entry.standard(), ""

    def _examples(self) -> str:
        names = [e.name for e in self.live()]
        if not names:
            return "none (no pair is exported)"
        shown = ", ".join(repr(n) for n in names[:5])
        return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "") + " (and NAME/mirror)"

    def listing(self) -> list[Export]:
        """The exports NBD_OPT_LIST names, in order (``""`` first)."""
        out: list[Export] = []
        live = self.live()
        if self.legacy is not None:
            if live:
                std = self.legacy.standard()
                out += [_renamed(std, ""), std]
                m, _ = self.legacy.mirror()
                if m is not None:
                    out.append(m)
            return out
        if len(live) == 1:
            out.append(_renamed(live[0].standard(), ""))
        for e in live:
            out.append(e.standard())
            m, _ = e.mirror()
            if m is not None:
                out.append(m)
        return out


def _renamed(ex: Export, name: str) -> Export:
    return dataclasses.replace(ex, name=name)


def errno_of(exc: BaseException, write: bool) -> int:
    """The NBD error for an exception raised by the pair.  A request the
    pair's state forbids: ``EPERM`` for one that writes, ``EIO`` for a read
    (the data cannot be had now; the connection goes on)."""
    if isinstance(exc, errors.ReadOnlyError):
        return P.EPERM
    if isinstance(exc, errors.StateError):
        return P.EPERM if write else P.EIO
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
