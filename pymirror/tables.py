"""Track tables from Python: a typed, thin wrapper over the C bitmaps.

No method loops over bits in Python: enumeration goes through the C
``pm_bitmap_collect`` in chunks into numpy arrays, and :attr:`Bitmap.words`
is a zero-copy, read-only numpy view of the C words.
"""
from __future__ import annotations

import operator
from typing import Any, Iterator, Optional

import numpy as np

from . import errors
from ._native import check, ffi, lib

_CHUNK = 1 << 16


def _index(i: object, what: str = "bit") -> int:
    try:
        return operator.index(i)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{what} must be an int, got {type(i).__name__}") from None


class _Owner:
    """Keeps the C object alive for as long as any view of it exists."""

    def __init__(self, ptr: Any, parent: Any = None) -> None:
        self.ptr = ptr
        self.parent = parent


class Bitmap:
    """A fixed-size bitmap, safe to use from many threads at once (every
    operation is atomic per word in C, and cffi releases the GIL)."""

    def __init__(self, size: int) -> None:
        size = _index(size, "size")
        if size < 1:
            raise ValueError(f"a bitmap needs at least one bit, got {size}")
        out = ffi.new("pm_bitmap **")
        check(lib.pm_bitmap_create(size, out))
        self._own = _Owner(ffi.gc(out[0], lib.pm_bitmap_destroy))
        self._p = self._own.ptr
        self._size = size

    @classmethod
    def _borrow(cls, ptr: Any, parent: Any) -> "Bitmap":
        self = cls.__new__(cls)
        self._own = _Owner(ptr, parent)
        self._p = ptr
        self._size = int(lib.pm_bitmap_size(ptr))
        return self

    # -- checks ---------------------------------------------------------------
    def _span(self, start: object, count: object) -> tuple[int, int]:
        s, c = _index(start, "start"), _index(count, "count")
        if s < 0 or c < 0 or s + c > self._size:
            raise errors.RangeError(f"bits {s}+{c} are outside the bitmap (size {self._size})")
        return s, c

    def _same(self, other: "Bitmap") -> Any:
        if not isinstance(other, Bitmap):
            raise TypeError(f"expected a Bitmap, got {type(other).__name__}")
        if other._size != self._size:
            raise errors.GeometryError(f"bitmaps differ in size ({self._size} and {other._size} bits)")
        return other._p

    # -- single bits ----------------------------------------------------------
    def __len__(self) -> int:
        return self._size

    def _single(self, fn: Any, i: object) -> bool:
        # The C call checks the range; cffi rejects non-integers (TypeError)
        # and negative or huge ones (OverflowError).  One crossing per call.
        try:
            r = fn(self._p, i)
        except OverflowError:
            raise errors.RangeError(f"bit {i} is outside the bitmap (size {self._size})") from None
        except TypeError:
            raise TypeError(f"bit must be an int, got {type(i).__name__}") from None
        if r < 0:
            raise errors.RangeError(f"bit {i} is outside the bitmap (size {self._size})")
        return r == 1

    def get(self, i: int) -> bool:
        return self._single(lib.pm_bitmap_get, i)

    __getitem__ = get

    def set(self, i: int) -> bool:
        """Set bit i; returns its old value."""
        return self._single(lib.pm_bitmap_set, i)

    def clear(self, i: int) -> bool:
        """Clear bit i; returns its old value."""
        return self._single(lib.pm_bitmap_clear, i)

    def test_and_set(self, i: int) -> bool:
        """Atomically set bit i; True if it was already set (someone else won)."""
        return self._single(lib.pm_bitmap_test_and_set, i)

    def test_and_clear(self, i: int) -> bool:
        return self._single(lib.pm_bitmap_test_and_clear, i)

    # -- ranges and counts ----------------------------------------------------
    def set_range(self, start: int, count: int) -> int:
        """Set bits [start, start+count); returns how many changed."""
        return check(lib.pm_bitmap_set_range(self._p, *self._span(start, count)))

    def clear_range(self, start: int, count: int) -> int:
        return check(lib.pm_bitmap_clear_range(self._p, *self._span(start, count)))

    def fill(self) -> None:
        check(lib.pm_bitmap_fill(self._p))

    def zero(self) -> None:
        check(lib.pm_bitmap_zero(self._p))

    def count(self) -> int:
        """Set bits (run-time dispatched popcount in C)."""
        return int(lib.pm_bitmap_count(self._p))

    def count_range(self, start: int, count: int) -> int:
        return int(lib.pm_bitmap_count_range(self._p, *self._span(start, count)))

    # -- scanning -------------------------------------------------------------
    def _from(self, frm: object) -> int:
        f = _index(frm, "from")
        if f < 0:
            raise errors.RangeError(f"from must not be negative, got {f}")
        return f

    def next_set(self, frm: int = 0) -> Optional[int]:
        """The first set bit at or after ``frm``, or None."""
        r = lib.pm_bitmap_next_set(self._p, self._from(frm))
        return None if r < 0 else int(r)

    def next_clear(self, frm: int = 0) -> Optional[int]:
        r = lib.pm_bitmap_next_clear(self._p, self._from(frm))
        return None if r < 0 else int(r)

    def next_run(self, frm: int = 0, max_len: int = 1 << 62) -> Optional[tuple[int, int]]:
        """(start, length) of the first run of set bits at or after ``frm``,
        its length capped at ``max_len``; None if no bit is set there."""
        if _index(max_len, "max_len") < 1:
            raise ValueError(f"max_len must be at least 1, got {max_len}")
        s, n = ffi.new("uint64_t *"), ffi.new("uint64_t *")
        found = check(lib.pm_bitmap_next_run(self._p, self._from(frm), max_len, s, n))
        return (int(s[0]), int(n[0])) if found else None

    def set_bits(self, start: int = 0) -> "np.ndarray[Any, np.dtype[np.uint64]]":
        """Indexes of the set bits at or after ``start``, as a numpy array
        (collected in C, a chunk at a time)."""
        start = self._from(start)
        parts = []
        buf = np.empty(_CHUNK, dtype=np.uint64)
        cbuf = ffi.from_buffer("uint64_t[]", buf)
        while start < self._size:
            n = check(lib.pm_bitmap_collect(self._p, start, cbuf, _CHUNK))
            if n == 0:
                break
            parts.append(buf[:n].copy())
            if n < _CHUNK:
                break
            start = int(buf[n - 1]) + 1
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.uint64)

    def __iter__(self) -> Iterator[int]:
        return (int(x) for x in self.set_bits())

    # -- whole maps -----------------------------------------------------------
    def union(self, other: "Bitmap") -> None:
        """self |= other"""
        check(lib.pm_bitmap_union(self._p, self._same(other)))

    def intersect(self, other: "Bitmap") -> None:
        """self &= other"""
        check(lib.pm_bitmap_intersect(self._p, self._same(other)))

    def subtract(self, other: "Bitmap") -> None:
        """self &= ~other"""
        check(lib.pm_bitmap_subtract(self._p, self._same(other)))

    def copy_from(self, other: "Bitmap") -> None:
        check(lib.pm_bitmap_copy(self._p, self._same(other)))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Bitmap) or other._size != self._size:
            return NotImplemented if not isinstance(other, Bitmap) else False
        return bool(check(lib.pm_bitmap_equal(self._p, other._p)))

    __hash__ = None  # type: ignore[assignment]

    # -- serialisation --------------------------------------------------------
    def to_bytes(self) -> bytes:
        """ceil(size/8) bytes, bit i in byte i//8 at bit i%8 (little-endian)."""
        n = int(lib.pm_bitmap_serial_size(self._p))
        buf = bytearray(n)
        check(lib.pm_bitmap_save(self._p, ffi.from_buffer(buf), n))
        return bytes(buf)

    def load(self, data: bytes) -> None:
        """Replace the contents from :meth:`to_bytes` output.  A wrong length
        (GeometryError) or bits past the size (CorruptMetadataError) change
        nothing."""
        mv = memoryview(data)
        check(lib.pm_bitmap_load(self._p, ffi.from_buffer(mv), mv.nbytes))

    @classmethod
    def from_bytes(cls, size: int, data: bytes) -> "Bitmap":
        bm = cls(size)
        bm.load(data)
        return bm

    @property
    def words(self) -> "np.ndarray[Any, np.dtype[np.uint64]]":
        """A zero-copy, read-only numpy view of the 64-bit words (bit i in
        word i//64).  The view keeps the bitmap's memory alive."""
        n = int(lib.pm_bitmap_nwords(self._p))
        raw = ffi.buffer(ffi.cast("char *", lib.pm_bitmap_words(self._p)), n * 8)
        arr = np.frombuffer(raw, dtype="<u8")
        arr.flags.writeable = False
        # numpy keeps `raw` as the base; make the C owner reachable from it too.
        holder = _ViewHolder(arr, self._own)
        return holder.view

    def validate(self) -> None:
        """Check the C invariants (summary level, no bits past the size)."""
        check(lib.pm_bitmap_validate(self._p))

    def __repr__(self) -> str:
        return f"<Bitmap size={self._size} set={self.count()}>"


