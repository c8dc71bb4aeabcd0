"""pymirror's exceptions.

Every exception the package raises for a user's mistake or a failing store
is one of these (or a builtin the C code maps to, such as ``OSError`` with
an ``errno``).  Each one also inherits the builtin a caller would naturally
catch, so ``except ValueError`` works for a bad offset.
"""
from __future__ import annotations


class MirrorError(Exception):
    """Base class of pymirror's own errors."""


class RangeError(MirrorError, IndexError, ValueError):
    """An offset, length or track number lies outside the volume."""


class AlignmentError(MirrorError, ValueError):
    """An offset or length is not aligned as required."""


class GeometryError(MirrorError, ValueError):
    """A bad volume or track size, or two volumes whose geometry differs."""


class StateError(MirrorError, RuntimeError):
    """The command is not allowed in the pair's current state."""


class ReadOnlyError(MirrorError, PermissionError):
    """The volume is write-protected in the pair's current state."""


class InUseError(MirrorError, RuntimeError):
    """The object is still used by another one (a Volume by a Pair): close
    that one first.  Nothing was closed."""


class CorruptMetadataError(MirrorError, ValueError):
    """The metadata file fails its magic, checksum or bounds checks."""


class ForeignMetadataError(MirrorError, ValueError):
    """The metadata file belongs to another version, pair or volume."""


class JobError(MirrorError, RuntimeError):
    """The background copy stopped on an error; see ``Job.progress``."""


class JobPausedError(JobError):
    """``Job.wait()`` without a timeout on a job that is paused (on request,
    or because its pair was reopened mid-copy): it would never end on its
    own.  ``resume()`` continues it."""


class ClosedError(MirrorError, ValueError):
    """The pair or volume is closed."""


# -- added on branch core (volume ownership) ----------------------------------
class BusyError(MirrorError, OSError):
    """A volume or metadata file is in use by another pair (in this process
    or another one).  ``errno`` is EBUSY; the message names the volume and,
    when it can be found, the holder's pid."""

    def __init__(self, message: str, filename: "str | None" = None) -> None:
        import errno as _errno
        import re as _re
        # the C message starts with the C function's name: not the user's concern
        message = _re.sub(r"^pm_\w+: ", "", message)
        super().__init__(_errno.EBUSY, message)
        self.filename = filename

    def __str__(self) -> str:
        return str(self.strerror)


class ChangedOutsideError(MirrorError, RuntimeError):
    """A volume was changed outside pymirror since the pair last closed
    cleanly, so its CHANGED table cannot be trusted: an incremental job is
    refused.  ``--compare`` (copy only the tracks that differ) or
    ``--trust`` (proceed anyway) are the ways on."""


class DetachedError(MirrorError, RuntimeError):
    """The mirror was detached after an error on it: it is no point-in-time
    image, so a restore from it is refused; an incremental establish repairs it."""


class MissingLibraryError(MirrorError, OSError):
    """An optional library (librbd, libnbd, a TLS library) is not installed;
    the message names the Debian package that provides it."""


class DaemonUnreachable(MirrorError, ConnectionError):
    """No pymirror daemon listens on the control socket (or it went away)."""


# -- added on branch metatrust (issue 16) ---------------------------------------
class MetadataWarning(UserWarning):
    """The metadata file is damaged but usable: for instance its newer header
    slot fails its checksum and the older one was used (the last commit was
    cut short by a crash, or the file was damaged).  ``pymirror check META``
    reports its health."""


class VolumeMissingError(MirrorError, FileNotFoundError):
    """A volume the pair's metadata names is not at its recorded path; if the
    volumes moved, ``pymirror pair META --relocate`` points the pair at them."""

    def __str__(self) -> str:
        return str(self.strerror) if self.strerror is not None else super().__str__()
