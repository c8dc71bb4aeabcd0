"""Python threads racing in C on the same bits (cffi releases the GIL, so
the C atomics do the racing): every bit is won exactly once, and the
summary level stays consistent."""
from __future__ import annotations

import threading
from typing import Callable

import numpy as np

from pymirror import Bitmap, TrackTable

NTHREADS = 4


def run_threads(worker: Callable[[int], None], n: int = NTHREADS) -> None:
    errors: list[BaseException] = []

    def wrapped(k: int) -> None:
        try:
            worker(k)
        except BaseException as exc:  # report, do not hang the barrier
            errors.append(exc)

    threads = [threading.Thread(target=wrapped, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
        assert not t.is_alive(), "a worker hung"
    assert not errors, errors


def test_each_bit_won_exactly_once():
    """Four threads test-and-set overlapping ranges, each in its own order."""
    n = 50_000
    bm = Bitmap(n)
    wins = [0] * NTHREADS
    won_by: list[list[int]] = [[] for _ in range(NTHREADS)]
    barrier = threading.Barrier(NTHREADS)

    def worker(k: int) -> None:
        # thread k covers [k*n/8, k*n/8 + 5n/8): every bit is in 2-4 ranges
        lo = k * n // 8
        order = np.random.default_rng(k).permutation(np.arange(lo, lo + 5 * n // 8) % n).tolist()
        tas = bm.test_and_set
        barrier.wait()
        mine = [b for b in order if not tas(b)]
        wins[k] = len(mine)
        won_by[k] = mine

    run_threads(worker)
    assert sum(wins) == n
    everything = np.concatenate([np.array(w, dtype=np.int64) for w in won_by])
    assert np.array_equal(np.sort(everything), np.arange(n))   # each exactly once
    assert bm.count() == n
    bm.validate()


def test_each_set_bit_cleared_exactly_once():
    n = 20_000
    bm = Bitmap(n)
    bm.fill()
    wins = [0] * NTHREADS
    barrier = threading.Barrier(NTHREADS)

    def worker(k: int) -> None:
        order = np.random.default_rng(100 + k).permutation(n).tolist()
        tac = bm.test_and_clear
        barrier.wait()
        wins[k] = sum(1 for b in order if tac(b))

    run_threads(worker)
    assert sum(wins) == n
    assert bm.count() == 0 and bm.next_set(0) is None
    bm.validate()


def test_threads_flipping_bits_of_shared_words():
    """Thread k owns bit k of every word and flips it: words turn zero and
    non-zero under four threads at once.  The final pattern is known."""
    words = 64
    bm = Bitmap(words * 64)
    barrier = threading.Barrier(NTHREADS)

    def worker(k: int) -> None:
        rng = np.random.default_rng(k)
        picks = (rng.integers(0, words, 20_000) * 64 + k).tolist()
        ops = rng.integers(0, 3, 20_000).tolist()
        barrier.wait()
        for b, op in zip(picks, ops):
            if op == 0:
                bm.set(b)
            elif op == 1:
                bm.clear(b)
            else:
                bm.clear_range(b, 1)
        for w in range(words):
            (bm.set if (w + k) % 3 == 0 else bm.clear)(w * 64 + k)

    run_threads(worker)
    bm.validate()
    expect = sorted(w * 64 + k for w in range(words) for k in range(NTHREADS) if (w + k) % 3 == 0)
    assert bm.set_bits().tolist() == expect
    assert bm.count() == len(expect)


def test_concurrent_range_and_whole_map_ops_keep_summary_consistent():
    table = TrackTable(1 << 30, 64 << 10)          # 16384 tracks
    bm, src = table.pending, table.changed
    src.set_range(100, 5000)
    barrier = threading.Barrier(NTHREADS)

    def worker(k: int) -> None:
        rng = np.random.default_rng(k)
        barrier.wait()
        for step in range(3000):
            s = int(rng.integers(0, table.tracks))
            c = int(rng.integers(0, min(200, table.tracks - s) + 1))
            op = int(rng.integers(0, 20))
            if op == 0:
                bm.union(src)
            elif op == 1:
                bm.subtract(src)
            elif op == 2 and step % 50 == 0:
                bm.zero()
            elif op % 2:
                bm.set_range(s, c)
            else:
                bm.clear_range(s, c)
            bm.next_run(s, 64)
            bm.set_bits(s) if step % 100 == 0 else None

    run_threads(worker)
    bm.validate()
    src.validate()
    assert len(bm.set_bits()) == bm.count() == int(np.bitwise_count(bm.words).sum())


def test_set_bits_never_misses_a_bit_set_throughout():
    """set_bits() sizes the rest of its result by a count once a first chunk
    comes back full; bits that another thread sets between the count and the
    collection must not push out bits that were set all along."""
    n = 1 << 18
    stable = np.arange(0, n, 2, dtype=np.uint64)  # every even bit: 128 Ki, two chunks' worth
    bm = Bitmap.from_bytes(b"\x55" * (n // 8))
    assert bm.count() == len(stable)
    window = list(range(200_001, 200_129, 2))     # odd bits past the first chunk
    stop = threading.Event()

    def flipper() -> None:
        k = 0
        while not stop.is_set():
            for b in window:
                (bm.set if k % 2 == 0 else bm.clear)(b)
            k += 1

    t = threading.Thread(target=flipper)
    t.start()
    try:
        for _ in range(300):
            got = bm.set_bits()
            assert np.all(np.diff(got.astype(np.int64)) > 0)          # ascending, no repeats
            assert np.array_equal(got[got % 2 == 0], stable)         # every stable bit
    finally:
        stop.set()
        t.join()


def test_set_bits_when_bits_are_set_between_its_count_and_collect(monkeypatch):
    """The same race, played deterministically: a stand-in for the C library
    sets bits right after set_bits() has counted.  Bits set all along must
    all be returned, plus the new ones, in order."""
    import pymirror.tables as tables

    real = tables.lib
    bm = Bitmap.from_bytes(b"\x55" * (300_000 // 8))
    stable = list(range(0, 300_000, 2))          # the first chunk comes back full
    racing = list(range(140_001, 300_000, 2))    # all past the first chunk
    calls = []

    class RacingLib:
        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

        def pm_bitmap_count_range(self, p: object, start: int, count: int) -> int:
            n = real.pm_bitmap_count_range(p, start, count)
            calls.append(start)
            for b in racing:
                real.pm_bitmap_set(p, b)
            return n

    monkeypatch.setattr(tables, "lib", RacingLib())
    got = bm.set_bits()
    monkeypatch.undo()
    assert len(calls) == 1 and calls[0] < 140_001
    assert got.tolist() == sorted(set(stable) | set(racing))
