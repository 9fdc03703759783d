"""Tests for tinyclip/backend.py: backend choice, dtype policy, RNGs, erf and array conversion."""

import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from tinyclip import backend
from tinyclip.autograd import Tensor, tensor

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def restore_backend_state():
    """Every test starts and ends with no override and the float32 default."""
    backend.set_backend(None)
    backend.set_default_dtype(np.float32)
    yield
    backend.set_backend(None)
    backend.set_default_dtype(np.float32)


def cupy():
    return backend.cupy_module()


# ---- get_array_module ----------------------------------------------------------------

def test_get_array_module_numpy_and_tensor():
    array = np.ones(3)
    assert backend.get_array_module(array) is np
    assert backend.get_array_module(Tensor(array)) is np
    assert backend.get_array_module(array, 2.0, [1.0]) is np
    assert backend.backend_of(array) == "numpy"


@pytest.mark.gpu
def test_get_array_module_cupy():
    on_gpu = cupy().ones(3)
    assert backend.get_array_module(on_gpu) is cupy()
    assert backend.get_array_module(Tensor(on_gpu)) is cupy()
    assert backend.get_array_module(np.ones(3), on_gpu) is cupy()   # any CuPy input makes it cupy
    assert backend.backend_of(on_gpu) == "cupy"


@pytest.mark.gpu
def test_get_array_module_sees_cupy_in_a_fresh_process():
    # A script that makes CuPy arrays itself, before anything in tinyclip has looked for a GPU.
    script = ("import cupy\n"
              "from tinyclip import backend\n"
              "print(backend.get_array_module(cupy.ones(2)).__name__)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO_ROOT,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, check=True)
    assert result.stdout.strip() == "cupy"


# ---- the default backend ----------------------------------------------------------------

def test_default_backend_is_numpy_without_the_variable(monkeypatch):
    monkeypatch.delenv("TINYCLIP_BACKEND", raising=False)
    assert backend.default_backend() == "numpy"
    assert backend.backend_module() is np


@pytest.mark.parametrize("value", ["numpy", " NumPy ", ""])
def test_default_backend_from_the_environment(monkeypatch, value):
    monkeypatch.setenv("TINYCLIP_BACKEND", value)
    assert backend.default_backend() == "numpy"


def test_default_backend_cupy_from_the_environment(monkeypatch):
    monkeypatch.setenv("TINYCLIP_BACKEND", "cupy")
    assert backend.default_backend() == "cupy"
    if backend.gpu_available():
        assert backend.backend_module() is cupy()
    else:
        with pytest.raises(RuntimeError, match="cupy backend is not available"):
            backend.backend_module()


def test_invalid_environment_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TINYCLIP_BACKEND", "jax")
    with pytest.raises(ValueError, match=r"TINYCLIP_BACKEND must be one of .*'jax'"):
        backend.default_backend()


def test_set_backend_overrides_the_environment_and_none_restores_it(monkeypatch):
    monkeypatch.setenv("TINYCLIP_BACKEND", "cupy")
    backend.set_backend("numpy")
    assert backend.default_backend() == "numpy"
    backend.set_backend(None)
    assert backend.default_backend() == "cupy"


def test_use_backend_restores_the_previous_choice_even_after_an_error(monkeypatch):
    monkeypatch.delenv("TINYCLIP_BACKEND", raising=False)
    with pytest.raises(KeyError):
        with backend.use_backend("numpy"):
            assert backend.default_backend() == "numpy"
            raise KeyError("inside the block")
    assert backend.default_backend() == "numpy"
    monkeypatch.setenv("TINYCLIP_BACKEND", "cupy")
    assert backend.default_backend() == "cupy"   # the override is gone, not left at "numpy"


@pytest.mark.parametrize("call", [backend.set_backend, backend.backend_module,
                                  lambda name: backend.RNG(0, backend=name)])
def test_invalid_backend_names_are_a_clear_value_error(call):
    with pytest.raises(ValueError, match=r"backend must be one of \('numpy', 'cupy'\), got 'torch'"):
        call("torch")


def test_set_backend_cupy_without_a_gpu_fails_and_changes_nothing():
    if backend.gpu_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(RuntimeError, match="cupy backend is not available"):
        backend.set_backend("cupy")
    assert backend.default_backend() == "numpy"


def test_why_no_gpu_is_none_exactly_when_a_gpu_is_available():
    reason = backend.why_no_gpu()
    assert (reason is None) == backend.gpu_available()
    if reason is not None:
        with pytest.raises(RuntimeError, match=re.escape(reason)):
            backend.cupy_module()


def test_devices():
    assert backend.cpu.enabled() and backend.cpu.xp is np
    assert backend.gpu.enabled() == backend.gpu_available()
    if not backend.gpu_available():
        with pytest.raises(RuntimeError, match="cupy backend is not available"):
            backend.gpu.xp


@pytest.mark.gpu
def test_use_backend_cupy_puts_new_tensors_on_the_gpu():
    with backend.use_backend("cupy"):
        assert backend.backend_module() is cupy()
        assert tensor([1.0, 2.0]).backend == "cupy"
    assert tensor([1.0, 2.0]).backend == "numpy"


# ---- dtype policy -----------------------------------------------------------------------

def test_default_dtype_is_float32():
    assert backend.default_dtype() == np.float32
    assert backend.RNG(0).normal((2, 2)).dtype == np.float32
    assert tensor(1.0).dtype == np.float32


def test_set_default_dtype():
    backend.set_default_dtype(np.float64)
    assert backend.default_dtype() == np.float64
    assert backend.RNG(0).uniform((3,)).dtype == np.float64
    assert tensor([1.0]).dtype == np.float64


@pytest.mark.parametrize("dtype", [np.int32, np.bool_, np.complex64])
def test_default_dtype_must_be_a_float_type(dtype):
    with pytest.raises(TypeError, match="default dtype must be a float type"):
        backend.set_default_dtype(dtype)
    assert backend.default_dtype() == np.float32


# ---- random generators ------------------------------------------------------------------

def draws(rng):
    return [rng.normal((3, 4)), rng.uniform((5,), low=-2.0, high=3.0),
            rng.integers(0, 10, (6,)), rng.permutation(7)]


def assert_same_draws(first, second):
    for a, b in zip(first, second):
        np.testing.assert_array_equal(backend.to_numpy(a), backend.to_numpy(b))


def test_rng_is_reproducible_on_numpy():
    assert_same_draws(draws(backend.RNG(123)), draws(backend.seeded_rng(123)))
    first, other = draws(backend.RNG(123)), draws(backend.RNG(124))
    assert not np.array_equal(first[0], other[0])


def test_rng_draws_have_the_asked_shapes_ranges_and_dtypes():
    rng = backend.RNG(0)
    uniform = rng.uniform((1000,), low=-2.0, high=3.0, dtype=np.float64)
    assert uniform.dtype == np.float64 and uniform.min() >= -2.0 and uniform.max() < 3.0
    assert rng.normal((2, 3), dtype=np.float16).dtype == np.float16
    assert sorted(rng.permutation(7).tolist()) == list(range(7))
    integers = rng.integers(3, 5, (100,))
    assert integers.dtype.kind == "i" and set(integers.tolist()) <= {3, 4}


def test_rng_normal_scales_and_shifts_the_standard_draw():
    shifted = backend.RNG(5).normal((4, 4), std=2.0, mean=1.0)
    standard = backend.RNG(5).normal((4, 4))
    np.testing.assert_array_equal(shifted, standard * np.float32(2.0) + np.float32(1.0))


def test_rng_state_round_trips():
    rng = backend.RNG(7)
    rng.normal((3,))
    state = rng.get_state()
    expected = draws(rng)
    restored = backend.RNG(0)
    restored.set_state(state)
    assert_same_draws(draws(restored), expected)


@pytest.mark.gpu
def test_rng_is_reproducible_on_cupy():
    first, second = draws(backend.RNG(123, "cupy")), draws(backend.RNG(123, "cupy"))
    assert all(backend.backend_of(draw) == "cupy" for draw in first)
    assert first[0].dtype == np.float32
    assert_same_draws(first, second)
    other = backend.RNG(124, "cupy").normal((3, 4))
    assert not np.array_equal(backend.to_numpy(first[0]), backend.to_numpy(other))


@pytest.mark.gpu
def test_rng_permutation_on_cupy():
    # CuPy's Generator has no permutation of its own
    permutation = backend.RNG(3, "cupy").permutation(50)
    assert backend.backend_of(permutation) == "cupy"
    assert sorted(backend.to_numpy(permutation).tolist()) == list(range(50))


# ---- erf --------------------------------------------------------------------------------

def erf_reference(values):
    return np.array([math.erf(v) for v in np.ravel(values)]).reshape(np.shape(values))


def test_erf_matches_math_erf_over_a_grid_and_the_tails():
    grid = np.concatenate([
        np.linspace(-8.0, 8.0, 4001),
        2.5 + np.array([-1e-12, -1e-15, 0.0, 1e-15, 1e-12]),      # where the series hands over to the fraction
        -2.5 + np.array([-1e-12, 0.0, 1e-12]),
        np.geomspace(2.5, 30.0, 300), -np.geomspace(2.5, 30.0, 300),
    ])
    np.testing.assert_allclose(backend.erf(grid), erf_reference(grid), rtol=1e-14, atol=1e-14)


def test_erf_is_accurate_relative_to_tiny_values():
    tiny = np.geomspace(1e-300, 1e-2, 600)
    tiny = np.concatenate([tiny, -tiny])
    np.testing.assert_allclose(backend.erf(tiny), erf_reference(tiny), rtol=1e-14, atol=0)


def test_erf_special_values():
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 5e-324])
    result = backend.erf(special)
    np.testing.assert_array_equal(result[:4], [0.0, -0.0, 1.0, -1.0])
    assert np.signbit(result[1]) and np.isnan(result[4])
    assert result[5] == math.erf(5e-324)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_erf_keeps_float_dtypes(dtype):
    values = np.linspace(-3, 3, 13).astype(dtype)
    result = backend.erf(values)
    assert result.dtype == dtype
    np.testing.assert_allclose(result, erf_reference(values.astype(np.float64)).astype(dtype),
                               rtol=np.finfo(dtype).eps, atol=np.finfo(dtype).eps)


