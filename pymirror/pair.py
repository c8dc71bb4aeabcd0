"""Pairs: a standard volume, its mirror, their track tables and state.

See docs/states.md for the state machine and invariants.  The C core owns
the state machine (its transitions at the end of a copy happen on a copier
thread, atomically with host I/O arbitration); this module owns the policy
around it: which volumes, which settings, when to commit, and the Python
shapes of the calls.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import warnings
import weakref
from types import TracebackType

from . import errors
from ._handle import Handle, destroy_keeping
from ._native import check, ffi, fspath, lib, raise_for
from .config import CopyConfig
from .job import Job, Progress, read_progress
from .state import STATES, State
from .volume import DEFAULT_TRACK_SIZE, Volume, check_io

# typing is not imported at run time: a command's start (docs/copier.md)
TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Callable, Iterator, Optional, Type, Union

    from .plan import Plan

    PathLike = Union[str, "os.PathLike[str]"]
__all__ = ["Pair", "State", "STATES", "peek", "track_counts"]



_SIDE = {lib.PM_STANDARD: "the standard", lib.PM_MIRROR: "the mirror"}


def _c_config(cfg: CopyConfig, track_size: int) -> Any:
    c = ffi.new("struct pm_copy_config *")
    lib.pm_copy_config_init(c, ffi.sizeof("struct pm_copy_config"))
    c.copiers = cfg.copiers
    c.batch_bytes = max(track_size, cfg.batch_size // track_size * track_size) if cfg.batch_size else 0
    c.rate_bytes = cfg.rate
    c.retries = cfg.retries
    c.read_policy = lib.PM_READ_HYDRATE if cfg.read_policy == "hydrate" else lib.PM_READ_REDIRECT
    _pace_fields(c, cfg)
    return c


def _pace_fields(c: Any, cfg: CopyConfig) -> None:
    """The 0.3 fields (pymirror.pace): pacing, order, host latency target."""
    from .pace import parse_latency_target

    c.pace = lib.PM_PACE_OFF if cfg.pace == "off" else lib.PM_PACE_AUTO
    c.order = lib.PM_ORDER_ASCENDING if cfg.order == "ascending" else lib.PM_ORDER_HOT
    milli, ns = parse_latency_target(cfg.host_latency_target)
    c.latency_factor_milli = milli or 2000
    c.latency_target_ns = ns


def _as_volume(v: "PathLike | Volume", track_size: int, role: str) -> tuple[Volume, bool]:
    """(volume, owned): open a path, or use a Volume the caller owns."""
    if isinstance(v, Volume):
        return v, False
    if not isinstance(v, (str, os.PathLike)):
        raise TypeError(f"{role} must be a path, a volume URI or a Volume, got {type(v).__name__}")
    return Volume.open(v, track_size=track_size), True


def _new_pair(build: Any, std: Volume, mir: Volume) -> Any:
    """Run ``build(std_ptr, mir_ptr, out)`` with both volumes held open, and
    return the new pair's gc pointer; its destructor keeps both stores
    alive until it has run (whatever order the garbage collector takes)."""
    out = ffi.new("pm_pair **")
    with std._call as sp, mir._call as mp:
        build(sp, mp, out)
        return ffi.gc(out[0], destroy_keeping(lib.pm_pair_destroy, std._cptr, mir._cptr))


#: Pairs not yet closed: closed in order at interpreter exit (see _close_at_exit).
_open_pairs: "weakref.WeakSet[Pair]" = weakref.WeakSet()


@atexit.register
def _close_at_exit() -> None:
    """Close every pair still open when the interpreter exits, while the
    interpreter is whole: the copier stops, the metadata is committed (a job
    stays resumable), and only then are the volumes closed.  Left to the
    garbage collector at shutdown, a pair and its volumes may be finalised
    in any order."""
    for pair in list(_open_pairs):
        try:
            pair.close()
        except Exception:   # exit goes on; the metadata stays recoverable
            pass


class Pair(Handle):
    """A standard volume and its mirror.  Thread-safe: many threads may do
    host I/O at once (the C core releases the GIL and arbitrates per track).

    Build one with :meth:`create`, :meth:`open` or :meth:`memory`.
    ``close()`` waits for calls in flight; a :meth:`Job.wait` in progress
    then raises :class:`~pymirror.errors.ClosedError`, and so does any later
    call.  The pair's volumes cannot be closed before it.
    """

    def __init__(self, ptr: Any, standard: Volume, mirror: Volume, owned: list[Volume],
                 meta_path: Optional[str], config: CopyConfig) -> None:
        self._init_handle(ptr, f"the pair {meta_path}" if meta_path else "the memory pair")
        self._name = meta_path or "memory pair"
        self.standard = standard
        self.mirror = mirror
        self._owned = owned
        self.meta_path = meta_path
        self._config = config
        _open_pairs.add(self)
        try:
            self._borrow_from(standard)
            self._borrow_from(mirror)
        except BaseException:
            self._release_borrows()
            raise
        self.size: int = lib.pm_pair_size(ptr)
        self.track_size: int = lib.pm_pair_track_size(ptr)
        self._job_kind = "restore" if self.state == "restoring" else "establish"

    # -- constructors -------------------------------------------------------
    @classmethod
    def create(cls, meta: Optional[PathLike], standard: "PathLike | Volume",
               mirror: "PathLike | Volume", *, track_size: Optional[int] = None,
               config: Optional[CopyConfig] = None) -> "Pair":
        """A new pair in state ``"new"``.  ``meta`` is the metadata file to
        create (it must not exist), or None for a pair kept only in memory.
        ``standard`` and ``mirror`` are paths, volume URIs (``nbd://...``,
        ``nbd+unix:///EXPORT?socket=...``, ``rbd:POOL/IMAGE``; see
        docs/volumes.md) or :class:`Volume` objects of the same size; the
        metadata records each path or URI, and :meth:`open` reopens by it.  The track size defaults to the standard Volume's (64 KiB
        for a path)."""
        if track_size is None:
            track_size = standard.track_size if isinstance(standard, Volume) else DEFAULT_TRACK_SIZE
        owned: list[Volume] = []
        try:
            std, own = _as_volume(standard, track_size, "standard")
            if own:
                owned.append(std)
            mir, own = _as_volume(mirror, track_size, "mirror")
            if own:
                owned.append(mir)
            if std.kind == mir.kind == "file" and std.path is not None and mir.path is not None and \
                    os.path.realpath(std.path) == os.path.realpath(mir.path):
                raise errors.GeometryError(f"the standard and the mirror are the same file: {std.path}")
            if meta is None:
                return cls._assemble(lambda sp, mp, out: check(
                    lib.pm_pair_create(sp, mp, track_size, out), None, "create a memory pair"),
                    std, mir, owned, None, config)
            if std.path is None or mir.path is None:
                raise TypeError("a pair with a metadata file needs file-backed volumes")
            meta_path = os.fspath(meta)
            return cls._assemble(lambda sp, mp, out: check(
                lib.pm_pair_create_meta(fspath(meta_path), sp, mp, track_size, out),
                meta_path, f"create pair {meta_path}"), std, mir, owned, meta_path, config)
        except BaseException:
            for v in owned:
                v.close()
            raise

    @classmethod
    def open(cls, meta: PathLike, *, config: Optional[CopyConfig] = None) -> "Pair":
        """Open a pair from its metadata file.  A pair that was syncing or
        restoring comes back in that state with its job paused: host I/O is
        arbitrated at once; :meth:`resume` continues the copy."""
        meta_path = os.fspath(meta)
        info = ffi.new("struct pm_meta_info *")
        check(lib.pm_meta_peek(fspath(meta_path), info), meta_path, f"open pair {meta_path}")
        ts = int(info.track_size)
        std_path = os.fsdecode(ffi.string(info.standard_path))
        mir_path = os.fsdecode(ffi.string(info.mirror_path))
        from .uri import parse as _parse_volume

        for role, path in (("standard", std_path), ("mirror", mir_path)):
            u = _parse_volume(path)     # a remote volume (nbd:, rbd:) is checked by opening it
            if u.kind == "file" and not os.path.lexists(u.path or path):
                import errno as _errno
                raise errors.VolumeMissingError(
                    _errno.ENOENT, f"open pair {meta_path}: its {role} volume {path} does not exist; if the "
                    f"volumes moved: pymirror pair {meta_path} --relocate --standard NEW --mirror NEW", path)
        return cls._open_with(meta_path, std_path, mir_path, ts, lib.pm_pair_open_meta, "open", config)

    @classmethod
    def relocate(cls, meta: PathLike, standard: PathLike, mirror: PathLike, *,
                 config: Optional[CopyConfig] = None) -> "Pair":
        """Open a pair whose volumes moved (a folder renamed, copied to
        another disk): ``standard`` and ``mirror`` replace the paths in the
        metadata once they are shown to be the same volumes (the same size,
        and the checksums of a sample of tracks recorded when the pair was
        last closed cleanly); :class:`ForeignMetadataError` names the first
        mismatch, and nothing is changed then.  The new paths are committed
        before this returns."""
        meta_path = os.fspath(meta)
        info = ffi.new("struct pm_meta_info *")
        check(lib.pm_meta_peek(fspath(meta_path), info), meta_path, f"relocate pair {meta_path}")
        return cls._open_with(meta_path, standard, mirror, int(info.track_size), lib.pm_pair_relocate_meta,
                              "relocate", config, distinct=True)

    @classmethod
    def _open_with(cls, meta_path: str, standard: Any, mirror: Any, ts: int, c_open: Any, verb: str,
                   config: Optional[CopyConfig], distinct: bool = False) -> "Pair":
        """Open both volumes and build the pair with ``c_open`` (the C open
        or relocate); the volumes are closed again if anything fails."""
        owned: list[Volume] = []
        try:
            std = Volume.open(standard, track_size=ts)
            owned.append(std)
            mir = Volume.open(mirror, track_size=ts)
            owned.append(mir)
            if distinct and std.path is not None and mir.path is not None and \
                    os.path.realpath(std.path) == os.path.realpath(mir.path):
                raise errors.GeometryError(f"the standard and the mirror are the same file: {std.path}")
            pair = cls._assemble(lambda sp, mp, out: check(
                c_open(fspath(meta_path), sp, mp, out),
                meta_path, f"{verb} pair {meta_path}"), std, mir, owned, meta_path, config)
        except BaseException:
            for v in owned:
                v.close()
            raise
        # what the open's locked read of the header found (the unlocked peek
        # may catch another process's commit half written)
        _warn_metadata(_metadata_warning())
        pair._configure(pair._config)
        return pair

    @classmethod
    def _assemble(cls, build: Any, std: Volume, mir: Volume, owned: list[Volume],
                  meta_path: Optional[str], config: Optional[CopyConfig]) -> "Pair":
        ptr = _new_pair(build, std, mir)
        try:
            return cls(ptr, std, mir, owned, meta_path, config or CopyConfig())
        except BaseException:
            ffi.release(ptr)   # before the caller closes the volumes it uses
            raise

    @classmethod
    def memory(cls, size: int, track_size: int = DEFAULT_TRACK_SIZE, *,
               config: Optional[CopyConfig] = None) -> "Pair":
        """A pair of two zero-filled in-memory volumes (tests, experiments)."""
        std = Volume.memory(size, track_size)
        mir = Volume.memory(size, track_size)
        pair = cls.create(None, std, mir, track_size=track_size, config=config)
        pair._owned = [std, mir]
        return pair

    # -- the guarded calls (the only way this class reaches C) -------------
    def _run(self, op: str, fn: Any, *args: Any) -> int:
        """``fn(pair_ptr, *args)`` as one call in flight; a negative result
        raises the matching error, its message naming ``op`` and the pair."""
        with self._call as p:
            rc = fn(p, *args)
        if rc < 0:
            raise_for(rc, self.meta_path, f"{op} {self._name}")
        return int(rc)

    @property
    def _inflight(self) -> Any:
        """``with self._inflight:`` around a call that uses :attr:`_p`
        (the older spelling of ``with self._call as p:``)."""
        return self._call

    @property
    def _p(self) -> Any:
        """The C pointer; use it only inside ``with self._inflight:``."""
        return self._ptr_or_raise()

    def _progress_struct(self) -> Any:
        """A ``struct pm_progress`` filled now (for :func:`read_progress`)."""
        out = ffi.new("struct pm_progress *")
        out.size = ffi.sizeof("struct pm_progress")   # every field this header knows (0.3 too)
        self._run("progress", lib.pm_pair_progress, out)
        return out

    @staticmethod
    def _error_name(code: int) -> str:
        if -4096 < code < 0:           # an errno (a remote store's "Connection refused"), not "system error"
            return os.strerror(-code)
        return str(ffi.string(lib.pm_strerror(code)).decode())

    def _job_wait(self, timeout_ms: int) -> bool:
        """One slice of ``Job.wait``: True when no job is left, False when
        ``timeout_ms`` passed; JobError when the job is paused on an error."""
        with self._call as p:
            rc = lib.pm_pair_wait(p, timeout_ms)
        if rc == lib.PM_E_TIMEDOUT:
            return False
        if rc < 0:
            raise_for(rc, self.meta_path, f"wait for {self._name}")
        return True

    def _job_pause(self) -> None:
        self._run("pause", lib.pm_pair_pause)

    def _job_set_rate(self, rate: int) -> None:
        self._run("set the rate of", lib.pm_pair_set_rate, rate)

    # -- state --------------------------------------------------------------
    @property
    def state(self) -> State:
        """A :class:`State`, equal to one of the strings ``new, syncing,
        established, split, restoring, restored, detached``."""
        with self._call as p:
            code = lib.pm_pair_state(p)
        return State.from_code(code)

    @property
    def tracks(self) -> int:
        return -(-self.size // self.track_size)

    @property
    def mirror_writable(self) -> bool:
        """True when the host may write the mirror (split or restored)."""
        return self.state in ("split", "restored")

    @property
    def config(self) -> CopyConfig:
        return self._config

    @property
    def progress(self) -> Progress:
        return read_progress(self)

    @property
    def job(self) -> Optional[Job]:
        """The copy job in progress (running or paused), or None."""
        return Job(self, self._job_kind) if self.progress.running else None

    def _configure(self, cfg: CopyConfig) -> None:
        self._config = cfg
        self._run("configure", lib.pm_pair_configure, _c_config(cfg, self.track_size))

    # -- commands -----------------------------------------------------------
    def establish(self, incremental: bool = False, config: Optional[CopyConfig] = None, *,
                  assume_equal: bool = False, compare: bool = False, trust: bool = False) -> Job:
        """Copy the standard to the mirror (every track, or with ``incremental``
        only the tracks changed on either side since the split); host writes
        are mirrored from now on.  Returns at once with the copy's Job; the
        pair is ``established`` when it is done.

        ``assume_equal`` (a new pair only) skips the copy for two volumes you
        know are identical, such as two freshly created (all-zero) images.

        ``compare`` copies only the tracks whose bytes differ, found by
        comparing the two sides first (for when the tables are lost or not
        trusted; docs/compare.md): the job's progress shows the compare
        phase (``comparing``, ``tracks_compared``, ``tracks_equal``).

        An incremental establish is refused with
        :class:`~pymirror.errors.ChangedOutsideError` when a volume was
        changed outside pymirror since the pair was last closed
        (:meth:`volume_trust`); ``trust=True`` accepts the tables anyway."""
        cfg = config or self._config
        _check_compare_args(compare, incremental, assume_equal)
        if trust:
            self.trust()
        if compare:
            self._run("establish --compare", lib.pm_pair_establish_compare, _c_config(cfg, self.track_size))
        elif assume_equal:
            if incremental:
                raise ValueError("assume_equal and incremental cannot be combined")
            self._run("establish", lib.pm_pair_assume_established)
        else:
            self._run("establish", lib.pm_pair_establish, bool(incremental), _c_config(cfg, self.track_size))
        self._config, self._job_kind = cfg, "establish"
        return Job(self, "establish")

    def plan_establish(self, incremental: bool = False) -> "Plan":
        """What :meth:`establish` would do now, changing nothing (see
        :mod:`pymirror.plan`).  Raises what establish would raise for the state."""
        from .plan import plan
        return plan(self, "establish", incremental)

    def plan_restore(self, incremental: bool = False, protect: bool = True) -> "Plan":
        """What :meth:`restore` would do now, changing nothing (see
        :mod:`pymirror.plan`).  Raises what restore would raise for the state."""
        from .plan import plan
        return plan(self, "restore", incremental, protect)

    def split(self) -> None:
        """Make the mirror an independent volume (instant).  Both sides start
        recording the tracks written from now on."""
        self._run("split", lib.pm_pair_split)

    def restore(self, incremental: bool = False, protect: bool = True,
                config: Optional[CopyConfig] = None, *, compare: bool = False, trust: bool = False) -> Job:
        """Restore the standard from the mirror, while the host keeps using
        the standard.  Returns at once, before any data is copied.

        incremental: copy only the tracks changed on either side since the
        split.  protect: keep the mirror write-disabled and unchanged for the
        whole restore (the pair ends ``restored``); without it, host writes are
        mirrored and the pair ends ``established``.  compare: copy only the
        tracks whose bytes differ, found by comparing the sides first
        (docs/compare.md).  trust: as for :meth:`establish`, accept the
        tables although a volume was changed outside pymirror."""
        cfg = config or self._config
        _check_compare_args(compare, incremental)
        if trust:
            self.trust()
        if compare:
            self._run("restore --compare", lib.pm_pair_restore_compare, bool(protect),
                      _c_config(cfg, self.track_size))
        else:
            self._run("restore", lib.pm_pair_restore, bool(incremental), bool(protect),
                      _c_config(cfg, self.track_size))
        self._config, self._job_kind = cfg, "restore"
        return Job(self, "restore")

    def resume(self, config: Optional[CopyConfig] = None) -> Job:
        """Continue a job that is paused (by request, by an error, or because
        the pair was reopened mid-copy)."""
        if config is not None:
            self._configure(config)
        if not read_progress(self).running:
            raise errors.StateError(f"resume {self._name}: the pair is {self.state}; there is no copy to resume")
        self._run("resume", lib.pm_pair_resume)
        return Job(self, self._job_kind)

    # -- host I/O -----------------------------------------------------------
    def _readinto(self, side: int, offset: int, buf: Any) -> None:
        mv = memoryview(buf)
        if mv.readonly:
            raise TypeError("readinto needs a writable buffer")
        check_io(offset, mv.nbytes, self.size)
        with self._call as p:
            rc = lib.pm_pair_read(p, side, ffi.from_buffer(mv), mv.nbytes, offset)
        if rc < 0:
            raise_for(rc, self.meta_path, f"read {_SIDE[side]} of {self._name}")

    def _write(self, side: int, offset: int, data: Any, fua: bool) -> None:
        mv = memoryview(data)
        check_io(offset, mv.nbytes, self.size)
        with self._call as p:
            rc = lib.pm_pair_write(p, side, ffi.from_buffer(mv), mv.nbytes, offset, lib.PM_IO_FUA if fua else 0)
        if rc < 0:
            raise_for(rc, self.meta_path, f"write {_SIDE[side]} of {self._name}")

    def _write_zeroes(self, side: int, offset: int, length: int, fua: bool, punch: bool = False) -> None:
        check_io(offset, length, self.size)
        flags = (lib.PM_IO_FUA if fua else 0) | (lib.PM_IO_PUNCH if punch else 0)
        self._run(f"write zeroes to {_SIDE[side]} of", lib.pm_pair_write_zeroes, side, length, offset, flags)

    def _flush(self, side: int) -> None:
        self._run(f"flush {_SIDE[side]} of", lib.pm_pair_flush, side)

    def readinto(self, offset: int, buf: Any) -> None:
        """Read the standard volume into ``buf`` (zero-copy)."""
        self._readinto(lib.PM_STANDARD, offset, buf)

    def read(self, offset: int, length: int) -> bytes:
        """Read the standard volume.  During a restore this returns what it
        would return had the restore finished instantly."""
        check_io(offset, length, self.size)
        buf = bytearray(length)
        self._readinto(lib.PM_STANDARD, offset, buf)
        return bytes(buf)

    def write(self, offset: int, data: Any, *, fua: bool = False) -> None:
        """Write the standard volume (mirrored while syncing or established).
        With ``fua`` the data and the metadata covering it are durable when
        this returns."""
        self._write(lib.PM_STANDARD, offset, data, fua)

    def write_zeroes(self, offset: int, length: int, *, fua: bool = False, punch: bool = False) -> None:
        """Zero a range of the standard, like a write of zeroes (marks
        CHANGED, mirrored where writes are).  With ``punch`` the range may be
        deallocated on every side it reaches (a hole in a file, a discard
        that guarantees zeroes on a block device): NBD's TRIM and
        WRITE_ZEROES without NO_HOLE."""
        self._write_zeroes(lib.PM_STANDARD, offset, length, fua, punch)

    def block_status(self, offset: int = 0, length: Optional[int] = None, *, context: str = "allocation",
                     side: str = "standard") -> list[tuple[int, int, int]]:
        """``(offset, length, kind)`` extents describing a range of a side
        (see :func:`pymirror.blockstatus.block_status`)."""
        from .blockstatus import block_status
        return block_status(self, offset, self.size - offset if length is None else length,
                            context=context, side=side)

    def flush(self) -> None:
        """Make every completed write, and the metadata covering it, durable."""
        self._flush(lib.PM_STANDARD)

    def mirror_readinto(self, offset: int, buf: Any) -> None:
        self._readinto(lib.PM_MIRROR, offset, buf)

    def mirror_read(self, offset: int, length: int) -> bytes:
        """Read the mirror (while split, restoring or restored)."""
        check_io(offset, length, self.size)
        buf = bytearray(length)
        self._readinto(lib.PM_MIRROR, offset, buf)
        return bytes(buf)

    def mirror_write(self, offset: int, data: Any, *, fua: bool = False) -> None:
        """Write the mirror (only while split or restored)."""
        self._write(lib.PM_MIRROR, offset, data, fua)

    def mirror_write_zeroes(self, offset: int, length: int, *, fua: bool = False, punch: bool = False) -> None:
        self._write_zeroes(lib.PM_MIRROR, offset, length, fua, punch)

    def mirror_flush(self) -> None:
        self._flush(lib.PM_MIRROR)

    # -- checks and lifetime ------------------------------------------------
    def iter_differences(self, batch: int = 4096) -> Iterator[int]:
        """Yield the numbers of the tracks whose bytes differ between the
        two sides (reads both volumes track by track, in bounded memory)."""
        out = ffi.new("uint64_t[]", batch)
        nxt = ffi.new("uint64_t *")
        start = 0
        while start < self.tracks:
            n = self._run("verify", lib.pm_pair_verify, start, out, batch, nxt)
            yield from (int(x) for x in ffi.unpack(out, n))
            if nxt[0] <= start:
                break
            start = int(nxt[0])

    def verify(self, progress: Optional[Callable[[Any], None]] = None) -> list[int]:
        """The numbers of the tracks that differ between the two sides
        (ascending), compared in C: both sides read at once, in bounded
        memory, with the GIL released.  ``progress`` is called a few times a
        second with a :class:`pymirror.compare.CompareProgress`; Ctrl-C
        cancels the comparison."""
        from .compare import compare

        return compare(self, progress)

    @classmethod
    def adopt(cls, meta: Optional[PathLike], standard: "PathLike | Volume", mirror: "PathLike | Volume", *,
              track_size: Optional[int] = None, config: Optional[CopyConfig] = None,
              progress: Optional[Callable[[Any], None]] = None) -> "Pair":
        """A pair over two existing volumes that already hold data: created,
        compared, and ``split`` with every differing track CHANGED, so an
        incremental establish or restore copies exactly those.  On error
        nothing is created.  See :func:`pymirror.compare.adopt`."""
        from .compare import adopt

        return adopt(meta, standard, mirror, track_size=track_size, config=config, progress=progress)

    def commit(self) -> None:
        """Make the pair's state and track tables durable."""
        self._run("commit", lib.pm_pair_commit)

    def close(self) -> None:
        """Stop the copier (a job stays resumable from the metadata), commit,
        and close both volumes this pair opened.  Waits for calls in flight
        (a waiting ``Job.wait`` raises ClosedError within a slice); later
        calls raise ClosedError.  Closing twice is a no-op."""
        # pm_pair_destroy (run by the release): stops the copier, commits if anything changed
        if self._close_handle():
            for v in self._owned:
                v.close()

    def __enter__(self) -> "Pair":
        return self

    def __exit__(self, et: Optional[Type[BaseException]], ev: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self.close()

    def __repr__(self) -> str:
        if self.closed:
            return "<Pair closed>"
        return f"<Pair {self.meta_path or 'memory'} state={self.state} size={self.size}>"

    # -- added on branch core: cancel, mirror consistency, the I/O barrier --
    def cancel(self) -> None:
        """End an establish (``syncing``, running or paused): the copy stops,
        the tracks not yet copied count as changed (a later incremental
        establish copies them), the pair goes to ``split``, and the mirror is
        marked inconsistent (:attr:`mirror_invalid`, persisted) until an
        establish completes.  A restore cannot be cancelled (the standard
        depends on the mirror until it is done): :class:`StateError`, which
        suggests ``pause``; so do the other states."""
        with self._inflight:
            check(lib.pm_pair_cancel(self._p))

    @property
    def mirror_invalid(self) -> int:
        """How many mirror tracks are not part of a point-in-time image (0: the
        mirror is consistent).  While syncing: the tracks still to copy; after
        a cancelled establish: what it left.  :meth:`restore` refuses an
        inconsistent mirror."""
        return int(lib.pm_pair_mirror_invalid(self._p))

    # -- added on branch detach: a failing mirror detaches ------------------
    @property
    def detached(self) -> Optional[dict[str, Any]]:
        """The detach record, or None.  When a host write or flush fails on
        the mirror while ``syncing`` or ``established``, the host's I/O
        succeeds on the standard and the pair goes to ``detached``: this
        dict says why and when (``error``, ``errno``, ``track``, ``time``,
        ``when``; see :func:`pymirror.detach.detach_info`).  ``restore`` and
        ``split`` raise :class:`~pymirror.errors.DetachedError`; an
        ``establish`` (incremental: only what the mirror missed) repairs it,
        and the record is cleared when that establish completes."""
        from .detach import detach_info
        return detach_info(self)
    # -- added on branch metatrust: changes outside pymirror ---------------
    def trust(self) -> None:
        """Accept the changed-track tables although a volume was changed
        outside pymirror (``--trust``): incremental jobs are allowed again.
        Persisted with the pair's metadata at once."""
        self._run("trust", lib.pm_pair_trust)

    def volume_trust(self, side: str = "standard") -> dict[str, Any]:
        """What opening the pair found about one volume (``"standard"`` or
        ``"mirror"``): ``outside`` (``"unchanged"``, ``"changed"``,
        ``"unchecked"``, ``"undetectable"``, ``"not-recorded"``), ``note``
        (in words), ``identity`` (what the volume is, e.g. ``disk:wwn-...``),
        ``identity_stable`` (False: only device numbers, or nothing) and
        ``identity_recorded``."""
        code = {"standard": lib.PM_STANDARD, "mirror": lib.PM_MIRROR}.get(side)
        if code is None:
            raise ValueError(f"side must be 'standard' or 'mirror', got {side!r}")
        out = ffi.new("struct pm_volume_trust *")
        out.size = ffi.sizeof("struct pm_volume_trust")
        self._run("query", lib.pm_pair_volume_trust, code, out)
        return {
            "outside": _OUTSIDE.get(int(out.outside), str(out.outside)),
            "note": ffi.string(out.note).decode(errors="replace"),
            "identity": ffi.string(out.identity).decode(errors="replace"),
            "identity_stable": bool(out.identity_stable),
            "identity_recorded": bool(out.identity_recorded),
        }

    @property
    def changed_outside(self) -> list[str]:
        """The sides changed outside pymirror and not yet trusted."""
        return [s for s in ("standard", "mirror") if self.volume_trust(s)["outside"] == "changed"]

    @contextlib.contextmanager
    def hold_io(self) -> Iterator[None]:
        """Hold host I/O at a barrier: on entry, new host writes, write-zeroes
        and flushes on either side block and those in flight drain; on exit
        they go on.  Holds nest.  Commands (split, restore, ...) may be given
        while held; host writes from the holding thread would wait forever.
        Used by :mod:`pymirror.group` to act on several pairs at one instant.
        The hold counts as a call in flight: :meth:`close` waits for it to end
        (so do not close the pair inside its own hold)."""
        with self._inflight:
            ptr = self._p
            check(lib.pm_pair_hold_io(ptr))
            try:
                yield
            finally:
                lib.pm_pair_release_io(ptr)


def _check_compare_args(compare: bool, incremental: bool, assume_equal: bool = False) -> None:
    if compare and incremental:
        raise ValueError("compare and incremental cannot be combined: a compare finds the tracks "
                         "to copy itself, whatever the tables say")
    if compare and assume_equal:
        raise ValueError("compare and assume_equal cannot be combined")


_OUTSIDE = {0: "unchanged", 1: "changed", 2: "unchecked", 3: "undetectable", 4: "not-recorded"}


def _metadata_warning() -> str:
    """The warning the last metadata read on this thread left ("" if none)."""
    return os.fsdecode(ffi.string(lib.pm_meta_last_warning()))


def _warn_metadata(text: str) -> None:
    if text:
        warnings.warn(errors.MetadataWarning(text), stacklevel=3)


def track_counts(pair: Pair) -> dict[str, dict[str, int]]:
    """Tracks PENDING and CHANGED on each side, counted in C."""
    out: dict[str, dict[str, int]] = {}
    with pair._call as p:
        for name, side in (("standard", lib.PM_STANDARD), ("mirror", lib.PM_MIRROR)):
            table = lib.pm_pair_table(p, side)
            out[name] = {
                "pending": int(lib.pm_bitmap_count(lib.pm_table_flag(table, lib.PM_PENDING))),
                "changed": int(lib.pm_bitmap_count(lib.pm_table_flag(table, lib.PM_CHANGED))),
            }
    return out


def peek(meta: PathLike) -> dict[str, Any]:
    """The last committed header of a metadata file, without opening the
    pair or its volumes (writes nothing)."""
    meta_path = os.fspath(meta)
    info = ffi.new("struct pm_meta_info *")
    check(lib.pm_meta_peek(fspath(meta_path), info), meta_path, f"read pair {meta_path}")
    return {
        "state": State.from_code(info.state) if 0 <= info.state < len(STATES) else str(info.state),
        "incremental": bool(info.incremental),
        "protect": bool(info.protect),
        "track_size": int(info.track_size),
        "size": int(info.volume_size),
        "generation": int(info.generation),
        "mirror_invalid": int(info.mirror_invalid),
        "error": ffi.string(lib.pm_strerror(info.error)).decode() if info.error else None,
        "error_track": int(info.error_track) if info.error else None,
        "standard": os.fsdecode(ffi.string(info.standard_path)),
        "mirror": os.fsdecode(ffi.string(info.mirror_path)),
    }
