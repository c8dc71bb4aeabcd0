"""The ``pymirror`` command's start and end (pymirror/command.py, issue 12):
a plain ``restore META`` / ``establish META`` starts its copy before the
command line (click, the CLI modules) is loaded, and says exactly what the
full command line says, error or not; the process leaves without the
interpreter's teardown only when nothing is lost by it."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import pymirror
from pymirror import targets
from pymirror.progress import follow_snapshots

NEUTRAL = "/"
FULL = [sys.executable, "-c", "import sys; from pymirror.cli import main; sys.argv[0] = 'pymirror'; main()"]
ENTRY = [sys.executable, "-m", "pymirror"]


def make(folder: Path, state: str = "split", size: int = 1 << 20) -> Path:
    std, mir = folder / "std.img", folder / "mir.img"
    std.write_bytes(os.urandom(size))
    mir.write_bytes(os.urandom(size))
    meta = folder / "p.meta"
    with pymirror.Pair.create(meta, std, mir, track_size=64 << 10) as p:
        if state != "new":
            p.establish().wait()
        if state == "split":
            p.split()
    return meta


def env_for(folder: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYMIRROR_")}
    env.update(PYMIRROR_CONTROL=str(folder / "no-daemon.sock"), XDG_CONFIG_HOME=str(folder / "cfg"), **extra)
    return env


def run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, cwd=NEUTRAL, env=env, timeout=120)


def same_text(text: str) -> str:
    """Output with the measured figures (times, rates) blanked."""
    return re.sub(r"[0-9]+\.[0-9]+", "N", text)


# Standard modules the early start must not need (docs/copier.md, "The
# command's start and end"): dropped from sys.modules before pymirror loads
# (this environment's site may have loaded them), so the spy sees whether
# the pair's modules load them again before the job starts.
NOT_BEFORE_THE_COPY = ("typing", "dataclasses", "inspect", "ast", "dis", "pathlib", "urllib.parse",
                       "ipaddress", "tempfile")

SPY = """
import json, sys
for name in %r:
    sys.modules.pop(name, None)
from pymirror import targets
real = {kind: getattr(targets.LocalTarget, kind) for kind in ("restore", "establish")}
def spy(kind):
    def call(self, **kw):
        if self._early is None:      # the job starts now: what has been loaded?
            with open(sys.argv[1], "w") as f:
                json.dump(sorted(sys.modules), f)
        return real[kind](self, **kw)
    return call
for kind in real:
    setattr(targets.LocalTarget, kind, spy(kind))
