"""Builds the C library that the wheel ships for C and C++ programs.

The wheel holds, under ``pymirror/``::

    include/pymirror.h              the public header, copied unchanged
    lib/libpymirror.so.0            the core (soname libpymirror.so.<PM_VERSION_MAJOR>)
    lib/libpymirror.so              a one-line linker script, INPUT(libpymirror.so.0):
                                    wheels cannot hold symlinks, and this lets
                                    ``-lpymirror`` work without a second copy of the code
    lib/pkgconfig/pymirror.pc       prefix relative to itself (${pcfiledir})
    _core.abi3.so                   the cffi extension: only the glue, linked against
                                    lib/libpymirror.so.0 with rpath $ORIGIN/lib

One copy of the code per process: the extension contains none of the core,
it loads libpymirror.so.0; a C program that links the same library beside
Python loads the same file once.

Nothing here lists the sources or the symbols: the sources are ``csrc/*.c``
and the exported symbols are the functions the public header declares
(every other symbol, ``pm_`` helpers included, stays local: a version script).
"""
from __future__ import annotations

import glob
import os
import re
import shutil
from typing import Iterable

HERE = os.path.dirname(os.path.abspath(__file__))
HEADER = os.path.join(HERE, "include", "pymirror.h")


def sources() -> list[str]:
    """Every C file of the core (``csrc/*.c``), sorted."""
    return sorted(glob.glob(os.path.join(HERE, "*.c")))


def _strip_comments(text: str) -> str:
    return re.sub(r"/\*.*?\*/|//[^\n]*", " ", text, flags=re.S)


def abi_major(header_text: str) -> int:
    """The soname's version: ``PM_VERSION_MAJOR`` from the header."""
    m = re.search(r"\bPM_VERSION_MAJOR\s*=\s*(\d+)", header_text)
    if m is None:
        raise RuntimeError(f"{HEADER}: no PM_VERSION_MAJOR")
    return int(m.group(1))


def public_functions(header_text: str) -> list[str]:
    """Names of the functions the header declares (``pm_*``), skipping
    ``static inline`` ones (they are not in the library)."""
    text = _strip_comments(header_text)
    names: set[str] = set()
    # one declaration per statement: split at ';' and '{'/'}'
    for decl in re.split(r"[;{}]", text):
        if re.search(r"\bstatic\b", decl) or re.search(r"\btypedef\b", decl):
            continue
        m = re.search(r"\b(pm_[A-Za-z0-9_]+)\s*\(", decl)
        if m is not None:
            names.add(m.group(1))
    return sorted(names)


def version_script(names: Iterable[str], major: int) -> str:
    body = "".join(f"    {n};\n" for n in names)
    return f"PYMIRROR_{major} {{\n  global:\n{body}  local:\n    *;\n}};\n"


def pkg_config(version: str, prefix: str = "${pcfiledir}/../..") -> str:
    """pymirror.pc.  The default prefix is relative to the .pc file itself
    (pkg-config and pkgconf both define ${pcfiledir}), so the file stays true
    wherever pip puts the package."""
    return (
        f"prefix={prefix}\n"
        "includedir=${prefix}/include\n"
        "libdir=${prefix}/lib\n"
        "\n"
        "Name: pymirror\n"
        "Description: keep a mirror of a block volume and restore the volume from it in use\n"
        f"Version: {version}\n"
        "Cflags: -I${includedir}\n"
        # The library lives inside a Python package, not on the loader's path:
        # the rpath lets the program run without LD_LIBRARY_PATH.
        "Libs: -L${libdir} -lpymirror -Wl,-rpath,${libdir}\n"
        "Libs.private: -pthread\n"
    )


def sanitize_flags() -> list[str]:
    """``PYMIRROR_SANITIZE=address`` (or ``address,undefined``) builds the core
    and the extension with that sanitizer (tests only: run Python with the
    runtime preloaded, see tests/test_sanitize.py)."""
    san = os.environ.get("PYMIRROR_SANITIZE", "").strip()
    if not san:
        return []
    if not re.fullmatch(r"[a-z]+(,[a-z]+)*", san):
        raise RuntimeError(f"PYMIRROR_SANITIZE={san!r}: expected names such as address or address,undefined")
    return [f"-fsanitize={san}", "-fno-omit-frame-pointer"]


