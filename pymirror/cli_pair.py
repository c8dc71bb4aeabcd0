"""The pair verbs of the command line: establish, split, restore, resume,
pause, cancel, set-rate, query, verify, wait.

Each one goes to the daemon that holds the pair, else acts on the pair right
here (targets.py); a job verb follows its copy with progress until it is
done, the same way both ways.  Registered on :data:`pymirror.cli.cli`.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable, Optional

import click

from . import errors
from .cli import (EXIT_NO, EXIT_OK, EXIT_TIMEOUT, SIZE, Ctx, cli, copy_options, exit_code_for, fail,
                  job_options, note, out, serve_options, start_server, wait_forever)
from .sizes import format_size
from .targets import (DONE, PAUSED_ERROR, TIMEOUT, LocalTarget, RemoteTarget, combined_job, connect_or_none,
                      control_label, take_started)


# -- finding the pair: the daemon that holds it, else here --------------------
def open_target(obj: Ctx, arg: str) -> "LocalTarget | RemoteTarget":
    """The daemon's pair named (or with the meta path) ``arg``, else the pair
    opened here from the meta path ``arg``."""
    started = take_started(arg)     # its job already started (pymirror.command)
    if started is not None:
        return started
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



def pace_options(pace: Optional[str], host_latency_target: Optional[str], order: Optional[str]) -> dict[str, Any]:
    """--pace, --host-latency-target, --order as copy settings; a bad target
    is the user's mistake, reported before anything is opened."""
    if host_latency_target is not None:
        from .pace import normalize_latency_target

        try:
            host_latency_target = normalize_latency_target(host_latency_target)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--host-latency-target") from None
    return {k: v for k, v in (("pace", pace), ("host_latency_target", host_latency_target), ("order", order))
            if v is not None}


# -- following a job ------------------------------------------------------------
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
    if lj.get("compare"):   # a --compare job: what the compare found, then what was copied
        copied = lj["tracks_total"] - lj.get("tracks_equal", 0)
        return (f"{kind} complete: {state} ({lj.get('tracks_compared', 0)} tracks compared, "
                f"{copied} differed or were written; {format_size(lj['bytes_written'])} copied "
                f"in {lj['elapsed']:.2f} s)")
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
        q = t.query()
        if q.get("detached") and q.get("state") == "detached":
            from .detach import describe as describe_detach
            fail(f"the {kind} of {label} ended: {describe_detach(q['detached'], label)}", EXIT_NO)
        out(summary(kind, q))
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
        if not t.remote:
            # the export first: a bad --listen/--tls setting, or a socket in
            # use, fails before the job changes the pair
            assert isinstance(t, LocalTarget)
            server = start_server(t.pair, socket_path, listen, allow_remote)
        start()
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