from pymirror.command import main
main(sys.argv[2:])
""" % (NOT_BEFORE_THE_COPY,)


@pytest.mark.parametrize("kind", ["restore", "establish"])
def test_the_copy_starts_before_the_command_line_loads(tmp_path: Path, kind: str) -> None:
    meta = make(tmp_path)
    loaded = tmp_path / "modules.json"
    proc = run([sys.executable, "-c", SPY, str(loaded), kind, str(meta)], env_for(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{kind} complete: the pair is ")
    mods = set(json.loads(loaded.read_text()))
    assert "pymirror.pair" in mods
    heavy = {m for m in mods if m in ("click", "numpy", "tqdm", "pymirror.cli", "pymirror.cli_pair", "pymirror.tables")
             or m.startswith(("pymirror.nbd", "pymirror.service.client", "pymirror.service.daemon"))}
    assert not heavy, heavy
    assert not mods & set(NOT_BEFORE_THE_COPY), mods & set(NOT_BEFORE_THE_COPY)
    with pymirror.Pair.open(meta) as p:
        assert p.state == ("restored" if kind == "restore" else "established")
        assert not p.verify()


def test_an_option_takes_the_whole_command_line(tmp_path: Path) -> None:
    meta = make(tmp_path)
    loaded = tmp_path / "modules.json"
    proc = run([sys.executable, "-c", SPY, str(loaded), "restore", str(meta), "--copiers", "1"], env_for(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "click" in json.loads(loaded.read_text())


CASES = {
    "restore-ok": ("split", ["restore"], {}),
    "establish-ok": ("split", ["establish"], {}),
    "restore-refused": ("new", ["restore"], {}),          # a new pair: restore is refused
    "establish-refused": ("established", ["establish"], {}),
    "no-such-file": ("split", ["restore", "missing.meta"], {}),
    "bad-config": ("split", ["restore"], {"PYMIRROR_CONFIG": "bad.toml"}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_early_start_says_what_the_command_line_says(tmp_path: Path, case: str) -> None:
    state, args, extra = CASES[case]
    results = []
    for argv in (FULL, ENTRY):
        folder = tmp_path / ("full" if argv is FULL else "entry")
        folder.mkdir()
        meta = make(folder, state)
        (folder / "bad.toml").write_text("[pymirror]\ncopiers = 'many'\n")
        extra_env = {k: str(folder / v) for k, v in extra.items()}
        cmd = argv + [args[0], str(folder / args[1]) if len(args) > 1 else str(meta)]
        proc = run(cmd, env_for(folder, **extra_env))
        with pymirror.Pair.open(meta) as p:
            after = p.state
        results.append((proc.returncode, same_text(proc.stdout.replace(str(folder), "D")),
                        same_text(proc.stderr.replace(str(folder), "D")), after))
    assert results[0] == results[1]
    assert "Traceback" not in results[1][2]


def test_a_refused_job_is_asked_once_more_by_the_command(tmp_path: Path) -> None:
    meta = make(tmp_path, "new")
    env = env_for(tmp_path)
    proc = run(ENTRY + ["restore", str(meta)], env)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: restore ") and "the pair is new" in lines[0]


def test_a_job_started_early_is_not_started_twice(tmp_path: Path) -> None:
    meta = make(tmp_path)
    from pymirror.config import Settings
    from pymirror.command import EARLY_JOBS

    t = targets.LocalTarget(str(meta), str(meta), Settings())
    try:
        t.restore(**EARLY_JOBS["restore"])
        targets.set_started(str(meta), "restore", t)
        assert targets.take_started(str(meta)) is t and targets.take_started(str(meta)) is None
        with pytest.raises(RuntimeError, match="early start"):
            t.restore(**dict(EARLY_JOBS["restore"], copiers=1))   # not what was started
        t._early = ("restore", dict(EARLY_JOBS["restore"]))
        t.restore(**EARLY_JOBS["restore"])                         # the command's call: nothing to do
        assert t._early is None
        assert t.wait(None) == targets.DONE
    finally:
        t.close()


@pytest.mark.parametrize("how", ["plain", "thread", "atexit"])
def test_leave_exits_with_the_code_after_atexit(tmp_path: Path, how: str) -> None:
    code = f"""
import atexit, sys, threading
from pymirror.command import leave
atexit.register(lambda: print("atexit ran", flush=True))
print("out", end="")
if {how!r} == "thread":
    ev = threading.Event()
    th = threading.Thread(target=lambda: (ev.wait(2), print("thread done", flush=True)))
    th.start()
    ev.set()
leave(3)
"""
    proc = run([sys.executable, "-c", code], env_for(tmp_path))
    assert proc.returncode == 3
    assert proc.stdout.startswith("out") and "atexit ran" in proc.stdout
    if how == "thread":   # a live thread: the normal exit, which waits for it
        assert "thread done" in proc.stdout


def test_following_a_job_ends_when_the_job_does() -> None:
    """The end of a followed job is told by the wait itself (a condition
    variable in the core), not by a later poll: the follow returns on the
    first "done", with no sleep and no further wait."""
    answers = iter(["timeout", "done"])
    calls: list[float] = []

    def wait(timeout: float) -> str:
        calls.append(timeout)
        return next(answers)

    import io
    import time as _time

    real_sleep = _time.sleep
    _time.sleep = lambda s: (_ for _ in ()).throw(AssertionError("slept"))  # type: ignore[assignment]
    try:
        status, last = follow_snapshots(wait, lambda: {"tracks_total": 1, "tracks_done": 1, "elapsed": 0.1},
                                        "restore", io.StringIO(), tty=False)
    finally:
        _time.sleep = real_sleep
    assert status == "done" and len(calls) == 2


def test_the_core_wait_returns_at_the_jobs_end(tmp_path: Path) -> None:
    """pm_pair_wait with a long timeout returns as soon as the job ends
    (woken by the end), well before the timeout: checked by the job being
    done when it returns, not by a clock."""
    meta = make(tmp_path)
    with pymirror.Pair.open(meta) as p:
        p.restore()
        assert p._job_wait(600_000) is True
        assert not p.progress.running and p.state == "restored"
