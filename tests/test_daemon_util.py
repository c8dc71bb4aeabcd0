"""Helpers for the daemon tests (no tests here; the test_daemon_* files load
this module by path): a real daemon in a subprocess with its own control
socket and state directory, and small file-backed pairs."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import pymirror
from pymirror.volume import Volume

MiB = 1 << 20


def make_pair(d: Path, name: str, size: int = 2 * MiB, track_size: int = 64 << 10,
              fill: Optional[bytes] = None) -> Path:
    """A new pair NAME.meta with NAME.std / NAME.bcv in ``d``; ``fill`` (one
    byte repeated) is written to the standard first."""
    std, bcv, meta = d / f"{name}.std", d / f"{name}.bcv", d / f"{name}.meta"
    for path in (std, bcv):
        Volume.create(str(path), size, track_size).close()
    with pymirror.Pair.create(str(meta), str(std), str(bcv), track_size=track_size) as p:
        if fill is not None:
            p.write(0, fill * size)
    return meta


class DaemonProc:
    """``python -m pymirror.service`` with paths under ``d``."""

    def __init__(self, d: Path, nbd: bool = True) -> None:
        self.d = d
        self.control = str(d / "run" / "control.sock")
        self.state_dir = str(d / "state")
        self.nbd = str(d / "nbd.sock") if nbd else None
        self.log = d / "daemon.log"
        self.proc: Optional[subprocess.Popen[bytes]] = None

    def start(self, *metas: Any, extra: tuple[str, ...] = (), wait: bool = True,
              file_size_limit: Optional[int] = None, umask: Optional[int] = None) -> "DaemonProc":
        cmd = [sys.executable, "-m", "pymirror.service", "--control", self.control,
               "--state-dir", self.state_dir, *extra]
        if self.nbd:
            cmd += ["--socket", self.nbd]
        cmd += [str(m) for m in metas]
        self._logfh = open(self.log, "ab")
        self._log_from = self._logfh.tell()
        def limit() -> None:      # writes past this size fail with EFBIG (Python ignores SIGXFSZ)
            import resource
            if file_size_limit is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))
            if umask is not None:
                os.umask(umask)

        self.proc = subprocess.Popen(cmd, stdout=self._logfh, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd="/",
                                     preexec_fn=limit if (file_size_limit, umask) != (None, None) else None)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log_text()}")
            if "ready:" in self.log_text()[self._log_from:]:
                return
            time.sleep(0.05)
        raise AssertionError(f"daemon not ready:\n{self.log_text()}")

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def client(self, **kw: Any) -> Any:
        return pymirror.connect(self.control, **kw)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        rc = self.proc.wait(timeout)
        self._logfh.close()
        return rc

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


def raw_control(path: str, timeout: float = 10.0) -> tuple[socket.socket, Any]:
    """A bare control connection: (socket, file for reading lines), greeting read."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    f = s.makefile("rb")
    hello = json.loads(f.readline())
    assert "pymirror" in hello
    return s, f


def rpc(s: socket.socket, f: Any, line: bytes) -> dict[str, Any]:
    s.sendall(line if line.endswith(b"\n") else line + b"\n")
    while True:
        msg = json.loads(f.readline())
        if "event" not in msg:
            return msg


def wait_until(pred: Any, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def nbd_util() -> Any:
    import importlib.util
    spec = importlib.util.spec_from_file_location("nbd_util", Path(__file__).with_name("nbd_util.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("nbd_util", mod)
    spec.loader.exec_module(mod)
    return sys.modules["nbd_util"]


class NbdError(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(f"NBD error {code}")
        self.code = code


class Nbd:
    """A synchronous NBD client of one export (the raw protocol, one request at a time)."""

    def __init__(self, socket_path: str, export: str) -> None:
        nu = nbd_util()
        self.P = nu.P
        self.c, self.size, self.flags = nu.connect(socket_path, export)
        self.cookie = 0

    def _do(self, cmd: int, offset: int, length: int, data: bytes = b"", flags: int = 0) -> bytes:
        self.cookie += 1
        self.c.request(cmd, offset, length, data, flags=flags, cookie=self.cookie)
        err, cookie, payload = self.c.reply(length if cmd == self.P.CMD_READ else 0)
        assert cookie == self.cookie
        if err:
            raise NbdError(err)
        return payload

    def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        self._do(self.P.CMD_WRITE, offset, len(data), data, self.P.CMD_FLAG_FUA if fua else 0)

    def read(self, offset: int, length: int) -> bytes:
        return self._do(self.P.CMD_READ, offset, length)

    def flush(self) -> None:
        self._do(self.P.CMD_FLUSH, 0, 0)

    def close(self) -> None:
        try:
            self.c.request(self.P.CMD_DISC)
        except OSError:
            pass
        self.c.close()
