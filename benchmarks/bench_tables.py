"""Track-table speed against numpy, in the same run, on 16 Mi bits (a 1 TiB
volume at 64 KiB tracks).

Run:  pytest benchmarks/bench_tables.py --benchmark-only
Compare the ``ours`` and ``numpy`` rows of each group; the ratios are
written up in benchmarks/README.md.
"""
from __future__ import annotations

import numpy as np
import pytest

from pymirror import Bitmap

NBITS = 16 << 20


def make(kind: str) -> tuple[Bitmap, np.ndarray]:
    rng = np.random.default_rng(0)
    if kind == "sparse":
        bits = np.zeros(NBITS, dtype=np.uint8)
        bits[rng.choice(NBITS, NBITS // 10_000, replace=False)] = 1
    else:
        bits = rng.integers(0, 2, NBITS, dtype=np.uint8)
    packed = np.packbits(bits, bitorder="little")
    bm = Bitmap.from_bytes(NBITS, packed.tobytes())
    assert bm.count() == int(bits.sum())
    return bm, packed


@pytest.mark.parametrize("kind", ["sparse", "dense"])
def test_scan_ours(benchmark, kind):
    bm, packed = make(kind)
    benchmark.group = f"scan-{kind}"
    got = benchmark(bm.set_bits)
    assert np.array_equal(got, np.flatnonzero(np.unpackbits(packed, bitorder="little")))


@pytest.mark.parametrize("kind", ["sparse", "dense"])
def test_scan_numpy(benchmark, kind):
    _, packed = make(kind)
    benchmark.group = f"scan-{kind}"
    benchmark(lambda: np.flatnonzero(np.unpackbits(packed, bitorder="little")))


@pytest.mark.parametrize("kind", ["sparse", "dense"])
def test_popcount_ours(benchmark, kind):
    bm, _ = make(kind)
    benchmark.group = f"popcount-{kind}"
    benchmark.extra_info["bytes"] = NBITS // 8
    benchmark(bm.count)


@pytest.mark.parametrize("kind", ["sparse", "dense"])
def test_popcount_numpy(benchmark, kind):
    _, packed = make(kind)
    words = packed.view(np.uint64)
    benchmark.group = f"popcount-{kind}"
    benchmark(lambda: int(np.bitwise_count(words).sum()))


OPS = 100_000


def test_test_and_set_ours(benchmark):
    bm = Bitmap(NBITS)
    idx = np.random.default_rng(1).integers(0, NBITS, OPS).tolist()
    benchmark.group = "test-and-set (Python loop, 100k ops)"

    def run():
        tas = bm.test_and_set
        for i in idx:
            tas(i)
    benchmark(run)


def test_test_and_set_numpy(benchmark):
    arr = np.zeros(NBITS, dtype=bool)
    idx = np.random.default_rng(1).integers(0, NBITS, OPS).tolist()
    benchmark.group = "test-and-set (Python loop, 100k ops)"

    def run():
        for i in idx:       # the same read-then-set, not atomic
            old = arr[i]
            arr[i] = True
            del old
    benchmark(run)
