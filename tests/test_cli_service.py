"""The commands that talk to a running daemon: attach, detach, status, watch,
wait, pause, set-rate, cancel, groups, and pairs named by NAME or path."""
from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import pymirror

_spec = importlib.util.spec_from_file_location("cli_util", Path(__file__).with_name("cli_util.py"))
cli_util = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("cli_util", cli_util)
_spec.loader.exec_module(cli_util)
EXE, NEUTRAL, run, one_line_error = cli_util.EXE, cli_util.NEUTRAL, cli_util.run, cli_util.one_line_error


@pytest.fixture
def daemon(tmp_path):
    d = cli_util.Daemon(tmp_path, nbd=False)
    yield d
    code = d.stop()
    assert code == 0, d.output()


def pm(d, *args, **kw):
    return run("--control", d.control, *args, **kw)


def make_pair(folder: Path, name: str, size="16M", fill: bytes = b"") -> Path:
    run("create", folder / f"{name}-s.img", "--size", size)
    run("create", folder / f"{name}-m.img", "--size", size)
    meta = folder / f"{name}.meta"
    run("pair", meta, "--standard", folder / f"{name}-s.img", "--mirror", folder / f"{name}-m.img")
    if fill:
        with pymirror.Pair.open(meta) as p:
            n = p.size
            for off in range(0, n, 1 << 20):
                p.write(off, fill * ((1 << 20) // len(fill)))
    return meta


def query(d, pair):
    return json.loads(pm(d, "query", pair, "--json").stdout)


def test_attach_status_detach(daemon, tmp_path):
    meta = make_pair(tmp_path, "alpha", size="1M")
    assert pm(daemon, "attach", meta, "--name", "db").stdout == f"{meta}: attached as db\n"
    other = make_pair(tmp_path, "beta", size="1M")
    assert pm(daemon, "attach", other).stdout == f"{other}: attached as beta\n"
    # a pair is the same whether named by NAME or by meta path
    assert query(daemon, "db") == query(daemon, meta)
    st = pm(daemon, "status").stdout
    assert "db: new" in st and "beta: new" in st and "pair-attached" in st
    sj = pm(daemon, "status", "--json").stdout
    assert sj.count("\n") == 1
    assert sorted(p["name"] for p in json.loads(sj)["pairs"]) == ["beta", "db"]
    # mistakes: one line, exit 2
    one_line_error(pm(daemon, "attach", tmp_path / "nope.meta", check=False), 2)
    one_line_error(pm(daemon, "attach", meta, check=False), 2)          # held already
    one_line_error(pm(daemon, "detach", "nosuch", check=False), 2)
    assert pm(daemon, "detach", "db").stdout == "db: detached\n"
    one_line_error(pm(daemon, "query", "db", check=False), 2)
    # detached: the meta path acts locally again
    assert json.loads(pm(daemon, "query", meta, "--json").stdout)["state"] == "new"
    assert "db" not in pm(daemon, "status").stdout


def test_pause_wait_set_rate_resume(daemon, tmp_path):
    meta = make_pair(tmp_path, "p", fill=b"\x42")
    pm(daemon, "attach", meta)
    pm(daemon, "establish", "p", "--no-wait", "--rate", "1M")
    out = pm(daemon, "pause", "p").stdout
    assert out.startswith("p: the establish is paused at ") and "pymirror resume p" in out
    # a job paused on request keeps wait waiting: timeout, exit 3
    t0 = time.monotonic()
    w = pm(daemon, "wait", "p", "--timeout", "1", check=False)
    assert w.returncode == 3 and time.monotonic() - t0 >= 1.0, w
    assert "still copying" in one_line_error(w, 3)
    st = pm(daemon, "status").stdout
    assert "paused by request" in st
    assert query(daemon, "p")["job"]["paused"] is True
    pm(daemon, "set-rate", "p", "0")
    assert query(daemon, "p")["job"]["rate_limit"] == 0
    # ... until someone resumes it: then wait returns 0
    waiter = subprocess.Popen(EXE + ["--control", str(daemon.control), "wait", "p"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL, cwd=NEUTRAL)
    time.sleep(1.5)
    assert waiter.poll() is None
    out = pm(daemon, "resume", "p")
    assert out.stdout.startswith("establish complete: the pair is established")
    assert waiter.wait(timeout=60) == 0, waiter.communicate()
    assert pm(daemon, "wait", "p").returncode == 0          # no job: at once
    assert pm(daemon, "verify", "p").returncode == 0
    one_line_error(pm(daemon, "set-rate", "p", "lots", check=False), 2)


def test_interrupting_a_followed_job_leaves_it_running_in_the_daemon(daemon, tmp_path):
    meta = make_pair(tmp_path, "p", fill=b"\x17")
    pm(daemon, "attach", meta)
    proc = subprocess.Popen(EXE + ["--control", str(daemon.control), "establish", "p", "--rate", "4M"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, cwd=NEUTRAL)
    cli_util.wait_until(lambda: query(daemon, "p")["state"] == "syncing", what="the establish to start")
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "goes on in the daemon" in err and "Traceback" not in err
    q = query(daemon, "p")
    assert q["state"] == "syncing" and q["job"]["paused"] is False
    pm(daemon, "set-rate", "p", "0")
    assert pm(daemon, "wait", "p", "--timeout", "60").returncode == 0
    assert query(daemon, "p")["state"] == "established"


def test_watch_json_one_event_per_line_and_until_done(daemon, tmp_path):
    meta = make_pair(tmp_path, "p", fill=b"\x33")
    pm(daemon, "attach", meta)
    pm(daemon, "establish", "p")
    proc = subprocess.Popen(EXE + ["--control", str(daemon.control), "watch", "p", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, cwd=NEUTRAL)
    # let it subscribe: its connection shows in the daemon's count (beside status's own)
    cli_util.wait_until(lambda: json.loads(pm(daemon, "status", "--json").stdout)["daemon"]["control_clients"] >= 2,
                        what="watch to connect")
    time.sleep(0.5)
    pm(daemon, "split", "p")
    got: list = []
    reader = threading.Thread(target=lambda: got.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(30)
    assert got, "watch printed no event"
    ev = json.loads(got[0])
    assert ev["event"] == "state-changed" and ev["data"]["pair"] == "p"
    assert ev["data"]["to"] == "split" and "timestamp" in ev
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    assert proc.returncode == 130
    # --until-done: follows the restore's events, exits 0 when it is done
    pm(daemon, "restore", "p", "--no-wait", "--rate", "8M")
    w = pm(daemon, "watch", "p", "--until-done", timeout=120)
    assert "restore done" in w.stdout.splitlines()[-1]
    assert query(daemon, "p")["state"] == "restored"
    # no job: at once
    assert "no copy in progress" in pm(daemon, "watch", "p", "--until-done").stdout
    one_line_error(pm(daemon, "watch", "--until-done", check=False), 2)


def test_cancel_an_establish_and_refuse_for_a_restore(daemon, tmp_path):
    meta = make_pair(tmp_path, "p", fill=b"\x21")
    pm(daemon, "attach", meta)
    pm(daemon, "establish", "p", "--no-wait", "--rate", "1M")
    out = pm(daemon, "cancel", "p").stdout
    assert "establish cancelled; the pair is split" in out
    q = query(daemon, "p")
    assert q["state"] == "split" and q["mirror_invalid"] > 0
    assert "INCONSISTENT" in pm(daemon, "query", "p").stdout
    assert "establish again" in one_line_error(pm(daemon, "restore", "p", check=False), 2)
    pm(daemon, "establish", "p", "--incremental")
    pm(daemon, "split", "p")
    pm(daemon, "restore", "p", "--no-wait", "--rate", "1M")
    assert "pause" in one_line_error(pm(daemon, "cancel", "p", check=False), 2)


def test_group_create_split_query(daemon, tmp_path):
    metas = [make_pair(tmp_path, f"g{i}", size="1M") for i in range(3)]
    for m in metas:
        pm(daemon, "attach", m)
        pm(daemon, "establish", m, "--assume-equal")
    assert pm(daemon, "group", "create", "gg", "g0", "g1", metas[2]).stdout == "group gg: g0 g1 g2\n"
    one_line_error(pm(daemon, "group", "create", "g0", "g1", check=False), 2)   # one namespace
    assert pm(daemon, "split", "gg").stdout == "gg: split; both sides now record changed tracks\n"
    q = json.loads(pm(daemon, "query", "gg", "--json").stdout)
    assert q["group"] == "gg" and {n: p["state"] for n, p in q["pairs"].items()} == \
        {"g0": "split", "g1": "split", "g2": "split"}
    out = pm(daemon, "restore", "gg", "--incremental")
    assert out.stdout.startswith("restore complete: group of g0 restored, g1 restored, g2 restored")
    assert pm(daemon, "verify", "gg").returncode == 0
    out = pm(daemon, "establish", "gg", "--incremental")
    assert out.stdout.startswith("establish complete: group of g0 established, g1 established, g2 established")
    assert pm(daemon, "wait", "gg").returncode == 0
    assert "group gg: g0 g1 g2" in pm(daemon, "status").stdout
    assert pm(daemon, "group", "delete", "gg").stdout == "group gg: deleted\n"


def test_daemon_help_and_a_name_with_no_daemon(tmp_path):
    assert "--state-dir" in run("daemon", "--help").stdout
    msg = one_line_error(run("--control", tmp_path / "none.sock", "split", "db", check=False), 2)
    assert "no daemon" in msg and "db" in msg


def test_control_from_the_environment(daemon, tmp_path):
    import os

    meta = make_pair(tmp_path, "envpair", size="1M")
    pm(daemon, "attach", meta)
    env = dict(os.environ, PYMIRROR_CONTROL=str(daemon.control))
    assert json.loads(run("query", "envpair", "--json", env=env).stdout)["state"] == "new"


def test_the_same_output_here_and_through_the_daemon(daemon, tmp_path):
    meta = make_pair(tmp_path, "same", size="2M", fill=b"\x44")
    run("establish", meta)
    run("split", meta)
    with pymirror.Pair.open(meta) as p:
        p.write(70000, b"changed")
        p.mirror_write(1 << 20, b"changed too")
    local = {args: run(*args, meta, check=False) for args in
             [("query",), ("query", "--json"), ("verify",), ("verify", "--json")]}
    pm(daemon, "attach", meta)
    for args, here in local.items():
        there = pm(daemon, *args, meta, check=False)
        assert (there.returncode, there.stdout) == (here.returncode, here.stdout), args
    assert local[("verify",)].returncode == 1


def test_status_says_why_a_pair_is_not_served(tmp_path):
    meta = make_pair(tmp_path, "frail", size="1M")
    d = cli_util.Daemon(tmp_path, meta, nbd=False)
    assert d.stop() == 0, d.output()
    meta.write_bytes(b"garbage" * 1000)          # the daemon will remember a pair it cannot open
    d = cli_util.Daemon(tmp_path, nbd=False)
    try:
        st = pm(d, "status").stdout
        assert "frail: failed to open:" in st, st
        one_line_error(pm(d, "query", "frail", check=False), 2)
    finally:
        assert d.stop() == 0, d.output()


def test_daemon_listens_on_loopback_tcp_when_asked(tmp_path):
    import socket

    cli_util.need_libnbd()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    meta = make_pair(tmp_path, "tcp", size="1M")
    d = cli_util.Daemon(tmp_path, meta, nbd=False, listen=f"127.0.0.1:{port}")
    try:
        code = ("import nbd\nh = nbd.NBD()\n"
                f"h.connect_uri('nbd://127.0.0.1:{port}/tcp')\n"
                "h.pwrite(b'over tcp', 0)\nprint(h.get_size())\nh.shutdown()\n")
        proc = subprocess.run([cli_util.SYSTEM_PYTHON, "-c", code], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and proc.stdout.strip() == str(1 << 20), proc.stderr
        assert f"127.0.0.1:{port}" in pm(d, "status").stdout
    finally:
        assert d.stop() == 0, d.output()
    with pymirror.Pair.open(meta) as p:
        assert p.read(0, 8) == b"over tcp"
