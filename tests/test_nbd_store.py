"""The NBD store (csrc/store_nbd.c): libnbd loaded at run time (no link-time
dependency, a one-line error naming libnbd0 when it is missing), requests
split and in flight, threads on several connections, identity, read-only
exports, server errors, a dropped or silent server and the reconnect after
it, a server taking fewer clients, TCP URIs, extents from block status."""
from __future__ import annotations

import errno
import glob
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import pymirror
from pymirror import errors

sys.path.insert(0, str(Path(__file__).parent))   # tests/ has no __init__.py
from cli_util import one_line_error, run  # noqa: E402
from volume_kinds import KINDS, ServerBacking, require_remote  # noqa: E402

TRACK = 64 << 10
SIZE = 4 << 20
PKG = Path(pymirror.__file__).parent


def rand(seed: int, n: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


@pytest.fixture
def qnbd(tmp_path):
    require_remote()
    b = KINDS["qemu-nbd"](tmp_path, "vol", SIZE)
    yield b
    b.close()


@pytest.fixture
def nbdkit(tmp_path):
    require_remote()
    b = KINDS["nbdkit"](tmp_path, "vol", SIZE)
    yield b
    b.close()


# -- the library: loaded at run time ------------------------------------------------
def test_no_link_time_dependency_on_libnbd():
    libs = {os.path.realpath(p) for p in glob.glob(str(PKG / "_core*.so")) + glob.glob(str(PKG / "lib" / "libpymirror.so.*"))
            if os.path.isfile(p)}
    assert libs, "no compiled core found"
    for lib in libs:
        out = subprocess.run(["readelf", "-d", lib], capture_output=True, text=True, check=True).stdout
        needed = [ln for ln in out.splitlines() if "NEEDED" in ln]
        assert needed and not any("nbd" in ln or "rbd" in ln for ln in needed), (lib, needed)


def test_missing_libnbd_is_one_line_naming_the_package(tmp_path, qnbd):
    env = dict(os.environ, PYMIRROR_LIBNBD="libnbd-not-here.so.0")
    code = ("import pymirror, sys\n"
            "try:\n"
            f"    pymirror.Volume.open({qnbd.uri!r})\n"
            "except pymirror.errors.MissingLibraryError as e:\n"
            "    print(type(e).__name__, e.errno, e); sys.exit(0)\n"
            "sys.exit(1)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "libnbd0" in proc.stdout and "libnbd-not-here.so.0" in proc.stdout
    (tmp_path / "std.img").write_bytes(b"\0" * SIZE)
    proc = run("pair", tmp_path / "p.meta", "--standard", tmp_path / "std.img", "--mirror", qnbd.uri,
               check=False, env=env)
    line = one_line_error(proc, 2)
    assert "Debian package libnbd0" in line
    assert not (tmp_path / "p.meta").exists()


# -- I/O -----------------------------------------------------------------------------
@pytest.mark.parametrize("qd", [1, 3, 64])
def test_large_and_odd_ios_split_into_requests_read_back(nbdkit, qd):
    with pymirror.Volume.open(f"{nbdkit.uri}&qd={qd}") as v:
        assert v.size == SIZE and v.kind == "nbd"
        data = rand(qd, SIZE - 12345)
        v.write(12345, data)
        assert v.read(12345, len(data)) == data
        v.flush()
        assert nbdkit.path.read_bytes()[12345:] == data      # the server wrote it to its file


def test_threads_on_several_connections_keep_their_data(qnbd):
    with pymirror.Volume.open(f"{qnbd.uri}&conns=4&qd=4") as v:
        failures: list[str] = []
        barrier = threading.Barrier(4)

        def worker(k: int) -> None:
            rng = np.random.default_rng(k)
            barrier.wait()
            for i in range(40):
                off = (k * (SIZE // 4)) + int(rng.integers(0, SIZE // 4 - 300000))
                data = rng.integers(0, 256, int(rng.integers(1, 300000)), dtype=np.uint8).tobytes()
                v.write(off, data)
                if v.read(off, len(data)) != data:
                    failures.append(f"thread {k} op {i}")

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not failures


def test_identity_names_the_export_and_the_server(qnbd, nbdkit, tmp_path):
    with pymirror.Volume.open(qnbd.uri) as a, pymirror.Volume.open(nbdkit.uri) as b:
        ids = []
        for v in (a, b):
            buf = pymirror._native.ffi.new("char[300]")
            with v._call as p:
                assert pymirror._native.lib.pm_store_identity(p, buf, 300) == 0
            ids.append(pymirror._native.ffi.string(buf).decode())
        assert ids[0] == f"nbd::{SIZE}@{qnbd.sock}" and ids[1] == f"nbd::{SIZE}@{nbdkit.sock}"
    # one export named twice is one volume: refused as a pair
    with pytest.raises(errors.GeometryError, match="same volume"):
        pymirror.Pair.create(tmp_path / "p.meta", qnbd.uri, qnbd.uri + "&qd=2")
    assert not (tmp_path / "p.meta").exists()


def test_read_only_export_refuses_a_writable_open(tmp_path):
    require_remote()
    img = tmp_path / "ro.img"
    img.write_bytes(b"\0" * SIZE)
    ro = ServerBacking(lambda p, s: ["qemu-nbd", "-r", "-k", str(s), "-f", "raw", "-t", str(p)], "qemu-nbd", img,
                       tmp_path / "ro.sock")
    try:
        with pytest.raises(OSError, match="read-only") as e:
            pymirror.Volume.open(ro.uri)
        assert e.value.errno == errno.EROFS
        with pymirror.Volume.open(ro.uri, readonly=True) as v:
            assert v.read(0, 4096) == b"\0" * 4096
    finally:
        ro.close()


def test_a_server_error_fails_that_io_only(tmp_path):
    require_remote()
    img = tmp_path / "err.img"
    img.write_bytes(b"\0" * SIZE)
    b = ServerBacking(lambda p, s: ["nbdkit", "-f", "-U", str(s), "--filter=error", "file", f"file={p}",
                                    "error-pwrite=ENOSPC", "error-pwrite-rate=100%"], "nbdkit", img,
                      tmp_path / "err.sock")
    try:
        with pymirror.Volume.open(b.uri) as v:
            with pytest.raises(OSError) as e:
                v.write(0, b"x" * 8192)
            assert e.value.errno == errno.ENOSPC and "server failed a write" in str(e.value)
            assert v.read(0, 4096) == b"\0" * 4096          # the connection is still good
    finally:
        b.close()


def test_a_dropped_server_fails_io_and_the_next_io_reconnects(qnbd):
    with pymirror.Volume.open(qnbd.uri) as v:
        v.write(0, b"before")
        v.flush()
        qnbd.stop(signal.SIGKILL)
        with pytest.raises(OSError) as e:
            v.read(0, 6)
        assert qnbd.uri in str(e.value)
        qnbd.start()
        assert v.read(0, 6) == b"before"                   # the same Volume, connected again
        v.write(4096, b"after")
        assert v.read(4096, 5) == b"after"


def test_a_silent_server_times_out_and_the_next_io_reconnects(qnbd):
    # qemu-nbd: nbdkit 1.32 can abort (an assertion in raw_send_socket) when a
    # client closes the connection while a reply is pending, as this test does
    with pymirror.Volume.open(qnbd.uri + "&timeout=1") as v:
        v.write(0, b"x")
        qnbd.proc.send_signal(signal.SIGSTOP)
        try:
            t = time.monotonic()
            with pytest.raises(OSError) as e:
                v.read(0, 1 << 20)
            assert e.value.errno == errno.ETIMEDOUT and "did not answer" in str(e.value)
            assert time.monotonic() - t < 10
        finally:
            qnbd.proc.send_signal(signal.SIGCONT)
        assert v.read(0, 1) == b"x"


def test_a_server_taking_fewer_clients_than_conns_is_shared(tmp_path):
    """qemu-nbd -e 2 offers multi-conn but leaves a third client hanging in
    the handshake: the store gives up on that one after a short wait and
    shares the two it has."""
    require_remote()
    img = tmp_path / "e2.img"
    img.write_bytes(b"\0" * SIZE)
    b = ServerBacking(lambda p, s: ["qemu-nbd", "-k", str(s), "-f", "raw", "-t", "-e", "2", str(p)], "qemu-nbd",
                      img, tmp_path / "e2.sock")
    try:
        with pymirror.Volume.open(b.uri + "&conns=4") as v:
            failures: list[int] = []

            def worker(k: int) -> None:
                for i in range(10):
                    data = bytes([k * 16 + i]) * (256 << 10)
                    v.write(k << 20, data)
                    if v.read(k << 20, len(data)) != data:
                        failures.append(k)

            t0 = time.monotonic()
            threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=60)
            assert not any(t.is_alive() for t in threads), "an I/O hung on a connection the server never took"
            assert not failures
            assert time.monotonic() - t0 < 30
    finally:
        b.close()


def test_tcp_uri_with_an_export_name(tmp_path):
    require_remote()
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    img = tmp_path / "tcp.img"
    img.write_bytes(b"\0" * SIZE)
    proc = subprocess.Popen(["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "file", f"file={img}"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        uri = f"nbd://127.0.0.1:{port}/disk1?qd=2"
        deadline = time.monotonic() + 15
        while True:
            try:
                v = pymirror.Volume.open(uri)
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "nbdkit did not listen"
                time.sleep(0.05)
        with v:
            assert v.path == uri and v.size == SIZE
            v.write(SIZE - 3, b"end")
            assert v.read(SIZE - 3, 3) == b"end"
            buf = pymirror._native.ffi.new("char[300]")
            with v._call as p:
                assert pymirror._native.lib.pm_store_identity(p, buf, 300) == 0
            assert pymirror._native.ffi.string(buf).decode() == f"nbd:disk1:{SIZE}@127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _extents(v: pymirror.Volume, off: int, length: int) -> list[tuple[int, int, int]]:
    from pymirror._native import ffi, lib

    out = ffi.new("struct pm_extent[]", 64)
    with v._call as p:
        n = lib.pm_store_extents(p, off, length, out, 64)
    assert n > 0, ffi.string(lib.pm_last_error())
    return [(int(out[i].offset), int(out[i].length), int(out[i].kind)) for i in range(n)]


@pytest.mark.parametrize("server", ["nbdkit", "qemu-nbd"])
def test_extents_come_from_block_status(tmp_path, server):
    """Holes and zeroes of the export (NBD_CMD_BLOCK_STATUS, base:allocation),
    consecutive from the start of the range, clipped to it."""
    require_remote()
    b = KINDS[server](tmp_path, "ext", SIZE)           # a sparse file: all hole
    try:
        with pymirror.Volume.open(b.uri) as v:
            v.write(1 << 20, rand(3, 128 << 10))
            v.flush()
            ext = _extents(v, 0, SIZE)
            assert ext[0][0] == 0 and sum(e[1] for e in ext) == SIZE
            assert all(a[0] + a[1] == b_[0] for a, b_ in zip(ext, ext[1:]))       # consecutive
            data = [e for e in ext if e[2] == 0]
            assert any(e[0] <= 1 << 20 and e[0] + e[1] >= (1 << 20) + (128 << 10) for e in data)
            assert ext[0][2] in (1, 2) and ext[-1][2] in (1, 2)                     # hole or zero around it
            part = _extents(v, (1 << 20) + 4096, 8192)
            assert part == [((1 << 20) + 4096, 8192, 0)]
    finally:
        b.close()
