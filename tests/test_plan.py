"""Plans (issue 13 item 6): ``Pair.plan_restore``/``plan_establish``,
``--dry-run`` and the daemon's ``plan`` verb change nothing (the metadata
bytes are identical before and after) and count what the job then copies."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pymirror
from pymirror import errors

_here = Path(__file__).parent
for _name in ("cli_util", "test_daemon_util"):
    _spec = importlib.util.spec_from_file_location(_name, _here / f"{_name}.py")
    _mod = importlib.util.module_from_spec(_spec)
    sys.modules.setdefault(_name, _mod)
    _spec.loader.exec_module(_mod)
CLI = sys.modules["cli_util"]
U = sys.modules["test_daemon_util"]

TRACK = 64 << 10
TRACKS = 48
SIZE = TRACK * TRACKS


def digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def new_pair(d: Path, data_tracks=(2, 3, 17, 30), partial=((40, 100, 5000),)):
    """A split file pair: data on some tracks of both sides, the rest holes;
    ``partial`` (track, offset, length) puts data on part of a track."""
    for side in ("std", "mir"):
        pymirror.Volume.create(d / f"{side}.img", SIZE).close()
    pair = pymirror.Pair.create(d / "pair.meta", d / "std.img", d / "mir.img")
    for t in data_tracks:
        pair.write(t * TRACK, bytes([t + 1]) * TRACK)
    for t, off, n in partial:
        pair.write(t * TRACK + off, b"p" * n)
    assert pair.establish().wait(timeout=60)
    pair.split()
    return pair


def check_plan_matches_job(pair, plan, job):
    assert job.wait(timeout=60)
    p = job.progress
    assert p.tracks_total == plan.tracks
    assert p.bytes_written == plan.data_bytes              # file stores: holes as SEEK_HOLE reports them
    assert p.bytes_zeroed == plan.zero_bytes
    assert p.bytes_read == plan.data_bytes
    assert plan.bytes == plan.data_bytes + plan.zero_bytes


@pytest.mark.parametrize("kind", ["restore", "establish"])
@pytest.mark.parametrize("incremental", [False, True])
def test_plan_changes_nothing_and_counts_what_the_job_copies(tmp_path, kind, incremental):
    pair = new_pair(tmp_path)
    pair.write(5 * TRACK + 7, b"s" * 3)                     # changed on the standard
    pair.mirror_write(17 * TRACK, b"m" * TRACK)             # ... and on the mirror
    pair.mirror_write(44 * TRACK, bytes(TRACK))             # explicit zeroes: data extents
    pair.commit()
    files = [tmp_path / n for n in ("pair.meta", "std.img", "mir.img")]
    before = [digest(f) for f in files]
    plan = pair.plan_restore(incremental) if kind == "restore" else pair.plan_establish(incremental)
    assert [digest(f) for f in files] == before             # nothing changed, not a metadata byte
    assert plan.kind == kind and plan.incremental == incremental
    if incremental:
        assert plan.ranges == [(5, 5), (17, 17), (44, 44)] and plan.tracks == 3
        assert (plan.changed_standard, plan.changed_mirror) == (1, 2)
    else:
        assert plan.ranges == [(0, TRACKS - 1)] and plan.tracks == TRACKS
    job = pair.restore(incremental) if kind == "restore" else pair.establish(incremental)
    check_plan_matches_job(pair, plan, job)
    pair.close()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(std=st.sets(st.integers(0, TRACKS - 1), max_size=8), mir=st.sets(st.integers(0, TRACKS - 1), max_size=8),
       zero=st.booleans(), kind=st.sampled_from(["restore", "establish"]))
def test_plan_counts_random_changes(tmp_path_factory, std, mir, zero, kind):
    d = tmp_path_factory.mktemp("plan")
    pair = new_pair(d)
    for t in std:
        pair.write(t * TRACK + 1000, b"\0" * 10 if zero else b"S" * 10)
    for t in mir:
        pair.mirror_write(t * TRACK, b"\0" * TRACK if zero else b"M" * TRACK)
    plan = pair.plan_restore(True) if kind == "restore" else pair.plan_establish(True)
    want = sorted(std | mir)
    assert [t for a, b in plan.ranges for t in range(a, b + 1)] == want
    job = pair.restore(True) if kind == "restore" else pair.establish(True)
    check_plan_matches_job(pair, plan, job)
    pair.close()


def test_plan_refuses_what_the_command_refuses(tmp_path):
    for side in ("std", "mir"):
        pymirror.Volume.create(tmp_path / f"{side}.img", SIZE).close()
    pair = pymirror.Pair.create(tmp_path / "pair.meta", tmp_path / "std.img", tmp_path / "mir.img")
    before = digest(tmp_path / "pair.meta")
    with pytest.raises(errors.StateError, match="restore is allowed when split or restored"):
        pair.plan_restore()
    with pytest.raises(errors.StateError, match="incremental establish"):
        pair.plan_establish(incremental=True)
    assert pair.plan_establish().tracks == TRACKS
    assert digest(tmp_path / "pair.meta") == before and pair.state == "new"
    with pytest.raises(ValueError, match="kind"):
        from pymirror.plan import plan
        plan(pair, "verify")
    pair.close()


def test_estimate_from_the_last_measured_rate(tmp_path):
    pair = new_pair(tmp_path)
    rate_file = Path(str(tmp_path / "pair.meta") + ".rate.json")
    rate = json.loads(rate_file.read_text())                # the establish measured one
    assert rate["kind"] == "establish" and rate["bytes_written"] > 0
    plan = pair.plan_restore()
    assert plan.rate == pytest.approx(rate["bytes_per_second"])
    assert plan.estimated_seconds == pytest.approx(plan.data_bytes / plan.rate)
    assert "estimated time:" in plan.describe() and "no measured rate" not in plan.describe()
    rate_file.unlink()
    assert "no measured rate yet" in pair.plan_restore().describe()
    assert pair.plan_restore().estimated_seconds is None
    rate_file.write_text("not json")
    assert pair.plan_restore().rate is None                 # a damaged file is no rate, not an error
    pair.close()


def test_dry_run_on_the_command_line(tmp_path):
    pair = new_pair(tmp_path)
    pair.write(9 * TRACK, b"x" * 10)
    pair.close()
    meta = tmp_path / "pair.meta"
    before = CLI.tree_digest(tmp_path)
    out = CLI.run("restore", meta, "--dry-run", "--incremental").stdout
    assert "dry run of an incremental restore, protected" in out and "tracks to copy: 1 of 48" in out
    j = json.loads(CLI.run("restore", meta, "--dry-run", "--json").stdout)
    assert j["tracks"] == TRACKS and j["ranges"] == [[0, TRACKS - 1]] and j["kind"] == "restore"
    j = json.loads(CLI.run("establish", meta, "--dry-run", "--json", "--incremental").stdout)
    assert j["ranges"] == [[9, 9]] and j["source"] == "standard"
    assert CLI.tree_digest(tmp_path) == before               # nothing changed
    CLI.one_line_error(CLI.run("restore", meta, "--json", check=False), 2)
    CLI.one_line_error(CLI.run("establish", meta, "--dry-run", "--assume-equal", check=False), 2)
    assert CLI.tree_digest(tmp_path) == before
    CLI.run("establish", meta, "--incremental")
    before = CLI.tree_digest(tmp_path)
    err = CLI.one_line_error(CLI.run("restore", meta, "--dry-run", check=False))   # established: refused
    assert "restore is allowed when split or restored" in err
    assert CLI.tree_digest(tmp_path) == before


def test_plan_through_the_daemon(tmp_path):
    meta = U.make_pair(tmp_path, "db", fill=b"A")
    d = U.DaemonProc(tmp_path, nbd=False)
    d.start(meta)
    try:
        with d.client() as c:
            p = c.pair("db")
            p.establish(wait=True)
            p.split()
            before = digest(meta)
            plan = p.plan("restore", incremental=False)
            assert plan["tracks"] == 32 and plan["kind"] == "restore" and plan["ranges"] == [[0, 31]]
            assert plan["data_bytes"] == 2 << 20 and plan["rate"] > 0     # the establish measured a rate
            assert p.plan("establish", incremental=True)["tracks"] == 0
            assert digest(meta) == before
            with pytest.raises(Exception, match="kind"):
                p.plan("verify")
            out = CLI.run("--control", d.control, "restore", "db", "--dry-run").stdout
            assert "tracks to copy: 32 of 32" in out
            assert digest(meta) == before
            q = p.restore(wait=True)
            assert q["last_job"]["tracks_total"] == plan["tracks"]
    finally:
        d.stop()