def test_erf_of_integers_and_scalars_is_float64():
    assert backend.erf(np.array([0, 1, 3])).dtype == np.float64
    result = backend.erf(0.5)
    assert result.shape == () and result == pytest.approx(math.erf(0.5), rel=1e-15)


def test_erf_of_huge_finite_values_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(backend.erf(np.array([1e200, -1e300])), [1.0, -1.0])


@pytest.mark.gpu
def test_erf_on_cupy_matches_numpy():
    values = np.linspace(-6, 6, 2001)
    on_gpu = backend.erf(cupy().asarray(values))
    assert backend.backend_of(on_gpu) == "cupy"
    np.testing.assert_allclose(backend.to_numpy(on_gpu), backend.erf(values), rtol=1e-14, atol=1e-14)


# ---- conversion -------------------------------------------------------------------------

def test_to_numpy_and_asarray_on_numpy():
    array = np.arange(6.0).reshape(2, 3)
    assert backend.to_numpy(array) is array
    assert backend.asarray(array) is array
    converted = backend.asarray([[1, 2], [3, 4]], dtype=np.float32)
    assert isinstance(converted, np.ndarray) and converted.dtype == np.float32
    np.testing.assert_array_equal(backend.to_numpy([1.0, 2.0]), [1.0, 2.0])


@pytest.mark.gpu
def test_to_numpy_and_asarray_between_backends():
    array = np.arange(6.0, dtype=np.float32).reshape(2, 3)
    on_gpu = backend.asarray(array, "cupy")
    assert isinstance(on_gpu, cupy().ndarray) and on_gpu.dtype == np.float32
    back = backend.to_numpy(on_gpu)
    assert isinstance(back, np.ndarray)
    np.testing.assert_array_equal(back, array)
    np.testing.assert_array_equal(backend.asarray(on_gpu, "numpy"), array)
    assert backend.asarray(on_gpu, "cupy", dtype=np.float64).dtype == np.float64
