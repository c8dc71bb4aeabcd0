"""The command line's commands for a running daemon: daemon, attach,
detach, status, watch, group.  Registered on :data:`pymirror.cli.cli`."""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Iterator, Optional

import click

from . import errors
from .cli import EXIT_NO, EXIT_OK, Ctx, Group, cli, out, parse_listen
from .targets import combined_job, connect_or_none, control_label


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
@click.option("--tls", "nbd_tls", type=click.Choice(["off", "on", "require"]), default="off",
              help="TLS for the NBD exports (STARTTLS; docs/nbd.md).")
@click.option("--tls-certs", type=click.Path(file_okay=False), default=None,
              help="x509: a directory with ca-cert.pem, server-cert.pem, server-key.pem.")
@click.option("--tls-psk", type=click.Path(dir_okay=False), default=None, help="PSK: a psktool key file.")
@click.option("--tls-verify-peer", is_flag=True, default=False,
              help="x509: clients must present a certificate signed by ca-cert.pem's CA.")
@click.pass_obj
def daemon(obj: Ctx, metas: tuple[str, ...], daemon_control: Optional[str], state_dir: Optional[str],
           socket_path: Optional[str], listen: Optional[str], socket_group: Optional[str],
           allow_remote: bool, nbd_tls: str, tls_certs: Optional[str], tls_psk: Optional[str],
           tls_verify_peer: bool) -> None:
    """Run the service in the foreground: hold pairs (these META files plus
    those remembered in the state dir), take commands on the control socket,
    export each pair over NBD (NAME: the standard, NAME/mirror: the mirror).
    Stops cleanly on SIGTERM or SIGINT (exit 0)."""
    from .nbd.listener import check_tcp
    from .nbd.tls import Credentials
    from .service.daemon import run

    address = parse_listen(listen) if listen is not None else None
    # bad NBD settings fail here, before the daemon makes its state dir or sockets
    if address is not None:
        check_tcp(address[0], address[1], allow_remote)
    Credentials(nbd_tls, tls_certs, tls_psk, tls_verify_peer)
    rv = run(metas=[os.path.realpath(m) for m in metas], control=daemon_control or obj.control,
             state_dir=state_dir, socket_path=socket_path, listen=address, allow_remote=allow_remote,
             socket_group=socket_group, config=obj.settings.copy,
             nbd_tls=dict(tls=nbd_tls, tls_certs=tls_certs, tls_psk=tls_psk, tls_verify_peer=tls_verify_peer))
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
        if p.get("detached"):
            from .detach import describe as describe_detach
            out(f"  {describe_detach(p['detached'], p.get('name') or 'PAIR')}")
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
