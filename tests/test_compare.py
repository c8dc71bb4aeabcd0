"""Comparing the two sides (issue 16 item 1): verify equals a byte
comparison; establish/restore --compare copy exactly the differing tracks
(bytes counted, against a plain-Python model of random damage); adopt marks
exactly the differing tracks; host writers racing a compare-establish;
progress, cancel, the hash path; bad input through the CLI; the daemon
verbs."""
from __future__ import annotations

import errno
import importlib.util
import os
import random
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pymirror
from pymirror import errors
from pymirror._native import ffi, lib
from pymirror.compare import Comparison
from pymirror.pair import peek

_spec = importlib.util.spec_from_file_location("cli_util", Path(__file__).with_name("cli_util.py"))
cli_util = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("cli_util", cli_util)
_spec.loader.exec_module(cli_util)

TS = 4096


def _tracks(size: int) -> int:
    return -(-size // TS)


def _span(t: int, size: int) -> tuple[int, int]:
    return t * TS, min(TS, size - t * TS)


def _model_diff(std: bytes, mir: bytes) -> list[int]:
    """The plain-Python model: the tracks whose bytes differ."""
    return [t for t in range(_tracks(len(std)))
            if std[t * TS:(t + 1) * TS] != mir[t * TS:(t + 1) * TS]]


def _changed(pair: pymirror.Pair, side: int) -> list[int]:
    with pair._call as p:
        bm = lib.pm_table_flag(lib.pm_pair_table(p, side), lib.PM_CHANGED)
        out = ffi.new("uint64_t[]", pair.tracks)
        n = lib.pm_bitmap_collect(bm, 0, out, pair.tracks)
        return [int(x) for x in ffi.unpack(out, n)]


def _images(tmp_path: Path, size: int, seed: int) -> tuple[Path, Path, bytes]:
    rnd = random.Random(seed)
    data = rnd.randbytes(size)
    std, mir = tmp_path / "std.img", tmp_path / "mir.img"
    std.write_bytes(data)
    mir.write_bytes(data)
    return std, mir, data


def _damage(path: Path, size: int, rnd: random.Random, writes: list[tuple[int, int, int]]) -> None:
    """Writes behind the pair's back: (track, offset in it, length)."""
    with open(path, "r+b") as f:
        for t, o, n in writes:
            off, tl = _span(t, size)
            o, n = o % tl, 1 + n % tl
            n = min(n, tl - o)
            f.seek(off + o)
            f.write(rnd.randbytes(n))


damage = st.lists(st.tuples(st.sampled_from(["std", "mir"]), st.integers(0, 10_000),
                            st.integers(0, TS - 1), st.integers(0, TS - 1)), max_size=25)


# -- verify ---------------------------------------------------------------------
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.integers(1, 300).map(lambda k: k * 1000 + 7), hits=damage, seed=st.integers(0, 2**16))
def test_verify_equals_a_byte_comparison(tmp_path_factory, size, hits, seed):
    d = tmp_path_factory.mktemp("v")
    std, mir, _ = _images(d, size, seed)
    rnd = random.Random(seed)
    for side, t, o, n in hits:
        _damage(std if side == "std" else mir, size, rnd, [(t % _tracks(size), o, n)])
    want = _model_diff(std.read_bytes(), mir.read_bytes())
    vs = pymirror.Volume.open(str(std), track_size=TS)
    vm = pymirror.Volume.open(str(mir), track_size=TS)
    try:
        with pymirror.Pair.create(None, vs, vm, track_size=TS) as pair:   # a pair kept in memory
            seen = []
            assert pair.verify(progress=seen.append) == want
            assert list(pair.iter_differences(batch=3)) == want       # the paged C call agrees
            assert seen and seen[-1].tracks_done == pair.tracks and seen[-1].tracks_differ == len(want)
            assert seen[-1].bytes_read == 2 * size
    finally:
        vs.close()
        vm.close()


def test_verify_by_hashes_reads_one_side_only():
    pair = pymirror.Pair.memory(64 * TS + 100, TS)
    pair.establish(assume_equal=True)
    pair.split()
    pair.mirror_write(5 * TS + 1, b"x")
    pair.write(64 * TS + 99, b"y")          # the short last track
    with pair.mirror._call as m:             # the mirror hashes next to its data (as a server would)
        assert lib.pm_store_set_track_hash(m, lib.pm_store_crc32c_tracks, m) == 0
    seen = []
    assert pair.verify(progress=seen.append) == [5, 64]
    assert seen[-1].tracks_hashed == pair.tracks
    assert seen[-1].bytes_read == pair.size                  # only the standard's data moved
    pair.close()


def test_cancel_stops_a_compare():
    pair = pymirror.Pair.memory(4 << 30, 1 << 20)            # 8 GiB read: seconds unless cancelled
    comp = Comparison(pair).start()
    while comp.progress().tracks_done == 0 and not comp.finished:
        pass
    comp.cancel()
    assert comp.wait(30)
    with pytest.raises(OSError) as ei:
        comp.result()
    assert ei.value.errno == errno.ECANCELED and "cancelled" in str(ei.value)
    assert comp.progress().tracks_done < pair.tracks
    pair.close()


