"""Where a pair verb of the command line goes: to the daemon that holds the
pair, or to the pair opened right here.

Both kinds of target answer the same calls with the same plain values (the
dicts of :mod:`pymirror.report`), so the command line prints the same thing
and exits with the same code whichever way a command went.  A pair is named
by its metadata path or by the NAME a daemon holds it under; an existing path
is a metadata path.
"""
from __future__ import annotations

import os
TYPE_CHECKING = False   # typing is not imported at run time: a command's start (docs/copier.md)
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Optional

from . import errors
from .config import CopyConfig, Settings

# what wait() answers, both ways
DONE, PAUSED_ERROR, TIMEOUT = "done", "paused-error", "timeout"


# A pair the command opened (and whose job it started) before loading the command line
# (pymirror.command): its metadata path, and the target.
_started: dict[str, "LocalTarget"] = {}


def set_started(meta: str, kind: str, target: "LocalTarget", started: bool = True) -> None:
    """Hand the command a pair opened here; ``started``: its ``kind`` job
    (with the arguments of pymirror.command.EARLY_JOBS) has started."""
    from .command import EARLY_JOBS

    target._early = (kind, dict(EARLY_JOBS[kind])) if started else None
    _started[meta] = target


def take_started(meta: str) -> "Optional[LocalTarget]":
    """The target set_started handed over for ``meta`` (once), else None."""
    return _started.pop(meta, None)


class LocalTarget:
    """A pair opened by this process (no daemon holds it)."""

    remote = False

    def __init__(self, label: str, meta: str, settings: Settings) -> None:
        from .pair import Pair

        self.label = label
        self.settings = settings
        self.pair = Pair.open(os.path.realpath(meta), config=settings.copy)
        self._early: Optional[tuple[str, dict[str, Any]]] = None

    def _started_early(self, kind: str, args: dict[str, Any]) -> bool:
        """True when this very job was started before the command line
        loaded (set_started): the command's call then has nothing to do."""
        early, self._early = self._early, None
        if early is None:
            return False
        if early != (kind, args):
            raise RuntimeError(f"the early start began {early}, the command asks for {(kind, args)}")
        return True

    def _config(self, rate: Optional[int] = None, copiers: Optional[int] = None,
                batch_size: Optional[int] = None, read_policy: Optional[str] = None,
                pace: Optional[str] = None, host_latency_target: Optional[str] = None,
                order: Optional[str] = None) -> CopyConfig:
        return self.settings.copy.replace(rate=rate, copiers=copiers, batch_size=batch_size,
                                          read_policy=read_policy, pace=pace,
                                          host_latency_target=host_latency_target, order=order)

    # -- answers ----------------------------------------------------------------
    def query(self) -> dict[str, Any]:
        from .report import query_dict

        return query_dict(self.pair)

    def verify(self) -> dict[str, Any]:
        from .report import verify_dict

        return verify_dict(self.pair, name=self.label)

    # -- commands ---------------------------------------------------------------
    def split(self) -> None:
        self.pair.split()

    def establish(self, incremental: bool = False, assume_equal: bool = False, compare: bool = False,
                  trust: bool = False, **copy: Any) -> None:
        if self._started_early("establish", dict(incremental=incremental, assume_equal=assume_equal,
                                                 compare=compare, **copy, **({"trust": True} if trust else {}))):
            return
        self.pair.establish(incremental=incremental, config=self._config(**copy),
                            assume_equal=assume_equal, compare=compare, trust=trust)

    def restore(self, incremental: bool = False, protect: bool = True, compare: bool = False,
                trust: bool = False, **copy: Any) -> None:
        if self._started_early("restore", dict(incremental=incremental, protect=protect, compare=compare,
                                               **copy, **({"trust": True} if trust else {}))):
            return
        self.pair.restore(incremental=incremental, protect=protect, config=self._config(**copy),
                          compare=compare, trust=trust)

    def resume(self, **copy: Any) -> None:
        self.pair.resume(config=self._config(**copy))

    def plan(self, kind: str, incremental: bool = False, protect: bool = True) -> dict[str, Any]:
        from .plan import plan

        return plan(self.pair, kind, incremental, protect).as_dict()

    def pause(self) -> None:
        p = self.pair.progress
        if not p.running:
            raise errors.StateError(f"{self.label} is {self.pair.state}; there is no copy to pause")
        # A pair opened here has no copier running: its job is paused until
        # someone resumes it (it ran in a command that has ended).

    def cancel(self) -> None:
        cancel = getattr(self.pair, "cancel", None)
        if cancel is None:  # a core without Pair.cancel
            raise errors.StateError("this build of pymirror cannot cancel a copy")
        cancel()

    def set_rate(self, rate: int) -> None:
        raise errors.StateError(
            f"no daemon holds {self.label}: a copy runs only inside the command that started it; "
            f"give the rate to that command (pymirror resume {self.label} --rate ...)")

    def wait(self, timeout: Optional[float]) -> str:
        job = self.pair.job
        if job is None:
            return DONE
        paused = getattr(errors, "JobPausedError", ())   # paused with no error: nobody resumes it here
        try:
            return DONE if job.wait(timeout) else TIMEOUT
        except paused:
            raise
        except errors.DetachedError:   # the establish ended by detaching the mirror: query says so
            return DONE
        except errors.JobError:
            return PAUSED_ERROR

    def has_runner(self) -> bool:
        """True when something runs the pair's copy (a daemon does; a pair
        opened here runs it only while this command follows it)."""
        return False

    def close(self) -> None:
        self.pair.close()


