"""Who may use the data plane: the unix socket's mode and group, set before
the socket appears; TCP only on loopback unless remote clients are allowed."""
from __future__ import annotations

import grp
import importlib.util
import os
import stat
import sys
import threading
from pathlib import Path

import pytest

import pymirror
from pymirror.nbd import NBDServer
from pymirror.nbd import protocol as P

_spec = importlib.util.spec_from_file_location("nbd_util", Path(__file__).with_name("nbd_util.py"))
nbd_util = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("nbd_util", nbd_util)
_spec.loader.exec_module(nbd_util)
connect = nbd_util.connect


@pytest.fixture
def pair():
    p = pymirror.Pair.memory(1 << 20, 64 << 10)
    yield p
    p.close()


def mode_of(path):
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode)
    return stat.S_IMODE(st.st_mode)


def test_default_mode_is_0660_whatever_the_umask(tmp_path, pair):
    old = os.umask(0)                  # a bind under this umask would give 0777
    try:
        path = str(tmp_path / "nbd.sock")
        seen = set()
        stop = threading.Event()

        def watch():                   # the socket is never seen with another mode
            while not stop.is_set():
                try:
                    seen.add(stat.S_IMODE(os.lstat(path).st_mode))
                except FileNotFoundError:
                    pass

        w = threading.Thread(target=watch)
        w.start()
        try:
            server = NBDServer(pair, socket_path=path).start()
        finally:
            stop.set()
            w.join()
    finally:
        os.umask(old)
    try:
        assert mode_of(path) == 0o660
        assert seen <= {0o660}
        assert os.listdir(tmp_path) == ["nbd.sock"]          # no private directory left behind
        c, _, _ = connect(path)
        c.request(P.CMD_READ, 0, 4)
        assert c.reply(4)[0] == 0
    finally:
        server.shutdown()
    assert not os.path.exists(path)


def test_mode_and_group(tmp_path, pair):
    gid = os.getgid()
    name = grp.getgrgid(gid).gr_name
    for i, group in enumerate((gid, name, str(gid))):
        path = str(tmp_path / f"s{i}")
        with NBDServer(socket_path=path, socket_mode=0o600, socket_group=group) as server:
            server.add_pair("p", pair)
            assert mode_of(path) == 0o600
            assert os.lstat(path).st_gid == gid
            connect(path, "p")[0].close()


def test_group_applies_to_a_long_path(tmp_path, pair):
    """A path near the unix socket limit: the private directory next to it
    would not fit in sun_path, so the socket is bound through a short name."""
    deep = tmp_path / ("d" * max(1, 100 - len(str(tmp_path)) - 8))
    deep.mkdir()
    path = str(deep / "n.sock")
    assert 100 <= len(path) <= 107
    with NBDServer(pair, socket_path=path, socket_group=os.getgid()) as server:
        assert mode_of(path) == 0o660 and os.lstat(path).st_gid == os.getgid()
        assert os.listdir(deep) == ["n.sock"]
        connect(server.socket_path)[0].close()


def test_bad_modes_and_groups_are_refused(tmp_path, pair):
    path = str(tmp_path / "s")
    with pytest.raises(ValueError, match="no group named"):
        NBDServer(pair, socket_path=path, socket_group="no-such-group-pymirror")
    with pytest.raises(ValueError, match="0..0o777"):
        NBDServer(pair, socket_path=path, socket_mode=0o1777)
    with pytest.raises(ValueError, match="0..0o777"):
        NBDServer(pair, socket_path=path, socket_mode="660")
    with pytest.raises(ValueError, match="applies to a unix socket"):
        NBDServer(pair, port=0, socket_group=os.getgid())
    with pytest.raises(TypeError):
        NBDServer(pair, socket_path=path, socket_group=1.5)
    assert not os.path.exists(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may give a socket to a group it is not in")
def test_a_group_root_does_not_belong_to(tmp_path, pair):
    other = next((g for g in grp.getgrall() if g.gr_gid != os.getgid()), None)
    if other is None:
        pytest.skip("no other group on this system")
    path = str(tmp_path / "s")
    with NBDServer(pair, socket_path=path, socket_group=other.gr_name):
        assert os.lstat(path).st_gid == other.gr_gid


@pytest.mark.skipif(os.geteuid() == 0, reason="root may chown to any group")
def test_a_group_we_do_not_belong_to_is_refused(tmp_path, pair):
    mine = set(os.getgroups()) | {os.getgid()}
    other = next((g for g in grp.getgrall() if g.gr_gid not in mine), None)
    if other is None:
        pytest.skip("this user belongs to every group")
    path = str(tmp_path / "s")
    with pytest.raises(PermissionError, match="group"):
        NBDServer(pair, socket_path=path, socket_group=other.gr_gid).start()
    assert os.listdir(tmp_path) == []                           # nothing left behind


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.1", "::", "example.com"])
def test_a_remote_address_needs_allow_remote(pair, host):
    with pytest.raises(ValueError) as e:
        NBDServer(pair, host=host, port=0)
    msg = str(e.value)
    assert f"refusing to serve on {host}" in msg and "not a loopback address" in msg
    assert "allow_remote" in msg and "\n" not in msg
    NBDServer(host=host, port=0, allow_remote=True)             # allowed (not started)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1"])
def test_loopback_addresses_need_nothing(pair, host):
    with NBDServer(host=host, port=0) as server:
        server.add_pair("p", pair)
        address = ("127.0.0.1" if host == "localhost" else host, server.port)
        c, _, _ = connect(address, "p")
        c.request(P.CMD_READ, 0, 4)
        assert c.reply(4)[0] == 0
        c.close()


def test_a_live_socket_is_not_replaced_and_a_stale_one_is(tmp_path, pair):
    path = str(tmp_path / "s")
    with NBDServer(pair, socket_path=path):
        ino = os.lstat(path).st_ino
        with pytest.raises(OSError, match="another server is listening"):
            NBDServer(pair, socket_path=path).start()
        assert os.lstat(path).st_ino == ino
        # a second server that took over the path is not unlinked by the first one's shutdown
    assert not os.path.exists(path)
    first = NBDServer(pair, socket_path=path).start()
    os.unlink(path)
    second = NBDServer(pair, socket_path=path).start()
    first.shutdown()
    assert os.path.exists(path)                                   # not first's file: left alone
    connect(path)[0].close()
    second.shutdown()
    assert not os.path.exists(path)
