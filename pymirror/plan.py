"""Plans: what a restore or an establish would do, before it starts.

``Pair.plan_restore(...)`` and ``Pair.plan_establish(...)`` (and ``pymirror
restore --dry-run``, ``establish --dry-run``, the daemon's ``plan`` verb)
answer without changing anything -- no table, no state, no metadata byte --
with the tracks the job would copy (every track, or for an incremental job
CHANGED(standard) ∪ CHANGED(mirror), exactly as the core computes them when
the job starts), how many bytes that is on each side, how much of it the
source holds as holes or zero extents (those are zeroed on the target, not
copied: ``docs/copier.md``), and an estimated time from the last measured
copy rate.

The rate comes from a small JSON file beside the pair's metadata
(``META.rate.json``), rewritten atomically whenever a job ends in Python
(``Job.wait`` returning, or the daemon seeing it done): the bytes of data the
job wrote over its elapsed time (a job that wrote less than 16 MiB of data
does not replace the rate of a larger one: its time is mostly fixed costs).  Holes and zero extents cost no data I/O
and are left out of the estimate.  Without such a file the plan says "no
measured rate yet".

What a plan cannot see: tracks whose data reads as zeroes but which the
source stores as data (block devices and memory volumes report no holes;
the copier finds their zeroes by reading them, a plan reads no data), and
host writes made between the plan and the job.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from typing import TYPE_CHECKING, Any, Optional

from . import errors
from .sizes import format_size

if TYPE_CHECKING:  # pragma: no cover
    from .job import Progress
    from .pair import Pair

RATE_SUFFIX = ".rate.json"
SMALL_JOB = 16 << 20        # a job writing less data than this does not replace a larger one's rate


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a job would do.  Byte counts are of the tracks the job would
    copy: ``bytes == data_bytes + zero_bytes``."""

    kind: str                    # "restore" or "establish"
    incremental: bool
    protect: Optional[bool]      # restores only
    state: str                   # the pair's state now
    source: str                  # "mirror" for a restore, "standard" for an establish
    target: str
    track_size: int
    tracks: int                  # tracks the job would copy
    tracks_total: int            # tracks of the volume
    bytes: int                   # their bytes (the last track may be short)
    changed_standard: int        # tracks CHANGED on each side now (what an incremental job copies)
    changed_mirror: int
    data_tracks: int             # tracks holding at least some data on the source
    zero_tracks: int             # tracks that are wholly holes or zeroes on the source
    data_bytes: int              # bytes to read from the source and write to the target
    zero_bytes: int              # bytes to zero on the target instead
    rate: Optional[float]        # bytes/s of data the last job copied, or None
    rate_measured: Optional[str]  # when (UTC, ISO 8601), and by which kind of job
    estimated_seconds: Optional[float]
    ranges: list[tuple[int, int]]   # the tracks to copy, as [first, last] ranges

    @property
    def reads(self) -> dict[str, int]:
        """Bytes the job would read from each side."""
        return {self.source: self.data_bytes, self.target: 0}

    @property
    def writes(self) -> dict[str, int]:
        """Bytes the job would write (data) on each side; zeroing is counted apart."""
        return {self.source: 0, self.target: self.data_bytes}

    def as_dict(self, ranges: bool = True) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ranges"] = [list(r) for r in self.ranges] if ranges else None
        d.update(reads=self.reads, writes=self.writes, zeroes={self.target: self.zero_bytes})
        return d

    def describe(self, label: str = "") -> str:
        """Lines for a person (what ``--dry-run`` prints)."""
        return describe(self.as_dict(ranges=False), label)


