"""Shared test setup: hypothesis profiles, the ``gpu`` marker and the backend fixture.

Profiles: ``ci`` (default; few examples, the whole suite in minutes on two
cores), ``dev`` and ``thorough``; pick one with HYPOTHESIS_PROFILE.
Tests that take the ``xp`` fixture run once per backend: NumPy always, CuPy
(marked ``gpu``) only where CuPy sees a CUDA device, and skipped otherwise,
with the reason. ``python -m pytest -m gpu`` runs only the CuPy ones.

Tests marked ``parity`` compare with the installed torch / transformers and
skip where they are missing; in a ``python -m pytest -m parity`` run, which
asks for exactly them, such a skip is a failure instead.

Every other test runs on NumPy whatever the shell's TINYCLIP_BACKEND says (a
test of that variable sets it itself): ``TINYCLIP_BACKEND=cupy python -m
pytest`` means "run the CuPy tests too", and without a usable GPU it stops
at once with the reason instead of skipping them.
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

# taken out of the environment before any test runs, so that the tests' default backend is NumPy
REQUESTED_BACKEND = os.environ.pop("TINYCLIP_BACKEND", "").strip().lower() or "numpy"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CuPy and a CUDA device (skipped cleanly without one)")
    config.addinivalue_line("markers", "parity: compares with the installed torch / transformers (`-m parity`)")
    if REQUESTED_BACKEND not in backend.BACKENDS:
        raise pytest.UsageError(f"TINYCLIP_BACKEND must be one of {backend.BACKENDS}, got {REQUESTED_BACKEND!r}")
    if REQUESTED_BACKEND == "cupy" and backend.why_no_gpu():
        raise pytest.UsageError(f"TINYCLIP_BACKEND=cupy asks for the CuPy tests, but CuPy cannot run here "
                                f"({backend.why_no_gpu()}); without a GPU run plain `python -m pytest`, "
                                "where they skip themselves")


def pytest_collection_modifyitems(config, items):
    reason = backend.why_no_gpu()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"needs CuPy and a CUDA device ({reason})")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


BACKEND_PARAMS = [pytest.param("numpy", id="numpy"),
                  pytest.param("cupy", id="cupy", marks=pytest.mark.gpu)]


@pytest.fixture(scope="session", params=BACKEND_PARAMS)
def xp(request):
    """The array module of one backend (numpy, or cupy on a GPU machine)."""
    return backend.backend_module(request.param)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In a ``-m parity`` run a parity test that skips (torch or transformers missing) fails, so CI cannot pass idly."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and "parity" in item.keywords and item.config.option.markexpr.strip() == "parity":
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"a parity test may not skip in a `-m parity` run: {reason}"
