"""One pair as the daemon holds it: the open Pair (or why it failed to
open), the daemon's own flags, the watcher that turns changes of state and
progress into events, and the online verify job.

Lock rules: ``lock`` serialises the commands on one pair (a group command
takes its pairs' locks in name order); ``_watch`` serialises ``watch()``
alone and is never held while taking ``lock``.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Optional

from .. import errors
from ..config import CopyConfig
from ..report import verify_result
from .events import PROGRESS_INTERVAL, EventHub


RECHECKS = 3   # times a track found to differ is compared again before it is reported


def one_line(exc: BaseException) -> str:
    """A one-line message for an exception (its class when it says nothing)."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        text = f"{where}{exc.strerror}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


class VerifyJob:
    """Compare the two sides in C (compare.py) on a thread, with progress
    events, while the host keeps using the pair.  Tracks found to
    differ are compared again at the end (up to RECHECKS times), so a host
    write that raced the scan is not reported as a difference."""

    def __init__(self, held: "HeldPair") -> None:
        self.held = held
        self.pair = held.pair
        self.tracks = self.pair.tracks
        self.done_tracks = 0
        self.result: Optional[dict[str, Any]] = None
        self.error: Optional[BaseException] = None
        self.finished = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"verify-{held.name}", daemon=True)

    def start(self) -> "VerifyJob":
        self._thread.start()
        return self

    def cancel(self) -> None:
        self._stop.set()

    def join(self, timeout: Optional[float] = None) -> None:
        self.finished.wait(timeout)

    def _compare(self, t: int, n: int, a: bytearray, b: bytearray) -> list[int]:
        pair, ts = self.pair, self.pair.track_size
        off = t * ts
        length = min(n * ts, pair.size - off)
        if length != len(a):
            a, b = bytearray(length), bytearray(length)
        pair.readinto(off, a)
        pair.mirror_readinto(off, b)
        if a == b:
            return []
        return [t + i for i in range(n) if a[i * ts:(i + 1) * ts] != b[i * ts:(i + 1) * ts]]

    def _scan(self) -> list[int]:
        """The C comparison (both sides read at once; compare.py), with
        progress events; then the differing tracks are compared again
        through the host's reads, so a write that raced the scan is not
        reported."""
        from ..compare import Comparison

        comp = Comparison(self.pair).start()
        last = 0.0
        while not comp.wait(0.1):
            if self._stop.is_set():
                comp.cancel()
                comp.wait()
                raise errors.MirrorError("verify cancelled")
            pr = comp.progress()
            self.done_tracks = pr.tracks_done
            now = time.monotonic()
            if now - last >= PROGRESS_INTERVAL:
                last = now
                self.held.emit("job-progress", kind="verify", tracks_total=self.tracks,
                               tracks_done=pr.tracks_done, tracks_pending=self.tracks - pr.tracks_done,
                               fraction=pr.fraction, differing=pr.tracks_differ)
        diff: list[int] = comp.result()
        self.done_tracks = self.tracks
        ts = self.pair.track_size
        try:
            for _ in range(RECHECKS):       # a host write racing the scan differs only for a moment
                if not diff:
                    break
                time.sleep(0.01)
                diff = [x for x in diff if self._compare(x, 1, bytearray(ts), bytearray(ts))]
        except (errors.StateError, errors.ReadOnlyError):
            pass                            # a side the host may not read now: the C result stands
        return diff

    def _run(self) -> None:
        try:
            diff = self._scan()
            self.result = verify_result(self.pair, diff)
            self.held.last_verify = dict(self.result, finished=time.time())
            self.held.emit("job-done", kind="verify", equal=self.result["equal"],
                           differing=len(diff), tracks_total=self.tracks,
                           summary="equal" if not diff else f"{len(diff)} tracks differ")
        except BaseException as exc:  # noqa: BLE001 - reported to the waiter and as an event
            self.error = exc
            self.held.emit("job-done", kind="verify", error=one_line(exc), summary=one_line(exc))
        finally:
            self.finished.set()


PACE_FIELDS = ("host_read_p50", "host_read_p99", "host_write_p50", "host_write_p99", "host_flush_p50",
               "host_flush_p99", "idle_read_p99", "idle_write_p99", "idle_flush_p99", "host_merge_p50", "host_merge_p99",
               "idle_merge_p99", "pace_rate", "tracks_hot")


