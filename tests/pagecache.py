"""Page-cache helpers for tests that need cold or clean data: cachestat(2)
(Linux 6.5) counts a range's cached and dirty pages without reading any in.

A drop (POSIX_FADV_DONTNEED) skips pages the kernel holds at that moment:
ones still being read in (a read-ahead the test itself started, slow on a
busy disk), dirty ones, ones under writeback.  So ``drop`` asks again until
the range is out, and only a file system that never lets go (tmpfs) makes
it give up."""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import time

NR_CACHESTAT = 451            # the same on x86-64 and arm64 (the generic table)

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class Stat(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in
                ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]


def cachestat(fd: int, off: int, length: int) -> Stat | None:
    """The page-cache state of [off, off+length) of an open file; None if
    this kernel has no cachestat(2)."""
    st = Stat()
    if _libc.syscall(NR_CACHESTAT, fd, ctypes.byref(_Range(off, length)), ctypes.byref(st), 0) != 0:
        return None
    return st


def _cached_without_cachestat(fd: int, off: int) -> bool:
    # RWF_NOWAIT refuses a page that is not cached, and starts reading it in
    try:
        os.preadv(fd, [bytearray(4096)], off, os.RWF_NOWAIT)
        return True
    except BlockingIOError:
        return False


def drop(fd: int, off: int = 0, length: int = 4096, timeout: float = 5.0) -> bool:
    """Drop the whole (clean) file from the page cache, until no page of
    [off, off+length) is left (the whole file: a range smaller than the
    large folios the kernel may cache it in would not go).  False if the
    range is still cached after ``timeout`` seconds of asking: this file
    system keeps its pages."""
    deadline = time.monotonic() + timeout
    while True:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        st = cachestat(fd, off, length)
        if st is None:
            if not _cached_without_cachestat(fd, off):
                time.sleep(0.005)         # the probe's read-in: let it land, then drop it
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                return True
        elif st.nr_cache == 0:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
