"""The Pair/Volume/Job API: commands, errors (each with a clear message and
no change), incremental byte counts (invariant 5), failing stores, and
persistence across close/open."""
from __future__ import annotations

import errno
import os

import pytest

import pymirror
from pymirror import CopyConfig, GeometryError, JobError, RangeError, ReadOnlyError, StateError

TRACK = 4096


def filled_pair(size=64 * TRACK, **kw):
    pair = pymirror.Pair.memory(size, TRACK, **kw)
    for t in range(size // TRACK):
        pair.write(t * TRACK, bytes([t % 251]) * TRACK)
    return pair


def test_lifecycle_full_restore_is_exact():
    pair = filled_pair()
    assert pair.state == "new"
    job = pair.establish()
    assert job.wait(timeout=30) and pair.state == "established"
    pair.split()
    assert pair.state == "split"
    pair.write(5 * TRACK + 7, b"damage")
    pair.mirror_write(9 * TRACK, b"mirror change")
    expected_mirror = pair.mirror_read(0, pair.size)
    job = pair.restore(protect=True)
    assert job.wait(timeout=30)
    assert pair.state == "restored"
    assert pair.read(0, pair.size) == expected_mirror          # invariant 2
    assert pair.mirror_read(0, pair.size) == expected_mirror   # invariant 1
    assert pair.verify() == []
    pair.close()


@pytest.mark.parametrize("kind", ["restore", "establish"])
def test_incremental_reads_and_writes_only_changed_tracks(kind):
    pair = filled_pair()
    pair.establish().wait(timeout=30)
    pair.split()
    std_tracks, mir_tracks = {3, 4, 40}, {4, 17}
    for t in std_tracks:
        pair.write(t * TRACK + 100, b"x" * 50)
    for t in mir_tracks:
        pair.mirror_write(t * TRACK, b"y" * TRACK)
    if kind == "restore":
        job = pair.restore(incremental=True, protect=True)
    else:
        job = pair.establish(incremental=True)
    assert job.wait(timeout=30)
    p = job.progress
    changed = std_tracks | mir_tracks
    assert p.tracks_total == len(changed)                      # invariant 5: count the tracks
    assert p.bytes_read == len(changed) * TRACK                # ... and the bytes
    assert p.bytes_written == len(changed) * TRACK
    assert pair.verify() == []
    pair.close()


def test_full_track_write_cancels_copy_and_partial_write_merges():
    pair = filled_pair()
    pair.establish().wait(timeout=30)
    pair.split()
    for t in range(pair.tracks):
        pair.write(t * TRACK, b"\xee" * TRACK)
    job = pair.restore(protect=True, config=CopyConfig(rate=1))   # copies nothing for now
    pair.write(2 * TRACK, b"\x01" * TRACK)                     # whole track
    pair.write(7 * TRACK + 10, b"\x02" * 20)                   # part of a track
    p = job.progress
    assert p.tracks_copied == 0 and p.tracks_pending == pair.tracks - 2
    assert p.tracks_skipped == 1 and p.tracks_merged == 1
    assert p.bytes_read == TRACK and p.bytes_written == TRACK  # the merge read one track, wrote one
    job.set_rate(0)
    assert job.wait(timeout=30)
    assert pair.read(2 * TRACK, TRACK) == b"\x01" * TRACK
    merged = pair.read(7 * TRACK, TRACK)
    assert merged == bytes([7]) * 10 + b"\x02" * 20 + bytes([7]) * (TRACK - 30)
    assert pair.read(3 * TRACK, TRACK) == bytes([3]) * TRACK
    pair.close()


def test_reads_of_pending_tracks_see_the_final_image_both_policies():
    for policy in ("redirect", "hydrate"):
        pair = filled_pair()
        pair.establish().wait(timeout=30)
        pair.split()
        for t in range(pair.tracks):
            pair.write(t * TRACK, b"\xee" * TRACK)
        job = pair.restore(protect=True, config=CopyConfig(read_policy=policy, rate=1))
        assert pair.read(5 * TRACK - 3, 6) == bytes([4]) * 3 + bytes([5]) * 3
        p = job.progress
        if policy == "redirect":
            assert p.reads_redirected == 2 and p.tracks_pending == pair.tracks
        else:
            assert p.reads_hydrated == 2 and p.tracks_copied == 2
        job.set_rate(0)
        job.wait(timeout=30)
        pair.close()


def test_wrong_state_commands_name_the_state_and_change_nothing():
    pair = filled_pair()
    with pytest.raises(StateError, match="new"):
        pair.split()
    with pytest.raises(StateError, match="new"):
        pair.restore()
    with pytest.raises(StateError):
        pair.establish(incremental=True)
    assert pair.state == "new"
    pair.establish().wait(timeout=30)
    with pytest.raises(StateError, match="established"):
        pair.restore()
    with pytest.raises((ReadOnlyError, StateError)):
        pair.mirror_write(0, b"x")
    assert pair.state == "established"
    pair.split()
    pair.restore(protect=True, config=CopyConfig(rate=1))
    with pytest.raises(ReadOnlyError):
        pair.mirror_write(0, b"x")
    with pytest.raises(StateError, match="restoring"):
        pair.split()
    pair.close()


def test_range_errors_change_nothing():
    pair = filled_pair()
    before = pair.read(0, pair.size)
    for off, n in [(-1, 1), (pair.size, 1), (pair.size - 1, 2), (0, pair.size + 1)]:
        with pytest.raises(RangeError):
            pair.write(off, b"z" * n)
        with pytest.raises(RangeError):
            pair.read(off, n)
    with pytest.raises(TypeError):
        pair.write("0", b"x")
    assert pair.read(0, pair.size) == before
    pair.close()


def test_geometry_errors(tmp_path):
    with pytest.raises(GeometryError, match="power of two"):
        pymirror.Volume.memory(1 << 20, track_size=3000)
    with pytest.raises(GeometryError):
        pymirror.Volume.memory(0)
    a = pymirror.Volume.create(tmp_path / "a.img", 1 << 20)
    b = pymirror.Volume.create(tmp_path / "b.img", 2 << 20)
    with pytest.raises(GeometryError):
        pymirror.Pair.create(tmp_path / "p.meta", a, b)
    assert not (tmp_path / "p.meta").exists()
    with pytest.raises(FileExistsError):
        pymirror.Volume.create(tmp_path / "a.img", 1 << 20)
    with pytest.raises(FileNotFoundError):
        pymirror.Volume.open(tmp_path / "missing.img")
    a.close(), b.close()


def test_short_last_track():
    size = 10 * TRACK + 123
    pair = pymirror.Pair.memory(size, TRACK)
    pair.write(size - 200, b"t" * 200)
    pair.establish().wait(timeout=30)
    pair.split()
    pair.write(size - 50, b"u" * 50)
    job = pair.restore(incremental=True)
    assert job.wait(timeout=30)
    assert job.progress.tracks_total == 1
    assert pair.read(size - 200, 200) == b"t" * 200
    pair.close()


def test_failing_source_pauses_the_job_and_resume_completes():
    std = pymirror.Volume.memory(32 * TRACK, TRACK)
    mir = pymirror.Volume.memory(32 * TRACK, TRACK)
    pair = pymirror.Pair.create(None, std, mir)
    pair.establish().wait(timeout=30)
    pair.split()
    for t in range(32):
        pair.mirror_write(t * TRACK, bytes([t]) * TRACK)
    mir.inject_fault("read", 12 * TRACK, TRACK, errno.EIO)
    job = pair.restore(config=CopyConfig(retries=2, copiers=1, batch_size=TRACK))
    with pytest.raises(JobError, match="track 12"):
        job.wait(timeout=30)
    p = job.progress
    assert p.paused and p.error_track == 12 and p.tracks_pending >= 1
    assert pair.state == "restoring"
    mir.clear_faults()
    job.resume()
    assert job.wait(timeout=30)
    assert pair.state == "restored"
    assert pair.verify() == []
    pair.close()
    std.close(), mir.close()


def test_failing_target_write_enospc(tmp_path):
    pair = filled_pair()
    pair.establish().wait(timeout=30)
    pair.split()
    pair.write(0, b"q" * 100)
    pair.standard.inject_fault("write", 0, TRACK, errno.ENOSPC)
    job = pair.restore(incremental=True, config=CopyConfig(retries=1))
    with pytest.raises(JobError):
        job.wait(timeout=30)
    assert job.progress.error_track == 0
    pair.standard.clear_faults()
    job.resume()
    assert job.wait(timeout=30)
    assert pair.read(0, TRACK) == bytes([0]) * TRACK
    pair.close()


def test_close_and_reopen_keeps_state_and_changes(tmp_path):
    for name in ("s.img", "m.img"):
        pymirror.Volume.create(tmp_path / name, 16 * TRACK, TRACK).close()
    meta = tmp_path / "p.meta"
    with pymirror.Pair.create(meta, tmp_path / "s.img", tmp_path / "m.img", track_size=TRACK) as pair:
        pair.establish().wait(timeout=30)
        pair.split()
        pair.write(3 * TRACK, b"changed")
    with pymirror.Pair.open(meta) as pair:
        assert pair.state == "split"
        job = pair.restore(incremental=True)
        assert job.wait(timeout=30)
        assert job.progress.tracks_total == 1
        assert pair.read(3 * TRACK, 7) == bytes(7)
    with pytest.raises(FileExistsError):
        pymirror.Pair.create(meta, tmp_path / "s.img", tmp_path / "m.img")


def test_closed_pair_raises():
    pair = filled_pair()
    pair.close()
    pair.close()  # idempotent
    with pytest.raises(pymirror.ClosedError):
        pair.read(0, 1)


def test_assume_equal_skips_the_copy_for_a_new_pair_only():
    pair = pymirror.Pair.memory(16 * TRACK, TRACK)
    job = pair.establish(assume_equal=True)
    assert pair.state == "established" and job.progress.tracks_total == 0
    pair.write(0, b"mirrored")
    assert pair.verify() == []
    pair.split()
    with pytest.raises(StateError, match="new pair"):
        pair.establish(assume_equal=True)
    pair.close()


def test_reopen_from_another_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pymirror.Volume.create("s.img", 8 * TRACK, TRACK).close()
    pymirror.Volume.create("m.img", 8 * TRACK, TRACK).close()
    pymirror.Pair.create("p.meta", "s.img", "m.img", track_size=TRACK).close()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pymirror.Pair.open("../p.meta") as pair:
        assert pair.standard.path == str(tmp_path / "s.img")


@pytest.mark.parametrize("where", ["source-read-eio", "target-write-enospc"])
def test_failing_store_during_establish_pauses_then_resumes(where):
    std = pymirror.Volume.memory(32 * TRACK, TRACK)
    mir = pymirror.Volume.memory(32 * TRACK, TRACK)
    pair = pymirror.Pair.create(None, std, mir)
    for t in range(32):
        pair.write(t * TRACK, bytes([t + 1]) * TRACK)
    if where == "source-read-eio":
        std.inject_fault("read", 20 * TRACK, TRACK, errno.EIO)
    else:
        mir.inject_fault("write", 20 * TRACK, TRACK, errno.ENOSPC)
    job = pair.establish(config=CopyConfig(retries=2, copiers=1))
    with pytest.raises(JobError, match="track 20"):
        job.wait(timeout=30)
    p = job.progress
    assert p.paused and p.error_track == 20 and pair.state == "syncing"
    assert p.tracks_pending >= 1                       # the failed track is not marked done
    (std if where == "source-read-eio" else mir).clear_faults()
    job.resume()
    assert job.wait(timeout=30) and pair.state == "established"
    assert pair.verify() == []
    pair.close()
    std.close(), mir.close()
