"""``pymirror daemon``: one process that holds pairs, exports them over NBD
and takes commands on a control socket.

What it does, in order, when started (:func:`run`):

1. takes its state directory (a lock file: one daemon per directory) and
   reads the pairs and groups it held before;
2. binds the control socket (mode 0600 from its first instant; a stale one
   is replaced, a live one is refused);
3. opens every pair (remembered ones, then the META arguments): a pair that
   fails to open is logged and listed by ``status`` with its error, and the
   others are served.  A job interrupted by the last stop comes back paused
   and is resumed at once, unless it was paused by request (``pause``) or
   stopped on an error: those wait for ``resume``;
4. starts the NBD listeners (``--socket``/``--listen``) and exports every
   pair: ``NAME`` the standard, ``NAME/mirror`` the mirror;
5. watches every pair four times a second and turns what changed into
   events (logged, kept per pair, sent to subscribers).

SIGTERM or SIGINT stops it: the control socket closes, NBD clients are
drained and disconnected, every pair is committed and closed, exit 0.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterable, Optional

from .. import errors
from ..config import ConfigError, CopyConfig
from ..report import query_dict
from . import barrier, verbs
from .control import ControlServer, client_alive
from .events import PROGRESS_INTERVAL, EventHub
from .held import HeldPair, VerifyJob, one_line
from .paths import control_path as default_control, state_dir as default_state
from .protocol import DaemonError, InvalidArgument, NoSuchPair, greeting
from .state import StateFile

log = logging.getLogger("pymirror.daemon")
COPY_KEYS = ("rate", "copiers", "batch_size", "read_policy", "pace", "host_latency_target", "order")   # a pair's copy settings, remembered


def _version() -> str:
    try:
        from .. import __version__
        return str(__version__)
    except ImportError:  # pragma: no cover
        return "unknown"


def pair_name_for(meta: str) -> str:
    """The default name of a pair: its meta file's name without the suffix."""
    base = os.path.basename(meta)
    stem = base.rsplit(".", 1)[0] if "." in base.lstrip(".") else base
    return stem or base


def check_name(name: str) -> str:
    """A pair or group name: it also names NBD exports (NAME, NAME/mirror)."""
    if not name or name.strip() != name or "/" in name or any(ord(c) < 32 for c in name):
        raise InvalidArgument(f"bad name {name!r}: a name is non-empty, has no '/', no control "
                              f"characters and no leading or trailing spaces")
    try:
        from ..nbd.exports import check_pair_name
    except ImportError:  # pragma: no cover - an NBD server without named exports
        return name
    try:
        check_pair_name(name)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"bad name: {exc}") from None
    return name


