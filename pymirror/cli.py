"""The ``pymirror`` command line.

Verbs after TimeFinder's (establish, split, restore, query, verify), shapes
after drbdadm/qemu-img: one line per error, ``--json`` for scripts, a live
progress bar on a terminal and plain lines elsewhere.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any, Callable, NoReturn, Optional, TypeVar

import click

from . import errors
from .config import ConfigError, CopyConfig, Settings, load_settings
from .sizes import format_seconds, format_size, parse_size

F = TypeVar("F", bound=Callable[..., Any])
MiB = 1 << 20


# -- parameter types ----------------------------------------------------------
class SizeType(click.ParamType):
    name = "SIZE"

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(value, param.name if param and param.name else "size")
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


SIZE = SizeType()


@dataclass
class Ctx:
    debug: bool
    config_path: Optional[str]
    _settings: Optional[Settings] = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(self.config_path)
        return self._settings


# -- errors: one line, no traceback (unless --debug) --------------------------
def user_message(exc: BaseException) -> Optional[str]:
    """The one-line message for a user's mistake, or None for a bug."""
    if isinstance(exc, errors.MirrorError) or isinstance(exc, ConfigError):
        return str(exc)
    if isinstance(exc, FileNotFoundError):
        return f"{exc.filename or ''}: no such file{'' if not exc.filename else ''}".lstrip(": ")
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        if exc.errno in (errno.EWOULDBLOCK, errno.EBUSY):
            return f"{where}{exc.strerror} (is another pymirror process using this pair?)"
        return f"{where}{exc.strerror or exc}"
    if isinstance(exc, ValueError):
        return str(exc)
    return None


class Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            obj = ctx.obj
            if isinstance(obj, Ctx) and obj.debug:
                raise
            msg = user_message(exc)
            if msg is None:
                raise
            raise click.ClickException(msg) from None


def fail(msg: str, code: int = 1) -> NoReturn:
    click.echo(f"Error: {msg}", err=True)
    sys.exit(code)


