"""A failing mirror detaches (docs/states.md, "detached").

When a host write or flush succeeds on the standard but fails on the mirror
while the pair is ``syncing`` or ``established``, the C core detaches the
mirror instead of failing the host: the pair goes to ``detached``, every
track the mirror may have missed counts as changed, and the error, its track
and its time are committed to the metadata.  This module turns that record
into the shapes the API, ``query`` and the daemon show.
"""
from __future__ import annotations

import datetime
import errno as _errno
import os
from typing import TYPE_CHECKING, Any, Optional

from ._native import ffi, lib

if TYPE_CHECKING:  # pragma: no cover
    from .pair import Pair

__all__ = ["detach_info", "describe"]


def _error_name(code: int) -> str:
    return str(ffi.string(lib.pm_strerror(code)).decode())


def detach_info(pair: "Pair") -> Optional[dict[str, Any]]:
    """The detach record of ``pair``, or None when its mirror was not
    detached (or an establish has repaired it since).

    Keys: ``error`` (the mirror's error, as text), ``errno`` (its errno
    name, such as ``"ENOSPC"``, or None for a pymirror code), ``track`` (the
    first track of the write it failed; None for a failed flush), ``time``
    (seconds since the epoch) and ``when`` (ISO 8601, UTC)."""
    info = ffi.new("struct pm_detach_info *")
    with pair._call as p:
        rc = lib.pm_pair_detach_info(p, info)
    if rc < 0 or info.error == 0:
        return None
    code = int(info.error)
    when = datetime.datetime.fromtimestamp(float(info.time), datetime.timezone.utc)
    return {
        "error": _error_name(code),
        "errno": _errno.errorcode.get(-code) if -code < 4096 else None,
        "track": int(info.track) if info.track >= 0 else None,
        "time": float(info.time),
        "when": when.isoformat(timespec="seconds"),
    }


def describe(record: dict[str, Any], label: str = "the pair") -> str:
    """One line for a detach record (query, logs, errors)."""
    where = f"track {record['track']}" if record.get("track") is not None else "a flush"
    name = f" ({record['errno']})" if record.get("errno") else ""
    return (f"the mirror was DETACHED at {record['when']} after an error on it at {where}: "
            f"{record['error']}{name}; the host's writes go on to the standard; "
            f"repair with: pymirror establish --incremental {os.fspath(label)}")
