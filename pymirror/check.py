"""The health of a metadata file (``pymirror check META``).

Reads both header slots and every table of each, without opening the pair
or its volumes, and writes nothing (the C helper ``pm_meta_check``).  The
verdict, also the command's exit code:

- ``0`` healthy: both slots valid (the newer one is what a pair would use);
- ``1`` damaged but usable: one slot is invalid, the other is used (after a
  crash cut a commit short this is expected, and the next commit rewrites
  the bad slot; otherwise the file was damaged);
- ``2`` unusable: no valid slot (or not a pymirror metadata file, or a
  format newer than this pymirror).
"""
from __future__ import annotations

import os
from typing import Any, Union

from ._native import ffi, lib
from .state import STATES

PathLike = Union[str, "os.PathLike[str]"]
HEALTHY, DAMAGED, UNUSABLE = 0, 1, 2
TABLES = ("PENDING(standard)", "CHANGED(standard)", "PENDING(mirror)", "CHANGED(mirror)",
          "INTENT(standard)", "INTENT(mirror)")
VERDICTS = {HEALTHY: "healthy", DAMAGED: "damaged but usable", UNUSABLE: "unusable"}


def _slot(s: Any) -> dict[str, Any]:
    status = int(s.status)
    state = int(s.state)
    return {
        "valid": status == 0,
        "error": None if status == 0 else ffi.string(lib.pm_strerror(status)).decode(),
        "why": ffi.string(s.why).decode(errors="replace") or None,
        "version": int(s.version) or None,
        "generation": int(s.generation) if s.version else None,
        "state": (STATES[state] if 0 <= state < len(STATES) else str(state)) if s.version else None,
        "clean": bool(s.clean) if s.version else None,
        "tables": [{"name": TABLES[i], "crc32c": f"{int(s.table_crc[i]):08x}",
                    "ok": not (int(s.tables_bad) >> i) & 1} for i in range(int(s.ntables))],
    }


def _in_use(path: str) -> bool:
    """True when a pair holds the file open (its lock): a commit may be
    half written while we read, and show as a damaged slot."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def check_metadata(meta: PathLike) -> dict[str, Any]:
    """The health of the metadata file ``meta`` as a JSON-able dict:
    ``verdict`` (0, 1, 2 as above) and ``health`` (its word), ``current`` (the
    slot a pair would use, or None), ``file_size``, ``needed_size``, and
    ``slots``: for each, ``valid``, ``why`` (when not), ``version``,
    ``generation``, ``state``, ``clean`` and its ``tables`` (name, recorded
    CRC-32C, ok), and ``in_use`` (a pair holds the file open: a commit in
    progress can show as a damaged slot; check again once it is closed).
    An unreadable file raises (FileNotFoundError, ...)."""
    path = os.fspath(meta)
    in_use = _in_use(path)
    out = ffi.new("struct pm_meta_health *")
    out.size = ffi.sizeof("struct pm_meta_health")
    rc = lib.pm_meta_check(os.fsencode(path), out)
    if rc < 0:
        from ._native import raise_for
        raise_for(rc, path, f"check {path}")
    slots = [_slot(out.slot[0]), _slot(out.slot[1])]
    current = int(out.current)
    if current < 0:
        verdict = UNUSABLE
    elif all(s["valid"] for s in slots):
        verdict = HEALTHY
    else:
        verdict = DAMAGED
    return {
        "meta": path, "verdict": verdict, "health": VERDICTS[verdict], "in_use": in_use,
        "current": current if current >= 0 else None,
        "file_size": int(out.file_size), "needed_size": int(out.needed_size) or None,
        "slots": slots,
    }


def describe(report: dict[str, Any]) -> list[str]:
    """The report as lines of text (what ``pymirror check`` prints)."""
    lines = [f"{report['meta']}: {report['health']}"]
    if report.get("in_use"):
        lines.append("  (in use by a pair: a commit in progress can show as a damaged slot; check again "
                     "when it is closed)")
    for i, s in enumerate(report["slots"]):
        use = " (in use)" if report["current"] == i else ""
        if s["version"] is None:
            lines.append(f"  slot {i}: INVALID: {s['why'] or s['error']}")
            continue
        head = (f"format {s['version']}, generation {s['generation']}, state {s['state']}, "
                f"{'closed cleanly' if s['clean'] else 'not closed cleanly'}")
        if s["valid"]:
            lines.append(f"  slot {i}: valid{use}: {head}")
        else:
            lines.append(f"  slot {i}: INVALID: {s['why'] or s['error']} ({head})")
        bad = [t["name"] for t in s["tables"] if not t["ok"]]
        crcs = ", ".join(f"{t['name']} {t['crc32c']}" for t in s["tables"])
        lines.append(f"          tables: {crcs}")
        if bad:
            lines.append(f"          tables failing their CRC-32C: {', '.join(bad)}")
    if report["verdict"] == DAMAGED:
        lines.append("  the pair opens from the valid slot; its next commit rewrites the damaged one")
    elif report["verdict"] == UNUSABLE:
        lines.append("  no valid header slot: the pair cannot be opened from this file")
    return lines
