"""A one-node Ceph cluster for the RBD tests and benchmarks: one monitor
and one OSD on memstore (objects in RAM), no authentication, no manager, no
systemd, everything under one temporary directory.  Starts in about 6 s.

Debian packages: ceph-mon ceph-osd ceph-common (they bring librbd1 and
librados2).  ``.ci/run`` installs them.

Use from tests through the session fixture ``ceph_cluster`` (tests/conftest.py
exposes it): it starts the cluster once per session and stops it at the end.
When the cluster cannot start, the RBD tests are skipped with the reason,
except under CI (``CI=true``), where they fail: CI must not skip them.

From a shell (benchmarks, debugging)::

    python tests/services/ceph.py up DIR [MEMSTORE_GIB]   # prints DIR/ceph.conf
    python tests/services/ceph.py down DIR

Faults: :meth:`CephCluster.stall_osd` sends SIGSTOP to the OSD and
:meth:`CephCluster.resume_osd` SIGCONT.  Killing a memstore OSD loses every
object (RAM), so a test stalls it instead of restarting it.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional

POOL = "rbd"
#: the session's cluster while the ceph_cluster fixture holds it (for the
#: volume kinds of tests/volume_kinds.py, which get no fixtures)
SESSION: "Optional[CephCluster]" = None
PACKAGES = "ceph-mon ceph-osd ceph-common"
TOOLS = ("ceph-mon", "ceph-osd", "monmaptool", "ceph", "rbd")


class CephError(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class CephCluster:
    """One monitor and one memstore OSD under ``root`` (created empty)."""

    def __init__(self, root: "str | os.PathLike[str]", memstore_gib: int = 4) -> None:
        self.root = Path(root)
        self.memstore_gib = memstore_gib
        self.conf = self.root / "ceph.conf"
        self.mon: Optional[subprocess.Popen[bytes]] = None
        self.osd: Optional[subprocess.Popen[bytes]] = None
        self._names = 0

    # -- environment --------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        """The environment for the ceph tools and librados: CEPH_CONF set."""
        env = dict(os.environ)
        env["CEPH_CONF"] = str(self.conf)
        return env

    def run(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a ceph tool (``ceph``, ``rbd``, ...) against this cluster."""
        p = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise CephError(f"{' '.join(args)} failed ({p.returncode}): {(p.stderr or p.stdout).strip()[-500:]}")
        return p

    def rbd(self, *args: str, timeout: float = 120) -> str:
        return self.run("rbd", "-p", POOL, *args, timeout=timeout).stdout

    # -- life ---------------------------------------------------------------
    def _write_conf(self, fsid: str, port: int) -> None:
        d = self.root
        self.conf.write_text(
            "[global]\n"
            f"fsid = {fsid}\n"
            f"mon host = 127.0.0.1:{port}\n"
            "mon initial members = a\n"
            "auth cluster required = none\n"
            "auth service required = none\n"
            "auth client required = none\n"
            "auth allow insecure global id reclaim = true\n"
            "ms bind ipv4 = true\n"
            "ms bind ipv6 = false\n"
            "osd pool default size = 1\n"
            "osd pool default min size = 1\n"
            "osd pool default pg autoscale mode = off\n"
            "osd crush chooseleaf type = 0\n"
            "mon allow pool size one = true\n"
            "mon allow pool delete = true\n"
            "mon warn on pool no redundancy = false\n"
            # a test machine's disk may be fuller than a monitor likes
            "mon data avail warn = 1\n"
            "mon data avail crit = 0\n"
            # images for tests: layering only, so that a pymirror killed with
            # SIGKILL leaves no exclusive lock that the next one must wait out
            "rbd default features = 1\n"
            f"run dir = {d}/run\n"
            f"admin socket = {d}/run/$cluster-$name.$pid.asok\n"
            "[mon.a]\n"
            f"mon data = {d}/mon\n"
            f"mon addr = 127.0.0.1:{port}\n"
            f"log file = {d}/log/$name.log\n"
            "[osd.0]\n"
            f"osd data = {d}/osd\n"
            "osd objectstore = memstore\n"
            f"memstore device bytes = {self.memstore_gib << 30}\n"
            f"log file = {d}/log/$name.log\n"
            "[client]\n"
            "log file = /dev/null\n"
        )

    def _daemon(self, *args: str) -> "subprocess.Popen[bytes]":
        # the daemons run in the foreground (-f) as our children: their pid is
        # the Popen's, and stop() needs no pid files
        return subprocess.Popen(list(args), env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)

    def start(self) -> None:
        missing = [t for t in TOOLS if shutil.which(t) is None]
        if missing:
            raise CephError(f"{', '.join(missing)} not found: install the Debian packages {PACKAGES}")
        if self.root.exists():
            shutil.rmtree(self.root)
        for sub in ("mon", "osd", "run", "log"):
            (self.root / sub).mkdir(parents=True)
        fsid, port = str(uuid.uuid4()), _free_port()
        self._write_conf(fsid, port)
        monmap = str(self.root / "monmap")
        self.run("monmaptool", "--create", "--add", "a", f"127.0.0.1:{port}", "--fsid", fsid, monmap)
        self.run("ceph-mon", "--mkfs", "-i", "a", "--monmap", monmap)
        self.mon = self._daemon("ceph-mon", "-i", "a", "-f")
        try:
            self.run("ceph", "osd", "create")          # waits for the monitor
            self.run("ceph-osd", "-i", "0", "--mkfs")
            self.osd = self._daemon("ceph-osd", "-i", "0", "-f")
            self.run("ceph", "osd", "pool", "create", POOL, "8")
            self.run("rbd", "pool", "init", POOL)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop both daemons and wait.  The OSD is killed outright: a memstore
        OSD that is asked to stop first writes every object it holds to its
        data directory, gigabytes of disk for nothing."""
        for p in (self.osd, self.mon):
            if p is None or p.poll() is not None:
                continue
            try:
                if p is self.osd:
                    p.kill()
                else:
                    os.kill(p.pid, signal.SIGCONT)
                    p.terminate()
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            except ProcessLookupError:
                pass
        self.osd = self.mon = None

    def alive(self) -> bool:
        return all(p is not None and p.poll() is None for p in (self.mon, self.osd))

    # -- faults -------------------------------------------------------------
    def stall_osd(self) -> None:
        assert self.osd is not None
        os.kill(self.osd.pid, signal.SIGSTOP)

    def resume_osd(self) -> None:
        assert self.osd is not None
        os.kill(self.osd.pid, signal.SIGCONT)

    def blocklist_watchers(self, image: str) -> list[str]:
        """Cut off every client that has ``image`` open for writing (its
        header watch), as Ceph fences a client it has given up on; returns
        the addresses blocklisted."""
        info = json.loads(self.rbd("info", "--format", "json", image))
        asoks = sorted((self.root / "run").glob("ceph-osd.0.*.asok"))
        if not asoks:
            raise CephError("the OSD's admin socket is missing")
        watchers = json.loads(self.run("ceph", "--admin-daemon", str(asoks[-1]), "dump_watchers").stdout)
        addrs = sorted({f"{w['entity_addr_t']['addr']}/{w['entity_addr_t']['nonce']}" for w in watchers
                        if w.get("object") == f"rbd_header.{info['id']}"})
        for a in addrs:
            self.run("ceph", "osd", "blocklist", "add", a)
        return addrs

    # -- images -------------------------------------------------------------
    def new_image_name(self, prefix: str = "img") -> str:
        self._names += 1
        return f"{prefix}-{os.getpid()}-{self._names}-{uuid.uuid4().hex[:6]}"

    def uri(self, image: str, **query: Any) -> str:
        q = {"conf": str(self.conf), "timeout": "10", **{k: str(v) for k, v in query.items()}}
        return f"rbd:{POOL}/{image}?" + "&".join(f"{k}={v}" for k, v in q.items())

    def create_image(self, size: int, prefix: str = "img") -> str:
        name = self.new_image_name(prefix)
        self.rbd("create", "--size", f"{size}B", name)
        return name

    def remove_image(self, name: str) -> None:
        self.run("rbd", "-p", POOL, "rm", "--no-progress", name, check=False, timeout=120)


def start_cluster(root: "str | os.PathLike[str]", memstore_gib: int = 4) -> CephCluster:
    c = CephCluster(root, memstore_gib)
    c.start()
    return c


# -- the pytest side ---------------------------------------------------------
def _ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


try:
    import pytest
except ImportError:   # the shell entry point needs no pytest
    pytest = None  # type: ignore[assignment]

if pytest is not None:
    @pytest.fixture(scope="session")
    def ceph_cluster(tmp_path_factory: Any) -> Iterator[CephCluster]:
        """The session's one-node Ceph cluster (started on first use).
        Cannot start: skip with the reason, or fail under CI."""
        root = tmp_path_factory.mktemp("ceph")
        started = time.monotonic()
        try:
            cluster = start_cluster(root, int(os.environ.get("PYMIRROR_TEST_CEPH_GIB", "3")))
        except (CephError, OSError, subprocess.SubprocessError) as exc:
            reason = f"cannot start the one-node Ceph cluster for the RBD tests: {exc}"
            if _ci():
                pytest.fail(f"{reason} (CI does not allow skipping the RBD tests)", pytrace=False)
            pytest.skip(reason)
        cluster.started_in = time.monotonic() - started   # type: ignore[attr-defined]
        global SESSION
        SESSION = cluster
        try:
            yield cluster
        finally:
            SESSION = None
            cluster.stop()

    class RbdImages:
        """Images of one test: ``new(size)`` creates one and returns its
        URI (with the cluster's conf and a short timeout); all are removed
        when the test ends."""

        def __init__(self, cluster: CephCluster) -> None:
            self.cluster = cluster
            self.names: list[str] = []

        def new(self, size: int, prefix: str = "img", **query: Any) -> str:
            name = self.cluster.create_image(size, prefix)
            self.names.append(name)
            return self.cluster.uri(name, **query)

        def remove_all(self) -> None:
            for n in self.names:
                self.cluster.remove_image(n)

    @pytest.fixture
    def rbd_images(ceph_cluster: CephCluster) -> Iterator[RbdImages]:
        imgs = RbdImages(ceph_cluster)
        try:
            yield imgs
        finally:
            if ceph_cluster.osd is not None:
                ceph_cluster.resume_osd()   # a fault test that failed midway
            imgs.remove_all()


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in ("up", "down"):
        sys.exit("usage: ceph.py up DIR [MEMSTORE_GIB] | down DIR")
    root = Path(sys.argv[2])
    if sys.argv[1] == "up":
        c = start_cluster(root, int(sys.argv[3]) if len(sys.argv) > 3 else 4)
        (root / "pids").write_text(f"{c.mon.pid if c.mon else 0} {c.osd.pid if c.osd else 0}\n")
        print(c.conf)
    else:
        mon, osd = (root / "pids").read_text().split()
        for pid, sig in ((osd, signal.SIGKILL), (mon, signal.SIGTERM)):
            try:
                os.kill(int(pid), sig)
            except (ProcessLookupError, ValueError):
                pass