class RemoteTarget:
    """A pair held by a running daemon."""

    remote = True

    def __init__(self, label: str, client: Any, name: str) -> None:
        self.label = label
        self.name = name
        self.client = client
        self.rp = client.pair(name)

    def query(self) -> dict[str, Any]:
        return dict(self.rp.query())

    def verify(self) -> dict[str, Any]:
        return dict(self.rp.verify())

    def split(self) -> None:
        self.rp.split()

    def establish(self, incremental: bool = False, assume_equal: bool = False, compare: bool = False,
                  **copy: Any) -> None:
        self.rp.establish(incremental=incremental, assume_equal=assume_equal, compare=compare, **_given(copy))

    def restore(self, incremental: bool = False, protect: bool = True, compare: bool = False,
                **copy: Any) -> None:
        self.rp.restore(incremental=incremental, protect=protect, compare=compare, **_given(copy))

    def resume(self, **copy: Any) -> None:
        self.rp.resume(**_given(copy))

    def plan(self, kind: str, incremental: bool = False, protect: bool = True) -> dict[str, Any]:
        return dict(self.rp.plan(kind, incremental=incremental, protect=protect))

    def pause(self) -> None:
        self.rp.pause()

    def cancel(self) -> None:
        self.rp.cancel()

    def set_rate(self, rate: int) -> None:
        self.rp.set_rate(rate)

    def wait(self, timeout: Optional[float]) -> str:
        return str(self.rp.wait(timeout=timeout))

    def has_runner(self) -> bool:
        return True

    def close(self) -> None:
        self.client.close()


def combined_job(q: dict[str, Any], key: str = "job") -> Optional[dict[str, Any]]:
    """The pair's job dict (``key``: "job" or "last_job"); for a group, one
    dict adding up its pairs' jobs (tracks, bytes and rates add up; the
    slowest ETA and the longest time count; paused or failed if one is)."""
    if "group" not in q:
        return q.get(key)
    jobs = [one.get(key) for one in q["pairs"].values() if one.get(key)]
    if not jobs:
        return None
    total = sum(j["tracks_total"] for j in jobs)
    pending = sum(j["tracks_pending"] for j in jobs)
    etas = [j.get("eta") for j in jobs]
    bad = next((j for j in jobs if j.get("error")), None)
    return {
        "kind": jobs[0].get("kind"), "tracks_total": total, "tracks_pending": pending,
        "tracks_done": total - pending, "fraction": 1.0 if total == 0 else (total - pending) / total,
        "rate": sum(j.get("rate") or 0 for j in jobs),
        "eta": None if any(e is None for e in etas) else max(etas),
        "elapsed": max(j.get("elapsed") or 0.0 for j in jobs),
        "bytes_written": sum(j.get("bytes_written") or 0 for j in jobs),
        "paused": any(j.get("paused") for j in jobs),
        "error": bad and bad.get("error"), "error_track": bad and bad.get("error_track"),
        **{k: sum(j.get(k) or 0 for j in jobs) for k in
           ("tracks_skipped", "tracks_merged", "reads_redirected", "reads_hydrated")},
    }


def _given(copy: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in copy.items() if v is not None}


def daemon_listening(control: Optional[str]) -> bool:
    """True when a socket is at the daemon's control path (``control``, else
    ``$PYMIRROR_CONTROL``, else the default path): a daemon may listen."""
    import stat

    from .service.paths import control_path

    try:
        return stat.S_ISSOCK(os.stat(control_path(control)).st_mode)
    except OSError:
        return False


def connect_or_none(control: Optional[str]) -> Any:
    """A client of the daemon at ``control`` (None: ``$PYMIRROR_CONTROL``,
    then the default path), or None when no daemon listens there."""
    if not daemon_listening(control):   # no socket there: no daemon, and no need to load the client
        return None
    from .service.client import connect
    from .service.protocol import DaemonUnreachable

    try:
        return connect(control)
    except DaemonUnreachable:
        return None


def control_label(control: Optional[str]) -> str:
    """The control socket's path, for messages."""
    from .service.paths import control_path

    return control_path(control)
