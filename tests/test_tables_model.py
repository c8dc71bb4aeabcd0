"""Every Bitmap operation against a plain Python ``set`` model, driven by
hypothesis, on sizes that are not multiples of 64 (and some that are).
After every step the whole bitmap is compared with the model: the count,
the set bits, the zero-copy words, and the C invariants."""
from __future__ import annotations

from typing import Optional

import hypothesis.strategies as st
import numpy as np
from hypothesis import given
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from pymirror import Bitmap, TrackTable

SIZES = [1, 63, 64, 65, 127, 129, 1000, 4097]
ANY = st.integers(0, 10**9)   # reduced modulo the size inside each rule


def model_next(model: set[int], frm: int, size: int, want: bool) -> Optional[int]:
    for b in range(frm, size):
        if (b in model) == want:
            return b
    return None


def packed(model: set[int], size: int) -> bytes:
    bits = np.zeros((size + 7) // 8 * 8, dtype=np.uint8)
    bits[sorted(model)] = 1
    return np.packbits(bits, bitorder="little").tobytes()


class BitmapMachine(RuleBasedStateMachine):
    @initialize(size=st.sampled_from(SIZES))
    def make(self, size: int) -> None:
        self.size = size
        self.bm = Bitmap(size)
        self.model: set[int] = set()

    # -- single bits ---------------------------------------------------------
    @rule(i=ANY, op=st.sampled_from(["set", "clear", "test_and_set", "test_and_clear", "get"]))
    def single(self, i: int, op: str) -> None:
        i %= self.size
        old = i in self.model
        assert getattr(self.bm, op)(i) is old
        assert self.bm[i] is (op in ("set", "test_and_set") or (op == "get" and old))
        if op in ("set", "test_and_set"):
            self.model.add(i)
        elif op != "get":
            self.model.discard(i)

    # -- ranges ----------------------------------------------------------------
    @rule(a=ANY, b=ANY, on=st.booleans(), short=st.booleans())
    def range_op(self, a: int, b: int, on: bool, short: bool) -> None:
        start = a % self.size
        count = b % (self.size - start + 1)
        if short:
            count %= 130
        span = set(range(start, start + count))
        if on:
            assert self.bm.set_range(start, count) == len(span - self.model)
            self.model |= span
        else:
            assert self.bm.clear_range(start, count) == len(span & self.model)
            self.model -= span

    @rule(a=ANY, b=ANY)
    def count_range(self, a: int, b: int) -> None:
        start = a % (self.size + 1)
        count = b % (self.size - start + 1)
        assert self.bm.count_range(start, count) == len([x for x in self.model if start <= x < start + count])

    @rule()
    def fill_or_zero(self) -> None:
        if len(self.model) % 2:
            self.bm.fill()
            self.model = set(range(self.size))
        else:
            self.bm.zero()
            self.model = set()

    # -- scans -------------------------------------------------------------------
    @rule(i=ANY)
    def next_set_and_clear(self, i: int) -> None:
        i %= self.size + 2            # from may be at or past the end
        assert self.bm.next_set(i) == model_next(self.model, i, self.size, True)
        assert self.bm.next_clear(i) == model_next(self.model, i, self.size, False)

    @rule(i=ANY, cap=st.one_of(st.none(), st.integers(1, 200), st.just(2**64 + 5)))
    def next_run(self, i: int, cap: Optional[int]) -> None:
        i %= self.size + 1
        got = self.bm.next_run(i, cap)
        start = model_next(self.model, i, self.size, True)
        if start is None:
            assert got is None
            return
        limit = self.size if cap is None else cap
        end = start
        while end in self.model and end - start < limit:
            end += 1
        assert got == (start, end - start)

    @rule(i=ANY)
    def set_bits_from(self, i: int) -> None:
        i %= self.size + 1
        got = self.bm.set_bits(i)
        assert got.dtype == np.uint64
        assert got.tolist() == sorted(b for b in self.model if b >= i)

    # -- whole maps ----------------------------------------------------------------
    @rule(other_bits=st.lists(ANY, max_size=20), op=st.sampled_from(["u", "i", "s", "c"]))
    def whole_map(self, other_bits: list[int], op: str) -> None:
        other = Bitmap(self.size)
        obits = {b % self.size for b in other_bits}
        for b in obits:
            other.set(b)
        if op == "u":
            self.bm.union(other)
            self.model |= obits
        elif op == "i":
            self.bm.intersect(other)
            self.model &= obits
        elif op == "s":
            self.bm.subtract(other)
            self.model -= obits
        else:
            self.bm.copy_from(other)
            self.model = set(obits)
        assert (self.bm == other) == (self.model == obits)
        assert set(other) == obits                 # the source is unchanged
        other.validate()

    # -- serialisation -------------------------------------------------------------
    @rule()
    def round_trip(self) -> None:
        data = self.bm.to_bytes()
        assert len(data) == (self.size + 7) // 8
        # little-endian bit order, independent of the host
        assert data == packed(self.model, self.size)
        again = Bitmap.from_bytes(data, self.size)
        assert again == self.bm
        assert set(again) == self.model
        again.validate()

    @rule(bits=st.lists(ANY, max_size=30))
    def load(self, bits: list[int]) -> None:
        new = {b % self.size for b in bits}
        self.bm.load(packed(new, self.size))
        self.model = new

    # -- after every step --------------------------------------------------------------
    @invariant()
    def agrees(self) -> None:
        if not hasattr(self, "bm"):
            return
        assert len(self.bm) == self.size
        assert self.bm.count() == len(self.model)
        assert self.bm.set_bits().tolist() == sorted(self.model)
        words = self.bm.words
        assert words.shape == ((self.size + 63) // 64,)
        unpacked = np.unpackbits(words.view(np.uint8), bitorder="little")
        assert np.flatnonzero(unpacked).tolist() == sorted(self.model)   # nothing past the size
        self.bm.validate()


TestBitmapModel = BitmapMachine.TestCase


@given(size=st.integers(1, 5000), data=st.data())
def test_count_range_matches_model(size: int, data: st.DataObject) -> None:
    bits = data.draw(st.sets(st.integers(0, size - 1), max_size=50))
    bm = Bitmap(size)
    for b in bits:
        bm.set(b)
    start = data.draw(st.integers(0, size))
    count = data.draw(st.integers(0, size - start))
    assert bm.count_range(start, count) == len([b for b in bits if start <= b < start + count])


@given(size=st.integers(1, 300_000), data=st.data())
def test_set_bits_of_large_maps(size: int, data: st.DataObject) -> None:
    """Sparse and dense stretches around summary boundaries (4096 bits)."""
    ranges = data.draw(st.lists(st.tuples(st.integers(0, size - 1), st.integers(0, 5000)), max_size=8))
    bm = Bitmap(size)
    expect = np.zeros(size, dtype=bool)
    for start, count in ranges:
        count = min(count, size - start)
        bm.set_range(start, count)
        expect[start:start + count] = True
    frm = data.draw(st.integers(0, size))
    assert np.array_equal(bm.set_bits(frm), np.flatnonzero(expect[frm:]) + frm)
    assert bm.count() == int(expect.sum())
    bm.validate()


@given(volume=st.integers(1, 2**44), shift=st.integers(12, 24), data=st.data())
def test_track_geometry(volume: int, shift: int, data: st.DataObject) -> None:
    ts = 1 << shift
    if -(-volume // ts) > 1 << 22:           # keep the tables small
        volume = ts * (1 << 22) - data.draw(st.integers(0, ts - 1))
    t = TrackTable(volume, ts)
    assert t.tracks == -(-volume // ts)
    assert t.last_track_size == volume - (t.tracks - 1) * ts
    for flag in (t.pending, t.changed, t.busy):
        assert len(flag) == t.tracks
    off = data.draw(st.integers(0, volume - 1))
    track = t.track_of(off)
    first, length = t.track_span(track)
    assert first <= off < first + length
    assert length == (t.last_track_size if track == t.tracks - 1 else ts)