class _ViewHolder:
    """An ndarray subclass instance would be heavier; instead, keep the C
    owner alive through a view whose ``base`` chain reaches this object."""

    def __init__(self, arr: "np.ndarray[Any, Any]", owner: _Owner) -> None:
        self.owner = owner
        self.__array_interface__ = arr.__array_interface__
        self._arr = arr
        self.view = np.asarray(self)
        self.view.flags.writeable = False


class TrackTable:
    """The geometry of one volume and its PENDING, CHANGED and BUSY bitmaps."""

    def __init__(self, volume_size: int, track_size: int = 64 << 10) -> None:
        out = ffi.new("pm_table **")
        check(lib.pm_table_create(_index(volume_size, "volume_size"), _index(track_size, "track_size"), out))
        self._p = ffi.gc(out[0], lib.pm_table_destroy)
        self.volume_size = int(lib.pm_table_volume_size(self._p))
        self.track_size = int(lib.pm_table_track_size(self._p))
        self.tracks = int(lib.pm_table_tracks(self._p))
        self.last_track_size = int(lib.pm_table_last_track_size(self._p))
        self.pending = Bitmap._borrow(lib.pm_table_flag(self._p, lib.PM_PENDING), self)
        self.changed = Bitmap._borrow(lib.pm_table_flag(self._p, lib.PM_CHANGED), self)
        self.busy = Bitmap._borrow(lib.pm_table_flag(self._p, lib.PM_BUSY), self)

    def track_of(self, offset: int) -> int:
        off = _index(offset, "offset")
        if not 0 <= off < self.volume_size:
            raise errors.RangeError(f"offset {off} is outside the volume (size {self.volume_size})")
        return int(check(lib.pm_table_track_of(self._p, off)))

    def track_span(self, track: int) -> tuple[int, int]:
        """(first byte, length) of a track; the last track may be short."""
        t = _index(track, "track")
        if not 0 <= t < self.tracks:
            raise errors.RangeError(f"track {t} is outside the table ({self.tracks} tracks)")
        off, ln = ffi.new("uint64_t *"), ffi.new("uint32_t *")
        check(lib.pm_table_track_span(self._p, t, off, ln))
        return int(off[0]), int(ln[0])

    def __repr__(self) -> str:
        return (f"<TrackTable {self.volume_size} bytes, {self.tracks} tracks of {self.track_size}, "
                f"pending={self.pending.count()} changed={self.changed.count()}>")
