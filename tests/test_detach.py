"""A failing mirror never fails the host (issue 16 item 3, docs/states.md
"detached"): an error on the mirror during a host write or flush while
syncing or established detaches it -- the host's I/O succeeds on the
standard, the pair goes to ``detached``, the record (error, track, time) is
committed and shown by ``query``, restore and split are refused, and a later
incremental establish makes the sides equal again.  Errors of the copy
itself still pause the job (and survive a restart); during a restore a
failing mirror or standard pauses the job instead."""
from __future__ import annotations

import errno
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import pymirror
from pymirror import errors
from pymirror.nbd import NBDServer
from pymirror.nbd import protocol as P
from pymirror.report import query_dict

_spec = importlib.util.spec_from_file_location("nbd_util", Path(__file__).with_name("nbd_util.py"))
nbd_util = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("nbd_util", nbd_util)
_spec.loader.exec_module(nbd_util)
_spec = importlib.util.spec_from_file_location("cli_util", Path(__file__).with_name("cli_util.py"))
cli_util = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("cli_util", cli_util)
_spec.loader.exec_module(cli_util)

TRACK = 64 << 10
NTRACKS = 64
SIZE = NTRACKS * TRACK
ERRNOS = [errno.ENOSPC, errno.EIO]


def pattern(seed: int, n: int = SIZE) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(256)) * (n // 256)


def file_pair(tmp_path, mirror_dir=None, *, config=None):
    std = tmp_path / "std.img"
    mir = Path(mirror_dir or tmp_path) / "mir.img"
    pymirror.Volume.create(std, SIZE).close()
    pymirror.Volume.create(mir, SIZE).close()
    pair = pymirror.Pair.create(tmp_path / "p.meta", std, mir, config=config)
    pair.write(0, pattern(1))
    return pair


def assert_equal_sides(pair):
    assert pair.verify() == []
    assert pair.read(0, SIZE) == pair.mirror.read(0, SIZE)


# -- while established --------------------------------------------------------------

@pytest.mark.parametrize("err", ERRNOS, ids=errno.errorcode.get)
def test_established_mirror_error_detaches_and_incremental_establish_repairs(tmp_path, err):
    pair = file_pair(tmp_path)
    pair.establish().wait()
    pair.mirror.inject_fault("write", 9 * TRACK, TRACK, err)
    before = time.time()
    pair.write(9 * TRACK + 100, b"A" * 5000)              # no error: the standard has it
    assert pair.state == "detached"
    rec = pair.detached
    assert rec["errno"] == errno.errorcode[err] and rec["track"] == 9
    assert before - 1 <= rec["time"] <= time.time() + 1
    assert pair.read(9 * TRACK + 100, 5000) == b"A" * 5000
    pair.write(20 * TRACK, b"B" * TRACK, fua=True)         # later writes: the standard alone
    pair.flush()
    assert pair.mirror_invalid >= 2                         # tracks 9 and 20 at least
    with pytest.raises(errors.DetachedError, match="track 9"):
        pair.restore()
    with pytest.raises(errors.DetachedError):
        pair.split()
    with pytest.raises(errors.DetachedError):
        pair.mirror_read(0, 10)
    pair.mirror.clear_faults()
    job = pair.establish(incremental=True)
    job.wait()
    assert pair.state == "established" and pair.detached is None and pair.mirror_invalid == 0
    assert job.progress.tracks_total < NTRACKS              # incremental: not the whole volume
    assert_equal_sides(pair)
    pair.close()


def test_a_failing_mirror_flush_detaches_and_the_host_flush_succeeds(tmp_path):
    pair = file_pair(tmp_path)
    pair.establish().wait()
    pair.write(3 * TRACK, b"x" * 100)
    # a flush cannot be injected; a failing write inside a FUA write is the same path
    pair.mirror.inject_fault("write", 0, SIZE, errno.EIO)
    pair.write(4 * TRACK, b"y" * 100, fua=True)
    assert pair.state == "detached"
    pair.flush()
    pair.mirror.clear_faults()
    pair.establish(incremental=True).wait()
    assert_equal_sides(pair)
    pair.close()


# -- while syncing --------------------------------------------------------------------

@pytest.mark.parametrize("err", ERRNOS, ids=errno.errorcode.get)
def test_syncing_mirror_error_on_a_host_write_detaches(tmp_path, err):
    pair = file_pair(tmp_path, config=pymirror.CopyConfig(rate=4 * TRACK))   # slow: still syncing
    job = pair.establish()
    pair.mirror.inject_fault("write", 40 * TRACK, 4 * TRACK, err)
    pair.write(40 * TRACK, b"C" * (2 * TRACK))             # a whole-track write, then a partial one
    pair.write(42 * TRACK + 7, b"D" * 9)
    assert pair.state == "detached"
    assert pair.detached["track"] == 40
    with pytest.raises(errors.DetachedError):
        job.wait()
    assert not pair.progress.running                        # the establish ended with the detach
    # every mirror track not yet copied is CHANGED: an incremental establish repairs it
    assert pair.mirror_invalid > 0
    pair.mirror.clear_faults()
    pair.establish(incremental=True, config=pymirror.CopyConfig()).wait()
    assert pair.state == "established"
    assert_equal_sides(pair)
    pair.close()


def test_copy_errors_still_pause_and_a_host_write_then_detaches(tmp_path):
    """The issue's case: the copy fails (the job pauses, as before), then a
    host write hits the failing mirror: it succeeds and the pair detaches."""
    pair = file_pair(tmp_path)
    pair.mirror.inject_fault("write", 30 * TRACK, TRACK, errno.ENOSPC)
    job = pair.establish(config=pymirror.CopyConfig(retries=1))
    with pytest.raises(errors.JobError, match="track 30"):
        job.wait()
    assert pair.state == "syncing" and pair.progress.error is not None
    pair.write(30 * TRACK + 1, b"E" * 10)          # partial: the copy's job, the mirror is not written
    assert pair.state == "syncing"
    pair.write(30 * TRACK, b"E" * TRACK)           # whole: written to both sides, and fails on the mirror
    assert pair.state == "detached"
    pair.mirror.clear_faults()
    pair.establish(incremental=True).wait()
    assert_equal_sides(pair)
    pair.close()


def test_concurrent_writers_all_succeed_while_the_mirror_fails(tmp_path):
    pair = file_pair(tmp_path)
    pair.establish().wait()
    model = bytearray(pattern(1))
    lock = threading.Lock()
    barrier = threading.Barrier(5)
    failures = []

    def writer(k):
        barrier.wait()
        for i in range(200):
            off = ((i * 7919 + k * 104729) % (SIZE - 3000))
            data = bytes([k * 16 + i % 16]) * 3000
            try:
                with lock:     # the model needs the completion order; the writes still race the detach
                    pair.write(off, data, fua=(i % 17 == 0))
                    model[off:off + 3000] = data
            except Exception as exc:   # noqa: BLE001 - the test's point
                failures.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    barrier.wait()
    pair.mirror.inject_fault("write", 0, SIZE, errno.EIO, count=3)
    for t in threads:
        t.join()
    assert failures == []
    assert pair.state == "detached"
    assert pair.read(0, SIZE) == bytes(model)
    pair.establish(incremental=True).wait()
    assert_equal_sides(pair)
    pair.close()


# -- the record survives, and is shown ------------------------------------------------

def cli(*args, check=True):
    # PYMIRROR_CONTROL at a socket that does not exist: act on the pair here, not through a daemon
    env = dict(os.environ, PYMIRROR_CONTROL="/nonexistent/pymirror-test.sock")
    return cli_util.run(*args, check=check, env=env)


def test_the_detach_record_survives_reopen_and_query_shows_it(tmp_path):
    pair = file_pair(tmp_path)
    pair.establish().wait()
    pair.mirror.inject_fault("write", 5 * TRACK, TRACK, errno.ENOSPC)
    pair.write(5 * TRACK, b"F" * 10)
    rec = pair.detached
    pair.close()
    meta = tmp_path / "p.meta"
    pair = pymirror.Pair.open(meta)
    assert pair.state == "detached" and pair.detached == rec
    q = query_dict(pair)
    assert q["state"] == "detached" and q["detached"] == rec and not q["mirror_consistent"]
    pair.close()
    res = cli("query", str(meta))
    assert "DETACHED" in res.stdout and "track 5" in res.stdout and "No space left" in res.stdout
    assert "establish --incremental" in res.stdout
    res = cli("query", "--json", str(meta))
    assert json.loads(res.stdout)["detached"]["errno"] == "ENOSPC"
    line = cli_util.one_line_error(cli("restore", str(meta), check=False))
    assert "detached" in line and "track 5" in line
    res = cli("establish", "--incremental", str(meta))
    pair = pymirror.Pair.open(meta)
    assert pair.state == "established" and pair.detached is None
    assert_equal_sides(pair)
    pair.close()


def test_a_copy_error_survives_reopen(tmp_path):
    pair = file_pair(tmp_path)
    pair.mirror.inject_fault("write", 12 * TRACK, TRACK, errno.EIO)
    with pytest.raises(errors.JobError):
        pair.establish(config=pymirror.CopyConfig(retries=1)).wait()
    pair.close()
    pair = pymirror.Pair.open(tmp_path / "p.meta")
    p = pair.progress
    assert pair.state == "syncing" and p.paused and p.error_track == 12 and "Input/output" in p.error
    assert pymirror.pair.peek(tmp_path / "p.meta")["error_track"] == 12
    pair.resume().wait()
    assert_equal_sides(pair)
    pair.close()


# -- restores: the mirror is the source -----------------------------------------------

def split_and_damage(tmp_path):
    pair = file_pair(tmp_path)
    pair.establish().wait()
    pair.split()
    pair.write(0, pattern(9, 8 * TRACK))        # damage the standard
    return pair


def test_unprotected_restore_mirror_error_pauses_and_the_write_stands(tmp_path):
    pair = split_and_damage(tmp_path)
    mirror_before = pair.mirror.read(0, SIZE)
    job = pair.restore(protect=False, config=pymirror.CopyConfig(rate=2 * TRACK))
    pair.mirror.inject_fault("write", 50 * TRACK, TRACK, errno.EIO)
    pair.write(50 * TRACK + 10, b"G" * 20)       # succeeds: on the standard
    assert pair.state == "restoring"
    p = pair.progress
    assert p.paused and p.error_track == 50 and "Input/output" in p.error
    pair.mirror.clear_faults()
    pair.resume(pymirror.CopyConfig()).wait()
    # mirroring stopped at the error: the restore ends restored, not established
    assert pair.state == "restored"
    assert pair.read(50 * TRACK + 10, 20) == b"G" * 20
    want = bytearray(mirror_before)
    want[50 * TRACK + 10:50 * TRACK + 30] = b"G" * 20
    assert pair.read(0, SIZE) == bytes(want)
    pair.establish(incremental=True).wait()
    assert_equal_sides(pair)
    pair.close()


def test_a_failing_standard_during_a_restore_pauses_and_is_reported(tmp_path):
    pair = split_and_damage(tmp_path)
    pair.restore(config=pymirror.CopyConfig(rate=2 * TRACK))
    pair.standard.inject_fault("write", 60 * TRACK, TRACK, errno.EIO)
    with pytest.raises(OSError) as exc:
        pair.write(60 * TRACK, b"H" * 10)        # the host's own volume fails: it is told
    assert exc.value.errno == errno.EIO
    p = pair.progress
    assert p.paused and p.error_track == 60
    pair.close()
    pair = pymirror.Pair.open(tmp_path / "p.meta")
    assert pair.progress.error_track == 60       # survives the restart
    pair.standard.clear_faults()
    pair.resume().wait()
    assert pair.state == "restored"
    pair.close()


# -- the NBD export keeps serving the standard ------------------------------------------

def test_nbd_export_keeps_serving_when_the_mirror_fails(tmp_path):
    pair = pymirror.Pair.memory(SIZE, TRACK)
    pair.write(0, pattern(3))
    pair.establish().wait()
    with NBDServer(pair, socket_path=str(tmp_path / "nbd.sock")) as server:
        c, size, _ = nbd_util.connect(server.socket_path)
        assert size == SIZE
        pair.mirror.inject_fault("write", 0, SIZE, errno.ENOSPC)
        c.request(P.CMD_WRITE, 3 * TRACK, 4096, b"\x11" * 4096, cookie=1)
        assert c.reply()[:2] == (0, 1)
        c.request(P.CMD_WRITE, 7 * TRACK, 4096, b"\x22" * 4096, flags=P.CMD_FLAG_FUA, cookie=2)
        assert c.reply()[:2] == (0, 2)
        c.request(P.CMD_FLUSH, cookie=3)
        assert c.reply()[:2] == (0, 3)
        c.request(P.CMD_READ, 3 * TRACK, 4096, cookie=4)
        assert c.reply(4096) == (0, 4, b"\x11" * 4096)
        assert pair.state == "detached"
        assert "mirror" not in server.export_names()
        pair.mirror.clear_faults()
        pair.establish(incremental=True).wait()
        assert_equal_sides(pair)
    pair.close()


# -- a real full filesystem -------------------------------------------------------------

@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs the test mounts (root only): the mirror's sparse image
    on it runs out of space once 1 MiB of it is written."""
    if os.geteuid() != 0:
        if nbd_util.in_ci():
            pytest.fail("the full-filesystem test needs root in CI")
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_filesystem_under_the_mirror(tmp_path, small_tmpfs):
    pair = file_pair(tmp_path, small_tmpfs, config=pymirror.CopyConfig(retries=1))
    job = pair.establish()
    with pytest.raises(errors.JobError, match="No space left"):
        job.wait()                                   # the copy fills it and pauses, as before
    assert pair.state == "syncing"
    pending = pair.progress.tracks_pending
    for i in range(8):                               # host writes all over: none fails
        pair.write((i * 8 + 3) * TRACK + 17, bytes([i + 1]) * 3 * TRACK, fua=(i % 3 == 0))
    pair.flush()
    assert pair.state == "detached" and pair.detached["errno"] == "ENOSPC"
    assert pair.mirror_invalid >= pending
    pair.close()
    pair = pymirror.Pair.open(tmp_path / "p.meta")
    assert pair.state == "detached" and pair.detached["errno"] == "ENOSPC"
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_tmpfs)], check=True)
    pair.establish(incremental=True).wait()
    assert_equal_sides(pair)
    pair.close()


def test_daemon_keeps_the_copy_error_across_a_restart_then_logs_the_detach(tmp_path, small_tmpfs):
    """Through the daemon: the establish onto a full filesystem pauses with
    ENOSPC, and after a restart the error is still there; a host write over
    NBD then detaches the mirror (success to the client), which ``status``
    and the log show; once there is room an incremental establish repairs."""
    pair = file_pair(tmp_path, small_tmpfs)
    pair.close()
    meta = tmp_path / "p.meta"
    daemon = cli_util.Daemon(tmp_path, meta)
    pm = lambda *a, **kw: cli_util.run("--control", daemon.control, *a, **kw)   # noqa: E731
    try:
        assert "No space left" in cli_util.one_line_error(pm("establish", meta, check=False), 1)
    finally:
        assert daemon.stop() == 0, daemon.output()
    daemon = cli_util.Daemon(tmp_path, meta)
    try:
        q = json.loads(pm("query", meta, "--json").stdout)
        assert q["state"] == "syncing" and q["job"]["paused"] and "No space left" in q["job"]["error"]
        assert "stays paused on an error" in daemon.output()
        c, _, _ = nbd_util.connect(str(daemon.nbd), "p")
        c.request(P.CMD_WRITE, 60 * TRACK, TRACK, b"\x5a" * TRACK, flags=P.CMD_FLAG_FUA, cookie=1)
        assert c.reply()[:2] == (0, 1)                         # the host is not failed
        c.request(P.CMD_READ, 60 * TRACK, 16, cookie=2)
        assert c.reply(16) == (0, 2, b"\x5a" * 16)
        cli_util.wait_until(lambda: "DETACHED" in daemon.output(), what="the detach to be logged")
        q = json.loads(pm("query", meta, "--json").stdout)
        assert q["state"] == "detached" and q["detached"]["errno"] == "ENOSPC"
        status = pm("status").stdout
        assert "p: detached" in status and "DETACHED" in status and "track 60" in status
        subprocess.run(["mount", "-o", "remount,size=16m", str(small_tmpfs)], check=True)
        pm("establish", "--incremental", meta)
        assert pm("verify", meta).returncode == 0
    finally:
        assert daemon.stop() == 0, daemon.output()


def test_a_mirror_that_fails_its_sync_detaches_at_the_end_of_the_establish(tmp_path, small_tmpfs):
    """The mirror is a loop device over a file on a full filesystem: its
    writes land in the page cache and fail only at writeback, so only a sync
    reports them -- once.  The establish must not end ``established`` on
    copies that never reached the mirror: the sync at its end fails and the
    pair detaches, every track counted as changed; it is recorded, survives a
    reopen, and once there is room an incremental establish repairs it."""
    if subprocess.run(["losetup", "-f"], capture_output=True).returncode != 0:
        pytest.skip("no loop devices here")
    back = small_tmpfs / "back.img"
    with open(back, "wb") as fh:
        fh.truncate(SIZE)
    loop = subprocess.run(["losetup", "-f", "--show", str(back)], check=True, capture_output=True,
                          text=True).stdout.strip()
    try:
        std = tmp_path / "std.img"
        pymirror.Volume.create(std, SIZE).close()
        pair = pymirror.Pair.create(tmp_path / "p.meta", std, loop)
        pair.write(0, pattern(5))
        with pytest.raises(errors.DetachedError):
            pair.establish().wait()
        assert pair.state == "detached" and pair.detached["track"] is None
        assert pair.mirror_invalid == NTRACKS           # nothing on it can be trusted
        pair.write(3 * TRACK, b"k" * 100, fua=True)     # the host goes on
        pair.close()
        pair = pymirror.Pair.open(tmp_path / "p.meta")
        assert pair.state == "detached" and pair.detached["errno"] is not None
        subprocess.run(["mount", "-o", "remount,size=16m", str(small_tmpfs)], check=True)
        pair.establish(incremental=True).wait()
        assert pair.state == "established"
        assert_equal_sides(pair)
        pair.close()
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)
