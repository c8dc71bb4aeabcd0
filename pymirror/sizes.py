"""Parsing and printing sizes and rates ("64K", "1G", "8M/s")."""
from __future__ import annotations

import re

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_PATTERN = re.compile(r"^\s*(\d+)\s*([KMGTP]?)(I?B)?\s*(/S)?\s*$")


def parse_size(text: "str | int", what: str = "size") -> int:
    """``"64K"`` -> 65536.  Binary units (K = 1024); ``KiB``/``KB`` accepted.

    Raises ``ValueError`` with a message naming ``what`` for anything else.
    """
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"{what} must not be negative, got {text}")
        return text
    m = _PATTERN.match(str(text).upper())
    if m is None:
        raise ValueError(
            f"{what} {text!r} is not a size: use a whole number with an optional "
            "suffix K, M, G, T (powers of 1024), e.g. 64K or 1G"
        )
    return int(m.group(1)) * _UNITS[m.group(2)]


def format_size(n: float) -> str:
    """65536 -> ``"64.0 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def format_seconds(s: "float | None") -> str:
    if s is None or s != s or s == float("inf"):
        return "--:--"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"
