"""Helpers shared by the command-line tests (imported by path: no
tests/__init__.py): run ``pymirror`` as a user does, start a daemon, and do
host I/O on a pair either directly or through the daemon's NBD export."""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import pymirror

EXE = [sys.executable, "-m", "pymirror"]
# Run from a neutral folder, so "-m pymirror" finds the installed package,
# not the source tree (which has no compiled core).
NEUTRAL = tempfile.gettempdir()
SYSTEM_PYTHON = "/usr/bin/python3"      # has Debian's python3-libnbd


def limit_file_size(limit: Optional[int]) -> Any:
    """A preexec_fn making writes past ``limit`` bytes of any file fail with
    EFBIG (a store that fails mid-copy), or None."""
    if limit is None:
        return None

    def preexec() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def run(*args: Any, check: bool = True, cwd: Any = None, timeout: float = 120,
        env: Optional[dict[str, str]] = None, file_size_limit: Optional[int] = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(EXE + [str(a) for a in args], capture_output=True, text=True,
                          cwd=cwd or NEUTRAL, timeout=timeout, stdin=subprocess.DEVNULL, env=env,
                          preexec_fn=limit_file_size(file_size_limit))
    if check and proc.returncode != 0:
        raise AssertionError(f"pymirror {args} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def one_line_error(proc: subprocess.CompletedProcess, code: Optional[int] = None) -> str:
    assert proc.returncode != 0 if code is None else proc.returncode == code, proc
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("Error: ")
    return lines[0]


def tree_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def need_libnbd() -> None:
    import pytest

    ok = os.path.exists(SYSTEM_PYTHON) and subprocess.run(
        [SYSTEM_PYTHON, "-c", "import nbd"], capture_output=True).returncode == 0
    if not ok:
        msg = "python3-libnbd is not installed (Debian package python3-libnbd)"
        if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
            pytest.fail(msg + ": CI must install it (.ci/run)")
        pytest.skip(msg)


class Daemon:
    """``pymirror daemon`` in a subprocess, on sockets in ``folder``."""

    def __init__(self, folder: Path, *metas: Any, nbd: bool = True,
                 file_size_limit: Optional[int] = None, listen: Optional[str] = None) -> None:
        self.folder = Path(folder)
        self.control = self.folder / "c.sock"
        self.state = self.folder / "state"
        self.nbd = self.folder / "nbd.sock" if nbd else None
        self.log = open(self.folder / "daemon.log", "w+")
        args = ["--control", str(self.control), "daemon", "--state-dir", str(self.state)]
        if self.nbd is not None:
            args += ["--socket", str(self.nbd)]
        if listen is not None:
            args += ["--listen", listen]
        args += [str(m) for m in metas]
        self.proc = subprocess.Popen(EXE + args, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=NEUTRAL,
                                     preexec_fn=limit_file_size(file_size_limit))
        deadline = time.monotonic() + 30
        while not self.control.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"the daemon did not start:\n{self.output()}")
            time.sleep(0.05)
        # the control socket comes first; a request is answered once the
        # daemon's pairs are open and exported
        with pymirror.connect(str(self.control)) as c:
            c.status()

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


class Mode:
    """How a test reaches its pairs: ``local`` (each command opens the pair)
    or ``daemon`` (a daemon holds every pair; commands go through it, host
    I/O through its NBD export).  Every command gets ``--control``, so local
    commands ask (and do not find) a daemon, as a user's would."""

    def __init__(self, name: str, folder: Path) -> None:
        self.name = name
        self.folder = Path(folder)
        self.daemon: Optional[Daemon] = None
        if name == "daemon":
            need_libnbd()
            self.daemon = Daemon(self.folder)
        self.control = self.folder / "c.sock"

    @property
    def remote(self) -> bool:
        return self.daemon is not None

    def run(self, *args: Any, **kw: Any) -> subprocess.CompletedProcess:
        return run("--control", self.control, *args, **kw)

    def attach(self, meta: Any) -> None:
        """Hand the pair to the daemon (nothing to do locally)."""
        if self.daemon is not None:
            self.run("attach", meta)

    def close(self) -> None:
        if self.daemon is not None:
            code = self.daemon.stop()
            assert code == 0, f"the daemon exited {code}:\n{self.daemon.output()}"

    # -- host I/O ---------------------------------------------------------------
    def write(self, meta: Any, offset: int, data: bytes, mirror: bool = False) -> None:
        """A host write on the pair's standard (or its mirror)."""
        if self.daemon is None:
            with pymirror.Pair.open(meta) as p:
                (p.mirror_write if mirror else p.write)(offset, data)
            return
        export = Path(meta).stem + ("/mirror" if mirror else "")
        nbd_write(self.daemon.nbd, export, offset, data)


def nbd_write(socket_path: Any, export: str, offset: int, data: bytes) -> None:
    """Write through a real NBD client (libnbd), flushed."""
    code = ("import nbd, sys\n"
            "h = nbd.NBD()\n"
            f"h.connect_uri({nbd_uri(socket_path, export)!r})\n"
            "data = sys.stdin.buffer.read()\n"
            f"h.pwrite(data, {offset})\n"
            "h.flush()\n"
            "h.shutdown()\n")
    proc = subprocess.run([SYSTEM_PYTHON, "-c", code], input=data, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()


def nbd_uri(socket_path: Any, export: str) -> str:
    from urllib.parse import quote

    return f"nbd+unix:///{quote(export, safe='')}?socket={socket_path}"


def wait_until(cond: Any, timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def committed_state(meta: Any) -> str:
    """The state in the pair's metadata, read without opening the pair (so
    while another process holds it)."""
    from pymirror.pair import peek

    return str(peek(meta)["state"])


def which(tool: str) -> Optional[str]:
    return shutil.which(tool)
