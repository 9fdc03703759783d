"""Reverse-mode automatic differentiation over NumPy / CuPy arrays.

A ``Tensor`` wraps one array. Every differentiable op is a ``Function`` with
``forward(ctx, *arrays)`` and ``backward(ctx, grad)`` written by hand over raw
arrays (the pattern of minitorch and PyTorch's autograd.Function); calling
``SomeFunction.apply(...)`` runs the forward and, when gradients are wanted,
records a node that points at the inputs. ``Tensor.backward()`` walks those
nodes in reverse topological order (micrograd's walk, on arrays), adds each
local gradient into its inputs, and frees what the forward saved as soon as
it has been used, so peak memory is that of one forward plus the gradients.

This module knows no op: ``Tensor``'s operators and array-like methods
(``+``, ``@``, ``[...]``, ``.sum()``, ...) are attached by
``tinyclip.functional``, which defines the ops, so that imports run one way
(backend → autograd → functional).

Only leaf tensors with ``requires_grad=True`` (parameters, inputs) keep a
``.grad``; gradients of intermediate results live only during the walk.
Backward functions must not modify their ``grad`` argument in place: one
gradient array may be handed to several inputs.
"""

import contextlib
import numbers
import threading


from . import backend

_state = threading.local()


def is_grad_enabled():
    return getattr(_state, "grad_enabled", True)


@contextlib.contextmanager
def no_grad():
    """Inside the block ops record no graph (evaluation, optimiser updates)."""
    previous = is_grad_enabled()
    _state.grad_enabled = False
    try:
        yield
    finally:
        _state.grad_enabled = previous


@contextlib.contextmanager
def enable_grad():
    previous = is_grad_enabled()
    _state.grad_enabled = True
    try:
        yield
    finally:
        _state.grad_enabled = previous


def unbroadcast(grad, shape):
    """Sum ``grad`` down to ``shape``: the adjoint of broadcasting ``shape`` up to ``grad.shape``."""
    if grad.shape == tuple(shape):
        return grad
    extra = grad.ndim - len(shape)
    axes = tuple(range(extra)) + tuple(extra + i for i, size in enumerate(shape)
                                       if size == 1 and grad.shape[extra + i] != 1)
    grad = grad.sum(axis=axes, keepdims=True) if axes else grad
    return grad.reshape(shape)


class Context:
    """What a Function's forward leaves for its backward.

    ``needs_input_grad[i]`` says whether input i wants a gradient, so that a
    backward can skip work nobody will use; ``save_for_backward`` keeps arrays
    and ``saved_tensors`` gives them back. Any other attribute may be set too.
    """

    def __init__(self, needs_input_grad):
        self.needs_input_grad = needs_input_grad
        self.saved_tensors = ()

    def save_for_backward(self, *arrays):
        self.saved_tensors = arrays

    def release(self):
        """Drop everything saved; called once the backward has run."""
        needs = self.needs_input_grad
        self.__dict__.clear()
        self.needs_input_grad = needs


class Node:
    """One recorded op in the graph: the Function, its context and its input Tensors."""

    __slots__ = ("function", "ctx", "inputs")

    def __init__(self, function, ctx, inputs):
        self.function = function
        self.ctx = ctx
        self.inputs = inputs   # one entry per positional input: a Tensor or None for constants


class Function:
    """Base class of every differentiable op.

    Subclasses define two static methods over raw arrays:
    ``forward(ctx, *inputs, **options) -> array`` and
    ``backward(ctx, grad) -> one gradient per positional input`` (a tuple, or a
    bare array for one input; ``None`` where no gradient is needed).
    Positional inputs are what can be differentiated (``None`` for an absent
    optional input, whose gradient is then ``None``); keyword options
    (axes, shapes, flags) are not. ``float_inputs = False`` lets integer data
    through (reshape, indexing, concatenation). ``optional_inputs`` lists the
    positions where ``None`` means "absent" (a linear layer's bias); anywhere
    else ``apply`` refuses None, which would otherwise reach the arithmetic.
    """

    float_inputs = True
    optional_inputs = ()

    @staticmethod
    def forward(ctx, *inputs, **options):
        raise NotImplementedError

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError

    @classmethod
    def apply(cls, *inputs, **options):
        arrays = _as_arrays(cls, inputs)
        record = is_grad_enabled()
        needs = tuple(record and isinstance(t, Tensor) and t.requires_grad for t in inputs)
        ctx = Context(needs)
        out = Tensor(cls.forward(ctx, *arrays, **options))
        if any(needs):
            out.requires_grad = True
            out._node = Node(cls, ctx, tuple(t if isinstance(t, Tensor) else None for t in inputs))
        return out


