"""Array backends: NumPy on the CPU, CuPy on an NVIDIA GPU.

Every op in tinyclip asks this module for the array module of its inputs
(``xp = get_array_module(x)``) instead of importing NumPy or CuPy itself, so
the same code runs on both. CuPy is imported lazily and only once: a machine
without CUDA gets a disabled GPU device, never an ImportError (the "device
reports enabled()" idea from CMU's needle).

The default backend comes from ``set_backend(name)`` or the environment
variable ``TINYCLIP_BACKEND`` (``numpy`` or ``cupy``); the default float type
is float32 (``set_default_dtype``), float64 is used for gradient checks.

Importing it changes nothing outside tinyclip: ``tune_malloc()``, which
changes glibc's malloc for the whole process, is an explicit call.
"""

import contextlib
import ctypes
import math
import os
import platform

import numpy

BACKENDS = ("numpy", "cupy")


MALLOC_TUNED = False    # whether tune_malloc() has changed glibc's malloc in this process


def tune_malloc():
    """Ask glibc to recycle large freed arrays instead of returning them to the kernel; returns whether it did.

    NumPy allocates a fresh array for every intermediate result. glibc serves
    allocations above its mmap threshold (at most 32 MB by default) with a
    fresh mmap and unmaps them on free, so each (B·T, 4·D) activation of a
    transformer MLP costs thousands of page faults and a zero-fill every time:
    a third of a CPU training step in ``benchmarks/block.py``. Raising the mmap
    and trim thresholds to 1 GB keeps freed blocks in the heap for the next
    array of the same size.

    This changes malloc for the whole process, so importing tinyclip never
    does it: the ``tinyclip`` command, ``tinyclip.train.train`` and the
    benchmarks call it; a program that embeds tinyclip may. It does nothing
    (and returns False) off glibc, or when TINYCLIP_MALLOC_TUNING=0; calling
    it again is harmless. ``MALLOC_TUNED`` records the outcome. Raises nothing.
    """
    global MALLOC_TUNED
    if os.environ.get("TINYCLIP_MALLOC_TUNING", "1") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3     # from glibc's <malloc.h>
    one_gigabyte = ctypes.c_int(1 << 30)
    MALLOC_TUNED = mallopt(m_mmap_threshold, one_gigabyte) == 1 and mallopt(m_trim_threshold, one_gigabyte) == 1
    return MALLOC_TUNED


_cupy = None           # the cupy module once imported and a device was found
_cupy_error = None     # why CuPy is unavailable, for the error message
_cupy_probed = False
_backend_override = None
_default_dtype = numpy.dtype(numpy.float32)


def _probe_cupy():
    """Import CuPy once; remember whether a CUDA device answers."""
    global _cupy, _cupy_error, _cupy_probed
    if _cupy_probed:
        return _cupy
    _cupy_probed = True
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("CUDA reports no device")
        _cupy = cupy
    except Exception as error:  # ImportError, CUDA driver errors, ...
        _cupy_error = f"{type(error).__name__}: {error}"
    return _cupy


def gpu_available():
    """True when CuPy imports and sees at least one CUDA device."""
    return _probe_cupy() is not None


def why_no_gpu():
    """None when CuPy sees a CUDA device, else why not, in one line (CuPy missing, no driver, no device)."""
    return None if _probe_cupy() is not None else _cupy_error


def cupy_module():
    """The cupy module. Raises RuntimeError, saying why, when no GPU can be used."""
    cupy = _probe_cupy()
    if cupy is None:
        raise RuntimeError(f"the cupy backend is not available on this machine ({_cupy_error}); "
                           "install tinyclip[gpu] on a machine with an NVIDIA GPU, or use the numpy backend")
    return cupy


class Device:
    """A place arrays live: ``cpu`` (NumPy) or ``gpu`` (CuPy)."""

    def __init__(self, name):
        self.name = name

    def enabled(self):
        return self.name == "cpu" or gpu_available()

    @property
    def xp(self):
        return numpy if self.name == "cpu" else cupy_module()

    def __repr__(self):
        return f"Device({self.name!r}, enabled={self.enabled()})"


cpu = Device("cpu")
gpu = Device("gpu")


