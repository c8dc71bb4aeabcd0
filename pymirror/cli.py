"""The ``pymirror`` command line.

Verbs after TimeFinder's (establish, split, restore, query, verify), shapes
after drbdadm/qemu-img: one line per error, ``--json`` for scripts, a live
progress bar on a terminal and plain lines elsewhere.

Each pair verb goes to the daemon that holds the pair (``pymirror daemon``,
found on its control socket), else acts on the pair right here; the output
and the exit code are the same either way (targets.py).

Exit codes, for every command: 0 success; 1 a negative answer (``verify``:
the sides differ; ``wait`` or a job verb: the job paused on an error); 2 an
error (bad input, no such pair, refused in this state, daemon unreachable);
3 a timeout (``wait --timeout``); 130 on SIGINT, 143 on SIGTERM.  Results go
to stdout; progress and diagnostics to stderr.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator, NoReturn, Optional, TypeVar

import click

from . import errors
from .config import ConfigError, Settings, load_settings
from .sizes import format_size, parse_size
from .targets import DONE, PAUSED_ERROR, TIMEOUT, LocalTarget, RemoteTarget, connect_or_none, control_label

F = TypeVar("F", bound=Callable[..., Any])
MiB = 1 << 20

EXIT_OK, EXIT_NO, EXIT_ERROR, EXIT_TIMEOUT = 0, 1, 2, 3
EXIT_PIPE = 128 + signal.SIGPIPE   # 141: stdout's reader went away


# -- parameter types ----------------------------------------------------------
class SizeType(click.ParamType):
    name = "SIZE"

    def __init__(self, minimum: int = 0) -> None:
        self.minimum = minimum

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> int:
        what = param.name.replace("_", "-") if param and param.name else "size"
        try:
            n = value if isinstance(value, int) else parse_size(value, what)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        if n < self.minimum:
            self.fail(f"{what} must be at least {self.minimum} byte{'s' if self.minimum > 1 else ''}, "
                      f"got {value}", param, ctx)
        return n


SIZE = SizeType()
VOLUME_SIZE = SizeType(minimum=1)


@dataclass
class Ctx:
    debug: bool
    config_path: Optional[str]
    control: Optional[str] = None
    _settings: Optional[Settings] = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(self.config_path)
        return self._settings


# -- signals: SIGINT exits 130, SIGTERM 143 -----------------------------------
class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def exit_code_for(exc: KeyboardInterrupt) -> int:
    return 128 + getattr(exc, "signum", signal.SIGINT)


def _signals_stop_the_command() -> None:
    """SIGINT and SIGTERM both stop a long command cleanly.  SIGINT is set
    explicitly: a process started in the background by a shell inherits it
    ignored, and a server must still stop on it."""
    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(signum)
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


# -- errors: one line, no traceback (unless --debug) --------------------------
def user_message(exc: BaseException) -> Optional[str]:
    """The one-line message for a user's mistake, or None for a bug."""
    if isinstance(exc, errors.MirrorError) or isinstance(exc, ConfigError):
        return str(exc)
    if isinstance(exc, FileNotFoundError):
        return f"{exc.filename}: no such file" if exc.filename else str(exc)
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        if exc.errno in (errno.EWOULDBLOCK, errno.EBUSY):
            return f"{where}{exc.strerror} (is another pymirror process using this pair?)"
        return f"{where}{exc.strerror or exc}"
    if isinstance(exc, ValueError):
        return str(exc)
    return None


class CommandError(click.ClickException):
    exit_code = EXIT_ERROR


class Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort, KeyboardInterrupt):
            raise
        except BrokenPipeError:
            stdout_closed()
            raise
        except Exception as exc:
            obj = ctx.obj
            if isinstance(obj, Ctx) and obj.debug:
                raise
            msg = user_message(exc)
            if msg is None:
                raise
            raise CommandError(msg) from None


def fail(msg: str, code: int = EXIT_ERROR) -> NoReturn:
    click.echo(f"Error: {msg}", err=True)
    sys.exit(code)


def out(text: str) -> None:
    """A result line, on stdout."""
    click.echo(text)


def note(text: str) -> None:
    """Progress and diagnostics, on stderr."""
    click.echo(text, err=True)


