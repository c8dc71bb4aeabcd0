"""pymirror: keep a mirror of a block volume and restore the volume from it
while the host keeps using it.

    >>> import pymirror
    >>> pair = pymirror.Pair.memory(1 << 20, track_size=64 << 10)
    >>> pair.establish().wait()
    True
    >>> pair.split(); pair.state
    'split'
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import ConfigError, CopyConfig, Settings, load_settings
from .errors import (
    AlignmentError,
    ClosedError,
    CorruptMetadataError,
    ForeignMetadataError,
    GeometryError,
    JobError,
    MirrorError,
    RangeError,
    ReadOnlyError,
    StateError,
)
from .job import Job, Progress
from .pair import STATES, Pair
from .volume import Volume

if TYPE_CHECKING:
    from .tables import Bitmap, TrackTable


def __getattr__(name: str) -> Any:
    # The track-table classes need numpy, which costs more to import than
    # the rest of the package: load it only when someone asks (so the
    # command line starts fast).
    if name in ("Bitmap", "TrackTable"):
        from . import tables
        return getattr(tables, name)
    raise AttributeError(f"module 'pymirror' has no attribute {name!r}")

__version__ = "0.1.0"

__all__ = [
    "AlignmentError", "Bitmap", "ClosedError", "ConfigError", "CopyConfig", "CorruptMetadataError",
    "ForeignMetadataError", "GeometryError", "Job", "JobError", "MirrorError", "Pair",
    "Progress", "RangeError", "ReadOnlyError", "STATES", "Settings", "StateError", "TrackTable", "Volume",
    "load_settings", "__version__",
]

