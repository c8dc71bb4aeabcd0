"""The control protocol: framing, messages and error classes.

One JSON object per line (UTF-8, ``\\n``-terminated, at most
:data:`MAX_LINE` bytes).  The daemon speaks first with a greeting; then the
client sends requests and the daemon answers each one, in order; events are
sent to the clients that subscribed, between replies.  docs/control.md is
the reference.

    greeting  {"pymirror": {"version": {...}, "capabilities": [...]}}
    request   {"execute": VERB, "arguments": {...}, "id": ANY}
    reply     {"id": ANY, "return": VALUE}
              {"id": ANY, "error": {"class": NAME, "desc": TEXT}}
    event     {"event": NAME, "data": {...}, "timestamp": SECONDS}

Error classes are the names of pymirror's exception classes
(``StateError``, ``BusyError``, ...) plus a few of the protocol's own,
defined here; :func:`error_reply` and :func:`exception_for` map between the
two so that a client raises what a local call would have raised.
"""
from __future__ import annotations

import json
import time
from typing import Any, Optional

from .. import errors

PROTOCOL_VERSION = {"major": 1, "minor": 0}
MAX_LINE = 1 << 20          # bytes, newline included
CAPABILITIES = ["events", "groups", "nbd-export", "online-verify", "wait"]


class ProtocolError(errors.MirrorError, ValueError):
    """A request that is not a well-formed message."""


class InvalidRequest(ProtocolError):
    """The line is not a JSON object, lacks ``execute``, or is too long."""


class CommandNotFound(ProtocolError):
    """No verb of that name."""


class InvalidArgument(errors.MirrorError, ValueError):
    """An argument is missing, unknown, or of the wrong type or value."""


class NoSuchPair(errors.MirrorError, LookupError):
    """No pair or group of that name is held by the daemon."""


class InternalError(errors.MirrorError, RuntimeError):
    """The daemon failed in a way that is not the request's fault (logged)."""


class DaemonError(errors.MirrorError, RuntimeError):
    """The daemon cannot start (control socket taken, state unreadable, ...)."""


DaemonUnreachable = errors.DaemonUnreachable

_OWN = (ProtocolError, InvalidRequest, CommandNotFound, InvalidArgument, NoSuchPair, InternalError,
        DaemonError, DaemonUnreachable)


def error_classes() -> dict[str, type[BaseException]]:
    """Every error class name the protocol uses, and its exception."""
    out: dict[str, type[BaseException]] = {}
    for value in vars(errors).values():
        if isinstance(value, type) and issubclass(value, errors.MirrorError):
            out[value.__name__] = value
    for cls in _OWN:
        out[cls.__name__] = cls
    return out


def error_reply(exc: BaseException) -> dict[str, Any]:
    """The ``error`` member of a reply for ``exc``."""
    from ..config import ConfigError   # a bad setting in the arguments: the caller's mistake
    if isinstance(exc, ConfigError):
        return {"class": "InvalidArgument", "desc": str(exc)}
    classes = error_classes()
    for cls in type(exc).__mro__:
        if classes.get(cls.__name__) is cls:
            return {"class": cls.__name__, "desc": str(exc)}
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        return {"class": "OSError", "desc": f"{where}{exc.strerror or exc}", "errno": exc.errno}
    if isinstance(exc, (ValueError, TypeError)):
        return {"class": "InvalidArgument", "desc": str(exc)}
    return {"class": "InternalError", "desc": f"{type(exc).__name__}: {exc}"}


def exception_for(error: Any) -> BaseException:
    """The exception a client raises for an ``error`` member of a reply."""
    if not isinstance(error, dict):
        return InternalError(f"malformed error reply: {error!r}")
    name, desc = str(error.get("class", "")), str(error.get("desc", ""))
    if name == "OSError":
        code = error.get("errno")
        return OSError(code, desc) if isinstance(code, int) else OSError(desc)
    cls = error_classes().get(name)
    if cls is None:
        return errors.MirrorError(desc or name)
    return cls(desc)


def encode(obj: Any) -> bytes:
    """One message as a line."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=False, default=str).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    """Parse one line into a JSON object, or raise :class:`InvalidRequest`."""
    try:
        obj = json.loads(line)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidRequest(f"not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise InvalidRequest(f"a message must be a JSON object, got {type(obj).__name__}")
    return obj


def greeting(package_version: str) -> dict[str, Any]:
    return {"pymirror": {"version": dict(PROTOCOL_VERSION, package=package_version),
                         "capabilities": list(CAPABILITIES)}}


def event(name: str, data: dict[str, Any], timestamp: Optional[float] = None) -> dict[str, Any]:
    return {"event": name, "data": data, "timestamp": time.time() if timestamp is None else timestamp}


class LineReader:
    """Split a socket's bytes into lines of at most ``limit`` bytes.

    ``readline()`` returns a line without its newline, None at a clean end
    of stream (a partial last line is dropped: the peer went away mid-
    message), and raises :class:`InvalidRequest` when a line grows past the
    limit (the caller replies and closes: the rest of that line cannot be
    framed)."""

    def __init__(self, sock: Any, limit: int = MAX_LINE) -> None:
        self.sock = sock
        self.limit = limit
        self.buf = bytearray()
        self.scanned = 0

    def readline(self) -> Optional[bytes]:
        while True:
            i = self.buf.find(b"\n", self.scanned)
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[:i + 1]
                self.scanned = 0
                if len(line) + 1 > self.limit:
                    raise InvalidRequest(f"line longer than {self.limit} bytes refused")
                return line
            self.scanned = len(self.buf)
            if len(self.buf) >= self.limit:
                raise InvalidRequest(f"line longer than {self.limit} bytes refused")
            chunk = self.sock.recv(min(1 << 16, self.limit + 1 - len(self.buf)))
            if not chunk:
                return None
            self.buf += chunk
