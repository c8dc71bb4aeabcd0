"""Group commands for the daemon: one instant for every pair, held briefly.

The sequence is the core's (``pymirror.group``): check every pair's state
first (nothing changes if one is wrong), hold every pair's host I/O
(:meth:`Pair.hold_io`), give each pair the command, release.  What differs
is step 3: each command commits its pair's metadata (an fsync), and one
after the other that is 100 fsyncs while the hosts wait — 1.2 s for 100
small pairs on ext4.  Here the commands run in parallel on a thread pool
(the C core releases the GIL; the file system folds concurrent fsyncs into
few journal commits), so the hold is close to one commit: 30-40 ms for the
same 100 pairs.  benchmarks/bench_service.py measures it.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import time
from typing import Any, Callable, Optional, Sequence

from .. import errors

_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="group")

ALLOWED = {
    "split": ("established", "restored"),
    "establish": ("new", "split", "restored"),
    "establish-incremental": ("split", "restored"),
    "restore": ("split", "restored"),
}


def check(kind: str, named: Sequence[tuple[str, Any]], incremental: bool = False) -> None:
    """Raise StateError (naming the pair) unless every pair may take ``kind``."""
    key = "establish-incremental" if kind == "establish" and incremental else kind
    allowed = ALLOWED[key]
    for name, pair in named:
        state = pair.state
        if state not in allowed:
            raise errors.StateError(f"{name} is {state}; a group {kind} needs every pair "
                                    f"{' or '.join(allowed)} (nothing was changed)")
        if pair.progress.running:
            raise errors.StateError(f"{name} has a copy in progress (nothing was changed)")
        if kind == "restore":
            invalid = int(getattr(pair, "mirror_invalid", 0) or 0)
            if invalid:
                raise errors.StateError(
                    f"{name}: the mirror is inconsistent ({invalid} tracks are not part of a point-in-time "
                    f"image); establish it again before a restore (nothing was changed)")


def act(named: Sequence[tuple[str, Any]], action: Callable[[Any], Any]) -> float:
    """Hold every pair's host I/O, run ``action(pair)`` on all of them in
    parallel, release; returns the seconds host I/O was held.  An action
    that fails is re-raised after every pair was released."""
    with contextlib.ExitStack() as stack:
        t0 = time.monotonic()
        for _name, pair in named:
            stack.enter_context(pair.hold_io())
        futures = [_POOL.submit(action, pair) for _name, pair in named]
        concurrent.futures.wait(futures)
        held = time.monotonic() - t0
    failed: Optional[BaseException] = next((f.exception() for f in futures if f.exception()), None)
    if failed is not None:
        raise failed
    return held