class Daemon:
    def __init__(self, control: Optional[str] = None, state_dir: Optional[str] = None,
                 socket_path: Optional[str] = None, listen: Optional[tuple[str, int]] = None,
                 allow_remote: bool = False, config: Optional[CopyConfig] = None,
                 socket_mode: int = 0o660, socket_group: Optional[str] = None,
                 nbd_tls: Optional[dict[str, Any]] = None) -> None:
        self.control_path = default_control(control)
        self.nbd_tls = dict(nbd_tls or {})     # tls, tls_certs, tls_psk, tls_verify_peer for every NBD server (nbd/tls.py)
        self.state = StateFile(default_state(state_dir))
        self.socket_path = os.path.abspath(socket_path) if socket_path else None
        self.listen = listen
        self.allow_remote = allow_remote
        self.config = config or CopyConfig()
        self.socket_mode = socket_mode
        self.socket_group = socket_group
        self.hub = EventHub()
        self.pairs: dict[str, HeldPair] = {}
        self.groups: dict[str, list[str]] = {}
        self._lock = threading.RLock()     # the registry (pairs, groups) and the state file
        self.stopping = threading.Event()
        self.ready = threading.Event()      # set once the remembered pairs are open: requests wait for it
        self.control = ControlServer(self.control_path, self.dispatch, self.hub)
        self.control.members = self.members
        self.servers: list[Any] = []
        self._monitor: Optional[threading.Thread] = None
        self.started = time.time()

    # -- start and stop -------------------------------------------------------
    def start(self, metas: Iterable[str] = ()) -> None:
        self.state.lock()
        try:
            saved = self.state.load()
            self.control.start(greeting(_version()))
        except BaseException:
            self.state.unlock()
            raise
        log.info("pymirror daemon %s (pid %d): control %s, state %s", _version(), os.getpid(),
                 self.control_path, self.state.directory)
        try:
            self._start_nbd()
            self._restore_saved(saved)
            for meta in metas:
                held_as = self.find(os.path.abspath(meta)) if os.path.exists(meta) else None
                if held_as is not None:
                    log.info("%s: already held as %s (remembered)", meta, held_as)
                    continue
                try:
                    self.attach(meta, None, None, save=False)
                except (errors.MirrorError, ValueError, OSError) as exc:
                    log.error("%s: not attached: %s", meta, one_line(exc))
            self._save()
        except BaseException:
            self.stop()
            raise
        self._monitor = threading.Thread(target=self._watch_loop, name="monitor", daemon=True)
        self._monitor.start()
        self.ready.set()

    def _start_nbd(self) -> None:
        if self.socket_path is None and self.listen is None:
            return
        from ..nbd.server import NBDServer

        if not hasattr(NBDServer, "add_pair"):
            raise DaemonError("this build's NBD server cannot export several pairs (no add_pair)")
        kinds: list[dict[str, Any]] = []
        if self.socket_path is not None:
            kinds.append(dict(socket_path=self.socket_path, socket_mode=self.socket_mode,
                              socket_group=self.socket_group))
        if self.listen is not None:
            kinds.append(dict(host=self.listen[0], port=self.listen[1], allow_remote=self.allow_remote))
        for kw in kinds:
            server = NBDServer(None, on_event=self._nbd_event, **kw, **self.nbd_tls)
            server.start()
            self.servers.append(server)
            log.info("NBD exports at %s", server.uri)

    def _restore_saved(self, saved: dict[str, Any]) -> None:
        for entry in saved.get("pairs", []):
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) \
                    or not isinstance(entry.get("meta"), str):
                log.error("daemon state: ignoring a malformed pair entry %r", entry)
                continue
            held = HeldPair(entry["name"], entry["meta"], self.hub)
            held.paused_by_request = bool(entry.get("paused_by_request", False))
            copy = entry.get("copy")
            if isinstance(copy, dict):
                held.copy = {k: v for k, v in copy.items() if k in COPY_KEYS}
            held.exported = bool(entry.get("exported", True))
            self.pairs[held.name] = held
            self._open(held)
        for name, members in saved.get("groups", {}).items():
            if isinstance(members, list) and all(m in self.pairs for m in members) and name not in self.pairs:
                self.groups[name] = list(members)
            else:
                log.error("daemon state: ignoring group %r: its pairs are not all held", name)

    def _open(self, held: HeldPair) -> None:
        try:
            config = self.config.replace(**held.copy)
        except (TypeError, ValueError) as exc:
            log.error("%s: ignoring the remembered copy settings %r: %s", held.name, held.copy, one_line(exc))
            config = self.config
        if not held.open(config):
            log.error("%s: cannot open %s: %s (the other pairs are served)", held.name, held.meta, held.error)
            held.emit("pair-failed", meta=held.meta, error=held.error)
            return
        pair = held.pair
        p = pair.progress
        log.info("%s: opened %s (%s)", held.name, held.meta, pair.state)
        if pair.state == "detached" and getattr(pair, "detached", None):
            from ..detach import describe as describe_detach
            log.warning("%s: %s", held.name, describe_detach(pair.detached, held.name))
        if held.exported:
            try:
                self._export(held)
            except (ValueError, TypeError, RuntimeError) as exc:
                log.error("%s: not exported over NBD: %s", held.name, one_line(exc))
        if p.running and p.paused:
            if held.paused_by_request:
                log.info("%s: the %s stays paused (paused by request); 'resume' continues it", held.name, held.kind)
            elif p.error:
                log.warning("%s: the %s stays paused on an error (track %s: %s); 'resume' retries it",
                            held.name, held.kind, p.error_track, p.error)
            else:
                log.info("%s: resuming the interrupted %s (%d tracks pending)", held.name, held.kind,
                         p.tracks_pending)
                try:
                    pair.resume()
                except (errors.MirrorError, OSError) as exc:
                    log.error("%s: cannot resume the %s: %s; 'resume' retries it", held.name, held.kind,
                              one_line(exc))
                    return
                held.job_started(held.kind)
                held.watch()

    def stop(self) -> None:
        """Close the control socket, drain NBD clients, commit and close every pair."""
        self.stopping.set()
        self.control.stop()
        for server in self.servers:
            try:
                server.shutdown()
            except Exception:  # noqa: BLE001
                log.exception("NBD server shutdown failed")
        if self._monitor is not None:
            self._monitor.join(5)
        with self._lock:
            helds = list(self.pairs.values())
        for held in helds:
            with held.lock:
                try:
                    held.close()
                    log.info("%s: committed and closed", held.name)
                except Exception as exc:  # noqa: BLE001 - close the others anyway
                    log.error("%s: close failed: %s", held.name, one_line(exc))
        self.state.unlock()
        log.info("stopped")

    def _watch_loop(self) -> None:
        while not self.stopping.wait(PROGRESS_INTERVAL):
            with self._lock:
                helds = list(self.pairs.values())
            for held in helds:
                try:
                    held.watch(progress=True)
                except Exception:  # noqa: BLE001 - never let the monitor die
                    log.exception("%s: watch failed", held.name)

    # -- NBD ------------------------------------------------------------------
    def _export(self, held: HeldPair) -> None:
        for server in self.servers:
            if held.name not in server.pairs():
                server.add_pair(held.name, held.pair)

    def _unexport(self, held: HeldPair) -> None:
        for server in self.servers:
            if held.name in server.pairs():
                server.remove_pair(held.name, timeout=30.0)

    def _nbd_event(self, kind: str, data: dict[str, Any]) -> None:
        pair = data.get("pair")
        if not isinstance(pair, str) or not pair:
            export = str(data.get("export", ""))
            pair = export[:-len("/mirror")] if export.endswith("/mirror") else export
        if pair in ("", "standard", "mirror"):     # the default export: the only pair
            with self._lock:
                names = list(self.pairs)
            pair = names[0] if len(names) == 1 else pair
        self.hub.emit(kind, dict(data, pair=pair))

    def clients(self, name: str) -> int:
        total = 0
        for server in self.servers:
            try:
                total += int(server.clients(name))
            except Exception:  # noqa: BLE001 - not exported there
                pass
        return total

    # -- the registry ---------------------------------------------------------
    def _save(self) -> None:
        with self._lock:
            data = {"pairs": [{"name": h.name, "meta": h.meta, "paused_by_request": h.paused_by_request,
                               "copy": h.copy,
                               "exported": h.exported} for h in self.pairs.values()],
                    "groups": {g: list(m) for g, m in self.groups.items()}}
            self.state.save(data)

    def held(self, name: str) -> HeldPair:
        with self._lock:
            held = self.pairs.get(name)
        if held is None:
            raise NoSuchPair(f"no pair named {name!r} is held by this daemon"
                             f"{' (it is a group)' if name in self.groups else ''}")
        return held

    def resolve(self, name: str) -> tuple[Optional[str], list[HeldPair]]:
        """(group name or None, its pairs) for a pair or group name."""
        with self._lock:
            if name in self.pairs:
                return None, [self.pairs[name]]
            if name in self.groups:
                return name, [self.pairs[m] for m in self.groups[name]]
        raise NoSuchPair(f"no pair or group named {name!r} is held by this daemon")

    def members(self, name: str) -> list[str]:
        group, helds = self.resolve(name)
        return [h.name for h in helds]

    def find(self, key: str) -> Optional[str]:
        with self._lock:
            if key in self.pairs or key in self.groups:
                return key
            real = os.path.realpath(key)
            for held in self.pairs.values():
                if os.path.realpath(held.meta) == real:
                    return held.name
        return None

    # -- dispatch -------------------------------------------------------------
    def dispatch(self, verb: str, args: dict[str, Any]) -> Any:
        verb, args = verbs.check(verb, args)
        while not self.ready.wait(0.1):      # still opening the pairs it held: answer once they are there
            if self.stopping.is_set():
                break
        if self.stopping.is_set():
            raise DaemonError("the daemon is stopping")
        handler: Callable[..., Any] = getattr(self, "verb_" + verb.replace("-", "_"))
        return handler(**args)

    # pairs ------------------------------------------------------------------
    def attach(self, meta: str, name: Optional[str], export: Optional[bool], save: bool = True) -> dict[str, Any]:
        meta = os.path.abspath(meta)
        if not os.path.exists(meta):
            raise FileNotFoundError(2, "no such pair metadata file", meta)
        name = check_name(name or pair_name_for(meta))
        with self._lock:
            old = self.pairs.get(name)
            if name in self.groups:
                raise InvalidArgument(f"{name!r} is the name of a group; give the pair another --name")
            holder = self.find(meta)
            if holder is not None and holder != name:
                raise errors.StateError(f"{meta} is already held as pair {holder!r}")
            if old is not None and old.pair is not None:
                if os.path.realpath(old.meta) == os.path.realpath(meta):
                    return {"name": name, "state": old.pair.state, "attached": False}
                raise errors.StateError(f"a pair named {name!r} is already held ({old.meta}); "
                                        f"give this one another name")
            held = HeldPair(name, meta, self.hub)
            if export is not None:
                held.exported = export
            if not held.open(self.config):
                raise held.open_error if held.open_error is not None else \
                    errors.MirrorError(f"{meta}: cannot open: {held.error}")
            self.pairs[name] = held
        with held.lock:
            if held.exported:
                try:
                    self._export(held)
                except BaseException:
                    with self._lock:
                        self.pairs.pop(name, None)
                    held.close()
                    raise
            held.emit("pair-attached", meta=meta, state=held.pair.state)
            p = held.pair.progress
            if p.running and p.paused and not p.error:
                held.pair.resume()
                held.job_started(held.kind)
                log.info("%s: resuming the interrupted %s", name, held.kind)
        if save:
            self._save()
        return {"name": name, "state": held.pair.state, "attached": True}

    def verb_attach(self, meta: str, name: Optional[str], export: Optional[bool]) -> dict[str, Any]:
        return self.attach(meta, name, export)

    def verb_detach(self, name: str) -> dict[str, Any]:
        held = self.held(name)
        with self._lock:
            groups = [g for g, m in self.groups.items() if name in m]
        if groups:
            raise errors.StateError(f"pair {name} belongs to group {groups[0]}; delete the group first")
        with held.lock:
            if held.pair is not None:
                self._unexport(held)
            state = held.pair.state if held.pair is not None else None
            held.close()
            with self._lock:
                self.pairs.pop(name, None)
            held.emit("pair-detached", meta=held.meta, state=state)
        self.hub.forget(name)
        self._save()
        return {"name": name, "state": state}

    def verb_export(self, name: str) -> dict[str, Any]:
        held = self.held(name)
        if not self.servers:
            raise errors.StateError("the daemon has no NBD listener (start it with --socket or --listen)")
        with held.lock:
            held.need()
            self._export(held)
            held.exported = True
        self._save()
        return {"name": name, "exports": [name, f"{name}/mirror"], "uris": [s.uri for s in self.servers]}

    def verb_unexport(self, name: str) -> dict[str, Any]:
        held = self.held(name)
        with held.lock:
            if held.pair is not None:
                self._unexport(held)
            held.exported = False
        self._save()
        return {"name": name}

    # job verbs ----------------------------------------------------------------
    def _cfg(self, pair: Any, **changes: Any) -> CopyConfig:
        base: CopyConfig = pair.config
        try:
            return base.replace(**changes)
        except ConfigError as exc:     # e.g. pace "fast": the caller's mistake, nothing changed
            raise InvalidArgument(str(exc)) from None

    def _locked(self, helds: list[HeldPair]) -> Any:
        """Take the command locks of several pairs, in name order."""
        import contextlib

        stack = contextlib.ExitStack()
        for h in sorted(helds, key=lambda h: h.name):
            stack.enter_context(h.lock)
        return stack

    def _after(self, helds: list[HeldPair], kind: Optional[str] = None) -> None:
        for h in helds:
            if kind is not None:
                h.job_started(kind)
            h.watch()

    def _finish(self, name: str, group: Optional[str], helds: list[HeldPair], wait: Optional[bool],
                extra: Optional[dict[str, Any]] = None) -> Any:
        if wait:
            outcome = self.wait_for(helds, None)
            if outcome == "paused-error":
                bad = [h for h in helds if h.pair is not None and h.pair.progress.error]
                h = bad[0] if bad else helds[0]
                p = h.pair.progress
                raise errors.JobError(f"{h.name}: the {h.kind} stopped on track {p.error_track}: {p.error}; "
                                      f"fix the cause, then resume")
        return self.verb_query(name) if not extra else dict(self.verb_query(name), **extra)

    def _group_call(self, kind: str, helds: list[HeldPair], incremental: bool = False,
                    protect: bool = True) -> float:
        """A group command at one instant (barrier.py); the seconds host I/O was held."""
        named = [(h.name, h.need()) for h in helds]
        barrier.check(kind, named, incremental=incremental)
        if kind == "split":
            return barrier.act(named, lambda p: p.split())
        if kind == "establish":
            return barrier.act(named, lambda p: p.establish(incremental=incremental))
        return barrier.act(named, lambda p: p.restore(incremental=incremental, protect=protect))

    @staticmethod
    def _trust(helds: list[HeldPair], trust: Optional[bool], incremental: Optional[bool]) -> None:
        """--trust (branch metatrust): accept every pair's tables although a
        volume changed outside pymirror; without it, an incremental group
        command is refused before any pair acts if one of them changed."""
        for h in helds:
            pair = h.need()
            if trust:
                pair.trust()
            elif incremental and len(helds) > 1 and pair.changed_outside:
                raise errors.ChangedOutsideError(
                    f"{h.name}: the {' and the '.join(pair.changed_outside)} changed outside pymirror; an "
                    f"incremental copy could miss tracks: use --compare or --trust (nothing was changed)")

    def verb_establish(self, name: str, incremental: Optional[bool], assume_equal: Optional[bool],
                       rate: Optional[int], copiers: Optional[int], batch_size: Optional[int],
                       wait: Optional[bool], compare: Optional[bool] = None, trust: Optional[bool] = None,
                       **pace: Any) -> Any:
        group, helds = self.resolve(name)
        with self._locked(helds):
            self._no_verify(helds, "establish")
            self._trust(helds, trust, incremental)
            if group is None:
                pair = helds[0].need()
                pair.establish(incremental=bool(incremental), assume_equal=bool(assume_equal),
                               config=self._cfg(pair, rate=rate, copiers=copiers, batch_size=batch_size, **pace),
                               compare=bool(compare))
                extra = None
            else:
                if assume_equal:
                    raise InvalidArgument("assume_equal is for one new pair, not a group")
                if compare:
                    raise InvalidArgument("compare is for one pair, not a group: establish each pair "
                                          "with compare")
                for h in helds:
                    h.need()._configure(self._cfg(h.pair, rate=rate, copiers=copiers, batch_size=batch_size,
                                                  **pace))
                extra = {"held_seconds": self._group_call("establish", helds, incremental=bool(incremental))}
            for h in helds:
                h.paused_by_request = False
            self._after(helds, "establish" if not assume_equal else None)
        self._save_if_flags_changed()
        return self._finish(name, group, helds, wait, extra)

    def verb_restore(self, name: str, incremental: Optional[bool], protect: Optional[bool],
                     read_policy: Optional[str], rate: Optional[int], copiers: Optional[int],
                     batch_size: Optional[int], wait: Optional[bool], compare: Optional[bool] = None,
                     trust: Optional[bool] = None, **pace: Any) -> Any:
        group, helds = self.resolve(name)
        protect = True if protect is None else protect
        with self._locked(helds):
            self._no_verify(helds, "restore")
            self._trust(helds, trust, incremental)
            if group is None:
                pair = helds[0].need()
                pair.restore(incremental=bool(incremental), protect=protect,
                             config=self._cfg(pair, rate=rate, copiers=copiers, batch_size=batch_size,
                                              read_policy=read_policy, **pace), compare=bool(compare))
                extra = None
            else:
                if compare:
                    raise InvalidArgument("compare is for one pair, not a group: restore each pair "
                                          "with compare")
                for h in helds:
                    h.need()._configure(self._cfg(h.pair, rate=rate, copiers=copiers, batch_size=batch_size,
                                                  read_policy=read_policy, **pace))
                extra = {"held_seconds": self._group_call("restore", helds, incremental=bool(incremental),
                                                          protect=protect)}
            for h in helds:
                h.paused_by_request = False
            self._after(helds, "restore")
        self._save_if_flags_changed()
        return self._finish(name, group, helds, wait, extra)

    @staticmethod
    def _no_verify(helds: list[HeldPair], verb: str) -> None:
        for h in helds:
            if h.verify is not None and not h.verify.finished.is_set():
                raise errors.StateError(f"{h.name}: a verify is running; {verb} waits for it "
                                        f"(or cancel the verify first)")

    def verb_split(self, name: str) -> Any:
        group, helds = self.resolve(name)
        with self._locked(helds):
            self._no_verify(helds, "split")
            if group is None:
                helds[0].need().split()
                extra = None
            else:
                extra = {"held_seconds": self._group_call("split", helds)}
            self._after(helds)
        return self.verb_query(name) if not extra else dict(self.verb_query(name), **extra)

    def verb_resume(self, name: str, rate: Optional[int], copiers: Optional[int], batch_size: Optional[int],
                    wait: Optional[bool], **pace: Any) -> Any:
        group, helds = self.resolve(name)
        with self._locked(helds):
            for h in helds:
                pair = h.need()
                if not pair.progress.running:
                    if group is None:
                        raise errors.StateError(f"{h.name} is {pair.state}; there is no copy to resume")
                    continue
                changes = {k: v for k, v in (("rate", rate), ("copiers", copiers), ("batch_size", batch_size),
                                             *pace.items())
                           if v is not None}
                pair.resume(config=self._cfg(pair, **changes) if changes else None)
                h.paused_by_request = False
                h.job_started(h.kind)
                h.watch()
        self._save_if_flags_changed()
        return self._finish(name, group, helds, wait)

    def verb_pause(self, name: str) -> Any:
        group, helds = self.resolve(name)
        with self._locked(helds):
            for h in helds:
                pair = h.need()
                p = pair.progress
                if not p.running:
                    if group is None:
                        raise errors.StateError(f"{h.name} is {pair.state}; there is no copy to pause")
                    continue
                h.paused_by_request = True
                pair.job.pause()
                h.watch()
        self._save_if_flags_changed()
        return self.verb_query(name)

    def verb_cancel(self, name: str) -> Any:
        group, helds = self.resolve(name)
        with self._locked(helds):
            for h in helds:
                if h.verify is not None and not h.verify.finished.is_set():
                    h.verify.cancel()
                    continue
                pair = h.need()
                cancel = getattr(pair, "cancel", None)
                if cancel is None:
                    raise errors.StateError("cancel needs the core's Pair.cancel, which this build lacks")
                running = pair.progress.running
                cancel()
                h.paused_by_request = False
                if running:
                    h.job_cancelled()
                h.watch()
        self._save_if_flags_changed()
        return self.verb_query(name)

    def verb_set_rate(self, name: str, rate: int) -> Any:
        group, helds = self.resolve(name)
        with self._locked(helds):
            for h in helds:
                pair = h.need()
                from ..job import Job

                Job(pair, h.kind).set_rate(rate)
                pair._config = pair.config.replace(rate=rate)
        self._save_if_flags_changed()
        return self.verb_query(name)

    def _save_if_flags_changed(self) -> None:
        with self._lock:
            for h in self.pairs.values():
                if h.pair is not None:
                    cfg = h.pair.config
                    h.copy = {k: getattr(cfg, k) for k in COPY_KEYS}
            snapshot = {n: (h.paused_by_request, tuple(sorted(h.copy.items()))) for n, h in self.pairs.items()}
            if snapshot != getattr(self, "_saved_flags", None):
                self._saved_flags = snapshot
                self._save()

    # reports ----------------------------------------------------------------
    def verb_query(self, name: str) -> Any:
        group, helds = self.resolve(name)
        if group is None:
            with helds[0].lock:          # the pair is not closed under the read
                return query_dict(helds[0].need())
        out: dict[str, Any] = {}
        for h in helds:
            with h.lock:
                out[h.name] = query_dict(h.pair) if h.pair is not None else {"state": None, "error": h.error}
        return {"group": group, "pairs": out}

    def verb_plan(self, name: str, kind: str, incremental: Optional[bool], protect: Optional[bool]) -> Any:
        from ..plan import plan

        if kind not in ("restore", "establish"):
            raise InvalidArgument(f"plan: argument 'kind' must be 'restore' or 'establish', got {kind!r}")
        group, helds = self.resolve(name)
        out: dict[str, Any] = {}
        for h in helds:
            with h.lock:
                out[h.name] = plan(h.need(), kind, bool(incremental), True if protect is None else protect).as_dict()
        return out[helds[0].name] if group is None else {"group": group, "pairs": out}

    def verb_verify(self, name: str, wait: Optional[bool]) -> Any:
        group, helds = self.resolve(name)
        jobs: list[VerifyJob] = []
        with self._locked(helds):
            for h in helds:
                pair = h.need()
                if pair.progress.running:
                    raise errors.StateError(f"{h.name}: a copy is in progress ({pair.state}); verify compares "
                                            f"settled volumes: resume it and let it finish first")
                if h.verify is not None and not h.verify.finished.is_set():
                    raise errors.StateError(f"{h.name}: a verify is already running")
            for h in helds:
                h.verify = VerifyJob(h)
                h.emit("job-started", kind="verify", tracks_total=h.pair.tracks)
                jobs.append(h.verify.start())
        if wait is False:
            return {"started": [h.name for h in helds]}
        for job in jobs:
            while not job.finished.wait(0.5):
                if self.stopping.is_set():
                    raise DaemonError("the daemon is stopping")
                if not client_alive():
                    raise DaemonError("the client went away")     # the verify goes on; its result is kept
        for job in jobs:
            if job.error is not None:
                raise job.error
        if group is None:
            return jobs[0].result
        return {"group": group, "pairs": {h.name: j.result for h, j in zip(helds, jobs)},
                "equal": all(j.result and j.result["equal"] for j in jobs)}

    def wait_for(self, helds: list[HeldPair], timeout: Optional[float]) -> str:
        """"done" | "paused-error" | "timeout": wait until every pair's copy
        (and verify) is done, or one is paused on an error.  A job paused by
        request keeps the wait going."""
        deadline = None if timeout is None else time.monotonic() + timeout
        polls = 0
        while True:
            done = True
            for h in helds:
                with h.lock:             # the pair is not closed under the read
                    p = h.need().progress
                if p.running and p.paused and p.error:
                    h.watch()
                    return "paused-error"
                if p.running or (h.verify is not None and not h.verify.finished.is_set()):
                    done = False
            if done:
                for h in helds:
                    h.watch()       # the job-done event goes out before the reply
                return "done"
            if deadline is not None and time.monotonic() >= deadline:
                return "timeout"
            if self.stopping.wait(0.05):
                raise DaemonError("the daemon is stopping")
            polls += 1
            if polls % 10 == 0 and not client_alive():
                raise DaemonError("the client went away")     # nobody to answer: stop waiting

    def verb_wait(self, name: str, timeout: Optional[float]) -> str:
        group, helds = self.resolve(name)
        return self.wait_for(helds, timeout)

    def _pair_status(self, h: HeldPair, groups: dict[str, list[str]]) -> dict[str, Any]:
        out: dict[str, Any] = {"name": h.name, "meta": h.meta, "error": h.error, "exported": h.exported,
                               "paused_by_request": h.paused_by_request,
                               "groups": sorted(g for g, m in groups.items() if h.name in m)}
        with h.lock:
            pair = h.pair
            q = query_dict(pair) if pair is not None else None
        if pair is not None and q is not None:
            out.update(state=q["state"], size=q["size"], mirror_invalid=q["mirror_invalid"], job=q["job"],
                       detached=q.get("detached"))
            out["clients"] = self.clients(h.name)
        else:
            out.update(state=None, job=None, clients=0)
        if h.verify is not None and not h.verify.finished.is_set():
            out["verify"] = {"tracks_done": h.verify.done_tracks, "tracks_total": h.verify.tracks}
        out["last_verify"] = h.last_verify
        out["events"] = self.hub.history(h.name)[-10:]
        return out

    def verb_status(self, name: Optional[str]) -> Any:
        with self._lock:
            if name is not None:
                _, helds = self.resolve(name)
            else:
                helds = list(self.pairs.values())
            groups = {g: list(m) for g, m in self.groups.items()}
        return {"daemon": {"pid": os.getpid(), "version": _version(), "control": self.control_path,
                           "state_dir": self.state.directory, "uptime": round(time.time() - self.started, 1),
                           "nbd": [s.uri for s in self.servers], "control_clients": self.control.clients},
                "pairs": [self._pair_status(h, groups) for h in helds], "groups": groups}

    def verb_events(self, name: Optional[str]) -> Any:
        if name is None:
            with self._lock:
                names = list(self.pairs)
            out = [e for n in names for e in self.hub.history(n)]
            return sorted(out, key=lambda e: e["timestamp"])
        group, helds = self.resolve(name)
        out = [e for h in helds for e in self.hub.history(h.name)]
        return sorted(out, key=lambda e: e["timestamp"])

    def verb_find(self, pair: str) -> Optional[str]:
        return self.find(pair)

    # groups -----------------------------------------------------------------
    def verb_group_create(self, name: str, pairs: list[str]) -> Any:
        check_name(name)
        with self._lock:
            if name in self.pairs or name in self.groups:
                raise InvalidArgument(f"the name {name!r} is taken (pairs and groups share one namespace)")
            if len(set(pairs)) != len(pairs):
                raise InvalidArgument("a group names each pair once")
            missing = [p for p in pairs if p not in self.pairs]
            if missing:
                raise NoSuchPair(f"no pair named {missing[0]!r} is held by this daemon")
            self.groups[name] = list(pairs)
            self._save()
        self.hub.emit("group-created", {"group": name, "pairs": list(pairs)})
        return {"name": name, "pairs": list(pairs)}

    def verb_group_delete(self, name: str) -> Any:
        with self._lock:
            if name not in self.groups:
                raise NoSuchPair(f"no group named {name!r}")
            members = self.groups.pop(name)
            self._save()
        self.hub.emit("group-deleted", {"group": name, "pairs": members})
        return {"name": name}


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument(f"--listen {text!r} must be HOST:PORT, e.g. 127.0.0.1:10809")
    return host.strip("[]") or "127.0.0.1", int(port)


