"""Jobs: the background copy of an establish or a restore, seen from Python."""
from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any, Optional

from . import errors
from ._native import check, ffi, last_error, lib, raise_for

if TYPE_CHECKING:  # pragma: no cover
    from .pair import Pair


@dataclasses.dataclass(frozen=True)
class Progress:
    """A snapshot of a job's counters (read without locks from the C core)."""

    state: str
    running: bool
    paused: bool
    error: Optional[str]
    error_track: Optional[int]
    incremental: bool
    protect: bool
    tracks_total: int
    tracks_pending: int
    tracks_copied: int
    tracks_skipped: int
    tracks_merged: int
    reads_redirected: int
    reads_hydrated: int
    bytes_read: int
    bytes_written: int
    changed_standard: int
    changed_mirror: int
    elapsed: float
    track_size: int
    commits: int = 0
    syncs: int = 0
    mirror_invalid: int = 0   # mirror tracks not part of a point-in-time image (0: consistent)

    @property
    def tracks_done(self) -> int:
        return self.tracks_total - self.tracks_pending

    @property
    def fraction(self) -> float:
        return 1.0 if self.tracks_total == 0 else self.tracks_done / self.tracks_total

    @property
    def rate(self) -> float:
        """Bytes per second written by the job so far."""
        return self.bytes_written / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> Optional[float]:
        """Seconds left at the current rate (None when unknown)."""
        if self.tracks_pending == 0:
            return 0.0
        rate = self.rate
        if rate <= 0 or self.paused:
            return None
        return self.tracks_pending * self.track_size / rate

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(tracks_done=self.tracks_done, rate=self.rate, eta=self.eta, fraction=self.fraction)
        return d


def read_progress(pair: "Pair") -> Progress:
    p = ffi.new("struct pm_progress *")
    check(lib.pm_pair_progress(pair._p, p))
    err = int(p.error)
    return Progress(
        state=ffi.string(lib.pm_state_name(p.state)).decode(),
        running=bool(p.running),
        paused=bool(p.paused),
        error=(ffi.string(lib.pm_strerror(err)).decode() if err else None),
        error_track=(int(p.error_track) if err and p.error_track >= 0 else None),
        incremental=bool(p.incremental),
        protect=bool(p.protect),
        tracks_total=int(p.tracks_total),
        tracks_pending=int(p.tracks_pending),
        tracks_copied=int(p.tracks_copied),
        tracks_skipped=int(p.tracks_skipped),
        tracks_merged=int(p.tracks_merged),
        reads_redirected=int(p.reads_redirected),
        reads_hydrated=int(p.reads_hydrated),
        bytes_read=int(p.bytes_read),
        bytes_written=int(p.bytes_written),
        changed_standard=int(p.changed_standard),
        changed_mirror=int(p.changed_mirror),
        elapsed=float(p.elapsed),
        track_size=pair.track_size,
        commits=int(p.commits),
        syncs=int(p.syncs),
        mirror_invalid=int(p.mirror_invalid),
    )


class Job:
    """The background copy started by :meth:`Pair.establish`,
    :meth:`Pair.restore` or :meth:`Pair.resume`.

    The copy runs on C threads; ``wait`` blocks (in short slices, so Ctrl-C
    works) until it finishes.
    """

    def __init__(self, pair: "Pair", kind: str) -> None:
        self.pair = pair
        self.kind = kind  # "establish" or "restore"

    @property
    def progress(self) -> Progress:
        return read_progress(self.pair)

    @property
    def done(self) -> bool:
        return not self.progress.running

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait until the copy is done.  Returns True when done, False when
        ``timeout`` seconds passed first.  Raises :class:`JobError` if the job
        is paused on an error (the error names the failing track)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            slice_ms = 200
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                slice_ms = max(1, min(slice_ms, int(left * 1000)))
            rc = lib.pm_pair_wait(self.pair._p, slice_ms)
            if rc == 0:
                return True
            if rc == lib.PM_E_TIMEDOUT:
                continue
            if rc == lib.PM_E_JOB:
                prog = self.progress
                raise errors.JobError(
                    f"the {self.kind} stopped on track {prog.error_track}: {prog.error}"
                    f" ({last_error() or 'see progress'}); fix the cause, then resume"
                )
            raise_for(rc)

    def pause(self) -> None:
        check(lib.pm_pair_pause(self.pair._p))

    def resume(self) -> None:
        check(lib.pm_pair_resume(self.pair._p))

    def set_rate(self, rate: int) -> None:
        """Bytes per second for the background copy (0: no limit), live."""
        if rate < 0:
            raise ValueError(f"rate must not be negative, got {rate}")
        check(lib.pm_pair_set_rate(self.pair._p, rate))

    def __repr__(self) -> str:
        p = self.progress
        return f"<Job {self.kind} {p.tracks_done}/{p.tracks_total} tracks state={p.state}>"
