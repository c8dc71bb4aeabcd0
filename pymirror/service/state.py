"""The daemon's memory across restarts: ``STATE_DIR/daemon.json``.

It holds the pairs (name, meta path, whether a job was paused by request,
whether the pair is exported over NBD) and the groups.  It is written
atomically (a temporary file in the same directory, fsync, rename, fsync of
the directory), so a crash leaves the old or the new version, never a torn
one.  A ``daemon.lock`` file beside it (flock) keeps two daemons from
sharing one state directory.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import tempfile
from typing import Any

from .paths import make_private_dir
from .protocol import DaemonError

FORMAT = 1
STATE_NAME = "daemon.json"
LOCK_NAME = "daemon.lock"


def empty() -> dict[str, Any]:
    return {"format": FORMAT, "pairs": [], "groups": {}}


class StateFile:
    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.path = os.path.join(directory, STATE_NAME)
        self._lock_fd = -1

    def lock(self) -> None:
        """Take the state directory for this process, or raise DaemonError."""
        make_private_dir(self.directory)
        fd = os.open(os.path.join(self.directory, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                who = f" (pid {holder})" if holder else ""
                raise DaemonError(f"state directory {self.directory} is in use by another daemon{who}") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def load(self) -> dict[str, Any]:
        try:
            with open(self.path, encoding="utf-8") as fh:
                data = json.load(fh)
        except FileNotFoundError:
            return empty()
        except (OSError, ValueError) as exc:
            raise DaemonError(f"{self.path}: unreadable daemon state ({exc}); "
                              f"move it away to start with no pairs") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT \
                or not isinstance(data.get("pairs"), list) or not isinstance(data.get("groups"), dict):
            raise DaemonError(f"{self.path}: not a pymirror daemon state of format {FORMAT}; "
                              f"move it away to start with no pairs")
        return data

    def save(self, data: dict[str, Any]) -> None:
        text = json.dumps(dict(data, format=FORMAT), indent=1, sort_keys=True) + "\n"
        fd, tmp = tempfile.mkstemp(prefix=".daemon.", suffix=".tmp", dir=self.directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.rename(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        dfd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