def describe(d: dict[str, Any], label: str = "") -> str:
    """A plan's lines for a person, from its :meth:`Plan.as_dict` form
    (which is also what the daemon sends)."""
    what = ("an incremental " if d["incremental"] else "a full ") + d["kind"]
    if d["kind"] == "restore":
        what += ", protected" if d["protect"] else ", unprotected"
    src, dst = d["source"], d["target"]
    lines = [f"{label + ': ' if label else ''}dry run of {what} (the pair is {d['state']}; nothing was changed)"]
    if d["tracks"] == 0:
        lines.append("  nothing to copy: no track changed on either side since the split")
    else:
        lines.append(f"  tracks to copy: {d['tracks']} of {d['tracks_total']} "
                     f"({format_size(d['bytes'])}) from the {src} to the {dst}")
    if d["incremental"]:
        lines.append(f"  changed since the split: {d['changed_standard']} tracks on the standard, "
                     f"{d['changed_mirror']} on the mirror")
    lines.append(f"  {src}: reads {format_size(d['data_bytes'])}; {dst}: writes {format_size(d['data_bytes'])} "
                 f"of data, zeroes {format_size(d['zero_bytes'])} (holes or zeroes on the {src})")
    lines.append(f"  tracks with data: {d['data_tracks']}; wholly holes or zeroes: {d['zero_tracks']}")
    if d["estimated_seconds"] is None:
        lines.append("  estimated time: no measured rate yet (a job run on this pair measures one)")
    else:
        lines.append(f"  estimated time: {_seconds(d['estimated_seconds'])} at "
                     f"{format_size(int(d['rate'] or 0))}/s of data (measured {d['rate_measured']})")
    return "\n".join(lines)


def _seconds(s: float) -> str:
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 120:
        return f"{s:.1f} s"
    return f"{int(s // 60)} min {int(s % 60)} s"


# -- the rate file --------------------------------------------------------------------

def rate_path(meta_path: str) -> str:
    return os.fspath(meta_path) + RATE_SUFFIX


def last_rate(meta_path: Optional[str]) -> Optional[dict[str, Any]]:
    """The last measured rate of the pair (the rate file's content), or None."""
    if not meta_path:
        return None
    try:
        with open(rate_path(meta_path), encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("bytes_per_second"), (int, float)) \
            or data["bytes_per_second"] <= 0:
        return None
    return data


