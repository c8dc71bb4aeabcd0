"""Showing a job's progress: a live bar on a terminal (tqdm), plain
periodic lines otherwise (logs, CI, pipes).

The same display serves a job running in this process and one running in a
daemon: both are followed through two callables, ``wait(timeout)`` (answers
``"done"``, ``"paused-error"`` or ``"timeout"``) and ``snapshot()`` (the job's
counters as the dict of :func:`pymirror.report.query_dict`'s ``job``).
"""
from __future__ import annotations

import os
import sys
import time
from typing import IO, Any, Callable, Mapping, Optional, Union

from .job import Job, Progress
from .sizes import format_seconds

MiB = 1 << 20
Snapshot = Mapping[str, Any]


def _get(p: "Progress | Snapshot", key: str, default: Any = 0) -> Any:
    if isinstance(p, Mapping):
        return p.get(key, default)
    return getattr(p, key, default)


def describe(p: "Union[Progress, Snapshot]") -> str:
    """One line: tracks, percentage, rate, ETA and arbitration counters."""
    total, done = _get(p, "tracks_total"), _get(p, "tracks_done")
    fraction = _get(p, "fraction", 1.0)
    line = (f"{done}/{total} tracks ({100 * fraction:.1f}%), "
            f"{(_get(p, 'rate') or 0) / MiB:.1f} MiB/s, ETA {format_seconds(_get(p, 'eta', None))}")
    extra = []
    if _get(p, "comparing", False):
        extra.append(f"comparing: {_get(p, 'tracks_compared')}/{total} compared, "
                     f"{_get(p, 'tracks_equal')} equal")
    elif _get(p, "compare", False):
        extra.append(f"{_get(p, 'tracks_equal')} of {total} equal, not copied")
    if _get(p, "tracks_skipped"):
        extra.append(f"{_get(p, 'tracks_skipped')} skipped by host writes")
    if _get(p, "tracks_merged"):
        extra.append(f"{_get(p, 'tracks_merged')} merged")
    if _get(p, "reads_redirected"):
        extra.append(f"{_get(p, 'reads_redirected')} reads redirected")
    if _get(p, "reads_hydrated"):
        extra.append(f"{_get(p, 'reads_hydrated')} reads hydrated")
    pace = pace_text(p)
    if pace:
        extra.append(pace)
    if _get(p, "paused", False):
        error = _get(p, "error", None)
        extra.append("PAUSED" + (f" on error at track {_get(p, 'error_track', None)}: {error}" if error else ""))
    return line + (f" [{', '.join(extra)}]" if extra else "")


def _ms(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1e3:.2f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.0f} us"


def pace_text(p: "Union[Progress, Snapshot]") -> str:
    """Host latency seen during the job, the idle baseline, the paced rate
    and the hot tracks taken first ("" when there is nothing to say)."""
    parts = []
    for kind in ("read", "write", "merge", "flush"):
        p99 = _get(p, f"host_{kind}_p99", None)
        if p99:
            idle = _get(p, f"idle_{kind}_p99", None)
            parts.append(f"{kind} p50/p99 {_ms(_get(p, f'host_{kind}_p50', None))}/{_ms(p99)}"
                         + (f" (idle p99 {_ms(idle)})" if idle else ""))
    rate = _get(p, "pace_rate", 0)
    if rate:
        parts.append(f"paced to {rate / MiB:.1f} MiB/s")
    if _get(p, "tracks_hot", 0):
        parts.append(f"{_get(p, 'tracks_hot')} hot tracks first")
    return "host " + ", ".join(parts) if parts and parts[0][0] in "rwmf" else ", ".join(parts)


def follow(job: Job, label: str, stream: Optional[IO[str]] = None,
           interval: float = 2.0, tty: Optional[bool] = None) -> Progress:
    """Wait for ``job`` (in this process) while showing progress on
    ``stream`` (stderr by default).  Returns the final progress; raises
    JobError if the job stops on an error."""
    def wait(timeout: float) -> str:
        return "done" if job.wait(timeout=timeout) else "timeout"   # JobError propagates

    follow_snapshots(wait, lambda: job.progress.as_dict(), label, stream, interval, tty)
    return job.progress


def follow_snapshots(wait: Callable[[float], str], snapshot: Callable[[], Optional[Snapshot]],
                     label: str, stream: Optional[IO[str]] = None, interval: float = 2.0,
                     tty: Optional[bool] = None) -> tuple[str, Optional[Snapshot]]:
    """Follow a job until ``wait`` answers ``"done"`` or ``"paused-error"``;
    returns that answer and the last snapshot."""
    stream = stream if stream is not None else sys.stderr
    if tty is None:
        tty = bool(getattr(stream, "isatty", lambda: False)())
    if tty:
        return _follow_bar(wait, snapshot, label, stream)
    return _follow_lines(wait, snapshot, label, stream, interval)


def _follow_bar(wait: Callable[[float], str], snapshot: Callable[[], Optional[Snapshot]],
                label: str, stream: IO[str]) -> tuple[str, Optional[Snapshot]]:
    from tqdm import tqdm

    p = snapshot() or {}
    try:
        cols = os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):
        cols = 0
    # some terminals (serial consoles, `script`) report 0 columns: use 100
    sizing: dict[str, object] = {"dynamic_ncols": True} if cols > 0 else {"ncols": 100}
    with tqdm(total=p.get("tracks_total", 0), unit="track", desc=label, file=stream, leave=True,
              **sizing) as bar:  # type: ignore[call-overload]
        while True:
            status = wait(0.25)
            p = snapshot() or p
            bar.total = p.get("tracks_total", bar.total)
            bar.n = p.get("tracks_done", 0)
            postfix = f"{(p.get('rate') or 0) / MiB:.1f} MiB/s ETA {format_seconds(p.get('eta'))}"
            if p.get("paused"):
                postfix += " PAUSED"
            bar.set_postfix_str(postfix, refresh=False)
            bar.refresh()
            if status != "timeout":
                return status, p


def _follow_lines(wait: Callable[[float], str], snapshot: Callable[[], Optional[Snapshot]],
                  label: str, stream: IO[str], interval: float) -> tuple[str, Optional[Snapshot]]:
    last = time.monotonic()
    p: Optional[Snapshot] = None
    while True:
        status = wait(min(interval, 0.5))
        p = snapshot() or p
        now = time.monotonic()
        if status == "done":
            if p is not None:
                print(f"{label}: done, {describe(p)} in {p.get('elapsed', 0.0):.2f} s", file=stream, flush=True)
            else:
                print(f"{label}: done", file=stream, flush=True)
            return status, p
        if status != "timeout":
            return status, p
        if now - last >= interval and p is not None:
            print(f"{label}: {describe(p)}", file=stream, flush=True)
            last = now
