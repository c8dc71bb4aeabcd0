"""The one lifetime guard between Python objects and the C objects they use.

Every Python object that owns or borrows a C object (Pair, Volume,
TrackTable, Bitmap) derives from :class:`Handle`.  A handle holds the
pointer and keeps three promises:

* **no call on a freed object**: a closable handle counts the calls in
  flight (``with self._call as p:`` around every C call).  ``close()`` first
  refuses new calls (they raise :class:`~pymirror.errors.ClosedError`), then
  waits for the calls in flight to return, then frees the C object, once.
  A long wait (``Job.wait``) is made of short in-flight slices, so a close
  never waits long and the waiter sees ClosedError at its next slice.
* **no owner freed under its borrower**: an object that keeps a pointer to
  another's C object (a pair to its volumes' stores) registers as its
  borrower; closing a borrowed handle raises
  :class:`~pymirror.errors.InUseError` naming the borrower, and changes
  nothing.  The borrower's own destructor also holds the borrowed pointers
  (see :func:`destroy_keeping`), so the garbage collector cannot free them
  first either.
* **one close**: concurrent or repeated ``close()`` calls free the object
  once; a second closer waits until the first is done.

Handles without ``close()`` (Bitmap, TrackTable) are freed by the garbage
collector only, after their last reference, so their calls need no
counting: a per-bit call stays one C call.  A borrowed bitmap keeps its
owner alive by reference.

Job holds no handle: it reaches its pair's C object only through Pair's
guarded methods.
"""
from __future__ import annotations

import functools
import itertools
import threading
TYPE_CHECKING = False   # typing is not imported at run time: a command's start (docs/copier.md)
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Callable, Optional

from . import errors
from ._native import ffi

__all__ = ["Handle", "destroy_keeping"]

_OPEN, _CLOSING, _CLOSED = 0, 1, 2
_loans = itertools.count()

# The borrowed pointers of the C objects not destroyed yet (destroy_keeping).
# A module global, not the destructor's own reference: a handle is always in
# a cycle (its _call refers back to it), so an unclosed pair and its volumes
# die together in the cycle collector, which runs the finalizer of every
# ffi.gc pointer in the dead set (cffi destroys there) before it clears
# anything, in the order it found them: often the volumes' stores first,
# whatever the pair's destructor refers to.  A pointer reachable from here
# is not in the dead set.
_kept: dict[int, tuple[Any, ...]] = {}
_kept_keys = itertools.count()


def _destroy_keeping(destroy: Callable[[Any], None], key: int, ptr: Any) -> None:
    try:
        destroy(ptr)
    finally:
        _kept.pop(key, None)


def destroy_keeping(destroy: Callable[[Any], None], *keep: Any) -> Callable[[Any], None]:
    """A destructor for ``ffi.gc`` that holds ``keep`` (the borrowed
    pointers) until it has run: if the garbage collector frees a pair and
    its volumes together, the volumes' stores outlive the pair."""
    key = next(_kept_keys)
    _kept[key] = keep
    return functools.partial(_destroy_keeping, destroy, key)


class _Call:
    """``with handle._call as ptr:`` - one call in flight (reusable: it keeps
    no per-call state)."""

    __slots__ = ("_h",)

    def __init__(self, handle: "Handle") -> None:
        self._h = handle

    def __enter__(self) -> Any:
        h = self._h
        with h._lock:
            if h._state != _OPEN:
                raise errors.ClosedError(f"{h._what} is closed")
            h._calls += 1
        return h._cptr

    def __exit__(self, *exc: object) -> None:
        h = self._h
        with h._lock:
            h._calls -= 1
            if h._calls == 0 and h._state != _OPEN:
                h._idle.notify_all()


class Handle:
    """Base of the Python objects that hold a C pointer (see the module doc)."""

    __slots__ = ("_cptr", "_what", "_lock", "_idle", "_calls", "_state", "_borrowers", "_lent", "_call")

    def _init_handle(self, ptr: Any, what: str, *, closable: bool = True) -> None:
        """``ptr``: a pointer from ``ffi.gc`` (owned: freed by close or by the
        garbage collector) or a raw one owned by a handle this one borrows.
        ``what`` names the object in messages ("the pair /x/p.meta").
        A handle that is not ``closable`` is freed by the garbage collector
        only: it needs no lock and counts nothing."""
        self._cptr = ptr
        self._what = what
        self._state = _OPEN
        self._lent: list[tuple["Handle", int]] = []
        if closable:
            self._lock = threading.Lock()
            self._idle = threading.Condition(self._lock)
            self._calls = 0
            self._borrowers: dict[int, str] = {}
            self._call = _Call(self)

    # -- borrowing ------------------------------------------------------------
    def _borrow_from(self, owner: "Handle", by: str = "") -> None:
        """Record that this handle uses ``owner``'s C object until it closes
        (and keep ``owner`` alive as long as this handle).  ``by`` names the
        borrower in the InUseError of ``owner.close()``."""
        key = -1
        if hasattr(owner, "_call"):   # a closable owner counts its borrowers
            with owner._lock:
                if owner._state != _OPEN:
                    raise errors.ClosedError(f"{owner._what} is closed")
                key = next(_loans)
                owner._borrowers[key] = by or self._what
        self._lent.append((owner, key))

    def _release_borrows(self) -> None:
        lent, self._lent = self._lent, []
        for owner, key in lent:
            if key >= 0:
                with owner._lock:
                    owner._borrowers.pop(key, None)

    # -- state ----------------------------------------------------------------
    @property
    def closed(self) -> bool:
        """True once ``close()`` has begun: no new call is accepted."""
        return self._state != _OPEN

    def _ptr_or_raise(self) -> Any:
        """The pointer, for a call made inside ``with self._call:`` (which
        keeps it alive) or one that must still reach C while a close waits
        for the calls in flight (releasing a barrier those calls wait on).
        ClosedError once the C object is freed."""
        ptr = self._cptr
        if ptr is None:
            raise errors.ClosedError(f"{self._what} is closed")
        return ptr

    # -- closing --------------------------------------------------------------
    def _close_handle(self, before_free: Optional[Callable[[], None]] = None) -> bool:
        """Refuse new calls, wait for the calls in flight, free the C object
        (``ffi.release`` of the gc pointer runs its destructor now), release
        the borrowed handles.  Returns False if another close did it.
        ``before_free`` runs once no call is in flight, before the free."""
        with self._lock:
            if self._state == _OPEN and self._borrowers:
                users = ", ".join(sorted(set(self._borrowers.values())))
                raise errors.InUseError(
                    f"{self._what} is in use by {users}; close {'them' if len(set(self._borrowers.values())) > 1 else 'it'} first")
            if self._state != _OPEN:
                while self._state != _CLOSED:
                    self._idle.wait()
                return False
            self._state = _CLOSING
            # users that hold the C pointer outside counted calls (the NBD C
            # request loop, pymirror/nbd/cloop.py) let go of it now
            hooks = list(getattr(self, "__dict__", {}).get("_closing_hooks", {}).values())
        for hook in hooks:
            hook()
        with self._lock:
            while self._calls:
                self._idle.wait()
        try:
            if before_free is not None:
                before_free()
            ptr, self._cptr = self._cptr, None
            if ptr is not None:
                ffi.release(ptr)
        finally:
            self._release_borrows()
            with self._lock:
                self._state = _CLOSED
                self._idle.notify_all()
        return True
