"""A stand-in for CuPy that needs no GPU: NumPy arrays that NumPy itself refuses to touch.

The mistakes that break tinyclip on CuPy can be made visible on a CPU:
calling a NumPy function on a device array (``numpy.exp(x)``,
``numpy.zeros_like(x)``, ``numpy.add.at(x, ...)``), or mixing a host array
into device arithmetic (``x * numpy_mask``, ``xp.concatenate([x, host])``);
CuPy raises TypeError for both. Here ``DeviceArray`` is a ``numpy.ndarray``
subclass whose ``__array_ufunc__`` and ``__array_function__`` refuse every
call that does not come through ``strict`` (the array module tinyclip is
given in place of cupy) or through the array's own operators and methods,
which CuPy arrays have too. Whatever ``strict`` returns is a DeviceArray, and
reductions give 0-d arrays rather than NumPy scalars, as CuPy's do.

``install(monkeypatch)`` makes the backend name "cupy" mean this stand-in for
one test. What it cannot see: ``numpy.asarray(x)`` / ``numpy.array(x)`` on a
device array quietly give a host copy (NumPy takes ndarray subclasses without
asking them), so a test must also check that its results are DeviceArrays;
and a CuPy function that NumPy has but CuPy lacks passes here.
"""

import contextlib
import functools
import threading
import types

import numpy

from tinyclip import backend

_state = threading.local()


@contextlib.contextmanager
def _sanctioned():
    """Inside the block, NumPy may work on DeviceArrays: an operator or method of one is running."""
    depth = getattr(_state, "depth", 0)
    _state.depth = depth + 1
    try:
        yield
    finally:
        _state.depth = depth


def _refuse(what):
    raise TypeError(f"{what} was called on a device array: take the array module from the inputs "
                    "(tinyclip.backend.get_array_module), as CuPy arrays reach no NumPy function")


def _refuse_host_arrays(what, values):
    """CuPy takes no numpy.ndarray operand (0-d ones included): neither does the stand-in."""
    for value in values:
        if isinstance(value, (list, tuple)):
            _refuse_host_arrays(what, value)
        elif isinstance(value, numpy.ndarray) and not isinstance(value, DeviceArray):
            raise TypeError(f"{what}: a host (NumPy) array of shape {value.shape} met a device array; "
                            "move it with tinyclip.backend.asarray first")


def _host_view(value):
    """The same memory as a plain ndarray (lists, tuples and dicts walked), for NumPy to work on."""
    if isinstance(value, DeviceArray):
        return value.view(numpy.ndarray)
    if isinstance(value, (list, tuple)):
        return type(value)(_host_view(item) for item in value)
    if isinstance(value, dict):
        return {key: _host_view(item) for key, item in value.items()}
    return value


def _to_device(value):
    """NumPy's result as DeviceArrays: 0-d arrays in place of NumPy scalars, tuples walked."""
    if isinstance(value, numpy.ndarray):
        return value if isinstance(value, DeviceArray) else value.view(DeviceArray)
    if isinstance(value, numpy.generic):
        return numpy.asarray(value).view(DeviceArray)
    if isinstance(value, tuple):
        return tuple(_to_device(item) for item in value)
    return value


class DeviceArray(numpy.ndarray):
    """An array "on the device": operators, methods and ``strict`` functions work; NumPy's functions raise."""

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        what = f"numpy.{ufunc.__name__}" + ("" if method == "__call__" else f".{method}")
        out = kwargs.get("out") or ()
        operands = (inputs[0],) + inputs[2:] if method == "at" else inputs   # "at" may index with host arrays
        _refuse_host_arrays(what, operands + tuple(out))
        if not getattr(_state, "depth", 0):
            _refuse(what)
        if out:
            kwargs["out"] = tuple(_host_view(array) for array in out)
        result = getattr(ufunc, method)(*(_host_view(x) for x in inputs), **kwargs)
        if out:
            return out[0] if len(out) == 1 else out
        return _to_device(result)

    def __array_function__(self, function, types, args, kwargs):
        if not getattr(_state, "depth", 0):
            _refuse(f"numpy.{function.__name__}")
        return _to_device(function(*_host_view(args), **_host_view(kwargs)))

    def get(self):
        """A host copy, as ``cupy.ndarray.get()`` gives."""
        return numpy.array(self.view(numpy.ndarray))

    def __repr__(self):
        return f"DeviceArray({self.view(numpy.ndarray)!r})"

    def __str__(self):
        return str(self.view(numpy.ndarray))


def _with_numpy_allowed(method):
    """The method with NumPy let in; its result on the device (NumPy's float16 mean makes a plain array)."""
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        with _sanctioned():
            return _to_device(method(self, *args, **kwargs))
    return call


