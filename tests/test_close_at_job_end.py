"""Pair.close_at_job_end (pm_pair_close_at_job_end): a one-shot command's
job ends with the clean close's commit, and the close then writes nothing;
what happens in between is still committed, and a crash in between forgets
no CHANGED track (docs/format.md, "After a clean close")."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pymirror import CopyConfig, Pair, Volume
from pymirror.pair import peek, track_counts

TRACK = 64 << 10
SIZE = 128 * TRACK          # 8 MiB: two 4 MiB write-intent regions


def split_pair(tmp_path: Path) -> Path:
    std, mir, meta = tmp_path / "std.img", tmp_path / "mir.img", tmp_path / "p.meta"
    for v in (std, mir):
        Volume.create(v, SIZE).close()
    with Pair.create(meta, std, mir, track_size=TRACK) as p:
        p.write(0, os.urandom(SIZE))
        p.establish().wait()
        p.split()
        p.write(3 * TRACK, b"x" * TRACK)
    return meta


@pytest.mark.parametrize("kind", ["restore", "establish"])
@pytest.mark.parametrize("at_end", [True, False])
def test_the_close_after_the_job_writes_nothing_more(tmp_path: Path, kind: str, at_end: bool) -> None:
    meta = split_pair(tmp_path)
    with Pair.open(meta) as p:
        if at_end:
            p.close_at_job_end()
        assert getattr(p, kind)().wait(timeout=60)
        commits = p.progress.commits
        ended = peek(meta)["generation"]
    after = peek(meta)["generation"]
    # the control (at_end=False) shows the close's own commit, which the flag saves
    assert after == (ended if at_end else ended + 1)
    assert commits >= 1
    # ... and the header is the clean close's: stamps recorded, so a change
    # made outside pymirror after the close is seen at the next open
    with Pair.open(meta) as p:
        assert p.changed_outside == []
        assert p.volume_trust("standard")["outside"] == "unchanged"
    with open(tmp_path / "std.img", "r+b") as f:
        f.seek(5 * TRACK)
        f.write(b"outside")
    with Pair.open(meta) as p:
        assert p.changed_outside == ["standard"]


def test_a_write_after_the_jobs_end_is_committed_by_the_close(tmp_path: Path) -> None:
    meta = split_pair(tmp_path)
    with Pair.open(meta) as p:
        p.close_at_job_end()
        assert p.restore().wait(timeout=60)
        ended = peek(meta)["generation"]
        p.write(7 * TRACK, b"after the end" * 100)
        p.flush()
    assert peek(meta)["generation"] > ended + 1     # the write's commit, then the close's clean one
    with Pair.open(meta) as p:
        assert p.read(7 * TRACK, 13) == b"after the end"
        assert p.changed_outside == []


CRASH_AFTER_THE_END = """
import os, sys
from pymirror import CopyConfig, Pair
meta, track = sys.argv[1], int(sys.argv[2])
p = Pair.open(meta)
p.close_at_job_end()
job = p.restore(config=CopyConfig(rate=16 << 20))      # 0.5 s: the first write lands during the job
p.write(1 * track, b"during the job")                  # region 0 made durable for write-intent
assert p.progress.tracks_pending > 0, "the job ended before the first write"
assert job.wait(timeout=60)                            # the job's final commit: clean
p.write(2 * track, b"after the end")                   # region 0 again, a track not CHANGED yet
os._exit(0)                                            # killed before the close
"""


def test_a_crash_after_the_jobs_clean_commit_forgets_no_changed_track(tmp_path: Path) -> None:
    meta = split_pair(tmp_path)
    proc = subprocess.run([sys.executable, "-c", CRASH_AFTER_THE_END, str(meta), str(TRACK)],
                          capture_output=True, text=True, cwd="/", timeout=120)
    assert proc.returncode == 0, proc.stderr
    with Pair.open(meta) as p:
        assert p.state == "restored"
        # Not closed cleanly: every track of the written region counts as
        # CHANGED, the track written after the job's end among them.  (Had the
        # clean commit left region 0 durable, the second write would have
        # committed nothing, and the clean header would list track 1 alone.)
        changed = track_counts(p)["standard"]["changed"]
        assert changed >= 2, changed
        assert p.read(2 * TRACK, 13) == b"after the end"
        job = p.establish(incremental=True)
        assert job.wait(timeout=60)
        assert p.progress.tracks_total >= 2
        assert p.verify() == []
