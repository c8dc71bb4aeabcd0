"""Faults on RBD-backed pairs: a stalled OSD during a restore with a host
writing (SIGSTOP, then SIGCONT: a killed memstore OSD would come back
empty), and a pymirror process killed mid-restore.  The job pauses with a
clear error; ``resume`` completes with the invariants held and nothing
acknowledged lost."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pytest

import pymirror
from pymirror import CopyConfig, errors

TRACK = 64 << 10
SIZE = 16 << 20
NEUTRAL = tempfile.gettempdir()


def digest(read_into, size: int = SIZE) -> str:
    h = hashlib.sha256()
    buf = bytearray(1 << 20)
    for off in range(0, size, len(buf)):
        mv = memoryview(buf)[:min(len(buf), size - off)]
        read_into(off, mv)
        h.update(mv)
    return h.hexdigest()


def split_rbd_pair(rbd_images, tmp_path, timeout: int = 10) -> str:
    """A split RBD pair whose sides differ everywhere; returns its metadata path."""
    std = rbd_images.new(SIZE, "fstd", timeout=timeout)
    mir = rbd_images.new(SIZE, "fmir", timeout=timeout)
    meta = str(tmp_path / "pair.meta")
    rng = np.random.default_rng(1)
    with pymirror.Pair.create(meta, std, mir) as pair:
        for off in range(0, SIZE, 1 << 20):
            pair.write(off, rng.integers(0, 256, 1 << 20, dtype=np.uint8).tobytes())
        assert pair.establish().wait(timeout=120)
        pair.split()
        for off in range(0, SIZE, 1 << 20):
            pair.write(off, rng.integers(0, 256, 1 << 20, dtype=np.uint8).tobytes())
        pair.flush()
    return meta


def test_stalled_osd_pauses_the_restore_and_resume_completes(ceph_cluster, rbd_images, tmp_path):
    meta = split_rbd_pair(rbd_images, tmp_path, timeout=2)
    pair = pymirror.Pair.open(meta)
    try:
        mirror_hash = digest(pair.mirror_readinto)
        writes: list[tuple[int, bytes]] = []
        failed = [0]
        stop = threading.Event()

        def writer() -> None:
            # each write is retried with the same bytes until acknowledged, so
            # the final image is the mirror overlaid with `writes` in order
            rng = np.random.default_rng(7)
            while not stop.is_set():
                off = int(rng.integers(0, SIZE - 20000))
                data = rng.integers(0, 256, int(rng.integers(1, 20000)), dtype=np.uint8).tobytes()
                while True:
                    try:
                        pair.write(off, data)
                        break
                    except OSError:
                        failed[0] += 1
                        time.sleep(0.1)
                writes.append((off, data))
                time.sleep(0.01)

        job = pair.restore(protect=True, config=CopyConfig(rate=4 << 20, retries=1))
        t = threading.Thread(target=writer)
        t.start()
        time.sleep(1.0)
        ceph_cluster.stall_osd()
        stalled = time.monotonic()
        try:
            with pytest.raises(errors.JobError) as ei:
                job.wait(timeout=60)
            paused_after = time.monotonic() - stalled
            prog = pair.progress
            assert prog.running and prog.paused and prog.error is not None
            assert "timed out" in prog.error.lower(), prog.error
            assert "timed out" in str(ei.value).lower() and "resume" in str(ei.value)
            assert paused_after < 30
            assert prog.tracks_pending > 0
        finally:
            ceph_cluster.resume_osd()
        time.sleep(1.0)               # the writer goes on once the OSD answers
        stop.set()
        t.join(60)
        assert not t.is_alive()
        assert failed[0] > 0, "the host writer never saw the stall"
        assert pair.resume(CopyConfig()).wait(timeout=120)
        assert pair.state == "restored"
        assert digest(pair.mirror_readinto) == mirror_hash            # invariant 1
        expect = bytearray(pair.mirror_read(0, SIZE))
        for off, data in writes:
            expect[off:off + len(data)] = data
        assert pair.read(0, SIZE) == bytes(expect)                    # invariant 3
    finally:
        ceph_cluster.resume_osd()
        pair.close()


CHILD = r"""
import json, sys, time
import numpy as np
import pymirror
from pymirror import CopyConfig
meta, size = sys.argv[1], int(sys.argv[2])
pair = pymirror.Pair.open(meta)
pair.restore(protect=True, config=CopyConfig(rate=2 << 20))
rng = np.random.default_rng(11)
acked = []
for i in range(40):
    off = int(rng.integers(0, size - 9000))
    data = bytes([i + 1]) * int(rng.integers(1, 9000))
    pair.write(off, data)
    acked.append((off, len(data), i + 1))
