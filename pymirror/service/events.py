"""Events: what happened to which pair, logged, kept and sent to subscribers.

Every event is logged on one line (``job-progress`` only at debug level:
it comes up to four times a second per pair), appended to its pair's
history (the last :data:`KEEP` events, so ``status`` can say why a job
stopped), and handed to each subscriber whose filter matches.  Subscribers
must not block: a control connection queues the event for its writer.
"""
from __future__ import annotations

import collections
import logging
import threading
from typing import Any, Callable, Deque, Optional

from . import protocol

log = logging.getLogger("pymirror.daemon")

KEEP = 32                  # events kept per pair
PROGRESS_INTERVAL = 0.25   # seconds between job-progress events of one pair (at most 4/s)

Subscriber = Callable[[dict[str, Any]], None]


def describe(name: str, data: dict[str, Any]) -> str:
    """The log line of an event."""
    pair = data.get("pair")
    who = f"{pair}: " if pair else ""
    if name == "state-changed":
        return f"{who}state {data.get('from')} -> {data.get('to')}"
    if name == "job-paused":
        why = f"error on track {data.get('error_track')}: {data.get('error')}" if data.get("error") \
            else ("by request" if data.get("by_request") else "interrupted")
        return f"{who}{data.get('kind')} paused ({why})"
    if name == "mirror-detached":
        return f"{who}{data.get('summary')}"
    if name == "job-done":
        return f"{who}{data.get('kind')} done ({data.get('summary', '')})".replace(" ()", "")
    if name in ("client-connected", "client-disconnected"):
        return f"{who}NBD {name.split('-', 1)[1]}: export {data.get('export')!r} peer {data.get('peer')}"
    rest = " ".join(f"{k}={v}" for k, v in sorted(data.items()) if k != "pair")
    return f"{who}{name} {rest}".rstrip()


class EventHub:
    def __init__(self, keep: int = KEEP) -> None:
        self._lock = threading.Lock()
        self._keep = keep
        self._history: dict[str, Deque[dict[str, Any]]] = {}
        self._subs: dict[int, tuple[Optional[str], Subscriber]] = {}
        self._next = 0

    def emit(self, name: str, data: dict[str, Any]) -> dict[str, Any]:
        msg = protocol.event(name, data)
        level = logging.DEBUG if name == "job-progress" else (
            logging.WARNING if (name == "job-paused" and data.get("error")) or name == "mirror-detached"
            else logging.INFO)
        log.log(level, describe(name, data))
        pair = data.get("pair")
        with self._lock:
            if pair and name != "job-progress":
                hist = self._history.get(pair)
                if hist is None:
                    hist = self._history[pair] = collections.deque(maxlen=self._keep)
                hist.append(msg)
            subs = list(self._subs.values())
        for flt, fn in subs:
            if flt is None or flt == pair or (isinstance(flt, frozenset) and pair in flt):
                try:
                    fn(msg)
                except Exception:  # noqa: BLE001 - one bad subscriber must not stop the others
                    log.exception("event subscriber failed")
        return msg

    def history(self, pair: str) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._history.get(pair, ()))

    def forget(self, pair: str) -> None:
        with self._lock:
            self._history.pop(pair, None)

    def subscribe(self, fn: Subscriber, pair: Any = None) -> int:
        """Call ``fn(event)`` for every event (of ``pair`` only, or of any of a
        frozenset of pairs, when given).  Returns a token for unsubscribe."""
        with self._lock:
            self._next += 1
            self._subs[self._next] = (pair, fn)
            return self._next

    def unsubscribe(self, token: int) -> None:
        with self._lock:
            self._subs.pop(token, None)
