"""Real NBD clients that nobody here wrote (qemu-img, qemu-io, nbdinfo,
nbdcopy, nbdsh, fio) against the export of a pair *while it restores*.  Each
test checks that the restore was still running when the client finished,
then lets it finish and checks the standard against the expected image: the
mirror overlaid with the client's writes; the protected mirror must not have
changed.  Under CI a missing client fails the test; elsewhere it skips,
naming the Debian package."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import pymirror
from pymirror import CopyConfig
from pymirror.nbd import NBDServer

_spec = importlib.util.spec_from_file_location("nbd_util", Path(__file__).with_name("nbd_util.py"))
nbd_util = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("nbd_util", nbd_util)
_spec.loader.exec_module(nbd_util)
need = nbd_util.need

pytestmark = pytest.mark.real_client
SIZE = 32 << 20
MiB = 1 << 20
TRACK = 64 << 10


def run(*cmd, timeout=120, check=True, **kw):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    if check:
        assert proc.returncode == 0, f"{cmd}: {proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture
def restoring(tmp_path, request):
    """A split pair whose standard differs from the mirror everywhere,
    restoring (slowly) behind an NBD server.  Parametrized indirectly with
    "parallel", the server counts every request as slow, which forces the
    parallel request path."""
    rng = np.random.default_rng(5)
    pymirror.Volume.create(tmp_path / "std.img", SIZE).close()
    mirror_path = tmp_path / "mir.img"
    pymirror.Volume.create(mirror_path, SIZE).close()
    pair = pymirror.Pair.create(tmp_path / "pair.meta", tmp_path / "std.img", mirror_path)
    pair.establish(assume_equal=True)
    pair.split()
    for off in range(0, SIZE, MiB):
        pair.mirror_write(off, rng.integers(0, 256, MiB, dtype=np.uint8).tobytes())
        pair.write(off, b"\xee" * MiB)
    pair.flush()
    mirror_digest = hashlib.sha256(mirror_path.read_bytes()).hexdigest()
    job = pair.restore(protect=True, config=CopyConfig(rate=2 * MiB))   # about 16 s: in progress
    server = NBDServer(pair, socket_path=str(tmp_path / "nbd.sock"))
    if getattr(request, "param", "default") == "parallel":
        server.handoff_after = 0.0
    server.start()
    yield pair, job, server, tmp_path
    server.shutdown()
    job.set_rate(0)
    job.wait(timeout=60)
    assert pair.state == "restored"
    assert hashlib.sha256(mirror_path.read_bytes()).hexdigest() == mirror_digest, "protected mirror changed"
    pair.close()


def finish(pair, job):
    assert job.progress.running, "the restore ended before the clients ran: the test proved nothing"
    job.set_rate(0)
    assert job.wait(timeout=60)


def mirror_uri(server):
    return f"nbd+unix:///mirror?socket={server.socket_path}"


def test_nbdinfo_lists_exports_and_sizes(restoring):
    pair, job, server, _ = restoring
    listed = json.loads(run(need("nbdinfo"), "--list", "--json", server.uri).stdout)["exports"]
    assert len(listed) == 3                      # "", "standard" and "mirror"; "" reports its
    exports = {e["export-name"]: e for e in listed}   # canonical name, "standard"
    assert set(exports) == {"standard", "mirror"}
    assert all(e["export-size"] == SIZE for e in listed)
    assert exports["mirror"]["is_read_only"] is True and exports["standard"]["is_read_only"] is False
    std = exports["standard"]
    assert std["can_multi_conn"] is True and std["can_fua"] is True and std["can_zero"] is True
    assert std["block_size_minimum"] == 1 and std["block_size_preferred"] == TRACK
    assert std["block_size_maximum"] == 64 * MiB
    assert "restoring" in exports["mirror"]["description"]
    finish(pair, job)


def test_qemu_img_compare_and_convert_during_restore(restoring):
    pair, job, server, d = restoring
    qemu_img = need("qemu-img")
    # the standard already reads as the restored image: identical to the mirror file
    run(qemu_img, "compare", "-f", "raw", "-F", "raw", server.uri, d / "mir.img")
    run(qemu_img, "convert", "-f", "raw", "-O", "raw", server.uri, d / "copy.img")
    assert (d / "copy.img").read_bytes() == (d / "mir.img").read_bytes()
    # qemu writes a smaller image over its start, several requests in flight
    new = np.random.default_rng(11).integers(0, 256, 8 * MiB, dtype=np.uint8).tobytes()
    (d / "new.img").write_bytes(new)
    run(qemu_img, "convert", "-n", "-W", "-f", "raw", "-O", "raw", d / "new.img", server.uri)
    expect = new + (d / "mir.img").read_bytes()[len(new):]
    run(qemu_img, "convert", "-f", "raw", "-O", "raw", server.uri, d / "copy2.img")
    assert (d / "copy2.img").read_bytes() == expect
    finish(pair, job)
    assert pair.read(0, SIZE) == expect


def test_qemu_io_writes_and_verifies_patterns(restoring):
    pair, job, server, d = restoring
    qemu_io = need("qemu-io")
    cmds = []
    expect = bytearray((d / "mir.img").read_bytes())
    for i, (off, length) in enumerate([(1000, 5000), (TRACK - 7, 14), (3 * MiB, 2 * TRACK), (SIZE - 4096, 4096)]):
        pat = 0x40 + i
        cmds += ["-c", f"write -P {pat} {off} {length}", "-c", f"read -P {pat} {off} {length}"]
        expect[off:off + length] = bytes([pat]) * length
    cmds += ["-c", f"write -z {5 * MiB + 17} 100000", "-c", f"read -P 0 {5 * MiB + 17} 100000", "-c", "flush"]
    expect[5 * MiB + 17:5 * MiB + 100017] = bytes(100000)
    run(qemu_io, "-f", "raw", *cmds, server.uri)          # exits 1 on a pattern mismatch
    # the protected mirror cannot even be opened for writing
    out = run(qemu_io, "-f", "raw", "-c", "write 0 4k", mirror_uri(server), check=False)
    assert out.returncode != 0 and "ermission denied" in out.stderr
    run(qemu_io, "-r", "-f", "raw", "-c", f"read -P {expect[0]} 0 1", mirror_uri(server))
    finish(pair, job)
    assert pair.read(0, SIZE) == bytes(expect)


@pytest.mark.parametrize("restoring", ["default", "parallel"], indirect=True)
def test_nbdcopy_writes_mid_restore_and_reads_back(restoring):
    pair, job, server, d = restoring
    nbdcopy = need("nbdcopy")
    payload = np.random.default_rng(9).integers(0, 256, 5 * MiB + 12345, dtype=np.uint8).tobytes()
    (d / "in.bin").write_bytes(payload)
    run(nbdcopy, "--flush", d / "in.bin", server.uri)
    run(nbdcopy, server.uri, d / "out.bin")
    out = (d / "out.bin").read_bytes()
    mirror = (d / "mir.img").read_bytes()
    expect = payload + mirror[len(payload):]
    assert out == expect
    run(nbdcopy, mirror_uri(server), d / "mirror-out.bin")
    assert (d / "mirror-out.bin").read_bytes() == mirror
    finish(pair, job)
    assert pair.read(0, SIZE) == expect          # the restore did not copy over the client's writes


NBDSH_SCRIPT = r"""
import errno
size, uri, mirror_uri, track = {size}, {uri!r}, {mirror_uri!r}, {track}
assert h.get_structured_replies_negotiated()
assert h.get_size() == size and not h.is_read_only()
assert h.can_fua() and h.can_flush() and h.can_zero() and h.can_trim() and h.can_multi_conn()
assert not h.can_cache() and not h.can_df() and not h.can_fast_zero()
assert (h.get_block_size(nbd.SIZE_MINIMUM), h.get_block_size(nbd.SIZE_PREFERRED),
        h.get_block_size(nbd.SIZE_MAXIMUM)) == (1, track, 64 << 20)
