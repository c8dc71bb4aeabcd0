"""cffi build script (out-of-line API mode) for ``pymirror._core``.

The cdef is not a second hand-written copy of the API: it is the block of
``csrc/include/pymirror.h`` between ``PM_CDEF_BEGIN`` and ``PM_CDEF_END``,
minus preprocessor lines, so the binding cannot drift from the header.
Every ``csrc/*.c`` file is compiled into the extension.
"""
from __future__ import annotations

import glob
import os
import re
import sys

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
HEADER = os.path.join(HERE, "include", "pymirror.h")


def cdef_source(header_text: str) -> str:
    match = re.search(r"/\* PM_CDEF_BEGIN \*/(.*)/\* PM_CDEF_END \*/", header_text, re.S)
    if match is None:
        raise RuntimeError(f"{HEADER}: no PM_CDEF_BEGIN/PM_CDEF_END block")
    lines = [ln for ln in match.group(1).splitlines() if not ln.lstrip().startswith("#")]
    return "\n".join(lines)


def _rel(path: str) -> str:
    # setuptools wants source paths relative to the project directory.
    try:
        return os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        return path


def _compile_args() -> list[str]:
    args = ["-std=c11", "-D_GNU_SOURCE", "-O2", "-pthread", "-fvisibility=hidden"]
    if os.environ.get("PYMIRROR_WERROR"):
        args += ["-Wall", "-Wextra", "-Wno-unused-parameter", "-Werror"]
    # Wheels are portable: never -march=native.  Fast popcount is picked at
    # run time inside bitmap.c (target attributes + CPU dispatch).
    return args


ffi = FFI()
with open(HEADER, encoding="utf-8") as fh:
    ffi.cdef(cdef_source(fh.read()))

ffi.set_source(
    "pymirror._core",
    '#include "pymirror.h"\n',
    sources=sorted(_rel(p) for p in glob.glob(os.path.join(HERE, "*.c"))),
    include_dirs=[_rel(os.path.join(HERE, "include")), _rel(HERE)],
    depends=[_rel(p) for p in glob.glob(os.path.join(HERE, "*.h"))] + [_rel(HEADER)],
    extra_compile_args=_compile_args(),
    libraries=["pthread"] if sys.platform != "win32" else [],
)

if __name__ == "__main__":
    ffi.compile(verbose=True)
