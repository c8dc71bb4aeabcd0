"""The ``pymirror`` command line.

Verbs after TimeFinder's (establish, split, restore, query, verify), shapes
after drbdadm/qemu-img: one line per error, ``--json`` for scripts, a live
progress bar on a terminal and plain lines elsewhere.

This file holds the command group, what every command shares (options,
errors, signals, exit codes) and the commands on volumes and files (create,
pair, serve, demo); the pair verbs are in cli_pair.py (each goes to the
daemon that holds the pair, else acts on the pair right here: targets.py),
the daemon's own commands in cli_service.py.

Exit codes, for every command: 0 success; 1 a negative answer (``verify``:
the sides differ; ``wait`` or a job verb: the job paused on an error); 2 an
error (bad input, no such pair, refused in this state, daemon unreachable);
3 a timeout (``wait --timeout``); 130 on SIGINT, 143 on SIGTERM.  Results go
to stdout; progress and diagnostics to stderr.
"""
from __future__ import annotations

import errno
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any, Callable, NoReturn, Optional, TypeVar

import click

from . import errors
from .command import Interrupted, exit_code_for, signals_stop_the_command, warnings_are_one_line  # noqa: F401
from .config import ConfigError, Settings, load_settings
from .sizes import format_size, parse_size
from .targets import LocalTarget

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


