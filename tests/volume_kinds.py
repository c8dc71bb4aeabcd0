"""The kinds of volume the pair tests run over, in one registry.

A kind makes a volume of a given size and hands back its name (a path or a
URI that :meth:`pymirror.Volume.open` takes) and the ``Volume.kind`` it
opens as, and can stop and start the server behind it (for fault tests).
A maker skips (fails under CI) when its tools are missing.  Adding a kind is one entry in
:data:`KINDS` (a function ``(tmp_path, role, size) -> Backing``); the pair
kinds of :data:`PAIR_KINDS` follow from it: each kind with itself, each
remote kind with a local file on either side, and remote kinds with one
another.

Imported by path (tests/ has no __init__.py): ``from volume_kinds import ...``.
"""
from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional

import pytest

from nbd_util import in_ci, need


class Backing:
    """One volume: its name for pymirror (``uri``), the file under it, and,
    for a remote kind, the server process serving it."""

    remote = False
    volume_kind = "file"      # what pymirror.Volume.kind says for it

    def __init__(self, uri: str, path: Path) -> None:
        self.uri = uri
        self.path = path

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the server (remote kinds only)."""

    def start(self) -> None:
        """Start the server again on the same file and address."""

    def close(self) -> None:
        self.stop()


def _blank(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def _wait_socket(sock: Path, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RuntimeError(f"{what} exited with {proc.returncode}: {err.strip()}")
        if sock.exists():
            import socket as so

            s = so.socket(so.AF_UNIX, so.SOCK_STREAM)
            try:
                s.connect(str(sock))
                return
            except OSError:
                pass
            finally:
                s.close()
        time.sleep(0.02)
    raise RuntimeError(f"{what} did not listen on {sock} within 15 s")


class ServerBacking(Backing):
    """A file exported on a unix socket by a server we run in the foreground."""

    remote = True
    volume_kind = "nbd"

    def __init__(self, argv: Callable[[Path, Path], list[str]], tool: str, path: Path, sock: Path) -> None:
        super().__init__(f"nbd+unix:///?socket={sock}", path)
        self.argv, self.tool, self.sock = argv, tool, sock
        self.proc: Optional[subprocess.Popen] = None
        self.start()

    def start(self) -> None:
        if self.sock.exists():
            self.sock.unlink()
        self.proc = subprocess.Popen(self.argv(self.path, self.sock), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _wait_socket(self.sock, self.proc, self.tool)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None


def file_kind(tmp_path: Path, role: str, size: int) -> Backing:
    path = tmp_path / f"{role}.img"
    _blank(path, size)
    return Backing(str(path), path)


def qemu_nbd_kind(tmp_path: Path, role: str, size: int) -> Backing:
    tool = need("qemu-nbd")
    path = tmp_path / f"{role}.qnbd.img"
    _blank(path, size)
    # -t: keep serving after a client leaves; -e: several connections (multi-conn)
    return ServerBacking(lambda p, s: [tool, "-k", str(s), "-f", "raw", "-t", "-e", "16", "--cache=writeback",
                                       str(p)], "qemu-nbd", path, tmp_path / f"{role}.qnbd.sock")


def nbdkit_kind(tmp_path: Path, role: str, size: int) -> Backing:
    tool = need("nbdkit")
    path = tmp_path / f"{role}.nbdkit.img"
    _blank(path, size)
    return ServerBacking(lambda p, s: [tool, "-f", "-U", str(s), "file", f"file={p}"], "nbdkit", path,
                         tmp_path / f"{role}.nbdkit.sock")


class RbdBacking(Backing):
    """An image in the session's one-node Ceph cluster (tests/services/ceph.py).
    ``stop`` stalls the OSD (SIGSTOP: a killed memstore OSD would come back
    empty), ``start`` lets it go on; ``close`` removes the image."""

    remote = True
    volume_kind = "rbd"

    def __init__(self, cluster, name: str) -> None:
        super().__init__(cluster.uri(name), None)   # type: ignore[arg-type]  (no file under it)
        self.cluster, self.name = cluster, name

    def stop(self, sig: int = signal.SIGSTOP) -> None:
        self.cluster.stall_osd()

    def start(self) -> None:
        self.cluster.resume_osd()

    def close(self) -> None:
        self.cluster.resume_osd()
        self.cluster.remove_image(self.name)


def rbd_kind(tmp_path: Path, role: str, size: int) -> Backing:
    import sys

    ceph = sys.modules.get("pymirror_test_ceph")        # loaded by tests/conftest.py
    cluster = getattr(ceph, "SESSION", None)
    if cluster is None:
        raise RuntimeError("the rbd kind needs the session's Ceph cluster: request the ceph_cluster fixture first "
                           "(kinds name the fixtures they need in .fixtures)")
    return RbdBacking(cluster, cluster.create_image(size, role))


rbd_kind.fixtures = ("ceph_cluster",)   # type: ignore[attr-defined]  (skips, or fails under CI, without Ceph)


#: name -> maker.  A maker may name the fixtures it needs in ``.fixtures``
#: (the tests request them first).  rbd comes before the NBD kinds, so the
#: remote-with-remote pairs are an RBD standard with an NBD mirror.
KINDS: dict[str, Callable[[Path, str, int], Backing]] = {
    "file": file_kind,
    "rbd": rbd_kind,
    "qemu-nbd": qemu_nbd_kind,
    "nbdkit": nbdkit_kind,
}


def kind_fixtures(kinds: tuple[str, str]) -> list[str]:
    """The fixtures the two kinds of a pair need (request them first)."""
    return [f for k in dict.fromkeys(kinds) for f in getattr(KINDS[k], "fixtures", ())]


def pair_kinds(kinds: dict[str, Callable[..., Backing]]) -> list[tuple[str, str]]:
    """Each kind with itself; each remote kind with a file on either side;
    the remote kinds with one another (in one order)."""
    names = list(kinds)
    remote = [k for k in names if k != "file"]
    out = [(k, k) for k in names]
    for k in remote:
        out += [("file", k), (k, "file")]
    for i, a in enumerate(remote):
        for b in remote[i + 1:]:
            out.append((a, b))
    return out


PAIR_KINDS = pair_kinds(KINDS)


def pair_id(kinds: tuple[str, str]) -> str:
    return f"{kinds[0]}+{kinds[1]}"


class Volumes:
    """The two backings of one test's pair; stops their servers at the end."""

    def __init__(self, tmp_path: Path, kinds: tuple[str, str], size: int) -> None:
        self.kinds = kinds
        self.standard = KINDS[kinds[0]](tmp_path, "std", size)
        try:
            self.mirror = KINDS[kinds[1]](tmp_path, "mir", size)
        except BaseException:
            self.standard.close()
            raise

    def close(self) -> None:
        self.standard.close()
        self.mirror.close()


def have_tools() -> bool:
    return all(shutil.which(t) for t in ("qemu-nbd", "nbdkit"))


def require_remote() -> None:
    """Skip (fail in CI) when the NBD servers are missing."""
    if not have_tools():
        msg = "qemu-nbd and nbdkit are needed (Debian qemu-utils, nbdkit)"
        if in_ci():
            pytest.fail(msg + ": CI must install them")
        pytest.skip(msg)


__all__ = ["Backing", "KINDS", "PAIR_KINDS", "Volumes", "kind_fixtures", "pair_id", "pair_kinds", "require_remote"]
