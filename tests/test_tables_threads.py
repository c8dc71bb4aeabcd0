"""Python threads racing in C on the same bits (cffi releases the GIL):
every bit is won exactly once."""
from __future__ import annotations

import threading

import numpy as np

from pymirror import Bitmap, TrackTable


def test_each_bit_won_exactly_once():
    n, nthreads = 50_000, 4
    bm = Bitmap(n)
    wins = [0] * nthreads
    barrier = threading.Barrier(nthreads)

    def worker(k: int) -> None:
        order = np.random.default_rng(k).permutation(n).tolist()
        barrier.wait()
        won = 0
        for b in order:
            if not bm.test_and_set(b):
                won += 1
        wins[k] = won

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(nthreads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(wins) == n
    assert bm.count() == n
    bm.validate()


def test_concurrent_range_ops_keep_summary_consistent():
    table = TrackTable(1 << 30, 64 << 10)          # 16384 tracks
    bm = table.pending
    barrier = threading.Barrier(4)

    def worker(k: int) -> None:
        rng = np.random.default_rng(k)
        barrier.wait()
        for _ in range(3000):
            s = int(rng.integers(0, table.tracks))
            c = int(rng.integers(0, min(200, table.tracks - s) + 1))
            (bm.set_range if rng.integers(2) else bm.clear_range)(s, c)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bm.validate()
    assert len(bm.set_bits()) == bm.count() == int(np.bitwise_count(bm.words).sum())
