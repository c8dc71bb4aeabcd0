"""Comparing the two sides of a pair in C: verify with progress, adopt.

The C core reads both volumes at once (one reader thread per side, a ring
of a few batches each, so memory stays bounded; csrc/compare.c) with the
GIL released.  A :class:`Comparison` runs that call on a helper thread, so
the caller can poll its progress, cancel it, or wait; :func:`compare`
waits while calling a progress callback, and turns Ctrl-C into a cancel.

See docs/compare.md for what compare-establish, compare-restore and adopt
do, and for the per-track hashes of remote volumes.
"""
from __future__ import annotations

import dataclasses
import os
import threading
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

from . import errors
from ._native import check, ffi, lib, raise_for

if TYPE_CHECKING:  # pragma: no cover
    from .config import CopyConfig
    from .pair import Pair
    from .volume import Volume

PathLike = Union[str, "os.PathLike[str]"]
__all__ = ["CompareProgress", "Comparison", "compare", "adopt"]


@dataclasses.dataclass(frozen=True)
class CompareProgress:
    """A snapshot of a comparison's counters."""

    running: bool
    tracks_total: int
    tracks_done: int
    tracks_differ: int
    bytes_read: int       # data read from the two sides together
    tracks_hashed: int    # track-sides compared by their store's hash instead of their data
    elapsed: float

    @property
    def fraction(self) -> float:
        return 1.0 if self.tracks_total == 0 else self.tracks_done / self.tracks_total

    @property
    def rate(self) -> float:
        """Bytes read per second, both sides together."""
        return self.bytes_read / self.elapsed if self.elapsed > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(fraction=self.fraction, rate=self.rate)
        return d


ProgressCallback = Callable[[CompareProgress], None]


class Comparison:
    """One comparison of a pair's sides, running on a helper thread.

    ``kind`` is ``"compare"`` (tracks ``[first, first+count)``, count 0: to
    the end; the result is the list of differing tracks) or ``"adopt"``
    (a new pair: the differing tracks become CHANGED and the pair ``split``;
    the result is their count).  Start it with :meth:`start`."""

    def __init__(self, pair: "Pair", kind: str = "compare", first: int = 0, count: int = 0) -> None:
        if kind not in ("compare", "adopt"):
            raise ValueError(f"unknown comparison kind {kind!r}")
        if not 0 <= first <= pair.tracks or count < 0:
            raise errors.RangeError(f"tracks {first}+{count} are outside the pair's {pair.tracks} tracks")
        self.pair = pair
        self.kind = kind
        self.first, self.count = first, count
        out = ffi.new("pm_compare **")
        check(lib.pm_compare_create(out))
        self._ctl = ffi.gc(out[0], lib.pm_compare_destroy)
        self._bitmap: Any = None
        if kind == "compare":
            bm = ffi.new("pm_bitmap **")
            check(lib.pm_bitmap_create(pair.tracks, bm))
            self._bitmap = ffi.gc(bm[0], lib.pm_bitmap_destroy)
        self._thread = threading.Thread(target=self._work, name=f"{kind}-{pair._name}", daemon=True)
        self._rc: Optional[int] = None
        self._exc: Optional[BaseException] = None
        self._done = threading.Event()

    def _work(self) -> None:
        pair = self.pair
        try:
            with pair._call as p:
                if self.kind == "adopt":
                    rc = lib.pm_pair_adopt(p, self._ctl)
                else:
                    rc = lib.pm_pair_compare(p, self.first, self.count, self._bitmap, self._ctl)
            if rc < 0:   # the C message is this thread's: raise here, re-raise in the waiter
                raise_for(rc, pair.meta_path, f"{'adopt' if self.kind == 'adopt' else 'verify'} {pair._name}")
            self._rc = int(rc)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiter
            self._exc = exc
        finally:
            self._done.set()

    def start(self) -> "Comparison":
        self._thread.start()
        return self

    def cancel(self) -> None:
        """Stop the comparison soon (its waiter gets OSError ECANCELED)."""
        lib.pm_compare_cancel(self._ctl)

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def progress(self) -> CompareProgress:
        p = ffi.new("struct pm_compare_progress *")
        p.size = ffi.sizeof("struct pm_compare_progress")
        check(lib.pm_compare_progress(self._ctl, p))
        return CompareProgress(running=bool(p.running) and not self._done.is_set(),
                               tracks_total=int(p.tracks_total), tracks_done=int(p.tracks_done),
                               tracks_differ=int(p.tracks_differ), bytes_read=int(p.bytes_read),
                               tracks_hashed=int(p.tracks_hashed), elapsed=float(p.elapsed))

    def wait(self, timeout: Optional[float] = None) -> bool:
        """True once finished (then :meth:`result` answers), False on timeout."""
        return self._done.wait(timeout)

    def result(self) -> Any:
        """The differing tracks (ascending list) or, for adopt, their count.
        Raises what the comparison raised."""
        self._done.wait()
        self._thread.join()
        if self._exc is not None:
            raise self._exc
        if self.kind == "adopt":
            return self._rc
        return _bits(self._bitmap)

    def run(self, progress: Optional[ProgressCallback] = None, interval: float = 0.25) -> Any:
        """Start, wait (calling ``progress`` every ``interval`` seconds and at
        the end), and return :meth:`result`.  KeyboardInterrupt cancels the
        comparison, waits for it to stop, and propagates."""
        self.start()
        try:
            while not self._done.wait(interval):
                if progress is not None:
                    progress(self.progress())
        except BaseException:
            self.cancel()
            self._done.wait()
            raise
        if progress is not None and self._exc is None:
            progress(self.progress())
        return self.result()


def _bits(bitmap: Any) -> list[int]:
    """The set bits of a C bitmap, collected in C a block at a time."""
    out: list[int] = []
    buf = ffi.new("uint64_t[]", 65536)
    start = 0
    while True:
        n = int(lib.pm_bitmap_collect(bitmap, start, buf, 65536))
        if n <= 0:
            return out
        out.extend(ffi.unpack(buf, n))
        start = out[-1] + 1


def compare(pair: "Pair", progress: Optional[ProgressCallback] = None, first: int = 0,
            count: int = 0) -> list[int]:
    """The tracks whose bytes differ between the two sides, compared in C
    (both read at once, bounded memory, GIL released); ``progress`` gets a
    :class:`CompareProgress` a few times a second."""
    return list(Comparison(pair, "compare", first, count).run(progress))


def adopt(meta: Optional[PathLike], standard: "PathLike | Volume", mirror: "PathLike | Volume", *,
          track_size: Optional[int] = None, config: Optional["CopyConfig"] = None,
          progress: Optional[ProgressCallback] = None) -> "Pair":
    """A pair over two existing volumes: create it, compare the sides, and
    start ``split`` with every differing track CHANGED on both sides, so an
    incremental establish or restore copies exactly those.  On any error
    (or Ctrl-C) nothing is left behind: the metadata file is removed."""
    from .pair import Pair

    meta_path = os.fspath(meta) if meta is not None else None
    if meta_path is not None and os.path.lexists(meta_path):
        raise errors.MirrorError(f"{meta_path}: already exists; adopt never overwrites metadata")
    pair = Pair.create(meta_path, standard, mirror, track_size=track_size, config=config)
    try:
        Comparison(pair, "adopt").run(progress)
    except BaseException:
        pair.close()
        if meta_path is not None:
            try:
                os.unlink(meta_path)
            except FileNotFoundError:
                pass
        raise
    return pair