# -- shared options -----------------------------------------------------------
def copy_options(f: F) -> F:
    opts = [
        click.option("--rate", type=SIZE, default=None, help="Copy rate limit in bytes per second (8M = 8 MiB/s; 0 = none)."),
        click.option("--copiers", type=click.IntRange(1, 64), default=None, help="Copier threads (default: auto, 2 for files)."),
        click.option("--batch-size", type=SIZE, default=None, help="Largest copy I/O (default: auto, 4M)."),
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


def build_config(obj: Ctx, rate: Optional[int] = None, copiers: Optional[int] = None,
                 batch_size: Optional[int] = None, read_policy: Optional[str] = None) -> CopyConfig:
    return obj.settings.copy.replace(rate=rate, copiers=copiers, batch_size=batch_size,
                                     read_policy=read_policy)


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--listen {text!r} must be HOST:PORT, e.g. 127.0.0.1:10809")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def open_pair(meta: str, obj: Ctx) -> Any:
    from .pair import Pair

    if not os.path.exists(meta):
        raise errors.MirrorError(f"{meta}: no such pair metadata file (create one with 'pymirror pair')")
    return Pair.open(meta, config=obj.settings.copy)


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
    click.echo(f"serving {pair.meta_path or 'pair'} over NBD at {server.uri}", err=True)
    return server


def _sigterm_as_interrupt() -> None:
    """SIGINT and SIGTERM both stop a long command cleanly.  SIGINT is set
    explicitly: a process started in the background by a shell inherits it
    ignored, and a server must still stop on it."""
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def wait_forever() -> None:
    try:
        while True:
            signal.pause()
    except AttributeError:  # pragma: no cover (no signal.pause on Windows)
        import time
        while True:
            time.sleep(3600)


def run_job(pair: Any, job: Any, label: str, meta: str, server: Any) -> None:
    """Follow a job to its end with progress; on Ctrl-C/SIGTERM leave it
    committed and resumable.  With a server, keep serving afterwards."""
    from .progress import describe, follow

    try:
        p = follow(job, label)
        click.echo(f"{label} complete: the pair is {pair.state} "
                   f"({p.tracks_total} tracks, {format_size(p.bytes_written)} copied in {p.elapsed:.2f} s)",
                   err=True)
        if server is not None:
            click.echo(f"still serving at {server.uri}; stop with Ctrl-C", err=True)
            wait_forever()
    except KeyboardInterrupt:
        p = pair.progress
        if server is not None:
            server.shutdown()
        pair.close()
        if p.running:
            click.echo(f"\ninterrupted: {label} stopped at {describe(p)}; metadata committed. "
                       f"Continue with: pymirror resume {meta}", err=True)
            sys.exit(130)
        click.echo("\nstopped", err=True)
        return
    except errors.JobError as exc:
        if server is not None:
            server.shutdown()
        pair.close()
        fail(f"{exc}. Continue with: pymirror resume {meta}")
    if server is not None:
        server.shutdown()
    pair.close()


# -- the commands -------------------------------------------------------------
@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Configuration file (default: $PYMIRROR_CONFIG, then ~/.config/pymirror/config.toml).")
@click.version_option(package_name="pymirror")
@click.pass_context
def cli(ctx: click.Context, debug: bool, config_path: Optional[str]) -> None:
    """Keep a mirror of a block volume, and restore the volume from it while
    the host keeps using it."""
    ctx.obj = Ctx(debug=debug, config_path=config_path)
    _sigterm_as_interrupt()


@cli.command()
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--size", type=SIZE, required=True, help="Volume size, e.g. 1G.")
@click.option("--track-size", type=SIZE, default=None, help="Track size (default 64K, or the config file's).")
@click.pass_obj
def create(obj: Ctx, path: str, size: int, track_size: Optional[int]) -> None:
    """Create a sparse volume image file."""
    from .volume import Volume

    if os.path.exists(path):
        raise errors.MirrorError(f"{path}: already exists; pymirror create never overwrites")
    ts = track_size or obj.settings.track_size
    with Volume.create(path, size, ts) as v:
        click.echo(f"created {path}: {format_size(v.size)} sparse volume, {v.tracks} tracks of {format_size(ts)}")


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
        click.echo(f"created pair {meta}: {standard} + {mirror}, {format_size(p.size)}, "
                   f"{p.tracks} tracks of {format_size(p.track_size)}, state {p.state}")


@cli.command()
@click.argument("meta", type=click.Path(dir_okay=False))
@click.option("--incremental", is_flag=True, help="Copy only the tracks changed on either side since the split.")
@click.option("--assume-equal", is_flag=True,
              help="New pair only: skip the copy, the two volumes are known to be identical (e.g. both blank).")
@copy_options
@serve_options
@click.pass_obj
def establish(obj: Ctx, meta: str, incremental: bool, assume_equal: bool, rate: Optional[int],
              copiers: Optional[int], batch_size: Optional[int], socket_path: Optional[str],
              listen: Optional[str], allow_remote: bool) -> None:
    """Copy the standard to the mirror and keep them identical."""
    pair = open_pair(meta, obj)
    try:
        job = pair.establish(incremental=incremental, config=build_config(obj, rate, copiers, batch_size),
                             assume_equal=assume_equal)
        server = start_server(pair, socket_path, listen, allow_remote)
    except BaseException:
        pair.close()
        raise
    run_job(pair, job, "establish", meta, server)


@cli.command()
@click.argument("meta", type=click.Path(dir_okay=False))
@click.pass_obj
def split(obj: Ctx, meta: str) -> None:
    """Split the mirror off: it becomes an independent volume (instant)."""
    with open_pair(meta, obj) as pair:
        pair.split()
        click.echo(f"{meta}: split; both sides now record changed tracks")


@cli.command()
@click.argument("meta", type=click.Path(dir_okay=False))
@click.option("--incremental", is_flag=True, help="Restore only the tracks changed on either side since the split.")
@click.option("--protect/--no-protect", default=True, show_default=True,
              help="Keep the mirror write-disabled and unchanged during the restore.")
@click.option("--read-policy", type=click.Choice(["redirect", "hydrate"]), default=None,
              help="Reads of not-yet-restored tracks: serve from the mirror, or copy the track first.")
@copy_options
@serve_options
@click.pass_obj
def restore(obj: Ctx, meta: str, incremental: bool, protect: bool, read_policy: Optional[str],
            rate: Optional[int], copiers: Optional[int], batch_size: Optional[int],
            socket_path: Optional[str], listen: Optional[str], allow_remote: bool) -> None:
    """Restore the standard from the mirror while the host keeps using it."""
    pair = open_pair(meta, obj)
    try:
        job = pair.restore(incremental=incremental, protect=protect,
                           config=build_config(obj, rate, copiers, batch_size, read_policy))
        server = start_server(pair, socket_path, listen, allow_remote)
    except BaseException:
        pair.close()
        raise
    run_job(pair, job, "restore", meta, server)


@cli.command()
@click.argument("meta", type=click.Path(dir_okay=False))
@copy_options
@serve_options
@click.pass_obj
def resume(obj: Ctx, meta: str, rate: Optional[int], copiers: Optional[int], batch_size: Optional[int],
           socket_path: Optional[str], listen: Optional[str], allow_remote: bool) -> None:
    """Continue an establish or restore that was interrupted or paused."""
    pair = open_pair(meta, obj)
    try:
        label = "restore" if pair.state == "restoring" else "establish"
        job = pair.resume(config=build_config(obj, rate, copiers, batch_size))
        click.echo(f"resuming the {label} of {meta}", err=True)
        server = start_server(pair, socket_path, listen, allow_remote)
    except BaseException:
        pair.close()
        raise
    run_job(pair, job, label, meta, server)


@cli.command()
@click.argument("meta", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_obj
def query(obj: Ctx, meta: str, as_json: bool) -> None:
    """Show the pair's state, geometry, tracks pending and changed, progress."""
    from .pair import track_counts

    with open_pair(meta, obj) as pair:
        p = pair.progress
        counts = track_counts(pair)
        info: dict[str, Any] = {
            "meta": meta, "state": pair.state, "size": pair.size, "track_size": pair.track_size,
            "tracks": pair.tracks,
            "standard": {"path": pair.standard.path, **counts["standard"]},
            "mirror": {"path": pair.mirror.path, **counts["mirror"]},
            "job": p.as_dict() if p.running or p.tracks_total else None,
        }
    if as_json:
        click.echo(json.dumps(info, indent=2, sort_keys=True))
        return
    click.echo(f"pair      {meta}\nstate     {info['state']}\n"
               f"geometry  {format_size(info['size'])}, {info['tracks']} tracks of {format_size(info['track_size'])}")
    for side in ("standard", "mirror"):
        s = info[side]
        click.echo(f"{side:<9} {s['path']}: {s['pending']} tracks pending, {s['changed']} changed")
    if p.running:
        from .progress import describe
        click.echo(f"job       {describe(p)}")
        click.echo(f"          continue with: pymirror resume {meta}")


@cli.command()
@click.argument("meta", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--limit", type=int, default=50, show_default=True, help="Differing tracks to list (text output).")
@click.pass_obj
def verify(obj: Ctx, meta: str, as_json: bool, limit: int) -> None:
    """Compare the two sides track by track.  Exit 0 only when they are equal."""
    with open_pair(meta, obj) as pair:
        if pair.progress.running:
            raise errors.StateError(f"{meta}: a copy is in progress ({pair.state}); "
                                    f"verify compares settled volumes: resume it and let it finish first")
        diff = pair.verify()
        tracks, ts = pair.tracks, pair.track_size
    if as_json:
        click.echo(json.dumps({"meta": meta, "equal": not diff, "tracks": tracks,
                               "track_size": ts, "differing": diff}))
    elif not diff:
        click.echo(f"{meta}: equal ({tracks} tracks compared)")
    else:
        shown = ", ".join(map(str, diff[:limit])) + (" ..." if len(diff) > limit else "")
        click.echo(f"{meta}: {len(diff)} of {tracks} tracks differ: {shown}")
    sys.exit(0 if not diff else 1)


@cli.command()
@click.argument("meta", type=click.Path(dir_okay=False))
@serve_options
@click.pass_obj
def serve(obj: Ctx, meta: str, socket_path: Optional[str], listen: Optional[str], allow_remote: bool) -> None:
    """Export the pair over NBD (exports "" / "standard" and "mirror") until
    Ctrl-C or SIGTERM.  A paused copy job is resumed while serving."""
    if socket_path is None and listen is None:
        raise ValueError("serve needs --socket PATH or --listen HOST:PORT")
    pair = open_pair(meta, obj)
    server = None
    try:
        server = start_server(pair, socket_path, listen, allow_remote)
        if pair.progress.running:
            job = pair.resume()
            run_job(pair, job, "restore" if pair.state == "restoring" else "establish", meta, server)
            return
        click.echo("serving; stop with Ctrl-C", err=True)
        wait_forever()
    except KeyboardInterrupt:
        click.echo("\nshutting down", err=True)
    finally:
        if server is not None:
            server.shutdown()
        pair.close()


@cli.command()
@click.option("--size", type=SIZE, default="256M", show_default=True, help="Size of each volume.")
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
    every invariant it can.  Exits non-zero if a check fails."""
    from .demo import run_demo

    ok = run_demo(size=size, track_size=track_size, damage=damage, rate=rate, workdir=workdir, seed=seed)
    sys.exit(0 if ok else 1)


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point: every error is one line on stderr (``--debug`` for the
    traceback of a non-usage error), never a traceback for a user's mistake."""
    try:
        rv = cli.main(args=argv, prog_name="pymirror", standalone_mode=False)
    except click.UsageError as exc:
        hint = f" (see 'pymirror {exc.ctx.info_name if exc.ctx and exc.ctx.parent else ''} --help')"
        hint = hint.replace("pymirror  --help", "pymirror --help")
        click.echo(f"Error: {exc.format_message()}{hint}", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        click.echo(f"Error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    main()


def cli_reference() -> str:
    """The README's CLI reference, generated from the commands' own help
    (tests/test_readme.py checks that README.md carries exactly this)."""
    parts = []
    for name in ["", *sorted(cli.commands)]:
        cmd = cli if not name else cli.commands[name]
        with click.Context(cmd, info_name=f"pymirror {name}".strip(), terminal_width=100,
                           max_content_width=100) as ctx:
            parts.append(f"#### `pymirror {name}`\n\n```text\n{cmd.get_help(ctx)}\n```\n".replace("`pymirror `", "`pymirror`"))
    return "\n".join(parts)
