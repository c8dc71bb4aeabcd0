"""Write-behind of large host writes (csrc/arbitrate.c, write_behind): a
host write of 256 KiB or more starts its own writeback at once, so a copy
into the volume keeps the device busy while the data comes in and the
final flush has little left to do; a small write stays in the page cache
(written back by the kernel, or by a flush), where a block written again
soon is written once.  Dirty pages are counted with cachestat(2)."""
from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

import pytest

import pymirror

_spec = importlib.util.spec_from_file_location("pagecache", Path(__file__).with_name("pagecache.py"))
pagecache = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("pagecache", pagecache)
_spec.loader.exec_module(pagecache)

MiB = 1 << 20
SIZE = 16 * MiB


def dirty(path, off: int, length: int) -> int:
    """Dirty pages of [off, off+length) of the file (not yet being written back)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        st = pagecache.cachestat(fd, off, length)
        if st is None:
            pytest.skip("no cachestat(2) here (Linux 6.5 or later)")
        return st.nr_dirty
    finally:
        os.close(fd)


def wait_clean(path, off: int, length: int, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while (n := dirty(path, off, length)) and time.monotonic() < deadline:
        time.sleep(0.01)
    return n


@pytest.fixture
def pair(tmp_path):
    probe = tmp_path / "probe"
    fd = os.open(probe, os.O_RDWR | os.O_CREAT)
    os.write(fd, b"x" * MiB)
    os.fdatasync(fd)
    os.close(fd)
    if dirty(probe, 0, MiB):
        pytest.skip("this file system has no writeback (tmpfs): its pages stay dirty")
    std, mir = tmp_path / "std.img", tmp_path / "mir.img"
    for f in (std, mir):
        with open(f, "wb") as fh:
            fh.truncate(SIZE)
    p = pymirror.Pair.create(tmp_path / "p.meta", std, mir)
    p.establish(assume_equal=True)
    yield p, std, mir
    p.close()


def test_a_large_write_starts_its_writeback_and_a_small_one_does_not(pair):
    p, std, _ = pair
    p.split()
    p.write(12 * MiB, os.urandom(64 << 10))           # small: stays dirty
    assert dirty(std, 12 * MiB, 64 << 10) == 16
    p.write(2 * MiB, os.urandom(4 * MiB))             # large: on its way to the device
    assert wait_clean(std, 2 * MiB, 4 * MiB) == 0
    assert dirty(std, 12 * MiB, 64 << 10) == 16       # the small one was left alone
    p.flush()
    assert dirty(std, 0, SIZE) == 0


def test_a_large_write_to_a_mirrored_pair_starts_both_sides(pair):
    p, std, mir = pair                                # established: writes go to both
    p.write(MiB, os.urandom(MiB))
    assert wait_clean(std, MiB, MiB) == 0
    assert wait_clean(mir, MiB, MiB) == 0
    assert p.read(MiB, 16) == open(mir, "rb").read()[MiB:MiB + 16]
