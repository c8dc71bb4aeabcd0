"""Holes and zeroes cost nothing (issue 13 items 4 and 5): a restore or an
establish keeps the source's holes (st_blocks) and reads zeroes where it had
them; TRIM and WRITE_ZEROES from a real NBD client (libnbd) zero every side a
write reaches, during a restore and while established; the export answers
block status for ``base:allocation`` and ``pymirror:pending`` (libnbd's
block_status and ``nbdinfo --map``)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import pymirror
from pymirror import CopyConfig
from pymirror.nbd import NBDServer

_spec = importlib.util.spec_from_file_location("nbd_util", Path(__file__).with_name("nbd_util.py"))
nbd_util = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("nbd_util", nbd_util)
_spec.loader.exec_module(nbd_util)
need = nbd_util.need

MiB = 1 << 20
TRACK = 64 << 10
SIZE = 16 * MiB
DATA_TRACKS = {3: b"\x33", 40: b"\x40", 200: b"\xc8"}


def allocated(path) -> int:
    return os.stat(path).st_blocks * 512


def sparse_pair(tmp_path, source: str):
    """A pair whose `source` side has data on DATA_TRACKS, explicit zeroes
    written on track 10 and holes elsewhere; the other side is full of 0xEE."""
    std, mir = tmp_path / "std.img", tmp_path / "mir.img"
    pymirror.Volume.create(std, SIZE).close()
    pymirror.Volume.create(mir, SIZE).close()
    pair = pymirror.Pair.create(tmp_path / "pair.meta", std, mir)
    pair.establish(assume_equal=True)
    pair.split()
    write_src = pair.mirror_write if source == "mirror" else pair.write
    write_dst = pair.write if source == "mirror" else pair.mirror_write
    write_dst(0, b"\xee" * SIZE)
    for t, byte in DATA_TRACKS.items():
        write_src(t * TRACK, byte * TRACK)
    write_src(10 * TRACK, bytes(TRACK))
    pair.flush()
    pair.mirror_flush()
    return pair, std, mir


def expected_image() -> bytes:
    img = bytearray(SIZE)
    for t, byte in DATA_TRACKS.items():
        img[t * TRACK:(t + 1) * TRACK] = byte * TRACK
    return bytes(img)


@pytest.mark.parametrize("kind", ["restore", "establish"])
def test_holes_stay_holes_and_zeroes_read_as_zeroes(tmp_path, kind):
    pair, std, mir = sparse_pair(tmp_path, "mirror" if kind == "restore" else "standard")
    target = std if kind == "restore" else mir
    assert allocated(target) >= SIZE
    job = pair.restore(protect=True) if kind == "restore" else pair.establish()
    assert job.wait(timeout=60)
    p = job.progress
    assert p.tracks_copied == pair.tracks
    # the data tracks were written (track 10's zeroes may go as data through the kernel copy)
    assert len(DATA_TRACKS) * TRACK <= p.bytes_written <= (len(DATA_TRACKS) + 1) * TRACK
    assert p.bytes_written + p.bytes_zeroed == SIZE
    assert pair.verify() == []
    assert Path(target).read_bytes() == expected_image()
    assert allocated(target) <= (len(DATA_TRACKS) + 1) * TRACK + 64 * 1024   # the holes are holes
    # what the stores report: a hole before track 3, data on it
    ext = pair.block_status(0, 4 * TRACK)
    assert ext[0] == (0, 3 * TRACK, 1) and ext[1][0] == 3 * TRACK and ext[1][2] == 0
    assert pair.block_status(context="pending") == [(0, SIZE, 0)]
    pair.close()


def test_sparse_counts_with_memory_volumes():
    """Memory volumes report no holes: zero tracks are found by reading."""
    pair = pymirror.Pair.memory(4 * MiB, TRACK)
    pair.establish(assume_equal=True).wait(timeout=30)
    pair.split()
    pair.mirror_write(5 * TRACK, b"m" * TRACK)
    pair.write(0, b"s" * (4 * MiB))
    job = pair.restore(protect=True)
    assert job.wait(timeout=30)
    p = job.progress
    assert p.bytes_read == 4 * MiB                      # every track read ...
    assert p.bytes_written == TRACK                     # ... one written ...
    assert p.bytes_zeroed == 4 * MiB - TRACK            # ... the rest zeroed
    assert pair.read(0, 4 * MiB) == bytes(5 * TRACK) + b"m" * TRACK + bytes(4 * MiB - 6 * TRACK)
    pair.close()


def test_block_status_arguments():
    pair = pymirror.Pair.memory(MiB, TRACK)
    with pytest.raises(ValueError, match="context"):
        pair.block_status(context="nope")
    with pytest.raises(ValueError, match="side"):
        pair.block_status(side="left")
    with pytest.raises(pymirror.errors.RangeError):
        pair.block_status(MiB, 1)
    assert pair.block_status(0, 0) == []
    pair.close()


# -- through NBD, with real clients -------------------------------------------------------

def run(*cmd, timeout=120, **kw):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    assert proc.returncode == 0, f"{cmd}: {proc.stdout}\n{proc.stderr}"
    return proc


def nbdsh(uri: str, script: str) -> str:
    """Run a script in nbdsh (Debian's python3 has the nbd module); with
    ``uri``, ``h`` is connected to it, else the script connects itself."""
    tool = need("nbdsh")
    env = dict(os.environ, PATH="/usr/bin:" + os.environ.get("PATH", ""))
    return run(tool, *(["-u", uri] if uri else []), "-c", script, env=env).stdout


STATUS_SCRIPT = r"""
import json, nbd
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.add_meta_context("pymirror:pending")
h.connect_uri({uri!r})
assert h.can_meta_context("base:allocation") and h.can_meta_context("pymirror:pending")
size = h.get_size()
out = {{"base:allocation": [], "pymirror:pending": []}}
def cb(context, offset, entries, err):
    pos = offset
    for i in range(0, len(entries), 2):
        out[context].append([pos, entries[i], entries[i + 1]])
        pos += entries[i]
    return 0
off = 0
while off < size:
    before = {{k: len(v) for k, v in out.items()}}
    h.block_status(size - off, off, cb)
    ends = [v[-1][0] + v[-1][1] for v in out.values() if v]
    off = min(ends)
    for k in out:   # keep only what every context covered, then ask again from there
        out[k] = [e for e in out[k] if e[0] < off]
        if out[k] and out[k][-1][0] + out[k][-1][1] > off:
            out[k][-1][1] = off - out[k][-1][0]
h.trim({trim_len}, {trim_off})
h.zero({zero_len}, {zero_off}, nbd.CMD_FLAG_NO_HOLE)
h.flush()
m = nbd.NBD()
m.add_meta_context("pymirror:pending")
m.connect_uri({mirror_uri!r})
mirror_has_pending = m.can_meta_context("pymirror:pending")
m.shutdown()
h.shutdown()
print(json.dumps({{"status": out, "mirror_has_pending": mirror_has_pending}}))
"""


def merge(extents):
    out = []
    for off, n, flags in extents:
        if out and out[-1][2] == flags and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + n, flags)
        else:
            out.append((off, n, flags))
    return out


def test_block_status_trim_and_zero_during_a_restore(tmp_path):
    pair, std, mir = sparse_pair(tmp_path, "mirror")
    for t in (100, 101, 150):                          # restored already: whole-track host writes
        pair.write(t * TRACK, b"h" * TRACK)
    pair.commit()
    job = pair.restore(protect=True, config=CopyConfig(rate=1))      # copies nothing for now
    for t in (100, 101, 150):
        pair.write(t * TRACK, b"h" * TRACK)            # whole tracks: local at once
    mirror_before = Path(mir).read_bytes()
    with NBDServer(pair, socket_path=str(tmp_path / "nbd.sock")) as server:
        trim_off, trim_len = 3 * TRACK + 4096, 2 * TRACK       # a pending data track, partly, and more
        zero_off, zero_len = 150 * TRACK, TRACK                # a local track
        script = STATUS_SCRIPT.format(uri=server.uri, mirror_uri=server.uri.replace(":///", ":///mirror"),
                                      trim_off=trim_off, trim_len=trim_len, zero_off=zero_off,
                                      zero_len=zero_len)
        got = json.loads(nbdsh("", script).strip().splitlines()[-1])
        status = got["status"]
        assert got["mirror_has_pending"] is False          # pymirror:pending is the standard's
        # pending: tracks 100, 101 and 150 local, every other one not yet restored
        want = [(0, 100 * TRACK, 1), (100 * TRACK, 2 * TRACK, 0), (102 * TRACK, 48 * TRACK, 1),
                (150 * TRACK, TRACK, 0), (151 * TRACK, SIZE - 151 * TRACK, 1)]
        assert merge(tuple(e) for e in status["pymirror:pending"]) == want
        # allocation: a pending track as the mirror has it (hole 0..3, data 3), a local one as the standard
        alloc = merge(tuple(e) for e in status["base:allocation"])
        assert alloc[0] == (0, 3 * TRACK, 3) and alloc[1][0] == 3 * TRACK and alloc[1][2] == 0
        flags_at = {off: f for off, n, f in alloc for off in range(off, off + n, TRACK)}
        assert flags_at[100 * TRACK] == 0 and flags_at[60 * TRACK] == 3
        # nbdinfo, during the restore, after the client's TRIM: tracks 3-5 became local too
        # (a trim is a write: whole tracks are written, partial ones merged)
        nbdinfo = need("nbdinfo")
        out = run(nbdinfo, "--map=pymirror:pending", "--json", server.uri).stdout
        rows = [(e["offset"], e["length"], e["type"]) for e in json.loads(out)]
        assert merge(rows) == [(0, 3 * TRACK, 1), (3 * TRACK, 3 * TRACK, 0), (6 * TRACK, 94 * TRACK, 1)] + want[1:]
        assert job.progress.running, "the restore ended before the clients ran: the test proved nothing"
    job.set_rate(0)
    assert job.wait(timeout=60)
    want_img = bytearray(mirror_before)
    for t in (100, 101, 150):
        want_img[t * TRACK:(t + 1) * TRACK] = b"h" * TRACK
    want_img[trim_off:trim_off + trim_len] = bytes(trim_len)
    want_img[zero_off:zero_off + zero_len] = bytes(zero_len)
    assert Path(std).read_bytes() == bytes(want_img)
    assert Path(mir).read_bytes() == mirror_before          # protected: the mirror untouched
    pair.close()


def test_trim_while_established_keeps_both_sides_equal_and_sparse(tmp_path):
    pair, std, mir = sparse_pair(tmp_path, "standard")
    pair.write(64 * TRACK, os.urandom(32 * TRACK))
    assert pair.establish().wait(timeout=60)
    before = allocated(std), allocated(mir)
    with NBDServer(pair, socket_path=str(tmp_path / "nbd.sock")) as server:
        script = (f"h.trim({16 * TRACK}, {64 * TRACK})\n"
                  f"h.zero({TRACK}, {40 * TRACK})\n"                       # punched too (no NO_HOLE)
                  f"h.zero(100, {200 * TRACK + 7}, nbd.CMD_FLAG_NO_HOLE)\n"
                  "h.flush()\n")
        nbdsh(server.uri, script)
    assert pair.verify() == []                              # invariant 6
    assert Path(std).read_bytes() == Path(mir).read_bytes()
    img = Path(std).read_bytes()
    assert img[64 * TRACK:80 * TRACK] == bytes(16 * TRACK) and img[40 * TRACK:41 * TRACK] == bytes(TRACK)
    for path, b in zip((std, mir), before):
        assert allocated(path) <= b - 17 * TRACK            # the trimmed tracks were deallocated on both sides
    pair.split()
    pair.write_zeroes(3 * TRACK, TRACK, punch=True)         # a trim is a write: CHANGED, for incrementals
    assert pair.progress.changed_standard == 1
    assert pair.restore(incremental=True).wait(timeout=30)
    assert pair.read(3 * TRACK, TRACK) == DATA_TRACKS[3] * TRACK
    pair.close()


@pytest.fixture
def loop_device(tmp_path):
    """A 16 MiB loop device over a file (root and a free loop device needed)."""
    import shutil
    losetup = shutil.which("losetup")
    if os.geteuid() != 0 or losetup is None or not os.path.exists("/dev/loop-control"):
        pytest.skip("needs root and loop devices (losetup, util-linux) to test block devices")
    backing = tmp_path / "backing.img"
    with open(backing, "wb") as f:
        f.truncate(SIZE)
    proc = subprocess.run([losetup, "-f", "--show", str(backing)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot attach a loop device here: {proc.stderr.strip()}")
    dev = proc.stdout.strip()
    try:
        yield dev, backing
    finally:
        subprocess.run([losetup, "-d", dev], check=False)


def test_block_devices_zero_without_writing_data(tmp_path, loop_device):
    """A block device reports no holes: its zero tracks are found by reading
    them, and zeroing a block device deallocates (loop: the backing file)."""
    dev, backing = loop_device
    with open(dev, "r+b") as f:                              # the device full of old data
        f.write(b"\xee" * SIZE)
        f.flush()
        os.fsync(f.fileno())
    assert allocated(backing) >= SIZE
    mir = tmp_path / "mir.img"
    pymirror.Volume.create(mir, SIZE).close()
    pair = pymirror.Pair.create(tmp_path / "pair.meta", dev, mir)
    pair.establish(assume_equal=True)
    pair.split()
    for t, byte in DATA_TRACKS.items():
        pair.mirror_write(t * TRACK, byte * TRACK)
    job = pair.restore()                                     # file -> block device
    assert job.wait(timeout=60)
    p = job.progress
    assert p.bytes_written == len(DATA_TRACKS) * TRACK and p.bytes_zeroed == SIZE - p.bytes_written
    assert pair.verify() == []
    os.sync()
    assert allocated(backing) <= (len(DATA_TRACKS) + 2) * TRACK      # zeroes reached the device as deallocation
    pair.write(0, b"\x01" * TRACK)                           # the block device drifts; establish it back
    job = pair.establish(incremental=True)                   # block device -> file: zeroes found by reading
    assert job.wait(timeout=60) and pair.verify() == []
    pair.split()
    pair.write(5 * TRACK, bytes(TRACK))                      # explicit zeroes on the device: data, not a hole
    job = pair.establish(incremental=True)
    assert job.wait(timeout=60)
    p = job.progress
    assert p.bytes_read == TRACK and p.bytes_written == 0 and p.bytes_zeroed == TRACK
    assert pair.verify() == []
    pair.close()


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

MODEL_TRACK = 4096
MODEL_TRACKS = 70          # more than one 64-bit word of the table


def model_extents(pending: list[bool], offset: int, length: int) -> list[tuple[int, int, int]]:
    """The pending context by hand: byte runs of equal PENDING value, clipped."""
    out: list[tuple[int, int, int]] = []
    for pos in range(offset, offset + length):
        kind = int(pending[pos // MODEL_TRACK])
        if out and out[-1][2] == kind:
            out[-1] = (out[-1][0], out[-1][1] + 1, kind)
        else:
            out.append((pos, 1, kind))
    return out


@settings(max_examples=40, deadline=None)
@given(written=st.sets(st.integers(0, MODEL_TRACKS - 1)), data=st.data())
def test_pending_block_status_matches_a_model(written, data):
    size = MODEL_TRACK * MODEL_TRACKS - 1000             # a short last track
    pair = pymirror.Pair.memory(size, MODEL_TRACK)
    pair.establish(assume_equal=True)
    pair.split()
    job = pair.restore(config=CopyConfig(rate=1))         # nothing is copied meanwhile
    for t in written:                                     # whole-track writes: local at once
        n = min(MODEL_TRACK, size - t * MODEL_TRACK)
        pair.write(t * MODEL_TRACK, b"w" * n)
    pending = [t not in written for t in range(MODEL_TRACKS)]
    offset = data.draw(st.integers(0, size - 1))
    length = data.draw(st.integers(0, size - offset))
    got = pair.block_status(offset, length, context="pending")
    assert got == model_extents(pending, offset, length)
    cap = data.draw(st.integers(1, 4))
    from pymirror.blockstatus import block_status
    assert block_status(pair, offset, length, context="pending", max_extents=cap) == got[:cap]
    job.set_rate(0)
    assert job.wait(timeout=30)
    assert pair.block_status(offset, length, context="pending") == ([(offset, length, 0)] if length else [])
    pair.close()
