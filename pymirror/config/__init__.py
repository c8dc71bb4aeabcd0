"""Copy settings and the configuration file.

Settings come, lowest priority first, from the built-in defaults, the
configuration file, and explicit arguments.  The file is TOML with one
``[pymirror]`` table::

    [pymirror]
    track_size = "64K"
    copiers = "auto"      # or a number of threads, 1 to 64
    batch_size = "auto"   # or a size, e.g. "4M"
    rate = "0"            # bytes per second, 0 = unlimited
    read_policy = "redirect"   # or "hydrate"
    retries = 3
    pace = "auto"              # or "off": latency-aware pacing (docs/arbitration.md)
    host_latency_target = "2x" # a factor of the idle latency, or a time ("5ms")
    order = "hot"              # or "ascending": tracks the host uses first

It is found by the first of: ``--config PATH`` (CLI) or ``config_path``
(API), the environment variable ``PYMIRROR_CONFIG``, then
``$XDG_CONFIG_HOME/pymirror/config.toml`` (``~/.config/pymirror/config.toml``).

``python -m pymirror.config --cflags --libs`` prints the flags of the C
library instead (see :mod:`pymirror.capi`).
"""
from __future__ import annotations

import os
import sys

from ..errors import MirrorError
from ..sizes import parse_size

# No typing nor dataclasses at run time: a command's copy starts after this
# module loads (docs/copier.md, "The command's start and end").
TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from dataclasses import dataclass as record
    from pathlib import Path
    from typing import Any, Mapping
else:
    from .._record import record

READ_POLICIES = ("redirect", "hydrate")
TRACK_SIZE_MIN = 4096
TRACK_SIZE_MAX = 16 << 20


class ConfigError(MirrorError, ValueError):
    """A configuration file or setting is invalid."""


@record(frozen=True)
class CopyConfig:
    """How a background copy runs.

    copiers: copier threads, 0 (the default) to let the core choose from the
    volumes (2 for files and block devices, 4 for remote stores).
    batch_size: the largest copy I/O in bytes (a multiple of the track size
    is used), 0 (the default) to let the core choose (4 MiB); see
    docs/copier.md.  rate: bytes per second, 0 for no limit.  retries:
    attempts per failing track before the job pauses.  read_policy:
    ``"redirect"`` serves a read of a not-yet-restored track from the
    source; ``"hydrate"`` copies the track first.  pace: ``"auto"`` keeps
    the host's p99 latency within ``host_latency_target`` (a factor of its
    idle latency, ``"2x"``, or a time, ``"5ms"``) while using the bandwidth
    left; ``"off"`` copies at full speed (``rate`` caps both).  order:
    ``"hot"`` copies tracks the host uses first, ``"ascending"`` in order.
    See :mod:`pymirror.pace`.
    """

    copiers: int = 0
    batch_size: int = 0
    rate: int = 0
    retries: int = 3
    read_policy: str = "redirect"
    pace: str = "auto"
    host_latency_target: str = "2x"
    order: str = "hot"

    def __post_init__(self) -> None:
        from ..pace import ORDERS, PACES, check_choice, normalize_latency_target

        try:
            check_choice("pace", self.pace, PACES)
            check_choice("order", self.order, ORDERS)
            object.__setattr__(self, "host_latency_target", normalize_latency_target(self.host_latency_target))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if not 0 <= self.copiers <= 64:
            raise ConfigError(f"copiers must be between 1 and 64 (0 = auto), got {self.copiers}")
        if self.batch_size != 0 and not 4096 <= self.batch_size <= 256 << 20:
            raise ConfigError(f"batch_size must be between 4K and 256M (0 = auto), got {self.batch_size}")
        if self.rate < 0:
            raise ConfigError(f"rate must not be negative, got {self.rate}")
        if not 1 <= self.retries <= 100:
            raise ConfigError(f"retries must be between 1 and 100, got {self.retries}")
        if self.read_policy not in READ_POLICIES:
            raise ConfigError(
                f"read_policy must be one of {', '.join(READ_POLICIES)}, got {self.read_policy!r}"
            )

    def replace(self, **changes: Any) -> "CopyConfig":
        d = dict(self.__dict__)     # the fields (records keep nothing else there)
        d.update((k, v) for k, v in changes.items() if v is not None)
        return type(self)(**d)


