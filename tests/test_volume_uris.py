"""Volume URIs (pymirror/uri.py, csrc/store_uri.c): the forms, their one-line
errors, relative paths, the rbd: hook without its module, a property test of
pymirror's own NBD parameters against a plain model (Python and C agree),
and the command line naming volumes by URI (``pair``, ``query``)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import pymirror
import pymirror.uri as uri_mod
from pymirror import errors

sys.path.insert(0, str(Path(__file__).parent))   # tests/ has no __init__.py
from cli_util import one_line_error, run  # noqa: E402
from volume_kinds import KINDS, require_remote  # noqa: E402

SIZE = 4 << 20
PKG = Path(pymirror.__file__).parent


@pytest.fixture
def qnbd(tmp_path):
    require_remote()
    b = KINDS["qemu-nbd"](tmp_path, "vol", SIZE)
    yield b
    b.close()


# -- URIs ------------------------------------------------------------------------
@pytest.mark.parametrize("text, kind, canonical", [
    ("/a/b.img", "file", "/a/b.img"),
    ("file:/a/b.img", "file", "/a/b.img"),
    ("file:///a/b%20c.img", "file", "/a/b c.img"),
    ("file://localhost/a/b.img", "file", "/a/b.img"),
    ("/a/odd:name.img", "file", "/a/odd:name.img"),
    ("nbd://example.com/disk", "nbd", "nbd://example.com/disk"),
    ("nbd://example.com:10809/disk?qd=16&conns=2", "nbd", "nbd://example.com:10809/disk?qd=16&conns=2"),
    ("nbd+unix:///disk?socket=/run/x.sock", "nbd", "nbd+unix:///disk?socket=/run/x.sock"),
    ("nbds+unix:///?socket=/run/x.sock&timeout=0", "nbd", "nbds+unix:///?socket=/run/x.sock&timeout=0"),
    ("rbd:pool/image", "rbd", "rbd:pool/image"),
    ("rbd:pool/image@snap?conf=/etc/ceph/ceph.conf&id=admin", "rbd",
     "rbd:pool/image@snap?conf=/etc/ceph/ceph.conf&id=admin"),
])
def test_uri_forms(text, kind, canonical):
    u = uri_mod.parse(text)
    assert (u.kind, u.text) == (kind, canonical)
    assert u.remote == (kind != "file")


def test_relative_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert uri_mod.parse("v.img").text == str(tmp_path / "v.img")
    assert uri_mod.parse("file:v.img").text == str(tmp_path / "v.img")
    assert uri_mod.parse(Path("v.img")).path == str(tmp_path / "v.img")


@pytest.mark.parametrize("text, message", [
    ("nbd+unix:///disk", "needs ?socket=PATH"),
    ("nbd+unix://host/disk?socket=/x", "has no host"),
    ("nbd:///disk", "needs a host"),
    ("nbd://h:99999/disk", "port"),
    ("nbd://h/disk?qd=0", "qd=0 must be a whole number from 1 to 64"),
    ("nbd://h/disk?qd=abc", "qd=abc"),
    ("nbd://h/disk?conns=17", "conns=17"),
    ("nbd://h/disk?qd=2&qd=3", "qd= is given twice"),
    ("rbd:pool", "rbd:POOL/IMAGE"),
    ("rbd:pool/", "rbd:POOL/IMAGE"),
    ("ftp://h/x", "unknown volume scheme 'ftp'"),
    ("file://otherhost/x", "local file"),
    ("", "empty"),
])
def test_bad_uris_are_one_clear_error(text, message):
    with pytest.raises(uri_mod.VolumeURIError, match=message.replace("?", r"\?")):
        uri_mod.parse(text)


def test_rbd_without_its_module_is_a_clear_error():
    if (PKG / "volume_rbd.py").exists():
        pytest.skip("this build has RBD volumes")
    with pytest.raises(errors.MissingLibraryError, match="volume_rbd"):
        pymirror.Volume.open("rbd:pool/image")


def test_an_nbd_export_cannot_be_created():
    with pytest.raises(uri_mod.VolumeURIError, match="server makes it"):
        pymirror.Volume.create("nbd://localhost/x", 1 << 20)


# -- a property: pymirror's parameters against a plain model ----------------------
_param = st.tuples(st.sampled_from(["qd", "conns", "timeout", "tls", "x"]),
                   st.one_of(st.integers(-5, 100000).map(str), st.sampled_from(["", "abc", "1x", "08"])))


@given(st.lists(_param, max_size=5))
def test_nbd_parameters_accepted_exactly_when_the_model_says(params):
    query = "&".join(f"{k}={v}" for k, v in params)
    text = "nbd+unix:///disk?socket=/run/s.sock" + ("&" + query if query else "")
    # the model: each of pymirror's keys at most once, a whole number in its range
    ok, seen = True, set()
    for key, value in params:
        if key in uri_mod.NBD_PARAMS:
            lo, hi = uri_mod.NBD_PARAMS[key]
            if key in seen or not value.isdigit() or not lo <= int(value) <= hi:
                ok = False
            seen.add(key)
    if ok:
        assert uri_mod.parse(text).text == text
    else:
        with pytest.raises(uri_mod.VolumeURIError):
            uri_mod.parse(text)
    # the C parser (store_uri.c) agrees: a bad parameter fails before any
    # connection is tried; a good one gets as far as connecting (no server)
    from pymirror._native import ffi, lib

    out = ffi.new("pm_store **")
    rc = lib.pm_store_open_nbd(text.replace("/run/s.sock", "/nonexistent/pm.sock").encode(), 0, out)
    msg = ffi.string(lib.pm_last_error()).decode()
    assert rc < 0 and out[0] == ffi.NULL
    assert ("cannot connect" in msg) == ok, msg



# -- the command line ------------------------------------------------------------------
def test_cli_pair_and_query_with_uris(tmp_path, qnbd):
    (tmp_path / "std.img").write_bytes(b"\0" * SIZE)
    run("pair", tmp_path / "p.meta", "--standard", tmp_path / "std.img", "--mirror", qnbd.uri)
    q = json.loads(run("query", tmp_path / "p.meta", "--json").stdout)
    assert q["mirror"]["path"] == qnbd.uri and q["mirror"]["kind"] == "nbd"
    assert q["mirror"]["detects_outside_changes"] is False
    assert q["standard"]["kind"] == "file" and q["standard"]["detects_outside_changes"] is True
    text = run("query", tmp_path / "p.meta").stdout
    assert "writes made to it outside pymirror cannot be detected" in text
    run("establish", tmp_path / "p.meta")
    assert json.loads(run("query", tmp_path / "p.meta", "--json").stdout)["state"] == "established"
    proc = run("pair", tmp_path / "q.meta", "--standard", tmp_path / "std.img", "--mirror", "nbd+unix:///x",
               check=False)
    assert "needs ?socket=PATH" in one_line_error(proc, 2)
    assert not (tmp_path / "q.meta").exists()
