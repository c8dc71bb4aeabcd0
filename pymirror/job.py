"""Jobs: the background copy of an establish or a restore, seen from Python.

A Job holds no C handle of its own: every call goes through its Pair's
guarded methods, so closing the pair can never leave a Job using freed
memory (a Job call after the close raises ClosedError).
"""
from __future__ import annotations

import time

from . import errors
from .state import State

# No typing nor dataclasses at run time (docs/copier.md, "The command's start and end").
TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from dataclasses import dataclass as record
    from typing import Any, Optional

    from .pair import Pair
else:
    from ._record import record

# Job.wait waits in slices this long, each one a call in flight on the pair:
# the longest a Pair.close() waits for a waiter, and how soon Ctrl-C is seen.
_SLICE_MS = 100


@record(frozen=True)
class Progress:
    """A snapshot of a job's counters (read without locks from the C core)."""

    state: State
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
    bytes_zeroed: int = 0     # zeroed on the target (source holes and zero tracks), not copied
    # -- branch compare: a job that began by comparing the sides (establish/restore --compare)
    compare: bool = False         # the current/last job began by comparing
    comparing: bool = False       # its compare phase runs now (the copy starts after it)
    tracks_compared: int = 0      # tracks compared so far
    tracks_equal: int = 0         # tracks found equal: not copied
    compare_bytes: int = 0        # bytes the compare read from both sides
    # Pacing and hot order (issue 13; docs/arbitration.md "Pacing"): host I/O
    # on the standard as the arbitration timed it in the last window the
    # pacing judged, in seconds (None: no samples), the idle baselines, the
    # rate the pacing allows now (0: full speed), tracks taken first as hot.
    host_read_p50: Optional[float] = None
    host_read_p99: Optional[float] = None
    host_write_p50: Optional[float] = None
    host_write_p99: Optional[float] = None
    host_flush_p50: Optional[float] = None
    host_flush_p99: Optional[float] = None
    idle_read_p99: Optional[float] = None
    idle_write_p99: Optional[float] = None
    idle_flush_p99: Optional[float] = None
    host_merge_p50: Optional[float] = None     # host writes that merged a not-yet-restored track
    host_merge_p99: Optional[float] = None
    idle_merge_p99: Optional[float] = None
    pace_rate: int = 0
    tracks_hot: int = 0
    pace_quiet: int = 0

    @property
    def tracks_done(self) -> int:
        return self.tracks_total - self.tracks_pending

    @property
    def fraction(self) -> float:
        return 1.0 if self.tracks_total == 0 else self.tracks_done / self.tracks_total

    @property
    def rate(self) -> float:
        """Bytes per second the job has brought up to date so far (data
        written plus ranges zeroed instead of copied)."""
        done = self.bytes_written + self.bytes_zeroed
        return done / self.elapsed if self.elapsed > 0 else 0.0

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
        d = dict(self.__dict__)     # the fields, in order (a frozen record keeps nothing else there)
        d.update(tracks_done=self.tracks_done, rate=self.rate, eta=self.eta, fraction=self.fraction)
        return d


def read_progress(pair: "Pair") -> Progress:
    p = pair._progress_struct()
    err = int(p.error)
    return Progress(
        state=State.from_code(int(p.state)),
        running=bool(p.running),
        paused=bool(p.paused),
        error=(pair._error_name(err) if err else None),
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
        **_compare_fields(p),
        bytes_zeroed=int(p.bytes_zeroed),
        **{k: (int(getattr(p, k + "_ns")) / 1e9 or None) for k in _LATENCIES},
        pace_rate=int(p.pace_rate),
        tracks_hot=int(p.tracks_hot),
        pace_quiet=int(p.pace_quiet),
    )


def _compare_fields(p: Any) -> dict[str, Any]:
    """The compare branch's counters (docs/compare.md)."""
    return {"compare": bool(p.compare), "comparing": bool(p.comparing),
            "tracks_compared": int(p.tracks_compared), "tracks_equal": int(p.tracks_equal),
            "compare_bytes": int(p.compare_bytes)}


_LATENCIES = ("host_read_p50", "host_read_p99", "host_write_p50", "host_write_p99", "host_flush_p50",
              "host_flush_p99", "idle_read_p99", "idle_write_p99", "idle_flush_p99", "host_merge_p50",
              "host_merge_p99", "idle_merge_p99")


class Job:
    """The background copy started by :meth:`Pair.establish`,
    :meth:`Pair.restore` or :meth:`Pair.resume`.

    The copy runs on C threads; ``wait`` blocks (in short slices, so Ctrl-C
    works and a ``Pair.close()`` from another thread ends it with
    ClosedError) until it finishes.
    """

    def __init__(self, pair: "Pair", kind: str) -> None:
        self.pair = pair
        self.kind = kind  # "establish" or "restore"

    @property
    def progress(self) -> Progress:
        return self.pair.progress

    @property
    def done(self) -> bool:
        return not self.progress.running

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait until the copy is done.  Returns True when done, False when
        ``timeout`` seconds passed first.

        Raises :class:`JobError` if the job is paused on an error (the error
        names the failing track), :class:`JobPausedError` if, with no
        timeout, the job is paused (on request, or because the pair was
        reopened mid-copy: it would never end by itself; with a timeout,
        wait returns False at the timeout unless someone resumes it), and
        :class:`ClosedError` if the pair is closed meanwhile."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            slice_ms = _SLICE_MS
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                slice_ms = max(1, min(slice_ms, int(left * 1000)))
            try:
                if self.pair._job_wait(slice_ms):
                    self._ended()
                    return True
                if deadline is None:
                    prog = self.progress
                    if prog.running and prog.paused and prog.error is None:
                        raise errors.JobPausedError(
                            f"the {self.kind} of {self.pair._name} is paused "
                            f"({prog.tracks_pending} of {prog.tracks_total} tracks left) and will not finish "
                            f"by itself: resume it (job.resume(), pair.resume() or `pymirror resume`), "
                            f"or wait with a timeout")
            except errors.JobPausedError:
                raise
            except errors.ClosedError:
                raise errors.ClosedError(
                    f"{self.pair._what} was closed while waiting for its {self.kind}") from None
            except errors.JobError:
                prog = self.progress
                raise errors.JobError(
                    f"the {self.kind} of {self.pair._name} stopped on track {prog.error_track}: "
                    f"{prog.error}; fix the cause, then resume") from None

    def _ended(self) -> None:
        """Keep the finished job's copy rate beside the metadata, for plans
        (pymirror.plan); a failure to write it is not the job's."""
        from .plan import record_rate
        try:
            record_rate(self.pair, self.progress, self.kind)
        except errors.ClosedError:
            pass

    def pause(self) -> None:
        """Pause the copy (host I/O goes on; ``resume`` continues it)."""
        self.pair._job_pause()

    def resume(self) -> None:
        """Continue a paused copy."""
        self.pair.resume()

    def set_rate(self, rate: int) -> None:
        """Bytes per second for the background copy (0: no limit), live."""
        if rate < 0:
            raise ValueError(f"rate must not be negative, got {rate}")
        self.pair._job_set_rate(rate)

    def __repr__(self) -> str:
        p = self.progress
        return f"<Job {self.kind} {p.tracks_done}/{p.tracks_total} tracks state={p.state}>"
