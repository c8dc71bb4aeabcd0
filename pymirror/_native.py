"""The only module that imports the compiled core (``pymirror._core``).

It re-exports ``ffi`` and ``lib`` and turns C return codes into Python
exceptions in one place: :func:`check` / :func:`raise_for`.  Messages name
the operation and the file, never a C function: the C message's
``function: `` prefix (useful to C callers) is dropped here.
"""
from __future__ import annotations

import errno as _errno
import os
import re
TYPE_CHECKING = False   # typing is not imported at run time: a command's start (docs/copier.md)
if TYPE_CHECKING:  # pragma: no cover
    from typing import NoReturn, Optional


def _missing_core(exc: ImportError) -> str:
    """A one-line hint for an extension that is not built or not loadable."""
    from pathlib import Path

    package = Path(__file__).resolve().parent
    checkout = package.parent
    if (checkout / "setup.py").is_file() and (checkout / "csrc").is_dir():
        return (f"pymirror's compiled core is not built in the source checkout {checkout} ({exc}): "
                f"build it with `pip install -e .` there, or run Python from another directory "
                f"to use an installed pymirror")
    return (f"pymirror's compiled core cannot be loaded from {package} ({exc}): "
            f"reinstall pymirror (pip install --force-reinstall pymirror)")


try:
    from ._core import ffi, lib  # noqa: F401  (re-exported)
except ImportError as _exc:
    raise ImportError(_missing_core(_exc), name="pymirror._core") from None

from . import errors  # noqa: E402

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
    lib.PM_E_OUTSIDE: errors.ChangedOutsideError,
    lib.PM_E_DETACHED: errors.DetachedError,
    lib.PM_E_NOLIB: errors.MissingLibraryError,
}

# "pm_pair_write: ", "open_meta_store: ": the C function that failed
_C_PREFIX = re.compile(r"^(?:[A-Za-z_][A-Za-z0-9_]*: )+")


def last_error() -> str:
    """This thread's last C message, without the C function's name."""
    msg = ffi.string(lib.pm_last_error()).decode("utf-8", "replace")
    return _C_PREFIX.sub("", msg)


def raise_for(code: int, path: Optional[str] = None, op: Optional[str] = None) -> NoReturn:
    """Raise the exception for a negative return code.

    ``op`` names what was being done, with its object ("split /x/p.meta",
    "open volume /x/std.img"): it starts the message.  ``path`` is the file
    an ``OSError`` carries (``filename``)."""
    msg = last_error() or ffi.string(lib.pm_strerror(code)).decode()
    if op and path and msg.startswith(f"{path}: "):
        msg = msg[len(path) + 2:]       # op names the file already
    cls = _PROJECT_ERRORS.get(code)
    if cls is not None:
        raise cls(f"{op}: {msg}" if op else msg)
    if code == -_errno.ENOMEM:
        raise MemoryError(f"{op}: {msg}" if op else msg)
    if code == -_errno.EBUSY:
        # a lock held by another pair: BusyError (a MirrorError and an OSError)
        raise errors.BusyError(f"{op}: {msg}" if op else msg, path)
    if -4096 < code < 0:
        err = -code
        if path is not None and msg.startswith(f"{path}: "):
            msg = msg[len(path) + 2:]   # OSError shows the filename too
        reason = os.strerror(err)
        if reason.lower() not in msg.lower():
            msg = f"{msg} ({reason})"
        if op:
            msg = f"{op}: {msg}"
        # OSError picks the subclass (FileNotFoundError, PermissionError, ...).
        if path is not None:
            raise OSError(err, msg, path)
        raise OSError(err, msg)
    raise errors.MirrorError(f"{op + ': ' if op else ''}{msg} (code {code})")


def check(code: int, path: Optional[str] = None, op: Optional[str] = None) -> int:
    """Return ``code`` if it is >= 0, else raise the matching exception."""
    if code < 0:
        raise_for(code, path, op)
    return code


def fspath(path: "str | os.PathLike[str]") -> bytes:
    return os.fsencode(os.fspath(path))
