"""Shared helpers for the benchmarks: page-cache dropping, peak RSS, medians,
and writing each figure to benchmarks/results/ as JSON beside the report."""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import time
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parent / "results"


def drop_caches() -> bool:
    """Drop the page cache (root only).  Returns False if not permitted."""
    subprocess.run(["sync"], check=False)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return True
    except OSError:
        return False


def drop_file(path) -> None:
    """Drop one file from the page cache (written back first): a cold read
    of it without dropping everything else."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median(xs):
    return statistics.median(xs)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def record(name: str, data: dict, save: bool = True) -> None:
    """Print a figure; on a real run (not --benchmark-disable) also keep it."""
    if not save:
        print(f"\n{name} (quick run, not saved): {json.dumps(data, sort_keys=True)}")
        return
    RESULTS.mkdir(exist_ok=True)
    data = dict(data, machine=platform.machine(), cpus=os.cpu_count(),
                date=time.strftime("%Y-%m-%d"), peak_rss_mib=round(peak_rss_mib(), 1))
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    print(f"\n{name}: {json.dumps(data, sort_keys=True)}")


@pytest.fixture
def tools(benchmark):
    """The helpers above (benchmarks run with --import-mode=importlib, so
    they cannot import conftest directly).  Quick runs save nothing."""
    import functools
    import types
    return types.SimpleNamespace(drop_caches=drop_caches, drop_file=drop_file, peak_rss_mib=peak_rss_mib,
                                 median=median, timed=timed,
                                 record=functools.partial(record, save=not benchmark.disabled))


@pytest.fixture
def scale(benchmark):
    """1.0 for a real benchmark run; small when run with --benchmark-disable
    (CI runs the benchmarks that way so they keep working, quickly)."""
    return 0.03125 if benchmark.disabled else 1.0
