"""TLS on the NBD export (pymirror/nbd/tls.py, csrc/nbd_tls.c): x509 and
PSK with qemu-img, nbdcopy, nbdinfo and libnbd; a wrong CA and a wrong key
refused with the client's own error; ``require`` refusing a plain client;
``on`` serving both; GnuTLS loaded at run time only; the C loop over TLS:
a short reply in one record, cold reads at queue depth 1 on one thread."""
from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import pymirror
from pymirror import errors
from pymirror.nbd import NBDServer
from pymirror.nbd import protocol as P
from pymirror.nbd import tls as T

_spec = importlib.util.spec_from_file_location("nbd_util", Path(__file__).with_name("nbd_util.py"))
nbd_util = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("nbd_util", nbd_util)
_spec.loader.exec_module(nbd_util)
_spec = importlib.util.spec_from_file_location("pagecache", Path(__file__).with_name("pagecache.py"))
pagecache = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("pagecache", pagecache)
_spec.loader.exec_module(pagecache)
RawClient = nbd_util.RawClient
need = nbd_util.need
nbd_util.CLIENTS.setdefault("certtool", "gnutls-bin")
nbd_util.CLIENTS.setdefault("psktool", "gnutls-bin")

SIZE = 8 << 20
TRACK = 64 << 10


def _run(*args, **kw):
    return subprocess.run(args, capture_output=True, text=True, timeout=60, **kw)


def _ca(d: Path, name: str) -> tuple[Path, Path]:
    d.mkdir(parents=True, exist_ok=True)
    key, cert = d / "ca-key.pem", d / "ca-cert.pem"
    (d / "ca.info").write_text(f"cn = {name}\nca\ncert_signing_key\ncrl_signing_key\nexpiration_days = 30\n")
    assert _run("certtool", "--generate-privkey", "--outfile", str(key)).returncode == 0
    assert _run("certtool", "--generate-self-signed", "--load-privkey", str(key), "--template",
                str(d / "ca.info"), "--outfile", str(cert)).returncode == 0
    return key, cert


def _signed(root: Path, d: Path, kind: str, template: str, ca: tuple[Path, Path]) -> Path:
    """d/KIND-key.pem and d/KIND-cert.pem, signed by ca (key, cert)."""
    (root / f"{kind}.info").write_text(template)
    key, cert = d / f"{kind}-key.pem", d / f"{kind}-cert.pem"
    assert _run("certtool", "--generate-privkey", "--outfile", str(key)).returncode == 0
    assert _run("certtool", "--generate-certificate", "--load-ca-certificate", str(ca[1]), "--load-ca-privkey",
                str(ca[0]), "--load-privkey", str(key), "--template", str(root / f"{kind}.info"),
                "--outfile", str(cert)).returncode == 0
    return cert


SERVER_INFO = ("organization = pymirror tests\ncn = localhost\ndns_name = localhost\nip_address = 127.0.0.1\n"
               "tls_www_server\nencryption_key\nsigning_key\nexpiration_days = 30\n")
CLIENT_INFO = "organization = pymirror tests\ncn = alice\ntls_www_client\nencryption_key\nsigning_key\n" \
              "expiration_days = 30\n"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """certs/ (the server's directory), client/ (its CA only: no client
    certificate), wrong/ (another CA's), alice.psk, wrong.psk (alice with
    another key); for client certificates: goodcert/ (our CA and a client
    certificate it signed), foreigncert/ (our CA, a client certificate
    another CA signed), revokedcert/ (signed by our CA, then revoked) and
    certs-crl/ (the server's directory with ca-crl.pem revoking it)."""
    need("certtool")
    need("psktool")
    root = tmp_path_factory.mktemp("pki")
    ca = _ca(root / "ca", "pymirror test CA")
    other = _ca(root / "otherca", "another CA")
    certs = root / "certs"
    certs.mkdir()
    shutil.copy(ca[1], certs / "ca-cert.pem")
    _signed(root, certs, "server", SERVER_INFO, ca)
    for name, src in (("client", ca[1]), ("wrong", other[1])):
        (root / name).mkdir()
        shutil.copy(src, root / name / "ca-cert.pem")
    for name, signer in (("goodcert", ca), ("foreigncert", other), ("revokedcert", ca)):
        (root / name).mkdir()
        shutil.copy(ca[1], root / name / "ca-cert.pem")          # the client trusts our server
        _signed(root, root / name, "client", CLIENT_INFO, signer)
    shutil.copytree(certs, root / "certs-crl")
    (root / "crl.info").write_text("crl_next_update = 30\ncrl_number = 1\n")
    assert _run("certtool", "--generate-crl", "--load-ca-privkey", str(ca[0]), "--load-ca-certificate", str(ca[1]),
                "--load-certificate", str(root / "revokedcert" / "client-cert.pem"), "--template",
                str(root / "crl.info"), "--outfile", str(root / "certs-crl" / "ca-crl.pem")).returncode == 0
    for name in ("alice", "wrong"):
        (root / f"{name}psk").mkdir()
        assert _run("psktool", "-u", "alice", "-p", str(root / f"{name}psk" / "keys.psk")).returncode == 0
    return root