def test_a_read_error_names_the_side_and_track():
    pair = pymirror.Pair.memory(32 * TS, TS)
    pair.establish(assume_equal=True)
    with pair.mirror._call as m:
        lib.pm_store_inject_fault(m, lib.PM_FAULT_READ, 20 * TS, TS, -errno.EIO, 1)
    with pytest.raises(OSError) as ei:
        pair.verify()
    assert ei.value.errno == errno.EIO and "the mirror" in str(ei.value) and "\n" not in str(ei.value)
    assert pair.verify() == []
    pair.close()


# -- compare jobs -----------------------------------------------------------------
@pytest.mark.parametrize("kind", ["restore", "establish"])
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.integers(2, 200).map(lambda k: k * TS - 300), hits=damage, seed=st.integers(0, 2**16))
def test_compare_job_copies_exactly_the_differing_tracks(tmp_path_factory, kind, size, hits, seed):
    d = tmp_path_factory.mktemp("j")
    std, mir, _ = _images(d, size, seed)
    meta = d / "p.meta"
    with pymirror.Pair.create(str(meta), str(std), str(mir), track_size=TS) as pair:
        pair.establish(assume_equal=True)
        pair.split()
    rnd = random.Random(seed)
    for side, t, o, n in hits:                  # behind the pair's back: the tables know nothing
        _damage(std if side == "std" else mir, size, rnd, [(t % _tracks(size), o, n)])
    before_std, before_mir = std.read_bytes(), mir.read_bytes()
    want = _model_diff(before_std, before_mir)
    with pymirror.Pair.open(str(meta)) as pair:
        assert pair.progress.changed_standard == 0 and pair.progress.changed_mirror == 0
        job = pair.restore(compare=True) if kind == "restore" else pair.establish(compare=True)
        job.wait()
        p = pair.progress
        assert pair.state == ("restored" if kind == "restore" else "established")
        assert p.compare and not p.comparing
        assert p.tracks_compared == pair.tracks and p.tracks_equal == pair.tracks - len(want)
        assert p.tracks_copied == len(want)
        assert p.bytes_written == sum(_span(t, size)[1] for t in want)     # count the bytes
        assert p.compare_bytes == 2 * size
    source = before_mir if kind == "restore" else before_std
    assert std.read_bytes() == source and mir.read_bytes() == source


def test_compare_arguments_and_states():
    pair = pymirror.Pair.memory(16 * TS, TS)
    with pytest.raises(ValueError):
        pair.establish(compare=True, incremental=True)
    with pytest.raises(ValueError):
        pair.establish(compare=True, assume_equal=True)
    with pytest.raises(errors.StateError):
        pair.restore(compare=True)               # new: nothing to restore from
    pair.establish(compare=True).wait()          # a new pair may establish by comparing
    assert pair.state == "established" and pair.progress.bytes_written == 0
    with pytest.raises(errors.StateError):
        pair.establish(compare=True)
    with pytest.raises(ValueError):
        pair.restore(compare=True, incremental=True)
    pair.close()


def test_host_writers_during_a_compare_establish_leave_the_sides_equal():
    size = 2048 * TS
    pair = pymirror.Pair.memory(size, TS)
    pair.establish(assume_equal=True)
    pair.split()
    rnd = random.Random(7)
    for t in rnd.sample(range(2048), 600):                # differences on both sides
        (pair.write if t % 2 else pair.mirror_write)(t * TS + rnd.randrange(TS - 8), rnd.randbytes(8))
    stop = threading.Event()
    failures: list[BaseException] = []

    def writer(seed: int) -> None:
        r = random.Random(seed)
        try:
            while not stop.is_set():
                off = r.randrange(size - 3 * TS)
                pair.write(off, r.randbytes(r.randrange(1, 3 * TS)))
        except BaseException as exc:  # noqa: BLE001
            failures.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    try:
        pair.establish(compare=True, config=pymirror.CopyConfig(rate=64 << 20)).wait(timeout=120)
    finally:
        stop.set()
        for th in threads:
            th.join()
    assert not failures
    assert pair.state == "established"
    assert pair.verify() == []
    assert pair.progress.tracks_equal < 2048      # some were compared equal and not copied ...
    assert pair.progress.tracks_equal > 0
    pair.close()


