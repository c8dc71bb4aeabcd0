"""Volume URIs: one way to name a volume in the Python API, the command line
and the metadata (docs/volumes.md).

- a plain path, or ``file:PATH`` / ``file:///PATH``: a file or block device;
- ``nbd://HOST[:PORT]/EXPORT``, ``nbd+unix:///EXPORT?socket=PATH`` (and the
  TLS forms ``nbds://``, ``nbds+unix://``): an export of any NBD server,
  through libnbd (loaded at run time), with pymirror's own parameters
  ``qd=N`` (requests in flight per I/O), ``conns=N`` (connections) and
  ``timeout=S`` (seconds of silence before an I/O fails);
- ``rbd:POOL/IMAGE[@SNAP][?conf=...&id=...&cluster=...]``: a Ceph RBD image,
  opened by :mod:`pymirror.volume_rbd` (``open_rbd(uri, readonly=...,
  track_size=...)`` and ``create_rbd(uri, size, track_size=...)``).

A pair's metadata records each volume as :attr:`VolumeURI.text` (an absolute
path for files, the URI as given for the others), and :meth:`Pair.open
<pymirror.Pair.open>` reopens the volumes from it.
"""
from __future__ import annotations

import importlib
import os
import re

from . import errors

# No typing nor dataclasses at run time (docs/copier.md, "The command's start and end").
TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from dataclasses import dataclass as record
    from typing import Any, Optional
else:
    from ._record import record
if TYPE_CHECKING:  # pragma: no cover
    from .volume import Volume

__all__ = ["VolumeURI", "VolumeURIError", "parse", "open_volume", "create_volume", "NBD_SCHEMES"]

NBD_SCHEMES = ("nbd", "nbds", "nbd+unix", "nbds+unix", "nbd+vsock", "nbds+vsock")
#: pymirror's own query parameters of an NBD URI: (lowest, highest)
NBD_PARAMS = {"qd": (1, 64), "conns": (1, 16), "timeout": (0, 86400)}
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_KNOWN = ("file", "rbd") + NBD_SCHEMES
#: how each kind of volume can tell changes made behind pymirror's back
OUTSIDE_CHANGES = {
    "file": True, "memory": False, "nbd": False, "rbd": False,
}


class VolumeURIError(errors.MirrorError, ValueError):
    """A volume name that is not a path nor a URI pymirror knows."""


@record(frozen=True)
class VolumeURI:
    """A parsed volume name.  ``kind`` is ``"file"``, ``"nbd"`` or ``"rbd"``;
    ``text`` is what a pair's metadata records; ``path`` the file's absolute
    path (files only)."""

    kind: str
    text: str
    path: Optional[str] = None

    @property
    def remote(self) -> bool:
        return self.kind != "file"


def _nbd(text: str) -> VolumeURI:
    from urllib.parse import parse_qsl, unquote, urlsplit  # only for URIs: a path costs no import

    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme.endswith("+unix"):
        params = dict(parse_qsl(parts.query, keep_blank_values=True))
        if parts.netloc:
            raise VolumeURIError(f"{text}: an nbd+unix URI has no host (nbd+unix:///EXPORT?socket=PATH)")
        if not params.get("socket"):
            raise VolumeURIError(f"{text}: an nbd+unix URI needs ?socket=PATH (nbd+unix:///EXPORT?socket=PATH)")
    elif scheme.endswith("+vsock"):
        if not parts.netloc:
            raise VolumeURIError(f"{text}: an nbd+vsock URI needs a CID (nbd+vsock://CID[:PORT]/EXPORT)")
    elif not parts.hostname:
        raise VolumeURIError(f"{text}: an nbd URI needs a host (nbd://HOST[:PORT]/EXPORT)")
    try:
        parts.port
    except ValueError:
        raise VolumeURIError(f"{text}: the port is not a number from 1 to 65535") from None
    seen: set[str] = set()
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key not in NBD_PARAMS:
            continue
        if key in seen:
            raise VolumeURIError(f"{text}: {key}= is given twice")
        seen.add(key)
        lo, hi = NBD_PARAMS[key]
        if not value.isdigit() or not lo <= int(value) <= hi:
            raise VolumeURIError(f"{text}: {key}={value} must be a whole number from {lo} to {hi}")
    return VolumeURI("nbd", text)


