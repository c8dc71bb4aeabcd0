"""Consistency groups: act on several pairs at one instant.

A group split (or establish, or restore) must take effect at one instant for
every pair, so that dependent writes stay consistent: if a host acknowledged
write A on one pair and only then issued write B on another, no mirror set
may hold B without A.  The way to get that is a barrier, as arrays do for
their consistency groups:

1. check every pair's state first: if one is wrong, nothing changes;
2. hold host I/O on every pair (:meth:`Pair.hold_io`): new host writes and
   flushes block, those in flight drain;
3. give each pair the command (each is instant: a split, or the start of a
   job, which commits one small header record);
4. release every pair.

How long host I/O was held is kept in :data:`last_hold_seconds`.
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterable, List, Optional, Sequence

from . import errors
from .config import CopyConfig
from .job import Job
from .pair import Pair

#: Seconds host I/O was held by the last group command (None before any).
last_hold_seconds: Optional[float] = None


def _pairs(pairs: Iterable[Pair]) -> List[Pair]:
    out = list(pairs)
    if not out:
        raise ValueError("a group needs at least one pair")
    for p in out:
        if not isinstance(p, Pair):
            raise TypeError(f"a group holds Pair objects, got {type(p).__name__}")
    if len({id(p) for p in out}) != len(out):
        raise ValueError("the same pair is named twice in the group")
    return out


def _name(pair: Pair, i: int) -> str:
    return pair.meta_path or f"pair {i} (memory)"


def _check_states(pairs: Sequence[Pair], allowed: Iterable[str], verb: str,
                  extra: Optional[Callable[[Pair], Optional[str]]] = None) -> None:
    allowed = tuple(allowed)
    for i, p in enumerate(pairs):
        state = p.state
        if state not in allowed:
            raise errors.StateError(
                f"{_name(p, i)} is {state}; a group {verb} needs every pair "
                f"{' or '.join(allowed)} (nothing was changed)")
        why = extra(p) if extra is not None else None
        if why:
            raise errors.StateError(f"{_name(p, i)}: {why} (nothing was changed)")


def _held(pairs: Sequence[Pair], act: Callable[[Pair], Optional[Job]]) -> List[Job]:
    """Hold every pair's I/O, act on each, release; record the hold time."""
    global last_hold_seconds
    jobs: List[Job] = []
    with contextlib.ExitStack() as stack:
        t0 = time.monotonic()
        for p in pairs:
            stack.enter_context(p.hold_io())
        try:
            for p in pairs:
                job = act(p)
                if job is not None:
                    jobs.append(job)
        finally:
            last_hold_seconds = time.monotonic() - t0
            # leaving the ExitStack releases every pair (in reverse order)
    return jobs


def split(pairs: Iterable[Pair]) -> None:
    """Split every pair at one instant (each must be established or restored)."""
    ps = _pairs(pairs)
    _check_states(ps, ("established", "restored"), "split")
    _held(ps, lambda p: p.split())


def establish(pairs: Iterable[Pair], incremental: bool = False,
              config: Optional[CopyConfig] = None) -> List[Job]:
    """Start an establish on every pair at one instant; returns their Jobs."""
    ps = _pairs(pairs)
    allowed = ("split", "restored") if incremental else ("new", "split", "restored")
    _check_states(ps, allowed, "incremental establish" if incremental else "establish")
    return _held(ps, lambda p: p.establish(incremental=incremental, config=config))


def restore(pairs: Iterable[Pair], incremental: bool = False, protect: bool = True,
            config: Optional[CopyConfig] = None) -> List[Job]:
    """Start a restore on every pair at one instant; returns their Jobs.
    Every mirror must be consistent (see :attr:`Pair.mirror_invalid`)."""
    ps = _pairs(pairs)

    def inconsistent(p: Pair) -> Optional[str]:
        n = p.mirror_invalid
        if n:
            return (f"the mirror is inconsistent ({n} tracks are not part of a point-in-time "
                    f"image); establish it again before a restore")
        return None

    _check_states(ps, ("split", "restored"), "restore", inconsistent)
    return _held(ps, lambda p: p.restore(incremental=incremental, protect=protect, config=config))
