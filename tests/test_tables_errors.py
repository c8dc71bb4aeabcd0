"""Every error path of the table wrapper: a clear exception, never a crash,
and nothing changed."""
from __future__ import annotations

import gc

import pytest

from pymirror import Bitmap, CorruptMetadataError, GeometryError, RangeError, TrackTable


def test_index_errors():
    bm = Bitmap(100)
    for bad in (-1, 100, 10**20):
        with pytest.raises(RangeError, match="outside the bitmap"):
            bm.set(bad)
        with pytest.raises(IndexError):
            bm.get(bad)
    with pytest.raises(TypeError):
        bm.set("3")
    with pytest.raises(TypeError):
        bm.set(1.5)
    with pytest.raises(RangeError):
        bm.set_range(90, 11)
    with pytest.raises(RangeError):
        bm.clear_range(-1, 2)
    with pytest.raises(RangeError):
        bm.next_set(-1)
    with pytest.raises(ValueError):
        bm.next_run(0, 0)
    with pytest.raises(ValueError):
        Bitmap(0)
    assert bm.count() == 0


def test_size_mismatch_and_bad_serial_data_change_nothing():
    a, b = Bitmap(100), Bitmap(99)
    a.set(7)
    with pytest.raises(GeometryError):
        a.union(b)
    with pytest.raises(GeometryError):
        a.load(b"\x00" * 12)
    bad = bytearray(13)
    bad[12] = 0x10           # bit 100: past the size
    with pytest.raises(CorruptMetadataError):
        a.load(bytes(bad))
    assert a.set_bits().tolist() == [7]
    assert (a == b) is False


def test_track_table_geometry():
    t = TrackTable(10 * 4096 + 5, 4096)
    assert (t.tracks, t.last_track_size) == (11, 5)
    assert t.track_of(40964) == 10
    assert t.track_span(3) == (12288, 4096)
    with pytest.raises(RangeError):
        t.track_of(10 * 4096 + 5)
    with pytest.raises(RangeError):
        t.track_span(11)
    for bad in (3000, 2048, 32 << 20):
        with pytest.raises(GeometryError, match="power of two"):
            TrackTable(1 << 20, bad)
    with pytest.raises(GeometryError):
        TrackTable(0, 4096)


def test_words_view_outlives_its_bitmap():
    bm = Bitmap(130)
    bm.set(129)
    words = bm.words
    del bm
    gc.collect()
    assert words.tolist() == [0, 0, 2]
    with pytest.raises(ValueError):
        words[0] = 1             # read-only
    table = TrackTable(1 << 20, 4096)
    pending = table.pending
    del table
    gc.collect()
    pending.set(3)               # the borrowed bitmap keeps its table alive
    assert pending.count() == 1