@record(frozen=True)
class Settings:
    """Defaults read from the configuration file."""

    track_size: int = 64 << 10
    copy: CopyConfig = CopyConfig()
    source: "str | None" = None  # the file they came from

    def __post_init__(self) -> None:
        ts = self.track_size
        if ts & (ts - 1) or not TRACK_SIZE_MIN <= ts <= TRACK_SIZE_MAX:
            raise ConfigError(f"track_size must be a power of two from 4K to 16M, got {ts}")


def _default_config_name() -> str:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "pymirror", "config.toml")


def default_config_path() -> "Path":
    from pathlib import Path  # here: pathlib costs a command's start more than it saves

    return Path(_default_config_name())


def find_config(explicit: "str | os.PathLike[str] | None" = None) -> "Path | None":
    """The configuration file to use, or None.  An explicit path must exist."""
    env = os.environ.get("PYMIRROR_CONFIG")
    if explicit is None and not env and not os.path.isfile(_default_config_name()):
        return None     # the usual case: no file, and no pathlib import (a command's start)
    from pathlib import Path

    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigError(f"configuration file {str(path)!r} does not exist")
        return path
    if env:
        path = Path(env)
        if not path.is_file():
            raise ConfigError(f"PYMIRROR_CONFIG names {env!r}, which does not exist")
        return path
    path = default_config_path()
    return path if path.is_file() else None


_KEYS = {"track_size", "copiers", "batch_size", "rate", "retries", "read_policy", "pace",
         "host_latency_target", "order"}


def _auto(name: str, value: Any, convert: Any) -> int:
    """0 for "auto" (the core chooses), else the converted value (which
    must not be 0 in a file: "auto" says it)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return 0
    n = int(convert(value))
    if n == 0:
        raise ConfigError(f"{name} = 0 is not valid; write {name} = \"auto\" to let pymirror choose")
    return n


def settings_from_mapping(data: Mapping[str, Any], source: "str | None" = None) -> Settings:
    where = f" in {source}" if source else ""
    unknown = set(data) - _KEYS
    if unknown:
        raise ConfigError(
            f"unknown setting{'s' if len(unknown) > 1 else ''} {', '.join(sorted(unknown))}{where}; "
            f"known: {', '.join(sorted(_KEYS))}"
        )
    try:
        copy = CopyConfig(
            copiers=_auto("copiers", data.get("copiers", "auto"), int),
            batch_size=_auto("batch_size", data.get("batch_size", "auto"), lambda v: parse_size(v, "batch_size")),
            rate=parse_size(data.get("rate", 0), "rate"),
            retries=int(data.get("retries", 3)),
            read_policy=str(data.get("read_policy", "redirect")),
            pace=str(data.get("pace", "auto")),
            host_latency_target=data.get("host_latency_target", "2x"),
            order=str(data.get("order", "hot")),
        )
        return Settings(
            track_size=parse_size(data.get("track_size", 64 << 10), "track_size"),
            copy=copy,
            source=source,
        )
    except ConfigError as exc:
        raise ConfigError(f"{exc}{where}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{exc}{where}") from None


def load_settings(explicit: "str | os.PathLike[str] | None" = None) -> Settings:
    """Settings from the configuration file found by :func:`find_config`."""
    path = find_config(explicit)
    if path is None:
        return Settings()
    # imported here: most commands run without a configuration file
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    table = doc.get("pymirror", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [pymirror] must be a table")
    extra = set(doc) - {"pymirror"}
    if extra:
        raise ConfigError(f"{path}: unknown table(s) {', '.join(sorted(extra))}; only [pymirror]")
    return settings_from_mapping(table, str(path))
