"""Helpers shared by the NBD tests (imported by path: no tests/__init__.py)."""
from __future__ import annotations

import os
import shutil
import socket
import struct
from typing import Any, Union

import pytest

from pymirror.nbd import protocol as P

CLIENTS = {
    "nbdinfo": "libnbd-bin", "nbdcopy": "libnbd-bin", "nbdsh": "python3-libnbd",
    "qemu-img": "qemu-utils", "qemu-io": "qemu-utils", "qemu-nbd": "qemu-utils", "nbdkit": "nbdkit", "fio": "fio",
}


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def need(tool: str) -> str:
    """The tool's path; a missing tool fails under CI and skips elsewhere."""
    path = shutil.which(tool)
    if path is None:
        msg = f"{tool} is not installed (Debian package {CLIENTS.get(tool, tool)})"
        if in_ci():
            pytest.fail(msg + ": CI must install it (.ci/run)")
        pytest.skip(msg)
    return path


class RawClient:
    """A minimal NBD client speaking the protocol by hand, so tests can send
    what no real client would."""

    def __init__(self, address: Union[str, tuple[str, int]], timeout: float = 10) -> None:
        if isinstance(address, str):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(address)
        else:
            self.sock = socket.create_connection(address, timeout=timeout)
        self.structured = False
        self.message = ""          # the text of the last structured error chunk

    def recv(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("closed")
            out += chunk
        return out

    def greet(self, flags: int = P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES) -> int:
        magic, opt, sflags = struct.unpack(">QQH", self.recv(18))
        assert (magic, opt) == (P.NBDMAGIC, P.IHAVEOPT)
        self.sock.sendall(struct.pack(">I", flags))
        return sflags

    def option(self, opt: int, data: bytes = b"") -> None:
        self.sock.sendall(P.OPT_HEADER.pack(P.IHAVEOPT, opt, len(data)) + data)

    def opt_reply(self) -> tuple[int, int, bytes]:
        magic, opt, rtype, length = P.OPT_REPLY.unpack(self.recv(P.OPT_REPLY.size))
        assert magic == P.OPT_REPLY_MAGIC
        return opt, rtype, self.recv(length)

    def opt_replies(self) -> list[tuple[int, bytes]]:
        """Replies up to and including the final ACK or error."""
        out = []
        while True:
            _, rtype, data = self.opt_reply()
            out.append((rtype, data))
            if rtype == P.REP_ACK or rtype >= 1 << 31:
                return out

    def negotiate_structured(self) -> None:
        self.option(P.OPT_STRUCTURED_REPLY)
        assert self.opt_reply()[1] == P.REP_ACK
        self.structured = True

    @staticmethod
    def info_request(name: str, infos: tuple[int, ...] = ()) -> bytes:
        raw = name.encode()
        return struct.pack(">I", len(raw)) + raw + struct.pack(f">H{len(infos)}H", len(infos), *infos)

    def go(self, name: str = "", infos: tuple[int, ...] = (), opt: int = P.OPT_GO) -> dict[int, Any]:
        """OPT_GO (or OPT_INFO); the information replies by type.  Raises
        LookupError with the error reply type."""
        self.option(opt, self.info_request(name, infos))
        info: dict[int, Any] = {}
        for rtype, data in self.opt_replies():
            if rtype >= 1 << 31:
                raise LookupError(rtype)
            if rtype == P.REP_INFO:
                (itype,) = struct.unpack_from(">H", data)
                if itype == P.INFO_EXPORT:
                    info[itype] = struct.unpack(">QH", data[2:])
                elif itype == P.INFO_BLOCK_SIZE:
                    info[itype] = struct.unpack(">III", data[2:])
                else:
                    info[itype] = data[2:].decode()
        return info

    def request(self, cmd: int, offset: int = 0, length: int = 0, data: bytes = b"", flags: int = 0,
                cookie: int = 7) -> None:
        self.sock.sendall(P.REQUEST.pack(P.REQUEST_MAGIC, flags, cmd, cookie, offset, length) + data)
        self.offsets = getattr(self, "offsets", {})
        self.offsets[cookie] = offset          # where a structured reply's data chunks go

    def reply(self, read_len: int = 0) -> tuple[int, int, bytes]:
        """(error, cookie, data) of the next reply, simple or structured."""
        (magic,) = struct.unpack(">I", self.recv(4))
        if magic == P.SIMPLE_REPLY_MAGIC:
            err, cookie = struct.unpack(">IQ", self.recv(12))
            return err, cookie, (self.recv(read_len) if read_len and err == 0 else b"")
        assert magic == P.STRUCTURED_REPLY_MAGIC and self.structured, hex(magic)
        err, data, cookie = 0, bytearray(read_len), None
        self.block_status: dict[int, list[tuple[int, int]]] = {}   # context id -> [(length, flags)]
        while True:
            flags, rtype, ck, length = struct.unpack(">HHQI", self.recv(16))
            assert cookie in (None, ck)
            cookie = ck
            payload = self.recv(length)
            if rtype == P.REPLY_TYPE_OFFSET_DATA:
                (off,) = struct.unpack_from(">Q", payload)
                self.last_data_offset = off
                pos = off - getattr(self, "offsets", {}).get(ck, off)   # 0 when the request was sent raw
                data[pos:pos + len(payload) - 8] = payload[8:]
            elif rtype & (1 << 15):
                err, mlen = struct.unpack_from(">IH", payload)
                self.message = payload[6:6 + mlen].decode()
            elif rtype == P.REPLY_TYPE_BLOCK_STATUS:
                (cid,) = struct.unpack_from(">I", payload)
                self.block_status[cid] = [struct.unpack_from(">II", payload, 4 + 8 * i)
                                          for i in range((length - 4) // 8)]
            else:
                assert rtype == P.REPLY_TYPE_NONE and length == 0
            if flags & P.REPLY_FLAG_DONE:
                return err, cookie, (bytes(data) if err == 0 else b"")
            assert magic == P.STRUCTURED_REPLY_MAGIC
            (magic,) = struct.unpack(">I", self.recv(4))

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except (ConnectionError, socket.timeout):
            return True

    def close(self) -> None:
        self.sock.close()


def connect(address: Any, name: str = "", structured: bool = False) -> tuple[RawClient, int, int]:
    """A client in the transmission phase: (client, size, transmission flags)."""
    c = RawClient(address)
    c.greet()
    if structured:
        c.negotiate_structured()
    info = c.go(name)
    size, flags = info[P.INFO_EXPORT]
    return c, size, flags



def libnbd() -> Any:
    """libnbd's Python module (Debian python3-libnbd), imported in this
    process.  The module is built for Debian's python3; when this
    interpreter is another build of the same Python version, the module is
    taken from Debian's dist-packages directory (its extension has the same
    ABI tag).  A missing module fails under CI and skips elsewhere."""
    try:
        import nbd  # type: ignore[import-not-found]
        return nbd
    except ImportError:
        pass
    import importlib
    import sys
    import sysconfig
    dist = "/usr/lib/python3/dist-packages"
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ""
    if os.path.exists(os.path.join(dist, "nbd.py")) and os.path.exists(os.path.join(dist, "libnbdmod" + suffix)):
        sys.path.append(dist)
        try:
            return importlib.import_module("nbd")
        except ImportError:
            pass
        finally:
            sys.path.remove(dist)
    msg = (f"libnbd's Python module is not importable from Python {sys.version_info.major}."
           f"{sys.version_info.minor} (Debian package python3-libnbd)")
    if in_ci():
        pytest.fail(msg + ": CI must install it (.ci/run)")
    pytest.skip(msg)


def list_exports(address: Any) -> list[tuple[str, str]]:
    """NBD_OPT_LIST: (name, description) of every export, in order."""
    c = RawClient(address)
    c.greet()
    c.option(P.OPT_LIST)
    out = []
    for rtype, data in c.opt_replies()[:-1]:
        assert rtype == P.REP_SERVER
        (n,) = struct.unpack_from(">I", data)
        out.append((data[4:4 + n].decode(), data[4 + n:].decode()))
    c.close()
    return out
