"""Real NBD clients that nobody here wrote (qemu-img, nbdinfo, nbdcopy,
nbdsh, fio) against the export of a pair *while it restores*.  Under CI a
missing client fails the test; elsewhere it skips, naming the package."""
from __future__ import annotations

import hashlib
import importlib.util
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
_spec.loader.exec_module(nbd_util)
need = nbd_util.need

pytestmark = pytest.mark.real_client
SIZE = 32 << 20
MiB = 1 << 20


def run(*cmd, timeout=120, **kw):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    assert proc.returncode == 0, f"{cmd}: {proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture
def restoring(tmp_path):
    """A split pair whose standard differs from the mirror everywhere,
    restoring (slowly) behind an NBD server."""
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
    mirror_digest = hashlib.sha256(mirror_path.read_bytes()).hexdigest()
    job = pair.restore(protect=True, config=CopyConfig(rate=2 * MiB))   # about 16 s: in progress
    server = NBDServer(pair, socket_path=str(tmp_path / "nbd.sock")).start()
    yield pair, job, server, tmp_path
    server.shutdown()
    job.set_rate(0)
    job.wait(timeout=60)
    assert pair.progress.tracks_total > 0
    assert hashlib.sha256(mirror_path.read_bytes()).hexdigest() == mirror_digest, "protected mirror changed"
    pair.close()


def finish(pair, job):
    assert job.progress.running, "the restore ended before the clients ran: the test proved nothing"
    job.set_rate(0)
    assert job.wait(timeout=60)


def test_nbdinfo_lists_exports_and_sizes(restoring):
    pair, job, server, _ = restoring
    out = run(need("nbdinfo"), "--list", "--json", server.uri)
    import json
    listed = json.loads(out)["exports"]
    assert len(listed) == 3                      # "", "standard" and "mirror"; "" reports its
    exports = {e["export-name"]: e for e in listed}   # canonical name, "standard"
    assert set(exports) == {"standard", "mirror"}
    assert all(e["export-size"] == SIZE for e in listed)
    assert exports["mirror"]["is_read_only"] is True and exports["standard"]["is_read_only"] is False
    assert exports["standard"]["can_multi_conn"] is True
    finish(pair, job)


def test_qemu_img_compare_and_convert_during_restore(restoring):
    pair, job, server, d = restoring
    qemu_img = need("qemu-img")
    # the standard already reads as the restored image: identical to the mirror file
    run(qemu_img, "compare", "-f", "raw", "-F", "raw", server.uri, d / "mir.img")
    run(qemu_img, "convert", "-f", "raw", "-O", "raw", server.uri, d / "copy.img")
    assert (d / "copy.img").read_bytes() == (d / "mir.img").read_bytes()
    finish(pair, job)
    assert pair.read(0, SIZE) == (d / "mir.img").read_bytes()


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
    finish(pair, job)
    assert pair.read(0, SIZE) == expect          # the restore did not copy over the client's writes


def test_nbdsh_protocol_level(restoring):
    pair, job, server, d = restoring
    nbdsh = need("nbdsh")
    script = (
        "h.pwrite(b'nbdsh!' * 1000, 12345, nbd.CMD_FLAG_FUA)\n"
        "assert h.pread(6000, 12345) == b'nbdsh!' * 1000\n"
        "h.zero(70000, 3 << 20)\n"
        "assert h.pread(100, 3 << 20) == bytes(100)\n"
        "h.flush()\n"
        "assert h.get_size() == %d\n"
        "assert h.can_fua() and h.can_flush() and h.can_zero() and h.can_trim()\n" % SIZE
    )
    # nbdsh runs `python3 -m nbd`: Debian's python3, which has the nbd module
    # (python3-libnbd); the first python3 on PATH may be another one.
    env = dict(os.environ, PATH="/usr/bin:" + os.environ.get("PATH", ""))
    run(nbdsh, "-u", server.uri, "-c", script, env=env)
    mirror = bytearray((d / "mir.img").read_bytes())
    mirror[12345:12345 + 6000] = b"nbdsh!" * 1000
    mirror[3 << 20:(3 << 20) + 70000] = bytes(70000)       # zero(count, offset)
    finish(pair, job)
    assert pair.read(0, SIZE) == bytes(mirror)


def test_fio_random_writes_verified_during_restore(restoring):
    pair, job, server, d = restoring
    fio = need("fio")
    run(fio, "--name=verify", "--ioengine=nbd", f"--uri={server.uri}", "--rw=randwrite", "--bs=4k",
        "--size=8M", "--iodepth=8", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
        "--output-format=terse")
    finish(pair, job)
