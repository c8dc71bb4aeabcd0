"""Track tables from Python: a typed, thin wrapper over the C bitmaps.

A :class:`Bitmap` is a fixed-size array of bits kept in C (bit-packed 64-bit
words plus a summary level; see ``docs/track-tables.md``).  Every operation
is one call into C, which releases the GIL and is atomic per word, so any
number of Python threads may use one bitmap at once.  A :class:`TrackTable`
is the geometry of one volume (its size cut into tracks) with its PENDING,
CHANGED and BUSY bitmaps.

Nothing here loops over bits in Python: :meth:`Bitmap.set_bits` collects
indexes in C straight into a numpy array, and :attr:`Bitmap.words` is a
zero-copy, read-only numpy view of the C words.

Indexes are checked before C is called: a negative index or one past the
end raises :class:`~pymirror.errors.RangeError` (an ``IndexError`` and a
``ValueError``), a non-integer raises ``TypeError``.
"""
from __future__ import annotations

import errno
import operator
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np
import numpy.typing as npt

from . import errors
from ._handle import Handle
from ._native import check, ffi, last_error, lib

__all__ = ["Bitmap", "TrackTable"]

_U64_LIMIT = 1 << 64
# set_bits() first collects up to _FIRST indexes (32 KiB: small enough to
# come from the heap without page faults); a full first chunk means a dense
# map, whose rest is counted and collected in one more call.  If other
# threads set bits meanwhile, the remainder comes in chunks of _CHUNK.
_FIRST = 1 << 12
_CHUNK = 1 << 16

IndexArray = npt.NDArray[np.uint64]
#: what load() and from_bytes() accept (any contiguous buffer works)
BytesLike = Union[bytes, bytearray, memoryview]

# Bound once: the single-bit methods are the ones called per track.
_GET = lib.pm_bitmap_get
_SET = lib.pm_bitmap_set
_CLEAR = lib.pm_bitmap_clear
_TEST_AND_SET = lib.pm_bitmap_test_and_set
_TEST_AND_CLEAR = lib.pm_bitmap_test_and_clear


def _index(value: object, what: str) -> int:
    """``value`` as a Python int (anything with ``__index__``), else TypeError."""
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{what} must be an int, not {type(value).__name__}") from None


class _Owner:
    """Keeps a C object alive: the gc-managed pointer of an owned bitmap, or
    for a borrowed one the Python object that owns it (a TrackTable)."""

    __slots__ = ("ptr", "parent")

    def __init__(self, ptr: Any, parent: object = None) -> None:
        self.ptr = ptr
        self.parent = parent


class _WordsHolder:
    """The ``base`` of a :attr:`Bitmap.words` array: numpy reads the memory
    through ``__array_interface__``, and the holder keeps the owner alive for
    as long as the array (or any view of it) exists."""

    __slots__ = ("__array_interface__", "owner")

    def __init__(self, address: int, nwords: int, owner: _Owner) -> None:
        self.owner = owner
        self.__array_interface__ = {
            "version": 3,
            "shape": (nwords,),
            "typestr": "<u8",
            "data": (address, True),  # True: read-only
        }


