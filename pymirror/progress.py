"""Showing a job's progress: a live bar on a terminal (tqdm), plain
periodic lines otherwise (logs, CI, pipes)."""
from __future__ import annotations

import os
import sys
import time
from typing import IO, Optional

from .job import Job, Progress
from .sizes import format_seconds

MiB = 1 << 20


def describe(p: Progress) -> str:
    """One line: tracks, percentage, rate, ETA and arbitration counters."""
    line = (
        f"{p.tracks_done}/{p.tracks_total} tracks ({100 * p.fraction:.1f}%), "
        f"{p.rate / MiB:.1f} MiB/s, ETA {format_seconds(p.eta)}"
    )
    extra = []
    if p.tracks_skipped:
        extra.append(f"{p.tracks_skipped} skipped by host writes")
    if p.tracks_merged:
        extra.append(f"{p.tracks_merged} merged")
    if p.reads_redirected:
        extra.append(f"{p.reads_redirected} reads redirected")
    if p.reads_hydrated:
        extra.append(f"{p.reads_hydrated} reads hydrated")
    if p.paused:
        extra.append("PAUSED" + (f" on error at track {p.error_track}: {p.error}" if p.error else ""))
    return line + (f" [{', '.join(extra)}]" if extra else "")


def follow(job: Job, label: str, stream: Optional[IO[str]] = None,
           interval: float = 2.0, tty: Optional[bool] = None) -> Progress:
    """Wait for ``job`` while showing progress on ``stream`` (stderr by
    default).  Returns the final progress; raises JobError if the job stops
    on an error."""
    stream = stream if stream is not None else sys.stderr
    if tty is None:
        tty = bool(getattr(stream, "isatty", lambda: False)())
    if tty:
        return _follow_bar(job, label, stream)
    return _follow_lines(job, label, stream, interval)


def _follow_bar(job: Job, label: str, stream: IO[str]) -> Progress:
    from tqdm import tqdm

    p = job.progress
    try:
        cols = os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):
        cols = 0
    # some terminals (serial consoles, `script`) report 0 columns: use 100
    sizing: dict[str, object] = {"dynamic_ncols": True} if cols > 0 else {"ncols": 100}
    with tqdm(total=p.tracks_total, unit="track", desc=label, file=stream, leave=True,
              **sizing) as bar:  # type: ignore[call-overload]
        while True:
            finished = job.wait(timeout=0.25)
            p = job.progress
            bar.n = p.tracks_done
            bar.set_postfix_str(f"{p.rate / MiB:.1f} MiB/s ETA {format_seconds(p.eta)}", refresh=False)
            bar.refresh()
            if finished:
                return p


def _follow_lines(job: Job, label: str, stream: IO[str], interval: float) -> Progress:
    last = time.monotonic()
    while True:
        finished = job.wait(timeout=min(interval, 0.5))
        p = job.progress
        now = time.monotonic()
        if finished:
            print(f"{label}: done, {describe(p)} in {p.elapsed:.2f} s", file=stream, flush=True)
            return p
        if now - last >= interval:
            print(f"{label}: {describe(p)}", file=stream, flush=True)
            last = now
