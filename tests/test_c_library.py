"""The C library that pymirror installs for C and C++ programs.

Everything here uses the *imported* package's ``get_include()`` and
``get_library_dir()``: in CI the package is ``pip install .``-ed, so that is
the installed wheel's layout (an editable install has the same layout in the
source tree).  The slow test builds a real wheel, installs it into a fresh
virtualenv and compiles against that.

Missing tools (cc, c++, nm, readelf, pkg-config) FAIL these tests: CI
installs them.  Only inside cibuildwheel's images (CIBUILDWHEEL=1), which
may lack some, are they skipped.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import sys
import zipfile
from pathlib import Path

import pytest

import pymirror
from pymirror import capi
from pymirror._native import lib

ROOT = Path(__file__).resolve().parents[1]
CFLAGS_STRICT = ["-Wall", "-Wextra", "-Werror"]
SONAME = f"libpymirror.so.{lib.PM_VERSION_MAJOR}"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        msg = f"`{name}` is not installed: the C library tests need it (Debian: gcc g++ binutils pkg-config)"
        if os.environ.get("CIBUILDWHEEL"):
            pytest.skip(msg)
        pytest.fail(msg)
    return path


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    # Outside the source tree unless told: `python -m` puts the working
    # directory first on sys.path, and the tests are about the installed package.
    kw.setdefault("cwd", tempfile.gettempdir())
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)  # type: ignore[call-overload]
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
    return proc


def readme_c_example() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- c-example -->\s*```c\n(.*?)```", text, re.S)
    assert m, "README.md has no ```c block after <!-- c-example -->"
    return m.group(1)


def compile_and_run_example(tmp: Path, lang: str, flags: list[str], python: str = sys.executable) -> str:
    """Compile the README's C example as C11 or C++17 with ``flags``, run it
    (with no LD_LIBRARY_PATH: the rpath must find the library) and return
    its output."""
    src = tmp / "example.c"
    src.write_text(readme_c_example())
    exe = tmp / f"example-{lang}"
    if lang == "c":
        cmd = [tool("cc"), "-std=c11", *CFLAGS_STRICT, str(src)]
    else:
        cmd = [tool("c++"), "-std=c++17", *CFLAGS_STRICT, "-x", "c++", str(src), "-x", "none"]
    run([*cmd, *flags, "-o", str(exe)])
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    out = run([str(exe)], cwd=tmp, env=env).stdout
    assert out.strip() == "restored: hello", out
    return out


def installed_flags() -> list[str]:
    inc, libdir = pymirror.get_include(), pymirror.get_library_dir()
    return [f"-I{inc}", f"-L{libdir}", "-lpymirror", f"-Wl,-rpath,{libdir}"]


def defined_dynamic_symbols(path: str) -> list[str]:
    out = run([tool("nm"), "-D", "--defined-only", path]).stdout
    names = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] == "A":
            continue  # a symbol-version node (PYMIRROR_0), not code or data
        names.append(parts[-1].split("@")[0])
    return names


# -- the layout ---------------------------------------------------------------

def test_the_package_holds_the_header_library_and_pc_file() -> None:
    inc, libdir = Path(pymirror.get_include()), Path(pymirror.get_library_dir())
    assert (inc / "pymirror.h").is_file()
    assert (libdir / SONAME).is_file()
    assert (libdir / "libpymirror.so").is_file()    # -lpymirror (a linker script naming the soname)
    assert SONAME in (libdir / "libpymirror.so").read_text()
    pc = (libdir / "pkgconfig" / "pymirror.pc").read_text()
    assert "prefix=${pcfiledir}/../.." in pc and "-lpymirror" in pc
    assert f"Version: {pymirror.__version__}" in pc


def test_the_library_has_a_versioned_soname() -> None:
    out = run([tool("readelf"), "-d", str(Path(pymirror.get_library_dir()) / SONAME)]).stdout
    assert re.search(rf"\(SONAME\)\s+Library soname: \[{re.escape(SONAME)}\]", out), out


def test_the_extension_links_the_library_one_copy_per_process() -> None:
    core = next(Path(pymirror.__file__).parent.glob("_core*.so"))
    out = run([tool("readelf"), "-d", str(core)]).stdout
    assert f"Shared library: [{SONAME}]" in out, out
    assert "$ORIGIN/lib" in out, out
    # the extension exports its init function only: the core's code is not in it
    assert defined_dynamic_symbols(str(core)) == ["PyInit__core"]
    # in a running interpreter, exactly one libpymirror is mapped
    code = ("import pymirror, re; pymirror.Pair.memory(1 << 20).close();"
            "print(sorted({l.split()[-1] for l in open('/proc/self/maps') if 'libpymirror' in l}))")
    maps = run([sys.executable, "-c", code], cwd="/").stdout.strip()
    assert maps == repr([str(Path(pymirror.get_library_dir(), SONAME).resolve())]), maps


def test_only_the_public_api_is_exported() -> None:
    names = defined_dynamic_symbols(str(Path(pymirror.get_library_dir()) / SONAME))
    assert names, "nm found no symbols"
    assert [n for n in names if not n.startswith("pm_")] == []
    # every function of the binding's cdef (the public header) is there
    api = {n for n in dir(lib) if n.startswith("pm_") and callable(getattr(lib, n))}
    assert api - set(names) == set()
    # and nothing else: internal pm_ helpers stay local
    header = (Path(pymirror.get_include()) / "pymirror.h").read_text()
    declared = set(re.findall(r"\b(pm_[A-Za-z0-9_]+)\s*\(", header))
    assert set(names) - declared == set()


# -- the header alone ---------------------------------------------------------

@pytest.mark.parametrize("lang", ["c", "c++"])
def test_the_header_compiles_alone(tmp_path: Path, lang: str) -> None:
    src = tmp_path / ("alone.c" if lang == "c" else "alone.cpp")
    src.write_text("#include <pymirror.h>\n#include <pymirror.h>\nint main(void) { return PM_OK; }\n")
    std = "-std=c11" if lang == "c" else "-std=c++17"
    compiler = tool("cc" if lang == "c" else "c++")
    run([compiler, std, *CFLAGS_STRICT, f"-I{pymirror.get_include()}", "-c", str(src),
         "-o", str(tmp_path / "alone.o")])


# -- the README's example against the installed package -------------------------

@pytest.mark.parametrize("lang", ["c", "c++"])
def test_readme_example_against_get_include_and_get_library_dir(tmp_path: Path, lang: str) -> None:
    compile_and_run_example(tmp_path, lang, installed_flags())


def test_readme_example_with_python_m_pymirror_config(tmp_path: Path) -> None:
    out = run([sys.executable, "-m", "pymirror.config", "--cflags", "--libs"], cwd=tmp_path).stdout
    flags = out.split()
    assert flags == capi.cflags() + capi.libs()
    compile_and_run_example(tmp_path, "c", flags)


def test_readme_example_with_pkg_config(tmp_path: Path) -> None:
    pkgconf = tool("pkg-config")
    env = dict(os.environ, PKG_CONFIG_PATH=str(Path(pymirror.get_library_dir()) / "pkgconfig"))
    flags = run([pkgconf, "--cflags", "--libs", "pymirror"], env=env).stdout.split()
    compile_and_run_example(tmp_path, "c++", flags)
    # the .pc printed by `python -m pymirror.config --pkg-config` (absolute paths) works too
    pcdir = tmp_path / "pc"
    pcdir.mkdir()
    pc = run([sys.executable, "-m", "pymirror.config", "--pkg-config"]).stdout
    (pcdir / "pymirror.pc").write_text(pc)
    flags = run([pkgconf, "--cflags", "--libs", "pymirror"],
                env=dict(os.environ, PKG_CONFIG_PATH=str(pcdir))).stdout.split()
    compile_and_run_example(tmp_path, "c", flags)
    ver = run([pkgconf, "--modversion", "pymirror"], env=dict(os.environ, PKG_CONFIG_PATH=str(pcdir)))
    assert ver.stdout.strip() == pymirror.__version__


def test_config_command_line() -> None:
    for args, want in ((["--includedir"], pymirror.get_include()),
                       (["--libdir"], pymirror.get_library_dir())):
        out = run([sys.executable, "-m", "pymirror.config", *args]).stdout.strip()
        assert out == want
    proc = subprocess.run([sys.executable, "-m", "pymirror.config"], capture_output=True, text=True, timeout=60,
                          cwd=tempfile.gettempdir())
    assert proc.returncode == 2 and "give at least one of" in proc.stderr
    assert "Traceback" not in proc.stderr and "RuntimeWarning" not in proc.stderr


# -- a real wheel in a fresh virtualenv -----------------------------------------

@pytest.mark.slow
@pytest.mark.source_tree
def test_wheel_installs_a_usable_c_library(tmp_path: Path) -> None:
    """``pip wheel .`` -> a fresh venv -> the README example compiled with
    ``python -m pymirror.config --cflags --libs`` of that venv, and run."""
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
         "-q", "-w", str(dist)], cwd=tmp_path)
    wheels = list(dist.glob("pymirror-*.whl"))
    assert len(wheels) == 1, wheels
    whl = wheels[0]
    # the tag matches the stable-ABI extension inside
    assert re.search(r"-cp39-abi3-[a-z0-9_]+\.whl$", whl.name), whl.name
    with zipfile.ZipFile(whl) as zf:
        names = set(zf.namelist())
    for want in ("pymirror/include/pymirror.h", f"pymirror/lib/{SONAME}", "pymirror/lib/libpymirror.so",
                 "pymirror/lib/pkgconfig/pymirror.pc", "pymirror/config/__main__.py", "pymirror/py.typed"):
        assert want in names, f"{want} is not in {whl.name}"
    assert any(n.endswith("abi3.so") and n.startswith("pymirror/_core") for n in names), names
    assert any(re.fullmatch(r"pymirror-[^/]+\.dist-info/(licenses/)?LICENSE", n) for n in names), names

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)])
    py = str(venv / "bin" / "python")
    # --ignore-installed: the venv sees the system's packages, maybe a pymirror among them
    run([py, "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", str(whl)], cwd=tmp_path)
    where = run([py, "-c", "import pymirror; print(pymirror.__file__)"], cwd=tmp_path).stdout.strip()
    assert where.startswith(str(venv)), f"the fresh venv imported {where}"
    flags = run([py, "-m", "pymirror.config", "--cflags", "--libs"], cwd=tmp_path).stdout.split()
    assert all(str(venv) in f for f in flags if f.startswith(("-I", "-L"))), flags
    work = tmp_path / "work"
    work.mkdir()
    compile_and_run_example(work, "c", flags)
    compile_and_run_example(work, "c++", flags)
    # and Python in that venv works with the same library
    run([py, "-c", "import pymirror; p = pymirror.Pair.memory(1 << 20); p.establish().wait(); "
         "assert p.state == 'established'"], cwd=tmp_path)


@pytest.mark.source_tree
def test_make_shared_exports_the_same_api() -> None:
    """csrc/Makefile's `shared` target (C users without Python) builds the
    same soname with the same exported symbols as the wheel's library."""
    run([tool("make"), "-C", str(ROOT / "csrc"), "-s", "shared"])
    built = ROOT / "csrc" / "build" / SONAME
    assert built.is_file()
    ours = sorted(defined_dynamic_symbols(str(built)))
    assert ours == sorted(defined_dynamic_symbols(str(Path(pymirror.get_library_dir()) / SONAME)))
