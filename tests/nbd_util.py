"""Helpers shared by the NBD tests (imported by path: no tests/__init__.py)."""
from __future__ import annotations

import os
import shutil
import socket
import struct

import pytest

from pymirror.nbd import protocol as P

CLIENTS = {
    "nbdinfo": "libnbd-bin", "nbdcopy": "libnbd-bin", "nbdsh": "libnbd-bin",
    "qemu-img": "qemu-utils", "qemu-nbd": "qemu-utils", "nbdkit": "nbdkit", "fio": "fio",
}


def need(tool: str) -> str:
    """The tool's path; a missing tool fails under CI and skips elsewhere."""
    path = shutil.which(tool)
    if path is None:
        msg = f"{tool} is not installed (Debian package {CLIENTS.get(tool, tool)})"
        if os.environ.get("CI"):
            pytest.fail(msg + ": CI must install it (.ci/run)")
        pytest.skip(msg)
    return path


class RawClient:
    """A minimal NBD client speaking the protocol by hand."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)

    def recv(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("closed")
            out += chunk
        return out

    def greet(self) -> int:
        magic, opt, flags = struct.unpack(">QQH", self.recv(18))
        assert (magic, opt) == (P.NBDMAGIC, P.IHAVEOPT)
        self.sock.sendall(struct.pack(">I", P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES))
        return flags

    def option(self, opt: int, data: bytes = b"") -> None:
        self.sock.sendall(P.OPT_HEADER.pack(P.IHAVEOPT, opt, len(data)) + data)

    def opt_reply(self) -> tuple[int, int, bytes]:
        magic, opt, rtype, length = P.OPT_REPLY.unpack(self.recv(P.OPT_REPLY.size))
        assert magic == P.OPT_REPLY_MAGIC
        return opt, rtype, self.recv(length)

    def go(self, name: str = "") -> tuple[int, int]:
        raw = name.encode()
        self.option(P.OPT_GO, struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0))
        size = flags = None
        while True:
            _, rtype, data = self.opt_reply()
            if rtype == P.REP_INFO and struct.unpack_from(">H", data)[0] == P.INFO_EXPORT:
                _, size, flags = struct.unpack(">HQH", data)
            elif rtype == P.REP_ACK:
                return size, flags
            elif rtype >= 1 << 31:
                raise LookupError(rtype)

    def request(self, cmd: int, offset: int = 0, length: int = 0, data: bytes = b"", flags: int = 0,
                cookie: int = 7) -> None:
        self.sock.sendall(P.REQUEST.pack(P.REQUEST_MAGIC, flags, cmd, cookie, offset, length) + data)

    def reply(self, read_len: int = 0) -> tuple[int, int, bytes]:
        magic, err, cookie = P.SIMPLE_REPLY.unpack(self.recv(P.SIMPLE_REPLY.size))
        assert magic == P.SIMPLE_REPLY_MAGIC
        return err, cookie, (self.recv(read_len) if read_len and err == 0 else b"")

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except (ConnectionError, socket.timeout):
            return True

    def close(self) -> None:
        self.sock.close()
