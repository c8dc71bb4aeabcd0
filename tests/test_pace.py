"""Pacing and hot order (issue 13) from Python, the command line and the
daemon: the settings' words, their checks, the config file, the progress
fields, and that a restore with them keeps every invariant.

The controller's convergence is tested in C (csrc/tests/test_pace.c, run
by test_c_core's `make check`); timing figures live in benchmarks/bench_pace.py."""
from __future__ import annotations

import json
import os
import random
import sys
import threading
from pathlib import Path

import pytest

import pymirror
from pymirror import CopyConfig
from pymirror.config import ConfigError, settings_from_mapping
from pymirror.pace import normalize_latency_target, parse_latency_target

sys.path.insert(0, str(Path(__file__).parent))
import cli_util  # noqa: E402
from cli_util import one_line_error, run  # noqa: E402


@pytest.mark.parametrize("text,expect", [
    ("2x", (2000, 0)), ("1.5x", (1500, 0)), ("1x", (1000, 0)), ("4X", (4000, 0)),
    ("5ms", (0, 5_000_000)), ("800us", (0, 800_000)), ("0.01s", (0, 10_000_000)), ("250 us", (0, 250_000)),
])
def test_latency_targets(text, expect):
    assert parse_latency_target(text) == expect
    assert parse_latency_target(normalize_latency_target(text)) == expect


@pytest.mark.parametrize("bad", ["", "2", "x", "0.5x", "2000x", "fast", "5 minutes", "-1ms", "0ms", "61s", "1ns"])
def test_bad_latency_targets_are_one_line_errors(bad):
    with pytest.raises(ValueError) as exc:
        parse_latency_target(bad)
    assert "\n" not in str(exc.value)
    with pytest.raises(ConfigError):
        CopyConfig(host_latency_target=bad)


def test_copy_config_defaults_and_checks():
    c = CopyConfig()
    assert (c.pace, c.host_latency_target, c.order) == ("auto", "2x", "hot")
    assert CopyConfig(host_latency_target="5.0ms").host_latency_target == "5ms"
    with pytest.raises(ConfigError, match="pace must be one of auto, off"):
        CopyConfig(pace="fast")
    with pytest.raises(ConfigError, match="order must be one of hot, ascending"):
        CopyConfig(order="random")
    s = settings_from_mapping({"pace": "off", "host_latency_target": "3ms", "order": "ascending"}, "f.toml")
    assert (s.copy.pace, s.copy.host_latency_target, s.copy.order) == ("off", "3ms", "ascending")
    with pytest.raises(ConfigError, match="f.toml"):
        settings_from_mapping({"order": "sideways"}, "f.toml")


@pytest.mark.parametrize("cfg", [
    CopyConfig(), CopyConfig(pace="off", order="ascending"), CopyConfig(host_latency_target="1.5x"),
    CopyConfig(host_latency_target="200us", copiers=4, batch_size=64 << 10),
])
def test_restore_under_host_io_keeps_the_invariants(cfg):
    """Readers and writers during a restore with each setting: reads see the
    final image, writes are never lost, the mirror is unchanged, and the
    progress fields say what the pacing and the order did."""
    size, ts = 8 << 20, 4096
    with pymirror.Pair.memory(size, ts) as pair:
        rnd = random.Random(7)
        pair.write(0, bytes(rnd.getrandbits(8) for _ in range(1 << 16)) * (size >> 16))
        pair.establish().wait()
        pair.split()
        mirror = pair.mirror_read(0, size)
        expect = bytearray(mirror)
        pair.write(0, b"\xee" * size)           # the standard now differs everywhere
        job = pair.restore(config=cfg.replace(rate=2 << 20, batch_size=cfg.batch_size or 64 << 10))
        stop = threading.Event()
        errors: list[str] = []
        lock = threading.Lock()

        def reader() -> None:
            r = random.Random(1)
            while not stop.is_set():
                off = r.randrange(0, size - 4096)
                with lock:   # no writer in flight: the expected bytes are exact
                    got, want = pair.read(off, 4096), bytes(expect[off:off + 4096])
                if got != want:
                    errors.append(f"read at {off} differs")
        t = threading.Thread(target=reader)
        t.start()
        r = random.Random(2)
        import time
        end = time.monotonic() + 3.0
        i = 0
        def judged(p) -> bool:                # what the assertions below ask of the pacing
            return p.host_read_p99 is not None and (p.host_write_p99 is not None or p.host_merge_p99 is not None)

        # until the pacing has judged a window of host reads and one of host
        # writes (>= 0.1 s each), with the copy going on
        while i < 300 or (cfg.pace == "auto" and not judged(pair.progress)
                          and time.monotonic() < end and not job.done):
            i += 1
            off, n = r.randrange(0, size - 5000), r.randrange(1, 5000)
            data = bytes([i & 0xFF]) * n
            with lock:
                pair.write(off, data)
                expect[off:off + n] = data
            if i % 16 == 0:
                pair.flush()
        stop.set()
        t.join()
        job.set_rate(0)
        assert job.wait(timeout=120)
        assert not errors, errors[:3]
        assert pair.read(0, size) == bytes(expect)
        assert pair.mirror_read(0, size) == mirror
        p = pair.progress
        if cfg.order == "ascending":
            assert p.tracks_hot == 0
        else:
            assert p.tracks_hot > 0            # redirected reads and merges made tracks hot
        if cfg.pace == "auto":
            assert p.host_read_p99 and p.host_read_p99 > 0 and (p.host_write_p99 or p.host_merge_p99)
        else:
            assert p.host_read_p99 is None and p.pace_rate == 0
        d = p.as_dict()
        assert {"host_read_p50", "idle_read_p99", "pace_rate", "tracks_hot"} <= set(d)


