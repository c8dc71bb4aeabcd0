"""What the sdist and the packaging settings promise: the sdist holds every
file the tests need (so tests run from an unpacked sdist), the LICENSE is
there, and cibuildwheel tests the built wheel without rebuilding the source
tree."""
from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def test_license_is_mit_for_pymirror_developers() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "Copyright (c) 2026 pymirror developers" in text


def test_cibuildwheel_tests_the_wheel_not_the_source_tree() -> None:
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())
    cmd = conf["tool"]["cibuildwheel"]["test-command"]
    for marker in ("real_client", "source_tree", "slow"):
        assert f"not {marker}" in cmd, cmd
    markers = " ".join(conf["tool"]["pytest"]["ini_options"]["markers"])
    assert "source_tree:" in markers and "slow:" in markers


@pytest.mark.slow
@pytest.mark.source_tree
def test_sdist_holds_everything_the_tests_need(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", f"from setuptools import build_meta; "
                           f"print(build_meta.build_sdist({str(tmp_path)!r}))"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sdist = tmp_path / proc.stdout.split()[-1]
    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    if shutil.which("git") and (ROOT / ".git").exists():
        tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    else:
        tracked = [str(p.relative_to(ROOT)) for d in ("tests", "csrc", "docs") for p in (ROOT / d).rglob("*")
                   if p.is_file() and "build" not in p.parts and "__pycache__" not in p.parts]
    needed = [f for f in tracked if f.startswith(("tests/", "csrc/", "docs/", "benchmarks/", "pymirror/"))]
    needed += ["README.md", "LICENSE", ".ci/run", "pyproject.toml", "setup.py"]
    missing = sorted(set(needed) - names)
    assert missing == [], f"the sdist lacks {missing}"
    assert not [n for n in names if n.endswith((".so", ".o", ".a")) or ".so." in n], "built files in the sdist"
