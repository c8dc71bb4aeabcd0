"""Hypothesis profiles: ``default`` (quick, local), ``ci`` (more examples,
no deadline: CI machines are shared and noisy), ``expensive`` (long runs by
hand).  Pick one with HYPOTHESIS_PROFILE."""
import os

from hypothesis import HealthCheck, settings

settings.register_profile("default", max_examples=100, deadline=None)
settings.register_profile("ci", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("expensive", max_examples=5000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

import pytest  # noqa: E402


@pytest.fixture(params=["c", "python"])
def nbd_engine(request, monkeypatch):
    """Run a test on both NBD request loops (the C one is the default; see
    pymirror/nbd/cloop.py).  Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("nbd_engine")``."""
    monkeypatch.setenv("PYMIRROR_NBD_ENGINE", request.param)
    return request.param


# The one-node Ceph cluster of the RBD tests (tests/services/ceph.py): a
# session fixture, started on first use.  Loaded by path (no tests/__init__.py).
import importlib.util as _ilu
import sys as _sys
from pathlib import Path as _Path

_spec = _ilu.spec_from_file_location("pymirror_test_ceph", _Path(__file__).with_name("services") / "ceph.py")
_ceph = _ilu.module_from_spec(_spec)
_sys.modules.setdefault("pymirror_test_ceph", _ceph)
_spec.loader.exec_module(_ceph)
ceph_cluster = _ceph.ceph_cluster
rbd_images = _ceph.rbd_images
