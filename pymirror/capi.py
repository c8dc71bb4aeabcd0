"""Where the installed C library is, for C and C++ programs that link it.

The wheel ships ``pymirror.h``, ``libpymirror.so.<major>`` and a pkg-config
file inside the package (see docs/c-api.md)::

    cc app.c $(python -m pymirror.config --cflags --libs)
    PKG_CONFIG_PATH=$(python -m pymirror.config --pkg-config-path) pkg-config --cflags --libs pymirror
"""
from __future__ import annotations

import shlex
from pathlib import Path

__all__ = ["get_include", "get_library_dir", "cflags", "libs", "pkg_config"]

_PACKAGE = Path(__file__).resolve().parent


def _need(path: Path, what: str) -> str:
    """The directory of ``path``; FileNotFoundError with a hint if it is missing."""
    if not path.exists():
        raise FileNotFoundError(
            f"pymirror's {what} is missing ({path}): this pymirror was installed without its C "
            "library; reinstall it from a wheel or with `pip install .`")
    return str(path.parent)


def get_include() -> str:
    """The directory holding ``pymirror.h`` (pass it to ``-I``)."""
    return _need(_PACKAGE / "include" / "pymirror.h", "header")


def get_library_dir() -> str:
    """The directory holding ``libpymirror.so`` (pass it to ``-L``, and to
    ``-Wl,-rpath`` or ``LD_LIBRARY_PATH`` so the program finds it at run time)."""
    return _need(_PACKAGE / "lib" / "libpymirror.so", "shared library")


def pkg_config_dir() -> str:
    """The directory holding ``pymirror.pc`` (for ``PKG_CONFIG_PATH``)."""
    return _need(_PACKAGE / "lib" / "pkgconfig" / "pymirror.pc", "pkg-config file")


def cflags() -> list[str]:
    return [f"-I{get_include()}"]


def libs() -> list[str]:
    d = get_library_dir()
    return [f"-L{d}", "-lpymirror", f"-Wl,-rpath,{d}"]


def pkg_config() -> str:
    """A pymirror.pc with absolute paths to this installation."""
    from . import __version__
    prefix = str(_PACKAGE)
    return (
        f"prefix={prefix}\n"
        "includedir=${prefix}/include\n"
        "libdir=${prefix}/lib\n\n"
        "Name: pymirror\n"
        "Description: keep a mirror of a block volume and restore the volume from it in use\n"
        f"Version: {__version__}\n"
        "Cflags: -I${includedir}\n"
        "Libs: -L${libdir} -lpymirror -Wl,-rpath,${libdir}\n"
        "Libs.private: -pthread\n"
    )


def main(argv: "list[str] | None" = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m pymirror.config",
        description="Compiler and linker flags for C and C++ programs using the installed pymirror library.")
    ap.add_argument("--cflags", action="store_true", help="print the compiler flags (-I...)")
    ap.add_argument("--libs", action="store_true", help="print the linker flags (-L... -lpymirror, rpath)")
    ap.add_argument("--includedir", action="store_true", help="print the directory of pymirror.h")
    ap.add_argument("--libdir", action="store_true", help="print the directory of libpymirror.so")
    ap.add_argument("--pkg-config-path", action="store_true", help="print the directory of pymirror.pc")
    ap.add_argument("--pkg-config", action="store_true", help="print a pymirror.pc with absolute paths")
    args = ap.parse_args(argv)
    try:
        if args.pkg_config:
            print(pkg_config(), end="")
            return 0
        out: list[str] = []
        if args.cflags:
            out += cflags()
        if args.libs:
            out += libs()
        if args.includedir:
            out.append(get_include())
        if args.libdir:
            out.append(get_library_dir())
        if args.pkg_config_path:
            out.append(pkg_config_dir())
    except FileNotFoundError as exc:
        ap.exit(2, f"python -m pymirror.config: {exc}\n")
    if not out:
        ap.error("give at least one of --cflags --libs --includedir --libdir --pkg-config-path --pkg-config")
    print(" ".join(shlex.quote(x) for x in out))
    return 0