h.pwrite(b'nbdsh!' * 1000, 12345, nbd.CMD_FLAG_FUA)
assert h.pread(6000, 12345) == b'nbdsh!' * 1000
h.zero(70000, 3 << 20)
assert h.pread(100, 3 << 20) == bytes(100)
h.trim(4096, 8 << 20)
h.flush()
# the server's own range check, past libnbd's
h.set_strict_mode(0)
for call in (lambda: h.pread(10, size - 5), lambda: h.pwrite(b'x' * 10, size - 5)):
    try:
        call()
        raise AssertionError('no error')
    except nbd.Error as e:
        assert e.errnum in (errno.EINVAL, errno.ENOSPC), e
assert h.pread(6, 12345) == b'nbdsh!'        # the connection goes on
# simple replies work too
s = nbd.NBD()
s.set_request_structured_replies(False)
s.connect_uri(uri)
assert not s.get_structured_replies_negotiated()
assert s.pread(12, 12345) == b'nbdsh!nbdsh!'
try:
    s.set_strict_mode(0)
    s.pread(1, size)
    raise AssertionError('no error')
except nbd.Error as e:
    assert e.errnum == errno.EINVAL, e
s.shutdown()
# the protected mirror: read-only, and says so
m = nbd.NBD()
m.connect_uri(mirror_uri)
assert m.is_read_only() and m.get_size() == size
m.set_strict_mode(0)
try:
    m.pwrite(b'no', 0)
    raise AssertionError('no error')