def _as_ndarray(array):
    """NumPy turns 0-d results into immutable scalars (numpy.float64); make them arrays again."""
    return backend.get_array_module(array).asarray(array) if array.ndim == 0 else array


def _base_of(array):
    """The array that owns the memory ``array`` looks at (itself if it owns it)."""
    while array.base is not None:
        array = array.base
    return array


def _op_name(cls):
    return cls.__name__.lower()


def _as_arrays(cls, inputs):
    """Unwrap Tensors; turn Python numbers into 0-d arrays of the inputs' float type; check dtypes and devices."""
    if not inputs:
        raise TypeError(f"{_op_name(cls)}: needs at least one input")
    raw = [t.data if isinstance(t, Tensor) else t for t in inputs]
    xp = backend.get_array_module(*[a for a in raw if a is not None])
    like = next((a for a in raw if hasattr(a, "dtype") and a.dtype.kind == "f"), None)
    dtype = like.dtype if like is not None else backend.default_dtype()
    arrays = []
    for position, value in enumerate(raw):
        if value is None:
            if position not in cls.optional_inputs:
                raise TypeError(f"{_op_name(cls)}: input {position} is None; it must be a Tensor, an array or a number")
            arrays.append(None)     # an optional input that is absent (a linear layer without bias)
            continue
        if isinstance(value, numbers.Number) and not isinstance(value, bool):
            value = xp.asarray(value, dtype=dtype)
        elif isinstance(value, (list, tuple)):
            value = xp.asarray(value)
            value = value.astype(dtype) if value.dtype.kind == "f" else value
        elif not hasattr(value, "dtype") or not hasattr(value, "shape"):
            raise TypeError(f"{_op_name(cls)}: input {position} must be a Tensor, an array or a number, "
                            f"got {type(value).__name__}")
        elif backend.get_array_module(value) is not xp:
            raise TypeError(f"{_op_name(cls)}: inputs live on different backends (NumPy and CuPy); "
                            "move them with tinyclip.backend.asarray first")
        if cls.float_inputs and value.dtype.kind != "f":
            raise TypeError(f"{_op_name(cls)}: input {position} has dtype {value.dtype}, but this op needs "
                            "floating-point inputs (cast with .astype(float32) first)")
        arrays.append(value)
    return arrays


