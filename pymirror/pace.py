"""Latency-aware pacing and hot-first order: the settings' words.

``pace``: ``"auto"`` (the default) lets the copy use the bandwidth the host
leaves, keeping the host's p99 latency within a target; ``"off"`` copies at
full speed (``rate`` stays a hard cap either way).

``host_latency_target``: a factor of the idle baseline the core learns
(``"2x"``, the default; ``"1.5x"``), or a time (``"5ms"``, ``"800us"``,
``"0.01s"``).

``order``: ``"hot"`` (the default) copies the tracks the host reads or
partially writes while they are not yet restored ahead of the rest;
``"ascending"`` copies in volume order.

How the controller works: docs/arbitration.md, "Pacing".
"""
from __future__ import annotations

import re
TYPE_CHECKING = False   # typing is not imported at run time: a command's start (docs/copier.md)
if TYPE_CHECKING:  # pragma: no cover
    from typing import Tuple

PACES = ("auto", "off")
ORDERS = ("hot", "ascending")
DEFAULT_TARGET = "2x"

_UNITS = {"ns": 1, "us": 1_000, "µs": 1_000, "ms": 1_000_000, "s": 1_000_000_000}
_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(x|ns|us|µs|ms|s)\s*$", re.I)


def parse_latency_target(text: "str | float | int") -> Tuple[int, int]:
    """``(factor in thousandths, 0)`` for ``"2x"``, ``(0, ns)`` for a time.

    Raises ValueError with a one-line message for anything else."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        text = f"{text}x"
    if not isinstance(text, str):
        raise ValueError(f"host latency target must be a factor like 2x or a time like 5ms, got {text!r}")
    m = _RE.match(text)
    if m is None:
        raise ValueError(f"host latency target must be a factor of the idle latency (2x, 1.5x) "
                         f"or a time (5ms, 800us), got {text!r}")
    value, unit = float(m.group(1)), m.group(2).lower()
    if unit == "x":
        if not 1.0 <= value <= 1000.0:
            raise ValueError(f"host latency target factor must be 1x to 1000x, got {text!r}")
        return int(round(value * 1000)), 0
    ns = int(round(value * _UNITS[unit]))
    if not 1_000 <= ns <= 60_000_000_000:
        raise ValueError(f"host latency target must be 1us to 60s, got {text!r}")
    return 0, ns


def normalize_latency_target(text: "str | float | int") -> str:
    """The canonical spelling (``"2x"``, ``"1.5x"``, ``"5ms"``, ``"800us"``)."""
    milli, ns = parse_latency_target(text)
    if milli:
        return f"{milli / 1000:g}x"
    for unit, scale in (("s", 1_000_000_000), ("ms", 1_000_000), ("us", 1_000)):
        if ns % scale == 0 or unit == "us":
            return f"{ns / scale:g}{unit}"
    raise AssertionError(ns)  # pragma: no cover


def check_choice(name: str, value: str, choices: Tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value
