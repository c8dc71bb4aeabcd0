"""The JSON shapes of ``query`` and ``verify``: one source for both paths.

``pymirror query --json`` / ``verify --json`` acting on a pair directly and
the daemon's ``query`` / ``verify`` verbs return exactly these dicts, so a
script sees the same output whichever way the command went.

query_dict keys:

- ``meta``: the metadata path (None for a pair kept in memory);
- ``state``: one of ``new syncing established split restoring restored``;
- ``size``, ``track_size``, ``tracks``: the geometry;
- ``standard`` / ``mirror``: ``{"path", "pending", "changed"}`` (track counts),
  ``kind`` (``file``, ``memory``, ``nbd``, ``rbd``) and
  ``detects_outside_changes`` (False for remote volumes: nothing can see a
  write made to them behind pymirror's back; docs/volumes.md);
- ``mirror_invalid``: mirror tracks that are not part of a point-in-time
  image (0 = the mirror is consistent), and ``mirror_consistent`` (bool);
- ``job``: None when no copy exists; while an establish or restore exists
  (running or paused) a dict with ``kind`` (``"establish"``/``"restore"``),
  ``tracks_total``, ``tracks_pending``, ``tracks_done``, ``paused``, ``error``,
  ``error_track``, ``rate`` (bytes/s so far), ``rate_limit`` (bytes/s, 0 =
  none), ``eta`` (seconds or None), ``fraction`` and the other counters of
  :class:`pymirror.Progress`;
- ``last_job``: the counters of the copy that finished last (same shape as
  ``job``), or None; kept so a script can see what a completed job did.

verify_dict keys: ``meta``, ``equal`` (bool), ``tracks``, ``track_size``,
``differing`` (the numbers of the tracks that differ, ascending).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from . import errors

if TYPE_CHECKING:  # pragma: no cover
    from .pair import Pair


def _mirror_invalid(pair: "Pair", progress: Any) -> int:
    # Pair.mirror_invalid comes with the core's consistency marker; older
    # cores have none and every mirror they keep counts as consistent.
    value = getattr(pair, "mirror_invalid", None)
    if value is None:
        value = getattr(progress, "mirror_invalid", 0)
    return int(value or 0)


def job_dict(pair: "Pair", progress: Any = None) -> dict[str, Any]:
    """The progress of the pair's (current or last) copy as a JSON-able dict."""
    p = progress if progress is not None else pair.progress
    d = p.as_dict()
    d["kind"] = getattr(pair, "_job_kind", "restore" if p.state == "restoring" else "establish")
    d["rate_limit"] = int(pair.config.rate)
    return d


def _volume_kind(volume: Any) -> dict[str, Any]:
    """``kind`` (file, memory, nbd, rbd) and ``detects_outside_changes``:
    whether pymirror can tell the volume was written behind its back."""
    kind = getattr(volume, "kind", "file")
    return {"kind": kind, "detects_outside_changes": bool(getattr(volume, "detects_outside_changes", True))}


def query_dict(pair: "Pair") -> dict[str, Any]:
    """State, geometry, track counts, consistency and progress of ``pair``."""
    from .pair import track_counts

    p = pair.progress
    counts = track_counts(pair)
    invalid = _mirror_invalid(pair, p)
    job = job_dict(pair, p) if p.running else None
    last = job_dict(pair, p) if not p.running and p.tracks_total else None
    return {
        "meta": pair.meta_path,
        "state": pair.state,
        "size": pair.size,
        "track_size": pair.track_size,
        "tracks": pair.tracks,
        "standard": {"path": pair.standard.path, **counts["standard"], **_volume_kind(pair.standard)},
        "mirror": {"path": pair.mirror.path, **counts["mirror"], **_volume_kind(pair.mirror)},
        "mirror_invalid": invalid,
        "mirror_consistent": invalid == 0,
        "job": job,
        "last_job": last,
    }


def verify_dict(pair: "Pair", name: Optional[str] = None) -> dict[str, Any]:
    """Compare the two sides track by track (reads both volumes whole).

    Refused with :class:`StateError` while a copy exists: verify compares
    settled volumes.  ``name`` is used in that message (default: the meta
    path)."""
    label = name or pair.meta_path or "the pair"
    if pair.progress.running:
        raise errors.StateError(f"{label}: a copy is in progress ({pair.state}); "
                                f"verify compares settled volumes: resume it and let it finish first")
    return verify_result(pair, pair.verify())


def verify_result(pair: "Pair", differing: list[int]) -> dict[str, Any]:
    """The verify dict for a comparison already made (the daemon's online
    verify scans in its own steps, with progress, and reports through here)."""
    diff = sorted(differing)
    return {"meta": pair.meta_path, "equal": not diff, "tracks": pair.tracks,
            "track_size": pair.track_size, "differing": diff}
