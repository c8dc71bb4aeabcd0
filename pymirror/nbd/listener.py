"""Where a server listens, and who may connect: a unix socket with a stated
mode and group, and TCP on loopback unless remote clients are allowed.

A unix socket is created with its final mode and group before anyone can
reach it: it is bound inside a fresh private directory (mode 0700) next to
the target, given its mode (``chmod``) and group (``chown``), and only then
renamed onto the target path.  There is never a moment when the socket
exists at the target path with wider permissions, and no process-wide
``umask`` is changed under other threads.
"""
from __future__ import annotations

import errno
import grp
import ipaddress
import os
import socket
import stat
import struct
import tempfile
import threading
import time
from typing import Any, Callable, Optional, Union

_UNIX_PATH_MAX = 107           # sun_path holds 108 bytes with the terminating NUL


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_tcp(host: Optional[str], port: Optional[int], allow_remote: bool) -> str:
    """The host to bind (127.0.0.1 by default); a ValueError for a port out
    of range or a non-loopback host without ``allow_remote``."""
    host = host or "127.0.0.1"
    if not allow_remote and not is_loopback(host):
        raise ValueError(f"refusing to serve on {host}, which is not a loopback address: "
                         "pass allow_remote (CLI: --allow-remote) to expose the volume to the network "
                         "(then use --tls=require, with client certificates or PSK, to authenticate clients)")
    if port is not None and not 0 <= port < 65536:
        raise ValueError(f"port {port} is outside 0..65535")
    return host


def resolve_group(group: Union[str, int, None]) -> Optional[int]:
    """A group given by name, by number, or as a numeric string -> its gid."""
    if group is None:
        return None
    if isinstance(group, bool) or not isinstance(group, (str, int)):
        raise TypeError(f"socket_group is a group name or a gid, not {type(group).__name__}")
    if isinstance(group, int):
        gid = group
    elif group.isdigit():
        gid = int(group)
    else:
        try:
            return grp.getgrnam(group).gr_gid
        except KeyError:
            raise ValueError(f"socket_group: no group named {group!r}") from None
    if not 0 <= gid < 2 ** 32 - 1:
        raise ValueError(f"socket_group: gid {gid} is out of range")
    return gid


def check_mode(mode: Any) -> int:
    if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o777:
        raise ValueError(f"socket_mode must be permission bits 0..0o777, got {mode!r}")
    return mode


def _replaceable(path: str) -> None:
    """Refuse a path holding anything but a stale socket (nobody listening)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, "exists and is not a socket; refusing to replace it", path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        pass      # stale: nothing listens on it; the rename below replaces it
    else:
        raise OSError(errno.EADDRINUSE, "another server is listening on this socket", path)
    finally:
        probe.close()


def bind_unix(path: str, mode: int, gid: Optional[int]) -> tuple[socket.socket, tuple[int, int]]:
    """A unix socket bound at ``path`` with ``mode`` and group ``gid``, and
    the (device, inode) of its file (so that shutdown removes only its own)."""
    _replaceable(path)
    parent = os.path.dirname(path) or "."
    private = tempfile.mkdtemp(prefix=".pm-nbd-", dir=parent)      # mode 0700: only we can reach inside
    dirfd = -1
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        tmp = os.path.join(private, "s")
        if len(os.fsencode(tmp)) > _UNIX_PATH_MAX:
            # the same directory through a short name (Linux): the socket
            # still lands in ``private``
            dirfd = os.open(private, os.O_RDONLY | os.O_DIRECTORY)
            s.bind(f"/proc/self/fd/{dirfd}/s")
        else:
            s.bind(tmp)
        os.chmod(tmp, mode)
        if gid is not None:
            try:
                os.chown(tmp, -1, gid)
            except PermissionError:
                raise PermissionError(errno.EPERM, f"cannot give the socket to group {gid}: this process "
                                      "may only use a group it belongs to", path) from None
        st = os.lstat(tmp)
        os.rename(tmp, path)
        return s, (st.st_dev, st.st_ino)
    except BaseException:
        s.close()
        try:
            os.unlink(os.path.join(private, "s"))
        except OSError:
            pass
        raise
    finally:
        if dirfd >= 0:
            os.close(dirfd)
        try:
            os.rmdir(private)
        except OSError:
            pass


def remove_unix(path: str, ident: tuple[int, int]) -> None:
    """Remove the socket file if it is still the one we made."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if (st.st_dev, st.st_ino) == ident:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def bind_tcp(host: str, port: Optional[int]) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port or 0))
    except BaseException:
        s.close()
        raise
    return s


def peer_of(sock: socket.socket) -> dict[str, Any]:
    """Who is at the other end: ``peer`` as text, and for a unix socket the
    client's ``pid`` and ``uid`` (SO_PEERCRED)."""
    try:
        if sock.family == socket.AF_UNIX:
            pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                   struct.calcsize("3i")))
            return {"peer": f"unix pid {pid} uid {uid}", "pid": pid, "uid": uid}
        host, port = sock.getpeername()[:2]
        return {"peer": f"[{host}]:{port}" if ":" in host else f"{host}:{port}"}
    except OSError:
        return {"peer": "unknown"}


class Listener:
    """A listening socket and the thread accepting on it; each accepted
    socket goes to ``on_accept``."""

    def __init__(self, sock: socket.socket, on_accept: Callable[[socket.socket], None],
                 stopping: threading.Event) -> None:
        self.sock = sock
        self._on_accept = on_accept
        self._stopping = stopping
        sock.listen(64)
        self.thread = threading.Thread(target=self._loop, name="nbd-accept", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, _ = self.sock.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                time.sleep(0.01)   # EMFILE and the like: do not spin
                continue
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._on_accept(sock)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
