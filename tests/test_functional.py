"""Property tests for every op in tinyclip.functional, driven by one table.

Each row of ``OPS`` says how to draw inputs and options, how to call the op
and how to compute the same thing in plain NumPy. For every row and every
enabled backend: the forward equals the NumPy formula (float64, 1e-12), and
the backward equals five-point finite differences along random directions
over every element (float64, 1e-7 relative; see tests/gradcheck.py).
Invariants and bad-input errors follow the table.
"""

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy
import pytest
from hypothesis import given, strategies as st

import tinyclip as tc
import tinyclip.functional as F
from tinyclip import backend

from . import strict_backend
from .gradcheck import check_gradients
from .strict_backend import DeviceArray
from .strategies import away_from_zero, axes_for, broadcastable_pair, distinct, normal, positive, seeds, shapes

erf = numpy.vectorize(math.erf)


def sigmoid(x):
    return 1 / (1 + numpy.exp(-x))


def softmax(x, axis):
    e = numpy.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def logsumexp(x, axis, keepdims=False):
    return numpy.log(numpy.exp(x).sum(axis=axis, keepdims=keepdims))


def attention(q, k, v, causal):
    scores = q @ k.swapaxes(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        t = q.shape[-2]
        scores = scores + numpy.triu(numpy.full((t, t), -numpy.inf), k=1)
    return softmax(scores, -1) @ v


@dataclass
class Op:
    """One row of the op table."""
    name: str
    draw: Callable          # draw(data) -> (list of float64 arrays or None, dict of options)
    call: Callable          # call(*tensors, **options) -> Tensor
    reference: Callable     # reference(*arrays, **options) -> NumPy array
    wrt: list = field(default=None)   # inputs to differentiate (default: all)


def unary(fn, values=normal, shape_strategy=shapes()):
    def draw(data):
        return [values(data.draw(seeds), data.draw(shape_strategy))], {}
    return draw


def binary(values=normal, second=None):
    def draw(data):
        a_shape, b_shape = data.draw(broadcastable_pair())
        return [values(data.draw(seeds), a_shape), (second or values)(data.draw(seeds), b_shape)], {}
    return draw


def draw_pow(data):
    return [positive(data.draw(seeds), data.draw(shapes()))], {"exponent": data.draw(st.sampled_from([-2, -0.5, 0.5, 2, 3, 1.7]))}


@st.composite
def matmul_shapes(draw):
    n, k, m = (draw(st.integers(1, 4)) for _ in range(3))
    batch = draw(shapes(min_dims=0, max_dims=2, max_side=3))
    a_batch = tuple(1 if draw(st.booleans()) else s for s in batch)
    b_batch = batch[draw(st.integers(0, len(batch))):]
    kind = draw(st.sampled_from(["batched", "vector-matrix", "matrix-vector", "vector-vector"]))
    if kind == "vector-matrix":
        return (k,), b_batch + (k, m)
    if kind == "matrix-vector":
        return a_batch + (n, k), (k,)
    if kind == "vector-vector":
        return (k,), (k,)
    return a_batch + (n, k), b_batch + (k, m)


def draw_matmul(data):
    a_shape, b_shape = data.draw(matmul_shapes())
    return [normal(data.draw(seeds), a_shape), normal(data.draw(seeds), b_shape)], {}


def draw_linear(data):
    leading = data.draw(shapes(min_dims=1, max_dims=3, max_side=3))
    n_in, n_out = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 5))
    bias = normal(data.draw(seeds), (n_out,)) if data.draw(st.booleans()) else None
    return [normal(data.draw(seeds), leading + (n_in,)), normal(data.draw(seeds), (n_out, n_in)), bias], {}


def draw_reduction(data, values=normal):
    shape = data.draw(shapes())
    return [values(data.draw(seeds), shape)], {"axis": data.draw(axes_for(len(shape))), "keepdims": data.draw(st.booleans())}


def draw_reshape(data):
    shape = data.draw(shapes())
    target = data.draw(st.sampled_from(["flat", "reversed", "split"]))
    size = math.prod(shape)
    new = {"flat": (size,), "reversed": tuple(reversed(shape)), "split": (shape[0], -1)}[target]
    return [normal(data.draw(seeds), shape)], {"shape": new}


def draw_transpose(data):
    shape = data.draw(shapes())
    axes = data.draw(st.one_of(st.none(), st.permutations(range(len(shape)))))
    return [normal(data.draw(seeds), shape)], {"axes": None if axes is None else tuple(axes)}


def draw_broadcast_to(data):
    small, big = data.draw(broadcastable_pair())
    full = numpy.broadcast_shapes(small, big)
    return [normal(data.draw(seeds), small)], {"shape": full}


