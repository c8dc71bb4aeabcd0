"""Volumes: the bytes behind the standard or the mirror (a file, a block
device, or memory), wrapped around the C core's ``pm_store``."""
from __future__ import annotations

import os
from types import TracebackType
TYPE_CHECKING = False   # typing is not imported at run time: a command's start (docs/copier.md)
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Optional, Type

from . import errors
from ._handle import Handle
from ._native import check, ffi, fspath, lib
from .config import TRACK_SIZE_MAX, TRACK_SIZE_MIN

DEFAULT_TRACK_SIZE = 64 << 10


def _check_track_size(track_size: int) -> int:
    if not isinstance(track_size, int) or isinstance(track_size, bool):
        raise TypeError(f"track_size must be an int, got {type(track_size).__name__}")
    if track_size & (track_size - 1) or not TRACK_SIZE_MIN <= track_size <= TRACK_SIZE_MAX:
        raise errors.GeometryError(
            f"track size {track_size} is not a power of two from {TRACK_SIZE_MIN} to {TRACK_SIZE_MAX}"
        )
    return track_size


def check_io(offset: int, length: int, size: int) -> None:
    """Raise RangeError/TypeError for I/O that does not fit a volume of ``size``."""
    if not isinstance(offset, int) or isinstance(offset, bool):
        raise TypeError(f"offset must be an int, got {type(offset).__name__}")
    if offset < 0 or length < 0 or offset + length > size:
        raise errors.RangeError(
            f"offset {offset} + length {length} is outside the volume (size {size})"
        )


class Volume(Handle):
    """One volume.  Thread-safe for I/O; ``close()`` ends it (it waits for
    I/O in flight; later calls raise ClosedError).  A volume that a
    :class:`~pymirror.Pair` uses cannot be closed before the pair:
    ``close()`` then raises :class:`~pymirror.errors.InUseError`.

    A volume carries a ``track_size`` (the unit of copying and arbitration a
    pair built on it will use; default 64 KiB).  The last track may be short.
    """

    def __init__(self, ptr: Any, path: Optional[str], track_size: int) -> None:
        self._init_handle(ptr, f"the volume {path}" if path is not None else "the memory volume")
        self.path = path
        self.track_size = _check_track_size(track_size)
        self.size: int = lib.pm_store_size(ptr)
        #: "file", "memory", "nbd" or "rbd" (pymirror/uri.py)
        self.kind = "file" if path is not None else "memory"

    @property
    def detects_outside_changes(self) -> bool:
        """Whether pymirror can tell that this volume was written behind its
        back (files: size and times; NBD and RBD volumes: no)."""
        from .uri import OUTSIDE_CHANGES

        return OUTSIDE_CHANGES.get(self.kind, False)

    # -- constructors -------------------------------------------------------
    @classmethod
    def create(cls, path: "str | os.PathLike[str]", size: int,
               track_size: int = DEFAULT_TRACK_SIZE) -> "Volume":
        """Create a new volume of ``size`` bytes: a sparse image file (it must
        not exist), or an RBD image for an ``rbd:`` URI (docs/volumes.md)."""
        from .uri import create_volume

        _check_track_size(track_size)
        if not isinstance(size, int) or size <= 0:
            raise errors.GeometryError(f"volume size must be a positive number of bytes, got {size!r}")
        # a pair records its volumes' paths: create_volume makes them absolute
        return create_volume(path, size, track_size=track_size)

    @classmethod
    def open(cls, path: "str | os.PathLike[str]", *, readonly: bool = False,
             track_size: int = DEFAULT_TRACK_SIZE) -> "Volume":
        """Open an existing volume: a path (image file or block device), or a
        URI (``file:``, ``nbd://``, ``nbd+unix://``, ``rbd:``; see
        :mod:`pymirror.uri` and docs/volumes.md)."""
        from .uri import open_volume

        _check_track_size(track_size)
        return open_volume(path, readonly=readonly, track_size=track_size)

    @classmethod
    def memory(cls, size: int, track_size: int = DEFAULT_TRACK_SIZE) -> "Volume":
        """A zero-filled volume in memory (for tests and scratch pairs)."""
        _check_track_size(track_size)
        if not isinstance(size, int) or size <= 0:
            raise errors.GeometryError(f"volume size must be a positive number of bytes, got {size!r}")
        out = ffi.new("pm_store **")
        check(lib.pm_store_create_memory(size, out), None, "create a memory volume")
        return cls(ffi.gc(out[0], lib.pm_store_destroy), None, track_size)

    # -- I/O (direct, not arbitrated: use Pair for a volume in a pair) ------
    @property
    def tracks(self) -> int:
        return -(-self.size // self.track_size)

    def _check(self, rc: int, op: str) -> None:
        if rc < 0:
            check(rc, self.path, f"{op} {self.path or 'memory volume'}")

    def readinto(self, offset: int, buf: Any) -> None:
        mv = memoryview(buf)
        check_io(offset, mv.nbytes, self.size)
        with self._call as p:
            rc = lib.pm_store_read(p, ffi.from_buffer(mv, require_writable=True), mv.nbytes, offset)
        self._check(rc, "read")

    def read(self, offset: int, length: int) -> bytes:
        check_io(offset, length, self.size)
        buf = bytearray(length)
        self.readinto(offset, buf)
        return bytes(buf)

    def write(self, offset: int, data: Any) -> None:
        mv = memoryview(data)
        check_io(offset, mv.nbytes, self.size)
        with self._call as p:
            rc = lib.pm_store_write(p, ffi.from_buffer(mv), mv.nbytes, offset)
        self._check(rc, "write")

    def flush(self) -> None:
        with self._call as p:
            rc = lib.pm_store_flush(p)
        self._check(rc, "flush")

    def inject_fault(self, op: str, offset: int, length: int, errno: int, count: int = -1) -> None:
        """Make the next ``count`` reads or writes (op ``"read"``/``"write"``)
        touching [offset, offset+length) fail with ``errno`` (tests only)."""
        code = {"read": lib.PM_FAULT_READ, "write": lib.PM_FAULT_WRITE}[op]
        with self._call as p:
            check(lib.pm_store_inject_fault(p, code, offset, length, -abs(errno), count))

    def clear_faults(self) -> None:
        with self._call as p:
            check(lib.pm_store_clear_faults(p))

    def close(self) -> None:
        """Close the volume (once; waits for I/O in flight).  InUseError,
        and nothing closed, while a pair uses it."""
        self._close_handle()

    def __enter__(self) -> "Volume":
        return self

    def __exit__(self, et: Optional[Type[BaseException]], ev: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self.close()

    def __repr__(self) -> str:
        where = self.path if self.path is not None else "memory"
        closed = " closed" if self.closed else ""
        return f"<Volume {where} size={self.size} track_size={self.track_size}{closed}>"
