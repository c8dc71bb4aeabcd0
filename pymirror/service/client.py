"""The Python client of a running daemon.

    >>> import pymirror
    >>> with pymirror.connect() as c:              # $PYMIRROR_CONTROL or the default socket
    ...     p = c.pair("db")
    ...     p.split()
    ...     p.restore(incremental=True)
    ...     for ev in p.events():
    ...         if ev["event"] == "job-done":
    ...             break

``Client.execute`` returns the reply's ``return`` value or raises what a
local call would have raised (``StateError``, ``BusyError``, ...), and
:class:`DaemonUnreachable` when no daemon listens.  One Client is one
connection; requests on it are answered in order, and it is safe to share
between threads (one request at a time).  ``events()`` subscribes the
connection: use a Client of its own for it when other threads issue
commands meanwhile.
"""
from __future__ import annotations

import collections
import os
import socket
import threading
from types import TracebackType
from typing import Any, Deque, Iterator, Optional, Type

from .paths import control_path
from .protocol import (MAX_LINE, DaemonUnreachable, InternalError, InvalidRequest, LineReader, decode, encode,
                       exception_for)


_NOT_SUBSCRIBED = object()


class Client:
    def __init__(self, control: "Optional[str | os.PathLike[str]]" = None,
                 timeout: Optional[float] = None) -> None:
        self.path = control_path(control)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.settimeout(10.0 if timeout is None else timeout)
            self._sock.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError):
            self._sock.close()
            raise DaemonUnreachable(f"no pymirror daemon listens on {self.path} "
                                    f"(start one with 'pymirror daemon', or name its socket with --control)") from None
        except OSError as exc:
            self._sock.close()
            raise DaemonUnreachable(f"cannot reach the pymirror daemon at {self.path}: "
                                    f"{exc.strerror or exc}") from None
        self._reader = LineReader(self._sock, MAX_LINE * 16)
        self._lock = threading.Lock()
        self._events: Deque[dict[str, Any]] = collections.deque()
        self._next = 0
        self._subscribed: object = _NOT_SUBSCRIBED
        try:
            hello = self._read()
        except BaseException:
            self._sock.close()
            raise
        info = hello.get("pymirror") if isinstance(hello, dict) else None
        if not isinstance(info, dict):
            self._sock.close()
            raise DaemonUnreachable(f"{self.path} is not a pymirror control socket (greeting {hello!r})")
        self.greeting: dict[str, Any] = info
        self._sock.settimeout(timeout)

    # -- wire -----------------------------------------------------------------
    def _read(self) -> dict[str, Any]:
        try:
            line = self._reader.readline()
        except socket.timeout:
            raise DaemonUnreachable(f"the daemon at {self.path} did not answer in time") from None
        except InvalidRequest as exc:
            raise InternalError(f"the daemon sent a message too long to read: {exc}") from None
        except OSError as exc:
            raise DaemonUnreachable(f"lost the daemon at {self.path}: {exc.strerror or exc}") from None
        if line is None:
            raise DaemonUnreachable(f"the daemon at {self.path} closed the connection")
        try:
            return decode(line)
        except InvalidRequest as exc:
            raise InternalError(f"the daemon sent a malformed message: {exc}") from None

    def _dict(self, verb: str, **arguments: Any) -> dict[str, Any]:
        value = self.execute(verb, **arguments)
        if not isinstance(value, dict):
            raise InternalError(f"{verb}: the daemon answered {type(value).__name__}, not an object")
        return value

    def execute(self, verb: str, **arguments: Any) -> Any:
        """Run one verb (``set_rate`` and ``set-rate`` are the same verb);
        arguments that are None are left out."""
        verb = verb.replace("_", "-")
        args = {k: v for k, v in arguments.items() if v is not None}
        with self._lock:
            self._next += 1
            ident = self._next
            try:
                self._sock.sendall(encode({"execute": verb, "arguments": args, "id": ident}))
            except OSError as exc:
                raise DaemonUnreachable(f"lost the daemon at {self.path}: {exc.strerror or exc}") from None
            while True:
                msg = self._read()
                if "event" in msg:
                    self._events.append(msg)
                    continue
                if msg.get("id") != ident:
                    if "error" in msg:      # an error the daemon could not tie to a request
                        raise exception_for(msg["error"])
                    continue
                if "error" in msg:
                    raise exception_for(msg["error"])
                return msg.get("return")

    # -- the verbs -----------------------------------------------------------
    def find(self, pair_or_path: "str | os.PathLike[str]") -> Optional[str]:
        """The name under which the daemon holds this pair (by name, or by
        meta path), else None."""
        key = os.fspath(pair_or_path)
        if os.path.exists(key):
            key = os.path.realpath(key)
        found = self.execute("find", pair=key)
        return found if isinstance(found, str) else None

    def pair(self, name: str) -> "RemotePair":
        return RemotePair(self, name)

    def status(self, name: Optional[str] = None) -> dict[str, Any]:
        return self._dict("status", name=name)

    def attach(self, meta: "str | os.PathLike[str]", name: Optional[str] = None,
               export: Optional[bool] = None) -> dict[str, Any]:
        return self._dict("attach", meta=os.path.abspath(os.fspath(meta)), name=name, export=export)

    def detach(self, name: str) -> dict[str, Any]:
        return self._dict("detach", name=name)

    def group_create(self, name: str, pairs: list[str]) -> dict[str, Any]:
        return self._dict("group-create", name=name, pairs=list(pairs))

    def group_delete(self, name: str) -> dict[str, Any]:
        return self._dict("group-delete", name=name)

    def history(self, name: Optional[str] = None) -> list[dict[str, Any]]:
        """The events the daemon kept (the last few per pair)."""
        value = self.execute("events", name=name)
        return list(value) if isinstance(value, list) else []

    def events(self, pair: Optional[str] = None, timeout: Optional[float] = None) -> Iterator[dict[str, Any]]:
        """Live events (of one pair or group, or of every pair), as dicts
        ``{"event", "data", "timestamp"}``, until the connection closes; with
        ``timeout``, the iterator ends after that many seconds without one.
        The subscription starts when this is called, not at the first
        ``next()``."""
        if self._subscribed != pair:
            self.execute("subscribe", pair=pair)
            self._subscribed = pair
        return self._event_stream(timeout)

    def _event_stream(self, timeout: Optional[float]) -> Iterator[dict[str, Any]]:
        while True:
            with self._lock:
                if self._events:
                    msg = self._events.popleft()
                else:
                    old = self._sock.gettimeout()
                    self._sock.settimeout(timeout)
                    try:
                        msg = self._read()
                    except DaemonUnreachable:
                        if timeout is not None:
                            return
                        raise
                    finally:
                        self._sock.settimeout(old)
            if "event" in msg:
                yield msg

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, et: Optional[Type[BaseException]], ev: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self.close()


