"""pymirror: keep a mirror of a block volume and restore the volume from it
while the host keeps using it.

    >>> import pymirror
    >>> pair = pymirror.Pair.memory(1 << 20, track_size=64 << 10)
    >>> pair.establish().wait()
    True
    >>> pair.split(); pair.state
    <State.SPLIT: 'split'>
"""
from __future__ import annotations

TYPE_CHECKING = False   # typing is not imported at run time: a command's start (docs/copier.md)

from .config import ConfigError, CopyConfig, Settings, load_settings
from .errors import (
    AlignmentError,
    BusyError,
    ClosedError,
    CorruptMetadataError,
    DaemonUnreachable,
    ForeignMetadataError,
    GeometryError,
    InUseError,
    JobError,
    JobPausedError,
    MirrorError,
    RangeError,
    ReadOnlyError,
    StateError,
)
from .errors import ChangedOutsideError, MetadataWarning  # branch metatrust
from .job import Job, Progress
from .pair import Pair
from .state import STATES, State
from .volume import Volume

if TYPE_CHECKING:  # pragma: no cover
    from typing import Any

    from .capi import get_include, get_library_dir
    from .tables import Bitmap, TrackTable
    from .service.client import connect


def __getattr__(name: str) -> Any:
    # The track-table classes need numpy, which costs more to import than
    # the rest of the package: load it only when someone asks (so the
    # command line starts fast).
    if name in ("Bitmap", "TrackTable"):
        from . import tables
        return getattr(tables, name)
    if name in ("get_include", "get_library_dir"):   # the C API's paths (pathlib): not for a command
        from . import capi
        return getattr(capi, name)
    if name == "connect":    # the daemon client (sockets, JSON): a third of the import otherwise
        from .service.client import connect
        return connect
    raise AttributeError(f"module 'pymirror' has no attribute {name!r}")

__version__ = "0.1.0"

__all__ = [
    "AlignmentError", "Bitmap", "BusyError", "DaemonUnreachable", "ClosedError", "ConfigError", "CopyConfig", "CorruptMetadataError",
    "ForeignMetadataError", "GeometryError", "InUseError", "Job", "JobError", "JobPausedError",
    "MirrorError", "Pair", "Progress", "RangeError", "ReadOnlyError", "STATES", "Settings", "State",
    "StateError", "TrackTable", "Volume",
    "connect", "get_include", "get_library_dir", "load_settings", "__version__",
]
__all__ += ["ChangedOutsideError", "MetadataWarning"]  # branch metatrust