def draw_getitem(data):
    shape = data.draw(shapes(min_dims=2, max_dims=3))
    rng = numpy.random.default_rng(data.draw(seeds))
    kind = data.draw(st.sampled_from(["slice", "step", "int", "int-array", "pairs", "ellipsis-none"]))
    if kind == "slice":
        index = (slice(0, max(1, shape[0] - 1)), slice(1, None))
    elif kind == "step":
        index = (Ellipsis, slice(None, None, 2))
    elif kind == "int":
        index = (shape[0] - 1, slice(None))
    elif kind == "int-array":   # repeated rows: their gradients must add up
        index = rng.integers(0, shape[0], size=6)
    elif kind == "pairs":       # x[arange(B), positions]: picking the end-of-text token
        index = (numpy.arange(shape[0]), rng.integers(0, shape[1], size=shape[0]))
    else:
        index = (None, Ellipsis, 0)
    return [normal(data.draw(seeds), shape)], {"index": index}


def draw_concatenate(data):
    shape = data.draw(shapes(max_dims=3))
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    arrays = []
    for _ in range(data.draw(st.integers(1, 3))):
        piece = list(shape)
        piece[axis] = data.draw(st.integers(1, 3))
        arrays.append(normal(data.draw(seeds), tuple(piece)))
    return arrays, {"axis": axis}


def draw_stack(data):
    shape = data.draw(shapes(max_dims=3))
    count = data.draw(st.integers(1, 3))
    return [normal(data.draw(seeds), shape) for _ in range(count)], {"axis": data.draw(st.integers(-len(shape) - 1, len(shape)))}


def draw_along_axis(data):
    shape = data.draw(shapes())
    return [normal(data.draw(seeds), shape, scale=2.0)], {"axis": data.draw(st.integers(-len(shape), len(shape) - 1))}


def draw_logsumexp(data):
    arrays, options = draw_along_axis(data)
    return arrays, {**options, "keepdims": data.draw(st.booleans())}


def draw_layer_norm(data):
    shape = data.draw(shapes(max_dims=3, min_side=2))
    dim = shape[-1]
    weight = normal(data.draw(seeds), (dim,)) if data.draw(st.booleans()) else None
    bias = normal(data.draw(seeds), (dim,)) if data.draw(st.booleans()) else None
    # rows whose entries nearly coincide have a huge 1/σ and curvature no finite difference can follow
    return [distinct(data.draw(seeds), shape, gap=0.2), weight, bias], {"eps": data.draw(st.sampled_from([1e-5, 1e-6, 0.1]))}


def reference_layer_norm(x, weight, bias, eps):
    y = (x - x.mean(-1, keepdims=True)) / numpy.sqrt(x.var(-1, keepdims=True) + eps)
    return y * (1 if weight is None else weight) + (0 if bias is None else bias)


def draw_embedding(data):
    rows, dim = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 4))
    ids = numpy.random.default_rng(data.draw(seeds)).integers(0, rows, size=data.draw(shapes(max_dims=2)))
    return [normal(data.draw(seeds), (rows, dim))], {"ids": ids}


def draw_attention(data):
    batch = data.draw(shapes(min_dims=1, max_dims=2, max_side=2))
    causal = data.draw(st.booleans())
    tq, d = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 4))
    tk = tq if causal else data.draw(st.integers(1, 5))
    q = normal(data.draw(seeds), batch + (tq, d))
    k = normal(data.draw(seeds), batch + (tk, d))
    v = normal(data.draw(seeds), batch + (tk, d))
    return [q, k, v], {"causal": causal}


def draw_dropout(data):
    return [normal(data.draw(seeds), data.draw(shapes()))], {"p": data.draw(st.sampled_from([0.0, 0.1, 0.5])),
                                                              "seed": data.draw(seeds)}


def call_dropout(x, p, seed):
    return F.dropout(x, p, backend.RNG(seed, backend.backend_of(x.data)))


def reference_dropout(x, p, seed):
    # the same generator on the backend under test (tests run inside use_backend) draws the same mask
    keep = backend.to_numpy(backend.RNG(seed).uniform(x.shape, dtype=x.dtype)) >= p
    return x * keep / (1 - p)


def call_linear(x, weight, bias):
    return F.linear(x, weight, bias)