@pytest.fixture
def pair():
    p = pymirror.Pair.memory(SIZE, TRACK)
    p.write(0, b"over TLS" + bytes(4088))
    yield p
    p.close()


def served(pair, tmp_path, pki, kind, mode="require"):
    kw = dict(tls_certs=str(pki / "certs")) if kind == "x509" else dict(tls_psk=str(pki / "alicepsk" / "keys.psk"))
    return NBDServer(pair, socket_path=str(tmp_path / "s"), tls=mode, **kw).start()


def uri(server, pki, kind, who="client"):
    base = f"nbds+unix:///?socket={server.socket_path}"
    if kind == "x509":
        return base + f"&tls-certificates={pki / who}"
    return f"nbds+unix://alice@/?socket={server.socket_path}&tls-psk-file={pki / (who + 'psk') / 'keys.psk'}"


@pytest.mark.parametrize("kind", ["x509", "psk"])
def test_nbdinfo_nbdcopy_and_libnbd_over_tls(pair, tmp_path, pki, kind):
    need("nbdinfo")
    need("nbdcopy")
    server = served(pair, tmp_path, pki, kind)
    try:
        u = uri(server, pki, kind, "client" if kind == "x509" else "alice")
        out = _run("nbdinfo", u)
        assert out.returncode == 0, out.stderr
        assert "with TLS" in out.stdout and "export-size: 8388608" in out.stdout
        data = os.urandom(SIZE)
        (tmp_path / "in.img").write_bytes(data)
        assert _run("nbdcopy", str(tmp_path / "in.img"), u).returncode == 0
        got = _run("nbdcopy", u, str(tmp_path / "out.img"))
        assert got.returncode == 0, got.stderr
        assert (tmp_path / "out.img").read_bytes() == data == pair.read(0, SIZE)
        nbd = nbd_util.libnbd()
        h = nbd.NBD()
        h.set_tls(nbd.TLS_REQUIRE)
        if kind == "x509":
            h.set_tls_certificates(str(pki / "client"))
        else:
            h.set_tls_psk_file(str(pki / "alicepsk" / "keys.psk"))
            h.set_tls_username("alice")
        h.connect_unix(server.socket_path)
        assert h.get_tls_negotiated() and h.get_structured_replies_negotiated()
        h.pwrite(b"libnbd", 12345, nbd.CMD_FLAG_FUA)
        assert h.pread(6, 12345) == b"libnbd"
        big = os.urandom(5 << 20)                           # streamed in pieces, through TLS
        h.pwrite(big, 1 << 20)
        assert h.pread(len(big), 1 << 20) == big
        h.shutdown()
    finally:
        server.shutdown()


@pytest.mark.parametrize("kind", ["x509", "psk"])
def test_qemu_img_over_tls(pair, tmp_path, pki, kind):
    need("qemu-img")
    server = served(pair, tmp_path, pki, kind)
    try:
        if kind == "x509":
            obj = f"tls-creds-x509,id=tls0,endpoint=client,dir={pki / 'client'}"
        else:
            obj = f"tls-creds-psk,id=tls0,endpoint=client,dir={pki / 'alicepsk'},username=alice"
        img = f"driver=nbd,server.type=unix,server.path={server.socket_path},tls-creds=tls0"
        if kind == "x509":
            img += ",tls-hostname=localhost"                   # a unix socket names no host
        out = _run("qemu-img", "convert", "--object", obj, "--image-opts", img, "-O", "raw",
                   str(tmp_path / "copy.img"))
        assert out.returncode == 0, out.stderr
        assert (tmp_path / "copy.img").read_bytes() == pair.read(0, SIZE)
    finally:
        server.shutdown()


