"""The only module that imports the compiled core (``pymirror._core``).

It re-exports ``ffi`` and ``lib`` and turns C return codes into Python
exceptions in one place: :func:`check`.
"""
from __future__ import annotations

import errno as _errno
import os
from typing import NoReturn

from . import errors
from ._core import ffi, lib  # noqa: F401  (re-exported)

__all__ = ["ffi", "lib", "check", "raise_for", "last_error", "fspath"]

_PROJECT_ERRORS: dict[int, type[Exception]] = {
    lib.PM_E_RANGE: errors.RangeError,
    lib.PM_E_ALIGN: errors.AlignmentError,
    lib.PM_E_GEOMETRY: errors.GeometryError,
    lib.PM_E_STATE: errors.StateError,
    lib.PM_E_READONLY: errors.ReadOnlyError,
    lib.PM_E_CORRUPT: errors.CorruptMetadataError,
    lib.PM_E_FOREIGN: errors.ForeignMetadataError,
    lib.PM_E_JOB: errors.JobError,
    lib.PM_E_CLOSED: errors.ClosedError,
    lib.PM_E_BUSY: errors.BusyError,   # added on branch core
}


def last_error() -> str:
    return ffi.string(lib.pm_last_error()).decode("utf-8", "replace")


def raise_for(code: int, path: str | None = None) -> NoReturn:
    """Raise the exception for a negative return code, with the C message."""
    msg = last_error() or ffi.string(lib.pm_strerror(code)).decode()
    cls = _PROJECT_ERRORS.get(code)
    if cls is not None:
        raise cls(msg)
    if code == -_errno.ENOMEM:
        raise MemoryError(msg)
    if -4096 < code < 0:
        # OSError picks the subclass (FileNotFoundError, PermissionError, ...).
        if path is not None:
            raise OSError(-code, msg, path)
        raise OSError(-code, msg)
    raise errors.MirrorError(f"{msg} (code {code})")


def check(code: int, path: str | None = None) -> int:
    """Return ``code`` if it is >= 0, else raise the matching exception."""
    if code < 0:
        raise_for(code, path)
    return code


def fspath(path: "str | os.PathLike[str]") -> bytes:
    return os.fsencode(os.fspath(path))