def _check_backend_name(name):
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def default_backend():
    """The backend name new arrays go to: set_backend(), else $TINYCLIP_BACKEND, else numpy.

    Raises ValueError when TINYCLIP_BACKEND names no backend.
    """
    if _backend_override is not None:
        return _backend_override
    name = os.environ.get("TINYCLIP_BACKEND", "numpy").strip().lower() or "numpy"
    if name not in BACKENDS:
        raise ValueError(f"TINYCLIP_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


def set_backend(name):
    """Make ``name`` ('numpy' or 'cupy') the default backend; None restores the environment's.

    Raises ValueError for another name, RuntimeError for 'cupy' where no GPU can be used.
    """
    global _backend_override
    if name is not None:
        _check_backend_name(name)
        if name == "cupy":
            cupy_module()
    _backend_override = name


@contextlib.contextmanager
def use_backend(name):
    """``with use_backend('cupy'):`` — the default backend inside the block. Raises what set_backend raises."""
    previous = _backend_override
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def backend_module(name=None):
    """The array module (numpy or cupy) for a backend name, or for the default.

    Raises ValueError for an unknown name, RuntimeError for cupy where no GPU can be used.
    """
    name = _check_backend_name(name) if name is not None else default_backend()
    return numpy if name == "numpy" else cupy_module()


def get_array_module(*arrays):
    """numpy, or cupy if any argument is a CuPy array (Tensors are unwrapped). Raises nothing."""
    for array in arrays:
        if getattr(array, "is_tensor", False):
            array = array.data
        # by the type's module, so a CuPy array made before tinyclip probed CuPy is still seen
        if type(array).__module__.startswith("cupy"):
            return cupy_module()
    return numpy


def backend_of(array):
    """'numpy' or 'cupy': where an array lives. Raises nothing."""
    return "cupy" if get_array_module(array) is not numpy else "numpy"


def default_dtype():
    """The float type new parameters and tensors get (float32 unless changed)."""
    return _default_dtype


def set_default_dtype(dtype):
    """Make ``dtype`` the float type of new parameters and tensors. Raises TypeError for a non-float type."""
    global _default_dtype
    dtype = numpy.dtype(dtype)
    if dtype.kind != "f":
        raise TypeError(f"the default dtype must be a float type, got {dtype}")
    _default_dtype = dtype


def to_numpy(array):
    """A NumPy copy (or view) of a NumPy or CuPy array."""
    if get_array_module(array) is not numpy:
        return array.get()
    return numpy.asarray(array)


def asarray(array, backend=None, dtype=None):
    """``array`` on the given (or default) backend, converting NumPy <-> CuPy as needed.

    Raises what ``backend_module`` raises, and what NumPy/CuPy raise for data that is not an array.
    """
    xp = backend_module(backend)
    if xp is numpy:
        array = to_numpy(array)
    return xp.asarray(array, dtype=dtype)


def erf(x):
    """The error function, elementwise, on either backend.

    NumPy has no erf, and tinyclip does not pull in SciPy for one function:
    for |x| < 2.5 the series erf(x) = 2/sqrt(pi) exp(-x^2) sum_n 2^n x^(2n+1) / (2n+1)!!
    (all terms positive, so no cancellation), beyond it the continued fraction
    of erfc (Abramowitz & Stegun 7.1.14), evaluated bottom-up. Both reach full
    float64 precision in the term counts below. CuPy has erf built in.
    """
    xp = get_array_module(x)
    if xp is not numpy:
        import cupyx.scipy.special
        return cupyx.scipy.special.erf(x)
    x = numpy.asarray(x)
    work = x.astype(numpy.float64)
    ax = numpy.abs(work)
    small = ax < 2.5
    out = numpy.empty_like(work)
    s = work[small]
    s2 = s * s
    term = s.copy()
    total = s.copy()
    for n in range(1, 60):  # 2*2.5^2/(2n+1) shrinks the terms below 1e-17 relative by n=60
        term = term * (2.0 * s2) / (2 * n + 1)
        total += term
    out[small] = 2.0 / math.sqrt(math.pi) * numpy.exp(-s2) * total
    big = ax[~small]
    with numpy.errstate(over="ignore"):   # x² overflows past 1e154; exp(-inf) = 0 is then exact
        big_squared = big * big
    fraction = numpy.zeros_like(big)
    for k in range(60, 0, -1):  # erfc(x) = exp(-x^2)/sqrt(pi) / (x + (1/2)/(x + 1/(x + (3/2)/(x + ...))))
        fraction = (k / 2.0) / (big + fraction)
    erfc_big = numpy.exp(-big_squared) / math.sqrt(math.pi) / (big + fraction)
    out[~small] = numpy.sign(work[~small]) * (1.0 - erfc_big)
    return out.astype(x.dtype if x.dtype.kind == "f" else numpy.float64, copy=False)


def scatter_add(target, index, values):
    """``target[index] += values`` where repeated indices add up (unbuffered), in place."""
    get_array_module(target).add.at(target, index, values)


class RNG:
    """A seeded random generator on one backend, with the few draws tinyclip needs.

    NumPy uses ``numpy.random.default_rng(seed)`` (PCG64); CuPy uses
    ``cupy.random.default_rng(seed)`` (XORWOW on the device). The two streams
    differ, so the same seed gives different numbers on the two backends.
    """

    def __init__(self, seed=0, backend=None):
        self.backend = _check_backend_name(backend) if backend is not None else default_backend()
        self.xp = backend_module(self.backend)
        self.seed = seed
        self.generator = self.xp.random.default_rng(seed)

    def normal(self, shape, std=1.0, mean=0.0, dtype=None):
        dtype = numpy.dtype(dtype or _default_dtype)
        draw = self.generator.standard_normal(size=shape, dtype=dtype if dtype.itemsize >= 4 else numpy.float32)
        return (draw * std + mean).astype(dtype, copy=False)

    def uniform(self, shape, low=0.0, high=1.0, dtype=None):
        dtype = numpy.dtype(dtype or _default_dtype)
        draw = self.generator.random(size=shape, dtype=dtype if dtype.itemsize >= 4 else numpy.float32)
        return (draw * (high - low) + low).astype(dtype, copy=False)

    def integers(self, low, high, shape):
        return self.generator.integers(low, high, size=shape)

    def permutation(self, n):
        if self.xp is numpy:
            return self.generator.permutation(n)
        return self.xp.argsort(self.generator.random(n))   # CuPy's Generator has no permutation

    def get_state(self):
        """The NumPy generator's state as plain data (for checkpoints)."""
        if self.xp is not numpy:
            raise NotImplementedError("saving the state of a CuPy generator is not supported; reseed it instead")
        return self.generator.bit_generator.state

    def set_state(self, state):
        if self.xp is not numpy:
            raise NotImplementedError("restoring the state of a CuPy generator is not supported; reseed it instead")
        self.generator.bit_generator.state = state


def seeded_rng(seed=0, backend=None):
    """A new ``RNG`` for ``seed`` on the given (or default) backend."""
    return RNG(seed, backend)