OPS = [
    Op("add", binary(), F.add, numpy.add),
    Op("sub", binary(), F.sub, numpy.subtract),
    Op("mul", binary(), F.mul, numpy.multiply),
    Op("div", binary(second=away_from_zero), F.div, numpy.divide),
    Op("neg", unary(F.neg), F.neg, numpy.negative),
    Op("pow", draw_pow, F.pow, lambda x, exponent: x ** exponent),
    Op("exp", unary(F.exp), F.exp, numpy.exp),
    Op("log", unary(F.log, positive), F.log, numpy.log),
    Op("sqrt", unary(F.sqrt, positive), F.sqrt, numpy.sqrt),
    Op("tanh", unary(F.tanh), F.tanh, numpy.tanh),
    Op("sigmoid", unary(F.sigmoid), F.sigmoid, sigmoid),
    Op("log_sigmoid", unary(F.log_sigmoid), F.log_sigmoid, lambda x: numpy.log(sigmoid(x))),
    Op("softplus", unary(F.softplus), F.softplus, lambda x: numpy.log1p(numpy.exp(x))),
    Op("relu", unary(F.relu, away_from_zero), F.relu, lambda x: numpy.maximum(x, 0)),
    Op("gelu_tanh", unary(F.gelu), F.gelu,
       lambda x: 0.5 * x * (1 + numpy.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))),
    Op("gelu_exact", unary(None), lambda x: F.gelu(x, approximate="none"),
       lambda x: 0.5 * x * (1 + erf(x / math.sqrt(2)))),
    Op("quick_gelu", unary(F.quick_gelu), F.quick_gelu, lambda x: x * sigmoid(1.702 * x)),
    Op("matmul", draw_matmul, F.matmul, numpy.matmul),
    Op("linear", draw_linear, call_linear, lambda x, w, b: x @ w.T + (0 if b is None else b)),
    Op("sum", draw_reduction, F.sum, lambda x, axis, keepdims: x.sum(axis=axis, keepdims=keepdims)),
    Op("mean", draw_reduction, F.mean, lambda x, axis, keepdims: x.mean(axis=axis, keepdims=keepdims)),
    Op("max", lambda data: draw_reduction(data, distinct), F.max, lambda x, axis, keepdims: x.max(axis=axis, keepdims=keepdims)),
    Op("reshape", draw_reshape, F.reshape, lambda x, shape: x.reshape(shape)),
    Op("transpose", draw_transpose, F.transpose, lambda x, axes: x.transpose(axes)),
    Op("broadcast_to", draw_broadcast_to, F.broadcast_to, numpy.broadcast_to),
    Op("getitem", draw_getitem, F.getitem, lambda x, index: x[index]),
    Op("concatenate", draw_concatenate, lambda *xs, axis: F.concatenate(xs, axis),
       lambda *xs, axis: numpy.concatenate(xs, axis)),
    Op("stack", draw_stack, lambda *xs, axis: F.stack(xs, axis), lambda *xs, axis: numpy.stack(xs, axis)),
    Op("softmax", draw_along_axis, F.softmax, softmax),
    Op("log_softmax", draw_along_axis, F.log_softmax, lambda x, axis: numpy.log(softmax(x, axis))),
    Op("logsumexp", draw_logsumexp, F.logsumexp, logsumexp),
    Op("l2_normalize", draw_along_axis, F.l2_normalize,
       lambda x, axis: x / numpy.sqrt((x * x).sum(axis=axis, keepdims=True))),
    Op("layer_norm", draw_layer_norm, F.layer_norm, reference_layer_norm),
    Op("embedding", draw_embedding, F.embedding, lambda w, ids: w[ids]),
    Op("scaled_dot_product_attention", draw_attention, F.scaled_dot_product_attention, attention),
    Op("dropout", draw_dropout, call_dropout, reference_dropout),
]


def _on(xp, arrays):
    return [None if a is None else xp.asarray(a) for a in arrays]


@pytest.mark.parametrize("op", OPS, ids=[op.name for op in OPS])
@given(data=st.data())
def test_forward_matches_numpy(op, xp, data):
    arrays, options = op.draw(data)
    got = op.call(*[None if a is None else tc.tensor(a) for a in _on(xp, arrays)], **options)
    with backend.use_backend("numpy" if xp is numpy else "cupy"):
        expected = numpy.asarray(op.reference(*arrays, **options))
    assert got.shape == expected.shape
    assert got.dtype == numpy.float64
    numpy.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op", OPS, ids=[op.name for op in OPS])
@given(data=st.data())
def test_backward_matches_finite_differences(op, xp, data):
    arrays, options = op.draw(data)
    check_gradients(lambda *tensors: op.call(*tensors, **options), _on(xp, arrays), wrt=op.wrt,
                    seed=data.draw(seeds))


# ---------------------------------------------------------------------------------
# Invariants
# ---------------------------------------------------------------------------------

@given(data=st.data())
def test_softmax_rows_sum_to_one(xp, data):
    arrays, options = draw_along_axis(data)
    y = F.softmax(tc.tensor(xp.asarray(arrays[0] * 50)), **options).numpy()
    numpy.testing.assert_allclose(y.sum(axis=options["axis"]), 1.0, rtol=1e-12)
    assert (y >= 0).all()


@given(seed=seeds, shape=shapes(min_dims=1, max_dims=3, min_side=2))
def test_layer_norm_output_has_zero_mean_and_unit_variance(xp, seed, shape):
    x = xp.asarray(distinct(seed, shape) * 7 + 3)
    y = F.layer_norm(tc.tensor(x), eps=1e-12).numpy()
    numpy.testing.assert_allclose(y.mean(-1), 0, atol=1e-12)
    numpy.testing.assert_allclose(y.var(-1), 1, rtol=1e-9)


