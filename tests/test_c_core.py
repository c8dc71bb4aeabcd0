"""The C core's own test programs (csrc/tests/test_*.c), plain and under
ThreadSanitizer and AddressSanitizer + UBSan.

These FAIL (never skip) when make or a C compiler is missing: the C library
is part of what pymirror ships, and its tests are the only ones that run
the core without Python in between."""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CSRC = REPO / "csrc"
pytestmark = pytest.mark.source_tree    # builds csrc/ with make: not run against a built wheel


def make(target: str, timeout: int = 1800) -> str:
    if shutil.which("make") is None:
        pytest.fail("`make` is not installed: the C core's tests cannot be built (install make)")
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        pytest.fail(f"no C compiler `{cc}` on PATH: the C core's tests cannot be built (install gcc)")
    proc = subprocess.run(["make", "-C", str(CSRC), "-s", "WERROR=1", target],
                          capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"make {target} failed (exit {proc.returncode}):\n{out[-6000:]}"
    if target == "all":
        return out
    # every test program ends with "<name>: N passed, 0 failed"
    tests = sorted(p.stem for p in (CSRC / "tests").glob("test_*.c"))
    for name in tests:
        assert f"{name}: " in out and f"{name}: 0 passed" not in out, f"{name} did not run:\n{out[-6000:]}"
    assert " failed" in out and all(
        line.endswith(" 0 failed") for line in out.splitlines() if line.endswith(" failed")), out[-6000:]
    return out


def test_c_tests() -> None:
    make("check")


@pytest.mark.parametrize("impl", ["portable", "popcnt"])
def test_bitmap_tests_with_a_forced_popcount(impl: str) -> None:
    """The whole bitmap test again with a slower popcount forced (the CPU
    dispatch picks the fastest, so these paths would go untested)."""
    make("all")
    env = dict(os.environ, PYMIRROR_POPCOUNT=impl)
    proc = subprocess.run([str(CSRC / "build" / "test_bitmap")], capture_output=True, text=True,
                          env=env, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "test_bitmap: " in out and " 0 failed" in out, out[-6000:]
    chosen = [ln for ln in out.splitlines() if ln.startswith("popcount implementation: ")]
    # portable exists everywhere; popcnt only on x86-64 (elsewhere the
    # request is ignored and the best one is used)
    if impl == "portable" or platform.machine() in ("x86_64", "AMD64"):
        assert chosen == [f"popcount implementation: {impl}"], out[-2000:]


@pytest.mark.slow
def test_c_tests_under_thread_sanitizer() -> None:
    out = make("check-tsan")
    assert "WARNING: ThreadSanitizer" not in out, out[-6000:]


@pytest.mark.slow
def test_c_tests_under_address_and_ub_sanitizers() -> None:
    out = make("check-asan")
    assert "ERROR: AddressSanitizer" not in out and "runtime error" not in out, out[-6000:]