pair.flush()
print(json.dumps(acked), flush=True)
time.sleep(600)
"""


def test_sigkill_mid_restore_then_reopen_and_resume(rbd_images, tmp_path):
    meta = split_rbd_pair(rbd_images, tmp_path)
    with pymirror.Pair.open(meta) as pair:
        mirror_hash = digest(pair.mirror_readinto)
    child = subprocess.Popen([sys.executable, "-c", CHILD, meta, str(SIZE)], cwd=NEUTRAL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()
        assert line, child.stderr.read()
        acked = json.loads(line)
        time.sleep(0.5)
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    with pymirror.Pair.open(meta) as pair:
        assert pair.state == "restoring"
        prog = pair.progress
        assert prog.tracks_pending > 0, "the restore finished before the kill: slow it down"
        expect = bytearray(pair.mirror_read(0, SIZE))
        for off, n, byte in acked:
            expect[off:off + n] = bytes([byte]) * n
        for off, n, byte in acked[-10:]:                 # acknowledged and flushed: intact at once
            assert pair.read(off, n) == bytes(expect[off:off + n])
        assert pair.resume(CopyConfig()).wait(timeout=120)
        assert pair.state == "restored"
        assert pair.read(0, SIZE) == bytes(expect)           # invariant 7: nothing acknowledged lost
        assert digest(pair.mirror_readinto) == mirror_hash


def test_a_blocklisted_client_reconnects_on_the_next_io(ceph_cluster, rbd_images):
    uri = rbd_images.new(4 << 20, "bl", timeout=5)
    name = uri.split("/", 1)[1].split("?", 1)[0]
    with pymirror.Volume.open(uri) as v:
        v.write(0, b"a" * 4096)
        assert ceph_cluster.blocklist_watchers(name)
        with pytest.raises(OSError) as ei:          # the client is fenced: ESHUTDOWN
            for _ in range(50):
                v.write(0, b"b" * 4096)
                time.sleep(0.1)
        assert "Cannot send after transport endpoint shutdown" in str(ei.value)
        v.write(0, b"c" * 4096)                      # a new client
        assert v.read(0, 4096) == b"c" * 4096
        v.flush()


def test_blocklisted_mid_restore_reconnects_and_completes(ceph_cluster, rbd_images, tmp_path):
    """The copier's retry of the failing span runs on a new client: the
    restore goes on by itself, exact, with the protected mirror unchanged."""
    meta = split_rbd_pair(rbd_images, tmp_path, timeout=5)
    with pymirror.Pair.open(meta) as pair:
        mirror_hash = digest(pair.mirror_readinto)
        job = pair.restore(protect=True, config=CopyConfig(rate=4 << 20))
        time.sleep(0.5)
        std_name = pair.standard.path.split("/", 1)[1].split("?", 1)[0]
        cut = ceph_cluster.blocklist_watchers(std_name)
        assert cut
        # the first I/O of each store after the cut may fail, not acknowledged
        # (a write that merges a PENDING track reads the mirror, then writes
        # the standard: two stores, so up to two failures); the next runs on
        # a new client
        for attempt in range(3):
            try:
                pair.write(100, b"after the cut")
                break
            except OSError as exc:
                assert "transport endpoint shutdown" in str(exc) and attempt < 2
        if pair.progress.error is not None:    # a failing standard pauses the restore (docs/arbitration.md)
            job = pair.resume()
        assert job.wait(timeout=120)
        assert pair.state == "restored"
        expect = bytearray(pair.mirror_read(0, SIZE))
        expect[100:113] = b"after the cut"
        assert pair.read(0, SIZE) == bytes(expect)
        assert digest(pair.mirror_readinto) == mirror_hash
        assert pair.progress.tracks_pending == 0
        now = ceph_cluster.blocklist_watchers(std_name)
        assert now and not set(now) & set(cut), "the standard did not reconnect as a new client"


def test_without_a_uri_timeout_the_one_in_ceph_conf_holds(ceph_cluster, rbd_images, tmp_path):
    uri = rbd_images.new(1 << 20, "cto")
    conf = tmp_path / "ceph.conf"
    conf.write_text(ceph_cluster.conf.read_text() + "rados osd op timeout = 2\n")   # in [client]
    plain = uri.split("?", 1)[0] + f"?conf={conf}"
    with pymirror.Volume.open(plain) as v:
        v.write(0, b"x" * 4096)
        ceph_cluster.stall_osd()
        try:
            t0 = time.monotonic()
            with pytest.raises(TimeoutError):
                v.write(0, b"y" * 4096)
            assert time.monotonic() - t0 < 8
        finally:
            ceph_cluster.resume_osd()
        v.write(0, b"z" * 4096)
        assert v.read(0, 1) == b"z"
