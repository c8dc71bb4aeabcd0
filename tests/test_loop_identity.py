"""Block devices are told apart by what they are, not by device numbers
(issue 16 item 2): a different disk attached at the same /dev/loopN is
refused as the standard; the same backing file attached again is accepted.
Needs root and losetup (CI runs as root)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from pymirror import ForeignMetadataError, Pair, Volume

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("losetup") is None,
                                reason="needs root and losetup (util-linux) to attach loop devices")
SIZE = 4 << 20


def attach(backing: Path, device: str = "") -> str:
    args = ["losetup", "--show", device or "--find", str(backing)] if not device else \
        ["losetup", device, str(backing)]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()
    return device or out


def detach(device: str) -> None:
    subprocess.run(["losetup", "-d", device], check=True)


@pytest.fixture
def loop(tmp_path: Path) -> Iterator[tuple[str, Path, Path]]:
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    for p in (a, b):
        with open(p, "wb") as f:
            f.truncate(SIZE)
    dev = attach(a)
    attached = [dev]
    yield dev, a, b
    if subprocess.run(["losetup", dev], capture_output=True).returncode == 0:
        detach(dev)
    del attached


def test_a_replaced_loop_device_is_refused_and_the_same_one_accepted(tmp_path: Path, loop) -> None:
    dev, a, b = loop
    mir, meta = tmp_path / "mir.img", tmp_path / "p.meta"
    Volume.create(mir, SIZE).close()
    with Pair.create(meta, dev, mir) as p:
        ident = p.volume_trust("standard")["identity"]
        assert ident.startswith("loop:file:") and f"size={SIZE}" in ident, ident
        assert p.volume_trust("standard")["identity_stable"]
        p.establish().wait()
        p.split()
    # the same backing file, detached and attached again (same device number): accepted
    detach(dev)
    attach(a, dev)
    with Pair.open(meta) as p:
        assert p.volume_trust("standard")["identity"] == ident
        assert p.state == "split"
    # another disk at the same /dev/loopN: same device numbers, same size, refused
    detach(dev)
    attach(b, dev)
    raw = meta.read_bytes()
    with pytest.raises(ForeignMetadataError) as info:
        Pair.open(meta)
    msg = str(info.value)
    assert dev in msg and "is not the volume this pair was made with" in msg and ident in msg, msg
    assert meta.read_bytes() == raw


def test_a_loop_device_reports_writes_to_its_backing_file(tmp_path: Path, loop) -> None:
    dev, a, _b = loop
    mir, meta = tmp_path / "mir.img", tmp_path / "p.meta"
    Volume.create(mir, SIZE).close()
    with Pair.create(meta, dev, mir) as p:
        p.establish().wait()
        p.split()
    with Pair.open(meta) as p:
        assert p.volume_trust("standard")["outside"] == "unchanged"
    with open(a, "r+b") as f:                       # behind pymirror's back, under the loop device
        f.write(b"outside")
    with Pair.open(meta) as p:
        assert p.changed_outside == ["standard"]
