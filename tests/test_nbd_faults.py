"""Faults on NBD volumes during a restore: the NBD server (qemu-nbd on a
file) killed and restarted while a host writes, and pymirror itself killed
mid-restore then reopened by the volumes' URIs."""
from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import pymirror
from pymirror import CopyConfig, errors

sys.path.insert(0, str(Path(__file__).parent))   # tests/ has no __init__.py
from volume_kinds import KINDS, require_remote  # noqa: E402

TRACK = 64 << 10
SIZE = 4 << 20


def rand(seed: int, n: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


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
