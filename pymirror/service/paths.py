"""Where the service keeps its control socket and its state, by default.

- control socket: ``$PYMIRROR_CONTROL`` if set, else
  ``/run/pymirror/control.sock`` for root, ``$XDG_RUNTIME_DIR/pymirror/control.sock``
  otherwise (``/tmp/pymirror-UID/control.sock`` when ``XDG_RUNTIME_DIR`` is unset,
  as on a login without systemd);
- state directory: ``/var/lib/pymirror`` for root, ``$XDG_STATE_HOME/pymirror``
  otherwise (``~/.local/state/pymirror`` when ``XDG_STATE_HOME`` is unset).
"""
from __future__ import annotations

import os
TYPE_CHECKING = False   # typing is not imported at run time: a command's start (docs/copier.md)
if TYPE_CHECKING:  # pragma: no cover
    from typing import Optional

ENV_CONTROL = "PYMIRROR_CONTROL"
CONTROL_NAME = "control.sock"


def _is_root() -> bool:
    return os.geteuid() == 0


def runtime_dir() -> str:
    """The directory that holds the control socket by default."""
    if _is_root():
        return "/run/pymirror"
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base:
        return os.path.join(base, "pymirror")
    return f"/tmp/pymirror-{os.getuid()}"


def default_control_path() -> str:
    """The control socket used when neither ``--control`` nor
    ``$PYMIRROR_CONTROL`` names one."""
    return os.path.join(runtime_dir(), CONTROL_NAME)


def control_path(explicit: "Optional[str | os.PathLike[str]]" = None) -> str:
    """The control socket to use: ``explicit``, else ``$PYMIRROR_CONTROL``,
    else the default (an absolute path)."""
    if explicit is not None:
        return os.path.abspath(os.fspath(explicit))
    env = os.environ.get(ENV_CONTROL)
    if env:
        return os.path.abspath(env)
    return default_control_path()


def default_state_dir() -> str:
    """Where the daemon remembers its pairs and groups by default."""
    if _is_root():
        return "/var/lib/pymirror"
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "pymirror")


def state_dir(explicit: "Optional[str | os.PathLike[str]]" = None) -> str:
    return os.path.abspath(os.fspath(explicit)) if explicit is not None else default_state_dir()


def make_private_dir(path: str) -> None:
    """Create ``path`` and missing parents with mode 0700.  An existing
    directory is left as it is (its owner chose its mode)."""
    parent = os.path.dirname(path)
    if parent and parent != path and not os.path.isdir(parent):
        make_private_dir(parent)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        if not os.path.isdir(path):
            raise NotADirectoryError(f"{path} exists and is not a directory") from None
