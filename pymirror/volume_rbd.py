"""RBD volumes: a standard or a mirror that is an image in a Ceph cluster.

URI (docs/volumes.md)::

    rbd:POOL/IMAGE[@SNAP][?conf=PATH&id=CLIENT_ID&cluster=NAME&qd=N&timeout=SECONDS]

- ``conf``: the cluster's ceph.conf (default: librados's search,
  ``$CEPH_CONF`` then ``/etc/ceph/CLUSTER.conf``); ``id``: the client id
  (``client.ID``, default ``admin``); ``cluster``: the cluster name (``ceph``).
- ``qd``: requests kept in flight inside one read or write (1 to 256,
  default 8): a copier's batch is cut into that many librbd aio requests.
- ``timeout``: seconds before a stalled OSD or monitor fails a request
  instead of hanging (1 to 86400; default: what ceph.conf sets, else 30): the copy then pauses with the
  error, and ``resume`` goes on once the cluster answers again.
- ``@SNAP`` opens a snapshot, read-only.

The C core does the I/O (``csrc/store_rbd.c``) over librbd loaded at run
time: without it, :class:`~pymirror.errors.MissingLibraryError` says to
install the Debian package ``librbd1``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional
from urllib.parse import parse_qsl, quote, unquote

from . import errors
from ._native import check, ffi, lib
from .volume import DEFAULT_TRACK_SIZE, Volume, _check_track_size

__all__ = ["RbdURI", "parse", "is_rbd", "open_rbd", "create_image", "create_rbd", "available"]

SCHEME = "rbd:"
QUERY_KEYS = ("conf", "id", "cluster", "qd", "timeout")
QD_MAX = 256
TIMEOUT_MAX = 86400
# pool and image names: what Ceph allows minus the URI's own separators
_NAME = re.compile(r"[^/@?&=\s]+")


@dataclass(frozen=True)
class RbdURI:
    pool: str
    image: str
    snap: Optional[str] = None
    conf: Optional[str] = None
    id: Optional[str] = None
    cluster: Optional[str] = None
    qd: int = 0          # 0: the store's default
    timeout: int = 0     # 0: the store's default
    query: tuple[tuple[str, str], ...] = field(default=(), compare=False)

    def __str__(self) -> str:
        s = f"{SCHEME}{self.pool}/{self.image}" + (f"@{self.snap}" if self.snap else "")
        if self.query:
            s += "?" + "&".join(f"{k}={quote(v, safe='/:,.-_~')}" for k, v in self.query)
        return s

    @property
    def short(self) -> str:
        """``rbd:POOL/IMAGE[@SNAP]``, for messages."""
        return f"{SCHEME}{self.pool}/{self.image}" + (f"@{self.snap}" if self.snap else "")


def is_rbd(text: Any) -> bool:
    return isinstance(text, str) and text.startswith(SCHEME)


def parse(uri: str) -> RbdURI:
    """Parse an ``rbd:`` URI; ValueError with a one-line reason otherwise."""
    if not is_rbd(uri):
        raise ValueError(f"{uri!r} is not an RBD URI (rbd:POOL/IMAGE[@SNAP][?conf=...])")
    body, _, query = uri[len(SCHEME):].partition("?")
    if body.startswith("//"):
        raise ValueError(f"{uri}: write rbd:POOL/IMAGE, without '//'")
    pool, slash, rest = body.partition("/")
    image, at, snap = rest.partition("@")
    if not slash or not pool or not image:
        raise ValueError(f"{uri}: an RBD URI names a pool and an image: rbd:POOL/IMAGE[@SNAP]")
    for what, name in (("pool", pool), ("image", image)) + ((("snapshot", snap),) if at else ()):
        if not _NAME.fullmatch(name):
            raise ValueError(f"{uri}: bad {what} name {name!r}")
    pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=False) if query else []
    if query and not pairs:
        raise ValueError(f"{uri}: cannot read the query {query!r} (KEY=VALUE&...)")
    opts: dict[str, str] = {}
    for k, v in pairs:
        if k not in QUERY_KEYS:
            raise ValueError(f"{uri}: unknown option {k!r} (known: {', '.join(QUERY_KEYS)})")
        if k in opts:
            raise ValueError(f"{uri}: option {k!r} given twice")
        if not v:
            raise ValueError(f"{uri}: option {k!r} has no value")
        opts[k] = unquote(v)

    def number(key: str, hi: int) -> int:
        if key not in opts:
            return 0
        text = opts[key]
        if not text.isdigit() or not 1 <= int(text) <= hi:
            raise ValueError(f"{uri}: {key}={text} must be a whole number from 1 to {hi}")
        return int(text)

    return RbdURI(pool, image, snap if at else None, opts.get("conf"), opts.get("id"), opts.get("cluster"),
                  number("qd", QD_MAX), number("timeout", TIMEOUT_MAX), tuple(opts.items()))


def _c_config(u: RbdURI) -> tuple[Any, list[Any]]:
    """The C config and the buffers it points into (keep them alive)."""
    cfg = ffi.new("struct pm_rbd_config *")
    cfg.size = ffi.sizeof("struct pm_rbd_config")
    keep: list[Any] = []

    def s(text: Optional[str]) -> Any:
        if text is None:
            return ffi.NULL
        b = ffi.new("char[]", text.encode())
        keep.append(b)
        return b

    cfg.pool, cfg.image, cfg.snap = s(u.pool), s(u.image), s(u.snap)
    cfg.conf, cfg.id, cfg.cluster = s(u.conf), s(u.id), s(u.cluster)
    cfg.qd, cfg.timeout = u.qd, u.timeout
    return cfg, keep


def available() -> bool:
    """True when librbd can be loaded."""
    return lib.pm_rbd_available() == 0


def open_rbd(uri: "str | RbdURI", *, readonly: bool = False,
             track_size: int = DEFAULT_TRACK_SIZE) -> Volume:
    """Open an RBD image (or a snapshot, read-only) as a :class:`Volume`.
    Its ``path`` is the URI, which a pair records in its metadata file and
    reopens with."""
    _check_track_size(track_size)
    u = parse(uri) if isinstance(uri, str) else uri
    name = uri if isinstance(uri, str) else str(u)   # recorded as given
    cfg, keep = _c_config(u)
    out = ffi.new("pm_store **")
    flags = lib.PM_STORE_READONLY if readonly else 0
    check(lib.pm_store_open_rbd(cfg, name.encode(), flags, out), None, f"open volume {u.short}")
    del keep
    vol = Volume(ffi.gc(out[0], lib.pm_store_destroy), name, track_size)
    vol.kind = "rbd"
    return vol


def create_image(uri: "str | RbdURI", size: int) -> RbdURI:
    """Create an RBD image of ``size`` bytes (it must not exist)."""
    u = parse(uri) if isinstance(uri, str) else uri
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise errors.GeometryError(f"volume size must be a positive number of bytes, got {size!r}")
    if u.snap:
        raise ValueError(f"{u.short}: cannot create a snapshot; give rbd:POOL/IMAGE")
    cfg, keep = _c_config(u)
    rc = lib.pm_rbd_create(cfg, size)
    del keep
    if rc == -17:   # EEXIST
        raise FileExistsError(17, f"create volume {u.short}: the image already exists; "
                                  f"pymirror create never overwrites")
    check(rc, None, f"create volume {u.short}")
    return u


def create_rbd(uri: "str | RbdURI", size: int, *, track_size: int = DEFAULT_TRACK_SIZE) -> Volume:
    """Create an RBD image of ``size`` bytes and open it (``Volume.create``'s
    path for ``rbd:`` URIs)."""
    _check_track_size(track_size)
    u = create_image(uri, size)
    return open_rbd(u, track_size=track_size)
