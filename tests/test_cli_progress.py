"""The progress display follows a job in this process and one in a daemon
the same way: from snapshots (dicts) and a wait() that answers done /
paused-error / timeout."""
from __future__ import annotations

import io

import pymirror
from pymirror.progress import describe, follow, follow_snapshots


def fake_job(steps, final="done"):
    """wait() answers "timeout" for each step, then ``final``; snapshot()
    follows along."""
    state = {"i": 0}
    total = 10

    def snapshot():
        i = min(state["i"], len(steps) - 1)
        done = steps[i]
        return {"kind": "restore", "tracks_total": total, "tracks_pending": total - done, "tracks_done": done,
                "fraction": done / total, "rate": 2 << 20, "eta": 1.5, "elapsed": 0.5 * (i + 1),
                "paused": final == "paused-error" and i == len(steps) - 1,
                "error": "Input/output error" if final == "paused-error" and i == len(steps) - 1 else None,
                "error_track": 7}

    def wait(timeout):
        state["i"] += 1
        return final if state["i"] >= len(steps) else "timeout"
    return wait, snapshot


def test_describe_is_the_same_for_progress_and_its_dict():
    pair = pymirror.Pair.memory(1 << 20)
    try:
        job = pair.establish()
        job.wait()
        p = job.progress
        assert describe(p) == describe(p.as_dict())
        assert describe(p).startswith("16/16 tracks (100.0%)")
    finally:
        pair.close()


def test_lines_until_done():
    wait, snapshot = fake_job([2, 5, 10])
    stream = io.StringIO()
    status, last = follow_snapshots(wait, snapshot, "restore", stream, interval=0.0, tty=False)
    assert status == "done" and last["tracks_done"] == 10
    lines = stream.getvalue().splitlines()
    assert lines[-1].startswith("restore: done, 10/10 tracks (100.0%), 2.0 MiB/s") and lines[-1].endswith("in 1.50 s")
    assert any(ln.startswith("restore: 5/10 tracks (50.0%)") for ln in lines)


def test_paused_on_error_is_returned_with_the_error():
    wait, snapshot = fake_job([3, 4], final="paused-error")
    stream = io.StringIO()
    status, last = follow_snapshots(wait, snapshot, "restore", stream, interval=0.0, tty=False)
    assert status == "paused-error" and last["error"] == "Input/output error"
    assert "PAUSED on error at track 7: Input/output error" in describe(last)


def test_bar_on_a_terminal():
    wait, snapshot = fake_job([1, 6, 10])
    stream = io.StringIO()
    status, last = follow_snapshots(wait, snapshot, "establish", stream, tty=True)
    assert status == "done"
    assert "establish" in stream.getvalue() and "10/10" in stream.getvalue()


def test_follow_a_local_job():
    pair = pymirror.Pair.memory(1 << 20)
    try:
        stream = io.StringIO()
        p = follow(pair.establish(), "establish", stream, tty=False)
        assert p.tracks_total == 16 and not p.running
        assert stream.getvalue().startswith("establish: done, 16/16 tracks")
    finally:
        pair.close()