@pytest.mark.parametrize("kind", ["x509", "psk"])
def test_a_wrong_ca_or_key_is_refused(pair, tmp_path, pki, kind):
    need("nbdinfo")
    if kind == "psk":
        server = served(pair, tmp_path, pki, kind)
        wrong, right = uri(server, pki, kind, "wrong"), uri(server, pki, kind, "alice")
    else:
        # over TCP, where libnbd checks the certificate (on a unix socket it
        # has no host name to check against and takes any certificate)
        server = NBDServer(pair, port=0, tls="require", tls_certs=str(pki / "certs")).start()
        base = f"nbds://localhost:{server.port}/?tls-certificates="
        wrong, right = base + str(pki / "wrong"), base + str(pki / "client")
    try:
        out = _run("nbdinfo", "--size", wrong)
        assert out.returncode != 0
        assert ("certificate" in out.stderr.lower() if kind == "x509" else "gnutls_handshake" in out.stderr), \
            out.stderr
        if kind == "x509" and shutil.which("qemu-img"):
            q = _run("qemu-img", "info", "--object", f"tls-creds-x509,id=tls0,endpoint=client,dir={pki / 'wrong'}",
                     "--image-opts", f"driver=nbd,server.type=inet,server.host=localhost,"
                     f"server.port={server.port},tls-creds=tls0")
            assert q.returncode != 0 and "certificate" in q.stderr.lower(), q.stderr
        assert pair.read(0, 8) == b"over TLS"
        # the server goes on: a right client still gets in
        ok = _run("nbdinfo", "--size", right)
        assert ok.returncode == 0 and ok.stdout.strip() == str(SIZE), ok.stderr
    finally:
        server.shutdown()


def _verifying(pair, tmp_path, pki, certs="certs", **kw):
    events = []
    server = NBDServer(pair, socket_path=str(tmp_path / "s"), tls="require", tls_certs=str(pki / certs),
                       tls_verify_peer=True, on_event=lambda kind, data: events.append((kind, data)), **kw)
    return server.start(), events


def test_verify_peer_with_nbdinfo_nbdcopy_and_libnbd(pair, tmp_path, pki, caplog):
    """--tls-verify-peer: a client certificate signed by ca-cert.pem's CA is
    accepted (libnbd reads client-cert.pem/client-key.pem from its
    tls-certificates directory); none, or one from another CA, is refused
    with the client's own error, and the server goes on."""
    need("nbdinfo")
    need("nbdcopy")
    server, events = _verifying(pair, tmp_path, pki)
    try:
        ok = _run("nbdinfo", uri(server, pki, "x509", "goodcert"))
        assert ok.returncode == 0 and "with TLS" in ok.stdout, ok.stderr
        data = os.urandom(SIZE)
        (tmp_path / "in.img").write_bytes(data)
        assert _run("nbdcopy", str(tmp_path / "in.img"), uri(server, pki, "x509", "goodcert")).returncode == 0
        assert pair.read(0, SIZE) == data
        connected = [d for k, d in events if k == "client-connected"]
        assert connected and connected[-1]["tls"] == "x509" and "CN=alice" in connected[-1]["tls_user"]
        for who in ("client", "foreigncert"):                  # no certificate; another CA's
            out = _run("nbdinfo", "--size", uri(server, pki, "x509", who))
            assert out.returncode != 0 and "nbdinfo:" in out.stderr, out.stderr
            refused = _run("nbdcopy", uri(server, pki, "x509", who), str(tmp_path / "out.img"))
            assert refused.returncode != 0 and refused.stderr, refused.stderr
        assert "no certificate signed by the CA of ca-cert.pem" in caplog.text
        assert pair.read(0, SIZE) == data
        nbd = nbd_util.libnbd()
        h = nbd.NBD()
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_certificates(str(pki / "client"))
        with pytest.raises(nbd.Error):
            h.connect_unix(server.socket_path)
        h = nbd.NBD()
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_certificates(str(pki / "goodcert"))
        h.connect_unix(server.socket_path)
        assert h.pread(SIZE, 0) == data
        h.shutdown()
    finally:
        server.shutdown()