class HeldPair:
    def __init__(self, name: str, meta: str, hub: EventHub) -> None:
        self.name = name
        self.meta = meta
        self.hub = hub
        self.pair: Any = None
        self.error: Optional[str] = None      # why the pair failed to open
        self.open_error: Optional[BaseException] = None
        self.paused_by_request = False
        self.exported = True
        self.copy: dict[str, Any] = {}        # copy settings (rate, ...) remembered across restarts
        self.lock = threading.RLock()
        self.verify: Optional[VerifyJob] = None
        self.last_verify: Optional[dict[str, Any]] = None
        self._watch = threading.Lock()
        self._last: Optional[tuple[str, bool, bool, Optional[str]]] = None
        self._last_progress = 0.0
        self._last_pending: Optional[int] = None
        self._expect_done: Optional[str] = None
        self._cancelled = False

    # -- lifetime -----------------------------------------------------------
    def open(self, config: Optional[CopyConfig]) -> bool:
        from ..pair import Pair

        try:
            self.pair = Pair.open(self.meta, config=config)
            self.error = None
        except Exception as exc:  # noqa: BLE001 - reported; the daemon serves the other pairs
            self.pair, self.error, self.open_error = None, one_line(exc), exc
            return False
        self._last = None
        self.watch()
        return True

    def close(self) -> None:
        """Stop a verify, then commit and close the pair (callers hold ``lock``;
        ``_watch`` keeps the monitor off the pair while it is freed)."""
        if self.verify is not None:
            self.verify.cancel()
            self.verify.join(30)
        with self._watch:
            pair, self.pair = self.pair, None
            if pair is not None:
                pair.close()

    def need(self) -> Any:
        """The open Pair, or a StateError saying why there is none."""
        if self.pair is None:
            raise errors.StateError(f"pair {self.name} is not open ({self.error}); "
                                    f"fix the cause, then attach it again")
        return self.pair

    @property
    def kind(self) -> str:
        pair = self.pair
        if pair is None:
            return "none"
        return str(getattr(pair, "_job_kind", "restore" if pair.state == "restoring" else "establish"))

    # -- events ---------------------------------------------------------------
    def emit(self, name: str, **data: Any) -> None:
        self.hub.emit(name, dict(pair=self.name, **data))

    def job_started(self, kind: str) -> None:
        self._expect_done = kind
        self._cancelled = False

    def job_cancelled(self) -> None:
        self._cancelled = True

    def _emit_detached(self) -> None:
        """A failing mirror was detached (branch detach): one warning event
        with the record (error, track, time) and the way to repair it."""
        from ..detach import describe
        record = getattr(self.pair, "detached", None) if self.pair is not None else None
        if record:
            self.emit("mirror-detached", summary=describe(record, self.name), **record)

    def watch(self, progress: bool = False) -> None:
        """Compare the pair with what was last seen and emit the events for
        the difference (state changed, job started/paused/resumed/done, and
        with ``progress`` a job-progress at most every PROGRESS_INTERVAL)."""
        pair = self.pair
        if pair is None:
            return
        with self._watch:
            try:
                p = pair.progress
            except errors.ClosedError:
                return
            now = (p.state, p.running, p.paused, p.error)
            last, self._last = self._last, now
            if last is None:
                return
            lstate, lrunning, lpaused, _ = last
            kind = self.kind
            if p.state != lstate:
                self.emit("state-changed", **{"from": lstate, "to": p.state})
                if p.state == "detached":
                    self._emit_detached()
            if p.running and not lrunning:
                self.emit("job-started", kind=kind, tracks_total=p.tracks_total,
                          incremental=p.incremental)
            if p.running and p.paused and not (lrunning and lpaused):
                self.emit("job-paused", kind=kind, error=p.error, error_track=p.error_track,
                          by_request=self.paused_by_request and not p.error,
                          tracks_pending=p.tracks_pending)
            if p.running and lrunning and lpaused and not p.paused:
                self.emit("job-resumed", kind=kind, tracks_pending=p.tracks_pending)
            if not p.running and (lrunning or self._expect_done):
                cancelled, self._cancelled = self._cancelled, False
                self.emit("job-done", kind=self._expect_done or kind, state=p.state,
                          cancelled=cancelled, tracks_total=p.tracks_total,
                          bytes_written=p.bytes_written, elapsed=round(p.elapsed, 3),
                          summary=("cancelled" if cancelled else
                                   f"{p.tracks_total} tracks, {p.bytes_written} bytes in {p.elapsed:.2f} s"))
                self._expect_done = None
                from ..plan import record_rate           # the rate a plan estimates from
                record_rate(pair, p, kind)
            if progress and p.running and not p.paused:
                t = time.monotonic()
                if t - self._last_progress >= PROGRESS_INTERVAL * 0.9 and p.tracks_pending != self._last_pending:
                    self._last_progress, self._last_pending = t, p.tracks_pending
                    eta = p.eta
                    self.emit("job-progress", kind=kind, tracks_total=p.tracks_total,
                              tracks_pending=p.tracks_pending, tracks_done=p.tracks_done,
                              fraction=round(p.fraction, 6), rate=round(p.rate),
                              eta=None if eta is None else round(eta, 1),
                              bytes_written=p.bytes_written,
                              # pacing and hot order (issue 13): what `watch` shows
                              **{k: getattr(p, k, None) for k in PACE_FIELDS})
