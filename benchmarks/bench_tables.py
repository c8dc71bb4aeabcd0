"""Track-table speed against numpy, in the same run, on 16 Mi bits (a 1 TiB
volume at 64 KiB tracks); popcount also on 256 Mi bits (32 MiB, past L2).

Run:       pytest benchmarks/bench_tables.py --benchmark-only -s
Quick:     pytest benchmarks/bench_tables.py --benchmark-disable   (CI: each runs once)

Each ``ours`` row has a ``numpy`` row in the same group.  The last test
measures the same pairs again with interleaved reps (A B A B ...) and
writes the medians and ratios to benchmarks/results/tables.json; the
write-up is in benchmarks/README.md.
"""
from __future__ import annotations

import functools
import time
from typing import Any, Callable

import numpy as np
import pytest

from pymirror import Bitmap
from pymirror._native import ffi, lib

NBITS = 16 << 20          # 1 TiB at 64 KiB tracks
BIG = 256 << 20           # 16 TiB at 64 KiB tracks: 32 MiB per bitmap
OPS = 100_000             # test-and-set calls per rep


@functools.lru_cache(maxsize=None)
def make(kind: str, nbits: int = NBITS) -> tuple[Bitmap, np.ndarray]:
    """A bitmap and the same bits packed little-endian in a numpy uint8 array."""
    rng = np.random.default_rng(0)
    if kind == "sparse":                  # 1 in 10,000 set
        bits = np.zeros(nbits, dtype=np.uint8)
        bits[rng.choice(nbits, nbits // 10_000, replace=False)] = 1
        packed = np.packbits(bits, bitorder="little")
    else:                                 # 50 %: random words
        packed = rng.integers(0, 256, nbits // 8, dtype=np.uint8)
    bm = Bitmap.from_bytes(packed.tobytes(), nbits)
    assert bm.count() == int(np.bitwise_count(packed).sum())
    return bm, packed


def numpy_scan(packed: np.ndarray) -> np.ndarray:
    return np.flatnonzero(np.unpackbits(packed, bitorder="little"))


def numpy_popcount(words: np.ndarray) -> int:
    return int(np.bitwise_count(words).sum())


# -- enumerate every set bit ------------------------------------------------------

@pytest.mark.parametrize("kind", ["sparse", "dense"])
def test_scan_ours(benchmark: Any, kind: str) -> None:
    bm, packed = make(kind)
    benchmark.group = f"scan-{kind} (16 Mi bits)"
    got = benchmark(bm.set_bits)
    assert np.array_equal(got, numpy_scan(packed))


@pytest.mark.parametrize("kind", ["sparse", "dense"])
def test_scan_numpy(benchmark: Any, kind: str) -> None:
    _, packed = make(kind)
    benchmark.group = f"scan-{kind} (16 Mi bits)"
    benchmark(numpy_scan, packed)


# -- popcount ------------------------------------------------------------------------

@pytest.mark.parametrize("kind,nbits", [("sparse", NBITS), ("dense", NBITS), ("dense", BIG)])
def test_popcount_ours(benchmark: Any, kind: str, nbits: int) -> None:
    bm, packed = make(kind, nbits)
    benchmark.group = f"popcount-{kind} ({nbits >> 20} Mi bits)"
    benchmark.extra_info["bytes"] = nbits // 8
    benchmark.extra_info["impl"] = ffi.string(lib.pm_popcount_impl()).decode()
    assert benchmark(bm.count) == numpy_popcount(packed.view(np.uint64))


@pytest.mark.parametrize("kind,nbits", [("sparse", NBITS), ("dense", NBITS), ("dense", BIG)])
def test_popcount_numpy(benchmark: Any, kind: str, nbits: int) -> None:
    _, packed = make(kind, nbits)
    words = packed.view(np.uint64)
    benchmark.group = f"popcount-{kind} ({nbits >> 20} Mi bits)"
    benchmark.extra_info["bytes"] = nbits // 8
    benchmark(numpy_popcount, words)


# -- test-and-set from Python --------------------------------------------------------

def tas_ours(bm: Bitmap, idx: list[int]) -> None:
    tas = bm.test_and_set
    for i in idx:
        tas(i)


def tas_numpy(arr: np.ndarray, idx: list[int]) -> None:
    for i in idx:             # the same read-then-set, but not atomic
        old = arr[i]
        arr[i] = True
        del old


def test_test_and_set_ours(benchmark: Any) -> None:
    bm = Bitmap(NBITS)
    idx = np.random.default_rng(1).integers(0, NBITS, OPS).tolist()
    benchmark.group = f"test-and-set (Python loop, {OPS // 1000}k random ops)"
    benchmark(tas_ours, bm, idx)


def test_test_and_set_numpy(benchmark: Any) -> None:
    arr = np.zeros(NBITS, dtype=bool)
    idx = np.random.default_rng(1).integers(0, NBITS, OPS).tolist()
    benchmark.group = f"test-and-set (Python loop, {OPS // 1000}k random ops)"
    benchmark(tas_numpy, arr, idx)


# -- the same pairs, interleaved, written to results/tables.json -------------------------

def interleaved(a: Callable[[], object], b: Callable[[], object], reps: int) -> tuple[float, float]:
    """Medians of ``reps`` alternating timings of a and b (seconds)."""
    ta, tb = [], []
    for _ in range(reps):
        for fn, out in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return float(np.median(ta)), float(np.median(tb))


def test_ratios_interleaved(benchmark: Any, tools: Any) -> None:
    quick = benchmark.disabled
    benchmark.group = "all pairs, interleaved (one round: see results/tables.json)"
    fig = benchmark.pedantic(measure_all, args=(quick,), rounds=1, iterations=1)
    tools.record("tables", fig)
    # the targets (checked only on a real run: quick runs are too short to judge)
    if not quick:
        assert fig["scan_sparse"]["speedup"] >= 100
        assert fig["scan_dense"]["speedup"] >= 1.0


def measure_all(quick: bool) -> dict[str, Any]:
    reps = 3 if quick else 15
    fig: dict[str, Any] = {"nbits": NBITS, "reps": reps,
                           "popcount_impl": ffi.string(lib.pm_popcount_impl()).decode()}
    for kind in ("sparse", "dense"):
        bm, packed = make(kind)
        ours, theirs = interleaved(bm.set_bits, lambda: numpy_scan(packed), reps)
        fig[f"scan_{kind}"] = {"ours_s": ours, "numpy_s": theirs, "speedup": theirs / ours}
        words = packed.view(np.uint64)
        ours, theirs = interleaved(bm.count, lambda: numpy_popcount(words), reps * 4)
        fig[f"popcount_{kind}"] = {"ours_s": ours, "numpy_s": theirs, "speedup": theirs / ours,
                                   "ours_GBps": NBITS / 8 / ours / 1e9}
    bm, packed = make("dense", BIG)
    words = packed.view(np.uint64)
    ours, theirs = interleaved(bm.count, lambda: numpy_popcount(words), reps)
    fig["popcount_dense_256Mi"] = {"ours_s": ours, "numpy_s": theirs, "speedup": theirs / ours,
                                   "ours_GBps": BIG / 8 / ours / 1e9}
    n = OPS // 10 if quick else OPS
    idx = np.random.default_rng(1).integers(0, NBITS, n).tolist()
    tbm, arr = Bitmap(NBITS), np.zeros(NBITS, dtype=bool)
    ours, theirs = interleaved(lambda: tas_ours(tbm, idx), lambda: tas_numpy(arr, idx), max(3, reps // 3))
    fig["test_and_set_python"] = {"ours_ns_per_op": ours / n * 1e9, "numpy_ns_per_op": theirs / n * 1e9,
                                  "ratio": ours / theirs}
    return fig
