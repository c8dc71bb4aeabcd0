"""Every error path of the table wrapper: a clear exception of the right
class, never a crash, and nothing changed."""
from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest

from pymirror import Bitmap, CorruptMetadataError, GeometryError, RangeError, TrackTable


@pytest.fixture
def bm() -> Bitmap:
    b = Bitmap(100)
    b.set(7)
    return b


def unchanged(b: Bitmap) -> None:
    assert b.set_bits().tolist() == [7]
    b.validate()


@pytest.mark.parametrize("method", ["get", "set", "clear", "test_and_set", "test_and_clear", "__getitem__"])
@pytest.mark.parametrize("bad", [-1, 100, 101, 2**64, 2**70, -(2**70), np.int64(-3), np.uint64(100)])
def test_bit_out_of_range(bm: Bitmap, method: str, bad: object) -> None:
    with pytest.raises(RangeError, match=rf"bit {bad} is outside the bitmap \(valid: 0 to 99\)"):
        getattr(bm, method)(bad)
    unchanged(bm)


def test_range_error_is_an_index_and_a_value_error(bm: Bitmap) -> None:
    with pytest.raises(IndexError):
        bm.get(100)
    with pytest.raises(ValueError):
        bm.set(-1)


@pytest.mark.parametrize("method", ["get", "set", "clear", "test_and_set", "test_and_clear"])
@pytest.mark.parametrize("bad", ["3", 1.5, 3.0, None, b"\x01", [1]])
def test_bit_not_an_int(bm: Bitmap, method: str, bad: object) -> None:
    with pytest.raises(TypeError, match="bit must be an int"):
        getattr(bm, method)(bad)
    unchanged(bm)


def test_integer_like_indexes_work(bm: Bitmap) -> None:
    assert bm.set(np.int64(9)) is False
    assert bm.get(np.uint32(9)) is True
    assert bm.clear(True) is False           # bool is an int
    assert bm.set_range(np.int16(10), np.uint8(2)) == 2


@pytest.mark.parametrize("start,count", [(90, 11), (-1, 2), (0, 101), (100, 1), (101, 0), (5, -1),
                                         (2**64, 0), (1, 2**64 - 1)])
def test_ranges_out_of_range(bm: Bitmap, start: int, count: int) -> None:
    for method in (bm.set_range, bm.clear_range, bm.count_range):
        with pytest.raises(RangeError, match=rf"bits {start}\+{count} are outside the bitmap"):
            method(start, count)
    unchanged(bm)


def test_ranges_not_ints(bm: Bitmap) -> None:
    with pytest.raises(TypeError, match="start must be an int"):
        bm.set_range(1.0, 2)
    with pytest.raises(TypeError, match="count must be an int"):
        bm.clear_range(1, "2")
    unchanged(bm)


def test_empty_ranges_are_fine(bm: Bitmap) -> None:
    assert bm.set_range(100, 0) == 0
    assert bm.clear_range(0, 0) == 0
    assert bm.count_range(50, 0) == 0
    unchanged(bm)


def test_scans(bm: Bitmap) -> None:
    with pytest.raises(RangeError, match="from must not be negative"):
        bm.next_set(-1)
    with pytest.raises(RangeError):
        bm.next_clear(-5)
    with pytest.raises(RangeError):
        bm.next_run(-1)
    with pytest.raises(RangeError):
        bm.set_bits(-1)
    with pytest.raises(TypeError, match="from must be an int"):
        bm.next_set(0.5)
    with pytest.raises(ValueError, match="max_len must be at least 1, got 0"):
        bm.next_run(0, 0)
    with pytest.raises(ValueError):
        bm.next_run(0, -3)
    with pytest.raises(TypeError, match="max_len must be an int"):
        bm.next_run(0, 2.5)
    # past the end is not an error: there is simply nothing there
    assert bm.next_set(100) is None and bm.next_set(2**80) is None
    assert bm.next_clear(100) is None
    assert bm.next_run(2**70, 2**70) is None
    assert bm.set_bits(100).tolist() == [] and bm.set_bits(2**70).tolist() == []
    assert bm.next_run(0, 2**80) == (7, 1)
    unchanged(bm)


