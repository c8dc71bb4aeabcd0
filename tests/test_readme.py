"""README.md stays true: its test command is the one CI runs, its CLI
reference is the CLI's own help, its Python example runs, and its C example
compiles against the C library and runs."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from pymirror.cli import cli_reference

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def block(lang: str, marker: str) -> str:
    m = re.search(rf"<!-- {marker} -->\s*```{lang}\n(.*?)```", README, re.S)
    assert m, f"README.md has no ```{lang} block after <!-- {marker} -->"
    return m.group(1)


def test_the_two_commands_are_at_the_top_and_ci_runs_the_test_command():
    cmds = block("sh", "two-commands").strip().splitlines()
    assert len(cmds) == 2
    assert "pymirror demo" in cmds[0] and "pytest" in cmds[1]
    assert cmds[1] in (ROOT / ".ci" / "run").read_text().splitlines()
    assert README.index("<!-- two-commands -->") < 1200


def test_cli_reference_is_generated_from_the_cli():
    m = re.search(r"<!-- cli-reference:begin -->\n(.*?)<!-- cli-reference:end -->", README, re.S)
    assert m, "README.md has no CLI reference markers"
    assert m.group(1).strip() == cli_reference().strip(), (
        "README's CLI reference is stale: regenerate with "
        "python -c 'from pymirror.cli import cli_reference; print(cli_reference())'")


def test_python_example_runs(tmp_path):
    code = block("python", "python-example")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_c_example_compiles_and_runs(tmp_path):
    code = block("c", "c-example")
    (tmp_path / "example.c").write_text(code)
    subprocess.run(["make", "-C", str(ROOT / "csrc"), "-s", "build/libpymirror.a"], check=True, timeout=600)
    exe = tmp_path / "example"
    subprocess.run(["cc", "-std=c11", "-I", str(ROOT / "csrc" / "include"), str(tmp_path / "example.c"),
                    str(ROOT / "csrc" / "build" / "libpymirror.a"), "-pthread", "-o", str(exe)],
                   check=True, timeout=120)
    proc = subprocess.run([str(exe)], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "restored" in proc.stdout


def test_service_example_runs_against_a_daemon(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("cli_util", Path(__file__).with_name("cli_util.py"))
    cli_util = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("cli_util", cli_util)
    spec.loader.exec_module(cli_util)
    cli_util.run("create", tmp_path / "s.img", "--size", "1M")
    cli_util.run("create", tmp_path / "m.img", "--size", "1M")
    meta = tmp_path / "pair.meta"
    cli_util.run("pair", meta, "--standard", tmp_path / "s.img", "--mirror", tmp_path / "m.img")
    cli_util.run("establish", meta, "--assume-equal")
    daemon = cli_util.Daemon(tmp_path, meta, nbd=False)
    try:
        env = dict(os.environ, PYMIRROR_CONTROL=str(daemon.control))
        proc = subprocess.run([sys.executable, "-c", block("python", "service-example")], cwd=cli_util.NEUTRAL,
                              env=env, capture_output=True, text=True, timeout=120)
    finally:
        assert daemon.stop() == 0, daemon.output()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "done restored\n"
