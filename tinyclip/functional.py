"""Every differentiable op: a ``Function`` with forward and backward side by side.

Each op is one class whose ``forward`` and ``backward`` work on raw arrays
(NumPy or CuPy; the array module is taken from the inputs), with a one-line
math docstring, followed by the lowercase function users call. The set of
primitives is small (arithmetic, matmul, reductions, shape ops, indexing);
the heavy ops of a transformer are fused with hand-derived backwards so they
neither keep nor recompute intermediate results they do not need: layer norm,
GELU / QuickGELU, softmax / log-softmax / log-sum-exp, L2 normalisation,
embedding gather, the linear layer and scaled-dot-product attention. The
convolutional image tower adds two more: ``patches`` (im2col for
channels-last images; a convolution is ``linear(patches(x), W)``) and batch
norm.

The element-wise and row-wise work of GELU, QuickGELU, layer norm and the
attention softmax is written once, as a row function beside its op
(``_gelu_tanh_rows``, ...), and run through ``parallel.map_rows``, which
cuts it into row blocks on a thread pool so that one process uses every
core (one call on CuPy); every output row depends only on the same input
rows, so the result is the same bit for bit at every thread count.

Conventions: ``g`` is the gradient of the loss with respect to the op's
output; broadcasting is undone by ``autograd.unbroadcast``; a backward
returns one gradient per positional input (``None`` where none is needed).
Errors: every op raises TypeError for an input that is None (unless it is an
optional one, such as a bias), not a Tensor, array or number, integer data
where floats are needed, or on another backend than the others
(``autograd.Function.apply``); each function lists its own errors besides.

This module also attaches ``Tensor``'s operators and methods (``+``, ``@``,
indexing, ``.sum()``, ``.reshape()``, ...; the end of the file): they are
these ops, and autograd, below this module, never imports it.

References: the GELU paper (Hendrycks & Gimpel 2016) for GELU and its tanh
approximation; CLIP's QuickGELU x·σ(1.702x); layer norm (Ba et al. 2016);
attention (Vaswani et al. 2017); batch norm (Ioffe & Szegedy 2015).
"""

import math

from . import backend, parallel
from .autograd import Function, Tensor, unbroadcast

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_TANH_COEFF = 0.044715
_QUICK_GELU_ALPHA = 1.702


def _xp(*arrays):
    return backend.get_array_module(*arrays)


def _broadcast_shape(name, a, b):
    """The broadcast shape of two inputs, or an error that shows both shapes."""
    try:
        return _xp(a, b).broadcast_shapes(a.shape, b.shape)
    except ValueError:
        raise ValueError(f"{name}: shapes {a.shape} and {b.shape} cannot be broadcast together") from None


def _normalize_axes(axis, ndim):
    """A tuple of non-negative axes (None means all)."""
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(f"axis {a} is out of range for an input with {ndim} dimensions")
    return tuple(sorted(a % ndim for a in axes))


def _flat(a):
    """``a`` as one row of elements (a view when ``a`` is C-contiguous): element-wise work is cut into blocks of it."""
    return a.reshape(-1)


def _rows(a):
    """``a`` as rows of its last axis, (N, last) (a view when ``a`` is C-contiguous): row-wise work is cut into blocks of rows."""
    return a.reshape(-1, a.shape[-1])


def _stable_sigmoid(xp, x):
    """σ(x) without overflow: exp is only ever taken of -|x|."""
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


# ---------------------------------------------------------------------------------
# Elementwise arithmetic (broadcasting)
# ---------------------------------------------------------------------------------

class Add(Function):
    @staticmethod
    def forward(ctx, a, b):
        """f(a, b) = a + b"""
        _broadcast_shape("add", a, b)
        ctx.shapes = a.shape, b.shape
        return a + b

    @staticmethod
    def backward(ctx, g):
        """df/da = 1, df/db = 1"""
        a_shape, b_shape = ctx.shapes
        return unbroadcast(g, a_shape), unbroadcast(g, b_shape)


def add(a, b):
    """a + b, broadcasting.

    Raises ValueError when the shapes do not broadcast; TypeError (every op) for None, a non-number, integer
    data or inputs on two backends.
    """
    return Add.apply(a, b)


class Sub(Function):
    @staticmethod
    def forward(ctx, a, b):
        """f(a, b) = a - b"""
        _broadcast_shape("sub", a, b)
        ctx.shapes = a.shape, b.shape
        return a - b

    @staticmethod
    def backward(ctx, g):
        """df/da = 1, df/db = -1"""
        a_shape, b_shape = ctx.shapes
        return unbroadcast(g, a_shape), (unbroadcast(-g, b_shape) if ctx.needs_input_grad[1] else None)


def sub(a, b):
    """a − b, broadcasting.

    Raises ValueError when the shapes do not broadcast; TypeError (every op) for None, a non-number, integer
    data or inputs on two backends.
    """
    return Sub.apply(a, b)


class Mul(Function):
    @staticmethod
    def forward(ctx, a, b):
        """f(a, b) = a · b"""
        _broadcast_shape("mul", a, b)
        ctx.save_for_backward(a, b)
        return a * b

    @staticmethod
    def backward(ctx, g):
        """df/da = b, df/db = a"""
        a, b = ctx.saved_tensors
        da = unbroadcast(g * b, a.shape) if ctx.needs_input_grad[0] else None
        db = unbroadcast(g * a, b.shape) if ctx.needs_input_grad[1] else None
        return da, db


def mul(a, b):
    """a · b elementwise, broadcasting.

    Raises ValueError when the shapes do not broadcast; TypeError (every op) for None, a non-number, integer
    data or inputs on two backends.
    """
    return Mul.apply(a, b)


class Div(Function):
    @staticmethod
    def forward(ctx, a, b):
        """f(a, b) = a / b"""
        _broadcast_shape("div", a, b)
        ctx.save_for_backward(a, b)
        return a / b

    @staticmethod
    def backward(ctx, g):
        """df/da = 1/b, df/db = -a/b²"""
        a, b = ctx.saved_tensors
        g_over_b = g / b
        da = unbroadcast(g_over_b, a.shape) if ctx.needs_input_grad[0] else None
        db = unbroadcast(-g_over_b * a / b, b.shape) if ctx.needs_input_grad[1] else None
        return da, db


def div(a, b):
    """a / b elementwise, broadcasting.

    Raises ValueError when the shapes do not broadcast; TypeError (every op) for None, a non-number, integer
    data or inputs on two backends.
    """
    return Div.apply(a, b)


class Neg(Function):
    @staticmethod
    def forward(ctx, x):
        """f(x) = -x"""
        return -x

    @staticmethod
    def backward(ctx, g):
        """f'(x) = -1"""
        return -g


def neg(x):
    """−x.

    Raises TypeError (every op) for None, a non-number, integer data or inputs on two backends.
    """
    return Neg.apply(x)


class Pow(Function):
    @staticmethod
    def forward(ctx, x, exponent):
        """f(x) = x^p for a constant scalar p"""
        ctx.save_for_backward(x)
        ctx.exponent = exponent
        return x ** exponent

    @staticmethod
    def backward(ctx, g):
        """f'(x) = p · x^(p-1)"""
        (x,) = ctx.saved_tensors
        p = ctx.exponent
        return g * (p * x ** (p - 1))


def pow(x, exponent):
    """x ** exponent, exponent a Python number (a differentiable exponent is exp(p · log x)).

    Raises TypeError for a Tensor or array exponent, and as every op.
    """
    if isinstance(exponent, Tensor) or hasattr(exponent, "shape"):
        raise TypeError("pow: the exponent must be a Python number; write exp(p * log(x)) for a tensor exponent")
    return Pow.apply(x, exponent=exponent)


# ---------------------------------------------------------------------------------
# Elementwise functions
# ---------------------------------------------------------------------------------

