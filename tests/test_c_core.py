"""The C core's own tests, plain and under ThreadSanitizer and
AddressSanitizer + UBSan.  These fail (not skip) when make or a compiler is
missing: the C library is part of what pymirror ships."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "csrc"


def make(target: str, timeout: int = 900) -> str:
    proc = subprocess.run(["make", "-C", str(CSRC), "-s", "WERROR=1", target], capture_output=True,
                          text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert " 0 failed" in out and "passed" in out, out[-4000:]
    return out


def test_c_tests():
    make("check")


@pytest.mark.slow
def test_c_tests_under_thread_sanitizer():
    out = make("check-tsan")
    assert "ThreadSanitizer" not in out


@pytest.mark.slow
def test_c_tests_under_address_and_ub_sanitizers():
    out = make("check-asan")
    assert "AddressSanitizer" not in out and "runtime error" not in out
