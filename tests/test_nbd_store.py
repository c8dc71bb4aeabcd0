"""The NBD store (csrc/store_nbd.c) and volume URIs (pymirror/uri.py): URI
forms and their errors, libnbd loaded at run time (no link-time dependency,
a one-line error naming libnbd0 when it is missing), requests split and in
flight, server errors, a dropped or silent server and the reconnect after
it, and a restore that survives the NBD server being killed and restarted
while a host writes."""
from __future__ import annotations

import errno
import glob
import json
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
import pymirror.uri as uri_mod
from pymirror import CopyConfig, errors

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


# -- URIs ------------------------------------------------------------------------
@pytest.mark.parametrize("text, kind, canonical", [
    ("/a/b.img", "file", "/a/b.img"),
    ("file:/a/b.img", "file", "/a/b.img"),
    ("file:///a/b%20c.img", "file", "/a/b c.img"),
    ("file://localhost/a/b.img", "file", "/a/b.img"),
    ("/a/odd:name.img", "file", "/a/odd:name.img"),
    ("nbd://example.com/disk", "nbd", "nbd://example.com/disk"),
    ("nbd://example.com:10809/disk?qd=16&conns=2", "nbd", "nbd://example.com:10809/disk?qd=16&conns=2"),
    ("nbd+unix:///disk?socket=/run/x.sock", "nbd", "nbd+unix:///disk?socket=/run/x.sock"),
    ("nbds+unix:///?socket=/run/x.sock&timeout=0", "nbd", "nbds+unix:///?socket=/run/x.sock&timeout=0"),
    ("rbd:pool/image", "rbd", "rbd:pool/image"),
    ("rbd:pool/image@snap?conf=/etc/ceph/ceph.conf&id=admin", "rbd",
     "rbd:pool/image@snap?conf=/etc/ceph/ceph.conf&id=admin"),
])
def test_uri_forms(text, kind, canonical):
    u = uri_mod.parse(text)
    assert (u.kind, u.text) == (kind, canonical)
    assert u.remote == (kind != "file")


def test_relative_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert uri_mod.parse("v.img").text == str(tmp_path / "v.img")
    assert uri_mod.parse("file:v.img").text == str(tmp_path / "v.img")
    assert uri_mod.parse(Path("v.img")).path == str(tmp_path / "v.img")


@pytest.mark.parametrize("text, message", [
    ("nbd+unix:///disk", "needs ?socket=PATH"),
    ("nbd+unix://host/disk?socket=/x", "has no host"),
    ("nbd:///disk", "needs a host"),
    ("nbd://h:99999/disk", "port"),
    ("nbd://h/disk?qd=0", "qd=0 must be a whole number from 1 to 64"),
    ("nbd://h/disk?qd=abc", "qd=abc"),
    ("nbd://h/disk?conns=17", "conns=17"),
    ("nbd://h/disk?qd=2&qd=3", "qd= is given twice"),
    ("rbd:pool", "rbd:POOL/IMAGE"),
    ("rbd:pool/", "rbd:POOL/IMAGE"),
    ("ftp://h/x", "unknown volume scheme 'ftp'"),
    ("file://otherhost/x", "local file"),
    ("", "empty"),
])
def test_bad_uris_are_one_clear_error(text, message):
    with pytest.raises(uri_mod.VolumeURIError, match=message.replace("?", r"\?")):
        uri_mod.parse(text)


def test_rbd_without_its_module_is_a_clear_error():
    if (PKG / "volume_rbd.py").exists():
        pytest.skip("this build has RBD volumes")
    with pytest.raises(errors.MissingLibraryError, match="volume_rbd"):
        pymirror.Volume.open("rbd:pool/image")


def test_an_nbd_export_cannot_be_created():
    with pytest.raises(uri_mod.VolumeURIError, match="server makes it"):
        pymirror.Volume.create("nbd://localhost/x", 1 << 20)


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


def test_a_silent_server_times_out_and_the_next_io_reconnects(nbdkit):
    with pymirror.Volume.open(nbdkit.uri + "&timeout=1") as v:
        v.write(0, b"x")
        nbdkit.proc.send_signal(signal.SIGSTOP)
        try:
            t = time.monotonic()
            with pytest.raises(OSError) as e:
                v.read(0, 1 << 20)
            assert e.value.errno == errno.ETIMEDOUT and "did not answer" in str(e.value)
            assert time.monotonic() - t < 10
        finally:
            nbdkit.proc.send_signal(signal.SIGCONT)
        assert v.read(0, 1) == b"x"


