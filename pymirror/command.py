"""The ``pymirror`` command's entry point (the console script and
``python -m pymirror``), and what every command does first.

A command is a whole process: the interpreter's start, the imports of the
command line (click and the CLI modules: most of a command's own cost), and
at the end Python's teardown all add to the work it does.  For the two verbs
whose point is one long copy, in their plain form ``pymirror restore META``
and ``pymirror establish META`` (no option), this module starts the copy
*before* loading the command line: it opens the pair and starts the job
with the defaults, exactly as the command does, and the command line then
loads while the copy runs (the copy runs on C threads, which do not hold the
GIL).  The command then runs as always (:func:`pymirror.cli.main`: the same
parsing, messages, progress and exit codes) and finds its pair already open
with its job started (:func:`pymirror.targets.take_started`).

Anything that does not go right before the copy starts changes nothing
and is left to the command, which then says what it would have said: with
no such file, a daemon's socket present, a bad configuration file or a pair
that does not open, nothing is opened and the command runs from its start;
a pair that opens but refuses the job (wrong state, ...) is handed over
open, and the command asks again and reports the refusal.  Warnings of the
open (a damaged metadata slot) are shown once, as one line each.  Every other form of every command goes
straight to :func:`pymirror.cli.main`.

At the end the process leaves with ``os._exit`` once its output is flushed
and its ``atexit`` handlers have run, skipping the interpreter's teardown of
every module and object (about 10 ms; it writes nothing), unless a thread
other than the main one is still alive.

This module imports nothing heavy: the standard library's ``os``, ``sys``,
``signal`` and ``warnings``, and the pair's own modules only for an early start.
docs/copier.md ("The command's start and end") has the measurements.
"""
from __future__ import annotations

import os
import signal
import sys
TYPE_CHECKING = False   # typing is not imported at run time: a command's start (docs/copier.md)
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Optional

# The verbs started early, and the keyword arguments their click commands
# pass to the target when given no option (cli_pair.restore / establish);
# LocalTarget checks that the command asks for exactly this job.
EARLY_JOBS = {
    "restore": dict(incremental=False, protect=True, compare=False,
                    rate=None, copiers=None, batch_size=None, read_policy=None),
    "establish": dict(incremental=False, assume_equal=False, compare=False,
                      rate=None, copiers=None, batch_size=None),
}


# -- signals: SIGINT exits 130, SIGTERM 143 -----------------------------------
class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def exit_code_for(exc: KeyboardInterrupt) -> int:
    return 128 + getattr(exc, "signum", signal.SIGINT)


def signals_stop_the_command() -> None:
    """SIGINT and SIGTERM both stop a long command cleanly.  SIGINT is set
    explicitly: a process started in the background by a shell inherits it
    ignored, and a server must still stop on it."""
    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(signum)
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def warnings_are_one_line() -> None:
    """pymirror's warnings (a damaged metadata slot, ...) print as one line
    on stderr, like its errors, instead of Python's file:line format."""
    import warnings

    from . import errors

    shown = warnings.showwarning

    def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        if issubclass(category, errors.MetadataWarning):
            print(f"warning: {message}", file=sys.stderr, flush=True)
        else:
            shown(message, category, filename, lineno, file, line)
    warnings.showwarning = show


# -- the early start ------------------------------------------------------------
def start_early(args: list[str]) -> Optional[tuple[Any, bool]]:
    """For ``[restore|establish, META]``: the pair opened here (a
    :class:`pymirror.targets.LocalTarget`, handed to the command through
    :func:`pymirror.targets.set_started`) and whether its job started; else
    None, with nothing opened."""
    if len(args) != 2 or args[0] not in EARLY_JOBS or args[1].startswith("-") or not os.path.isfile(args[1]):
        return None
    kind, meta = args
    import warnings

    from . import targets
    if targets.daemon_listening(None):
        return None     # a daemon may hold the pair: the command asks it
    from .config import load_settings

    started = False
    with warnings.catch_warnings(record=True) as seen:
        try:
            t = targets.LocalTarget(meta, meta, load_settings(None))
        except Exception:
            return None     # the command opens it again, and says what went wrong
        try:
            getattr(t, kind)(**EARLY_JOBS[kind])
            started = True
        except Exception:
            pass            # the command asks again, and says what went wrong (a refusal changes nothing)
    # The open's warnings (a damaged metadata slot, repaired by the open's
    # commit) are shown once, now, as the command would have shown them.
    if seen:
        warnings_are_one_line()
        for w in seen:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    targets.set_started(meta, kind, t, started)
    return t, started


def _stopped_early(t: Any, kind: str, label: str, exc: KeyboardInterrupt) -> int:
    """SIGINT/SIGTERM after the early start, before the command line took
    the pair over: close it (committed and resumable), as the command does."""
    from .targets import take_started

    take_started(label)
    t.close()
    print(f"\ninterrupted: the {kind} of {label} stopped; metadata committed. "
          f"Continue with: pymirror resume {label}", file=sys.stderr, flush=True)
    return exit_code_for(exc)


def run(args: list[str]) -> Any:
    """Run the command ``args``; returns its exit status (as ``sys.exit`` takes it)."""
    signals_stop_the_command()
    early = None
    try:
        early = start_early(args)
        from .cli import main as cli_main   # click and the command line: while the copy runs
        if early is not None and early[1]:  # what the job's end needs, loaded now too
            from . import plan, progress, report  # noqa: F401
    except KeyboardInterrupt as exc:
        if early is not None and early[1]:
            return _stopped_early(early[0], args[0], args[1], exc)
        if early is not None:
            _close_unclaimed(args[1])
        print("terminated" if exit_code_for(exc) == 143 else "interrupted", file=sys.stderr, flush=True)
        return exit_code_for(exc)
    try:
        cli_main(args)
    except SystemExit as exc:
        return exc.code
    finally:
        if early is not None:
            _close_unclaimed(args[1])   # the command always takes it; a bug must not leave it open
    return 0


def _close_unclaimed(meta: str) -> None:
    from .targets import take_started

    left = take_started(meta)
    if left is not None:
        left.close()


def leave(code: Any) -> None:
    """Exit with ``code`` (as ``sys.exit`` would) without the interpreter's
    teardown: output flushed and ``atexit`` handlers run first.  Falls back
    to ``sys.exit`` when another thread still runs or the output cannot be
    flushed (a closed pipe: Python then reports it as usual)."""
    import atexit

    run_exitfuncs = getattr(atexit, "_run_exitfuncs", None)
    threading = sys.modules.get("threading")
    if not (code is None or isinstance(code, int)) or run_exitfuncs is None or \
            (threading is not None and threading.active_count() > 1):
        sys.exit(code)
    _flush_or_exit(code)
    run_exitfuncs()
    _flush_or_exit(code)
    os._exit(code or 0)


def _flush_or_exit(code: Any) -> None:
    """Flush stdout and stderr; if that fails (a closed pipe), leave through
    ``sys.exit`` so Python reports it as usual."""
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
    except (OSError, ValueError):
        sys.exit(code)


def main(argv: Optional[list[str]] = None) -> None:
    """The ``pymirror`` command."""
    leave(run(sys.argv[1:] if argv is None else list(argv)))


if __name__ == "__main__":  # pragma: no cover
    main()
