"""A copy's page-cache footprint (docs/copier.md, "Large copies"): a full
restore or establish of a file-backed pair drops from the page cache the
pages it read and wrote, once they are on the device, so a large copy
does not fill the cache; pages that were cached before the copy came near
them (the host's) stay.  Residency is read with mincore(2); the files are
evicted one by one with posix_fadvise, never by dropping the whole cache."""
from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os

import numpy as np
import pytest

import pymirror
from pymirror import CopyConfig

MiB = 1 << 20
SIZE = 128 * MiB
PAGE = mmap.PAGESIZE

libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]


def residency(path) -> np.ndarray:
    """One bool per page of the file: in the page cache now."""
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        vec = ctypes.create_string_buffer((size + PAGE - 1) // PAGE)
        rc = libc.mincore(addr, size, vec)
        libc.munmap(addr, size)
        assert rc == 0, os.strerror(ctypes.get_errno())
        return (np.frombuffer(vec.raw, dtype=np.uint8) & 1).astype(bool)
    finally:
        os.close(fd)


def evict(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read(path, off: int, length: int) -> None:
    with open(path, "rb", buffering=0) as fh:
        fh.seek(off)
        while length > 0:
            length -= len(fh.read(min(length, MiB)))


@pytest.fixture
def pair(tmp_path):
    rng = np.random.default_rng(12)
    std, mir = tmp_path / "std.img", tmp_path / "mir.img"
    std.write_bytes(rng.integers(0, 256, SIZE, dtype=np.uint8).tobytes())
    mir.write_bytes(rng.integers(0, 256, SIZE, dtype=np.uint8).tobytes())
    p = pymirror.Pair.create(tmp_path / "pair.meta", std, mir)
    p.establish(assume_equal=True)     # the tables say equal; the bytes differ: a copy shows
    p.split()
    for f in (std, mir):
        evict(f)
        if residency(f).any():
            p.close()
            pytest.skip("this file system keeps its pages cached (tmpfs?)")
    yield p, std, mir
    p.close()


@pytest.mark.parametrize("copiers", [0, 1])
def test_full_restore_leaves_little_of_either_volume_cached(pair, copiers):
    p, std, mir = pair
    assert p.restore(config=CopyConfig(copiers=copiers)).wait(timeout=60)
    p.flush()
    # without eviction both volumes would be cached whole (128 MiB each).
    # What may stay: the job's first 8 MiB, asked before the copiers start;
    # with several copiers (the default, 0: automatic), also what the
    # kernel reads ahead past the end of one copier's stripe into another's
    # (up to 2 x 16 MiB here), which the other copier had already dropped
    # or took for the host's (docs/copier.md, "Large copies").
    left = residency(mir).sum() * PAGE
    assert left <= (48 if copiers != 1 else 12) * MiB, left // MiB
    assert residency(std).sum() * PAGE <= 8 * MiB
    assert std.read_bytes() == mir.read_bytes()      # (reads both back into the cache)


def test_full_establish_keeps_the_pages_the_host_had_cached(pair):
    p, std, mir = pair
    read(std, 20 * MiB, 8 * MiB)          # the host's working set on the standard
    read(std, 90 * MiB, MiB)
    before = residency(std)
    assert before.sum() * PAGE >= 9 * MiB
    assert p.establish().wait(timeout=60)
    p.flush()
    after = residency(std)
    assert after[before].all(), "a page the host had cached was dropped"
    assert (after & ~before).sum() * PAGE <= 48 * MiB
    assert residency(mir).sum() * PAGE <= 8 * MiB
    assert std.read_bytes() == mir.read_bytes()
