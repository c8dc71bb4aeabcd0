"""Volume ownership (issue 10 item 6): a volume belongs to one pair at a
time.  A second pair naming the same standard, a copied metadata file, or
another process opening the pair is refused with a one-line BusyError that
names the volume, and nothing is changed."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

import pymirror
from pymirror import errors

TRACK = 4096
SIZE = 16 * TRACK


@pytest.fixture
def images(tmp_path):
    std, mir, other = tmp_path / "std.img", tmp_path / "mir.img", tmp_path / "other.img"
    for p in (std, mir, other):
        pymirror.Volume.create(p, SIZE, TRACK).close()
    return std, mir, other


def test_second_pair_naming_the_same_standard_is_refused(tmp_path, images):
    std, mir, other = images
    with pymirror.Pair.create(tmp_path / "a.meta", std, mir, track_size=TRACK) as a:
        a.establish().wait(timeout=30)
        with pytest.raises(errors.BusyError) as exc:
            pymirror.Pair.create(tmp_path / "b.meta", std, other, track_size=TRACK)
        msg = str(exc.value)
        assert str(std) in msg and "in use by another pair" in msg
        assert f"(pid {os.getpid()})" in msg
        assert "\n" not in msg and not msg.startswith("pm_")
        assert isinstance(exc.value, OSError) and exc.value.errno == __import__("errno").EBUSY
        assert not (tmp_path / "b.meta").exists()        # nothing created
        # the same for a plain Volume (read-only opens are refused too)
        with pytest.raises(errors.BusyError):
            pymirror.Volume.open(mir)
        with pytest.raises(errors.BusyError):
            pymirror.Volume.open(std, readonly=True)
        assert a.state == "established"
    # released with the pair
    with pymirror.Pair.create(tmp_path / "b.meta", std, other, track_size=TRACK) as b:
        assert b.state == "new"


def test_copied_meta_file_is_refused(tmp_path, images):
    std, mir, _ = images
    meta = tmp_path / "p.meta"
    with pymirror.Pair.create(meta, std, mir, track_size=TRACK) as a:
        a.establish().wait(timeout=30)
        a.split()
        a.write(0, b"x" * 100)
        a.commit()
        shutil.copy(meta, tmp_path / "copy.meta")
        before = (tmp_path / "copy.meta").read_bytes()
        with pytest.raises(errors.BusyError) as exc:
            pymirror.Pair.open(tmp_path / "copy.meta")
        assert "in use by another pair" in str(exc.value) and str(std) in str(exc.value)
        assert (tmp_path / "copy.meta").read_bytes() == before   # nothing written
        with pytest.raises(errors.BusyError) as exc:
            pymirror.Pair.open(meta)                             # the same pair twice
        assert a.state == "split"
        a.write(TRACK, b"still mine")


def test_refused_from_another_process(tmp_path, images):
    std, mir, _ = images
    meta = tmp_path / "p.meta"

    code = (
        "import sys, pymirror\n"
        "from pymirror import errors\n"
        "try:\n"
        "    pymirror.Pair.open(sys.argv[1])\n"
        "except errors.BusyError as e:\n"
        "    print('BUSY', e)\n"
        "    sys.exit(3)\n"
        "print('OPENED')\n"
    )
    with pymirror.Pair.create(meta, std, mir, track_size=TRACK) as a:
        a.establish(assume_equal=True)
        shutil.copy(meta, tmp_path / "copy.meta")
        for m in (meta, tmp_path / "copy.meta"):
            proc = subprocess.run([sys.executable, "-c", code, str(m)], capture_output=True,
                                  text=True, timeout=60, cwd=tmp_path)   # not the source tree
            assert proc.returncode == 3, proc.stdout + proc.stderr
            assert "in use by another pair" in proc.stdout
            assert f"(pid {os.getpid()})" in proc.stdout
    # once closed, the other process may open it
    proc = subprocess.run([sys.executable, "-c", code, str(meta)], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert proc.returncode == 0 and "OPENED" in proc.stdout, proc.stderr