def cflags() -> list[str]:
    args = ["-std=c11", "-D_GNU_SOURCE", "-O2", "-pthread", "-fPIC"]
    if os.environ.get("PYMIRROR_WERROR"):
        args += ["-Wall", "-Wextra", "-Wno-unused-parameter", "-Werror"]
    # Wheels are portable: never -march=native.  Fast popcount is picked at
    # run time inside bitmap.c (target attributes + CPU dispatch).
    return args + sanitize_flags()


def build(compiler, build_temp: str, package_dir: str, version: str) -> str:
    """Build the library, header, linker script and .pc file into
    ``package_dir`` (the ``pymirror`` directory of a build tree); returns the
    directory the extension links against.  ``compiler`` is the distutils
    compiler of build_ext (it honours CC and CFLAGS)."""
    with open(HEADER, encoding="utf-8") as fh:
        header = fh.read()
    major = abi_major(header)
    soname = f"libpymirror.so.{major}"
    lib_dir = os.path.join(package_dir, "lib")
    inc_dir = os.path.join(package_dir, "include")
    pc_dir = os.path.join(lib_dir, "pkgconfig")
    tmp = os.path.join(build_temp, "libpymirror")
    for d in (lib_dir, inc_dir, pc_dir, tmp):
        os.makedirs(d, exist_ok=True)

    root = os.path.dirname(HERE)
    rel = [os.path.relpath(s, root) for s in sources()]
    objects = compiler.compile(rel, output_dir=tmp, include_dirs=[os.path.join(HERE, "include"), HERE],
                               extra_postargs=cflags(), depends=[HEADER], debug=False)
    script = os.path.join(tmp, "pymirror.map")
    with open(script, "w", encoding="utf-8") as fh:
        fh.write(version_script(public_functions(header), major))
    out = os.path.join(lib_dir, soname)
    # Link with the compiler driver only: LDSHARED would add Python's own
    # -L/-rpath flags, which have nothing to do with this library.
    driver = compiler.linker_so[0] if getattr(compiler, "linker_so", None) else "cc"
    compiler.spawn([driver, "-shared", *objects, "-o", out,
                    f"-Wl,-soname,{soname}", f"-Wl,--version-script={script}", "-Wl,-z,defs",
                    *sanitize_flags(), "-pthread", "-lpthread", "-lm", "-ldl"])
    with open(os.path.join(lib_dir, "libpymirror.so"), "w", encoding="utf-8") as fh:
        fh.write(f"/* GNU ld script: -lpymirror links the versioned library */\nINPUT({soname})\n")
    shutil.copyfile(HEADER, os.path.join(inc_dir, "pymirror.h"))
    with open(os.path.join(pc_dir, "pymirror.pc"), "w", encoding="utf-8") as fh:
        fh.write(pkg_config(version))
    return lib_dir


def copy_tree(src_package_dir: str, dst_package_dir: str) -> None:
    """Copy what :func:`build` made into another ``pymirror`` directory (the
    source tree, for an in-place or editable build)."""
    for sub in ("lib", "include"):
        src, dst = os.path.join(src_package_dir, sub), os.path.join(dst_package_dir, sub)
        if os.path.isdir(dst):
            shutil.rmtree(dst)
        shutil.copytree(src, dst)


if __name__ == "__main__":
    # `python3 build_lib.py --version-script`: the linker version script, for
    # csrc/Makefile's shared library (the same one the wheel build uses).
    import sys

    with open(HEADER, encoding="utf-8") as fh:
        _header = fh.read()
    if sys.argv[1:] != ["--version-script"]:
        sys.exit("usage: build_lib.py --version-script")
    sys.stdout.write(version_script(public_functions(_header), abi_major(_header)))