@given(seed=seeds, t=st.integers(2, 6), cut=st.integers(1, 5))
def test_causal_attention_ignores_later_tokens(xp, seed, t, cut):
    cut = min(cut, t - 1)
    q, k, v = (xp.asarray(normal(seed + i, (2, 3, t, 4))) for i in range(3))
    before = F.scaled_dot_product_attention(q, k, v, causal=True).numpy()
    k2, v2 = k.copy(), v.copy()
    k2[..., cut:, :] += 5.0
    v2[..., cut:, :] -= 3.0
    after = F.scaled_dot_product_attention(q, k2, v2, causal=True).numpy()
    numpy.testing.assert_array_equal(before[..., :cut, :], after[..., :cut, :])
    assert not numpy.allclose(before[..., cut:, :], after[..., cut:, :])


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_stable_functions_stay_finite_at_extreme_inputs(xp, dtype):
    x = xp.asarray([-1e4, -80.0, -1.0, 0.0, 1.0, 80.0, 1e4], dtype=dtype)
    for fn in (F.sigmoid, F.log_sigmoid, F.softplus, F.quick_gelu, F.gelu, F.softmax, F.log_softmax, F.logsumexp):
        t = tc.tensor(x, requires_grad=True)
        y = fn(t)
        y.sum().backward()
        assert bool(xp.isfinite(y.data).all()), fn.__name__
        assert bool(xp.isfinite(t.grad).all()), fn.__name__
    assert float(F.log_sigmoid(tc.tensor(x)).data[0]) == -1e4
    assert float(F.softplus(tc.tensor(x)).data[-1]) == 1e4


def test_logsumexp_of_a_row_of_minus_infinity_is_minus_infinity(xp):
    x = xp.asarray([[-numpy.inf, -numpy.inf], [0.0, -numpy.inf]])
    numpy.testing.assert_array_equal(F.logsumexp(tc.tensor(x)).numpy(), [-numpy.inf, 0.0])


@given(data=st.data())
def test_float32_agrees_with_float64(xp, data):
    op = data.draw(st.sampled_from([op for op in OPS if op.name != "dropout"]))
    arrays, options = op.draw(data)
    wide = op.call(*[None if a is None else tc.tensor(a) for a in _on(xp, arrays)], **options).numpy()
    narrow = op.call(*[None if a is None else tc.tensor(a.astype(numpy.float32)) for a in _on(xp, arrays)],
                     **options)
    assert narrow.dtype == numpy.float32
    numpy.testing.assert_allclose(narrow.numpy(), wide, rtol=2e-4, atol=2e-5)


def test_cast_round_trips_dtype_and_gradient(xp):
    x = tc.tensor(xp.asarray([1.5, -2.0]), requires_grad=True)
    y = F.cast(x, "float32")
    assert y.dtype == numpy.float32
    (y * 3).sum().backward()
    assert x.grad.dtype == numpy.float64
    numpy.testing.assert_array_equal(backend.to_numpy(x.grad), [3.0, 3.0])


def test_dropout_keeps_expectation_and_is_identity_in_eval(xp):
    x = tc.tensor(xp.ones((200, 200)))
    y = F.dropout(x, 0.25, backend.RNG(0, backend.backend_of(x.data))).numpy()
    assert abs((y == 0).mean() - 0.25) < 0.01
    assert abs(y.mean() - 1.0) < 0.02
    assert F.dropout(x, 0.25, None, training=False) is x


def test_max_splits_the_gradient_between_ties(xp):
    x = tc.tensor(xp.asarray([1.0, 3.0, 3.0, 2.0]), requires_grad=True)
    F.max(x).backward()
    numpy.testing.assert_array_equal(backend.to_numpy(x.grad), [0, 0.5, 0.5, 0])


def test_embedding_gradient_adds_up_repeated_ids(xp):
    weight = tc.tensor(xp.zeros((4, 2)), requires_grad=True)
    F.embedding(weight, xp.asarray([[1, 1], [3, 1]])).sum().backward()
    numpy.testing.assert_array_equal(backend.to_numpy(weight.grad), [[0, 0], [3, 3], [0, 0], [1, 1]])


def test_getitem_picks_the_end_of_text_token(xp):
    ids = xp.asarray([[5, 9, 2, 0], [7, 3, 9, 1]])
    features = tc.tensor(xp.arange(24.0).reshape(2, 4, 3), requires_grad=True)
    picked = features[xp.arange(2), ids.argmax(axis=-1)]          # (B, D) at each row's largest id
    numpy.testing.assert_array_equal(picked.numpy(), [[3, 4, 5], [18, 19, 20]])
    picked.sum().backward()
    assert float(features.grad.sum()) == 6.0


# ---------------------------------------------------------------------------------
# Bad input: clear errors that name the input
# ---------------------------------------------------------------------------------

def test_matmul_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"matmul: shapes \(2, 3\) and \(4, 5\) do not line up"):
        F.matmul(numpy.zeros((2, 3)), numpy.zeros((4, 5)))


def test_broadcast_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"add: shapes \(2, 3\) and \(4,\) cannot be broadcast"):
        tc.tensor(numpy.zeros((2, 3))) + numpy.zeros(4)


def test_linear_mismatch_names_input_and_weight():
    with pytest.raises(ValueError, match=r"linear: input of shape \(2, 3\) does not fit weight of shape \(4, 5\)"):
        F.linear(numpy.zeros((2, 3)), numpy.zeros((4, 5)))