class Exp(Function):
    @staticmethod
    def forward(ctx, x):
        """f(x) = e^x"""
        y = _xp(x).exp(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        """f'(x) = e^x"""
        (y,) = ctx.saved_tensors
        return g * y


def exp(x):
    """e^x elementwise.

    Raises TypeError (every op) for None, a non-number, integer data or inputs on two backends.
    """
    return Exp.apply(x)


class Log(Function):
    @staticmethod
    def forward(ctx, x):
        """f(x) = log x"""
        ctx.save_for_backward(x)
        return _xp(x).log(x)

    @staticmethod
    def backward(ctx, g):
        """f'(x) = 1/x"""
        (x,) = ctx.saved_tensors
        return g / x


def log(x):
    """log x elementwise (−inf at 0, NaN below: NumPy's own values).

    Raises TypeError (every op) for None, a non-number, integer data or inputs on two backends.
    """
    return Log.apply(x)


class Sqrt(Function):
    @staticmethod
    def forward(ctx, x):
        """f(x) = √x"""
        y = _xp(x).sqrt(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        """f'(x) = 1 / (2√x)"""
        (y,) = ctx.saved_tensors
        return g / (2 * y)


def sqrt(x):
    """√x elementwise.

    Raises TypeError (every op) for None, a non-number, integer data or inputs on two backends.
    """
    return Sqrt.apply(x)


class Tanh(Function):
    @staticmethod
    def forward(ctx, x):
        """f(x) = tanh x"""
        y = _xp(x).tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        """f'(x) = 1 - tanh² x"""
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


def tanh(x):
    """tanh x elementwise.

    Raises TypeError (every op) for None, a non-number, integer data or inputs on two backends.
    """
    return Tanh.apply(x)


class Sigmoid(Function):
    @staticmethod
    def forward(ctx, x):
        """f(x) = σ(x) = 1 / (1 + e^-x)"""
        y = _stable_sigmoid(_xp(x), x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        """f'(x) = σ(x)(1 - σ(x))"""
        (y,) = ctx.saved_tensors
        return g * y * (1 - y)


def sigmoid(x):
    """σ(x) = 1 / (1 + e^−x) elementwise, without overflow.

    Raises TypeError (every op) for None, a non-number, integer data or inputs on two backends.
    """
    return Sigmoid.apply(x)


class LogSigmoid(Function):
    @staticmethod
    def forward(ctx, x):
        """f(x) = log σ(x) = min(x, 0) - log1p(e^-|x|), finite for every finite x"""
        xp = _xp(x)
        ctx.save_for_backward(x)
        return xp.minimum(x, 0) - xp.log1p(xp.exp(-xp.abs(x)))

    @staticmethod
    def backward(ctx, g):
        """f'(x) = σ(-x)"""
        (x,) = ctx.saved_tensors
        return g * _stable_sigmoid(_xp(x), -x)


def log_sigmoid(x):
    """log σ(x) elementwise, finite for every finite x.

    Raises TypeError (every op) for None, a non-number, integer data or inputs on two backends.
    """
    return LogSigmoid.apply(x)


class Softplus(Function):
    @staticmethod
    def forward(ctx, x):
        """f(x) = log(1 + e^x) = max(x, 0) + log1p(e^-|x|)"""
        xp = _xp(x)
        ctx.save_for_backward(x)
        return xp.maximum(x, 0) + xp.log1p(xp.exp(-xp.abs(x)))

    @staticmethod
    def backward(ctx, g):
        """f'(x) = σ(x)"""
        (x,) = ctx.saved_tensors
        return g * _stable_sigmoid(_xp(x), x)


def softplus(x):
    """log(1 + e^x) elementwise, without overflow.

    Raises TypeError (every op) for None, a non-number, integer data or inputs on two backends.
    """
    return Softplus.apply(x)


class ReLU(Function):
    @staticmethod
    def forward(ctx, x):
        """f(x) = max(x, 0)"""
        ctx.save_for_backward(x > 0)
        return _xp(x).maximum(x, 0)

    @staticmethod
    def backward(ctx, g):
        """f'(x) = 1 if x > 0 else 0"""
        (positive,) = ctx.saved_tensors
        return g * positive


def relu(x):
    """max(x, 0) elementwise.

    Raises TypeError (every op) for None, a non-number, integer data or inputs on two backends.
    """
    return ReLU.apply(x)


class GELUTanh(Function):
    @staticmethod
    def forward(ctx, x):
        """f(x) = x/2 · (1 + tanh(√(2/π) (x + 0.044715 x³)))   (the tanh approximation)"""
        xp = _xp(x)
        y, t = xp.empty(x.shape, x.dtype), xp.empty(x.shape, x.dtype)   # C order, so _flat gives views
        parallel.map_rows(_gelu_tanh_rows, _flat(y), _flat(x), _flat(t))
        ctx.save_for_backward(x, t)
        return y

    @staticmethod
    def backward(ctx, g):
        """f'(x) = (1 + t)/2 + x/2 · (1 - t²) · √(2/π) (1 + 3·0.044715 x²),  t = tanh(...)"""
        x, t = ctx.saved_tensors
        dx = _xp(x).empty(x.shape, x.dtype)
        parallel.map_rows(_gelu_tanh_backward_rows, _flat(dx), _flat(x), _flat(t), _flat(g))
        return dx


def _gelu_tanh_rows(y, x, t):
    """t = tanh(√(2/π) · x · (1 + 0.044715 x²)) and y = x/2 · (1 + t) on a block of elements, into y and t."""
    xp = _xp(x)
    xp.multiply(x, x, out=t)
    t *= _GELU_TANH_COEFF
    t += 1
    t *= x
    t *= _SQRT_2_OVER_PI
    xp.tanh(t, out=t)
    xp.add(t, 1, out=y)
    y *= x
    y *= 0.5


def _gelu_tanh_backward_rows(dx, x, t, g):
    """dx = g · f'(x) on a block of elements, from x and the forward's t (GELUTanh.backward's formula)."""
    xp = _xp(x)
    # beyond |x| = 100 tanh is ±1 in every float type, so capping x² changes no result,
    # but keeps (1 - t²) · x² from becoming 0 · ∞ = nan in float16
    xp.multiply(x, x, out=dx)
    xp.minimum(dx, 1e4, out=dx)
    dx *= 3 * _GELU_TANH_COEFF
    dx += 1
    dx *= _SQRT_2_OVER_PI * 0.5
    dx *= 1 - t * t            # before x, so that 0 · (huge x) never meets ∞ in float16
    dx *= x
    dx += 0.5 * (1 + t)
    dx *= g


class GELU(Function):
    @staticmethod
    def forward(ctx, x):
        """f(x) = x · Φ(x),  Φ(x) = (1 + erf(x/√2)) / 2   (exact)"""
        ctx.save_for_backward(x)
        y = _xp(x).empty(x.shape, x.dtype)
        parallel.map_rows(_gelu_rows, _flat(y), _flat(x))
        return y

    @staticmethod
    def backward(ctx, g):
        """f'(x) = Φ(x) + x · φ(x),  φ(x) = e^(-x²/2) / √(2π)"""
        (x,) = ctx.saved_tensors
        dx = _xp(x).empty(x.shape, x.dtype)
        parallel.map_rows(_gelu_backward_rows, _flat(dx), _flat(x), _flat(g))
        return dx


def _gelu_rows(y, x):
    """y = x · Φ(x) on a block of elements."""
    _xp(x).multiply(0.5 * x, 1 + backend.erf(x * (1 / math.sqrt(2))), out=y)


def _gelu_backward_rows(dx, x, g):
    """dx = g · (Φ(x) + x · φ(x)) on a block of elements."""
    xp = _xp(x)
    cdf = 0.5 * (1 + backend.erf(x * (1 / math.sqrt(2))))
    pdf = xp.exp(-0.5 * x * x) * (1 / math.sqrt(2 * math.pi))
    xp.multiply(g, cdf + x * pdf, out=dx)


def gelu(x, approximate="tanh"):
    """GELU; ``approximate='tanh'`` (SigLIP, GPT-2) or ``'none'`` (exact, erf-based).

    Raises ValueError for another ``approximate``; TypeError as every op.
    """
    if approximate == "tanh":
        return GELUTanh.apply(x)
    if approximate == "none":
        return GELU.apply(x)
    raise ValueError(f"gelu: approximate must be 'tanh' or 'none', got {approximate!r}")


class QuickGELU(Function):
    @staticmethod
    def forward(ctx, x):
        """f(x) = x · σ(1.702 x)   (OpenAI CLIP's activation)"""
        # σ(z) = (1 + tanh(z/2)) / 2 cannot overflow and takes three passes over one buffer where
        # the exp form takes ten over several; it loses relative precision only where σ is below
        # float precision anyway, which x · σ(1.702 x) cannot see
        xp = _xp(x)
        y, s = xp.empty(x.shape, x.dtype), xp.empty(x.shape, x.dtype)   # C order, so _flat gives views
        parallel.map_rows(_quick_gelu_rows, _flat(y), _flat(x), _flat(s))
        ctx.save_for_backward(x, s)
        return y

    @staticmethod
    def backward(ctx, g):
        """f'(x) = σ(1.702x) + 1.702 x σ(1.702x)(1 - σ(1.702x))"""
        x, s = ctx.saved_tensors
        dx = _xp(x).empty(x.shape, x.dtype)
        parallel.map_rows(_quick_gelu_backward_rows, _flat(dx), _flat(x), _flat(s), _flat(g))
        return dx


def _quick_gelu_rows(y, x, s):
    """s = σ(1.702 x) = (1 + tanh(0.851 x)) / 2 and y = x · s on a block of elements, into y and s."""
    xp = _xp(x)
    xp.multiply(x, 0.5 * _QUICK_GELU_ALPHA, out=s)
    xp.tanh(s, out=s)
    s += 1
    s *= 0.5
    xp.multiply(x, s, out=y)


def _quick_gelu_backward_rows(dx, x, s, g):
    """dx = g · s · (1 + 1.702 x (1 - s)) on a block of elements, s = σ(1.702 x) from the forward."""
    xp = _xp(x)
    xp.subtract(1, s, out=dx)      # one buffer, updated in place: these arrays are (B·T, 4D)
    dx *= x
    dx *= _QUICK_GELU_ALPHA
    dx += 1
    dx *= s
    dx *= g


def quick_gelu(x):
    """x · σ(1.702 x) elementwise (OpenAI CLIP's activation).

    Raises TypeError (every op) for None, a non-number, integer data or inputs on two backends.
    """
    return QuickGELU.apply(x)


# ---------------------------------------------------------------------------------
# Matrix products
# ---------------------------------------------------------------------------------

def _swap_last(x):
    return x.swapaxes(-1, -2)


class MatMul(Function):
    @staticmethod
    def forward(ctx, a, b):
        """f(A, B) = A·B over the last two axes, leading axes broadcast (1-D inputs as in NumPy)"""
        if a.ndim == 0 or b.ndim == 0:
            raise ValueError(f"matmul: inputs must have at least one dimension, got shapes {a.shape} and {b.shape}")
        k_a = a.shape[-1]
        k_b = b.shape[-2] if b.ndim > 1 else b.shape[0]
        if k_a != k_b:
            raise ValueError(f"matmul: shapes {a.shape} and {b.shape} do not line up "
                             f"(the first's last axis is {k_a}, the second's contracted axis is {k_b})")
        try:
            _xp(a, b).broadcast_shapes(a.shape[:-2], b.shape[:-2])
        except ValueError:
            raise ValueError(f"matmul: batch dimensions of {a.shape} and {b.shape} cannot be broadcast") from None
        ctx.save_for_backward(a, b)
        return a @ b

    @staticmethod
    def backward(ctx, g):
        """dA = G·Bᵀ, dB = Aᵀ·G, summed over broadcast batch axes"""
        a, b = ctx.saved_tensors
        # lift 1-D operands to matrices so one rule covers all cases: a (k,) -> (1, k), b (k,) -> (k, 1)
        a2 = a[None, :] if a.ndim == 1 else a
        b2 = b[:, None] if b.ndim == 1 else b
        batch = _xp(a, b).broadcast_shapes(a2.shape[:-2], b2.shape[:-2])
        g = g.reshape(batch + (a2.shape[-2], b2.shape[-1]))          # (..., n, m)
        da = db = None
        if ctx.needs_input_grad[0]:
            da = unbroadcast(g @ _swap_last(b2), a2.shape).reshape(a.shape)
        if ctx.needs_input_grad[1]:
            db = unbroadcast(_swap_last(a2) @ g, b2.shape).reshape(b.shape)
        return da, db


def matmul(a, b):
    """A @ B over the last two axes, leading axes broadcast (1-D inputs as in NumPy).

    Raises ValueError for a 0-d input, contracted axes that differ or batch axes that do not broadcast;
    TypeError (every op) for None, a non-number, integer data or inputs on two backends.
    """
    return MatMul.apply(a, b)


class Linear(Function):
    optional_inputs = (2,)     # bias may be None

    @staticmethod
    def forward(ctx, x, weight, bias=None):
        """f(x) = x·Wᵀ + b with W (out, in): PyTorch's layout, so published weights load as they are"""
        if weight.ndim != 2:
            raise ValueError(f"linear: weight must be 2-D (out, in), got shape {weight.shape}")
        if x.shape[-1] != weight.shape[1]:
            raise ValueError(f"linear: input of shape {x.shape} does not fit weight of shape {weight.shape} "
                             f"(input's last axis {x.shape[-1]} != weight's in-features {weight.shape[1]})")
        if bias is not None and bias.shape != (weight.shape[0],):
            raise ValueError(f"linear: bias must have shape ({weight.shape[0]},), got {bias.shape}")
        ctx.save_for_backward(x, weight)
        x2d = x.reshape(-1, x.shape[-1])                      # (N, in): one GEMM however many leading axes
        y = x2d @ weight.T                                     # (N, out)
        if bias is not None:
            y += bias
        return y.reshape(x.shape[:-1] + (weight.shape[0],))

    @staticmethod
    def backward(ctx, g):
        """dx = G·W, dW = Gᵀ·x, db = Σ G over all leading axes"""
        x, weight = ctx.saved_tensors
        g2d = g.reshape(-1, g.shape[-1])                       # (N, out)
        dx = (g2d @ weight).reshape(x.shape) if ctx.needs_input_grad[0] else None
        dweight = g2d.T @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None  # (out, in)
        dbias = g2d.sum(axis=0) if ctx.needs_input_grad[2] else None
        return dx, dweight, dbias


def linear(x, weight, bias=None):
    """x @ weight.T + bias, fused: one GEMM forward, two (three with bias) backward.

    Raises ValueError for a weight that is not 2-D (out, in), an input whose last axis is not ``in``, or a
    bias that is not (out,); TypeError as every op.
    """
    return Linear.apply(x, weight, bias)


# ---------------------------------------------------------------------------------
# Reductions
# ---------------------------------------------------------------------------------

def _expand_reduced(g, shape, axes, keepdims):
    """Put back the reduced axes of ``g`` as length 1 so it broadcasts against ``shape``."""
    if not keepdims:
        g = g.reshape(tuple(1 if i in axes else n for i, n in enumerate(shape)))
    return g


class Sum(Function):
    @staticmethod
    def forward(ctx, x, axis=None, keepdims=False):
        """f(x) = Σ x over the given axes"""
        ctx.shape, ctx.axes, ctx.keepdims = x.shape, _normalize_axes(axis, x.ndim), keepdims
        return x.sum(axis=ctx.axes, keepdims=keepdims)

    @staticmethod
    def backward(ctx, g):
        """df/dx = 1 (the gradient is copied back along the summed axes)"""
        g = _expand_reduced(g, ctx.shape, ctx.axes, ctx.keepdims)
        return _xp(g).broadcast_to(g, ctx.shape)


def sum(x, axis=None, keepdims=False):
    """Σ x over ``axis`` (an int, a tuple, or None for all).

    Raises ValueError for an axis out of range; TypeError (every op) for None, a non-number, integer data or
    inputs on two backends.
    """
    return Sum.apply(x, axis=axis, keepdims=keepdims)


class Mean(Function):
    @staticmethod
    def forward(ctx, x, axis=None, keepdims=False):
        """f(x) = Σ x / n over the given axes"""
        ctx.shape, ctx.axes, ctx.keepdims = x.shape, _normalize_axes(axis, x.ndim), keepdims
        if x.size == 0:
            raise ValueError(f"mean: input of shape {x.shape} is empty")
        return x.mean(axis=ctx.axes, keepdims=keepdims)

    @staticmethod
    def backward(ctx, g):
        """df/dx = 1/n"""
        count = math.prod(ctx.shape[a] for a in ctx.axes)
        g = _expand_reduced(g, ctx.shape, ctx.axes, ctx.keepdims) / count
        return _xp(g).broadcast_to(g, ctx.shape)


def mean(x, axis=None, keepdims=False):
    """The mean of x over ``axis`` (an int, a tuple, or None for all).

    Raises ValueError for an empty input or an axis out of range; TypeError (every op) for None, a non-
    number, integer data or inputs on two backends.
    """
    return Mean.apply(x, axis=axis, keepdims=keepdims)


class Max(Function):
    @staticmethod
    def forward(ctx, x, axis=None, keepdims=False):
        """f(x) = max x over the given axes"""
        if x.size == 0:
            raise ValueError(f"max: input of shape {x.shape} is empty")
        axes = _normalize_axes(axis, x.ndim)
        y = x.max(axis=axes, keepdims=True)
        ctx.save_for_backward(x == y)
        ctx.shape, ctx.axes, ctx.keepdims = x.shape, axes, keepdims
        return y if keepdims else y.reshape(tuple(n for i, n in enumerate(x.shape) if i not in axes))

    @staticmethod
    def backward(ctx, g):
        """df/dx = 1 at the maximum (shared equally between ties), 0 elsewhere"""
        (is_max,) = ctx.saved_tensors
        g = _expand_reduced(g, ctx.shape, ctx.axes, ctx.keepdims)
        ties = is_max.sum(axis=ctx.axes, keepdims=True)
        return g * is_max / ties


def max(x, axis=None, keepdims=False):
    """The maximum of x over ``axis``; the gradient is shared equally between ties.

    Raises ValueError for an empty input or an axis out of range; TypeError (every op) for None, a non-
    number, integer data or inputs on two backends.
    """
    return Max.apply(x, axis=axis, keepdims=keepdims)


# ---------------------------------------------------------------------------------
# Shape ops and indexing
# ---------------------------------------------------------------------------------

class Reshape(Function):
    float_inputs = False

    @staticmethod
    def forward(ctx, x, shape):
        """f(x) = x viewed with another shape"""
        ctx.shape = x.shape
        try:
            return x.reshape(shape)
        except ValueError:
            raise ValueError(f"reshape: cannot reshape an input of shape {x.shape} into {tuple(shape)}") from None

    @staticmethod
    def backward(ctx, g):
        """the gradient takes the input's shape back"""
        return g.reshape(ctx.shape)


def reshape(x, shape):
    """x with another shape (one entry may be −1).

    Raises ValueError when the sizes differ; TypeError for None or a non-array.
    """
    return Reshape.apply(x, shape=tuple(shape) if not isinstance(shape, int) else (shape,))


class Transpose(Function):
    float_inputs = False

    @staticmethod
    def forward(ctx, x, axes=None):
        """f(x) = x with its axes permuted (reversed when axes is None)"""
        axes = tuple(reversed(range(x.ndim))) if axes is None else tuple(a % x.ndim for a in axes)
        if sorted(axes) != list(range(x.ndim)):
            raise ValueError(f"transpose: axes {axes} are not a permutation of the {x.ndim} axes of shape {x.shape}")
        ctx.axes = axes
        return x.transpose(axes)

    @staticmethod
    def backward(ctx, g):
        """the inverse permutation"""
        inverse = [0] * len(ctx.axes)
        for position, axis in enumerate(ctx.axes):
            inverse[axis] = position
        return g.transpose(inverse)


def transpose(x, axes=None):
    """x with its axes permuted (reversed when ``axes`` is None).

    Raises ValueError when ``axes`` is not a permutation of x's axes; TypeError for None or a non-array.
    """
    return Transpose.apply(x, axes=None if axes is None else tuple(axes))


def permute(x, axes):
    """x with its axes in the order ``axes``.

    Raises ValueError when ``axes`` is not a permutation of x's axes; TypeError for None or a non-array.
    """
    return Transpose.apply(x, axes=tuple(axes))


class BroadcastTo(Function):
    @staticmethod
    def forward(ctx, x, shape):
        """f(x) = x repeated along new or length-1 axes"""
        ctx.shape = x.shape
        try:
            return _xp(x).broadcast_to(x, shape)
        except ValueError:
            raise ValueError(f"broadcast_to: cannot broadcast shape {x.shape} to {tuple(shape)}") from None

    @staticmethod
    def backward(ctx, g):
        """the gradient is summed over the copies"""
        return unbroadcast(g, ctx.shape)


def broadcast_to(x, shape):
    """x repeated along new or length-1 axes up to ``shape``.

    Raises ValueError when x's shape does not broadcast to ``shape``; TypeError (every op) for None, a non-
    number, integer data or inputs on two backends.
    """
    return BroadcastTo.apply(x, shape=tuple(shape))


def _unwrap_index(index):
    """Indices may hold Tensors (e.g. argmax positions): use their arrays."""
    if isinstance(index, tuple):
        return tuple(i.data if isinstance(i, Tensor) else i for i in index)
    return index.data if isinstance(index, Tensor) else index


class GetItem(Function):
    float_inputs = False

    @staticmethod
    def forward(ctx, x, index):
        """f(x) = x[index]  (slices, integers, integer arrays, None, ...)"""
        try:
            y = x[index]
        except IndexError as error:
            raise IndexError(f"getitem: index out of range for a tensor of shape {x.shape}: {error}") from None
        ctx.shape, ctx.dtype, ctx.index = x.shape, x.dtype, index
        return y

    @staticmethod
    def backward(ctx, g):
        """the gradient goes back to the picked positions; repeated integer indices add up"""
        xp = _xp(g)
        dx = xp.zeros(ctx.shape, dtype=g.dtype)
        index = ctx.index if isinstance(ctx.index, tuple) else (ctx.index,)
        if any(hasattr(i, "shape") or isinstance(i, (list, bool)) for i in index):
            backend.scatter_add(dx, ctx.index, g)
        else:   # basic indexing never repeats an element: plain assignment
            dx[ctx.index] = g
        return dx


def getitem(x, index):
    """x[index]: slices, integers, integer arrays (or Tensors), None, ...; repeated indices add up in the gradient.

    Raises IndexError for an index out of range; TypeError for None or a non-array.
    """
    return GetItem.apply(x, index=_unwrap_index(index))


class Concatenate(Function):
    float_inputs = False

    @staticmethod
    def forward(ctx, *xs, axis=0):
        """f(x1, ..., xn) = [x1 | ... | xn] along ``axis``"""
        try:
            y = _xp(*xs).concatenate(xs, axis=axis)
        except ValueError:
            raise ValueError(f"concatenate: shapes {[x.shape for x in xs]} do not fit together "
                             f"along axis {axis}") from None
        ctx.axis, ctx.sizes = axis, [x.shape[axis] for x in xs]
        return y

    @staticmethod
    def backward(ctx, g):
        """each input gets its own slice of the gradient"""
        offsets = [0]
        for size in ctx.sizes:
            offsets.append(offsets[-1] + size)
        axis = ctx.axis % g.ndim
        return tuple(g[(slice(None),) * axis + (slice(start, stop),)]
                     for start, stop in zip(offsets[:-1], offsets[1:]))


def concatenate(tensors, axis=0):
    """The tensors joined along ``axis``.

    Raises ValueError for no tensors or shapes that do not fit together; TypeError for None or a non-array.
    """
    if len(tensors) == 0:
        raise ValueError("concatenate: needs at least one tensor")
    return Concatenate.apply(*tensors, axis=axis)


class Stack(Function):
    float_inputs = False

    @staticmethod
    def forward(ctx, *xs, axis=0):
        """f(x1, ..., xn) = the inputs stacked along a new axis"""
        try:
            y = _xp(*xs).stack(xs, axis=axis)
        except ValueError:
            raise ValueError(f"stack: every input must have the same shape, got {[x.shape for x in xs]}") from None
        ctx.axis, ctx.count = axis % y.ndim, len(xs)
        return y

    @staticmethod
    def backward(ctx, g):
        """each input gets its slice of the gradient along the new axis"""
        return tuple(g.take(i, axis=ctx.axis) for i in range(ctx.count))


def stack(tensors, axis=0):
    """The tensors stacked along a new axis ``axis``.

    Raises ValueError for no tensors or tensors of different shapes; TypeError for None or a non-array.
    """
    if len(tensors) == 0:
        raise ValueError("stack: needs at least one tensor")
    return Stack.apply(*tensors, axis=axis)


class Cast(Function):
    @staticmethod
    def forward(ctx, x, dtype):
        """f(x) = x in another float type"""
        ctx.dtype = x.dtype
        return x.astype(dtype)

    @staticmethod
    def backward(ctx, g):
        """the gradient is cast back to the input's type"""
        return g.astype(ctx.dtype)


def cast(x, dtype):
    """x in another float type; the gradient comes back in x's type.

    Raises TypeError (every op) for None, a non-number, integer data or inputs on two backends.
    """
    return Cast.apply(x, dtype=dtype)


# ---------------------------------------------------------------------------------
# Normalisations: softmax family, L2, layer norm (fused)
# ---------------------------------------------------------------------------------

def _logsumexp(xp, x, axis):
    """log Σ e^x along ``axis`` (kept as length 1), with the max subtracted so exp never overflows."""
    m = x.max(axis=axis, keepdims=True)
    m = xp.where(xp.isfinite(m), m, 0)   # a row of -inf stays -inf instead of becoming nan
    return m + xp.log(xp.exp(x - m).sum(axis=axis, keepdims=True))


class Softmax(Function):
    @staticmethod
    def forward(ctx, x, axis=-1):
        """f(x)_i = e^(x_i - m) / Σ_j e^(x_j - m),  m = max x"""
        xp = _xp(x)
        y = xp.exp(x - x.max(axis=axis, keepdims=True))
        y /= y.sum(axis=axis, keepdims=True)
        ctx.save_for_backward(y)
        ctx.axis = axis
        return y

    @staticmethod
    def backward(ctx, g):
        """dx = y ⊙ (g - Σ_j g_j y_j)"""
        (y,) = ctx.saved_tensors
        gy = g * y
        return gy - y * gy.sum(axis=ctx.axis, keepdims=True)


def softmax(x, axis=-1):
    """e^x / Σ e^x along ``axis``, with the max subtracted.

    Raises numpy.exceptions.AxisError (a ValueError) for an axis out of range; TypeError (every op) for
    None, a non-number, integer data or inputs on two backends.
    """
    return Softmax.apply(x, axis=axis)


class LogSoftmax(Function):
    @staticmethod
    def forward(ctx, x, axis=-1):
        """f(x)_i = x_i - logsumexp(x)"""
        y = x - _logsumexp(_xp(x), x, axis)
        ctx.save_for_backward(y)
        ctx.axis = axis
        return y

    @staticmethod
    def backward(ctx, g):
        """dx = g - softmax(x) · Σ_j g_j"""
        (y,) = ctx.saved_tensors
        return g - _xp(y).exp(y) * g.sum(axis=ctx.axis, keepdims=True)


def log_softmax(x, axis=-1):
    """x − logsumexp(x) along ``axis``.

    Raises numpy.exceptions.AxisError (a ValueError) for an axis out of range; TypeError (every op) for
    None, a non-number, integer data or inputs on two backends.
    """
    return LogSoftmax.apply(x, axis=axis)


class LogSumExp(Function):
    @staticmethod
    def forward(ctx, x, axis=-1, keepdims=False):
        """f(x) = log Σ_i e^(x_i)"""
        xp = _xp(x)
        lse = _logsumexp(xp, x, axis)
        ctx.save_for_backward(x, lse)
        ctx.axis, ctx.keepdims = axis, keepdims
        return lse if keepdims else lse.squeeze(axis=axis)

    @staticmethod
    def backward(ctx, g):
        """df/dx_i = softmax(x)_i"""
        x, lse = ctx.saved_tensors
        if not ctx.keepdims:
            g = _xp(g).expand_dims(g, ctx.axis)
        return g * _xp(x).exp(x - lse)


def logsumexp(x, axis=-1, keepdims=False):
    """log Σ e^x along ``axis``, with the max subtracted (a row of −inf stays −inf).

    Raises numpy.exceptions.AxisError (a ValueError) for an axis out of range; TypeError (every op) for
    None, a non-number, integer data or inputs on two backends.
    """
    return LogSumExp.apply(x, axis=axis, keepdims=keepdims)


class L2Normalize(Function):
    @staticmethod
    def forward(ctx, x, axis=-1, eps=1e-12):
        """f(x) = x / max(‖x‖, eps)"""
        xp = _xp(x)
        norm = xp.sqrt((x * x).sum(axis=axis, keepdims=True))
        denominator = xp.maximum(norm, eps)
        y = x / denominator
        ctx.save_for_backward(y, denominator, norm > eps)
        ctx.axis = axis
        return y

    @staticmethod
    def backward(ctx, g):
        """dx = (g - y ⟨g, y⟩) / ‖x‖  (just g / eps where the norm is clamped)"""
        y, denominator, unclamped = ctx.saved_tensors
        projection = (g * y).sum(axis=ctx.axis, keepdims=True) * unclamped
        return (g - y * projection) / denominator


def l2_normalize(x, axis=-1, eps=1e-12):
    """x / max(‖x‖, eps) along ``axis``.

    Raises numpy.exceptions.AxisError (a ValueError) for an axis out of range; TypeError (every op) for
    None, a non-number, integer data or inputs on two backends.
    """
    return L2Normalize.apply(x, axis=axis, eps=eps)


class LayerNorm(Function):
    optional_inputs = (1, 2)     # weight and bias may be None

    @staticmethod
    def forward(ctx, x, weight=None, bias=None, eps=1e-5):
        """f(x) = (x - μ) / √(σ² + eps) · w + b over the last axis"""
        xp = _xp(x)
        dim = x.shape[-1]
        for name, p in (("weight", weight), ("bias", bias)):
            if p is not None and p.shape != (dim,):
                raise ValueError(f"layer_norm: {name} must have shape ({dim},) for input {x.shape}, got {p.shape}")
        y, xhat = xp.empty(x.shape, x.dtype), xp.empty(x.shape, x.dtype)   # C order: _rows gives views
        rstd = xp.empty(x.shape[:-1] + (1,), x.dtype)                      # (..., 1)
        # weight and bias as (1, D): a (D,) vector would be cut into blocks if D happened to equal N
        parallel.map_rows(_layer_norm_rows, _rows(y), _rows(x), _rows(xhat), _rows(rstd),
                          _as_row(weight), _as_row(bias), eps)
        ctx.save_for_backward(xhat, rstd, weight)
        return y

    @staticmethod
    def backward(ctx, g):
        """dx = rstd · (ĝ - mean(ĝ) - x̂ · mean(ĝ ⊙ x̂)),  ĝ = g ⊙ w;  dw = Σ g ⊙ x̂;  db = Σ g"""
        xhat, rstd, weight = ctx.saved_tensors
        xp = _xp(g)
        needs = ctx.needs_input_grad
        dim = g.shape[-1]
        g2d, xhat2d = g.reshape(-1, dim), xhat.reshape(-1, dim)  # (N, D): column sums become one reduction
        dx = None
        if needs[0]:
            dx = xp.empty(g.shape, xhat.dtype)
            parallel.map_rows(_layer_norm_backward_rows, _rows(dx), g2d, xhat2d, _rows(rstd), _as_row(weight))
        return (dx, *_scale_shift_grads(g2d, xhat2d, needs))


def _layer_norm_rows(y, x, xhat, rstd, weight, bias, eps):
    """x̂ = (x - μ) / √(σ² + eps), rstd = 1 / √(σ² + eps) and y = x̂ · w + b on a block of (n, D) rows, into y, xhat, rstd."""
    xp = _xp(x)
    xp.subtract(x, x.mean(axis=-1, keepdims=True), out=xhat)            # centred, normalised in place below
    variance = xp.einsum("...i,...i->...", xhat, xhat)[..., None] / x.shape[-1]   # (n, 1)
    xp.divide(1.0, xp.sqrt(variance + eps), out=rstd)
    xhat *= rstd
    _scale_shift(xhat, weight, bias, out=y)


def _layer_norm_backward_rows(dx, g, xhat, rstd, weight):
    """dx = rstd · (ĝ - mean(ĝ) - x̂ · mean(ĝ ⊙ x̂)), ĝ = g ⊙ w, on a block of (n, D) rows (LayerNorm.backward)."""
    xp = _xp(g)
    _scale_shift(g, weight, None, out=dx)      # dx is built in place from ĝ
    mean_ghat = dx.mean(axis=-1, keepdims=True)                                   # (n, 1)
    mean_ghat_xhat = xp.einsum("...i,...i->...", dx, xhat)[..., None] / dx.shape[-1]   # (n, 1)
    dx -= mean_ghat
    dx -= xhat * mean_ghat_xhat
    dx *= rstd


def _as_row(vector):
    """A (D,) vector as a (1, D) row (None stays None), so that map_rows passes it whole to every block."""
    return None if vector is None else vector.reshape(1, -1)


def layer_norm(x, weight=None, bias=None, eps=1e-5):
    """Layer norm over the last axis; weight and bias of shape (D,), either may be None.

    Raises ValueError for a weight or bias that is not (D,); TypeError as every op.
    """
    return LayerNorm.apply(x, weight, bias, eps=eps)


def _scale_shift(xhat, weight, bias, out=None):
    """y = x̂ · w + b, either of w and b may be None (the affine end of layer norm and batch norm), into ``out`` if given."""
    if out is None:             # a new array, in the type the product promotes to
        y = xhat * weight if weight is not None else xhat.copy()
    elif weight is not None:
        y = _xp(xhat).multiply(xhat, weight, out=out)
    else:
        out[...] = xhat
        y = out
    if bias is not None:
        y += bias
    return y


def _scale_shift_grads(g2d, xhat2d, needs):
    """(dw, db) = (Σ g ⊙ x̂, Σ g) over the rows of (N, C) arrays, each None unless ``needs`` it (inputs 1, 2)."""
    xp = _xp(g2d)
    dweight = xp.einsum("nc,nc->c", g2d, xhat2d) if needs[1] else None
    dbias = g2d.sum(axis=0) if needs[2] else None
    return dweight, dbias


# ---------------------------------------------------------------------------------
# Embedding, attention, dropout
# ---------------------------------------------------------------------------------

class Embedding(Function):
    @staticmethod
    def forward(ctx, weight, ids):
        """f(W) = W[ids]: rows of the table (``ids`` is integer data, passed as an option)"""
        ctx.shape = weight.shape
        ctx.save_for_backward(ids)
        return weight[ids]                                     # (..., D)

    @staticmethod
    def backward(ctx, g):
        """dW[v] = Σ of g over the positions whose id is v (scatter-add)"""
        (ids,) = ctx.saved_tensors
        dweight = _xp(g).zeros(ctx.shape, dtype=g.dtype)
        backend.scatter_add(dweight, ids.reshape(-1), g.reshape(-1, ctx.shape[1]))   # (N,), (N, D)
        return dweight


def embedding(weight, ids):
    """Rows ``weight[ids]`` for integer ``ids`` of any shape: (...) -> (..., D).

    Raises TypeError for ids that are not integers, IndexError for an id outside the table.
    """
    ids = ids.data if isinstance(ids, Tensor) else ids
    ids = _xp(weight, ids).asarray(ids)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"embedding: ids must be integers, got dtype {ids.dtype}")
    rows = weight.shape[0]
    if ids.size:
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= rows:
            raise IndexError(f"embedding: id {low if low < 0 else high} is out of range for a table of {rows} rows")
    return Embedding.apply(weight, ids=ids)


class ScaledDotProductAttention(Function):
    @staticmethod
    def forward(ctx, q, k, v, causal=False, scale=None):
        """f(Q, K, V) = softmax(s · Q Kᵀ + M) V,  s = 1/√d,  M = -∞ above the diagonal when causal"""
        if not (q.ndim == k.ndim == v.ndim and q.ndim >= 2):
            raise ValueError(f"attention: q, k, v must have the same number (>= 2) of dimensions, "
                             f"got {q.shape}, {k.shape}, {v.shape}")
        if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
            raise ValueError(f"attention: shapes do not fit: q {q.shape}, k {k.shape}, v {v.shape} "
                             "(need q and k to share the head size and k and v the key length)")
        if causal and q.shape[-2] != k.shape[-2]:
            raise ValueError(f"attention: the causal mask needs equal query and key lengths, got "
                             f"{q.shape[-2]} and {k.shape[-2]}")
        xp = _xp(q, k, v)
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        scores = q @ _swap_last(k)                               # (B, H, Tq, Tk)
        scores *= scale
        if causal:
            t = q.shape[-2]
            future = xp.triu(xp.ones((t, t), dtype=bool), k=1)  # (T, T): key j > query i
            xp.copyto(scores, -xp.inf, where=future)             # not scores[..., future]: no GPU sync
        probs = scores              # the softmax overwrites the scores (a fresh C-order product: _rows is a view)
        parallel.map_rows(_softmax_rows, _rows(probs))           # (B, H, Tq, Tk)
        ctx.save_for_backward(q, k, v, probs)
        ctx.scale = scale
        return probs @ v                                         # (B, H, Tq, d)

    @staticmethod
    def backward(ctx, g):
        """dV = Pᵀ G;  dP = G Vᵀ;  dS = P ⊙ (dP - Σ_j dP ⊙ P);  dQ = s dS K;  dK = s dSᵀ Q"""
        q, k, v, probs = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dv = _swap_last(probs) @ g if needs[2] else None        # (B, H, Tk, d)
        dscores = g @ _swap_last(v)      # dP (B, H, Tq, Tk), C order, turned into dS in place through _rows
        parallel.map_rows(_softmax_backward_rows, _rows(dscores), _rows(probs), ctx.scale)
        dq = dscores @ k if needs[0] else None                   # (B, H, Tq, d)
        dk = _swap_last(dscores) @ q if needs[1] else None       # (B, H, Tk, d)
        return dq, dk, dv


def _softmax_rows(p):
    """p ← softmax(p) along the last axis of a block of rows, in place (max subtracted: exp never overflows)."""
    xp = _xp(p)
    p -= p.max(axis=-1, keepdims=True)
    xp.exp(p, out=p)
    p /= p.sum(axis=-1, keepdims=True)


def _softmax_backward_rows(dp, p, scale):
    """dp ← s · p ⊙ (dp - Σ_j dp_j p_j) on a block of rows, in place: the softmax's backward, times the scale."""
    dp -= _xp(p).einsum("...j,...j->...", dp, p)[..., None]
    dp *= p
    dp *= scale


def scaled_dot_product_attention(q, k, v, causal=False, scale=None):
    """Attention over (B, H, T, d) inputs; ``causal`` hides later keys from each query.

    Raises ValueError for q, k, v whose shapes do not fit (or a causal mask over unequal lengths); TypeError
    as every op.
    """
    return ScaledDotProductAttention.apply(q, k, v, causal=causal, scale=scale)


class Dropout(Function):
    @staticmethod
    def forward(ctx, x, keep):
        """f(x) = x · mask / (1 - p), mask ~ Bernoulli(1 - p) drawn once"""
        ctx.save_for_backward(keep)
        return x * keep

    @staticmethod
    def backward(ctx, g):
        """f'(x) = mask / (1 - p)"""
        (keep,) = ctx.saved_tensors
        return g * keep


def dropout(x, p, rng, training=True):
    """Zero each element with probability ``p`` and scale the rest by 1/(1-p); identity when not training.

    Raises ValueError for p outside [0, 1); TypeError as every op.
    """
    if not 0 <= p < 1:
        raise ValueError(f"dropout: p must be in [0, 1), got {p}")
    if not training or p == 0:
        return x if isinstance(x, Tensor) else Tensor(x)
    data = x.data if isinstance(x, Tensor) else x
    keep = (rng.uniform(data.shape, dtype=data.dtype) >= p).astype(data.dtype) / (1 - p)
    keep = backend.asarray(keep, backend.backend_of(data))   # the rng may live on the other backend
    return Dropout.apply(x, keep=keep)


# ---------------------------------------------------------------------------------
# Convolutional ops: image patches (im2col) and batch norm, channels last
# ---------------------------------------------------------------------------------

def _check_count(name, value, minimum):
    """An integer option (kernel, stride, padding) at least ``minimum``, or an error that names it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"patches: {name} must be an integer >= {minimum}, got {value!r}")
    return value


class Patches(Function):
    @staticmethod
    def forward(ctx, x, kernel, stride=1, padding=0):
        """f(x)[b, i, j, (ky, kx, c)] = x₀[b, s·i + ky, s·j + kx, c],  x₀ = x with ``padding`` zeros around"""
        if x.ndim != 4:
            raise ValueError(f"patches: input must be 4-D (B, H, W, C), got shape {x.shape}")
        kernel = _check_count("kernel", kernel, 1)
        stride = _check_count("stride", stride, 1)
        padding = _check_count("padding", padding, 0)
        batch, height, width, channels = x.shape
        if min(height, width) + 2 * padding < kernel:
            raise ValueError(f"patches: kernel {kernel} does not fit an input of shape {x.shape} with padding "
                             f"{padding} (padded to {height + 2 * padding}×{width + 2 * padding})")
        out_h = (height + 2 * padding - kernel) // stride + 1
        out_w = (width + 2 * padding - kernel) // stride + 1
        # images are independent: the copies run on blocks of images on every core (tinyclip.parallel)
        cols = _xp(x).empty((batch, out_h, out_w, kernel, kernel, channels), dtype=x.dtype)
        parallel.map_rows(_patches_rows, cols, x, kernel, stride, padding)
        ctx.shape, ctx.options = x.shape, (kernel, stride, padding)
        return cols.reshape(batch, out_h, out_w, kernel * kernel * channels)   # (B, Ho, Wo, k·k·C)

    @staticmethod
    def backward(ctx, g):
        """col2im: each window's gradient is added back where the window was read, the padding cropped off"""
        kernel, stride, padding = ctx.options
        batch, out_h, out_w = g.shape[:3]
        g = g.reshape(batch, out_h, out_w, kernel, kernel, ctx.shape[-1])
        dx = _xp(g).empty(ctx.shape, dtype=g.dtype)                           # (B, H, W, C)
        parallel.map_rows(_patches_backward_rows, dx, g, kernel, stride, padding)
        return dx


def _patches_rows(cols, x, kernel, stride, padding):
    """im2col of a block of images: ``cols`` (b, Ho, Wo, k, k, C) from ``x`` (b, H, W, C) (Patches.forward)."""
    batch, height, width, channels = x.shape
    padded = x
    if padding:
        padded = _xp(x).zeros((batch, height + 2 * padding, width + 2 * padding, channels), dtype=x.dtype)
        padded[:, padding:padding + height, padding:padding + width] = x
    # one strided copy per kernel offset (k² of them) rather than one per output pixel
    for ky, kx, rows, columns in _kernel_offsets(kernel, stride, cols.shape[1], cols.shape[2]):
        cols[:, :, :, ky, kx] = padded[:, rows, columns]     # (b, Ho, Wo, C)


def _patches_backward_rows(dx, g, kernel, stride, padding):
    """col2im of a block of images: ``dx`` (b, H, W, C) from the windows' gradients ``g`` (b, Ho, Wo, k, k, C)."""
    batch, height, width, channels = dx.shape
    dpadded = dx
    if padding:
        dpadded = _xp(g).zeros((batch, height + 2 * padding, width + 2 * padding, channels), dtype=g.dtype)
    else:
        dx[...] = 0
    # windows overlap where stride < kernel, so offsets add up; within one offset the
    # strided slice touches each pixel at most once, so += has no repeated indices to lose
    for ky, kx, rows, columns in _kernel_offsets(kernel, stride, g.shape[1], g.shape[2]):
        dpadded[:, rows, columns] += g[:, :, :, ky, kx]
    if padding:
        dx[...] = dpadded[:, padding:padding + height, padding:padding + width]


def patches(x, kernel, stride=1, padding=0):
    """im2col, channels last: (B, H, W, C) → (B, Ho, Wo, k·k·C),  Ho = (H + 2·padding − k)//stride + 1,  k = kernel.

    Each window is flattened in (ky, kx, c) order, so a convolution is
    ``linear(patches(x, k, s, p), weight, bias)`` with ``weight`` (out, k·k·C):
    a PyTorch Conv2d weight (out, C, k, k) permuted to (out, k, k, C) and reshaped.

    Raises ValueError for an input that is not 4-D, a kernel, stride or padding that is not an integer in
    range, or a kernel larger than the padded image.
    """
    return Patches.apply(x, kernel=kernel, stride=stride, padding=padding)


def _kernel_offsets(kernel, stride, out_h, out_w):
    """(ky, kx, rows, columns) per kernel offset: the padded input's pixels that offset reads, as slices."""
    for ky in range(kernel):
        for kx in range(kernel):
            yield (ky, kx, slice(ky, ky + stride * (out_h - 1) + 1, stride),
                   slice(kx, kx + stride * (out_w - 1) + 1, stride))


class BatchNorm(Function):
    optional_inputs = (1, 2)     # weight and bias may be None

    @staticmethod
    def forward(ctx, x, weight=None, bias=None, eps=1e-5, running=None, momentum=0.1, training=True,
                sum_over_batch=None):
        """f(x) = (x - μ) / √(σ² + eps) · w + b per channel (last axis), μ and σ² the batch's or the running ones"""
        xp = _xp(x)
        split = sum_over_batch is not None
        if x.ndim < 2 or (x.size == 0 and not split):      # one part of a split batch may be empty
            raise ValueError(f"batch_norm: input must be non-empty with a batch axis and a channel axis (last), "
                             f"got shape {x.shape}")
        channels = x.shape[-1]
        count = x.size // channels                             # values per channel
        for name, p in (("weight", weight), ("bias", bias)):
            if p is not None and p.shape != (channels,):
                raise ValueError(f"batch_norm: {name} must have shape ({channels},) for input {x.shape}, "
                                 f"got {p.shape}")
        if running is not None:
            _check_running(running, x)
        if not 0 <= momentum <= 1:
            raise ValueError(f"batch_norm: momentum must be in [0, 1], got {momentum}")
        if not training and running is None:
            raise ValueError("batch_norm: evaluation (training=False) normalises with the running statistics; "
                             "pass running=(mean, var)")
        if training:
            flat = x.reshape(-1, channels)                      # (N, C)
            if not split:
                batch_mean = flat.mean(axis=0)                  # (C,)
            else:   # the statistics of the whole batch: Σx and the count from every part
                totals = sum_over_batch(xp.concatenate([flat.sum(axis=0), xp.full((1,), count, flat.dtype)]))
                count = int(round(float(totals[-1])))
                batch_mean = totals[:channels] / count if count else totals[:channels]
            if count < 2:                                       # the same count on every rank: all raise together
                raise ValueError(f"batch_norm: training needs at least 2 values per channel to estimate a "
                                 f"variance, got input of shape {x.shape} ({count} per channel in the batch)")
            # the statistics are sums over every row, taken whole (a split sum would round differently); the
            # element-wise passes run on blocks of rows on every core (tinyclip.parallel)
            xhat = xp.empty(x.shape, x.dtype)                   # centred, normalised in place below
            xhat2d = xhat.reshape(-1, channels)                 # (N, C), a view
            parallel.map_rows(_subtract_rows, xhat2d, flat, _as_row(batch_mean))
            squares = xp.einsum("nc,nc->c", xhat2d, xhat2d)     # (C,)
            if split:
                squares = sum_over_batch(squares)
            batch_var = squares / count                         # (C,), biased: what x̂ is divided by
            if running is not None:
                # PyTorch's convention: the running variance is the unbiased estimate n/(n-1)·σ²
                running_mean, running_var = running
                running_mean *= 1 - momentum
                running_mean += momentum * batch_mean
                running_var *= 1 - momentum
                running_var += (momentum * count / (count - 1)) * batch_var
            rstd = 1.0 / xp.sqrt(batch_var + eps)               # (C,)
        else:
            running_mean, running_var = running
            xhat = xp.empty(x.shape, xp.result_type(x, running_mean))
            parallel.map_rows(_subtract_rows, _rows(xhat), _rows(x), _as_row(running_mean))
            rstd = 1.0 / xp.sqrt(running_var + eps)             # (C,)
        # x̂ · w's type, as before the pool: the bias is added in place and does not promote
        y = xp.empty(x.shape, xhat.dtype if weight is None else xp.result_type(xhat, weight))
        parallel.map_rows(_batch_norm_rows, _rows(y), _rows(xhat), _as_row(rstd), _as_row(weight), _as_row(bias))
        ctx.save_for_backward(xhat, rstd, weight)
        ctx.training, ctx.count, ctx.sum_over_batch = training, count, sum_over_batch
        return y

    @staticmethod
    def backward(ctx, g):
        """dx = rstd · (ĝ - mean(ĝ) - x̂ · mean(ĝ ⊙ x̂)), or rstd · ĝ in eval, ĝ = g ⊙ w;  dw = Σ g ⊙ x̂;  db = Σ g"""
        xhat, rstd, weight = ctx.saved_tensors
        xp = _xp(g)
        needs = ctx.needs_input_grad
        channels = g.shape[-1]
        g2d, xhat2d = g.reshape(-1, channels), xhat.reshape(-1, channels)   # (N, C)
        dx = None
        if needs[0]:
            # dx is built in ĝ's buffer; the column sums are taken whole, the element-wise passes on row blocks
            ghat = xp.empty(g.shape, g.dtype if weight is None else xp.result_type(g, weight))
            ghat2d = ghat.reshape(-1, channels)                     # (N, C), a view
            parallel.map_rows(_scale_rows, ghat2d, g2d, _as_row(weight))
            mean_ghat = mean_ghat_xhat = None
            if ctx.training:
                # the batch statistics depend on every x: these two terms are their share of the gradient
                sums = xp.stack([ghat2d.sum(axis=0), xp.einsum("nc,nc->c", ghat2d, xhat2d)])   # (2, C)
                if ctx.sum_over_batch is not None:                  # over the whole split batch
                    sums = ctx.sum_over_batch(sums)
                mean_ghat, mean_ghat_xhat = sums / ctx.count        # (C,) each
            parallel.map_rows(_batch_norm_backward_rows, ghat2d, xhat2d, _as_row(rstd), _as_row(mean_ghat),
                              _as_row(mean_ghat_xhat))
            dx = ghat
        return (dx, *_scale_shift_grads(g2d, xhat2d, needs))


def _subtract_rows(out, x, row):
    """out = x - row on a block of (n, C) rows, ``row`` (1, C): batch norm's centring."""
    _xp(x).subtract(x, row, out=out)


def _batch_norm_rows(y, xhat, rstd, weight, bias):
    """x̂ ·= rstd in place, then y = x̂ · w + b, on a block of (n, C) rows (BatchNorm.forward)."""
    xhat *= rstd
    _scale_shift(xhat, weight, bias, out=y)


def _scale_rows(out, g, weight):
    """out = g · w, or a copy of g when w is None, on a block of (n, C) rows: batch norm's ĝ."""
    _scale_shift(g, weight, None, out=out)


def _batch_norm_backward_rows(ghat, xhat, rstd, mean_ghat, mean_ghat_xhat):
    """dx = rstd · (ĝ - mean(ĝ) - x̂ · mean(ĝ ⊙ x̂)) in ĝ's block of (n, C) rows (training), or rstd · ĝ (evaluation)."""
    if mean_ghat is not None:
        ghat -= mean_ghat
        ghat -= xhat * mean_ghat_xhat
    ghat *= rstd


def batch_norm(x, weight=None, bias=None, eps=1e-5, running=None, momentum=0.1, training=True,
               sum_over_batch=None):
    """Batch norm over every axis but the last (channels last: (N, C), (B, H, W, C), ...).

    Training normalises with the batch's mean and biased variance and, when
    ``running`` = (mean, var) is given, moves those arrays in place towards the
    batch's: m ← (1 − momentum)·m + momentum·μ, v ← (1 − momentum)·v + momentum·n/(n−1)·σ²
    (n values per channel), once per call. Evaluation (``training=False``)
    normalises with ``running`` and changes nothing. Weight and bias (C,) may be None.

    A batch split into parts (one per process in data-parallel training) is
    normalised as one when ``sum_over_batch`` is given: a function that
    returns the sum over every part of a small per-channel array ((C + 1,)
    and (C,) forward, (2, C) backward). The op itself knows nothing of
    processes; ``tinyclip.nn.BatchNorm(comm=...)`` (synchronised batch norm)
    passes its communicator's all-reduce. Without it x must be non-empty.

    Raises ValueError for an input without a batch and a channel axis, an
    empty one, weight, bias or running arrays of the wrong shape, dtype or
    backend, momentum outside [0, 1], evaluation without ``running``, and
    training on fewer than 2 values per channel (no variance to estimate).
    """
    if running is not None and isinstance(running, (tuple, list)):
        running = tuple(r.data if isinstance(r, Tensor) else r for r in running)
    return BatchNorm.apply(x, weight, bias, eps=eps, running=running, momentum=momentum, training=training,
                           sum_over_batch=sum_over_batch)


def _check_running(running, x):
    """``running`` must be (mean, var): float arrays of shape (C,) on x's backend (updated in place, in their own dtype)."""
    if not isinstance(running, (tuple, list)) or len(running) != 2:
        raise ValueError(f"batch_norm: running must be a pair (mean, var) of arrays, got {type(running).__name__}")
    channels = x.shape[-1]
    for name, array in zip(("mean", "var"), running):
        if not hasattr(array, "shape") or array.shape != (channels,):
            raise ValueError(f"batch_norm: running {name} must have shape ({channels},) for input {x.shape}, "
                             f"got {getattr(array, 'shape', type(array).__name__)}")
        if _xp(array) is not _xp(x) or array.dtype.kind != "f":
            raise ValueError(f"batch_norm: running {name} must be a float array on the input's backend "
                             f"({backend.backend_of(x)}), got {backend.backend_of(array)}, {array.dtype}")


# ---------------------------------------------------------------------------------
# Tensor's operators and methods, attached here (needle's ops attach theirs the same way)
# ---------------------------------------------------------------------------------
# autograd.py defines Tensor and the backward walk and sits below this module; the
# operators are these ops, so they are attached from here and imports run one way only.

def _reshape_method(self, *shape):
    return reshape(self, shape[0] if len(shape) == 1 else shape)


def _transpose_method(self, *axes):
    return transpose(self, axes[0] if len(axes) == 1 else (axes or None))


def _permute_method(self, *axes):
    return transpose(self, axes[0] if len(axes) == 1 else axes)


Tensor.__add__ = add
Tensor.__radd__ = lambda self, other: add(other, self)
Tensor.__sub__ = sub
Tensor.__rsub__ = lambda self, other: sub(other, self)
Tensor.__mul__ = mul
Tensor.__rmul__ = lambda self, other: mul(other, self)
Tensor.__truediv__ = div
Tensor.__rtruediv__ = lambda self, other: div(other, self)
Tensor.__neg__ = neg
Tensor.__pow__ = pow
Tensor.__matmul__ = matmul
Tensor.__rmatmul__ = lambda self, other: matmul(other, self)
Tensor.__getitem__ = getitem
Tensor.sum = sum
Tensor.mean = mean
Tensor.max = max
Tensor.reshape = _reshape_method
Tensor.transpose = _transpose_method
Tensor.permute = _permute_method
Tensor.T = property(lambda self: transpose(self, None))
Tensor.exp = exp
Tensor.log = log
Tensor.sqrt = sqrt
Tensor.tanh = tanh
Tensor.sigmoid = sigmoid
Tensor.relu = relu
Tensor.softmax = softmax
Tensor.log_softmax = log_softmax
Tensor.logsumexp = logsumexp
Tensor.astype = cast
