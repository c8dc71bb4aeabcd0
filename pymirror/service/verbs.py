"""The verbs of the control protocol and the arguments each one takes.

Each argument is ``name: (kind, required)``; kinds are checked before the
daemon acts, so a request with a wrong type changes nothing.  ``add`` and
``remove`` are aliases of ``attach`` and ``detach``.  ``subscribe`` and
``unsubscribe`` are handled by the connection (control.py).
"""
from __future__ import annotations

from typing import Any

from .protocol import CommandNotFound, InvalidArgument

COPY = {"rate": ("size", False), "copiers": ("int", False), "batch_size": ("size", False),
        # pacing and order (issue 13, pymirror/pace.py)
        "pace": ("str", False), "host_latency_target": ("str", False), "order": ("str", False)}
NAME = {"name": ("str", True)}

VERBS: dict[str, dict[str, tuple[str, bool]]] = {
    "attach": {"meta": ("str", True), "name": ("str", False), "export": ("bool", False)},
    "detach": dict(NAME),
    "establish": {**NAME, "incremental": ("bool", False), "assume_equal": ("bool", False), **COPY,
                  "wait": ("bool", False), "compare": ("bool", False), "trust": ("bool", False)},
    "split": dict(NAME),
    "restore": {**NAME, "incremental": ("bool", False), "protect": ("bool", False),
                "read_policy": ("str", False), **COPY, "wait": ("bool", False), "compare": ("bool", False),
                "trust": ("bool", False)},
    "resume": {**NAME, **COPY, "wait": ("bool", False)},
    "plan": {**NAME, "kind": ("str", True), "incremental": ("bool", False), "protect": ("bool", False)},
    "pause": dict(NAME),
    "cancel": dict(NAME),
    "set-rate": {**NAME, "rate": ("size", True)},
    "query": dict(NAME),
    "verify": {**NAME, "wait": ("bool", False)},
    "wait": {**NAME, "timeout": ("seconds", False)},
    "status": {"name": ("str", False)},
    "events": {"name": ("str", False)},
    "find": {"pair": ("str", True)},
    "export": dict(NAME),
    "unexport": dict(NAME),
    "group-create": {**NAME, "pairs": ("names", True)},
    "group-delete": dict(NAME),
}
ALIASES = {"add": "attach", "remove": "detach"}
ALL = sorted([*VERBS, *ALIASES, "subscribe", "unsubscribe"])

_KIND_TEXT = {"str": "a string", "bool": "true or false", "int": "a whole number",
              "size": "a whole number of bytes (>= 0)", "seconds": "a number of seconds (>= 0)",
              "names": "a non-empty list of names (strings)"}


def _ok(kind: str, value: Any) -> bool:
    if kind == "str":
        return isinstance(value, str) and value != ""
    if kind == "bool":
        return isinstance(value, bool)
    if kind in ("int", "size"):
        return isinstance(value, int) and not isinstance(value, bool) and (kind == "int" or value >= 0)
    if kind == "seconds":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
    if kind == "names":
        return isinstance(value, list) and bool(value) and all(isinstance(v, str) and v for v in value)
    raise AssertionError(kind)


def check(verb: str, args: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(canonical verb, arguments with every known name present, None when
    not given), or raise CommandNotFound / InvalidArgument."""
    verb = ALIASES.get(verb, verb)
    spec = VERBS.get(verb)
    if spec is None:
        raise CommandNotFound(f"unknown verb {verb!r}; the verbs are: {', '.join(ALL)}")
    for key in args:
        if key not in spec:
            known = ", ".join(sorted(spec)) or "none"
            raise InvalidArgument(f"{verb}: unknown argument {key!r} (it takes: {known})")
    out: dict[str, Any] = {}
    for key, (kind, required) in spec.items():
        value = args.get(key)
        if value is None:
            if required:
                raise InvalidArgument(f"{verb}: argument {key!r} is required")
        elif not _ok(kind, value):
            raise InvalidArgument(f"{verb}: argument {key!r} must be {_KIND_TEXT[kind]}, "
                                  f"got {type(value).__name__} {str(value)[:40]!r}")
        out[key] = value
    return verb, out
