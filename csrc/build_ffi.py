"""cffi build script (out-of-line API mode) for ``pymirror._core``.

The cdef is not a second hand-written copy of the API: it is the block of
``csrc/include/pymirror.h`` between ``PM_CDEF_BEGIN`` and ``PM_CDEF_END``,
minus preprocessor lines, so the binding cannot drift from the header.

The extension holds only cffi's glue.  The core itself (every ``csrc/*.c``)
is the shared library ``libpymirror.so.<major>`` that csrc/build_lib.py
builds first and that the wheel ships for C programs too; the extension
links it with rpath ``$ORIGIN/lib``.  So there is one copy of the code per
process, whether Python, a C program or both load it.  setup.py's build_ext
adds the library's directory before the extension is linked.

Environment: ``PYMIRROR_WERROR=1`` (warnings are errors),
``PYMIRROR_SANITIZE=address`` (an AddressSanitizer build, tests only).
"""
from __future__ import annotations

import os
import re
import sys

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
HEADER = os.path.join(HERE, "include", "pymirror.h")
sys.path.insert(0, HERE)
try:
    import build_lib
finally:
    sys.path.remove(HERE)

MODULE = "pymirror._core"


def cdef_source(header_text: str) -> str:
    match = re.search(r"/\* PM_CDEF_BEGIN \*/(.*)/\* PM_CDEF_END \*/", header_text, re.S)
    if match is None:
        raise RuntimeError(f"{HEADER}: no PM_CDEF_BEGIN/PM_CDEF_END block")
    lines = [ln for ln in match.group(1).splitlines() if not ln.lstrip().startswith("#")]
    return "\n".join(lines)


def _rel(path: str) -> str:
    # setuptools wants paths relative to the project directory.
    try:
        return os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        return path


ffi = FFI()
with open(HEADER, encoding="utf-8") as fh:
    ffi.cdef(cdef_source(fh.read()))

ffi.set_source(
    MODULE,
    '#include "pymirror.h"\n',
    include_dirs=[_rel(os.path.join(HERE, "include"))],
    depends=[_rel(HEADER)],
    libraries=["pymirror"],
    extra_compile_args=build_lib.cflags() + ["-fvisibility=hidden"],
    # $ORIGIN is the extension's directory: the library is in lib/ beside it.
    extra_link_args=["-Wl,-rpath,$ORIGIN/lib"] + build_lib.sanitize_flags(),
)