# -- shared options -----------------------------------------------------------
def copy_options(f: F) -> F:
    opts = [
        click.option("--rate", type=SIZE, default=None, help="Copy rate limit in bytes per second (8M = 8 MiB/s; 0 = none)."),
        click.option("--copiers", type=click.IntRange(1, 64), default=None, help="Copier threads (default 2)."),
        click.option("--batch-size", type=SIZE, default=None, help="Largest copy I/O (default 1M)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def serve_options(f: F) -> F:
    opts = [
        click.option("--socket", "socket_path", type=click.Path(dir_okay=False), default=None,
                     help="Export the standard volume over NBD on this unix socket while the command runs."),
        click.option("--listen", default=None, metavar="HOST:PORT",
                     help="Export over NBD on TCP (loopback unless --allow-remote)."),
        click.option("--allow-remote", is_flag=True, help="Allow --listen on a non-loopback address."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def job_options(f: F) -> F:
    f = click.option("--no-wait", is_flag=True,
                     help="Return as soon as the copy has started (through a daemon it goes on there).")(f)
    return f


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--listen {text!r} must be HOST:PORT, e.g. 127.0.0.1:10809")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def start_server(pair: Any, socket_path: Optional[str], listen: Optional[str], allow_remote: bool) -> Any:
    if socket_path is None and listen is None:
        return None
    if socket_path is not None and listen is not None:
        raise ValueError("give --socket or --listen, not both")
    from .nbd.server import NBDServer

    if listen is not None:
        host, port = parse_listen(listen)
        server = NBDServer(pair, host=host, port=port, allow_remote=allow_remote)
    else:
        server = NBDServer(pair, socket_path=socket_path)
    server.start()
    note(f"serving {pair.meta_path or 'pair'} over NBD at {server.uri}")
    return server


def wait_forever() -> None:
    while True:
        signal.pause()


# -- finding the pair: the daemon that holds it, else here --------------------
def open_target(obj: Ctx, arg: str) -> "LocalTarget | RemoteTarget":
    """The daemon's pair named (or with the meta path) ``arg``, else the pair
    opened here from the meta path ``arg``."""
    is_path = os.path.exists(arg)
    client = connect_or_none(obj.control)
    if client is not None:
        try:
            name = client.find(os.path.realpath(arg) if is_path else arg)
        except BaseException:
            client.close()
            raise
        if name:
            return RemoteTarget(arg, client, name)
        client.close()
    if is_path:
        return LocalTarget(arg, arg, obj.settings)
    where = control_label(obj.control)
    if client is None:
        raise errors.MirrorError(f"{arg}: no such pair metadata file, and no daemon at {where} "
                                 f"to ask for a pair of that name (create one with 'pymirror pair')")
    raise errors.MirrorError(f"{arg}: no such pair metadata file, and the daemon at {where} "
                             f"holds no pair of that name (see 'pymirror status')")


def need_client(obj: Ctx, why: str) -> Any:
    client = connect_or_none(obj.control)
    if client is None:
        raise errors.MirrorError(f"no daemon at {control_label(obj.control)}: {why} needs a running "
                                 f"'pymirror daemon' (or give --control PATH)")
    return client


def _status_groups(status: Any) -> dict[str, list[str]]:
    groups = status.get("groups") if isinstance(status, dict) else None
    if isinstance(groups, dict):
        return {str(k): list(v if isinstance(v, list) else v.get("pairs", [])) for k, v in groups.items()}
    if isinstance(groups, list):
        return {str(g["name"]): list(g.get("pairs", [])) for g in groups}
    return {}


def _status_pairs(status: Any) -> list[dict[str, Any]]:
    pairs = status.get("pairs") if isinstance(status, dict) else None
    if isinstance(pairs, dict):
        return [{"name": k, **v} for k, v in pairs.items()]
    return list(pairs or [])


# -- following a job ------------------------------------------------------------
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


def _snapshot(t: Any) -> Optional[dict[str, Any]]:
    q = t.query()
    return combined_job(q) or combined_job(q, "last_job")


def summary(kind: str, q: dict[str, Any]) -> str:
    lj = combined_job(q, "last_job")
    if "group" in q:
        state = "group of " + ", ".join(f"{n} {one.get('state')}" for n, one in q["pairs"].items())
    else:
        state = f"the pair is {q['state']}"
    if not lj:
        return f"{kind} complete: {state} (nothing to copy)"
    return (f"{kind} complete: {state} ({lj['tracks_total']} tracks, "
            f"{format_size(lj['bytes_written'])} copied in {lj['elapsed']:.2f} s)")


def follow_job(t: "LocalTarget | RemoteTarget", kind: str, server: Any = None) -> None:
    """Follow the pair's job with progress (stderr) until it is done, then
    print the summary (stdout).  Ctrl-C/SIGTERM: a pair opened here is closed
    with everything committed and resumable; through a daemon the job goes on."""
    from .progress import describe, follow_snapshots

    label = t.label
    try:
        status, last = follow_snapshots(t.wait, lambda: _snapshot(t), kind)
        if status == PAUSED_ERROR:
            p = last or {}
            fail(f"the {kind} of {label} stopped on track {p.get('error_track')}: {p.get('error')}; "
                 f"fix the cause, then: pymirror resume {label}", EXIT_NO)
        out(summary(kind, t.query()))
        if server is not None:
            note(f"still serving at {server.uri}; stop with Ctrl-C")
            wait_forever()
    except KeyboardInterrupt as exc:
        code = exit_code_for(exc)
        if t.remote:
            note(f"\nstopped following; the {kind} of {label} goes on in the daemon "
                 f"(pymirror watch {label}, pymirror wait {label})")
            sys.exit(code)
        assert isinstance(t, LocalTarget)
        p = t.pair.progress
        if server is not None:
            server.shutdown()
            server = None
        t.close()
        if p.running:
            note(f"\ninterrupted: {kind} stopped at {describe(p)}; metadata committed. "
                 f"Continue with: pymirror resume {label}")
            sys.exit(code)
        note("\nstopped")
    finally:
        if server is not None:
            server.shutdown()


def run_job_verb(t: "LocalTarget | RemoteTarget", kind: str, start: Callable[[], None],
                 no_wait: bool, socket_path: Optional[str], listen: Optional[str],
                 allow_remote: bool) -> None:
    server = None
    try:
        if t.remote and (socket_path or listen):
            raise errors.StateError(f"{t.label} is held by a daemon, which serves its NBD exports itself: "
                                    f"drop --socket/--listen")
        if no_wait and (socket_path or listen):
            raise ValueError("--no-wait and --socket/--listen cannot be combined")
        start()
        if not t.remote:
            assert isinstance(t, LocalTarget)
            server = start_server(t.pair, socket_path, listen, allow_remote)
        if no_wait:
            job = combined_job(t.query())
            left = f"{job['tracks_pending']} of {job['tracks_total']} tracks to copy" if job else "nothing to copy"
            out(f"{t.label}: {kind} started ({left})")
            if not t.remote and job:
                note(f"no daemon holds {t.label}, so the copy stops with this command; it goes on with "
                     f"'pymirror resume {t.label}' or in a daemon ('pymirror attach')")
            t.close()
            return
    except BaseException:
        if server is not None:
            server.shutdown()
        t.close()
        raise
    try:
        follow_job(t, kind, server)
    finally:
        t.close()


# -- the commands -------------------------------------------------------------
@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Configuration file (default: $PYMIRROR_CONFIG, then ~/.config/pymirror/config.toml).")
@click.option("--control", type=click.Path(dir_okay=False), default=None, envvar="PYMIRROR_CONTROL",
              metavar="PATH",
              help="The daemon's control socket (default: $PYMIRROR_CONTROL, then "
                   "$XDG_RUNTIME_DIR/pymirror/control.sock, /run/pymirror/control.sock for root).")
@click.version_option(package_name="pymirror")
@click.pass_context
def cli(ctx: click.Context, debug: bool, config_path: Optional[str], control: Optional[str]) -> None:
    """Keep a mirror of a block volume, and restore the volume from it while
    the host keeps using it.

    A PAIR is a pair's metadata path, or the NAME a daemon holds it under.
    Exit codes: 0 success, 1 a negative answer (verify: sides differ; wait: job
    paused on an error), 2 an error, 3 a timeout, 130/143 on SIGINT/SIGTERM."""
    ctx.obj = Ctx(debug=debug, config_path=config_path, control=control)
    _signals_stop_the_command()


@cli.command()
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--size", type=VOLUME_SIZE, required=True, help="Volume size, e.g. 1G.")
@click.option("--track-size", "track_size", type=SIZE, default=None, hidden=True)
def create(path: str, size: int, track_size: Optional[int]) -> None:
    """Create a sparse volume image file (all zeros).  The track size is the
    pair's: give it to 'pymirror pair'."""
    from .volume import Volume

    if track_size is not None:
        raise click.BadParameter("a volume image records no track size; the pair does: "
                                 "give --track-size to 'pymirror pair'", param_hint="'--track-size'")
    if os.path.exists(path):
        raise errors.MirrorError(f"{path}: already exists; pymirror create never overwrites")
    with Volume.create(path, size) as v:
        out(f"created {path}: {format_size(v.size)} sparse volume")


@cli.command("pair")
@click.argument("meta", type=click.Path(dir_okay=False))
@click.option("--standard", type=click.Path(dir_okay=False), required=True, help="The host's volume.")
@click.option("--mirror", type=click.Path(dir_okay=False), required=True, help="The mirror volume (same size).")
@click.option("--track-size", type=SIZE, default=None, help="Track size (default 64K, or the config file's).")
@click.pass_obj
def pair_cmd(obj: Ctx, meta: str, standard: str, mirror: str, track_size: Optional[int]) -> None:
    """Create the metadata of a pair of two volumes (state: new)."""
    from .pair import Pair

    if os.path.exists(meta):
        raise errors.MirrorError(f"{meta}: already exists; pymirror pair never overwrites metadata")
    for role, path in (("standard", standard), ("mirror", mirror)):
        if not os.path.exists(path):
            raise errors.MirrorError(f"{role} volume {path}: no such file (make one with 'pymirror create')")
    with Pair.create(meta, standard, mirror, track_size=track_size or obj.settings.track_size) as p:
        out(f"created pair {meta}: {standard} + {mirror}, {format_size(p.size)}, "
            f"{p.tracks} tracks of {format_size(p.track_size)}, state {p.state}")


@cli.command()
@click.argument("pair")
@click.option("--incremental", is_flag=True, help="Copy only the tracks changed on either side since the split.")
@click.option("--assume-equal", is_flag=True,
              help="New pair only: skip the copy, the two volumes are known to be identical (e.g. both blank).")
@copy_options
@job_options
@serve_options
@click.pass_obj
def establish(obj: Ctx, pair: str, incremental: bool, assume_equal: bool, rate: Optional[int],
              copiers: Optional[int], batch_size: Optional[int], no_wait: bool,
              socket_path: Optional[str], listen: Optional[str], allow_remote: bool) -> None:
    """Copy the standard to the mirror and keep them identical.  PAIR may be a group."""
    copy = dict(rate=rate, copiers=copiers, batch_size=batch_size)
    t = open_target(obj, pair)
    run_job_verb(t, "establish", lambda: t.establish(incremental=incremental, assume_equal=assume_equal, **copy),
                 no_wait, socket_path, listen, allow_remote)


@cli.command()
@click.argument("pair")
@click.pass_obj
def split(obj: Ctx, pair: str) -> None:
    """Split the mirror off: it becomes an independent volume (instant).
    PAIR may be a group: every pair splits at one instant."""
    t = open_target(obj, pair)
    try:
        t.split()
    finally:
        t.close()
    out(f"{pair}: split; both sides now record changed tracks")


@cli.command()
@click.argument("pair")
@click.option("--incremental", is_flag=True, help="Restore only the tracks changed on either side since the split.")
@click.option("--protect/--no-protect", default=True, show_default=True,
              help="Keep the mirror write-disabled and unchanged during the restore.")
@click.option("--read-policy", type=click.Choice(["redirect", "hydrate"]), default=None,
              help="Reads of not-yet-restored tracks: serve from the mirror, or copy the track first.")
@copy_options
@job_options
@serve_options
@click.pass_obj
def restore(obj: Ctx, pair: str, incremental: bool, protect: bool, read_policy: Optional[str],
            rate: Optional[int], copiers: Optional[int], batch_size: Optional[int], no_wait: bool,
            socket_path: Optional[str], listen: Optional[str], allow_remote: bool) -> None:
    """Restore the standard from the mirror while the host keeps using it.
    PAIR may be a group: every pair starts its restore at one instant."""
    copy = dict(rate=rate, copiers=copiers, batch_size=batch_size, read_policy=read_policy)
    t = open_target(obj, pair)
    run_job_verb(t, "restore", lambda: t.restore(incremental=incremental, protect=protect, **copy),
                 no_wait, socket_path, listen, allow_remote)


@cli.command()
@click.argument("pair")
@copy_options
@job_options
@serve_options
@click.pass_obj
def resume(obj: Ctx, pair: str, rate: Optional[int], copiers: Optional[int], batch_size: Optional[int],
           no_wait: bool, socket_path: Optional[str], listen: Optional[str], allow_remote: bool) -> None:
    """Continue an establish or restore that was interrupted or paused."""
    t = open_target(obj, pair)
    try:
        q = t.query()
        kind = (combined_job(q) or {}).get("kind") or ("restore" if q.get("state") == "restoring" else "establish")
    except BaseException:
        t.close()
        raise

    def start() -> None:
        t.resume(rate=rate, copiers=copiers, batch_size=batch_size)
        note(f"resuming the {kind} of {pair}")
    run_job_verb(t, kind, start, no_wait, socket_path, listen, allow_remote)


@cli.command()
@click.argument("pair")
@click.pass_obj
def pause(obj: Ctx, pair: str) -> None:
    """Pause the pair's copy (establish or restore); 'resume' continues it.
    Host I/O goes on meanwhile."""
    t = open_target(obj, pair)
    try:
        t.pause()
        job = combined_job(t.query()) or {}
    finally:
        t.close()
    out(f"{pair}: the {job.get('kind', 'copy')} is paused at {job.get('tracks_done', 0)}/"
        f"{job.get('tracks_total', 0)} tracks; continue with: pymirror resume {pair}")


@cli.command()
@click.argument("pair")
@click.pass_obj
def cancel(obj: Ctx, pair: str) -> None:
    """Stop an establish: the pair goes back to split and its mirror is marked
    inconsistent until an establish completes.  A restore cannot be cancelled
    (the standard depends on the mirror until it is done): pause it."""
    t = open_target(obj, pair)
    try:
        t.cancel()
        q = t.query()
    finally:
        t.close()
    for name, one in (q["pairs"].items() if "group" in q else [(pair, q)]):
        out(f"{name}: establish cancelled; the pair is {one['state']} and its mirror is inconsistent "
            f"({one.get('mirror_invalid', 0)} tracks invalid): establish again before restoring from it")


@cli.command("set-rate")
@click.argument("pair")
@click.argument("rate", type=SIZE)
@click.pass_obj
def set_rate(obj: Ctx, pair: str, rate: int) -> None:
    """Change the copy rate limit (bytes per second, 8M = 8 MiB/s; 0 = none) of
    the pair's copy, at once; a daemon keeps it for the pair's next copies too."""
    t = open_target(obj, pair)
    try:
        t.set_rate(rate)
    finally:
        t.close()
    out(f"{pair}: copy rate limit {format_size(rate) + '/s' if rate else 'none'}")


@cli.command()
@click.argument("pair")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on one line.")
@click.pass_obj
def query(obj: Ctx, pair: str, as_json: bool) -> None:
    """Show the pair's state, geometry, tracks pending and changed, progress.
    PAIR may be a group (through the daemon)."""
    t = open_target(obj, pair)
    try:
        info = t.query()
    finally:
        t.close()
    if as_json:
        out(json.dumps(info, sort_keys=True))
    elif "group" in info:
        out(f"group     {pair}: {len(info['pairs'])} pairs")
        for name, one in info["pairs"].items():
            out("")
            print_query(name, one)
    else:
        print_query(pair, info)


def print_query(label: str, info: dict[str, Any]) -> None:
    from .progress import describe

    if info.get("state") is None:
        out(f"pair      {label}\nstate     failed to open: {info.get('error')}")
        return
    out(f"pair      {label}\nstate     {info['state']}\n"
        f"geometry  {format_size(info['size'])}, {info['tracks']} tracks of {format_size(info['track_size'])}")
    for side in ("standard", "mirror"):
        s = info[side]
        out(f"{side:<9} {s['path']}: {s['pending']} tracks pending, {s['changed']} changed")
    if info.get("mirror_invalid"):
        out(f"          the mirror is INCONSISTENT: {info['mirror_invalid']} tracks are not part of a "
            f"point-in-time image; establish again before restoring from it")
    job = info.get("job")
    if job:
        out(f"job       {job.get('kind', 'copy')}: {describe(job)}")
        if job.get("paused"):
            out(f"          continue with: pymirror resume {label}")


@cli.command()
@click.argument("pair")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on one line.")
@click.option("--limit", type=int, default=50, show_default=True, help="Differing tracks to list (text output).")
@click.pass_obj
def verify(obj: Ctx, pair: str, as_json: bool, limit: int) -> None:
    """Compare the two sides track by track.  Exit 0 equal, 1 they differ, 2 an error."""
    t = open_target(obj, pair)
    try:
        info = t.verify()
    finally:
        t.close()
    if as_json:
        out(json.dumps(info, sort_keys=True))
    else:
        for name, one in (info["pairs"].items() if "group" in info else [(pair, info)]):
            diff = one["differing"]
            if not diff:
                out(f"{name}: equal ({one['tracks']} tracks compared)")
            else:
                shown = ", ".join(map(str, diff[:limit])) + (" ..." if len(diff) > limit else "")
                out(f"{name}: {len(diff)} of {one['tracks']} tracks differ: {shown}")
    sys.exit(EXIT_OK if info["equal"] else EXIT_NO)


@cli.command()
@click.argument("pair")
@click.option("--timeout", type=click.FloatRange(min=0), default=None, help="Give up after S seconds (exit 3).")
@click.pass_obj
def wait(obj: Ctx, pair: str, timeout: Optional[float]) -> None:
    """Wait until the pair's copy is done (exit 0, also at once when there is
    none), paused on an error (exit 1) or the timeout passes (exit 3).  A copy
    paused on request keeps it waiting."""
    t = open_target(obj, pair)
    try:
        job = combined_job(t.query())
        if job and not t.has_runner() and not (job.get("paused") and job.get("error")):
            raise errors.StateError(f"the {job.get('kind', 'copy')} of {pair} is interrupted and no daemon "
                                    f"runs it: continue it with 'pymirror resume {pair}'")
        status = t.wait(timeout)
        if status == PAUSED_ERROR:
            job = combined_job(t.query()) or {}
    finally:
        t.close()
    if status == DONE:
        return
    if status == TIMEOUT:
        fail(f"{pair}: still copying after {timeout:g} s", EXIT_TIMEOUT)
    fail(f"the {job.get('kind', 'copy')} of {pair} is paused on an error at track {job.get('error_track')}: "
         f"{job.get('error')}; fix the cause, then: pymirror resume {pair}", EXIT_NO)


# -- the service ----------------------------------------------------------------
@cli.command()
@click.argument("metas", nargs=-1, metavar="[META]...", type=click.Path(dir_okay=False))
@click.option("--control", "daemon_control", type=click.Path(dir_okay=False), default=None, metavar="PATH",
              help="The control socket (default: the global --control, then the default path).")
@click.option("--state-dir", type=click.Path(file_okay=False), default=None,
              help="Where the set of pairs is remembered (default: $XDG_STATE_HOME/pymirror, "
                   "/var/lib/pymirror for root).")
@click.option("--socket", "socket_path", type=click.Path(dir_okay=False), default=None,
              help="Export every pair over NBD on this unix socket (mode 0660).")
@click.option("--listen", default=None, metavar="HOST:PORT",
              help="Export every pair over NBD on TCP (loopback unless --allow-remote).")
@click.option("--socket-group", default=None, metavar="GROUP",
              help="Group owning the NBD socket (its members may connect; default: yours).")
@click.option("--allow-remote", is_flag=True, help="Allow --listen on a non-loopback address.")
@click.pass_obj
def daemon(obj: Ctx, metas: tuple[str, ...], daemon_control: Optional[str], state_dir: Optional[str],
           socket_path: Optional[str], listen: Optional[str], socket_group: Optional[str],
           allow_remote: bool) -> None:
    """Run the service in the foreground: hold pairs (these META files plus
    those remembered in the state dir), take commands on the control socket,
    export each pair over NBD (NAME: the standard, NAME/mirror: the mirror).
    Stops cleanly on SIGTERM or SIGINT (exit 0)."""
    from .service.daemon import run

    address = parse_listen(listen) if listen is not None else None
    rv = run(metas=[os.path.realpath(m) for m in metas], control=daemon_control or obj.control,
             state_dir=state_dir, socket_path=socket_path, listen=address, allow_remote=allow_remote,
             socket_group=socket_group, config=obj.settings.copy)
    sys.exit(rv if isinstance(rv, int) else EXIT_OK)


@cli.command()
@click.argument("meta", type=click.Path(dir_okay=False))
@click.option("--name", default=None, help="The name to hold it under (default: the meta file's stem).")
@click.pass_obj
def attach(obj: Ctx, meta: str, name: Optional[str]) -> None:
    """Add a pair to the running daemon (it resumes an interrupted copy)."""
    if not os.path.exists(meta):
        raise errors.MirrorError(f"{meta}: no such pair metadata file (create one with 'pymirror pair')")
    client = need_client(obj, "attach")
    try:
        got = client.attach(os.path.realpath(meta), name=name)
    finally:
        client.close()
    held = got.get("name") if isinstance(got, dict) else got
    out(f"{meta}: attached as {held or name or os.path.splitext(os.path.basename(meta))[0]}")


@cli.command()
@click.argument("name")
@click.pass_obj
def detach(obj: Ctx, name: str) -> None:
    """Remove a pair from the running daemon: its NBD clients are
    disconnected cleanly, its metadata committed and closed."""
    client = need_client(obj, "detach")
    try:
        target = client.find(os.path.realpath(name) if os.path.exists(name) else name)
        if not target:
            raise errors.MirrorError(f"{name}: the daemon holds no pair of that name (see 'pymirror status')")
        client.detach(target)
    finally:
        client.close()
    out(f"{name}: detached")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on one line.")
@click.pass_obj
def status(obj: Ctx, as_json: bool) -> None:
    """Every pair the daemon holds: state, progress, NBD clients, and the last
    event (why a copy stopped)."""
    client = need_client(obj, "status")
    try:
        st = client.status()
    finally:
        client.close()
    if as_json:
        out(json.dumps(st, sort_keys=True))
        return
    print_status(st)


def print_status(st: Any) -> None:
    from .progress import describe

    d = st.get("daemon") if isinstance(st, dict) else None
    if d:
        nbd = ", ".join(d.get("nbd") or []) or "no NBD export"
        out(f"daemon pid {d.get('pid')}, up {d.get('uptime')} s, control {d.get('control')}, {nbd}")
    pairs = _status_pairs(st)
    if not pairs:
        out("no pairs (add one with 'pymirror attach META')")
    for p in pairs:
        state = p.get("state")
        line = f"{p.get('name')}: {state}" if state else f"{p.get('name')}: failed to open: {p.get('error')}"
        if p.get("mirror_invalid"):
            line += f", mirror INCONSISTENT ({p['mirror_invalid']} tracks invalid)"
        if "clients" in p:
            line += f", {p['clients']} NBD client{'' if p['clients'] == 1 else 's'}"
        if p.get("groups"):
            line += f", group {' '.join(p['groups'])}"
        out(line)
        job = p.get("job")
        if job:
            why = " (paused by request)" if job.get("paused") and p.get("paused_by_request") else ""
            out(f"  {job.get('kind', 'copy')}: {describe(job)}{why}")
        if p.get("verify"):
            v = p["verify"]
            out(f"  verify: {v.get('tracks_done')}/{v.get('tracks_total')} tracks compared")
        events = p.get("events") or ([p["last_event"]] if p.get("last_event") else [])
        if events:
            out(f"  last event: {format_event(events[-1])}")
    for g, members in _status_groups(st).items():
        out(f"group {g}: {' '.join(members)}")


def format_event(ev: dict[str, Any]) -> str:
    """One line for an event (the daemon's own log wording)."""
    from .progress import describe

    name = str(ev.get("event", "?"))
    data = dict(ev.get("data") or {})
    if name == "job-progress":
        who = f"{data['pair']}: " if data.get("pair") else ""
        return f"{_stamp(ev)} {who}{data.get('kind', 'copy')} {describe(data)}"
    try:
        from .service.events import describe as describe_event
    except ImportError:  # pragma: no cover
        return f"{_stamp(ev)} {name} {json.dumps(data, sort_keys=True)}"
    return f"{_stamp(ev)} {describe_event(name, data)}"


@cli.command()
@click.argument("pair", required=False)
@click.option("--json", "as_json", is_flag=True, help="One event per line, as JSON.")
@click.option("--until-done", is_flag=True,
              help="Return when PAIR has no copy left (exit 0) or it pauses on an error (exit 1).")
@click.pass_obj
def watch(obj: Ctx, pair: Optional[str], as_json: bool, until_done: bool) -> None:
    """Show the daemon's events as they happen (state changes, progress, jobs
    paused or done, NBD clients), for PAIR or every pair, until Ctrl-C."""
    if until_done and pair is None:
        raise click.BadParameter("--until-done needs a PAIR", param_hint="'--until-done'")
    client = need_client(obj, "watch")
    try:
        name = None
        if pair is not None:
            name = client.find(os.path.realpath(pair) if os.path.exists(pair) else pair)
            if not name:
                raise errors.MirrorError(f"{pair}: the daemon holds no pair of that name (see 'pymirror status')")
        events = _events(client, name)          # subscribed from here on: no event is missed
        if until_done:
            q = dict(client.pair(name).query())
            if not combined_job(q):
                out(f"{pair}: {q.get('state', 'group')}, no copy in progress")
                return
        for ev in events:
            out(json.dumps(ev, sort_keys=True) if as_json else format_event(ev))
            sys.stdout.flush()
            if until_done:
                kind, data = ev.get("event"), ev.get("data") or {}
                if kind == "job-done" and data.get("kind") != "verify" and \
                        not combined_job(dict(client.pair(name).query())):
                    return          # (a group: when the last of its pairs is done)
                if kind == "job-paused" and data.get("error"):
                    sys.exit(EXIT_NO)
    finally:
        client.close()


def _events(client: Any, name: Optional[str]) -> Iterator[dict[str, Any]]:
    """The daemon's live events (subscribed when this is called)."""
    return client.events(pair=name)


def _stamp(ev: dict[str, Any]) -> str:
    import time

    ts = ev.get("timestamp")
    if isinstance(ts, dict):
        ts = ts.get("seconds", 0) + ts.get("microseconds", 0) / 1e6
    if not isinstance(ts, (int, float)):
        return "--:--:--"
    return time.strftime("%H:%M:%S", time.localtime(ts)) + f".{int(ts * 1000) % 1000:03d}"


@cli.group("group", cls=Group)
def group_cmd() -> None:
    """Consistency groups of pairs held by the daemon: split, establish,
    restore and query take a group's name and act on every pair at one instant."""


@group_cmd.command("create")
@click.argument("name")
@click.argument("pairs", nargs=-1, required=True)
@click.pass_obj
def group_create(obj: Ctx, name: str, pairs: tuple[str, ...]) -> None:
    """Make group NAME of the daemon's PAIRS (names or meta paths)."""
    client = need_client(obj, "group create")
    try:
        names = []
        for p in pairs:
            n = client.find(os.path.realpath(p) if os.path.exists(p) else p)
            if not n:
                raise errors.MirrorError(f"{p}: the daemon holds no pair of that name (see 'pymirror status')")
            names.append(n)
        client.group_create(name, names)
    finally:
        client.close()
    out(f"group {name}: {' '.join(names)}")


@group_cmd.command("delete")
@click.argument("name")
@click.pass_obj
def group_delete(obj: Ctx, name: str) -> None:
    """Forget group NAME (its pairs stay held)."""
    client = need_client(obj, "group delete")
    try:
        client.execute("group-delete", name=name)
    finally:
        client.close()
    out(f"group {name}: deleted")


# -- the rest -------------------------------------------------------------------
@cli.command()
@click.argument("meta", type=click.Path(dir_okay=False))
@serve_options
@click.pass_obj
def serve(obj: Ctx, meta: str, socket_path: Optional[str], listen: Optional[str], allow_remote: bool) -> None:
    """Export one pair over NBD (exports "" / "standard" and "mirror") until
    Ctrl-C or SIGTERM, without a daemon.  A paused copy job is resumed while serving."""
    if socket_path is None and listen is None:
        raise ValueError("serve needs --socket PATH or --listen HOST:PORT")
    if not os.path.exists(meta):
        raise errors.MirrorError(f"{meta}: no such pair metadata file (create one with 'pymirror pair')")
    t = LocalTarget(meta, meta, obj.settings)
    server = None
    try:
        server = start_server(t.pair, socket_path, listen, allow_remote)
        if t.pair.progress.running:
            kind = "restore" if t.pair.state == "restoring" else "establish"
            t.resume()
            follow_job(t, kind, server)
            server = None
            return
        note("serving; stop with Ctrl-C")
        wait_forever()
    except KeyboardInterrupt as exc:
        note("\nshutting down")
        if server is not None:
            server.shutdown()
            server = None
        t.close()
        sys.exit(exit_code_for(exc))
    finally:
        if server is not None:
            server.shutdown()
        t.close()


@cli.command()
@click.option("--size", type=VOLUME_SIZE, default="256M", show_default=True, help="Size of each volume.")
@click.option("--track-size", type=SIZE, default="64K", show_default=True)
@click.option("--damage", type=click.FloatRange(0.001, 1.0), default=0.25, show_default=True,
              help="Fraction of tracks the demo overwrites after the split.")
@click.option("--rate", type=SIZE, default="256M", show_default=True,
              help="Restore rate limit (so the host writer visibly overlaps the restore; 0 = none).")
@click.option("--dir", "workdir", type=click.Path(file_okay=False), default=None,
              help="Work in this folder and keep the files (default: a temporary folder, removed).")
@click.option("--seed", type=int, default=1, show_default=True)
def demo(size: int, track_size: int, damage: float, rate: int, workdir: Optional[str], seed: int) -> None:
    """Establish, split, damage, restore while a host writes, and check
    every invariant it can.  Exits 1 if a check fails."""
    from .demo import run_demo

    ok = run_demo(size=size, track_size=track_size, damage=damage, rate=rate, workdir=workdir, seed=seed)
    sys.exit(EXIT_OK if ok else EXIT_NO)


def stdout_closed() -> None:
    """When the reader of stdout went away (``pymirror query p.meta | head -1``):
    exit quietly with 141, as a tool killed by SIGPIPE does.  Returns when
    stdout is fine (the broken pipe was another one: an error like any other)."""
    import select

    try:
        fd = sys.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        events = dict(poller.poll(0)).get(fd, 0)
    except (OSError, ValueError, AttributeError):
        return
    if not events & (select.POLLERR | select.POLLHUP):
        return
    # keep Python from complaining again when it flushes stdout at exit
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    sys.exit(EXIT_PIPE)


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point: every error is one line on stderr (``--debug`` for the
    traceback of a non-usage error), never a traceback for a user's mistake."""
    try:
        rv = cli.main(args=argv, prog_name="pymirror", standalone_mode=False)
        sys.stdout.flush()
    except click.UsageError as exc:
        hint = f" (see 'pymirror {exc.ctx.command_path.partition(' ')[2] if exc.ctx else ''} --help')"
        hint = hint.replace("pymirror  --help", "pymirror --help")
        click.echo(f"Error: {exc.format_message()}{hint}", err=True)
        sys.exit(EXIT_ERROR)
    except click.ClickException as exc:
        click.echo(f"Error: {exc.format_message()}", err=True)
        sys.exit(EXIT_ERROR if exc.exit_code == 1 else exc.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt) as exc:
        cause = exc if isinstance(exc, KeyboardInterrupt) else exc.__cause__
        code = exit_code_for(cause) if isinstance(cause, KeyboardInterrupt) else 130
        click.echo("terminated" if code == 143 else "interrupted", err=True)
        sys.exit(code)
    except BrokenPipeError:
        stdout_closed()
        raise
    sys.exit(rv if isinstance(rv, int) else EXIT_OK)


def cli_reference() -> str:
    """The README's CLI reference, generated from the commands' own help
    (tests/test_readme.py checks that README.md carries exactly this)."""
    parts = []

    def walk(cmd: click.Command, path: str) -> None:
        with click.Context(cmd, info_name=path, terminal_width=100, max_content_width=100) as ctx:
            parts.append(f"#### `{path}`\n\n```text\n{cmd.get_help(ctx)}\n```\n")
        if isinstance(cmd, click.Group):
            for name in sorted(cmd.commands):
                walk(cmd.commands[name], f"{path} {name}")
    walk(cli, "pymirror")
    return "\n".join(parts)


if __name__ == "__main__":  # pragma: no cover
    main()
