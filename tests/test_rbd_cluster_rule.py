"""The rule for the RBD tests when the one-node Ceph cluster cannot start:
skipped with the reason on a developer's machine, failed under CI
(``CI=true``).  Runs pytest on a one-test file with the Ceph tools hidden."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SERVICES = Path(__file__).resolve().with_name("services") / "ceph.py"

CONFTEST = f"""
import importlib.util
spec = importlib.util.spec_from_file_location("ceph_rule", {str(SERVICES)!r})
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
ceph_cluster = mod.ceph_cluster
"""

TEST = """
def test_uses_the_cluster(ceph_cluster):
    assert ceph_cluster.alive()
"""


def run(tmp_path: Path, ci: bool) -> subprocess.CompletedProcess[str]:
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_one.py").write_text(TEST)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PATH"] = str(tmp_path)          # no ceph-mon, ceph-osd, ceph, rbd
    if ci:
        env["CI"] = "true"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_without_ceph_the_rbd_tests_skip_with_the_reason(tmp_path):
    p = run(tmp_path, ci=False)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "1 skipped" in p.stdout
    assert "install the Debian packages ceph-mon ceph-osd ceph-common" in p.stdout


def test_without_ceph_under_ci_the_rbd_tests_fail(tmp_path):
    p = run(tmp_path, ci=True)
    assert p.returncode != 0
    assert "skipped" not in p.stdout
    assert "CI does not allow skipping the RBD tests" in p.stdout
    assert "ceph-mon" in p.stdout
