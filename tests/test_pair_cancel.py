"""Cancel, mirror consistency and persisted job errors (issue 10 items 9 and
10): a cancelled, failed or interrupted establish leaves a mirror that says
it is not a point-in-time image, restore from it is refused, a completed
establish clears it; a paused job's error survives a reopen."""
from __future__ import annotations

import errno

import pytest

import pymirror
from pymirror import CopyConfig, JobError, StateError

TRACK = 4096
NT = 32


@pytest.fixture
def paths(tmp_path):
    std, mir = tmp_path / "s.img", tmp_path / "m.img"
    with pymirror.Volume.create(std, NT * TRACK, TRACK) as v:
        for t in range(NT):
            v.write(t * TRACK, bytes([t + 1]) * TRACK)
    pymirror.Volume.create(mir, NT * TRACK, TRACK).close()
    return tmp_path / "p.meta", std, mir


SLOW = CopyConfig(rate=1)     # pays before it copies: nothing moves


def test_cancel_an_establish_marks_the_mirror_inconsistent(paths):
    meta, std, mir = paths
    with pymirror.Pair.create(meta, std, mir, track_size=TRACK) as pair:
        assert pair.mirror_invalid == 0
        job = pair.establish(config=SLOW)
        assert pair.mirror_invalid == NT and job.progress.mirror_invalid == NT
        pair.write(3 * TRACK, b"during")
        pair.cancel()
        assert pair.state == "split" and pair.job is None
        assert pair.mirror_invalid == NT
        p = pair.progress
        assert p.mirror_invalid == NT and not p.running and p.changed_mirror == NT
        assert pymirror.pair.peek(meta)["mirror_invalid"] == NT      # committed
        with pytest.raises(StateError, match=f"{NT} of its tracks.*establish again"):
            pair.restore()
        with pytest.raises(StateError, match="split"):
            pair.cancel()
        assert pair.state == "split"
        pair.mirror_write(0, b"mirror is writable while split")
    with pymirror.Pair.open(meta) as pair:
        assert pair.state == "split" and pair.mirror_invalid == NT
        with pytest.raises(StateError, match="establish again"):
            pair.restore(incremental=True)
        job = pair.establish(incremental=True, config=CopyConfig())
        assert job.wait(timeout=30)
        assert job.progress.tracks_total == NT        # the cancelled tracks are copied
        assert pair.state == "established" and pair.mirror_invalid == 0
        assert pair.verify() == []
    assert pymirror.pair.peek(meta)["mirror_invalid"] == 0


def test_cancel_a_paused_establish_and_refusals(paths):
    meta, std, mir = paths
    with pymirror.Pair.create(meta, std, mir, track_size=TRACK) as pair:
        with pytest.raises(StateError, match="new"):
            pair.cancel()
        pair.establish().wait(timeout=30)
        with pytest.raises(StateError, match="established"):
            pair.cancel()
        pair.split()
        pair.write(5 * TRACK, b"x")
        job = pair.establish(incremental=True, config=SLOW)
        job.pause()
        assert pair.mirror_invalid == 1
        pair.cancel()
        assert pair.state == "split" and pair.mirror_invalid == 1
        assert pair.establish(incremental=True, config=CopyConfig()).wait(timeout=30)
        pair.split()
        pair.restore(config=SLOW)
        with pytest.raises(StateError) as exc:
            pair.cancel()
        msg = str(exc.value)
        assert "depends on the mirror" in msg and "pause" in msg
        assert pair.state == "restoring"


def test_interrupted_establish_shows_the_invalid_count_after_reopen(paths):
    meta, std, mir = paths
    with pymirror.Pair.create(meta, std, mir, track_size=TRACK) as pair:
        pair.establish(config=SLOW)
    info = pymirror.pair.peek(meta)
    assert info["state"] == "syncing" and info["mirror_invalid"] == NT
    with pymirror.Pair.open(meta) as pair:
        assert pair.state == "syncing" and pair.mirror_invalid == NT
        assert pair.progress.paused
        pair.cancel()
        assert pair.state == "split" and pair.mirror_invalid == NT


def test_a_paused_jobs_error_survives_reopen_and_resume_clears_it(paths):
    meta, std, mir = paths
    with pymirror.Pair.create(meta, std, mir, track_size=TRACK) as pair:
        pair.mirror.inject_fault("write", 7 * TRACK, TRACK, errno.ENOSPC)
        job = pair.establish(config=CopyConfig(retries=1, copiers=1))
        with pytest.raises(JobError, match="track 7"):
            job.wait(timeout=30)
        assert pair.mirror_invalid >= 1
    info = pymirror.pair.peek(meta)
    assert info["error"] == "No space left on device" and info["error_track"] == 7
    with pymirror.Pair.open(meta) as pair:
        p = pair.progress
        assert p.paused and p.error == "No space left on device" and p.error_track == 7
        assert pair.state == "syncing" and pair.mirror_invalid >= 1
        with pytest.raises(JobError, match="track 7"):
            pair.job.wait(timeout=5)
        pair.resume()
        assert pair.progress.error is None
        job = pair.job                     # read once: the job may end (and leave) between two reads
        assert job is None or job.wait(timeout=30)
        assert pair.state == "established" and pair.mirror_invalid == 0
    info = pymirror.pair.peek(meta)
    assert info["error"] is None and info["error_track"] is None and info["mirror_invalid"] == 0
    with pymirror.Pair.open(meta) as pair:
        assert pair.progress.error is None and pair.verify() == []