def test_verify_peer_with_qemu_img(pair, tmp_path, pki):
    """qemu's tls-creds-x509 endpoint=client sends client-cert.pem from its
    dir: accepted; without one the handshake fails and qemu-img says so."""
    need("qemu-img")
    server, _ = _verifying(pair, tmp_path, pki)
    try:
        def info(who):
            return _run("qemu-img", "info", "--object", f"tls-creds-x509,id=tls0,endpoint=client,dir={pki / who}",
                        "--image-opts", f"driver=nbd,server.type=unix,server.path={server.socket_path},"
                        "tls-creds=tls0,tls-hostname=localhost")
        ok = info("goodcert")
        assert ok.returncode == 0 and "8 MiB" in ok.stdout, ok.stderr
        for who in ("client", "foreigncert"):
            out = info(who)
            # qemu checks its own certificate too: a foreign one fails before connecting
            assert out.returncode != 0 and "qemu-img:" in out.stderr, out.stderr
        out = _run("qemu-img", "convert", "--object",
                   f"tls-creds-x509,id=tls0,endpoint=client,dir={pki / 'goodcert'}", "--image-opts",
                   f"driver=nbd,server.type=unix,server.path={server.socket_path},tls-creds=tls0,"
                   "tls-hostname=localhost", "-O", "raw", str(tmp_path / "copy.img"))
        assert out.returncode == 0, out.stderr
        assert (tmp_path / "copy.img").read_bytes() == pair.read(0, SIZE)
    finally:
        server.shutdown()


def _ssl_client(server, pki, who):
    """A raw client upgraded with Python's ssl (OpenSSL sends its certificate
    whatever CA the server names, so the server's own check is what refuses)."""
    import ssl

    c = RawClient(server.socket_path)
    c.greet()
    c.option(P.OPT_STARTTLS)
    assert c.opt_replies()[-1][0] == P.REP_ACK
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(pki / "client" / "ca-cert.pem"))
    if who is not None:
        ctx.load_cert_chain(str(pki / who / "client-cert.pem"), str(pki / who / "client-key.pem"))
    c.sock = ctx.wrap_socket(c.sock, server_hostname="localhost")
    return c


@pytest.mark.parametrize("who,certs,why", [
    ("foreigncert", "certs", "not signed by the CA in ca-cert.pem"),
    ("revokedcert", "certs-crl", "revoked (ca-crl.pem)"),
    (None, "certs", "no certificate"),
])
def test_verify_peer_refuses_what_the_server_checks(pair, tmp_path, pki, caplog, who, certs, why):
    server, _ = _verifying(pair, tmp_path, pki, certs)
    try:
        with pytest.raises((OSError, ConnectionError)):       # ssl.SSLError is an OSError
            c = _ssl_client(server, pki, who)
            c.go("")                        # TLS 1.3: the refusal arrives after the client's Finished
        deadline = time.monotonic() + 10
        while why not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
        assert why in caplog.text
        good = _ssl_client(server, pki, "goodcert")            # the server goes on
        assert good.go("")[P.INFO_EXPORT][0] == SIZE
        good.sock.close()
    finally:
        server.shutdown()
    if certs == "certs-crl":                # without ca-crl.pem, the same certificate is accepted
        server, _ = _verifying(pair, tmp_path, pki, "certs")
        try:
            c = _ssl_client(server, pki, who)
            assert c.go("")[P.INFO_EXPORT][0] == SIZE
            c.sock.close()
        finally:
            server.shutdown()


def test_verify_peer_bad_settings(pair, tmp_path, pki):
    s = str(tmp_path / "s")
    with pytest.raises(ValueError, match="--tls-verify-peer needs --tls=on or --tls=require"):
        NBDServer(pair, socket_path=s, tls_verify_peer=True)
    with pytest.raises(ValueError, match="needs --tls-certs DIR, not --tls-psk"):
        NBDServer(pair, socket_path=s, tls="require", tls_psk=str(pki / "alicepsk" / "keys.psk"),
                  tls_verify_peer=True)
    noca = tmp_path / "noca"
    shutil.copytree(pki / "certs", noca)
    (noca / "ca-cert.pem").unlink()
    NBDServer(pair, socket_path=s, tls="require", tls_certs=str(noca))        # fine without verification
    with pytest.raises(OSError, match="CA certificate that client certificates are checked against"):
        NBDServer(pair, socket_path=s, tls="require", tls_certs=str(noca), tls_verify_peer=True)
    (noca / "ca-cert.pem").write_text("")
    with pytest.raises(OSError, match="holds no certificate"):
        NBDServer(pair, socket_path=s, tls="require", tls_certs=str(noca), tls_verify_peer=True)
    shutil.copy(pki / "certs" / "ca-cert.pem", noca / "ca-cert.pem")
    (noca / "ca-crl.pem").write_text("not a CRL\n")
    with pytest.raises(OSError, match="not a usable certificate revocation list"):
        NBDServer(pair, socket_path=s, tls="require", tls_certs=str(noca), tls_verify_peer=True)
    assert not os.path.exists(s)


