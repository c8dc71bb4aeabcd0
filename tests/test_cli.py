"""The pymirror command as a user meets it: a whole scenario through
subprocesses, JSON output, non-TTY progress, and every kind of bad input
(one line, no traceback, exit code, nothing changed).

The scenario tests run twice: ``local`` (each command opens the pair) and
``daemon`` (a ``pymirror daemon`` holds the pair, commands go through its
control socket, host I/O through its NBD export); output and exit codes must
be the same."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import pymirror

_spec = importlib.util.spec_from_file_location("cli_util", Path(__file__).with_name("cli_util.py"))
cli_util = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("cli_util", cli_util)
_spec.loader.exec_module(cli_util)
EXE, NEUTRAL, run, one_line_error, tree_digest = (cli_util.EXE, cli_util.NEUTRAL, cli_util.run,
                                                   cli_util.one_line_error, cli_util.tree_digest)


@pytest.fixture(params=["local", "daemon"])
def mode(request, tmp_path):
    m = cli_util.Mode(request.param, tmp_path)
    yield m
    m.close()


def make_pair(d: Path, size="4M", track_size="64K", name="pair"):
    run("create", d / f"{name}-std.img", "--size", size)
    run("create", d / f"{name}-bcv.img", "--size", size)
    run("pair", d / f"{name}.meta", "--standard", d / f"{name}-std.img", "--mirror", d / f"{name}-bcv.img",
        "--track-size", track_size)
    return d / f"{name}.meta"


def test_whole_scenario(mode, tmp_path):
    meta = make_pair(tmp_path)
    with pymirror.Pair.open(meta) as p:
        p.write(0, b"A" * (4 << 20))
    mode.attach(meta)
    q = json.loads(mode.run("query", meta, "--json").stdout)
    assert q["state"] == "new" and q["tracks"] == 64 and q["track_size"] == 65536
    assert q["meta"] == os.path.realpath(meta)
    out = mode.run("establish", meta)
    assert "establish: done" in out.stderr                  # progress: plain lines when not a terminal
    assert out.stdout.startswith("establish complete: the pair is established (64 tracks, 4.0 MiB copied")
    assert json.loads(mode.run("query", meta, "--json").stdout)["state"] == "established"
    assert mode.run("split", meta).stdout == f"{meta}: split; both sides now record changed tracks\n"
    mode.write(meta, 100, b"damage")
    mode.write(meta, 3 << 20, b"more damage")
    q = json.loads(mode.run("query", meta, "--json").stdout)
    assert q["state"] == "split" and q["standard"]["changed"] == 2 and q["mirror"]["changed"] == 0
    v = mode.run("verify", meta, check=False)
    assert v.returncode == 1 and v.stdout == f"{meta}: 2 of 64 tracks differ: 0, 48\n"
    vj = mode.run("verify", meta, "--json", check=False)
    assert vj.returncode == 1 and vj.stdout.count("\n") == 1
    assert json.loads(vj.stdout)["differing"] == [0, 48]
    out = mode.run("restore", meta, "--incremental", "--protect")
    assert "restore: done, 2/2 tracks" in out.stderr
    assert out.stdout.startswith("restore complete: the pair is restored (2 tracks, 128.0 KiB copied")
    assert mode.run("verify", meta).stdout == f"{meta}: equal (64 tracks compared)\n"
    q = mode.run("query", meta, "--json").stdout
    assert q.count("\n") == 1 and json.loads(q)["state"] == "restored"
    text = mode.run("query", meta).stdout
    assert text.splitlines()[:3] == [f"pair      {meta}", "state     restored",
                                     "geometry  4.0 MiB, 64 tracks of 64.0 KiB"]


def test_same_answers_and_exit_codes_for_mistakes(mode, tmp_path):
    meta = make_pair(tmp_path)
    mode.attach(meta)
    # a command in the wrong state: 2, one line, the state named
    msg = one_line_error(mode.run("split", meta, check=False), 2)
    assert "new" in msg and "established" in msg
    one_line_error(mode.run("restore", meta, check=False), 2)
    one_line_error(mode.run("resume", meta, check=False), 2)
    one_line_error(mode.run("pause", meta, check=False), 2)
    one_line_error(mode.run("cancel", meta, check=False), 2)
    # no such pair (a name that is not a file, and no pair of that name)
    assert "nosuch" in one_line_error(mode.run("query", "nosuch", check=False), 2)
    assert "nosuch" in one_line_error(mode.run("wait", "nosuch", check=False), 2)
    # wait with no job: at once, 0
    assert mode.run("wait", meta).returncode == 0
    # assume-equal of two blank images, then verify: 0
    out = mode.run("establish", meta, "--assume-equal")
    assert out.stdout == "establish complete: the pair is established (nothing to copy)\n"
    assert mode.run("verify", meta).returncode == 0
    one_line_error(mode.run("establish", meta, "--assume-equal", check=False), 2)


def test_no_wait_then_wait(mode, tmp_path):
    meta = make_pair(tmp_path, size="16M")
    with pymirror.Pair.open(meta) as p:
        p.write(0, b"\x11" * (16 << 20))
    mode.attach(meta)
    out = mode.run("establish", meta, "--no-wait", "--rate", "8M")
    assert out.stdout.startswith(f"{meta}: establish started (")
    if mode.remote:
        # the daemon runs the copy: wait follows it to the end
        assert mode.run("wait", meta, "--timeout", "60").returncode == 0
    else:
        # nothing runs it here: wait says how to go on; resume finishes it
        assert "pymirror resume" in one_line_error(mode.run("wait", meta, check=False), 2)
        mode.run("resume", meta)
    assert json.loads(mode.run("query", meta, "--json").stdout)["state"] == "established"
    assert mode.run("verify", meta).returncode == 0


def test_sigint_and_sigterm_mid_restore(mode, tmp_path):
    meta = make_pair(tmp_path, size="64M")
    mode.attach(meta)
    mode.run("establish", meta)
    mode.run("split", meta)
    if mode.remote:
        for off in range(0, 64 << 20, 16 << 20):
            mode.write(meta, off, b"\x5a" * (16 << 20))
    else:
        with pymirror.Pair.open(meta) as p:
            for off in range(0, 64 << 20, 1 << 20):
                p.write(off, b"\x5a" * (1 << 20))
    proc = subprocess.Popen(EXE + ["--control", str(mode.control), "restore", str(meta), "--rate", "8M"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, cwd=NEUTRAL)
    cli_util.wait_until(lambda: cli_util.committed_state(meta) == "restoring", what="the restore to start")
    time.sleep(1.5)      # a 4 MiB batch at 8 MiB/s is paid for before it is copied: 0.5 s each
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    q = json.loads(mode.run("query", meta, "--json").stdout)
    assert q["state"] == "restoring"
    assert 0 < q["standard"]["pending"] < 1024
    if mode.remote:
        assert f"pymirror watch {meta}" in err          # the restore goes on in the daemon
        mode.run("set-rate", meta, "0")
        assert mode.run("wait", meta, "--timeout", "60").returncode == 0
    else:
        assert f"pymirror resume {meta}" in err
        # SIGINT on a resume: 130, still resumable
        proc = subprocess.Popen(EXE + ["resume", str(meta), "--rate", "8M"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL, cwd=NEUTRAL)
        proc.stderr.readline()       # "resuming the restore of ...": it runs
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        out = mode.run("resume", meta)
        assert "restore complete" in out.stdout
    assert mode.run("verify", meta).returncode == 0
    assert json.loads(mode.run("query", meta, "--json").stdout)["state"] == "restored"


def test_bad_inputs_one_line_no_traceback_nothing_changed(tmp_path):
    d = tmp_path
    meta = make_pair(d)
    run("create", d / "small.img", "--size", "1M")
    (d / "foreign.meta").write_bytes(b"this is not pymirror metadata" * 100)
    (d / "bad.toml").write_text("[pymirror]\ncopiers = 0\n")
    before = tree_digest(d)
    # missing file (a name that is no file: no daemon to ask either)
    assert "nope.meta" in one_line_error(run("split", d / "nope.meta", check=False), 2)
    # wrong state
    msg = one_line_error(run("split", meta, check=False), 2)
    assert "new" in msg and "established" in msg
    # bad size, bad option value
    assert "12Q" in one_line_error(run("create", d / "x.img", "--size", "12Q", check=False), 2)
    assert "at least 1" in one_line_error(run("create", d / "x.img", "--size", "0", check=False), 2)
    one_line_error(run("restore", meta, "--read-policy", "sometimes", check=False), 2)
    one_line_error(run("wait", meta, "--timeout", "-1", check=False), 2)
    one_line_error(run("daemon", "--listen", "nonsense", check=False), 2)
    # an existing volume is never overwritten
    one_line_error(run("create", d / "pair-std.img", "--size", "1M", check=False), 2)
    # volumes of different sizes
    one_line_error(run("pair", d / "p2.meta", "--standard", d / "pair-std.img", "--mirror", d / "small.img",
                       check=False), 2)
    # foreign / corrupt metadata
    one_line_error(run("query", d / "foreign.meta", check=False), 2)
    one_line_error(run("restore", d / "foreign.meta", check=False), 2)
    one_line_error(run("verify", d / "foreign.meta", check=False), 2)     # verify: 2 for an error
    # bad config
    assert "copiers" in one_line_error(run("--config", d / "bad.toml", "establish", meta, check=False), 2)
    # commands that need a daemon, with none
    for args in (["status"], ["watch"], ["attach", meta], ["detach", "pair"], ["group", "create", "g", "pair"]):
        assert "no daemon" in one_line_error(run("--control", d / "none.sock", *args, check=False), 2)
    assert tree_digest(d) == before


def test_create_records_no_track_size_the_pair_does(tmp_path):
    out = run("create", tmp_path / "s.img", "--size", "1M").stdout
    assert out == f"created {tmp_path / 's.img'}: 1.0 MiB sparse volume\n"
    msg = one_line_error(run("create", tmp_path / "t.img", "--size", "1M", "--track-size", "4K", check=False), 2)
    assert "pymirror pair" in msg and not (tmp_path / "t.img").exists()
    run("create", tmp_path / "m.img", "--size", "1M")
    out = run("pair", tmp_path / "p.meta", "--standard", tmp_path / "s.img", "--mirror", tmp_path / "m.img",
              "--track-size", "4K").stdout
    assert "256 tracks of 4.0 KiB" in out
    assert json.loads(run("query", tmp_path / "p.meta", "--json").stdout)["track_size"] == 4096


def test_verify_exit_codes(tmp_path):
    meta = make_pair(tmp_path)
    run("establish", meta, "--assume-equal")
    assert run("verify", meta).returncode == 0
    run("split", meta)
    with pymirror.Pair.open(meta) as p:
        p.mirror_write(0, b"x")
    assert run("verify", meta, check=False).returncode == 1
    with pymirror.Pair.open(meta) as p:
        p.mirror_write(0, b"y" * (4 << 20))
    run("restore", meta, "--incremental", "--no-wait", "--rate", "64K")   # leaves an unfinished restore
    msg = one_line_error(run("verify", meta, check=False), 2)
    assert "in progress" in msg


def test_query_into_a_closed_pipe_is_quiet(tmp_path):
    meta = make_pair(tmp_path)
    r, w = os.pipe()
    os.close(r)                      # the reader is gone before pymirror writes a byte
    proc = subprocess.Popen(EXE + ["query", str(meta)], stdout=w, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, cwd=NEUTRAL)
    os.close(w)
    _, err = proc.communicate(timeout=60)
    assert err == b""
    assert proc.returncode == 141    # as a tool killed by SIGPIPE
    # and a real `| head -1`
    shell = subprocess.run(f"{' '.join(EXE)} query {meta} | head -1", shell=True, capture_output=True,
                           text=True, cwd=NEUTRAL, timeout=60)
    assert shell.stdout == f"pair      {meta}\n" and shell.stderr == ""


def test_results_on_stdout_progress_on_stderr(tmp_path):
    meta = make_pair(tmp_path)
    out = run("establish", meta)
    assert out.stdout.startswith("establish complete:") and "establish complete" not in out.stderr
    assert "establish: done" in out.stderr and "establish: done" not in out.stdout


def test_debug_shows_traceback(tmp_path):
    proc = run("--debug", "split", make_pair(tmp_path), check=False)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_config_file_sets_defaults(tmp_path):
    cfg = tmp_path / "pm.toml"
    cfg.write_text('[pymirror]\ntrack_size = "16K"\ncopiers = 1\n')
    run("create", tmp_path / "v.img", "--size", "1M")
    run("create", tmp_path / "w.img", "--size", "1M")
    out = run("--config", cfg, "pair", tmp_path / "p.meta", "--standard", tmp_path / "v.img",
              "--mirror", tmp_path / "w.img").stdout
    assert "64 tracks of 16.0 KiB" in out
    env = dict(os.environ, PYMIRROR_CONFIG=str(cfg))
    out = run("pair", tmp_path / "q.meta", "--standard", tmp_path / "v.img", "--mirror", tmp_path / "w.img",
              env=env).stdout
    assert "16.0 KiB" in out


def test_demo_runs_and_checks(tmp_path):
    proc = run("demo", "--size", "16M", "--dir", tmp_path, timeout=300)
    assert "checks passed: OK" in proc.stdout
    assert "FAIL" not in proc.stdout


def test_cancel_an_establish(mode, tmp_path):
    meta = make_pair(tmp_path, size="16M")
    with pymirror.Pair.open(meta) as p:
        p.write(0, b"\x66" * (16 << 20))
    mode.attach(meta)
    mode.run("establish", meta, "--no-wait", "--rate", "1M")
    out = mode.run("cancel", meta).stdout
    assert out.startswith(f"{meta}: establish cancelled; the pair is split and its mirror is inconsistent (")
    q = json.loads(mode.run("query", meta, "--json").stdout)
    assert q["state"] == "split" and q["mirror_invalid"] > 0 and q["job"] is None
    assert "INCONSISTENT" in mode.run("query", meta).stdout
    msg = one_line_error(mode.run("restore", meta, check=False), 2)
    assert "establish" in msg
    mode.run("establish", meta, "--incremental")
    assert json.loads(mode.run("query", meta, "--json").stdout)["mirror_invalid"] == 0
    assert mode.run("verify", meta).returncode == 0


@pytest.mark.parametrize("where", ["local", "daemon"])
def test_a_copy_that_fails_pauses_exit_1_and_says_why(where, tmp_path):
    meta = make_pair(tmp_path, size="16M")
    with pymirror.Pair.open(meta) as p:
        p.write(0, b"\x77" * (16 << 20))
    limit = 4 << 20              # writes past 4 MiB of a file fail (EFBIG): the mirror, mid-copy
    daemon = None
    if where == "daemon":
        daemon = cli_util.Daemon(tmp_path, meta, nbd=False, file_size_limit=limit)
        pm = lambda *a, **kw: run("--control", daemon.control, *a, **kw)   # noqa: E731
    else:
        pm = lambda *a, **kw: run("--control", tmp_path / "none.sock", *a, **kw)   # noqa: E731
    try:
        proc = pm("establish", meta, check=False, file_size_limit=limit)
        msg = one_line_error(proc, 1)
        assert "stopped on track" in msg and f"pymirror resume {meta}" in msg
        q = json.loads(pm("query", meta, "--json").stdout)
        assert q["job"]["paused"] is True and q["job"]["error"] and q["job"]["error_track"] is not None
        w = pm("wait", meta, "--timeout", "5", check=False)
        assert "paused on an error" in one_line_error(w, 1)
        assert q["job"]["error"] in w.stderr
        assert "PAUSED on error at track" in pm("query", meta).stdout
        if daemon is not None:
            assert "PAUSED on error" in pm("status").stdout
    finally:
        if daemon is not None:
            assert daemon.stop() == 0, daemon.output()
    out = run("resume", meta)                      # the cause is gone: it finishes
    assert "establish complete: the pair is established" in out.stdout
    assert run("verify", meta).returncode == 0