@pytest.mark.parametrize("size", [1, 63, 64, 65, 4097, 70_000])
def test_long_runs_cross_words(size: int) -> None:
    b = Bitmap(size)
    b.fill()
    assert b.next_run() == (0, size)
    assert b.next_run(1, None) == ((1, size - 1) if size > 1 else None)
    assert b.next_run(0, size + 10**30) == (0, size)
    assert b.next_run(0, 100) == (0, min(100, size))
    b.clear(size // 2)
    assert b.next_run(0) == ((0, size // 2) if size > 1 else None)
    assert b.set_bits().tolist() == [i for i in range(size) if i != size // 2]


def test_bad_sizes() -> None:
    for bad in (0, -1, 2**64, 2**48 + 1):
        with pytest.raises(ValueError, match="bit"):
            Bitmap(bad)
    with pytest.raises(TypeError, match="size must be an int"):
        Bitmap(10.0)


def test_size_mismatch_changes_nothing(bm: Bitmap) -> None:
    for other in (Bitmap(99), Bitmap(101)):
        other.fill()
        for method in (bm.union, bm.intersect, bm.subtract, bm.copy_from):
            with pytest.raises(GeometryError, match=rf"bitmaps differ in size \(100 and {len(other)} bits\)"):
                method(other)
        assert (bm == other) is False
        assert bm != other
    for method in (bm.union, bm.intersect, bm.subtract, bm.copy_from):
        with pytest.raises(TypeError, match="expected a Bitmap, not set"):
            method({1, 2})
    assert (bm == {7}) is False
    unchanged(bm)


def test_bad_serial_data_changes_nothing(bm: Bitmap) -> None:
    for length in (0, 12, 14, 100):
        with pytest.raises(GeometryError, match=rf"{length} bytes given, a 100-bit map needs 13"):
            bm.load(b"\xff" * length)
    for last in (0x10, 0x20, 0x80, 0xF0):       # bits 100..103 are past the size
        bad = bytearray(b"\xff" * 13)
        bad[12] = last | 0x0F
        with pytest.raises(CorruptMetadataError, match="bits are set past the size 100"):
            bm.load(bytes(bad))
    with pytest.raises(TypeError):
        bm.load("not bytes")  # type: ignore[arg-type]
    with pytest.raises(CorruptMetadataError):
        Bitmap.from_bytes(b"\xff\xff", 12)
    with pytest.raises(GeometryError):
        Bitmap.from_bytes(b"\xff\xff", 17)
    unchanged(bm)
    # a good load from any bytes-like object
    bm.load(bytearray(13))
    bm.load(memoryview(np.zeros(13, dtype=np.uint8)))
    assert bm.count() == 0


def test_track_table_geometry_errors() -> None:
    t = TrackTable(10 * 4096 + 5, 4096)
    assert (t.tracks, t.last_track_size) == (11, 5)
    assert t.track_of(40964) == 10
    assert t.track_span(3) == (12288, 4096)
    assert t.track_span(10) == (40960, 5)
    for bad in (10 * 4096 + 5, -1, 2**64):
        with pytest.raises(RangeError, match=rf"offset {bad} is outside the volume \(valid: 0 to 40964\)"):
            t.track_of(bad)
    for bad_track in (11, -1, 2**70):
        with pytest.raises(RangeError, match=rf"track {bad_track} is outside the table \(valid: 0 to 10\)"):
            t.track_span(bad_track)
    with pytest.raises(TypeError, match="offset must be an int"):
        t.track_of(1.0)
    with pytest.raises(TypeError, match="track must be an int"):
        t.track_span("1")
    for bad in (0, 1, 3000, 2048, 4095, 3 * 4096, 32 << 20, -4096, 2**32, 2**40 + 4096):
        with pytest.raises(GeometryError, match=rf"track size {bad} is not a power of two from 4096 to 16777216"):
            TrackTable(1 << 20, bad)
    for bad_volume in (0, -1, 2**64):
        with pytest.raises(GeometryError, match="volume size must be greater than zero"):
            TrackTable(bad_volume, 4096)
    with pytest.raises(GeometryError, match="more than 2\\^48"):
        TrackTable(2**64 - 1, 4096)
    with pytest.raises(TypeError, match="volume_size must be an int"):
        TrackTable(1e6)
    with pytest.raises(TypeError, match="track_size must be an int"):
        TrackTable(1 << 20, 4096.0)


def test_words_view_outlives_its_bitmap() -> None:
    bm = Bitmap(130)
    bm.set(129)
    ref = weakref.ref(bm)
    words = bm.words
    assert not words.flags.writeable and not words.flags.owndata
    del bm
    gc.collect()
    assert ref() is None                  # the Bitmap object is gone ...
    assert words.tolist() == [0, 0, 2]    # ... its memory is not
    part = words[1:]
    del words
    gc.collect()
    assert part.tolist() == [0, 2]        # a view of the view keeps it too
    with pytest.raises(ValueError):
        part[0] = 1                       # read-only


def test_words_view_is_live_and_zero_copy() -> None:
    bm = Bitmap(200)
    words = bm.words
    bm.set(64)
    assert int(words[1]) == 1             # the same memory, not a copy
    bm.set_range(0, 200)
    assert words[3] == (1 << 8) - 1       # nothing past the size


def test_borrowed_bitmaps_keep_their_table_alive() -> None:
    table = TrackTable(1 << 20, 4096)
    pending, words = table.pending, table.changed.words
    ref = weakref.ref(table)
    del table
    gc.collect()
    assert ref() is not None              # held by its bitmaps
    pending.set(3)
    assert pending.count() == 1 and words.sum() == 0
    del pending
    gc.collect()
    assert ref() is not None              # still held by the words view
    del words
    gc.collect()
    assert ref() is None
