"""The pymirror command as a user meets it: a whole scenario through
subprocesses, JSON output, non-TTY progress, Ctrl-C then resume, and every
kind of bad input (one line, no traceback, exit code, nothing changed)."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import pymirror

EXE = [sys.executable, "-m", "pymirror"]
# Run from a neutral folder, so "-m pymirror" finds the installed package,
# not the source tree (which has no compiled core).
NEUTRAL = tempfile.gettempdir()


def run(*args, check=True, cwd=None, timeout=120):
    proc = subprocess.run(EXE + [str(a) for a in args], capture_output=True, text=True,
                          cwd=cwd or NEUTRAL, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"pymirror {args} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def one_line_error(proc, code=None):
    assert proc.returncode != 0 if code is None else proc.returncode == code, proc
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("Error: ")
    return lines[0]


def tree_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def pair_files(tmp_path):
    run("create", tmp_path / "std.img", "--size", "4M", "--track-size", "64K")
    run("create", tmp_path / "bcv.img", "--size", "4M")
    run("pair", tmp_path / "pair.meta", "--standard", tmp_path / "std.img", "--mirror", tmp_path / "bcv.img")
    return tmp_path


def test_whole_scenario(pair_files):
    d = pair_files
    meta = d / "pair.meta"
    q = json.loads(run("query", meta, "--json").stdout)
    assert q["state"] == "new" and q["tracks"] == 64 and q["track_size"] == 65536
    with pymirror.Pair.open(meta) as p:
        p.write(0, b"A" * (4 << 20))
    out = run("establish", meta)
    assert "establish: done" in out.stderr                  # plain lines when not a terminal
    assert json.loads(run("query", meta, "--json").stdout)["state"] == "established"
    run("split", meta)
    with pymirror.Pair.open(meta) as p:
        p.write(100, b"damage")
        p.write(3 << 20, b"more damage")
    q = json.loads(run("query", meta, "--json").stdout)
    assert q["state"] == "split" and q["standard"]["changed"] == 2 and q["mirror"]["changed"] == 0
    v = run("verify", meta, check=False)
    assert v.returncode == 1 and "2 of 64 tracks differ: 0, 48" in v.stdout
    assert json.loads(run("verify", meta, "--json", check=False).stdout)["differing"] == [0, 48]
    out = run("restore", meta, "--incremental", "--protect")
    assert "restore: done, 2/2 tracks" in out.stderr
    assert run("verify", meta).returncode == 0
    q = json.loads(run("query", meta, "--json").stdout)
    assert q["state"] == "restored"


def test_sigint_mid_restore_then_resume(tmp_path):
    run("create", tmp_path / "s.img", "--size", "64M")
    run("create", tmp_path / "m.img", "--size", "64M")
    meta = tmp_path / "p.meta"
    run("pair", meta, "--standard", tmp_path / "s.img", "--mirror", tmp_path / "m.img")
    run("establish", meta)
    run("split", meta)
    with pymirror.Pair.open(meta) as p:
        for off in range(0, 64 << 20, 1 << 20):
            p.write(off, b"\x5a" * (1 << 20))
    proc = subprocess.Popen(EXE + ["restore", str(meta), "--rate", "8M"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL, cwd=NEUTRAL)
    time.sleep(2.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert f"pymirror resume {meta}" in err
    q = json.loads(run("query", meta, "--json").stdout)
    assert q["state"] == "restoring"
    assert 0 < q["standard"]["pending"] < 1024
    out = run("resume", meta)
    assert "restore complete" in out.stderr
    assert run("verify", meta).returncode == 0
    assert json.loads(run("query", meta, "--json").stdout)["state"] == "restored"


def test_bad_inputs_one_line_no_traceback_nothing_changed(pair_files):
    d = pair_files
    meta = d / "pair.meta"
    run("create", d / "small.img", "--size", "1M")
    (d / "foreign.meta").write_bytes(b"this is not pymirror metadata" * 100)
    (d / "bad.toml").write_text("[pymirror]\ncopiers = 0\n")
    before = tree_digest(d)
    # missing file
    assert "nope.meta" in one_line_error(run("split", d / "nope.meta", check=False), 1)
    # wrong state
    msg = one_line_error(run("split", meta, check=False), 1)
    assert "new" in msg and "established" in msg
    # bad size, bad option value
    assert "12Q" in one_line_error(run("create", d / "x.img", "--size", "12Q", check=False), 2)
    one_line_error(run("restore", meta, "--read-policy", "sometimes", check=False), 2)
    # an existing volume is never overwritten
    one_line_error(run("create", d / "std.img", "--size", "1M", check=False), 1)
    # volumes of different sizes
    one_line_error(run("pair", d / "p2.meta", "--standard", d / "std.img", "--mirror", d / "small.img",
                       check=False), 1)
    # foreign / corrupt metadata
    one_line_error(run("query", d / "foreign.meta", check=False), 1)
    one_line_error(run("restore", d / "foreign.meta", check=False), 1)
    # bad config
    assert "copiers" in one_line_error(run("--config", d / "bad.toml", "establish", meta, check=False), 1)
    assert tree_digest(d) == before


def test_debug_shows_traceback(pair_files):
    proc = run("--debug", "split", pair_files / "pair.meta", check=False)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_config_file_sets_defaults(tmp_path, monkeypatch):
    cfg = tmp_path / "pm.toml"
    cfg.write_text('[pymirror]\ntrack_size = "16K"\ncopiers = 1\n')
    run("--config", cfg, "create", tmp_path / "v.img", "--size", "1M")
    out = run("--config", cfg, "create", tmp_path / "w.img", "--size", "1M").stdout
    assert "64 tracks of 16.0 KiB" in out
    env = dict(os.environ, PYMIRROR_CONFIG=str(cfg))
    proc = subprocess.run(EXE + ["create", str(tmp_path / "z.img"), "--size", "1M"], env=env,
                          capture_output=True, text=True, timeout=60, cwd=NEUTRAL)
    assert "16.0 KiB" in proc.stdout


def test_demo_runs_and_checks(tmp_path):
    proc = run("demo", "--size", "16M", "--dir", tmp_path, timeout=300)
    assert "checks passed: OK" in proc.stdout
    assert "FAIL" not in proc.stdout