def test_the_c_struct_sizes_grow_and_old_callers_keep_defaults():
    from pymirror._native import ffi, lib
    assert ffi.sizeof("struct pm_copy_config") > 32
    c = ffi.new("struct pm_copy_config *")
    lib.pm_copy_config_default(c)                   # a 0.2 caller: its size, new fields default
    assert c.size == 32
    with pymirror.Pair.memory(1 << 20, 4096) as pair:
        assert lib.pm_pair_configure(pair._p, c) == 0
        big = ffi.new("struct pm_copy_config *")
        assert lib.pm_copy_config_init(big, ffi.sizeof("struct pm_copy_config")) == 0
        assert (big.pace, big.order, big.latency_factor_milli) == (lib.PM_PACE_AUTO, lib.PM_ORDER_HOT, 2000)
        big.order = 9
        assert lib.pm_pair_configure(pair._p, big) == -22


# -- the command line, here and through the daemon --------------------------------

@pytest.fixture(params=["local", "daemon"])
def mode(request, tmp_path):
    m = cli_util.Mode(request.param, tmp_path)
    yield m
    m.close()


def _pair(d: Path) -> Path:
    run("create", d / "std.img", "--size", "4M")
    run("create", d / "bcv.img", "--size", "4M")
    run("pair", d / "p.meta", "--standard", d / "std.img", "--mirror", d / "bcv.img")
    with pymirror.Pair.open(d / "p.meta") as p:
        p.write(0, b"Q" * (4 << 20))
    return d / "p.meta"


def test_cli_restore_with_pacing_options(mode, tmp_path):
    meta = _pair(tmp_path)
    mode.attach(meta)
    mode.run("establish", meta, "--pace", "off", "--order", "ascending")
    mode.run("split", meta)
    mode.write(meta, 4096, b"changed")
    out = mode.run("restore", meta, "--pace", "auto", "--host-latency-target", "2x", "--order", "hot")
    assert out.stdout.startswith("restore complete: the pair is restored")
    q = json.loads(mode.run("query", meta, "--json").stdout)
    assert q["state"] == "restored"
    if not mode.remote:
        return       # a pair opened by a later command knows no last job
    lj = q["last_job"]
    assert (lj["pace"], lj["host_latency_target"], lj["order"]) == ("auto", "2x", "hot")
    assert "pace_rate" in lj and "tracks_hot" in lj and "host_read_p99" in lj
    mode.run("split", meta)
    mode.run("restore", meta, "--host-latency-target", "5ms", "--order", "ascending", "--no-wait")
    mode.run("wait", meta)
    q = json.loads(mode.run("query", meta, "--json").stdout)
    assert q["state"] == "restored"
    assert (q["last_job"]["host_latency_target"], q["last_job"]["order"]) == ("5ms", "ascending")


def test_cli_bad_pacing_options_are_one_line_errors(mode, tmp_path):
    meta = _pair(tmp_path)
    mode.attach(meta)
    before = json.loads(mode.run("query", meta, "--json").stdout)
    for args, word in [(("--pace", "fast"), "--pace"), (("--order", "up"), "--order"),
                       (("--host-latency-target", "0.5x"), "1x to 1000x"),
                       (("--host-latency-target", "soon"), "factor")]:
        err = one_line_error(mode.run("establish", meta, *args, check=False), 2)
        assert word in err
    assert json.loads(mode.run("query", meta, "--json").stdout) == before


def test_daemon_verb_refuses_a_bad_pace_and_changes_nothing(tmp_path):
    d = cli_util.Mode("daemon", tmp_path)
    try:
        meta = _pair(tmp_path)
        d.attach(meta)
        from pymirror.service.client import connect
        from pymirror.service.protocol import InvalidArgument
        with connect(str(d.control)) as c:
            p = c.pair("p")
            with pytest.raises(InvalidArgument, match="pace must be one of"):
                p.establish(pace="fast")
            with pytest.raises(InvalidArgument, match="host latency target"):
                p.establish(host_latency_target="2 hours")
            assert p.query()["state"] == "new"
            q = p.establish(pace="auto", host_latency_target="1.5x", order="ascending", wait=True)
            assert q["state"] == "established" and q["last_job"]["host_latency_target"] == "1.5x"
    finally:
        d.close()