def record_rate(pair: "Pair", progress: "Progress", kind: str) -> bool:
    """Keep the data rate of a job that has ended (written atomically beside
    the metadata).  A job that wrote no data measures nothing.  Returns True
    when written; never raises for a file it cannot write."""
    if not pair.meta_path or progress.running or progress.bytes_written <= 0 or progress.elapsed <= 0:
        return False
    data = {
        "bytes_per_second": progress.bytes_written / progress.elapsed,
        "kind": kind,
        "incremental": progress.incremental,
        "bytes_written": progress.bytes_written,
        "bytes_zeroed": progress.bytes_zeroed,
        "bytes_read": progress.bytes_read,
        "tracks": progress.tracks_total,
        "elapsed": progress.elapsed,
        "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path = rate_path(pair.meta_path)
    old = last_rate(pair.meta_path)
    if old is not None and all(old.get(k) == data[k] for k in ("bytes_written", "bytes_zeroed", "elapsed", "kind")):
        return False                    # the same job, seen again
    if old is not None and progress.bytes_written < SMALL_JOB and old.get("bytes_written", 0) > progress.bytes_written:
        return False                    # a small job's rate is mostly fixed costs: keep the larger measurement
    try:
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", dir=os.path.dirname(path) or ".")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, sort_keys=True)
                f.write("\n")
            # No fsync: a hint for plans, not the pair's state; after a crash
            # a lost or empty file reads as "no rate measured" (last_rate),
            # and the sync would be the command's last wait for the disk.
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        return False
    return True


# -- planning ------------------------------------------------------------------------

def _check_state(pair: "Pair", kind: str, incremental: bool) -> None:
    """The refusal the command itself would give, without giving it."""
    state = pair.state
    if kind == "establish":
        if state == "new" and incremental:
            raise errors.StateError(f"establish {pair._name}: the pair is new; an incremental establish is "
                                    "allowed only when split or restored (a pair established once); "
                                    "use a full establish")
        if state not in ("new", "split", "restored"):
            raise errors.StateError(f"establish {pair._name}: the pair is {state}; establish is allowed "
                                    "when new, split or restored")
        return
    if state not in ("split", "restored"):
        raise errors.StateError(f"restore {pair._name}: the pair is {state}; restore is allowed when "
                                "split or restored")
    invalid = pair.mirror_invalid
    if invalid:
        raise errors.StateError(f"restore {pair._name}: the mirror is inconsistent: {invalid} of its tracks "
                                "are not part of a point-in-time image (an establish was cancelled or "
                                "failed); establish again before restoring from it")


def _track_runs(pair: "Pair", incremental: bool) -> list[tuple[int, int]]:
    """[first, last] runs of the tracks the job would mark PENDING."""
    from ._native import lib
    from .tables import Bitmap

    n = pair.tracks
    if not incremental:
        return [(0, n - 1)] if n else []
    union = Bitmap(n)
    with pair._call as p:
        for side in (lib.PM_STANDARD, lib.PM_MIRROR):
            changed = lib.pm_table_flag(lib.pm_pair_table(p, side), lib.PM_CHANGED)
            lib.pm_bitmap_union(union._p, changed)
    runs: list[tuple[int, int]] = []
    pos = 0
    while pos < n:
        run = union.next_run(pos, n)
        if run is None:
            break
        start, length = run
        runs.append((start, start + length - 1))
        pos = start + length
    return runs


def plan(pair: "Pair", kind: str, incremental: bool = False, protect: Optional[bool] = None) -> Plan:
    """The plan of a restore (``kind="restore"``) or an establish."""
    from .pair import track_counts

    if kind not in ("restore", "establish"):
        raise ValueError(f"kind must be 'restore' or 'establish', got {kind!r}")
    _check_state(pair, kind, incremental)
    source, target = ("mirror", "standard") if kind == "restore" else ("standard", "mirror")
    ts, size = pair.track_size, pair.size
    runs = _track_runs(pair, incremental)
    counts = track_counts(pair)
    # the source's extents over the whole volume, walked beside the runs
    extents = pair.block_status(0, size, context="allocation", side=source)
    tracks = nbytes = data_bytes = data_tracks = 0
    ei = 0
    for first, last in runs:
        lo, hi = first * ts, min((last + 1) * ts, size)
        tracks += last - first + 1
        nbytes += hi - lo
        t = first
        while t <= last:
            t_lo, t_hi = t * ts, min((t + 1) * ts, size)
            while ei < len(extents) and extents[ei][0] + extents[ei][1] <= t_lo:
                ei += 1
            # the data in this track, and how far the extent under it reaches
            data, j = 0, ei
            while j < len(extents) and extents[j][0] < t_hi:
                e_lo, e_hi = max(extents[j][0], t_lo), min(extents[j][0] + extents[j][1], t_hi)
                if extents[j][2] == 0:
                    data += e_hi - e_lo
                j += 1
            if ei < len(extents) and extents[ei][0] <= t_lo and extents[ei][0] + extents[ei][1] >= t_hi + ts \
                    and t < last:
                # one extent covers this track and the next ones: count them all at once
                e_end = extents[ei][0] + extents[ei][1]
                k = min(last, e_end // ts - 1)
                span_hi = min((k + 1) * ts, size)
                if extents[ei][2] == 0:
                    data_bytes += span_hi - t_lo
                    data_tracks += k - t + 1
                t = k + 1
                continue
            data_bytes += data
            data_tracks += data > 0
            t += 1
    rate = last_rate(pair.meta_path)
    bps = float(rate["bytes_per_second"]) if rate else None
    return Plan(
        kind=kind, incremental=incremental, protect=(True if protect is None else protect) if kind == "restore"
        else None,
        state=str(pair.state), source=source, target=target, track_size=ts,
        tracks=tracks, tracks_total=pair.tracks, bytes=nbytes,
        changed_standard=counts["standard"]["changed"], changed_mirror=counts["mirror"]["changed"],
        data_tracks=data_tracks, zero_tracks=tracks - data_tracks,
        data_bytes=data_bytes, zero_bytes=nbytes - data_bytes,
        rate=bps, rate_measured=(f"{rate.get('measured')} by a{'n incremental' if rate.get('incremental') else ' full'} "
                                 f"{rate.get('kind')}" if rate else None),
        estimated_seconds=(data_bytes / bps if bps else None),
        ranges=runs,
    )