# -- adopt ------------------------------------------------------------------------
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.integers(2, 120).map(lambda k: k * TS + 11), hits=damage, seed=st.integers(0, 2**16))
def test_adopt_marks_exactly_the_differing_tracks(tmp_path_factory, size, hits, seed):
    d = tmp_path_factory.mktemp("a")
    std, mir, _ = _images(d, size, seed)
    rnd = random.Random(seed)
    for side, t, o, n in hits:
        _damage(std if side == "std" else mir, size, rnd, [(t % _tracks(size), o, n)])
    want = _model_diff(std.read_bytes(), mir.read_bytes())
    meta = d / "p.meta"
    with pymirror.Pair.adopt(str(meta), str(std), str(mir), track_size=TS) as pair:
        assert pair.state == "split"
        assert _changed(pair, lib.PM_STANDARD) == want and _changed(pair, lib.PM_MIRROR) == want
    assert peek(str(meta))["state"] == "split"
    with pymirror.Pair.open(str(meta)) as pair:          # durable
        assert _changed(pair, lib.PM_STANDARD) == want
        pair.restore(incremental=True).wait()
        assert pair.progress.bytes_written == sum(_span(t, size)[1] for t in want)
    assert std.read_bytes() == mir.read_bytes()


def test_adopt_leaves_nothing_on_error(tmp_path):
    std, mir, _ = _images(tmp_path, 64 * TS, 1)
    meta = tmp_path / "p.meta"
    with open(mir, "r+b") as f:
        f.truncate(65 * TS)
    with pytest.raises(errors.GeometryError):
        pymirror.Pair.adopt(str(meta), str(std), str(mir), track_size=TS)
    assert not meta.exists()
    meta.write_bytes(b"keep")
    with pytest.raises(errors.MirrorError):
        pymirror.Pair.adopt(str(meta), str(std), str(std), track_size=TS)
    assert meta.read_bytes() == b"keep"


# -- the command line -------------------------------------------------------------
def test_cli_adopt_verify_and_compare_restore(tmp_path):
    run = cli_util.run
    std, mir, _ = _images(tmp_path, 64 * 65536, 3)
    with open(mir, "r+b") as f:
        f.seek(5 * 65536 + 10)
        f.write(b"different")
    meta = tmp_path / "p.meta"
    r = run("pair", meta, "--standard", std, "--mirror", mir, "--adopt")
    assert "1 differ" in r.stdout and "state split" in r.stdout
    v = run("verify", meta, check=False)
    assert v.returncode == 1 and v.stdout.endswith("1 of 64 tracks differ: 5\n")
    assert "verify" in v.stderr                         # the progress display (plain lines off a terminal)
    r = run("restore", meta, "--compare")
    assert "64 tracks compared, 1 differed" in r.stdout and "64.0 KiB copied" in r.stdout
    assert run("verify", meta).returncode == 0
    r = run("restore", meta, "--compare", "--incremental", check=False)
    assert r.returncode == 2 and r.stderr.count("\n") == 1


@pytest.mark.parametrize("case", ["sizes", "missing", "exists"])
def test_cli_adopt_bad_input_is_one_line_and_creates_nothing(tmp_path, case):
    run = cli_util.run
    std, mir, _ = _images(tmp_path, 16 * 65536, 4)
    meta = tmp_path / "p.meta"
    if case == "sizes":
        with open(mir, "ab") as f:
            f.write(b"\0" * 65536)
    elif case == "missing":
        mir = tmp_path / "nope.img"
    else:
        meta.write_bytes(b"keep")
    r = run("pair", meta, "--standard", std, "--mirror", mir, "--adopt", check=False)
    assert r.returncode == 2 and r.stderr.startswith("Error: ") and r.stderr.count("\n") == 1, r.stderr
    assert meta.exists() == (case == "exists")
    if case == "exists":
        assert meta.read_bytes() == b"keep"


# -- the daemon ---------------------------------------------------------------------
_uspec = importlib.util.spec_from_file_location("test_daemon_util", Path(__file__).with_name("test_daemon_util.py"))
U = importlib.util.module_from_spec(_uspec)
sys.modules.setdefault("test_daemon_util", U)
_uspec.loader.exec_module(U)


def test_daemon_compare_verbs_and_online_verify(tmp_path):
    meta = U.make_pair(tmp_path, "dc", size=2 << 20, fill=b"A")
    with pymirror.Pair.open(str(meta)) as p:
        p.establish().wait()
        p.split()
    with open(tmp_path / "dc.bcv", "r+b") as f:             # behind the pair's back
        f.seek(3 * 65536)
        f.write(b"B" * 100)
    d = U.DaemonProc(tmp_path, nbd=False)
    d.start(meta)
    try:
        with d.client() as c:
            rp = c.pair("dc")
            assert rp.query()["standard"]["changed"] == 0
            assert rp.verify()["differing"] == [3]
            v = cli_util.run("--control", d.control, "verify", "dc", check=False)   # the CLI, through the daemon
            assert v.returncode == 1 and v.stdout == "dc: 1 of 32 tracks differ: 3\n"
            assert "verify dc: done" in v.stderr
            q = rp.restore(compare=True, wait=True)
            assert q["state"] == "restored"
            lj = q["last_job"]
            assert lj["compare"] and lj["tracks_copied"] == 1 and lj["bytes_written"] == 65536
            assert rp.verify()["equal"]
            rp.split()
            q = rp.establish(compare=True, wait=True)
            assert q["state"] == "established" and q["last_job"]["bytes_written"] == 0
    finally:
        assert d.stop() == 0
