"""The Python tests against an AddressSanitizer build of the extension.

``PYMIRROR_SANITIZE=address python setup.py build`` (csrc/build_ffi.py and
csrc/build_lib.py read it) builds the C library and the extension with ASan
into a temporary directory; a child pytest imports that build (PYTHONPATH)
with the ASan runtime preloaded into the uninstrumented interpreter and runs
the use-after-free reproductions and a named subset of the suite.  A
deliberate use-after-free first proves that the harness catches one.

The NBD subset runs the C request loop (csrc/nbd_loop.c, csrc/nbd_tls.c)
under ASan serving real clients (nbdinfo, nbdcopy, qemu-img, libnbd, plain
and over TLS) and the raw-protocol tests.  The runtime is preloaded into
the Python processes only (tests/sanitize_children.py): certtool, the NBD
clients and qemu-img run uninstrumented, as they would for a user.

Slow (a full build); it runs in the normal test job, where gcc has its
sanitizer runtimes (musllinux images may not).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

# The subset run under ASan: the binding's lifetime tests (both reproductions
# and the close/wait/progress race), the pair API, and the threaded tests.
ASAN_SUBSET = [
    "test_binding.py",
    "test_pair_api.py",
    "test_pair_threads.py",
    "test_tables_threads.py",
    "test_tables_errors.py",
]
# The C request loop and TLS under ASan, with real clients: drain, removal,
# a pair closed under a busy connection, 64 MiB requests, racing clients
# (cloop); x509, PSK and client certificates (tls); the raw protocol, the
# states and malformed requests on the C engine (protocol, states, faults);
# qemu-img, nbdcopy and fio during a restore (clients).
NBD_ASAN_SUBSET = [
    "test_nbd_cloop.py",
    "test_nbd_tls.py",
    "test_nbd_protocol.py",
    "test_nbd_states.py",
    "test_nbd_faults.py",
    "test_nbd_clients.py",
]

pytestmark = [pytest.mark.slow, pytest.mark.source_tree]


def _asan_runtime() -> str:
    cc = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("gcc")
    if cc is None:
        pytest.fail("no C compiler: the AddressSanitizer build needs gcc")
    out = subprocess.run([cc, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(out) or not os.path.exists(out):
        pytest.fail(f"{cc} has no AddressSanitizer runtime (libasan.so): install libasan (Debian: gcc)")
    return os.path.realpath(out)


@pytest.fixture(scope="module")
def asan_build(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("asan")
    env = dict(os.environ, PYMIRROR_SANITIZE="address")
    proc = subprocess.run(
        [sys.executable, "setup.py", "-q", "build", "--build-base", str(tmp / "build"),
         "--build-lib", str(tmp / "lib"), "--build-temp", str(tmp / "temp")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"the ASan build failed:\n{proc.stdout[-4000:]}{proc.stderr[-4000:]}"
    lib = tmp / "lib" / "pymirror" / "lib"
    so = next(lib.glob("libpymirror.so.*"))
    syms = subprocess.run(["nm", "-D", "--undefined-only", str(so)], capture_output=True, text=True).stdout
    assert "__asan_" in syms, "the C library was not built with AddressSanitizer"
    run_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "COVERAGE_PROCESS_START")}
    run_env.update(
        PYTHONPATH=os.pathsep.join((str(tmp / "lib"), str(TESTS))),     # TESTS: the sanitize_children plugin
        LD_PRELOAD=_asan_runtime(),
        ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:halt_on_error=1",
    )
    return {"env": run_env, "cwd": str(tmp), "lib": str(tmp / "lib")}


def _python(build: dict[str, str], *args: str, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=build["cwd"], env=build["env"],
                          capture_output=True, text=True, timeout=timeout)


def test_the_asan_build_is_the_one_imported(asan_build: dict[str, str]) -> None:
    code = ("import pymirror, sys; print(pymirror.__file__);"
            "print(any('libasan' in l for l in open('/proc/self/maps')))")
    proc = _python(asan_build, "-c", code)
    assert proc.returncode == 0, proc.stderr
    where, asan = proc.stdout.split()
    assert where.startswith(asan_build["lib"]) and asan == "True", proc.stdout


def test_the_harness_catches_a_use_after_free(asan_build: dict[str, str]) -> None:
    """A deliberate use-after-free through the raw C API must be reported:
    otherwise the passing runs below would prove nothing."""
    code = ("from pymirror._native import ffi, lib\n"
            "out = ffi.new('pm_store **')\n"
            "assert lib.pm_store_create_memory(1 << 16, out) == 0\n"
            "s = out[0]\n"
            "lib.pm_store_destroy(s)\n"
            "lib.pm_store_size(s)\n")
    proc = _python(asan_build, "-c", code)
    assert proc.returncode != 0 and "heap-use-after-free" in proc.stderr, proc.stderr[-3000:]


def _pytest_under_asan(build: dict[str, str], names: list[str]) -> str:
    args = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "sanitize_children", "--rootdir", str(ROOT),
            "-c", str(ROOT / "pyproject.toml"), "-m", "not slow", *[str(TESTS / name) for name in names]]
    proc = _python(build, *args, timeout=3000)
    out = proc.stdout + proc.stderr
    assert "AddressSanitizer" not in out, out[-8000:]
    assert proc.returncode == 0, out[-8000:]
    assert " passed" in out and " failed" not in out, out[-3000:]
    return out


def test_the_binding_and_pair_tests_under_asan(asan_build: dict[str, str]) -> None:
    _pytest_under_asan(asan_build, ASAN_SUBSET)


def test_the_c_request_loop_serves_real_clients_under_asan(asan_build: dict[str, str]) -> None:
    """The NBD tests against the ASan build.  A client whose tool is missing
    is skipped outside CI: at least the C loop's own tests must have run."""
    out = _pytest_under_asan(asan_build, NBD_ASAN_SUBSET)
    passed = int(out.rsplit(" passed", 1)[0].split()[-1])
    assert passed >= 100, out[-3000:]


def test_the_python_children_get_the_asan_runtime_and_other_programs_do_not(asan_build: dict[str, str]) -> None:
    code = ("import subprocess, sys\n"
            "child = 'print(any(\"libasan\" in l for l in open(\"/proc/self/maps\")))'\n"
            "print(subprocess.run([sys.executable, '-c', child], capture_output=True, text=True).stdout.strip())\n"
            "print(subprocess.run(['sh', '-c', 'echo \"[$LD_PRELOAD]\"'], capture_output=True, text=True).stdout)\n")
    proc = _python(asan_build, "-c", "import sanitize_children\n" + code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "[]"], proc.stdout