def test_require_refuses_a_plain_client_and_on_serves_both(pair, tmp_path, pki):
    need("nbdinfo")
    server = served(pair, tmp_path, pki, "x509", "require")
    try:
        out = _run("nbdinfo", "--size", f"nbd+unix:///?socket={server.socket_path}")
        assert out.returncode != 0 and "requires TLS" in out.stderr, out.stderr
        c = RawClient(server.socket_path)
        c.greet()
        for opt in (P.OPT_LIST, P.OPT_STRUCTURED_REPLY, P.OPT_GO):
            c.option(opt, RawClient.info_request("") if opt == P.OPT_GO else b"")
            rtype, text = c.opt_replies()[-1]
            assert rtype == T.REP_ERR_TLS_REQD and b"STARTTLS" in text
        c.option(P.OPT_STARTTLS, b"junk")                  # malformed: refused, still plain
        assert c.opt_replies()[-1][0] == P.REP_ERR_INVALID
        c.option(P.OPT_EXPORT_NAME, b"")                   # cannot be refused: the connection closes
        assert c.closed()
    finally:
        server.shutdown()
    server = served(pair, tmp_path, pki, "x509", "on")
    try:
        plain = _run("nbdinfo", "--size", f"nbd+unix:///?socket={server.socket_path}")
        secure = _run("nbdinfo", uri(server, pki, "x509"))
        assert plain.returncode == 0 and plain.stdout.strip() == str(SIZE)
        assert secure.returncode == 0 and "with TLS" in secure.stdout
    finally:
        server.shutdown()
    # off: STARTTLS is not offered
    with NBDServer(pair, socket_path=str(tmp_path / "s")) as server:
        c = RawClient(server.socket_path)
        c.greet()
        c.option(P.OPT_STARTTLS)
        assert c.opt_replies()[-1][0] == P.REP_ERR_UNSUP


def test_bad_tls_settings_fail_at_once(pair, tmp_path, pki):
    s = str(tmp_path / "s")
    with pytest.raises(ValueError, match="needs either --tls-certs"):
        NBDServer(pair, socket_path=s, tls="on")
    with pytest.raises(ValueError, match="need --tls=on"):
        NBDServer(pair, socket_path=s, tls_certs=str(pki / "certs"))
    with pytest.raises(ValueError, match="one of off, on, require"):
        NBDServer(pair, socket_path=s, tls="yes", tls_certs=str(pki / "certs"))
    with pytest.raises(OSError, match="server certificate"):
        NBDServer(pair, socket_path=s, tls="on", tls_certs=str(pki / "client"))      # no server-cert.pem
    (tmp_path / "bad.psk").write_text("alice:nothex\n")
    with pytest.raises(OSError, match="not a psktool line"):
        NBDServer(pair, socket_path=s, tls="on", tls_psk=str(tmp_path / "bad.psk"))
    warned = NBDServer(pair, host="0.0.0.0", port=0, allow_remote=True)
    assert warned.tls_warning and "without TLS" in warned.tls_warning
    assert NBDServer(pair, host="0.0.0.0", port=0, allow_remote=True, tls="require",
                     tls_certs=str(pki / "certs")).tls_warning is None


def test_gnutls_is_loaded_at_run_time_only(tmp_path, pki):
    """No link-time dependency; a missing library is a one-line
    MissingLibraryError naming the Debian package."""
    lib_dir = Path(pymirror.__file__).parent / "lib"
    libs = list(lib_dir.glob("libpymirror.so.*")) + list(Path(pymirror.__file__).parent.glob("_core*.so"))
    assert libs
    if shutil.which("readelf"):
        for so in libs:
            needed = _run("readelf", "-d", str(so)).stdout
            assert "gnutls" not in needed, so
    code = ("import pymirror\nfrom pymirror.nbd import NBDServer\n"
            f"NBDServer(pymirror.Pair.memory(1 << 20, 65536), socket_path={str(tmp_path / 's')!r}, "
            f"tls='on', tls_certs={str(pki / 'certs')!r})\n")
    env = dict(os.environ, PYMIRROR_GNUTLS="libgnutls-does-not-exist.so.30")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=str(tmp_path),
                         timeout=60)
    assert out.returncode != 0
    assert "MissingLibraryError" in out.stderr and "libgnutls30" in out.stderr
    assert issubclass(errors.MissingLibraryError, Exception)


