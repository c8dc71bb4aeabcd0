"""``python -m pymirror.service``: the daemon without the CLI (tests, and
hosts that want no click).  Same options as ``pymirror daemon``."""
from __future__ import annotations

import argparse
import sys

from .. import errors
from .daemon import run


def main(argv: "list[str] | None" = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pymirror.service", description="Run the pymirror daemon.")
    ap.add_argument("--control", help="control socket path")
    ap.add_argument("--state-dir", help="where the daemon remembers its pairs")
    ap.add_argument("--socket", help="NBD unix socket exporting every pair")
    ap.add_argument("--socket-mode", default="0660", help="mode of the NBD socket (octal, default 0660)")
    ap.add_argument("--socket-group", help="group of the NBD socket")
    ap.add_argument("--listen", metavar="HOST:PORT", help="NBD TCP listener (loopback unless --allow-remote)")
    ap.add_argument("--allow-remote", action="store_true")
    ap.add_argument("--debug", action="store_true", help="log job-progress events too")
    ap.add_argument("metas", nargs="*", metavar="META")
    a = ap.parse_args(argv)
    try:
        mode = int(a.socket_mode, 8)
    except ValueError:
        ap.error(f"--socket-mode {a.socket_mode!r} is not an octal mode such as 0660")
    import logging
    try:
        return run(control=a.control, state_dir=a.state_dir, socket_path=a.socket, listen=a.listen,
                   allow_remote=a.allow_remote, metas=a.metas, socket_mode=mode, socket_group=a.socket_group,
                   log_level=logging.DEBUG if a.debug else logging.INFO)
    except (errors.MirrorError, OSError, ValueError) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
