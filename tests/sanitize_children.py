"""A pytest plugin for the AddressSanitizer run (test_sanitize.py): the ASan
runtime is preloaded (LD_PRELOAD) into this interpreter only, and into the
Python children it starts (``python -m pymirror ...``, which import the ASan
build too), not into the other programs the tests run (certtool, nbdinfo,
nbdcopy, qemu-img: uninstrumented programs that need no ASan, and some of
them hang with it).

Loaded with ``-p sanitize_children``; it does nothing unless LD_PRELOAD
names an ASan runtime.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from typing import Any

PRELOAD = os.environ.get("LD_PRELOAD", "")

if "libasan" in PRELOAD:
    del os.environ["LD_PRELOAD"]            # inherited by every child from here on: not the runtime
    _PYTHON = os.path.realpath(sys.executable)
    _init = subprocess.Popen.__init__

    def _is_python(args: Any, executable: Any) -> bool:
        prog = executable or (args if isinstance(args, (str, bytes, os.PathLike)) else args[0])
        prog = os.fsdecode(prog)
        return os.path.realpath(shutil.which(prog) or prog) == _PYTHON

    def __init__(self: subprocess.Popen[Any], args: Any, *a: Any, **kw: Any) -> None:
        if not a and not kw.get("shell") and _is_python(args, kw.get("executable")):
            env = dict(kw["env"] if kw.get("env") is not None else os.environ)
            env["LD_PRELOAD"] = PRELOAD
            kw["env"] = env
        _init(self, args, *a, **kw)

    subprocess.Popen.__init__ = __init__  # type: ignore[method-assign]