def test_the_serve_command_with_tls(tmp_path, pki):
    """`pymirror serve --tls=require --tls-psk FILE` end to end; a bad
    setting is a one-line error with exit status 2."""
    need("nbdinfo")
    env = dict(os.environ)
    run = functools.partial(subprocess.run, capture_output=True, text=True, cwd=str(tmp_path), env=env, timeout=60)
    pm = [sys.executable, "-m", "pymirror"]
    for name in ("std.img", "mir.img"):
        assert run(pm + ["create", name, "--size", "8M"]).returncode == 0
    assert run(pm + ["pair", "pair.meta", "--standard", "std.img", "--mirror", "mir.img"]).returncode == 0
    bad = run(pm + ["serve", "pair.meta", "--socket", "s.sock", "--tls-psk", str(pki / "alicepsk" / "keys.psk")])
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--tls=on" in bad.stderr
    sock = tmp_path / "s.sock"
    proc = subprocess.Popen(pm + ["serve", "pair.meta", "--socket", str(sock), "--tls=require",
                                 "--tls-psk", str(pki / "alicepsk" / "keys.psk")], cwd=str(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.05)
        ok = run(["nbdinfo", "--size", f"nbds+unix://alice@/?socket={sock}&tls-psk-file={pki / 'alicepsk' / 'keys.psk'}"])
        assert ok.returncode == 0 and ok.stdout.strip() == str(8 << 20), ok.stderr
        plain = run(["nbdinfo", "--size", f"nbd+unix:///?socket={sock}"])
        assert plain.returncode != 0 and "requires TLS" in plain.stderr
    finally:
        proc.terminate()
        proc.wait(30)


def test_the_daemon_exports_every_pair_over_tls(tmp_path, pki):
    """`pymirror daemon --tls=require --tls-certs DIR --tls-verify-peer`:
    every pair's exports over TLS, to clients with a certificate."""
    need("nbdinfo")
    run = functools.partial(subprocess.run, capture_output=True, text=True, cwd=str(tmp_path), timeout=60)
    pm = [sys.executable, "-m", "pymirror"]
    for name in ("std.img", "mir.img"):
        assert run(pm + ["create", name, "--size", "8M"]).returncode == 0
    assert run(pm + ["pair", "vol.meta", "--standard", "std.img", "--mirror", "mir.img"]).returncode == 0
    sock = tmp_path / "nbd.sock"
    proc = subprocess.Popen(pm + ["daemon", "--control", str(tmp_path / "ctl.sock"), "--state-dir",
                                 str(tmp_path / "state"), "--socket", str(sock), "--tls=require",
                                 "--tls-certs", str(pki / "certs"), "--tls-verify-peer", str(tmp_path / "vol.meta")],
                            cwd=str(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        ok = run(["nbdinfo", "--size", f"nbds+unix:///vol?socket={sock}&tls-certificates={pki / 'goodcert'}"])
        assert ok.returncode == 0 and ok.stdout.strip() == str(8 << 20), ok.stderr
        nocert = run(["nbdinfo", "--size", f"nbds+unix:///vol?socket={sock}&tls-certificates={pki / 'client'}"])
        assert nocert.returncode != 0
        plain = run(["nbdinfo", "--size", f"nbd+unix:///vol?socket={sock}"])
        assert plain.returncode != 0 and "requires TLS" in plain.stderr
    finally:
        proc.terminate()
        assert proc.wait(60) == 0


def _cli(tmp_path):
    run = functools.partial(subprocess.run, capture_output=True, text=True, cwd=str(tmp_path), timeout=60)
    pm = [sys.executable, "-m", "pymirror"]
    for name in ("std.img", "mir.img"):
        assert run(pm + ["create", name, "--size", "8M"]).returncode == 0
    assert run(pm + ["pair", "pair.meta", "--standard", "std.img", "--mirror", "mir.img"]).returncode == 0
    return run, pm


def test_bad_verify_peer_settings_on_the_command_line_change_nothing(tmp_path, pki):
    """--tls-verify-peer with PSK or without TLS: one line, exit 2, on
    serve, a job command (the pair's state unchanged) and the daemon (no
    state directory, no socket)."""
    run, pm = _cli(tmp_path)
    psk = ["--tls=require", "--tls-psk", str(pki / "alicepsk" / "keys.psk"), "--tls-verify-peer"]
    off = ["--tls-verify-peer"]
    sock = str(tmp_path / "s.sock")
    for extra, msg in ((psk, "not --tls-psk"), (off, "needs --tls=on or --tls=require")):
        for cmd in (["serve", "pair.meta"], ["establish", "pair.meta"],
                    ["daemon", "--control", str(tmp_path / "ctl.sock"), "--state-dir", str(tmp_path / "state")]):
            out = run(pm + cmd + ["--socket", sock] + extra)
            assert out.returncode == 2, out.stderr
            assert out.stderr.count("\n") == 1 and msg in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert "state     new" in run(pm + ["query", "pair.meta"]).stdout
    assert not os.path.exists(sock) and not (tmp_path / "state").exists() and not (tmp_path / "ctl.sock").exists()


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _warns(tmp_path, pm, args, tls=(), expect="without TLS"):
    """Run a listening command on 0.0.0.0 with --allow-remote: its warning is
    on stderr, once, and it serves (a client connects) until terminated."""
    port = _free_port()
    proc = subprocess.Popen(pm + args + ["--listen", f"0.0.0.0:{port}", "--allow-remote", *tls],
                            cwd=str(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else args
            try:
                c = RawClient(("127.0.0.1", port))
                c.greet()
                c.sock.close()
                break
            except OSError:
                time.sleep(0.05)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    lines = [ln for ln in err.splitlines() if "warning:" in ln]
    assert len(lines) == 1 and expect in lines[0] and "0.0.0.0" in lines[0], (args, err)
    return err


def test_allow_remote_without_tls_warns_on_every_command_that_listens(tmp_path, pki):
    run, pm = _cli(tmp_path)
    _warns(tmp_path, pm, ["establish", "pair.meta", "--rate", "64K"])         # left paused by SIGTERM
    _warns(tmp_path, pm, ["resume", "pair.meta"])                             # finishes, goes on serving
    assert run(pm + ["split", "pair.meta"]).returncode == 0
    _warns(tmp_path, pm, ["restore", "pair.meta"])
    _warns(tmp_path, pm, ["serve", "pair.meta"])
    _warns(tmp_path, pm, ["daemon", "--control", str(tmp_path / "ctl.sock"), "--state-dir", str(tmp_path / "st")])
    # --tls=on still serves plain clients: warned too; --tls=require is not
    _warns(tmp_path, pm, ["serve", "pair.meta"], ("--tls=on", "--tls-certs", str(pki / "certs")), "--tls=on")
    port = _free_port()
    proc = subprocess.Popen(pm + ["serve", "pair.meta", "--listen", f"0.0.0.0:{port}", "--allow-remote",
                                  "--tls=require", "--tls-certs", str(pki / "certs")],
                            cwd=str(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(2)
    proc.terminate()
    _, err = proc.communicate(timeout=60)
    assert "serving" in err and "warning" not in err, err


class _CountingTLS:
    """A TLS client socket over memory BIOs (Python's ssl), for RawClient,
    that counts the TLS records the server sends: ``records`` since the
    last reset."""

    def __init__(self, sock, cafile):
        import ssl

        self.raw = sock
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile)
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.out, server_hostname="localhost")
        self.pending = b""                 # raw bytes of a record not yet whole
        self.records = 0
        self._until(self.obj.do_handshake)

    def _until(self, fn, *args):
        import ssl

        while True:
            try:
                result = fn(*args)
                self._flush()
                return result
            except ssl.SSLWantReadError:
                self._flush()
                data = self.raw.recv(1 << 16)
                if not data:
                    raise ConnectionError("the server closed the connection")
                self._count(data)
                self.inc.write(data)

    def _flush(self):
        data = self.out.read()
        if data:
            self.raw.sendall(data)

    def _count(self, data):
        buf = self.pending + data
        while len(buf) >= 5:
            end = 5 + int.from_bytes(buf[3:5], "big")
            if len(buf) < end:
                break
            self.records += 1
            buf = buf[end:]
        self.pending = buf

    def sendall(self, data):
        self._until(self.obj.write, data)

    def recv(self, n):
        return self._until(self.obj.read, n)


def _raw_tls_client(server, pki, structured=False):
    c = RawClient(server.socket_path)
    c.greet()
    c.option(P.OPT_STARTTLS)
    assert c.opt_replies()[-1][0] == P.REP_ACK
    c.sock = _CountingTLS(c.sock, str(pki / "client" / "ca-cert.pem"))
    if structured:
        c.negotiate_structured()
    c.go("")
    return c


@pytest.mark.parametrize("structured", [False, True])
def test_a_short_reply_is_one_record(pair, tmp_path, pki, structured):
    """csrc/nbd_tls.c, pm__tls_sendv: a read's reply header goes in the TLS
    record of its data (GnuTLS corked for the first record's worth), not in
    a record of its own; replies of every size read right."""
    data = os.urandom(SIZE)
    pair.write(0, data)
    server = served(pair, tmp_path, pki, "x509")
    try:
        c = _raw_tls_client(server, pki, structured)
        c.request(P.CMD_READ, 0, 4096, cookie=1)          # after the session's tickets
        assert c.reply(4096) == (0, 1, data[:4096])
        c.sock.records = 0
        for i in range(50):
            off = (i * 7919 * 4096) % (SIZE - 4096)
            c.request(P.CMD_READ, off, 4096, cookie=i)
            assert c.reply(4096) == (0, i, data[off:off + 4096])
        assert c.sock.records == 50
        for length in (1, 512, 16384 - 32, 16384, 16384 + 1, 65536, 1 << 20, 5 << 20):
            c.request(P.CMD_READ, 4095, length, cookie=length)
            assert c.reply(length) == (0, length, data[4095:4095 + length])
        c.request(P.CMD_WRITE, 100, 5, b"after", cookie=9)  # a reply with no data
        assert c.reply() == (0, 9, b"")
        assert pair.read(100, 5) == b"after"
    finally:
        server.shutdown()


def _split_file_pair(tmp_path):
    """A split pair of two files of random data (the same on both)."""
    std, mir = tmp_path / "std.img", tmp_path / "mir.img"
    data = os.urandom(SIZE)
    std.write_bytes(data)
    mir.write_bytes(data)
    p = pymirror.Pair.create(tmp_path / "p.meta", std, mir)
    p.establish(assume_equal=True)
    p.split()
    return p, std, data


@pytest.mark.parametrize("structured", [False, True])
def test_a_burst_of_hot_reads_shares_its_records(tmp_path, pki, structured):
    """nbd_loop.c, flush_replies: the reader serves a burst of cached reads
    alone and gathers their replies while the next request is already
    received, so 30 replies of 4 KiB leave in 16 KiB records (8 of them),
    not one record each; every reply is right and they come in order.  A
    request it does not serve so (a write) sends the gathered ones first."""
    p, std, data = _split_file_pair(tmp_path)
    server = served(p, tmp_path, pki, "x509")
    try:
        c = _raw_tls_client(server, pki, structured)
        c.request(P.CMD_READ, 0, 4096, cookie=1)          # after the session's tickets
        assert c.reply(4096) == (0, 1, data[:4096])
        for burst in range(3):
            offs = [(burst * 30 + i) * 12289 % (SIZE - 4096) for i in range(30)]
            c.sock.records = 0
            c.sock.sendall(b"".join(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, 100 + i, off, 4096)
                                    for i, off in enumerate(offs)))
            for i, off in enumerate(offs):
                assert c.reply(4096) == (0, 100 + i, data[off:off + 4096])
            assert c.sock.records <= 10, c.sock.records
        # a write after two reads: the gathered replies leave before the
        # write is handed over (so before its reply)
        c.sock.sendall(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, 201, 0, 512) +
                       P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, 202, 512, 512) +
                       P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE, 203, 8192, 4) + b"new!")
        assert c.reply(512) == (0, 201, data[:512])
        assert c.reply(512) == (0, 202, data[512:1024])
        assert c.reply() == (0, 203, b"")
        assert p.read(8192, 4) == b"new!"
    finally:
        server.shutdown()
        p.close()


def test_cold_reads_at_queue_depth_one_keep_one_thread_over_tls(tmp_path, pki):
    """nbd_loop.c, keep_receiving, over TLS as in the clear: a short read of
    uncached data with nothing else waiting (on the socket, or read by
    GnuTLS) is carried out by the thread that read it, so cold reads one at
    a time start no thread; a burst still grows the pool."""
    p, std, data = _split_file_pair(tmp_path)
    fd = os.open(std, os.O_RDONLY)
    os.fsync(fd)
    server = served(p, tmp_path, pki, "x509")
    try:
        c = _raw_tls_client(server, pki)
        time.sleep(0.1)
        before = len(os.listdir("/proc/self/task"))
        for i in range(40):
            off = (i * 104729 * 4096) % (SIZE - 4096)
            if not pagecache.drop(fd, off, 4096):
                pytest.skip("this file system keeps its pages cached: no cold read to make")
            c.request(P.CMD_READ, off, 4096, cookie=i)
            assert c.reply(4096) == (0, i, data[off:off + 4096])
        assert len(os.listdir("/proc/self/task")) == before
        c.sock.sendall(b"".join(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, i, i * 4096, 4096)
                                for i in range(30)))
        assert sorted(c.reply(4096)[:2] for _ in range(30)) == [(0, i) for i in range(30)]
        assert len(os.listdir("/proc/self/task")) > before
    finally:
        server.shutdown()
        os.close(fd)
        p.close()
