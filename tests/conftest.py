"""Shared test setup: hypothesis profiles, the ``gpu`` marker and the backend fixture.

Profiles: ``ci`` (default; few examples, the whole suite in minutes on two
cores), ``dev`` and ``thorough``; pick one with HYPOTHESIS_PROFILE.
Tests that take the ``xp`` fixture run once per backend: NumPy always, CuPy
(marked ``gpu``) only where CuPy sees a CUDA device, and skipped otherwise.
"""

import os

import pytest
from hypothesis import HealthCheck, settings

from tinyclip import backend

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=500, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CuPy and a CUDA device (skipped cleanly without one)")


def pytest_collection_modifyitems(config, items):
    if backend.gpu_available():
        return
    skip = pytest.mark.skip(reason="CuPy sees no CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


BACKEND_PARAMS = [pytest.param("numpy", id="numpy"),
                  pytest.param("cupy", id="cupy", marks=pytest.mark.gpu)]


@pytest.fixture(scope="session", params=BACKEND_PARAMS)
def xp(request):
    """The array module of one backend (numpy, or cupy on a GPU machine)."""
    return backend.backend_module(request.param)