class Bitmap(Handle):
    """A fixed-size bitmap kept in C.

    ``Bitmap(size)`` makes a new, all-clear bitmap of ``size`` bits
    (1 <= size <= 2**48).  Thread-safe: every method is one atomic-per-word
    C call made without the GIL.  It has no ``close()``: the C bitmap is
    freed after the last reference (a table's bitmap keeps its table alive).
    """

    __slots__ = ("_own", "_p", "_size", "__weakref__")

    def __init__(self, size: int) -> None:
        size = _index(size, "size")
        if not 1 <= size < _U64_LIMIT:
            raise ValueError(f"a bitmap needs at least one bit and fewer than 2**64, got {size}")
        out = ffi.new("pm_bitmap **")
        rc = lib.pm_bitmap_create(size, out)
        if rc == -errno.EINVAL:
            raise ValueError(last_error())
        check(rc)
        if out[0] == ffi.NULL:  # pragma: no cover - C returned 0 without a bitmap
            raise MemoryError("pm_bitmap_create returned no bitmap")
        self._init_handle(ffi.gc(out[0], lib.pm_bitmap_destroy), "the bitmap", closable=False)
        self._own = _Owner(self._cptr)
        self._p = self._cptr
        self._size = size

    @classmethod
    def _borrow(cls, ptr: Any, parent: object) -> "Bitmap":
        """A Bitmap over C memory owned by ``parent`` (kept alive by it)."""
        if ptr == ffi.NULL:  # pragma: no cover - a table always has its flags
            raise ValueError(last_error())
        self = cls.__new__(cls)
        self._init_handle(ptr, "the bitmap", closable=False)
        if isinstance(parent, Handle):
            self._borrow_from(parent)
        self._own = _Owner(ptr, parent)
        self._p = ptr
        self._size = int(lib.pm_bitmap_size(ptr))
        return self

    # -- argument checks (all before C is called) ----------------------------

    def _range_error(self, i: object, what: str = "bit") -> errors.RangeError:
        return errors.RangeError(f"{what} {i} is outside the bitmap (valid: 0 to {self._size - 1})")

    def _bit(self, i: object) -> int:
        i = _index(i, "bit")
        if not 0 <= i < self._size:
            raise self._range_error(i)
        return i

    def _span(self, start: object, count: object) -> tuple[int, int]:
        s, c = _index(start, "start"), _index(count, "count")
        if s < 0 or c < 0 or s + c > self._size:
            raise errors.RangeError(
                f"bits {s}+{c} are outside the bitmap (size {self._size}: start and count "
                f"must be >= 0 and start + count <= {self._size})")
        return s, c

    def _from(self, frm: object) -> int:
        f = _index(frm, "from")
        if f < 0:
            raise errors.RangeError(f"from must not be negative, got {f}")
        return f

    def _other(self, other: object) -> Any:
        if not isinstance(other, Bitmap):
            raise TypeError(f"expected a Bitmap, not {type(other).__name__}")
        if other._size != self._size:
            raise errors.GeometryError(
                f"bitmaps differ in size ({self._size} and {other._size} bits)")
        return other._p

    # -- single bits ---------------------------------------------------------

    def __len__(self) -> int:
        """The size in bits."""
        return self._size

    @property
    def size(self) -> int:
        """The size in bits (the same as ``len(bitmap)``)."""
        return self._size

    def _single(self, fn: Callable[[Any, int], int], i: object) -> bool:
        # The fast path: one comparison, then one C call (which checks too).
        try:
            if 0 <= i < self._size:  # type: ignore[operator]
                r = fn(self._p, i)  # type: ignore[arg-type]  # checked: an int here
                if r >= 0:
                    return r == 1
                check(r)
        except TypeError:
            # a str (comparison failed) or a float (cffi refused it)
            self._bit(i)
            raise
        self._bit(i)  # raises RangeError (or TypeError) with the message
        raise AssertionError("unreachable")  # pragma: no cover

    def get(self, i: int) -> bool:
        """The value of bit ``i``."""
        return self._single(_GET, i)

    __getitem__ = get

    def set(self, i: int) -> bool:
        """Set bit ``i``; returns its old value."""
        return self._single(_SET, i)

    def clear(self, i: int) -> bool:
        """Clear bit ``i``; returns its old value."""
        return self._single(_CLEAR, i)

    def test_and_set(self, i: int) -> bool:
        """Atomically set bit ``i`` and return its old value: of several
        threads racing on one bit, exactly one gets False (it won)."""
        return self._single(_TEST_AND_SET, i)

    def test_and_clear(self, i: int) -> bool:
        """Atomically clear bit ``i`` and return its old value: of several
        threads racing on one set bit, exactly one gets True."""
        return self._single(_TEST_AND_CLEAR, i)

    # -- ranges and counts ---------------------------------------------------

    def set_range(self, start: int, count: int) -> int:
        """Set bits ``[start, start+count)``; returns how many changed."""
        return check(lib.pm_bitmap_set_range(self._p, *self._span(start, count)))

    def clear_range(self, start: int, count: int) -> int:
        """Clear bits ``[start, start+count)``; returns how many changed."""
        return check(lib.pm_bitmap_clear_range(self._p, *self._span(start, count)))

    def fill(self) -> None:
        """Set every bit."""
        check(lib.pm_bitmap_fill(self._p))

    def zero(self) -> None:
        """Clear every bit."""
        check(lib.pm_bitmap_zero(self._p))

    def count(self) -> int:
        """How many bits are set (a popcount in C, chosen at run time)."""
        return int(lib.pm_bitmap_count(self._p))

    def count_range(self, start: int, count: int) -> int:
        """How many bits of ``[start, start+count)`` are set."""
        return int(lib.pm_bitmap_count_range(self._p, *self._span(start, count)))

    # -- scanning ------------------------------------------------------------

    def next_set(self, frm: int = 0) -> Optional[int]:
        """The first set bit at or after ``frm``, or None (also when
        ``frm >= len(self)``)."""
        f = self._from(frm)
        if f >= self._size:
            return None
        r = lib.pm_bitmap_next_set(self._p, f)
        return None if r < 0 else int(r)

    def next_clear(self, frm: int = 0) -> Optional[int]:
        """The first clear bit at or after ``frm``, or None."""
        f = self._from(frm)
        if f >= self._size:
            return None
        r = lib.pm_bitmap_next_clear(self._p, f)
        return None if r < 0 else int(r)

    def next_run(self, frm: int = 0, max_len: Optional[int] = None) -> Optional[tuple[int, int]]:
        """``(start, length)`` of the first run of set bits at or after
        ``frm``, its length capped at ``max_len`` (default: no cap); None if
        no bit is set there.  Runs continue across word boundaries."""
        f = self._from(frm)
        cap = self._size if max_len is None else _index(max_len, "max_len")
        if cap < 1:
            raise ValueError(f"max_len must be at least 1, got {cap}")
        if f >= self._size:
            return None
        s, n = ffi.new("uint64_t *"), ffi.new("uint64_t *")
        found = check(lib.pm_bitmap_next_run(self._p, f, min(cap, self._size), s, n))
        return (int(s[0]), int(n[0])) if found else None

    def set_bits(self, start: int = 0) -> IndexArray:
        """The indexes of the set bits at or after ``start``, ascending, as a
        numpy ``uint64`` array, collected in C.

        Up to 4096 set bits take one C call; beyond that the rest is counted
        and collected straight into the result in one more call (more only
        if other threads set bits meanwhile)."""
        s = self._from(start)
        if s >= self._size:
            return np.empty(0, dtype=np.uint64)
        p = self._p
        first = np.empty(_FIRST, dtype=np.uint64)
        n = check(lib.pm_bitmap_collect(p, s, ffi.from_buffer("uint64_t[]", first), _FIRST))
        if n < _FIRST:
            return first[:n]
        nxt = int(first[-1]) + 1
        rest = int(lib.pm_bitmap_count_range(p, nxt, self._size - nxt)) if nxt < self._size else 0
        # One slot more than the count: if it stays unused, C reached the end.
        out = np.empty(_FIRST + rest + 1, dtype=np.uint64)
        out[:_FIRST] = first
        got = 0
        if rest:
            got = check(lib.pm_bitmap_collect(p, nxt, ffi.from_buffer("uint64_t[]", out[_FIRST:]), rest + 1))
        if got <= rest:
            return out[:_FIRST + got]
        parts = [out]                    # bits were set meanwhile: go on in chunks
        chunk = np.empty(_CHUNK, dtype=np.uint64)
        cbuf = ffi.from_buffer("uint64_t[]", chunk)
        nxt = int(out[-1]) + 1
        while nxt < self._size:
            got = check(lib.pm_bitmap_collect(p, nxt, cbuf, _CHUNK))
            if got == 0:
                break
            parts.append(chunk[:got].copy())
            nxt = int(chunk[got - 1]) + 1
        return np.concatenate(parts)

    def __iter__(self) -> Iterator[int]:
        """The set bits, ascending (from one :meth:`set_bits` snapshot)."""
        return iter(self.set_bits().tolist())

    # -- whole maps ----------------------------------------------------------

    def union(self, other: "Bitmap") -> None:
        """``self |= other`` (same size, else GeometryError)."""
        check(lib.pm_bitmap_union(self._p, self._other(other)))

    def intersect(self, other: "Bitmap") -> None:
        """``self &= other``."""
        check(lib.pm_bitmap_intersect(self._p, self._other(other)))

    def subtract(self, other: "Bitmap") -> None:
        """``self &= ~other``."""
        check(lib.pm_bitmap_subtract(self._p, self._other(other)))

    def copy_from(self, other: "Bitmap") -> None:
        """Make ``self`` equal ``other`` (atomic per word)."""
        check(lib.pm_bitmap_copy(self._p, self._other(other)))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Bitmap):
            return NotImplemented
        if other._size != self._size:
            return False
        return check(lib.pm_bitmap_equal(self._p, other._p)) == 1

    __hash__ = None  # type: ignore[assignment]  # mutable

    # -- serialisation -------------------------------------------------------

    def to_bytes(self) -> bytes:
        """``ceil(size / 8)`` bytes: bit i in byte i // 8 at bit i % 8
        (little-endian bit order, the same on every host)."""
        n = int(lib.pm_bitmap_serial_size(self._p))
        buf = ffi.new("unsigned char[]", n)
        check(lib.pm_bitmap_save(self._p, buf, n))
        return bytes(ffi.buffer(buf, n))

    def load(self, data: BytesLike) -> None:
        """Replace every bit from :meth:`to_bytes` output.  The wrong length
        (GeometryError) or set bits past the size (CorruptMetadataError)
        change nothing."""
        mv = memoryview(data).cast("B")
        need = int(lib.pm_bitmap_serial_size(self._p))
        if mv.nbytes != need:
            raise errors.GeometryError(
                f"{mv.nbytes} bytes given, a {self._size}-bit map needs {need}")
        check(lib.pm_bitmap_load(self._p, ffi.from_buffer(mv), need))

    @classmethod
    def from_bytes(cls, data: BytesLike, size: Optional[int] = None) -> "Bitmap":
        """A new bitmap from :meth:`to_bytes` output.  ``size`` defaults to
        ``8 * len(data)``; give it when the size is not a multiple of 8."""
        nbytes = memoryview(data).nbytes
        bm = cls(8 * nbytes if size is None else size)
        bm.load(data)
        return bm

    # -- inspection ----------------------------------------------------------

    @property
    def words(self) -> npt.NDArray[np.uint64]:
        """A zero-copy, read-only numpy view of the 64-bit words (bit i at
        bit i % 64 of word i // 64; bits past the size are zero).  The array
        keeps the bitmap's memory alive, even after the Bitmap is gone, and
        shows later changes."""
        n = int(lib.pm_bitmap_nwords(self._p))
        address = int(ffi.cast("uintptr_t", lib.pm_bitmap_words(self._p)))
        arr: npt.NDArray[np.uint64] = np.asarray(_WordsHolder(address, n, self._own))
        return arr

    def validate(self) -> None:
        """Check the C invariants (summary level consistent with the words,
        no bits past the size); CorruptMetadataError if broken.  Meaningful
        only while no other thread changes the bitmap."""
        check(lib.pm_bitmap_validate(self._p))

    def __repr__(self) -> str:
        return f"<Bitmap size={self._size} set={self.count()}>"


