"""Every Bitmap operation against a plain Python ``set`` model, driven by
hypothesis, on sizes that are not multiples of 64 (and some that are)."""
from __future__ import annotations

import hypothesis.strategies as st
import numpy as np
from hypothesis import given
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pymirror import Bitmap

SIZES = [1, 63, 64, 65, 127, 129, 1000, 4095, 4097]


class BitmapMachine(RuleBasedStateMachine):
    @initialize(size=st.sampled_from(SIZES))
    def make(self, size: int) -> None:
        self.size = size
        self.bm = Bitmap(size)
        self.model: set[int] = set()

    def bit(self):
        return st.integers(0, 10**9)

    @rule(i=st.integers(0, 10**9))
    def test_and_set(self, i: int) -> None:
        i %= self.size
        assert self.bm.test_and_set(i) == (i in self.model)
        self.model.add(i)

    @rule(i=st.integers(0, 10**9))
    def test_and_clear(self, i: int) -> None:
        i %= self.size
        assert self.bm.test_and_clear(i) == (i in self.model)
        self.model.discard(i)

    @rule(a=st.integers(0, 10**9), b=st.integers(0, 10**9), on=st.booleans())
    def range_op(self, a: int, b: int, on: bool) -> None:
        start = a % self.size
        count = b % (self.size - start + 1)
        span = set(range(start, start + count))
        if on:
            assert self.bm.set_range(start, count) == len(span - self.model)
            self.model |= span
        else:
            assert self.bm.clear_range(start, count) == len(span & self.model)
            self.model -= span

    @rule(i=st.integers(0, 10**9))
    def next_set_and_clear(self, i: int) -> None:
        i %= self.size + 2
        sets = [b for b in self.model if b >= i]
        clears = [b for b in range(i, self.size) if b not in self.model]
        assert self.bm.next_set(i) == (min(sets) if sets else None)
        assert self.bm.next_clear(i) == (min(clears) if clears else None)

    @rule(i=st.integers(0, 10**9), cap=st.integers(1, 200))
    def next_run(self, i: int, cap: int) -> None:
        i %= self.size
        sets = sorted(b for b in self.model if b >= i)
        got = self.bm.next_run(i, cap)
        if not sets:
            assert got is None
            return
        start = sets[0]
        end = start
        while end in self.model and end - start < cap:
            end += 1
        assert got == (start, end - start)

    @rule(other_bits=st.lists(st.integers(0, 10**9), max_size=20), op=st.sampled_from(["u", "i", "s", "c"]))
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

    @rule()
    def round_trip(self) -> None:
        data = self.bm.to_bytes()
        assert len(data) == (self.size + 7) // 8
        again = Bitmap.from_bytes(self.size, data)
        assert again == self.bm
        assert set(again) == self.model
        # the byte format is little-endian bit order, independent of the host
        expect = np.zeros((self.size + 7) // 8 * 8, dtype=np.uint8)
        expect[sorted(self.model)] = 1
        assert data == np.packbits(expect, bitorder="little").tobytes()

    @rule()
    def fill_or_zero(self) -> None:
        if len(self.model) % 2:
            self.bm.fill()
            self.model = set(range(self.size))
        else:
            self.bm.zero()
            self.model = set()

    @invariant()
    def agrees(self) -> None:
        if not hasattr(self, "bm"):
            return
        assert self.bm.count() == len(self.model)
        assert self.bm.set_bits().tolist() == sorted(self.model)
        words = self.bm.words
        assert int(np.bitwise_count(words).sum()) == len(self.model)
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