def dry_run_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--dry-run and --json (the plan of the job: pymirror.plan)."""
    fn = click.option("--json", "as_json", is_flag=True,
                      help="With --dry-run: print the plan as one JSON object, with the track ranges.")(fn)
    return click.option("--dry-run", is_flag=True,
                        help="Print what the job would copy (tracks and bytes per side, holes and zeroes, "
                             "estimated time) and change nothing.")(fn)


def print_plan(obj: Ctx, pair: str, kind: str, incremental: bool, protect: bool, dry_run: bool,
               as_json: bool) -> None:
    from .plan import describe

    if not dry_run:
        fail("--json goes with --dry-run (the job itself prints progress, not JSON)")
    t = open_target(obj, pair)
    try:
        plan = t.plan(kind, incremental=incremental, protect=protect)
    finally:
        t.close()
    if as_json:
        out(json.dumps(plan, sort_keys=True))
    elif "group" in plan:
        out("\n".join(describe(p, name) for name, p in plan["pairs"].items()))
    else:
        out(describe(plan))


@cli.command()
@click.argument("pair")
@click.option("--incremental", is_flag=True, help="Copy only the tracks changed on either side since the split.")
@click.option("--assume-equal", is_flag=True,
              help="New pair only: skip the copy, the two volumes are known to be identical (e.g. both blank).")
@click.option("--compare", is_flag=True,
              help="Compare the two sides first and copy only the tracks that differ (when the tables are "
                   "lost or not trusted).")
@click.option("--trust", is_flag=True,
              help="Accept the changed-track tables although a volume was changed outside pymirror.")
@dry_run_options
@copy_options
@job_options
@serve_options
@click.pass_obj
def establish(obj: Ctx, pair: str, incremental: bool, assume_equal: bool, compare: bool, trust: bool,
              dry_run: bool, as_json: bool,
              rate: Optional[int], copiers: Optional[int], batch_size: Optional[int], pace: Optional[str],
              host_latency_target: Optional[str], order: Optional[str], no_wait: bool,
              socket_path: Optional[str], listen: Optional[str], allow_remote: bool) -> None:
    """Copy the standard to the mirror and keep them identical.  PAIR may be a group."""
    _check_compare(compare, incremental, assume_equal)
    copy: dict[str, Any] = dict(rate=rate, copiers=copiers, batch_size=batch_size,
                                **pace_options(pace, host_latency_target, order))
    if trust:
        copy["trust"] = True
    if dry_run or as_json:
        if assume_equal:
            fail("--dry-run plans a copy; --assume-equal makes none")
        if compare:
            fail("--dry-run cannot plan a --compare job: what it copies is known only after comparing")
        return print_plan(obj, pair, "establish", incremental, True, dry_run, as_json)
    t = open_target(obj, pair)
    run_job_verb(t, "establish", lambda: t.establish(incremental=incremental, assume_equal=assume_equal,
                                                     compare=compare, **copy),
                 no_wait, socket_path, listen, allow_remote)


def _check_compare(compare: bool, incremental: bool, assume_equal: bool = False) -> None:
    if compare and incremental:
        raise click.UsageError("--compare and --incremental cannot be combined: a compare finds the "
                               "tracks to copy itself")
    if compare and assume_equal:
        raise click.UsageError("--compare and --assume-equal cannot be combined")



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
@click.option("--compare", is_flag=True,
              help="Compare the two sides first and restore only the tracks that differ (when the tables "
                   "are lost or not trusted).")
@click.option("--trust", is_flag=True,
              help="Accept the changed-track tables although a volume was changed outside pymirror.")
@dry_run_options
@copy_options
@job_options
@serve_options
@click.pass_obj
def restore(obj: Ctx, pair: str, incremental: bool, protect: bool, read_policy: Optional[str], compare: bool,
            trust: bool, dry_run: bool, as_json: bool,
            rate: Optional[int], copiers: Optional[int], batch_size: Optional[int], pace: Optional[str],
            host_latency_target: Optional[str], order: Optional[str], no_wait: bool,
            socket_path: Optional[str], listen: Optional[str], allow_remote: bool) -> None:
    """Restore the standard from the mirror while the host keeps using it.
    PAIR may be a group: every pair starts its restore at one instant.
    By default the copy paces itself to keep the host's latency within
    --host-latency-target and copies the tracks the host uses first."""
    _check_compare(compare, incremental)
    copy: dict[str, Any] = dict(rate=rate, copiers=copiers, batch_size=batch_size, read_policy=read_policy,
                                **pace_options(pace, host_latency_target, order))
    if trust:
        copy["trust"] = True
    if dry_run or as_json:
        if compare:
            fail("--dry-run cannot plan a --compare job: what it copies is known only after comparing")
        return print_plan(obj, pair, "restore", incremental, protect, dry_run, as_json)
    t = open_target(obj, pair)
    run_job_verb(t, "restore", lambda: t.restore(incremental=incremental, protect=protect,
                                                 compare=compare, **copy),
                 no_wait, socket_path, listen, allow_remote)


@cli.command()
@click.argument("pair")
@copy_options
@job_options
@serve_options
@click.pass_obj
def resume(obj: Ctx, pair: str, rate: Optional[int], copiers: Optional[int], batch_size: Optional[int],
           pace: Optional[str], host_latency_target: Optional[str], order: Optional[str],
           no_wait: bool, socket_path: Optional[str], listen: Optional[str], allow_remote: bool) -> None:
    """Continue an establish or restore that was interrupted or paused."""
    more = pace_options(pace, host_latency_target, order)
    t = open_target(obj, pair)
    try:
        q = t.query()
        kind = (combined_job(q) or {}).get("kind") or ("restore" if q.get("state") == "restoring" else "establish")
    except BaseException:
        t.close()
        raise

    def start() -> None:
        t.resume(rate=rate, copiers=copiers, batch_size=batch_size, **more)
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


def print_trust(trust: Optional[dict[str, Any]]) -> None:
    """The identity and outside-change lines of one volume (branch metatrust)."""
    if not trust:
        return
    ident = trust.get("identity") or "none"
    if not trust.get("identity_stable"):
        ident += " (no stable identity: a replaced volume at this path cannot be told apart)"
    out(f"          identity {ident}")
    mark = "CHANGED OUTSIDE PYMIRROR: " if trust.get("outside") == "changed" else ""
    out(f"          {mark}{trust.get('note')}")


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
        print_trust(s.get("trust"))
        if s.get("detects_outside_changes") is False and s.get("kind") in ("nbd", "rbd"):
            out(f"          (an {s['kind'].upper()} volume: writes made to it outside pymirror cannot be detected)")
    if info.get("detached"):
        from .detach import describe as describe_detach
        out(f"          {describe_detach(info['detached'], label)}")
    elif info.get("mirror_invalid"):
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
    """Compare the two sides track by track (both read at once, in C; a progress bar on a
    terminal).  Exit 0 equal, 1 they differ, 2 an error."""
    t = open_target(obj, pair)
    try:
        from .cli_compare import verify_here, verify_remote

        info = verify_remote(obj, t) if isinstance(t, RemoteTarget) else verify_here(t)
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
@click.option("--timeout", type=click.FloatRange(min=0), default=None, metavar="S",
              help="Give up after S seconds (exit 3).")
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
