"""Every verb of the control protocol against a real daemon in a subprocess,
through the Python client; the state directory across restarts; the
control socket's permissions and its stale/live handling."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import stat
import sys
import threading
from pathlib import Path

import pytest

import pymirror
from pymirror import errors
from pymirror.service.protocol import DaemonError, DaemonUnreachable, InvalidArgument, NoSuchPair

_spec = importlib.util.spec_from_file_location("test_daemon_util", Path(__file__).with_name("test_daemon_util.py"))
U = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("test_daemon_util", U)
_spec.loader.exec_module(U)
MiB = U.MiB


@pytest.fixture
def daemon(tmp_path):
    d = U.DaemonProc(tmp_path, nbd=False)
    yield d
    if d.proc is not None and d.proc.poll() is None:
        d.stop()


def test_pair_lifecycle_through_the_daemon(tmp_path, daemon):
    meta = U.make_pair(tmp_path, "db", fill=b"A")
    daemon.start(meta)
    with daemon.client() as c:
        assert c.greeting["version"]["major"] == 1 and "events" in c.greeting["capabilities"]
        assert c.find("db") == "db" and c.find(meta) == "db" and c.find(str(tmp_path / "x.meta")) is None
        p = c.pair("db")
        assert p.query()["state"] == "new"
        q = p.establish(wait=True)
        assert q["state"] == "established" and q["job"] is None and q["last_job"]["tracks_total"] == 32
        assert p.verify()["equal"] is True
        assert p.split()["state"] == "split"
        with pytest.raises(errors.StateError):
            p.split()
        v = p.verify()
        assert v["equal"] is True and v["differing"] == [] and v["tracks"] == 32
        assert p.restore(incremental=True, wait=True)["state"] == "restored"
        assert p.wait(timeout=1) == "done"
        kinds = [e["event"] for e in c.history("db")]
        assert "state-changed" in kinds and "job-done" in kinds
        st = c.status()
        (entry,) = st["pairs"]
        assert entry["name"] == "db" and entry["state"] == "restored" and entry["error"] is None
        assert st["daemon"]["pid"] == daemon.proc.pid
    # the local and the daemon's query agree (one source: pymirror.report)
    assert daemon.stop() == 0
    from pymirror.report import query_dict
    with pymirror.Pair.open(meta) as pair:
        local = query_dict(pair)
    assert local["state"] == "restored" and local["meta"] == str(meta)


def test_verify_finds_differences_online_with_progress_events(tmp_path, daemon):
    meta = U.make_pair(tmp_path, "v", size=4 * MiB, fill=b"B")
    daemon.start(meta)
    with daemon.client() as c:
        p = c.pair("v")
        p.establish(wait=True)
        p.split()
    daemon.stop()
    with pymirror.Pair.open(meta) as pair:
        pair.write(100, b"x")
        pair.mirror_write(3 * MiB, b"y")
    daemon.start()
    with daemon.client() as c, daemon.client() as watcher:
        stream = watcher.events("v", timeout=10)
        v = c.pair("v").verify()
        assert v["equal"] is False and v["differing"] == [0, 48]
        seen = []
        for ev in stream:
            seen.append(ev)
            if ev["event"] == "job-done" and ev["data"].get("kind") == "verify":
                break
        assert ev["data"]["differing"] == 2 and ev["data"]["pair"] == "v"
        started = c.pair("v").verify(wait=False)
        assert started == {"started": ["v"]}
        assert c.pair("v").wait(timeout=30) == "done"
        assert c.status("v")["pairs"][0]["last_verify"]["differing"] == [0, 48]


def test_pause_resume_set_rate_and_wait_timeout(tmp_path, daemon):
    meta = U.make_pair(tmp_path, "slow", size=16 * MiB, fill=b"C")
    daemon.start(meta)
    with daemon.client() as c:
        p = c.pair("slow")
        q = p.establish(rate=2 * MiB)
        assert q["state"] == "syncing" and q["job"]["kind"] == "establish"
        assert q["job"]["rate_limit"] == 2 * MiB
        assert p.wait(timeout=0.3) == "timeout"
        q = p.pause()
        assert q["job"]["paused"] is True
        assert p.wait(timeout=0.3) == "timeout"       # paused by request: keeps waiting
        assert p.set_rate(0)["job"]["rate_limit"] == 0
        with pytest.raises(InvalidArgument):
            p.set_rate(-1)
        p.resume()
        assert p.wait(timeout=60) == "done"
        assert p.query()["state"] == "established"
        with pytest.raises(errors.StateError):
            p.resume()
        with pytest.raises(errors.StateError):
            p.pause()
        events = [e["event"] for e in c.history("slow")]
        assert "job-paused" in events and "job-resumed" in events and events[-1] in ("job-done", "state-changed")


def test_paused_by_request_stays_paused_across_restart_interrupted_job_resumes(tmp_path, daemon):
    m1 = U.make_pair(tmp_path, "held", size=16 * MiB, fill=b"D")
    m2 = U.make_pair(tmp_path, "cut", size=16 * MiB, fill=b"E")
    daemon.start(m1, m2)
    with daemon.client() as c:
        c.pair("held").establish(rate=1 * MiB)
        c.pair("cut").establish(rate=1 * MiB)
        c.pair("held").pause()
    assert daemon.stop() == 0
    assert "committed and closed" in daemon.log_text()
    state = json.loads(Path(daemon.state_dir, "daemon.json").read_text())
    assert {p["name"]: p["paused_by_request"] for p in state["pairs"]} == {"held": True, "cut": False}
    daemon.start(m1)        # the state directory brings both back; a META already held is no error
    with daemon.client() as c:
        h, k = c.pair("held").query(), c.pair("cut").query()
        assert h["state"] == "syncing" and h["job"]["paused"] is True
        assert k["state"] == "syncing" and k["job"]["paused"] is False     # resumed at once ...
        assert k["job"]["rate_limit"] == 1 * MiB                             # ... at its remembered rate
        c.pair("cut").set_rate(0)
        assert c.pair("cut").wait(timeout=60) == "done"
        assert c.pair("held").wait(timeout=0.2) == "timeout"
        c.pair("held").resume(rate=0)
        assert c.pair("held").wait(timeout=60) == "done"
    assert "resuming the interrupted establish" in daemon.log_text()
    assert "already held as held" in daemon.log_text() and "not attached" not in daemon.log_text()


def test_cancel_refused_during_restore_and_ends_an_establish(tmp_path, daemon):
    meta = U.make_pair(tmp_path, "c", size=16 * MiB, fill=b"F")
    daemon.start(meta)
    with daemon.client() as c:
        p = c.pair("c")
        p.establish(wait=True)
        p.split()
        p.restore(rate=1 * MiB)
        with pytest.raises(errors.StateError) as ei:
            p.cancel()
        assert "pause" in str(ei.value)
        p.set_rate(0)
        assert p.wait(timeout=60) == "done"
        p.split()
        p.establish(incremental=False, rate=1 * MiB)
        q = p.cancel()
        assert q["state"] == "split" and q["job"] is None
        assert q["mirror_invalid"] > 0 and q["mirror_consistent"] is False
        with pytest.raises(errors.StateError):
            p.restore()
        with pytest.raises(errors.StateError):
            p.cancel()


def test_groups_share_the_namespace_and_act_on_every_pair(tmp_path, daemon):
    metas = [U.make_pair(tmp_path, f"g{i}", size=1 * MiB, fill=bytes([i + 1])) for i in range(4)]
    daemon.start(*metas)
    with daemon.client() as c:
        with pytest.raises(NoSuchPair):
            c.group_create("G", ["g0", "nope"])
        with pytest.raises(InvalidArgument):
            c.group_create("g1", ["g0"])            # a pair's name
        with pytest.raises(InvalidArgument):
            c.group_create("G", ["g0", "g0"])
        assert c.group_create("G", ["g0", "g1", "g2"]) == {"name": "G", "pairs": ["g0", "g1", "g2"]}
        with pytest.raises(InvalidArgument):
            c.attach(metas[3], name="G")
        g = c.pair("G")
        r = g.establish(wait=True)
        assert {n: q["state"] for n, q in r["pairs"].items()} == {f"g{i}": "established" for i in range(3)}
        r = g.split()
        assert "held_seconds" in r and r["held_seconds"] >= 0
        assert all(q["state"] == "split" for q in g.query()["pairs"].values())
        assert c.pair("g3").query()["state"] == "new"          # not in the group: untouched
        c.pair("g0").establish(wait=True)                        # one pair out of step ...
        with pytest.raises(errors.StateError):
            g.split()                                            # ... so the group split changes nothing
        assert c.pair("g1").query()["state"] == "split"
        c.pair("g0").split()
        assert g.restore(incremental=True, wait=True)["pairs"]["g2"]["state"] == "restored"
        with pytest.raises(errors.StateError):
            c.detach("g1")                                       # in a group
        assert c.status()["groups"] == {"G": ["g0", "g1", "g2"]}
    daemon.stop()
    daemon.start()
    with daemon.client() as c:
        assert c.status()["groups"] == {"G": ["g0", "g1", "g2"]}
        c.group_delete("G")
        with pytest.raises(NoSuchPair):
            c.group_delete("G")
        c.detach("g1")
        assert c.find("g1") is None


def test_attach_detach_and_a_pair_that_fails_to_open(tmp_path, daemon):
    good = U.make_pair(tmp_path, "good", fill=b"G")
    bad = U.make_pair(tmp_path, "bad")
    daemon.start(good, bad)
    with daemon.client() as c:
        assert c.detach("bad")["name"] == "bad"
        assert c.find("bad") is None
        with pytest.raises(NoSuchPair):
            c.pair("bad").query()
        assert c.attach(bad, name="other")["name"] == "other"
        with pytest.raises(errors.StateError):
            c.attach(bad)                                        # already held as "other"
        with pytest.raises(FileNotFoundError):
            c.attach(tmp_path / "missing.meta")
        c.detach("other")
    daemon.stop()
    # take the bad pair's standard volume away: it can no longer be opened
    os.rename(tmp_path / "bad.std", tmp_path / "bad.std.away")
    daemon.start()
    with daemon.client() as c:
        assert c.pair("good").query()["state"] == "new"
        # "bad" was detached before the restart, so only a fresh attach tries it
        with pytest.raises(FileNotFoundError) as ei:      # the open's own error, through the daemon
            c.attach(bad)
        assert "bad.std" in str(ei.value)
        assert c.find("bad") is None
    daemon.stop()
    # a remembered pair that no longer opens: listed with its error, the others served
    state = json.loads(Path(daemon.state_dir, "daemon.json").read_text())
    state["pairs"].append({"name": "bad", "meta": str(bad), "paused_by_request": False, "exported": True})
    Path(daemon.state_dir, "daemon.json").write_text(json.dumps(state))
    daemon.start()
    with daemon.client() as c:
        st = {p["name"]: p for p in c.status()["pairs"]}
        assert st["bad"]["state"] is None and "bad.std" in st["bad"]["error"]
        assert st["good"]["state"] == "new" and st["good"]["error"] is None
        with pytest.raises(errors.StateError) as ei:
            c.pair("bad").split()
        assert "not open" in str(ei.value)
        c.pair("good").establish(wait=True)
    assert "cannot open" in daemon.log_text()


def test_control_socket_private_and_stale_or_live(tmp_path, daemon):
    daemon.start()
    st = os.stat(daemon.control)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(daemon.control)).st_mode) == 0o700
    # a second daemon on the same control socket is refused with a clear error
    other = U.DaemonProc(tmp_path, nbd=False)
    other.state_dir = str(tmp_path / "state2")
    other.log = tmp_path / "other.log"
    other.start(wait=False)
    assert other.proc.wait(30) == 2
    assert "another pymirror daemon is listening" in other.log_text()
    assert "Traceback" not in other.log_text()
    # and a second daemon on the same state directory
    third = U.DaemonProc(tmp_path, nbd=False)
    third.control = str(tmp_path / "run" / "c3.sock")
    third.log = tmp_path / "third.log"
    third.start(wait=False)
    assert third.proc.wait(30) == 2
    assert "in use by another daemon" in third.log_text()
    # SIGKILL leaves a stale socket: the next daemon replaces it
    daemon.kill()
    assert os.path.exists(daemon.control)
    with pytest.raises(DaemonUnreachable):
        daemon.client()
    daemon.start()
    with daemon.client() as c:
        assert c.status()["pairs"] == []
    assert "stale control socket" in daemon.log_text()


def test_unreachable_daemon_and_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("PYMIRROR_CONTROL", str(tmp_path / "none.sock"))
    with pytest.raises(DaemonUnreachable) as ei:
        pymirror.connect()
    assert "none.sock" in str(ei.value) and isinstance(ei.value, errors.MirrorError)
    d = U.DaemonProc(tmp_path, nbd=False)
    d.start()
    try:
        monkeypatch.setenv("PYMIRROR_CONTROL", d.control)
        with pymirror.connect() as c:
            assert c.status()["daemon"]["control"] == d.control
    finally:
        assert d.stop(signal.SIGINT) == 0


def test_sigterm_while_clients_wait_commits_and_exits_zero(tmp_path, daemon):
    meta = U.make_pair(tmp_path, "w", size=16 * MiB, fill=b"H")
    daemon.start(meta)
    c = daemon.client()
    c.pair("w").establish(rate=1 * MiB)
    outcome = []

    def waiter():
        try:
            outcome.append(c.pair("w").wait())
        except errors.MirrorError as exc:
            outcome.append(type(exc).__name__)

    t = threading.Thread(target=waiter)
    t.start()
    assert daemon.stop() == 0
    t.join(30)
    assert outcome and outcome[0] in ("DaemonError", "DaemonUnreachable")
    c.close()
    with pymirror.Pair.open(meta) as pair:      # committed, the job resumable
        assert pair.state == "syncing" and pair.progress.paused


def test_a_job_paused_on_an_error_says_why_and_stays_paused_across_restart(tmp_path, daemon):
    meta = U.make_pair(tmp_path, "e", size=16 * MiB, fill=b"I")
    daemon.start(meta, file_size_limit=4 * MiB)       # the mirror cannot grow past 4 MiB: EFBIG
    with daemon.client() as c:
        p = c.pair("e")
        p.establish()
        assert p.wait(timeout=60) == "paused-error"
        job = p.query()["job"]
        assert job["paused"] is True and job["error"] and job["error_track"] is not None
        with pytest.raises(errors.JobError) as ei:
            p.resume(wait=True)                      # retried, fails again
        assert "stopped on track" in str(ei.value) and job["error"] in str(ei.value)
        job = p.query()["job"]
        (entry,) = c.status()["pairs"]
        paused = [e for e in entry["events"] if e["event"] == "job-paused"]
        assert paused and paused[-1]["data"]["error"] == job["error"]
        assert paused[-1]["data"]["error_track"] == job["error_track"]
    assert daemon.stop() == 0
    daemon.start()                                    # no limit now; the error was persisted with the pair
    with daemon.client() as c:
        p = c.pair("e")
        job = p.query()["job"]
        assert job["paused"] is True and job["error"]               # not resumed by itself
        assert p.wait(timeout=0.2) == "paused-error"
        assert "stays paused on an error" in daemon.log_text()
        p.resume()
        assert p.wait(timeout=60) == "done"
        assert p.query()["state"] == "established" and p.verify()["equal"]


def test_a_pair_in_use_elsewhere_is_refused_with_busy_error(tmp_path, daemon):
    meta = U.make_pair(tmp_path, "busy", fill=b"J")
    daemon.start()
    with pymirror.Pair.open(meta):                      # this process holds its volumes
        with daemon.client() as c:
            with pytest.raises(errors.BusyError) as ei:
                c.attach(meta)
            assert "busy.std" in str(ei.value) or "busy" in str(ei.value)
            assert c.find("busy") is None
    with daemon.client() as c:
        assert c.attach(meta)["name"] == "busy"
    with pytest.raises(errors.BusyError):                # and the daemon's pair is refused here
        pymirror.Pair.open(meta)


def test_detach_and_attach_racing_queries_and_status(tmp_path, daemon):
    metas = [U.make_pair(tmp_path, f"r{i}", fill=bytes([i + 10])) for i in range(3)]
    daemon.start(*metas)
    stop = threading.Event()
    failures = []

    def reader():
        with daemon.client() as c:
            while not stop.is_set():
                try:
                    c.status()
                    c.pair("r0").query()
                except (NoSuchPair, errors.StateError, errors.ClosedError):
                    pass                                  # detached just now: a clean answer
                except Exception as exc:  # noqa: BLE001
                    failures.append(exc)
                    return

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    with daemon.client() as c:
        for _ in range(15):
            c.detach("r0")
            c.attach(metas[0])
            c.pair("r0").verify(wait=False)
            c.detach("r0")                                # cancels the verify
            c.attach(metas[0])
    stop.set()
    for t in threads:
        t.join(30)
    assert not failures, failures
    assert daemon.proc.poll() is None
    with daemon.client() as c:
        assert c.pair("r0").query()["state"] == "new"


def test_job_progress_events_come_at_most_four_a_second(tmp_path, daemon):
    meta = U.make_pair(tmp_path, "prog", size=16 * MiB, fill=b"K")
    daemon.start(meta)
    with daemon.client() as c, daemon.client() as w:
        stream = w.events("prog", timeout=10)
        c.pair("prog").establish(rate=4 * MiB)        # about 4 s
        progress, done = [], None
        for ev in stream:
            if ev["event"] == "job-progress":
                progress.append(ev)
            if ev["event"] == "job-done":
                done = ev
                break
        assert done is not None and done["data"]["kind"] == "establish"
        assert len(progress) >= 4
        times = [e["timestamp"] for e in progress]
        span = times[-1] - times[0]
        assert (len(times) - 1) / span <= 4.5, (len(times), span)
        pending = [e["data"]["tracks_pending"] for e in progress]
        assert pending == sorted(pending, reverse=True) and pending[-1] < 256
        assert all(e["data"]["tracks_total"] == 256 and e["data"]["pair"] == "prog" for e in progress)


def test_control_socket_never_seen_with_wider_permissions(tmp_path):
    d = U.DaemonProc(tmp_path, nbd=False)
    seen: set[int] = set()
    stop = threading.Event()

    def watch():
        # the path others can reach (the socket is bound in a private 0700
        # directory beside it, given its mode there, and renamed into place)
        while not stop.is_set():
            try:
                st = os.lstat(d.control)
            except OSError:
                continue
            if stat.S_ISSOCK(st.st_mode):
                seen.add(stat.S_IMODE(st.st_mode))

    t = threading.Thread(target=watch)
    t.start()
    try:
        for _ in range(3):                          # under umask 0: a plain bind would make it 0777
            d.start(umask=0)
            assert d.stop() == 0
    finally:
        stop.set()
        t.join()
    assert seen == {0o600}, sorted(oct(m) for m in seen)


def test_subscribe_filters_and_unsubscribe_stops_events(tmp_path, daemon):
    a = U.make_pair(tmp_path, "sa", fill=b"L")
    b = U.make_pair(tmp_path, "sb", fill=b"M")
    daemon.start(a, b)
    s, f = U.raw_control(daemon.control)
    assert U.rpc(s, f, b'{"execute": "subscribe", "arguments": {"pair": "sb"}, "id": 1}')["return"] == {"pairs": ["sb"]}
    with daemon.client() as c:
        c.pair("sa").establish(wait=True)
        c.pair("sb").establish(wait=True)
        s.sendall(b'{"execute": "unsubscribe", "id": 2}\n')
        got = []
        while True:
            msg = json.loads(f.readline())
            if msg.get("id") == 2:
                break
            got.append(msg)
        assert got and all(m["data"]["pair"] == "sb" for m in got)     # only the pair asked for
        assert any(m["event"] == "job-done" for m in got)
        c.pair("sb").split()
        s.sendall(b'{"execute": "status", "id": 3}\n')
        assert json.loads(f.readline())["id"] == 3                       # no event came before the reply
    s.close()
    f.close()


def test_unusable_paths_are_one_line_errors(tmp_path):
    d = U.DaemonProc(tmp_path, nbd=False)
    os.makedirs(os.path.dirname(d.control))
    Path(d.control).write_text("not a socket")
    d.start(wait=False)
    assert d.proc.wait(30) == 2
    assert "is not a socket" in d.log_text() and "Traceback" not in d.log_text()
    assert Path(d.control).read_text() == "not a socket"          # left alone
    e = U.DaemonProc(tmp_path / "e", nbd=False) if (tmp_path / "e").mkdir() is None else None
    Path(e.state_dir).parent.mkdir(exist_ok=True)
    Path(e.state_dir).mkdir()
    Path(e.state_dir, "daemon.json").write_text("{broken")
    e.start(wait=False)
    assert e.proc.wait(30) == 2
    assert "unreadable daemon state" in e.log_text() and "Traceback" not in e.log_text()
    assert not os.path.exists(e.control)                         # nothing left listening


def test_a_running_verify_keeps_job_verbs_off_and_cancel_stops_it(tmp_path, daemon):
    meta = U.make_pair(tmp_path, "vv", size=4 << 30)          # sparse: a verify takes seconds
    daemon.start(meta)
    with daemon.client() as c, daemon.client() as w:
        p = c.pair("vv")
        p.establish(assume_equal=True)                       # two blank volumes: no copy
        p.split()
        stream = w.events("vv", timeout=30)
        assert p.verify(wait=False) == {"started": ["vv"]}
        for verb in (p.restore, p.establish):
            with pytest.raises(errors.StateError) as ei:
                verb()
            assert "verify is running" in str(ei.value)
        assert c.status("vv")["pairs"][0]["verify"]["tracks_total"] == 65536
        p.cancel()                                           # stops the verify
        assert p.wait(timeout=30) == "done"
        done = next(e for e in stream if e["event"] == "job-done")
        assert done["data"]["kind"] == "verify" and "cancelled" in done["data"]["error"]
        assert p.query()["state"] == "split" and c.status("vv")["pairs"][0]["last_verify"] is None