except nbd.Error as e:
    assert e.errnum == errno.EPERM, e
m.shutdown()
"""


def test_nbdsh_protocol_level(restoring):
    pair, job, server, d = restoring
    nbdsh = need("nbdsh")
    script = NBDSH_SCRIPT.format(size=SIZE, uri=server.uri, mirror_uri=mirror_uri(server), track=TRACK)
    # nbdsh runs `python3 -m nbd`: Debian's python3, which has the nbd module
    # (python3-libnbd); the first python3 on PATH may be another one.
    env = dict(os.environ, PATH="/usr/bin:" + os.environ.get("PATH", ""))
    run(nbdsh, "-u", server.uri, "-c", script, env=env)
    mirror = bytearray((d / "mir.img").read_bytes())
    mirror[12345:12345 + 6000] = b"nbdsh!" * 1000
    mirror[3 << 20:(3 << 20) + 70000] = bytes(70000)       # zero(count, offset)
    mirror[8 << 20:(8 << 20) + 4096] = bytes(4096)         # trim(count, offset) zeroes too
    finish(pair, job)
    assert pair.read(0, SIZE) == bytes(mirror)


@pytest.mark.parametrize("restoring", ["default", "parallel"], indirect=True)
def test_fio_random_writes_verified_during_restore(restoring):
    pair, job, server, d = restoring
    fio = need("fio")
    run(fio, "--name=verify", "--ioengine=nbd", f"--uri={server.uri}", "--rw=randwrite", "--bs=4k",
        "--size=8M", "--iodepth=16", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
        "--output-format=terse", timeout=120, cwd=d)     # fio leaves a verify state file in its cwd
    run(fio, "--name=mixed", "--ioengine=nbd", f"--uri={server.uri}", "--rw=randrw", "--bsrange=512-128k",
        "--offset=16M", "--size=8M", "--iodepth=32", "--runtime=2", "--time_based", "--output-format=terse",
        timeout=120, cwd=d)
    finish(pair, job)
    mirror = (d / "mir.img").read_bytes()
    assert pair.read(8 * MiB, 8 * MiB) == mirror[8 * MiB:16 * MiB]   # what fio did not touch is restored
    assert pair.read(24 * MiB, 8 * MiB) == mirror[24 * MiB:]