# -- a restore across a server restart ---------------------------------------------
@pytest.mark.parametrize("killed", ["mirror", "standard"])
def test_restore_survives_the_nbd_server_killed_and_restarted(tmp_path, killed):
    """qemu-nbd (on a file) under one side is killed mid-restore while a host
    writes: the job pauses with the error and the track; after the restart,
    resume ends it, the mirror is untouched and every acknowledged write is
    there (bytes of a write that failed are unknown, unless written again)."""
    require_remote()
    kinds = {"standard": "file", "mirror": "file"}
    kinds[killed] = "qemu-nbd"
    std = KINDS[kinds["standard"]](tmp_path, "std", SIZE)
    mir = KINDS[kinds["mirror"]](tmp_path, "mir", SIZE)
    server = std if killed == "standard" else mir
    stop = threading.Event()
    w = threading.Thread(target=lambda: writer())
    pair = pymirror.Pair.create(tmp_path / "p.meta", std.uri, mir.uri, track_size=TRACK,
                                config=CopyConfig(retries=2))
    try:
        pair.write(0, rand(1, SIZE))
        assert pair.establish().wait(timeout=60)
        pair.split()
        pair.write(0, rand(2, SIZE))
        mirror = pair.mirror_read(0, SIZE)
        expect = np.frombuffer(pair.read(0, SIZE), dtype=np.uint8).copy()
        known = np.ones(SIZE, dtype=bool)
        expect[:] = np.frombuffer(mirror, dtype=np.uint8)      # what the restore will make of it
        acked = failed = 0

        def writer() -> None:
            nonlocal acked, failed
            rng = np.random.default_rng(7)
            while not stop.is_set():
                if rng.random() < 0.2:                         # a whole track, or a piece of one
                    off, n = int(rng.integers(0, SIZE // TRACK)) * TRACK, TRACK
                else:
                    off = int(rng.integers(0, SIZE - 5000))
                    n = int(rng.integers(1, 5000))
                data = rng.integers(0, 256, n, dtype=np.uint8)
                try:
                    pair.write(off, data.tobytes())
                except OSError:
                    known[off:off + n] = False
                    failed += 1
                else:
                    expect[off:off + n] = data
                    known[off:off + n] = True
                    acked += 1
                time.sleep(0.01)

        job = pair.restore(protect=True, config=CopyConfig(rate=2 << 20, retries=2))
        w.start()
        time.sleep(0.5)
        server.stop(signal.SIGKILL)
        with pytest.raises(errors.JobError, match="stopped on track"):
            job.wait(timeout=60)
        p = pair.progress
        assert p.paused and p.error_track is not None
        assert p.error in ("Connection refused", "Transport endpoint is not connected"), p.error
        assert p.tracks_pending > 0
        time.sleep(0.2)                                    # the host goes on writing against a dead server
        server.start()
        job = pair.resume(CopyConfig(rate=0, retries=2))
        assert job.wait(timeout=60)
        time.sleep(0.1)
        stop.set()
        w.join()
        assert acked > 20 and failed >= 0
        assert pair.state == "restored"
        assert pair.mirror_read(0, SIZE) == mirror                              # invariant 1
        got = np.frombuffer(pair.read(0, SIZE), dtype=np.uint8)
        bad = np.flatnonzero((got != expect) & known)
        assert bad.size == 0, f"{bad.size} acknowledged bytes lost, first at {bad[0]}"  # invariant 3
    finally:
        stop.set()
        if w.ident is not None:
            w.join()
        pair.close()
        std.close()
        mir.close()


# -- the command line ------------------------------------------------------------------
def test_cli_pair_and_query_with_uris(tmp_path, qnbd):
    (tmp_path / "std.img").write_bytes(b"\0" * SIZE)
    run("pair", tmp_path / "p.meta", "--standard", tmp_path / "std.img", "--mirror", qnbd.uri)
    q = json.loads(run("query", tmp_path / "p.meta", "--json").stdout)
    assert q["mirror"]["path"] == qnbd.uri and q["mirror"]["kind"] == "nbd"
    assert q["mirror"]["detects_outside_changes"] is False
    assert q["standard"]["kind"] == "file" and q["standard"]["detects_outside_changes"] is True
    text = run("query", tmp_path / "p.meta").stdout
    assert "writes made to it outside pymirror cannot be detected" in text
    run("establish", tmp_path / "p.meta")
    assert json.loads(run("query", tmp_path / "p.meta", "--json").stdout)["state"] == "established"
    proc = run("pair", tmp_path / "q.meta", "--standard", tmp_path / "std.img", "--mirror", "nbd+unix:///x",
               check=False)
    assert "needs ?socket=PATH" in one_line_error(proc, 2)
    assert not (tmp_path / "q.meta").exists()


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


@pytest.mark.parametrize("kinds", [("file", "qemu-nbd"), ("nbdkit", "qemu-nbd")], ids=lambda k: "+".join(k))
def test_sigkill_mid_restore_then_reopen_and_resume(tmp_path, kinds):
    """pymirror killed (SIGKILL) in the middle of a restore onto or from NBD
    volumes: the pair reopens by its URIs with the restore paused, and
    resume makes the standard exactly the mirror (invariants 2 and 7)."""
    require_remote()
    std = KINDS[kinds[0]](tmp_path, "std", SIZE)
    mir = KINDS[kinds[1]](tmp_path, "mir", SIZE)
    meta = tmp_path / "p.meta"
    try:
        with pymirror.Pair.create(meta, std.uri, mir.uri, track_size=TRACK) as pair:
            pair.write(0, rand(1, SIZE))
            assert pair.establish().wait(timeout=60)
            pair.split()
            pair.write(0, rand(2, SIZE))
            mirror = pair.mirror_read(0, SIZE)
        code = ("import sys, time, pymirror\n"
                "p = pymirror.Pair.open(sys.argv[1])\n"
                "p.restore(config=pymirror.CopyConfig(rate=1 << 20))\n"
                "print('started', flush=True)\n"
                "time.sleep(60)\n")
        child = subprocess.Popen([sys.executable, "-c", code, str(meta)], stdout=subprocess.PIPE, text=True,
                                 cwd=tmp_path)
        assert child.stdout is not None and child.stdout.readline().strip() == "started"
        time.sleep(1.0)
        child.kill()
        child.wait()
        with pymirror.Pair.open(meta) as pair:
            assert pair.state == "restoring"
            p = pair.progress
            assert p.running and p.paused and 0 < p.tracks_pending <= SIZE // TRACK
            assert pair.read(0, SIZE) == mirror                  # reads see the final image at once
            assert pair.resume().wait(timeout=60)
            assert pair.state == "restored"
            assert pair.read(0, SIZE) == mirror and pair.mirror_read(0, SIZE) == mirror
    finally:
        std.close()
        mir.close()


# -- a property: pymirror's parameters against a plain model ----------------------
from hypothesis import given, strategies as st  # noqa: E402

_param = st.tuples(st.sampled_from(["qd", "conns", "timeout", "tls", "x"]),
                   st.one_of(st.integers(-5, 100000).map(str), st.sampled_from(["", "abc", "1x", "08"])))


@given(st.lists(_param, max_size=5))
def test_nbd_parameters_accepted_exactly_when_the_model_says(params):
    query = "&".join(f"{k}={v}" for k, v in params)
    text = "nbd+unix:///disk?socket=/run/s.sock" + ("&" + query if query else "")
    # the model: each of pymirror's keys at most once, a whole number in its range
    ok, seen = True, set()
    for key, value in params:
        if key in uri_mod.NBD_PARAMS:
            lo, hi = uri_mod.NBD_PARAMS[key]
            if key in seen or not value.isdigit() or not lo <= int(value) <= hi:
                ok = False
            seen.add(key)
    if ok:
        assert uri_mod.parse(text).text == text
    else:
        with pytest.raises(uri_mod.VolumeURIError):
            uri_mod.parse(text)
    # the C parser (store_uri.c) agrees: a bad parameter fails before any
    # connection is tried; a good one gets as far as connecting (no server)
    from pymirror._native import ffi, lib

    out = ffi.new("pm_store **")
    rc = lib.pm_store_open_nbd(text.replace("/run/s.sock", "/nonexistent/pm.sock").encode(), 0, out)
    msg = ffi.string(lib.pm_last_error()).decode()
    assert rc < 0 and out[0] == ffi.NULL
    assert ("cannot connect" in msg) == ok, msg


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