def _file(text: str, raw: str) -> VolumeURI:
    if not text:
        raise VolumeURIError(f"{raw!r}: the path is empty")
    path = os.path.abspath(os.path.expanduser(text))
    return VolumeURI("file", path, path)


def parse(value: "str | os.PathLike[str]") -> VolumeURI:
    """Parse a volume name: a path, or a URI of a known scheme.  A name
    whose prefix before ``:`` is not a known scheme is a path (file names
    may hold colons); ``xyz://...`` of an unknown scheme is an error."""
    if isinstance(value, bytes):
        return _file(os.fsdecode(value), os.fsdecode(value))
    if not isinstance(value, str):
        if not isinstance(value, os.PathLike):
            raise TypeError(f"a volume is named by a path or a URI string, got {type(value).__name__}")
        return _file(os.fspath(value), os.fspath(value))
    m = _SCHEME.match(value)
    scheme = m.group(1).lower() if m else ""
    if scheme == "file":
        rest = value[len(m.group(0)):] if m else value
        if rest.startswith("//"):
            from urllib.parse import unquote, urlsplit

            parts = urlsplit(value)
            if parts.netloc not in ("", "localhost"):
                raise VolumeURIError(f"{value}: a file URI names a local file (file:///PATH)")
            return _file(unquote(parts.path), value)
        return _file(rest, value)
    if scheme in NBD_SCHEMES:
        return _nbd(value)
    if scheme == "rbd":
        rest = value[4:]
        name = rest.split("?", 1)[0]
        if "/" not in name or name.startswith("/") or name.split("/", 1)[1].split("@", 1)[0] == "":
            raise VolumeURIError(f"{value}: an RBD volume is rbd:POOL/IMAGE[@SNAP][?conf=...&id=...&cluster=...]")
        return VolumeURI("rbd", value)
    if m and value[len(m.group(0)):].startswith("//"):
        raise VolumeURIError(f"{value}: unknown volume scheme {scheme!r}; known: a path, "
                             f"{', '.join(s + ':' for s in _KNOWN)}")
    return _file(value, value)


def _rbd_module() -> Any:
    try:
        return importlib.import_module("pymirror.volume_rbd")
    except ModuleNotFoundError as exc:
        if exc.name != "pymirror.volume_rbd":
            raise
        raise errors.MissingLibraryError(
            "RBD volumes are not available in this build of pymirror (pymirror.volume_rbd is missing)"
        ) from None


def open_volume(value: "str | os.PathLike[str]", *, readonly: bool = False,
                track_size: int) -> "Volume":
    """Open the volume a path or URI names (see :func:`parse`)."""
    from ._native import check, ffi, fspath, lib
    from .volume import Volume

    u = parse(value)
    if u.kind == "rbd":
        return _rbd_module().open_rbd(u.text, readonly=readonly, track_size=track_size)  # type: ignore[no-any-return]
    out = ffi.new("pm_store **")
    flags = lib.PM_STORE_READONLY if readonly else 0
    if u.kind == "nbd":
        check(lib.pm_store_open_nbd(u.text.encode(), flags, out), None, f"open volume {u.text}")
    else:
        assert u.path is not None
        check(lib.pm_store_open_file(fspath(u.path), flags, 0, out), u.path, f"open volume {u.path}")
    vol = Volume(ffi.gc(out[0], lib.pm_store_destroy), u.text, track_size)
    vol.kind = u.kind
    return vol


def create_volume(value: "str | os.PathLike[str]", size: int, *, track_size: int) -> "Volume":
    """Create a new volume of ``size`` bytes: a sparse file, or an RBD image.
    An NBD export is made by its server, not by pymirror."""
    from ._native import check, ffi, fspath, lib
    from .volume import Volume

    u = parse(value)
    if u.kind == "nbd":
        raise VolumeURIError(f"{u.text}: pymirror cannot create an NBD export; its server makes it "
                             f"(qemu-nbd, nbdkit, qemu-storage-daemon)")
    if u.kind == "rbd":
        return _rbd_module().create_rbd(u.text, size, track_size=track_size)  # type: ignore[no-any-return]
    assert u.path is not None
    out = ffi.new("pm_store **")
    check(lib.pm_store_open_file(fspath(u.path), lib.PM_STORE_CREATE, size, out), u.path,
          f"create volume {u.path}")
    vol = Volume(ffi.gc(out[0], lib.pm_store_destroy), u.path, track_size)
    vol.kind = "file"
    return vol