def test_integer_input_into_a_float_op_is_refused():
    with pytest.raises(TypeError, match="exp: input 0 has dtype int64"):
        F.exp(numpy.arange(3))


def test_indexing_out_of_range_names_the_shape():
    with pytest.raises(IndexError, match=r"shape \(2, 3\)"):
        tc.tensor(numpy.zeros((2, 3)))[5]


def test_embedding_id_out_of_range_is_named():
    with pytest.raises(IndexError, match="id 7 is out of range for a table of 4 rows"):
        F.embedding(numpy.zeros((4, 2)), numpy.asarray([1, 7]))
    with pytest.raises(TypeError, match="ids must be integers"):
        F.embedding(numpy.zeros((4, 2)), numpy.asarray([1.0]))


def test_attention_shape_errors_are_named():
    with pytest.raises(ValueError, match="causal mask needs equal query and key lengths"):
        F.scaled_dot_product_attention(numpy.zeros((1, 1, 2, 4)), numpy.zeros((1, 1, 3, 4)),
                                       numpy.zeros((1, 1, 3, 4)), causal=True)
    with pytest.raises(ValueError, match="attention: shapes do not fit"):
        F.scaled_dot_product_attention(numpy.zeros((1, 1, 2, 4)), numpy.zeros((1, 1, 2, 3)),
                                       numpy.zeros((1, 1, 2, 3)))


def test_layer_norm_parameter_shape_is_checked():
    with pytest.raises(ValueError, match=r"layer_norm: weight must have shape \(3,\)"):
        F.layer_norm(numpy.zeros((2, 3)), numpy.ones(4))


def test_reshape_and_reduction_errors_are_named():
    with pytest.raises(ValueError, match=r"cannot reshape an input of shape \(2, 3\) into \(4,\)"):
        F.reshape(numpy.zeros((2, 3)), (4,))
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        F.sum(numpy.zeros((2, 3)), axis=2)
    with pytest.raises(TypeError, match="pow: the exponent must be a Python number"):
        F.pow(numpy.ones(2), numpy.ones(2))


# ---------------------------------------------------------------------------------
# Patches (im2col) and batch norm, channels last
# ---------------------------------------------------------------------------------

def naive_patches(x, kernel, stride, padding):
    """im2col one output pixel at a time: the window at (i, j), flattened in (ky, kx, c) order."""
    batch, height, width, channels = x.shape
    padded = numpy.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    out_h = (height + 2 * padding - kernel) // stride + 1
    out_w = (width + 2 * padding - kernel) // stride + 1
    cols = numpy.zeros((batch, out_h, out_w, kernel * kernel * channels))
    for i in range(out_h):
        for j in range(out_w):
            window = padded[:, i * stride:i * stride + kernel, j * stride:j * stride + kernel]   # (B, k, k, C)
            cols[:, i, j] = window.reshape(batch, -1)
    return cols


def naive_convolution(x, weight, bias, stride, padding):
    """A direct convolution loop with a PyTorch Conv2d weight (out, C, k, k), channels-last input and output."""
    batch, height, width, _ = x.shape
    out_channels, _, kernel, _ = weight.shape
    padded = numpy.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    out_h = (height + 2 * padding - kernel) // stride + 1
    out_w = (width + 2 * padding - kernel) // stride + 1
    y = numpy.zeros((batch, out_h, out_w, out_channels))
    for i in range(out_h):
        for j in range(out_w):
            for ky in range(kernel):
                for kx in range(kernel):
                    pixel = padded[:, i * stride + ky, j * stride + kx]             # (B, C)
                    y[:, i, j] += pixel @ weight[:, :, ky, kx].T                  # (B, out)
    return y + (0 if bias is None else bias)


@st.composite
def patch_configs(draw):
    """(input shape, kernel, stride, padding) with at least one output pixel; strides up to past the kernel."""
    kernel, stride, padding = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(0, 2))
    low = max(1, kernel - 2 * padding)
    height, width = draw(st.integers(low, low + 4)), draw(st.integers(low, low + 4))
    return (draw(st.integers(1, 2)), height, width, draw(st.integers(1, 3))), kernel, stride, padding


@given(seed=seeds, config=patch_configs())
def test_patches_matches_a_per_pixel_loop(xp, seed, config):
    shape, kernel, stride, padding = config
    x = normal(seed, shape)
    got = F.patches(tc.tensor(xp.asarray(x)), kernel, stride, padding)
    numpy.testing.assert_array_equal(got.numpy(), naive_patches(x, kernel, stride, padding))


PATCH_CASES = [(1, 1, 0), (1, 2, 1), (2, 2, 0), (3, 1, 1), (2, 3, 0), (3, 2, 2)]   # (kernel, stride, padding)


@pytest.mark.parametrize("kernel, stride, padding", PATCH_CASES, ids=[f"k{k}s{s}p{p}" for k, s, p in PATCH_CASES])
def test_patches_backward_matches_finite_differences(xp, kernel, stride, padding):
    x = normal(kernel * 100 + stride * 10 + padding, (2, 5, 4, 3))
    check_gradients(lambda t: F.patches(t, kernel, stride, padding), [xp.asarray(x)])