# -- signals (SIGINT exits 130, SIGTERM 143) and one-line warnings: pymirror.command
_signals_stop_the_command = signals_stop_the_command
_warnings_are_one_line = warnings_are_one_line


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
        click.option("--copiers", type=click.IntRange(1, 64), default=None, help="Copier threads (default: auto, 2 for files)."),
        click.option("--batch-size", type=SIZE, default=None, help="Largest copy I/O (default: auto, 4M)."),
        click.option("--pace", type=click.Choice(["auto", "off"]), default=None,
                     help="auto (default): keep host latency within --host-latency-target while using the "
                          "bandwidth left; off: full speed (--rate caps both)."),
        click.option("--host-latency-target", default=None, metavar="TARGET",
                     help="Host p99 latency the pacing keeps: a factor of the idle latency (2x, the default) "
                          "or a time (5ms)."),
        click.option("--order", type=click.Choice(["hot", "ascending"]), default=None,
                     help="hot (default): tracks the host uses are copied first; ascending: volume order."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _keep_tls(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    ctx.meta[param.name or ""] = value
    return value


def _tls_options() -> dict[str, Any]:
    ctx = click.get_current_context(silent=True)
    meta = ctx.meta if ctx is not None else {}
    return dict(tls=meta.get("nbd_tls") or "off", tls_certs=meta.get("nbd_tls_certs"),
                tls_psk=meta.get("nbd_tls_psk"), tls_verify_peer=bool(meta.get("nbd_tls_verify_peer")))


def serve_options(f: F) -> F:
    opts = [
        click.option("--socket", "socket_path", type=click.Path(dir_okay=False), default=None,
                     help="Export the standard volume over NBD on this unix socket while the command runs."),
        click.option("--listen", default=None, metavar="HOST:PORT",
                     help="Export over NBD on TCP (loopback unless --allow-remote)."),
        click.option("--allow-remote", is_flag=True, help="Allow --listen on a non-loopback address."),
        # TLS (pymirror/nbd/tls.py): kept in the context, not passed to each command
        click.option("--tls", "nbd_tls", type=click.Choice(["off", "on", "require"]), default="off",
                     expose_value=False, callback=_keep_tls, help="TLS for the NBD export (STARTTLS)."),
        click.option("--tls-certs", "nbd_tls_certs", type=click.Path(file_okay=False), default=None,
                     expose_value=False, callback=_keep_tls,
                     help="x509: a directory with ca-cert.pem, server-cert.pem, server-key.pem."),
        click.option("--tls-psk", "nbd_tls_psk", type=click.Path(dir_okay=False), default=None,
                     expose_value=False, callback=_keep_tls, help="PSK: a psktool key file."),
        click.option("--tls-verify-peer", "nbd_tls_verify_peer", is_flag=True, default=False,
                     expose_value=False, callback=_keep_tls,
                     help="x509: clients must present a certificate signed by ca-cert.pem's CA."),
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

    tls = _tls_options()
    if listen is not None:
        host, port = parse_listen(listen)
        server = NBDServer(pair, host=host, port=port, allow_remote=allow_remote, **tls)
    else:
        server = NBDServer(pair, socket_path=socket_path, **tls)
    server.start()
    note(f"serving {pair.meta_path or 'pair'} over NBD at {server.uri}")
    return server


def wait_forever() -> None:
    while True:
        signal.pause()


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
    _warnings_are_one_line()


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
    if path.startswith("rbd:"):   # an RBD image (branch rbd, issue 14)
        from .volume_rbd import create_image
        u = create_image(path, size)
        out(f"created {u.short}: {format_size(size)} RBD image")
        return
    if os.path.exists(path):
        raise errors.MirrorError(f"{path}: already exists; pymirror create never overwrites")
    with Volume.create(path, size) as v:
        out(f"created {path}: {format_size(v.size)} sparse volume")


@cli.command("pair")
@click.argument("meta", type=click.Path(dir_okay=False))
@click.option("--standard", required=True, metavar="PATH|URI",
              help="The host's volume: a path, or a URI (nbd://HOST/EXPORT, nbd+unix:///EXPORT?socket=PATH, "
                   "rbd:POOL/IMAGE; see docs/volumes.md).")
@click.option("--mirror", required=True, metavar="PATH|URI", help="The mirror volume (same size), a path or a URI.")
@click.option("--track-size", type=SIZE, default=None, help="Track size (default 64K, or the config file's).")
@click.option("--adopt", is_flag=True,
              help="Two volumes that already hold data: compare them and start split, with the tracks "
                   "that differ marked changed (an incremental establish or restore copies exactly those).")
@click.option("--relocate", is_flag=True,
              help="Point the existing pair META at its moved volumes (checked: size and sampled checksums).")
@click.pass_obj
def pair_cmd(obj: Ctx, meta: str, standard: str, mirror: str, track_size: Optional[int], adopt: bool,
             relocate: bool) -> None:
    """Create the metadata of a pair of two volumes (state: new; with --adopt: split), or with
    --relocate point an existing pair at its volumes' new paths."""
    from .pair import Pair

    if relocate and adopt:
        raise click.UsageError("--relocate and --adopt cannot be combined")
    if relocate:
        if track_size is not None:
            raise click.BadParameter("a relocated pair keeps its track size", param_hint="'--track-size'")
        if not os.path.exists(meta):
            raise errors.MirrorError(f"{meta}: no such pair metadata file (relocate points an existing pair "
                                     f"at moved volumes)")
        for role, path in (("standard", standard), ("mirror", mirror)):
            if not os.path.exists(path):
                raise errors.MirrorError(f"{role} volume {path}: no such file")
        with Pair.relocate(meta, os.path.abspath(standard), os.path.abspath(mirror)) as p:
            note_ = p.volume_trust("standard")["note"]
            out(f"relocated pair {meta}: {p.standard.path} + {p.mirror.path}, state {p.state} ({note_})")
        return
    if os.path.exists(meta):
        raise errors.MirrorError(f"{meta}: already exists; pymirror pair never overwrites metadata")
    from .uri import parse

    for role, path in (("standard", standard), ("mirror", mirror)):
        u = parse(path)
        if u.kind == "file" and not os.path.exists(u.path or path):
            raise errors.MirrorError(f"{role} volume {path}: no such file (make one with 'pymirror create')")
    ts = track_size or obj.settings.track_size
    if adopt:
        from .cli_compare import adopt_here

        adopt_here(meta, standard, mirror, ts)
        return
    with Pair.create(meta, standard, mirror, track_size=ts) as p:
        out(f"created pair {meta}: {standard} + {mirror}, {format_size(p.size)}, "
            f"{p.tracks} tracks of {format_size(p.track_size)}, state {p.state}")


@cli.command("check")
@click.argument("meta", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on one line.")
def check_cmd(meta: str, as_json: bool) -> None:
    """Report the health of a pair's metadata file: each header slot (valid
    or why not, format, generation, state) and its tables' CRC-32Cs.  Writes
    nothing.  Exit 0 healthy, 1 damaged but usable, 2 unusable."""
    import json

    from .check import check_metadata, describe

    if not os.path.exists(meta):
        raise errors.MirrorError(f"{meta}: no such file")
    report = check_metadata(meta)
    if as_json:
        out(json.dumps(report, sort_keys=True))
    else:
        for line in describe(report):
            out(line)
    sys.exit(report["verdict"])


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
    from .cli_pair import follow_job

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


# the pair verbs and the service's commands register themselves on `cli`
from . import cli_pair, cli_service  # noqa: E402,F401  (after `cli` exists)


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