class Tensor:
    """An array plus what autograd needs: ``requires_grad``, ``grad`` and the node that made it."""

    is_tensor = True          # lets backend.get_array_module see through Tensors
    __array_ufunc__ = None    # numpy_array * tensor defers to Tensor.__rmul__

    def __init__(self, data, requires_grad=False):
        if isinstance(data, Tensor):
            data = data.data
        if not hasattr(data, "dtype") or not hasattr(data, "shape"):
            raise TypeError(f"Tensor wraps a NumPy or CuPy array, got {type(data).__name__}; use tinyclip.tensor()")
        if requires_grad and data.dtype.kind != "f":
            raise TypeError(f"only floating-point tensors can require gradients, got dtype {data.dtype}")
        self.data = data
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self._node = None

    # ---- array facts -------------------------------------------------------------
    shape = property(lambda self: self.data.shape)
    dtype = property(lambda self: self.data.dtype)
    ndim = property(lambda self: self.data.ndim)
    size = property(lambda self: self.data.size)
    xp = property(lambda self: backend.get_array_module(self.data))
    backend = property(lambda self: backend.backend_of(self.data))

    @property
    def is_leaf(self):
        """True for a tensor no recorded op made (a parameter, an input): the ones whose ``.grad`` backward fills."""
        return self._node is None

    def __len__(self):
        return len(self.data)

    def __repr__(self):
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor(shape={self.shape}, dtype={self.dtype}, backend={self.backend}{grad})"

    def item(self):
        return self.data.item()

    def numpy(self):
        """The data as a NumPy array (copied off the GPU when needed)."""
        return backend.to_numpy(self.data)

    def detach(self):
        """The same data, cut off from the graph."""
        return Tensor(self.data)

    def requires_grad_(self, flag=True):
        if self._node is not None:
            raise RuntimeError("requires_grad_ is for leaf tensors; this one was computed by an op")
        if flag and self.dtype.kind != "f":
            raise TypeError(f"only floating-point tensors can require gradients, got dtype {self.dtype}")
        self.requires_grad = bool(flag)
        return self

    def zero_grad(self):
        self.grad = None

    # ---- the backward walk ---------------------------------------------------------
    def backward(self, grad=None):
        """Add d(self)/d(leaf) · grad into ``.grad`` of every leaf that requires a gradient.

        ``grad`` defaults to 1 for a scalar (one-element) tensor. The graph is
        freed as the walk goes: a second backward through it is an error.
        """
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad: "
                               "no input of the computation had requires_grad=True")
        xp = self.xp
        if grad is None:
            if self.size != 1:
                raise RuntimeError(f"backward() on a tensor of shape {self.shape} needs an explicit gradient "
                                   "of the same shape (only a one-element output has an implied gradient of 1)")
            grad = xp.ones_like(self.data)
        else:
            grad = _as_ndarray(grad.data if isinstance(grad, Tensor) else xp.asarray(grad, dtype=self.dtype))
            if grad.shape != self.shape:
                raise ValueError(f"backward(): gradient shape {grad.shape} does not match tensor shape {self.shape}")
        grads = {id(self): grad}
        # A leaf's .grad must be an array of its own that an optimiser may update in place: not
        # read-only, not a broadcast (zero strides), not sharing memory with the caller's gradient
        # or with another leaf's .grad. Owners of memory already handed out are remembered by id.
        handed_out = {id(_base_of(grad))}
        for tensor in reversed(_topological_order(self)):
            grad = grads.pop(id(tensor), None)
            if grad is None:
                continue
            grad = _as_ndarray(grad)
            node = tensor._node
            if node is None:   # a leaf: accumulate
                owner = id(_base_of(grad))
                if owner in handed_out or 0 in grad.strides or not getattr(grad.flags, "writeable", True):
                    grad = grad.copy()
                    owner = id(grad)
                handed_out.add(owner)
                tensor.grad = grad if tensor.grad is None else _as_ndarray(tensor.grad + grad)
                continue
            if node.ctx is None:
                raise RuntimeError("backward() through a graph that was already freed: "
                                   "run the forward again before a second backward")
            input_grads = node.function.backward(node.ctx, grad)
            if not isinstance(input_grads, tuple):
                input_grads = (input_grads,)
            if len(input_grads) != len(node.inputs):
                raise RuntimeError(f"{node.function.__name__}.backward returned {len(input_grads)} gradients "
                                   f"for {len(node.inputs)} inputs")
            for parent, parent_grad in zip(node.inputs, input_grads):
                if parent is None or parent_grad is None or not parent.requires_grad:
                    continue
                if parent_grad.shape != parent.shape:
                    raise RuntimeError(f"{node.function.__name__}.backward gave a gradient of shape "
                                       f"{parent_grad.shape} for an input of shape {parent.shape}")
                if parent_grad.dtype != parent.dtype:
                    parent_grad = parent_grad.astype(parent.dtype)
                key = id(parent)
                grads[key] = parent_grad if key not in grads else grads[key] + parent_grad
            node.ctx.release()
            node.ctx = None
            node.inputs = ()

    # The operators (+, *, @, indexing, ...) and array-like methods (sum, reshape, exp, ...) are
    # attached by tinyclip.functional, which defines the ops: autograd sits below the ops and
    # never imports them (DESIGN.md's layering).


def _topological_order(root):
    """Tensors reachable from ``root`` through recorded nodes, inputs before outputs (iterative DFS)."""
    order, visited = [], set()
    stack = [(root, False)]
    while stack:
        tensor, expanded = stack.pop()
        if expanded:
            order.append(tensor)
            continue
        if id(tensor) in visited:
            continue
        visited.add(id(tensor))
        stack.append((tensor, True))
        if tensor._node is not None:
            for parent in tensor._node.inputs:
                if parent is not None and parent.requires_grad and id(parent) not in visited:
                    stack.append((parent, False))
    return order


def tensor(data, requires_grad=False, dtype=None, backend_name=None):
    """A new leaf Tensor from an array, a list or a number.

    Python floats and lists of floats get the default float type (float32);
    NumPy / CuPy arrays keep their dtype unless ``dtype`` is given; the backend
    is the array's own, or ``backend_name`` / the default for Python data.
    Raises TypeError for Python data that is not all numbers (None would
    otherwise become NaN or an object array).
    """
    if isinstance(data, Tensor):
        data = data.data
    if hasattr(data, "dtype") and hasattr(data, "shape") and backend_name is None:
        array = backend.get_array_module(data).asarray(data, dtype=dtype)   # also turns NumPy scalars into arrays
    else:
        if not hasattr(data, "dtype") and backend.asarray(data, "numpy").dtype.kind not in "biufc":
            raise TypeError(f"tensor: data must be numbers (or arrays of them), got {data!r:.80}")
        array = backend.asarray(data, backend_name, dtype)
        if dtype is None and array.dtype.kind == "f" and not hasattr(data, "dtype"):
            array = array.astype(backend.default_dtype())
    return Tensor(array, requires_grad=requires_grad)