def setup_logging(level: int = logging.INFO) -> None:
    """One line per event on stderr (systemd's journal or a file takes it)."""
    root = logging.getLogger("pymirror")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s pymirror[%(process)d] %(levelname)s %(message)s"))
        root.addHandler(handler)
    root.setLevel(level)


def run(control: Optional[str] = None, state_dir: Optional[str] = None, socket_path: Optional[str] = None,
        listen: "Optional[str | tuple[str, int]]" = None, allow_remote: bool = False,
        metas: Iterable[str] = (), config: Optional[CopyConfig] = None, socket_mode: int = 0o660,
        socket_group: Optional[str] = None, log_level: int = logging.INFO,
        nbd_tls: Optional[dict[str, Any]] = None) -> int:
    """Run the daemon in the foreground until SIGTERM or SIGINT; returns 0
    after every pair is committed and closed.  Raises
    :class:`~pymirror.service.protocol.DaemonError` (a MirrorError) with a
    one-line message when it cannot start."""
    setup_logging(log_level)
    if isinstance(listen, str):
        listen = parse_listen(listen)
    daemon = Daemon(control, state_dir, socket_path, listen, allow_remote, config, socket_mode, socket_group,
                    nbd_tls)
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        daemon.start(metas)
        log.info("ready: %d pair(s), %d group(s)", len(daemon.pairs), len(daemon.groups))
        while not stop.wait(1.0):
            pass
        log.info("stopping on signal")
        daemon.stop()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return 0
