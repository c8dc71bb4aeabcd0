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