class TrackTable(Handle):
    """The geometry of one volume and its per-track flag bitmaps.

    ``TrackTable(volume_size, track_size=65536)``: ``track_size`` must be a
    power of two from 4 KiB to 16 MiB and ``volume_size`` positive (it need
    not be a multiple of ``track_size``: the last track is then shorter);
    otherwise GeometryError.
    """

    __slots__ = ("_p", "volume_size", "track_size", "tracks", "last_track_size",
                 "pending", "changed", "busy", "__weakref__")

    volume_size: int
    track_size: int
    tracks: int
    last_track_size: int
    pending: Bitmap
    changed: Bitmap
    busy: Bitmap

    def __init__(self, volume_size: int, track_size: int = 64 << 10) -> None:
        vs = _index(volume_size, "volume_size")
        ts = _index(track_size, "track_size")
        if not 0 < vs < _U64_LIMIT:
            raise errors.GeometryError(f"volume size must be greater than zero and below 2**64, got {vs}")
        if not 0 <= ts < 1 << 32:
            raise errors.GeometryError(
                f"track size {ts} is not a power of two from {lib.PM_TRACK_SIZE_MIN} "
                f"to {lib.PM_TRACK_SIZE_MAX}")
        out = ffi.new("pm_table **")
        check(lib.pm_table_create(vs, ts, out))
        self._init_handle(ffi.gc(out[0], lib.pm_table_destroy), "the track table", closable=False)
        self._p = self._cptr
        self.volume_size = int(lib.pm_table_volume_size(self._p))
        self.track_size = int(lib.pm_table_track_size(self._p))
        self.tracks = int(lib.pm_table_tracks(self._p))
        self.last_track_size = int(lib.pm_table_last_track_size(self._p))
        #: tracks whose data on this side is stale (the other side has it)
        self.pending = Bitmap._borrow(lib.pm_table_flag(self._p, lib.PM_PENDING), self)
        #: tracks written since the last split (or establish/restore start)
        self.changed = Bitmap._borrow(lib.pm_table_flag(self._p, lib.PM_CHANGED), self)
        #: tracks claimed by a copier or a host I/O
        self.busy = Bitmap._borrow(lib.pm_table_flag(self._p, lib.PM_BUSY), self)

    def track_of(self, offset: int) -> int:
        """The track holding byte ``offset`` (RangeError past the volume)."""
        off = _index(offset, "offset")
        if not 0 <= off < self.volume_size:
            raise errors.RangeError(
                f"offset {off} is outside the volume (valid: 0 to {self.volume_size - 1})")
        return check(lib.pm_table_track_of(self._p, off))

    def track_span(self, track: int) -> tuple[int, int]:
        """``(first byte, length)`` of a track; the last one may be short."""
        t = _index(track, "track")
        if not 0 <= t < self.tracks:
            raise errors.RangeError(f"track {t} is outside the table (valid: 0 to {self.tracks - 1})")
        off, ln = ffi.new("uint64_t *"), ffi.new("uint32_t *")
        check(lib.pm_table_track_span(self._p, t, off, ln))
        return int(off[0]), int(ln[0])

    def __repr__(self) -> str:
        return (f"<TrackTable {self.volume_size} bytes, {self.tracks} tracks of {self.track_size}, "
                f"pending={self.pending.count()} changed={self.changed.count()}>")