@given(seed=seeds, config=patch_configs(), out_channels=st.integers(1, 3), with_bias=st.booleans())
def test_convolution_through_patches_matches_a_direct_loop(xp, seed, config, out_channels, with_bias):
    shape, kernel, stride, padding = config
    x = normal(seed, shape)
    torch_weight = normal(seed + 1, (out_channels, shape[-1], kernel, kernel))   # PyTorch's (out, C, k, k)
    weight = torch_weight.transpose(0, 2, 3, 1).reshape(out_channels, -1)      # (out, k·k·C)
    bias = normal(seed + 2, (out_channels,)) if with_bias else None

    def convolution(x, weight, bias):
        return F.linear(F.patches(x, kernel, stride, padding), weight, bias)

    got = convolution(*[None if a is None else tc.tensor(a) for a in _on(xp, [x, weight, bias])])
    numpy.testing.assert_allclose(got.numpy(), naive_convolution(x, torch_weight, bias, stride, padding),
                                  rtol=1e-12, atol=1e-12)
    check_gradients(convolution, _on(xp, [x, weight, bias]), seed=seed)


def test_patches_backward_counts_the_windows_over_each_pixel(xp):
    x = tc.tensor(xp.ones((1, 4, 5, 2)), requires_grad=True)
    F.patches(x, 3, stride=1, padding=1).sum().backward()
    coverage = numpy.outer([2, 3, 3, 2], [2, 3, 3, 3, 2])   # windows per pixel: 4 at corners, 6 on edges, 9 inside
    numpy.testing.assert_array_equal(backend.to_numpy(x.grad), numpy.repeat(coverage[None, :, :, None], 2, axis=3))
    x.grad = None
    F.patches(x, 1, stride=2).sum().backward()                      # stride past the kernel: skipped pixels get 0
    read = numpy.outer([1, 0, 1, 0], [1, 0, 1, 0, 1])
    numpy.testing.assert_array_equal(backend.to_numpy(x.grad)[0, :, :, 0], read)


def draw_batch_norm(data, ndim, affine):
    """(x, weight, bias) with ndim axes and at least 2 values per channel; channel values well apart."""
    leading = (data.draw(st.integers(2, 4)),) + tuple(data.draw(st.integers(1, 3)) for _ in range(ndim - 2))
    channels = data.draw(st.integers(1, 4))
    weight = normal(data.draw(seeds), (channels,)) if affine else None
    bias = normal(data.draw(seeds), (channels,)) if affine else None
    x = distinct(data.draw(seeds), leading + (channels,), gap=0.2)
    return [x, weight, bias], {"eps": data.draw(st.sampled_from([1e-5, 0.1]))}


def draw_running(data, channels):
    """Running (mean, var) as NumPy arrays, the variance positive."""
    return normal(data.draw(seeds), (channels,)), positive(data.draw(seeds), (channels,))


def composed_batch_norm(x, weight, bias, eps, running=None):
    """Batch norm from the primitive ops: mean and variance by F.mean, then (x - μ) / √(σ² + eps) · w + b."""
    axes = tuple(range(x.ndim - 1))
    if running is None:
        centred = x - F.mean(x, axis=axes, keepdims=True)
        variance = F.mean(centred * centred, axis=axes, keepdims=True)
    else:
        centred, variance = x - running[0], running[1]
    y = centred / F.sqrt(variance + eps)
    y = y if weight is None else y * weight
    return y if bias is None else y + bias


@pytest.mark.parametrize("affine", [False, True], ids=["plain", "affine"])
@pytest.mark.parametrize("ndim", [2, 4])
@given(data=st.data())
def test_batch_norm_training_backward_matches_finite_differences(xp, ndim, affine, data):
    arrays, options = draw_batch_norm(data, ndim, affine)
    check_gradients(lambda *tensors: F.batch_norm(*tensors, **options), _on(xp, arrays), seed=data.draw(seeds))


@given(data=st.data())
def test_batch_norm_eval_backward_matches_finite_differences(xp, data):
    arrays, options = draw_batch_norm(data, data.draw(st.sampled_from([2, 4])), data.draw(st.booleans()))
    running = _on(xp, draw_running(data, arrays[0].shape[-1]))
    check_gradients(lambda *tensors: F.batch_norm(*tensors, running=running, training=False, **options),
                    _on(xp, arrays), seed=data.draw(seeds))