class RemotePair:
    """A pair held by a daemon, with the verbs of :class:`pymirror.Pair`
    that make sense at a distance.  Job verbs return the pair's query dict
    once the job has started (``wait=True``: once it is done)."""

    def __init__(self, client: Client, name: str) -> None:
        self.client = client
        self.name = name

    def _x(self, verb: str, **kw: Any) -> Any:
        return self.client.execute(verb, name=self.name, **kw)

    def establish(self, incremental: bool = False, assume_equal: bool = False, rate: Optional[int] = None,
                  copiers: Optional[int] = None, batch_size: Optional[int] = None, wait: bool = False,
                  compare: bool = False, trust: Optional[bool] = None, pace: Optional[str] = None,
                  host_latency_target: Optional[str] = None, order: Optional[str] = None) -> Any:
        extra = {"compare": True} if compare else {}
        return self._x("establish", incremental=incremental, assume_equal=assume_equal, rate=rate,
                       copiers=copiers, batch_size=batch_size, wait=wait, trust=trust, pace=pace,
                       host_latency_target=host_latency_target, order=order, **extra)

    def split(self) -> Any:
        return self._x("split")

    def restore(self, incremental: bool = False, protect: bool = True, read_policy: Optional[str] = None,
                rate: Optional[int] = None, copiers: Optional[int] = None, batch_size: Optional[int] = None,
                wait: bool = False, compare: bool = False, trust: Optional[bool] = None,
                pace: Optional[str] = None, host_latency_target: Optional[str] = None,
                order: Optional[str] = None) -> Any:
        extra = {"compare": True} if compare else {}
        return self._x("restore", incremental=incremental, protect=protect, read_policy=read_policy,
                       rate=rate, copiers=copiers, batch_size=batch_size, wait=wait, trust=trust, pace=pace,
                       host_latency_target=host_latency_target, order=order, **extra)

    def plan(self, kind: str, incremental: bool = False, protect: bool = True) -> dict[str, Any]:
        """What a restore or establish (``kind``) would do, changing nothing
        (pymirror.plan; a group gives ``{"group": NAME, "pairs": {name: plan}}``)."""
        return self.client._dict("plan", name=self.name, kind=kind, incremental=incremental, protect=protect)

    def resume(self, rate: Optional[int] = None, copiers: Optional[int] = None,
               batch_size: Optional[int] = None, wait: bool = False, pace: Optional[str] = None,
               host_latency_target: Optional[str] = None, order: Optional[str] = None) -> Any:
        return self._x("resume", rate=rate, copiers=copiers, batch_size=batch_size, wait=wait, pace=pace,
                       host_latency_target=host_latency_target, order=order)

    def pause(self) -> Any:
        return self._x("pause")

    def cancel(self) -> Any:
        return self._x("cancel")

    def set_rate(self, rate: int) -> Any:
        return self._x("set-rate", rate=rate)

    def query(self) -> dict[str, Any]:
        return self.client._dict("query", name=self.name)

    def verify(self, wait: bool = True) -> dict[str, Any]:
        return self.client._dict("verify", name=self.name, wait=wait)

    def wait(self, timeout: Optional[float] = None) -> str:
        """"done" | "paused-error" | "timeout"."""
        return str(self._x("wait", timeout=timeout))

    def export(self) -> Any:
        return self._x("export")

    def unexport(self) -> Any:
        return self._x("unexport")

    def events(self, timeout: Optional[float] = None) -> Iterator[dict[str, Any]]:
        return self.client.events(self.name, timeout=timeout)

    def __repr__(self) -> str:
        return f"<RemotePair {self.name} via {self.client.path}>"


def connect(control: "Optional[str | os.PathLike[str]]" = None, timeout: Optional[float] = None) -> Client:
    """A :class:`Client` of the daemon listening on ``control`` (default:
    ``$PYMIRROR_CONTROL``, then the default control socket)."""
    return Client(control, timeout=timeout)
