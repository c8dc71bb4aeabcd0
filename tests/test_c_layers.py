"""csrc's files form layers: each file names its floor in its opening
comment, and every call between files (from the objects' undefined pm_
symbols) goes downwards; a cycle or an upward call fails.  The checker is
csrc/tools/layers.py (also `make -C csrc layers`); here it runs on the real
objects, and on a made-up pair of objects that call each other, to show it
can fail."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CSRC = REPO / "csrc"
TOOL = CSRC / "tools" / "layers.py"


def need_tools() -> None:
    for tool in ("make", "nm", "cc"):
        if shutil.which(tool) is None:
            pytest.fail(f"`{tool}` is not installed: the layer check needs it")


def test_csrc_calls_go_downwards_only() -> None:
    need_tools()
    proc = subprocess.run(["make", "-C", str(CSRC), "-s", "layers"], capture_output=True, text=True,
                          timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "layers ok" in out
    # the files the layers were made for are there and in order
    for line in ("pair_open.c [8] -> pair.c [7]", "job.c [5] -> meta.c [4]"):
        assert line in out, out
    assert "meta.c [4] ->" in out and "pair.c" not in out.split("meta.c [4] ->")[1].splitlines()[0]


def test_the_check_fails_on_a_cycle_and_an_upward_call(tmp_path) -> None:
    need_tools()
    src = tmp_path / "csrc"
    (src / "tools").mkdir(parents=True)
    shutil.copy(TOOL, src / "tools" / "layers.py")
    (src / "low.c").write_text("/* low.c\n * Layer 1\n */\nint pm_high(void);\n"
                               "int pm_low(void) { return pm_high(); }\n")
    (src / "high.c").write_text("/* high.c\n * Layer 2\n */\nint pm_low(void);\n"
                                "int pm_high(void) { return pm_low() + 1; }\n")
    build = tmp_path / "build"
    build.mkdir()
    for name in ("low", "high"):
        subprocess.run(["cc", "-c", str(src / f"{name}.c"), "-o", str(build / f"{name}.o")], check=True)
    proc = subprocess.run([sys.executable, str(src / "tools" / "layers.py"), str(build)],
                          capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "low.c (layer 1) calls high.c (layer 2)" in out
    assert "cycle:" in out
    (src / "nolayer.c").write_text("/* no floor named here */\nint pm_x(void) { return 0; }\n")
    subprocess.run(["cc", "-c", str(src / "nolayer.c"), "-o", str(build / "nolayer.o")], check=True)
    proc = subprocess.run([sys.executable, str(src / "tools" / "layers.py"), str(build)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "nolayer.c: its opening comment states no layer" in proc.stdout