@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
@given(data=st.data())
def test_batch_norm_matches_its_composition_forward_and_backward(xp, training, data):
    arrays, options = draw_batch_norm(data, data.draw(st.sampled_from([2, 3, 4])), True)
    arrays[1:] = [a if data.draw(st.booleans()) else None for a in arrays[1:]]   # weight, bias: each optional
    running = None if training else _on(xp, draw_running(data, arrays[0].shape[-1]))
    cotangent = xp.asarray(normal(data.draw(seeds), arrays[0].shape))
    results = []
    for fn in (lambda *t: F.batch_norm(*t, running=running, training=training, **options),
               lambda *t: composed_batch_norm(*t, running=running, **options)):
        tensors = [None if a is None else tc.tensor(a, requires_grad=True) for a in _on(xp, arrays)]
        y = fn(*tensors)
        y.backward(cotangent)
        results.append([y.numpy()] + [backend.to_numpy(t.grad) for t in tensors if t is not None])
    for fused, composed in zip(*results):
        numpy.testing.assert_allclose(fused, composed, rtol=1e-10, atol=1e-12)


@given(seed=seeds, shape=shapes(min_dims=2, max_dims=4, min_side=2, max_side=4))
def test_batch_norm_training_output_is_standardised_per_channel(xp, seed, shape):
    x = distinct(seed, shape) * 7 + 3
    eps = 1e-5
    y = F.batch_norm(tc.tensor(xp.asarray(x)), eps=eps).numpy()
    axes = tuple(range(len(shape) - 1))
    variance = x.var(axis=axes)
    numpy.testing.assert_allclose(y.mean(axis=axes), 0, atol=1e-12)
    numpy.testing.assert_allclose(y.var(axis=axes), variance / (variance + eps), rtol=1e-10)


@given(data=st.data(), momentum=st.sampled_from([0.0, 0.1, 0.5, 1.0]), as_tensors=st.booleans())
def test_batch_norm_moves_the_running_statistics_once_per_call(xp, data, momentum, as_tensors):
    (x, weight, bias), options = draw_batch_norm(data, data.draw(st.sampled_from([2, 4])), True)
    mean0, var0 = draw_running(data, x.shape[-1])
    running = (xp.array(mean0), xp.array(var0))          # copies, updated in place
    passed = tuple(tc.Tensor(r) for r in running) if as_tensors else running
    t = tc.tensor(xp.asarray(x), requires_grad=True)
    y = F.batch_norm(t, xp.asarray(weight), xp.asarray(bias), running=passed, momentum=momentum, **options)
    axes = tuple(range(x.ndim - 1))
    expected = ((1 - momentum) * mean0 + momentum * x.mean(axis=axes),
                (1 - momentum) * var0 + momentum * x.var(axis=axes, ddof=1))   # unbiased, as PyTorch keeps it
    for array, wanted in zip(running, expected):
        numpy.testing.assert_allclose(backend.to_numpy(array), wanted, rtol=1e-12, atol=1e-14)
    after_forward = [backend.to_numpy(r).copy() for r in running]
    y.backward(xp.ones(y.shape))                            # the backward leaves the running statistics alone
    for array, before in zip(running, after_forward):
        numpy.testing.assert_array_equal(backend.to_numpy(array), before)


@given(data=st.data())
def test_batch_norm_eval_with_the_batch_statistics_equals_training(xp, data):
    arrays, options = draw_batch_norm(data, data.draw(st.sampled_from([2, 3, 4])), data.draw(st.booleans()))
    x = arrays[0]
    axes = tuple(range(x.ndim - 1))
    running = _on(xp, [x.mean(axis=axes), x.var(axis=axes)])   # the biased variance, which training divides by
    on_device = _on(xp, arrays)
    training = F.batch_norm(*on_device, **options).numpy()
    evaluation = F.batch_norm(*on_device, running=running, training=False, **options).numpy()
    numpy.testing.assert_allclose(evaluation, training, rtol=1e-12, atol=1e-12)
    numpy.testing.assert_array_equal(backend.to_numpy(running[1]), x.var(axis=axes))   # eval updates nothing


class _TwoRanksOfOne:
    """A communicator whose all-reduce doubles its input: as if a second rank held an identical copy of the batch."""

    def __init__(self):
        self.calls = 0

    def all_reduce(self, array):
        self.calls += 1
        array *= 2
        return array


