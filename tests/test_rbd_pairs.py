"""The pair invariants (docs/states.md) on RBD-backed pairs and mixed ones:
both volumes RBD images, a local standard with an RBD mirror, and an RBD
standard with a local mirror.  Needs the one-node Ceph cluster
(tests/services/ceph.py): skipped without it, failed under CI."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import threading

import numpy as np
import pytest

import pymirror
from pymirror import CopyConfig, errors
from pymirror.volume_rbd import open_rbd

TRACK = 64 << 10
SIZE = 8 << 20
NEUTRAL = tempfile.gettempdir()
KINDS = ["rbd+rbd", "file+rbd", "rbd+file"]


def fill(spec: str, seed: int, size: int = SIZE) -> None:
    rng = np.random.default_rng(seed)
    with pymirror.Volume.open(spec) as v:
        for off in range(0, size, 1 << 20):
            v.write(off, rng.integers(0, 256, min(1 << 20, size - off), dtype=np.uint8).tobytes())
        v.flush()


def digest(read_into, size: int = SIZE) -> str:
    h = hashlib.sha256()
    buf = bytearray(1 << 20)
    for off in range(0, size, len(buf)):
        mv = memoryview(buf)[:min(len(buf), size - off)]
        read_into(off, mv)
        h.update(mv)
    return h.hexdigest()


def make_volume(kind: str, rbd_images, tmp_path, name: str, size: int = SIZE) -> str:
    if kind == "rbd":
        return rbd_images.new(size, name)
    path = str(tmp_path / f"{name}.img")
    pymirror.Volume.create(path, size).close()
    return path


@pytest.fixture(params=KINDS)
def volumes(request, rbd_images, tmp_path):
    """(standard, mirror): a URI or a path each, the mirror filled with
    random data, the standard with other random data."""
    std_kind, mir_kind = request.param.split("+")
    std = make_volume(std_kind, rbd_images, tmp_path, "std")
    mir = make_volume(mir_kind, rbd_images, tmp_path, "mir")
    fill(mir, 1)
    fill(std, 2)
    return std, mir


@pytest.fixture
def split_pair(volumes, tmp_path):
    """A split pair whose two sides differ on every track (the mirror holds
    seed 1 from an establish, then the standard was rewritten)."""
    std, mir = volumes
    pair = pymirror.Pair.create(tmp_path / "pair.meta", std, mir)
    assert pair.establish().wait(timeout=120)
    pair.split()
    rng = np.random.default_rng(3)
    for off in range(0, SIZE, 1 << 20):
        pair.write(off, rng.integers(0, 256, 1 << 20, dtype=np.uint8).tobytes())
    pair.flush()
    yield pair
    pair.close()


def test_paths_are_uris_and_identity_is_the_image_id(split_pair):
    pair = split_pair
    from pymirror._native import ffi, lib
    for vol in (pair.standard, pair.mirror):
        if vol.path.startswith("rbd:"):
            assert "?conf=" in vol.path
            buf = ffi.new("char[256]")
            with vol._call as p:
                assert lib.pm_store_identity(p, buf, 256) == 0
            ident = ffi.string(buf).decode()
            assert ident.startswith("rbd:rbd/") and "std" not in ident and "mir" not in ident, ident


def test_full_protected_restore_is_exact_and_leaves_the_mirror(split_pair):
    pair = split_pair
    mirror_hash = digest(pair.mirror_readinto)
    assert pair.verify() != []
    assert pair.restore(protect=True).wait(timeout=120)
    assert pair.state == "restored"
    assert pair.verify() == []                                   # invariant 2
    assert digest(pair.readinto) == mirror_hash
    assert digest(pair.mirror_readinto) == mirror_hash            # invariant 1
    p = pair.progress
    assert p.bytes_written == SIZE and p.tracks_copied == SIZE // TRACK


def test_incremental_restore_copies_only_changed_tracks(volumes, tmp_path):
    std, mir = volumes
    with pymirror.Pair.create(tmp_path / "pair.meta", std, mir) as pair:
        assert pair.establish().wait(timeout=120)
        pair.split()
        changed_std = {3, 17, 18, 100}
        changed_mir = {5, 17, 120}
        for t in changed_std:
            pair.write(t * TRACK + 100, b"S" * 500)
        for t in changed_mir:
            pair.mirror_write(t * TRACK + 9000, b"M" * 70000)   # spills into the next track
        changed_mir |= {t + 1 for t in changed_mir if t + 1 < SIZE // TRACK}
        pair.flush()
        expect = changed_std | changed_mir
        assert set(pair.verify()) == expect
        assert pair.restore(incremental=True, protect=True).wait(timeout=120)
        p = pair.progress
        assert p.tracks_total == len(expect)                      # invariant 5: count the bytes
        assert p.bytes_read == p.bytes_written == len(expect) * TRACK
        assert pair.verify() == []
        assert pair.state == "restored"


@pytest.mark.parametrize("policy", ["redirect", "hydrate"])
def test_restore_with_host_writers_and_readers_racing(split_pair, policy):
    pair = split_pair
    mirror_hash = digest(pair.mirror_readinto)
    threads_n, seg = 3, 3000
    nseg = SIZE // seg
    segments = {k: [s for s in range(nseg) if s % threads_n == k] for k in range(threads_n)}
    writes: dict[int, list[tuple[int, bytes]]] = {k: [] for k in range(threads_n)}
    failures: list[str] = []
    barrier = threading.Barrier(threads_n + 1)

    def worker(k: int) -> None:
        rng = np.random.default_rng(100 + k)
        written: set[int] = set()
        barrier.wait()
        for i in range(60):
            s = int(rng.choice(segments[k]))
            start = int(rng.integers(0, seg))
            length = int(rng.integers(1, seg - start + 1))
            data = rng.integers(0, 256, length, dtype=np.uint8).tobytes()
            pair.write(s * seg + start, data)
            writes[k].append((s * seg + start, data))
            written.add(s)
            if pair.read(s * seg + start, length) != data:
                failures.append(f"thread {k}: write {i} not read back")           # invariant 3
            fresh = int(rng.choice(segments[k]))
            if fresh not in written and pair.read(fresh * seg, seg) != pair.mirror_read(fresh * seg, seg):
                failures.append(f"thread {k}: untouched segment {fresh} does not read as the mirror")  # 4

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(threads_n)]
    for t in threads:
        t.start()
    job = pair.restore(protect=True, config=CopyConfig(rate=4 << 20, read_policy=policy))
    barrier.wait()
    for t in threads:
        t.join()
    job.set_rate(0)
    assert job.wait(timeout=120)
    assert not failures, failures[:5]
    assert pair.state == "restored"
    assert digest(pair.mirror_readinto) == mirror_hash, "protected mirror changed"
    expect = bytearray(pair.mirror_read(0, SIZE))
    for k in range(threads_n):
        for off, data in writes[k]:
            expect[off:off + len(data)] = data
    assert pair.read(0, SIZE) == bytes(expect)


def test_unprotected_restore_mirrors_host_writes_and_ends_established(split_pair):
    pair = split_pair
    job = pair.restore(protect=False, config=CopyConfig(rate=8 << 20))
    for i in range(20):
        pair.write(i * 400_000 + 7, bytes([i + 1]) * 5000)
    assert job.wait(timeout=120)
    assert pair.state == "established"
    assert pair.verify() == []
    assert pair.read(7, 5000) == bytes([1]) * 5000


def test_established_concurrent_overlapping_writers_keep_sides_equal(volumes, tmp_path):
    std, mir = volumes
    with pymirror.Pair.create(tmp_path / "pair.meta", std, mir) as pair:
        assert pair.establish().wait(timeout=120)
        barrier = threading.Barrier(4)

        def worker(k: int) -> None:
            rng = np.random.default_rng(k)
            barrier.wait()
            for _ in range(50):
                off = int(rng.integers(0, 256 << 10))     # all threads on the same 4 tracks
                pair.write(off, bytes([k + 1]) * int(rng.integers(1, 20000)))

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert pair.verify() == []                                 # invariant 6


def test_reopen_mid_restore_and_resume(split_pair, tmp_path):
    pair = split_pair
    meta = pair.meta_path
    mirror_hash = digest(pair.mirror_readinto)
    job = pair.restore(protect=True, config=CopyConfig(rate=2 << 20))
    pair.write(SIZE - 5000, b"w" * 5000)
    pair.flush()
    job.pause()
    left = pair.progress.tracks_pending
    assert 0 < left < SIZE // TRACK
    pair.close()
    with pymirror.Pair.open(meta) as again:
        assert again.standard.path.startswith("rbd:") or again.mirror.path.startswith("rbd:")
        assert again.state == "restoring"
        assert again.read(SIZE - 5000, 5000) == b"w" * 5000
        assert again.resume(CopyConfig()).wait(timeout=120)
        assert again.state == "restored"
        expect = bytearray(again.mirror_read(0, SIZE))
        expect[SIZE - 5000:] = b"w" * 5000
        assert again.read(0, SIZE) == bytes(expect)
        assert digest(again.mirror_readinto) == mirror_hash


def test_one_image_cannot_be_both_sides(rbd_images, tmp_path):
    uri = rbd_images.new(1 << 20, "same")
    other = uri.replace("timeout=10", "timeout=11")
    with open_rbd(uri) as a, open_rbd(other) as b:
        with pytest.raises(errors.MirrorError):
            pymirror.Pair.create(None, a, b)


def test_snapshot_opens_read_only(ceph_cluster, rbd_images):
    uri = rbd_images.new(1 << 20, "snap")
    with open_rbd(uri) as v:
        v.write(0, b"before")
        v.flush()
    name = uri.split("/", 1)[1].split("?", 1)[0]
    ceph_cluster.rbd("snap", "create", f"{name}@s1")
    with open_rbd(uri) as v:
        v.write(0, b"after!")
    snap_uri = uri.replace(name, f"{name}@s1")
    with open_rbd(snap_uri) as s:
        assert s.read(0, 6) == b"before"
        with pytest.raises(OSError):
            s.write(0, b"x")
    ceph_cluster.rbd("snap", "purge", name)


def test_missing_image_and_pool_are_clear_errors(ceph_cluster):
    with pytest.raises(FileNotFoundError, match="no image nothere"):
        open_rbd(ceph_cluster.uri("nothere"))
    with pytest.raises(FileNotFoundError, match="no such pool"):
        open_rbd(ceph_cluster.uri("x").replace("rbd:rbd/", "rbd:nopool/"))


def test_unreachable_cluster_fails_within_the_timeout(tmp_path):
    conf = tmp_path / "ceph.conf"
    conf.write_text("[global]\nmon host = 127.0.0.1:9\nauth client required = none\n")
    with pytest.raises(OSError, match="cannot connect to the Ceph cluster"):
        open_rbd(f"rbd:rbd/x?conf={conf}&timeout=2")


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pymirror", *args], cwd=NEUTRAL, capture_output=True, text=True,
                          env=env, timeout=180)


def test_cli_create_pair_establish_restore(ceph_cluster, rbd_images, tmp_path):
    env = {**os.environ, "CEPH_CONF": str(ceph_cluster.conf)}
    name = ceph_cluster.new_image_name("cli")
    rbd_images.names.append(name)
    uri = f"rbd:rbd/{name}?timeout=10"
    p = run_cli(["create", uri, "--size", "4M"], env)
    assert p.returncode == 0, p.stderr
    assert f"created rbd:rbd/{name}" in p.stdout
    p = run_cli(["create", uri, "--size", "4M"], env)
    assert p.returncode == 2 and "already exists" in p.stderr and "Traceback" not in p.stderr
    assert ceph_cluster.rbd("info", name).count("size 4 MiB") == 1
    std = tmp_path / "std.img"
    assert run_cli(["create", str(std), "--size", "4M"], env).returncode == 0
    with open(std, "r+b") as f:
        f.write(b"host data" * 1000)
    meta = str(tmp_path / "p.meta")
    p = run_cli(["pair", meta, "--standard", str(std), "--mirror", uri], env)
    assert p.returncode == 0, p.stderr
    for args in (["establish", meta], ["split", meta]):
        p = run_cli(args, env)
        assert p.returncode == 0, p.stderr
    with open(std, "r+b") as f:
        f.write(b"overwritten" * 1000)
    p = run_cli(["restore", meta], env)
    assert p.returncode == 0, p.stderr
    assert std.read_bytes()[:9000] == b"host data" * 1000
    p = run_cli(["query", meta], env)
    assert p.returncode == 0 and "rbd:rbd/" in p.stdout, p.stdout + p.stderr
    assert "outside pymirror cannot be detected" in p.stdout


def test_create_rbd_returns_the_new_image_open(ceph_cluster, rbd_images):
    from pymirror.volume_rbd import create_rbd
    name = ceph_cluster.new_image_name("new")
    rbd_images.names.append(name)
    with create_rbd(ceph_cluster.uri(name), 3 << 20, track_size=4096) as v:
        assert v.size == 3 << 20 and v.track_size == 4096
        assert v.read(0, 4096) == bytes(4096)
        v.write(4096, b"x")
    with pytest.raises(FileExistsError, match="never overwrites"):
        create_rbd(ceph_cluster.uri(name), 3 << 20)


def _extents(vol, offset: int, length: int, max_: int) -> list[tuple[int, int, int]]:
    from pymirror._native import check, ffi, lib
    out = ffi.new("struct pm_extent[]", max_)
    with vol._call as p:
        n = check(lib.pm_store_extents(p, offset, length, out, max_))
    return [(int(out[i].offset), int(out[i].length), int(out[i].kind)) for i in range(n)]


def test_extents_are_the_allocated_ranges(rbd_images):
    """Written ranges are data, the rest holes that read as zeroes; the
    extents are consecutive from the offset, and a short ``max`` gives a
    prefix of the same answer."""
    from pymirror._native import lib
    size = 16 << 20
    uri = rbd_images.new(size, "ext")
    writes = [(100, 5000), (5 << 20, 70000), ((9 << 20) - 1000, 3000), (size - 4096, 4096)]
    with open_rbd(uri) as v:
        for off, n in writes:
            v.write(off, b"\x01" * n)
        for start, length in ((0, size), (3 << 20, 8 << 20), (5 << 20, 4096)):
            ext = _extents(v, start, length, 64)
            assert ext and ext[0][0] == start
            assert sum(e[1] for e in ext) == length
            for a, b in zip(ext, ext[1:]):
                assert a[0] + a[1] == b[0] and a[2] != b[2]
            for off, n in writes:                       # every written byte is in a data extent
                for byte in (off, off + n - 1):
                    if start <= byte < start + length:
                        kind = next(e[2] for e in ext if e[0] <= byte < e[0] + e[1])
                        assert kind == lib.PM_EXTENT_DATA, (byte, ext)
            for off, n, kind in ext:                    # holes read as zeroes
                if kind == lib.PM_EXTENT_HOLE:
                    assert v.read(off, min(n, 1 << 20)) == bytes(min(n, 1 << 20))
            for m in range(1, len(ext)):
                assert _extents(v, start, length, m) == ext[:m]
        assert any(k == lib.PM_EXTENT_HOLE for _, _, k in _extents(v, 0, size, 64))
