"""RBD URIs, the missing-library error and the absence of a link-time
dependency on Ceph.  No cluster needed."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import pymirror
from pymirror import errors
from pymirror.volume_rbd import QUERY_KEYS, RbdURI, parse

NEUTRAL = tempfile.gettempdir()


def test_parse_full_uri():
    u = parse("rbd:vms/disk-1@snap.2?conf=/etc/ceph/x.conf&id=backup&cluster=east&qd=16&timeout=5")
    assert (u.pool, u.image, u.snap) == ("vms", "disk-1", "snap.2")
    assert (u.conf, u.id, u.cluster, u.qd, u.timeout) == ("/etc/ceph/x.conf", "backup", "east", 16, 5)
    assert u.short == "rbd:vms/disk-1@snap.2"
    assert parse(str(u)) == u


def test_parse_defaults():
    u = parse("rbd:rbd/img")
    assert u == RbdURI("rbd", "img")
    assert (u.qd, u.timeout, u.snap, u.conf) == (0, 0, None, None)
    assert str(u) == "rbd:rbd/img"


def test_percent_encoded_conf_path():
    u = parse("rbd:p/i?conf=/tmp/a%20b/ceph.conf")
    assert u.conf == "/tmp/a b/ceph.conf"
    assert parse(str(u)).conf == "/tmp/a b/ceph.conf"


@pytest.mark.parametrize("uri, words", [
    ("rbd:", "pool and an image"),
    ("rbd:pool", "pool and an image"),
    ("rbd:pool/", "pool and an image"),
    ("rbd:/image", "pool and an image"),
    ("rbd://pool/image", "without '//'"),
    ("rbd:p/i@", "bad snapshot name"),
    ("rbd:p/a/b", "bad image name"),
    ("rbd:p/i?qd=0", "qd=0 must be a whole number from 1 to 256"),
    ("rbd:p/i?qd=257", "from 1 to 256"),
    ("rbd:p/i?qd=x", "must be a whole number"),
    ("rbd:p/i?timeout=0", "timeout=0"),
    ("rbd:p/i?timeout=86401", "from 1 to 86400"),
    ("rbd:p/i?user=x", "unknown option 'user'"),
    ("rbd:p/i?id=a&id=b", "given twice"),
    ("rbd:p/i?conf=", "has no value"),
    ("/tmp/x.img", "not an RBD URI"),
])
def test_bad_uris_are_one_line_errors(uri, words):
    with pytest.raises(ValueError) as ei:
        parse(uri)
    msg = str(ei.value)
    assert words in msg and "\n" not in msg


_name = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=12)


@given(pool=_name, image=_name, snap=st.none() | _name,
       opts=st.dictionaries(st.sampled_from(QUERY_KEYS), st.integers(1, 256), max_size=5))
def test_uri_round_trip(pool, image, snap, opts):
    q = "&".join(f"{k}={v}" for k, v in opts.items())
    text = f"rbd:{pool}/{image}" + (f"@{snap}" if snap else "") + (f"?{q}" if q else "")
    u = parse(text)
    assert (u.pool, u.image, u.snap) == (pool, image, snap)
    assert u.qd == opts.get("qd", 0) and u.timeout == opts.get("timeout", 0)
    assert u.id == (str(opts["id"]) if "id" in opts else None)
    assert str(u) == text
    assert parse(str(u)) == u


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=NEUTRAL, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=60)


def test_missing_librbd_is_a_one_line_error_naming_the_package():
    code = ("import pymirror\n"
            "from pymirror.volume_rbd import open_rbd, available\n"
            "assert not available()\n"
            "try:\n"
            "    open_rbd('rbd:rbd/x?timeout=1')\n"
            "except pymirror.errors.MissingLibraryError as e:\n"
            "    print(type(e).__name__, '|', e)\n")
    p = _run_python(code, PYMIRROR_LIBRBD="/nonexistent/librbd.so.1")
    assert p.returncode == 0, p.stderr
    name, _, msg = p.stdout.strip().partition(" | ")
    assert name == "MissingLibraryError"
    assert "librbd1" in msg and "rbd:rbd/x" in msg and "\n" not in msg


def test_missing_librbd_in_the_cli(tmp_path):
    p = subprocess.run([sys.executable, "-m", "pymirror", "create", "rbd:rbd/x", "--size", "1M"], cwd=NEUTRAL,
                       capture_output=True, text=True, env={**os.environ, "PYMIRROR_LIBRBD": "/nonexistent.so"},
                       timeout=60)
    assert p.returncode == 2
    assert "librbd1" in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(shutil.which("readelf") is None, reason="readelf (binutils) not installed")
def test_no_link_time_dependency_on_ceph():
    pkg = Path(pymirror.__file__).parent
    libs = list(pkg.glob("_core*.so")) + list((pkg / "lib").glob("libpymirror.so.*"))
    assert len(libs) >= 2, libs
    for lib in libs:
        out = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True, check=True).stdout
        needed = [ln for ln in out.splitlines() if "NEEDED" in ln]
        assert needed, lib
        assert not any("rbd" in ln or "rados" in ln for ln in needed), (lib, needed)


def test_bad_rbd_config_from_c():
    from pymirror._native import ffi, lib
    cfg = ffi.new("struct pm_rbd_config *")
    out = ffi.new("pm_store **")
    cfg.size = ffi.sizeof("struct pm_rbd_config")
    assert lib.pm_store_open_rbd(cfg, ffi.NULL, 0, out) == -22       # no pool, no image
    assert out[0] == ffi.NULL
    cfg.size = 3
    assert lib.pm_store_open_rbd(cfg, ffi.NULL, 0, out) == -22
    assert lib.pm_store_open_rbd(ffi.NULL, ffi.NULL, 0, out) == -22
    assert lib.pm_rbd_create(ffi.NULL, 1 << 20) < 0


def test_create_refuses_bad_size_and_snapshot():
    from pymirror.volume_rbd import create_image
    with pytest.raises(errors.GeometryError):
        create_image("rbd:p/i", 0)
    with pytest.raises(ValueError, match="snapshot"):
        create_image("rbd:p/i@s", 1 << 20)