@given(data=st.data())
def test_synchronised_batch_norm_uses_the_statistics_of_the_global_batch(xp, data):
    # Two ranks holding the same batch: the global batch is that batch twice, whose mean and variance are the
    # batch's own; each rank's input gradient is then that of the two-copy batch at its own rows.
    arrays, options = draw_batch_norm(data, data.draw(st.sampled_from([2, 4])), data.draw(st.booleans()))
    x = arrays[0]
    upstream = normal(data.draw(seeds), x.shape)
    twice = numpy.concatenate([x, x])
    alone = [tc.Tensor(xp.asarray(twice), requires_grad=True), *_on(xp, arrays[1:])]
    F.sum(F.mul(F.batch_norm(*alone, **options), xp.asarray(numpy.concatenate([upstream, upstream])))).backward()
    comm = _TwoRanksOfOne()
    synced = [tc.Tensor(xp.asarray(x), requires_grad=True), *_on(xp, arrays[1:])]
    y = F.batch_norm(*synced, sum_over_batch=comm.all_reduce, **options)
    F.sum(F.mul(y, xp.asarray(upstream))).backward()
    assert comm.calls == 3                                    # Σx and Σ(x-μ)² forward, (Σĝ, Σĝx̂) backward
    half = x.shape[0]
    numpy.testing.assert_allclose(y.numpy(), F.batch_norm(*alone, **options).numpy()[:half], rtol=1e-12,
                                  atol=1e-12)
    numpy.testing.assert_allclose(backend.to_numpy(synced[0].grad), backend.to_numpy(alone[0].grad)[:half],
                                  rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_output_has_the_type_of_the_normalised_input_times_the_weight(training):
    """y = x̂ · w + b in x̂ · w's type, the bias added in place (as layer norm's affine end does): a float64 bias
    on float32 data does not make the output float64 (it did for a while once batch norm went to the pool)."""
    x = numpy.random.default_rng(0).standard_normal((4, 3)).astype(numpy.float32)
    running = (numpy.zeros(3, numpy.float32), numpy.ones(3, numpy.float32))
    for weight, bias, expected in ((None, numpy.ones(3), numpy.float32), (numpy.ones(3, numpy.float32), numpy.ones(3),
                                   numpy.float32), (numpy.ones(3), numpy.ones(3, numpy.float32), numpy.float64)):
        y = F.batch_norm(tc.tensor(x), None if weight is None else tc.tensor(weight),
                         tc.tensor(bias), running=running, training=training)
        assert y.numpy().dtype == expected, (weight is None, bias.dtype)


def test_patches_and_batch_norm_stay_on_the_device(monkeypatch):
    device = strict_backend.install(monkeypatch)
    x = tc.tensor(device.asarray(normal(0, (2, 5, 5, 3))), requires_grad=True)
    weight = tc.tensor(device.asarray(normal(1, (4, 27))), requires_grad=True)
    scale = tc.tensor(device.ones(4), requires_grad=True)
    running = (device.zeros(4), device.ones(4))
    features = F.linear(F.patches(x, 3, stride=2, padding=1), weight)                    # (2, 3, 3, 4)
    y = F.batch_norm(features, scale, running=running)
    y = y + F.batch_norm(features, scale, running=running, training=False)
    (y * y).sum().backward()
    for array in (y.data, x.grad, weight.grad, scale.grad, *running):
        assert isinstance(array, DeviceArray), f"a {type(array).__name__} came back where a device array belongs"


def test_patches_bad_input_is_named():
    with pytest.raises(ValueError, match=r"patches: input must be 4-D \(B, H, W, C\), got shape \(4, 4, 2\)"):
        F.patches(numpy.zeros((4, 4, 2)), 2)
    x = numpy.zeros((1, 4, 3, 2))
    for options, message in [({"kernel": 0}, "kernel must be an integer >= 1, got 0"),
                             ({"kernel": 2.0}, "kernel must be an integer >= 1, got 2.0"),
                             ({"kernel": 2, "stride": 0}, "stride must be an integer >= 1, got 0"),
                             ({"kernel": 2, "padding": -1}, "padding must be an integer >= 0, got -1"),
                             ({"kernel": 6, "padding": 1}, r"kernel 6 does not fit an input of shape \(1, 4, 3, 2\) "
                                                           r"with padding 1 \(padded to 6×5\)")]:
        with pytest.raises(ValueError, match=f"patches: {message}"):
            F.patches(x, **options)


def test_batch_norm_bad_input_is_named():
    x = numpy.zeros((4, 3))
    good = (numpy.zeros(3), numpy.ones(3))
    with pytest.raises(ValueError, match=r"batch_norm: input must be non-empty with a batch axis .* shape \(3,\)"):
        F.batch_norm(numpy.zeros(3))
    with pytest.raises(ValueError, match=r"batch_norm: weight must have shape \(3,\) for input \(4, 3\), got \(4"):
        F.batch_norm(x, numpy.ones(4))
    with pytest.raises(ValueError, match=r"batch_norm: training needs at least 2 values per channel .* \(1, 3\)"):
        F.batch_norm(numpy.zeros((1, 3)))
    with pytest.raises(ValueError, match=r"batch_norm: evaluation \(training=False\) .* pass running=\(mean, var\)"):
        F.batch_norm(x, training=False)
    with pytest.raises(ValueError, match=r"batch_norm: running must be a pair \(mean, var\)"):
        F.batch_norm(x, running=numpy.zeros(3))
    with pytest.raises(ValueError, match=r"batch_norm: running var must have shape \(3,\) for input \(4, 3\), got"):
        F.batch_norm(x, running=(numpy.zeros(3), numpy.ones(4)))
    with pytest.raises(ValueError, match=r"batch_norm: running mean must be a float array on the input's backend "
                                         r"\(numpy\), got numpy, int64"):
        F.batch_norm(x, running=(numpy.zeros(3, dtype=numpy.int64), numpy.ones(3)))
    with pytest.raises(ValueError, match=r"batch_norm: momentum must be in \[0, 1\], got 1.5"):
        F.batch_norm(x, running=good, momentum=1.5)
    numpy.testing.assert_array_equal(good[0], 0)                      # a refused call moves nothing