# what a cupy.ndarray does itself: every operator, and the methods that NumPy implements with ufuncs
_OPERATORS_AND_METHODS = (
    "__add__", "__radd__", "__iadd__", "__sub__", "__rsub__", "__isub__", "__mul__", "__rmul__", "__imul__",
    "__truediv__", "__rtruediv__", "__itruediv__", "__floordiv__", "__rfloordiv__", "__ifloordiv__",
    "__mod__", "__rmod__", "__imod__", "__pow__", "__rpow__", "__ipow__", "__matmul__", "__rmatmul__",
    "__neg__", "__pos__", "__abs__", "__invert__", "__and__", "__rand__", "__iand__", "__or__", "__ror__",
    "__ior__", "__xor__", "__rxor__", "__ixor__", "__lshift__", "__rshift__", "__ilshift__", "__irshift__",
    "__lt__", "__le__", "__gt__", "__ge__", "__eq__", "__ne__",
    "sum", "prod", "mean", "var", "std", "max", "min", "all", "any", "cumsum", "clip", "round", "dot", "conj",
)
for _name in _OPERATORS_AND_METHODS:
    setattr(DeviceArray, _name, _with_numpy_allowed(getattr(numpy.ndarray, _name)))


# ---- the array module ---------------------------------------------------------------------------------

def _device_function(name, function, takes_host_data=False):
    """``function`` over DeviceArrays: host arrays refused (unless it moves data in), results on the device."""
    @functools.wraps(function)
    def call(*args, **kwargs):
        if not takes_host_data:
            _refuse_host_arrays(f"strict.{name}", args + tuple(kwargs.values()))
        out = kwargs.get("out")
        result = function(*_host_view(args), **_host_view(kwargs))
        return out if out is not None else _to_device(result)
    return call


class _Ufunc:
    """A NumPy ufunc whose call and methods take and give DeviceArrays."""

    def __init__(self, ufunc):
        self._ufunc = ufunc
        self.__name__ = ufunc.__name__

    def __call__(self, *args, **kwargs):
        return self._method("__call__", args, kwargs)

    def _method(self, method, args, kwargs):
        operands = (args[0],) + args[2:] if method == "at" else args
        _refuse_host_arrays(f"strict.{self.__name__}", operands + tuple(kwargs.values()))
        out = kwargs.get("out")
        result = getattr(self._ufunc, method)(*_host_view(args), **_host_view(kwargs))
        return out if out is not None else _to_device(result)

    def __getattr__(self, name):
        if name in ("reduce", "accumulate", "outer", "at"):
            return lambda *args, **kwargs: self._method(name, args, kwargs)
        return getattr(self._ufunc, name)


class _Generator:
    """CuPy's ``random.Generator`` as far as tinyclip uses it (it has no ``permutation``)."""

    def __init__(self, seed):
        self._generator = numpy.random.default_rng(seed)

    def standard_normal(self, size=None, dtype=numpy.float64):
        return _to_device(numpy.asarray(self._generator.standard_normal(size=size, dtype=dtype)))

    def random(self, size=None, dtype=numpy.float64):
        return _to_device(numpy.asarray(self._generator.random(size=size, dtype=dtype)))

    def integers(self, low, high=None, size=None):
        return _to_device(numpy.asarray(self._generator.integers(low, high, size=size)))


class _Namespace(types.ModuleType):
    """A NumPy namespace (numpy, numpy.linalg) with every function wrapped; types and constants as they are."""

    _HOST_DATA = ("asarray", "array", "asanyarray", "ascontiguousarray")   # how data reaches the device

    def __init__(self, name, source):
        super().__init__(name)
        self._source = source

    def __getattr__(self, name):
        value = getattr(self._source, name)
        if isinstance(value, numpy.ufunc):
            value = _Ufunc(value)
        elif callable(value) and not isinstance(value, type):
            value = _device_function(name, value, takes_host_data=name in self._HOST_DATA)
        elif isinstance(value, types.ModuleType):
            raise AttributeError(f"strict.{name}: only linalg and random are stood in for")
        setattr(self, name, value)
        return value


strict = _Namespace("strict", numpy)
strict.linalg = _Namespace("strict.linalg", numpy.linalg)
strict.random = types.SimpleNamespace(default_rng=_Generator)
# the one piece of cupy.cuda tinyclip touches: waiting for the current stream before MPI reads a buffer
strict.cuda = types.SimpleNamespace(get_current_stream=lambda: types.SimpleNamespace(synchronize=lambda: None))


def install(monkeypatch):
    """For one test: the "cupy" backend is ``strict``, and ``get_array_module`` knows DeviceArrays."""
    numpy_aware = backend.get_array_module

    def get_array_module(*arrays):
        for array in arrays:
            if isinstance(array.data if getattr(array, "is_tensor", False) else array, DeviceArray):
                return strict
        return numpy_aware(*arrays)

    monkeypatch.setattr(backend, "get_array_module", get_array_module)
    monkeypatch.setattr(backend, "_cupy", strict)
    monkeypatch.setattr(backend, "_cupy_probed", True)
    return strict
