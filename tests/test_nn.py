"""Property tests for tinyclip.nn.

For every layer and every enabled backend: the forward equals a plain NumPy
formula (float64, 1e-12), and the backward, for the inputs and for every
parameter, equals five-point finite differences along random directions
(float64, 1e-7 relative). Then the invariants: a causal mask hides later
tokens, ``load_state_dict(state_dict())`` round-trips exactly, a state that
does not fit is refused with one error naming every problem, and
train/eval reaches every sub-module.
"""

import math

import numpy
import pytest
from hypothesis import given, strategies as st

import tinyclip as tc
from tinyclip import backend, nn

from .gradcheck import check_targets
from .strategies import normal, seeds

erf = numpy.vectorize(math.erf)


def name_of(xp):
    return "numpy" if xp is numpy else "cupy"


def host(value):
    """A NumPy copy of a Tensor or array from either backend."""
    return backend.to_numpy(value.data if isinstance(value, tc.Tensor) else value)


def params_of(module):
    """The module's parameters as NumPy float64 arrays, by dotted name."""
    return {name: host(value) for name, value in module.state_dict().items()}


# ---------------------------------------------------------------------------------
# Plain NumPy references
# ---------------------------------------------------------------------------------

def ref_linear(p, prefix, x):
    return x @ p[prefix + "weight"].T + p[prefix + "bias"]


def ref_layer_norm(p, prefix, x, eps=1e-5):
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / numpy.sqrt(var + eps) * p[prefix + "weight"] + p[prefix + "bias"]


REF_ACTIVATIONS = {
    "quick_gelu": lambda x: x / (1 + numpy.exp(-1.702 * x)),
    "gelu": lambda x: 0.5 * x * (1 + erf(x / math.sqrt(2))),
    "gelu_tanh": lambda x: 0.5 * x * (1 + numpy.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3))),
    "relu": lambda x: numpy.maximum(x, 0),
}


def ref_mlp(p, prefix, x, activation):
    return ref_linear(p, prefix + "fc2.", REF_ACTIVATIONS[activation](ref_linear(p, prefix + "fc1.", x)))


def ref_attention(p, prefix, x, heads, causal, context=None):
    """Multi-head attention one head at a time, straight from the definition."""
    context = x if context is None else context
    q, k, v = (ref_linear(p, f"{prefix}{name}_proj.", source)
               for name, source in (("q", x), ("k", context), ("v", context)))
    d = q.shape[-1] // heads
    outputs = []
    for h in range(heads):
        part = slice(h * d, (h + 1) * d)
        scores = q[..., part] @ k[..., part].swapaxes(-1, -2) / math.sqrt(d)   # (B, Tq, Tk)
        if causal:
            scores = scores + numpy.triu(numpy.full(scores.shape[-2:], -numpy.inf), k=1)
        weights = numpy.exp(scores - scores.max(axis=-1, keepdims=True))
        weights /= weights.sum(axis=-1, keepdims=True)
        outputs.append(weights @ v[..., part])
    return ref_linear(p, prefix + "out_proj.", numpy.concatenate(outputs, axis=-1))


def ref_block(p, prefix, x, heads, activation, causal, eps=1e-5):
    x = x + ref_attention(p, prefix + "attn.", ref_layer_norm(p, prefix + "ln1.", x, eps), heads, causal)
    return x + ref_mlp(p, prefix + "mlp.", ref_layer_norm(p, prefix + "ln2.", x, eps), activation)


# ---------------------------------------------------------------------------------
# Gradient check over a module's inputs and parameters
# ---------------------------------------------------------------------------------

def check_module_gradients(module, inputs, seed):
    """Backward of ``module(*inputs)`` vs finite differences, for every float input and every parameter.

    The scheme of tests/gradcheck.py, with its truncation allowance: a layer
    norm over nearly equal features bends sharply at the scale of the step.
    """
    args = [tc.Tensor(a, requires_grad=True) if a.dtype.kind == "f" else a for a in inputs]
    targets = [(f"input {i}", a) for i, a in enumerate(args) if isinstance(a, tc.Tensor)]
    check_targets(lambda: module(*args), targets + list(module.named_parameters()), seed=seed,
                  truncation_allowance=True)


# ---------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------

def token_shapes(min_width=1):
    """(batch, tokens, heads, head size) small enough for a gradient check in milliseconds.

    Layers with a layer norm ask for ``min_width=3``: over one or two features
    it is a step of width √eps (x̂ = ±1 for two), too steep for finite differences.
    """
    return st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 3), st.integers(1, 3)).filter(
        lambda shape: shape[2] * shape[3] >= min_width)


activations = st.sampled_from(sorted(nn.ACTIVATIONS))


def scaled_init(module, seed, std=0.5):
    """Replace the 0.02-std initial weights by larger ones (and non-trivial norms and biases) so every term matters."""
    rng = numpy.random.default_rng(seed)
    for p in module.parameters():
        p.data[...] = backend.asarray(rng.standard_normal(p.shape) * std, backend.backend_of(p.data))
    return module


# ---------------------------------------------------------------------------------
# Each layer: forward against NumPy, backward against finite differences
# ---------------------------------------------------------------------------------

@given(leading=st.lists(st.integers(1, 3), max_size=2), sizes=st.tuples(st.integers(1, 4), st.integers(1, 4)),
       bias=st.booleans(), seed=seeds)
def test_linear(xp, leading, sizes, bias, seed):
    in_features, out_features = sizes
    layer = scaled_init(nn.Linear(in_features, out_features, bias=bias, dtype="float64",
                                  backend=name_of(xp), seed=seed % 1000), seed)
    x = normal(seed, tuple(leading) + (in_features,))
    p = params_of(layer)
    expected = x @ p["weight"].T + (p["bias"] if bias else 0)
    numpy.testing.assert_allclose(host(layer(xp.asarray(x))), expected, rtol=1e-12, atol=1e-12)
    assert [name for name, _ in layer.named_parameters()] == (["weight", "bias"] if bias else ["weight"])
    check_module_gradients(layer, [xp.asarray(x)], seed)


@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=3), seed=seeds)
def test_layer_norm(xp, shape, seed):
    dim = shape[-1] + 2   # see token_shapes: widths 1 and 2 are too steep for finite differences
    layer = scaled_init(nn.LayerNorm(dim, dtype="float64", backend=name_of(xp)), seed)
    x = normal(seed, tuple(shape[:-1]) + (dim,), scale=2.0)
    numpy.testing.assert_allclose(host(layer(xp.asarray(x))), ref_layer_norm(params_of(layer), "", x),
                                  rtol=1e-12, atol=1e-12)
    check_module_gradients(layer, [xp.asarray(x)], seed)


def ref_conv2d(weight, bias, x, kernel, stride, padding):
    """Direct convolution, one output pixel at a time; weight (out, k·k·in) in (ky, kx, c) order."""
    b, h, w, c = x.shape
    padded = numpy.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    ho, wo = (h + 2 * padding - kernel) // stride + 1, (w + 2 * padding - kernel) // stride + 1
    kernel_4d = weight.reshape(-1, kernel, kernel, c)                                # (out, ky, kx, in)
    y = numpy.zeros((b, ho, wo, weight.shape[0]))
    for i in range(ho):
        for j in range(wo):
            window = padded[:, i * stride:i * stride + kernel, j * stride:j * stride + kernel, :]   # (B, k, k, in)
            y[:, i, j, :] = numpy.einsum("byxc,oyxc->bo", window, kernel_4d)
    return y + (0 if bias is None else bias)


@given(batch=st.integers(1, 2), side=st.integers(3, 6), channels=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       kernel=st.integers(1, 3), stride=st.integers(1, 3), padding=st.integers(0, 1), bias=st.booleans(), seed=seeds)
def test_conv2d(xp, batch, side, channels, kernel, stride, padding, bias, seed):
    c_in, c_out = channels
    layer = scaled_init(nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=bias, dtype="float64",
                                  backend=name_of(xp), seed=seed % 1000), seed)
    x = normal(seed, (batch, side, side, c_in))
    p = params_of(layer)
    expected = ref_conv2d(p["weight"], p.get("bias"), x, kernel, stride, padding)
    numpy.testing.assert_allclose(host(layer(xp.asarray(x))), expected, rtol=1e-12, atol=1e-12)
    check_module_gradients(layer, [xp.asarray(x)], seed)


@given(shape=st.sampled_from([(4, 3), (2, 3, 3, 4), (3, 2, 5)]), seed=seeds)
def test_batch_norm_trains_on_batch_statistics_and_evaluates_on_running_ones(xp, shape, seed):
    layer = scaled_init(nn.BatchNorm(shape[-1], momentum=0.25, dtype="float64", backend=name_of(xp)), seed)
    x = normal(seed, shape, scale=2.0) + 1.5
    p = params_of(layer)
    flat = x.reshape(-1, shape[-1])
    mean, var = flat.mean(axis=0), flat.var(axis=0)
    expected = (x - mean) / numpy.sqrt(var + 1e-5) * p["weight"] + p["bias"]
    numpy.testing.assert_allclose(host(layer(xp.asarray(x))), expected, rtol=1e-12, atol=1e-12)
    # the running statistics moved a quarter of the way from (0, 1) to the batch's (unbiased variance)
    n = flat.shape[0]
    numpy.testing.assert_allclose(host(layer.running_mean), 0.25 * mean, rtol=1e-12, atol=1e-15)
    numpy.testing.assert_allclose(host(layer.running_var), 0.75 + 0.25 * var * n / (n - 1), rtol=1e-12)
    check_module_gradients(layer, [xp.asarray(x)], seed)       # (each call moves the running statistics again)
    layer.eval()
    running_mean, running_var = host(layer.running_mean), host(layer.running_var)
    expected = (x - running_mean) / numpy.sqrt(running_var + 1e-5) * p["weight"] + p["bias"]
    numpy.testing.assert_allclose(host(layer(xp.asarray(x))), expected, rtol=1e-12, atol=1e-12)
    numpy.testing.assert_array_equal(host(layer(xp.asarray(x[:1]))), host(layer(xp.asarray(x)))[:1])  # alone = in a batch
    numpy.testing.assert_array_equal(host(layer.running_mean), running_mean)                          # eval: no update
    check_module_gradients(layer, [xp.asarray(x)], seed)


class _TwoRanksOfOne:
    """A communicator whose all-reduce doubles its input: as if a second rank held an identical copy of the batch."""

    size = 2

    def __init__(self):
        self.calls = 0

    def all_reduce(self, array):
        self.calls += 1
        array *= 2
        return array


@given(shape=st.sampled_from([(4, 3), (2, 3, 3, 4)]), seed=seeds)
def test_batch_norm_with_a_communicator_normalises_over_every_ranks_batch(xp, shape, seed):
    # two ranks holding the same batch: the global batch is that batch twice, whose statistics are the
    # batch's own, and each rank's input gradient is that of the two-copy batch at its own rows
    x, upstream = normal(seed, shape, scale=2.0) + 1.5, normal(seed + 1, shape)
    alone = scaled_init(nn.BatchNorm(shape[-1], momentum=0.25, dtype="float64", backend=name_of(xp)), seed)
    comm = _TwoRanksOfOne()
    synced = scaled_init(nn.BatchNorm(shape[-1], momentum=0.25, dtype="float64", backend=name_of(xp), comm=comm),
                         seed)
    twice = tc.tensor(xp.asarray(numpy.concatenate([x, x])), requires_grad=True)
    (alone(twice) * xp.asarray(numpy.concatenate([upstream, upstream]))).sum().backward()
    mine = tc.tensor(xp.asarray(x), requires_grad=True)
    y = synced(mine)
    (y * xp.asarray(upstream)).sum().backward()
    assert comm.calls == 3                                    # Σx and Σ(x-μ)² forward, (Σĝ, Σĝx̂) backward
    numpy.testing.assert_allclose(host(mine.grad), host(twice.grad)[:shape[0]], rtol=1e-10, atol=1e-12)
    numpy.testing.assert_allclose(host(synced.running_var), host(alone.running_var), rtol=1e-12)
    # the weight's gradient is this rank's share: the two ranks' shares sum to the two-copy batch's
    numpy.testing.assert_allclose(2 * host(synced.weight.grad), host(alone.weight.grad), rtol=1e-10, atol=1e-12)
    synced.eval()
    calls = comm.calls
    synced(xp.asarray(x))
    assert comm.calls == calls                                 # evaluation uses the running statistics: no messages


def test_synchronise_batch_norm_gives_every_batch_norm_layer_the_communicator():
    from tinyclip.models import CLIP, preset
    model = CLIP(preset("tiny", vision_type="cnn", conv_channels=(3, 4)), seed=0)
    layers = [module for module in model.modules() if isinstance(module, nn.BatchNorm)]
    assert len(layers) == 2 and all(layer.comm is None for layer in layers)
    comm = _TwoRanksOfOne()
    assert nn.synchronise_batch_norm(model, comm) == 2
    assert all(layer.comm is comm for layer in layers)
    assert nn.synchronise_batch_norm(model, None) == 2 and all(layer.comm is None for layer in layers)


def test_buffers_are_saved_and_loaded_but_never_trained(xp):
    source = nn.BatchNorm(3, backend=name_of(xp))
    source(xp.asarray(normal(0, (5, 3)) + 2.0, dtype="float32"))       # moves the running statistics
    assert [name for name, _ in source.named_parameters()] == ["weight", "bias"]
    assert [name for name, _ in source.named_buffers()] == ["running_mean", "running_var"]
    state = source.state_dict()
    assert list(state) == ["weight", "bias", "running_mean", "running_var"]
    target = nn.BatchNorm(3, backend=name_of(xp))
    target.load_state_dict(state)
    numpy.testing.assert_array_equal(host(target.running_mean), host(source.running_mean))
    numpy.testing.assert_array_equal(host(target.running_var), host(source.running_var))
    with pytest.raises(ValueError, match=r"missing keys \(1\): running_var"):
        nn.BatchNorm(3, backend=name_of(xp)).load_state_dict({k: v for k, v in state.items() if k != "running_var"})
    assert not any(isinstance(p, nn.Buffer) for p in source.parameters())
    assert not source.running_mean.requires_grad


@given(num=st.integers(1, 6), dim=st.integers(1, 4), ids_shape=st.lists(st.integers(1, 4), max_size=2), seed=seeds)
def test_embedding(xp, num, dim, ids_shape, seed):
    layer = nn.Embedding(num, dim, dtype="float64", backend=name_of(xp), seed=seed % 1000)
    ids = numpy.random.default_rng(seed).integers(0, num, size=tuple(ids_shape))   # repeats are likely
    numpy.testing.assert_array_equal(host(layer(xp.asarray(ids))), params_of(layer)["weight"][ids])
    check_module_gradients(layer, [xp.asarray(ids)], seed)


@given(shape=token_shapes(), hidden=st.integers(1, 6), activation=activations, seed=seeds)
def test_mlp(xp, shape, hidden, activation, seed):
    batch, tokens, heads, head_dim = shape
    dim = heads * head_dim
    layer = scaled_init(nn.MLP(dim, hidden, activation, dtype="float64", backend=name_of(xp)), seed)
    if activation == "relu":   # keep the pre-activations away from ReLU's kink, where differences break
        layer.fc1.bias.data += xp.asarray(numpy.random.default_rng(seed).choice([-1.0, 1.0], hidden) * 3.0)
    x = normal(seed, (batch, tokens, dim))
    assert [name for name, _ in layer.named_parameters()] == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    numpy.testing.assert_allclose(host(layer(xp.asarray(x))), ref_mlp(params_of(layer), "", x, activation),
                                  rtol=1e-12, atol=1e-12)
    check_module_gradients(layer, [xp.asarray(x)], seed)


@given(shape=token_shapes(), causal=st.booleans(), seed=seeds)
def test_self_attention(xp, shape, causal, seed):
    batch, tokens, heads, head_dim = shape
    dim = heads * head_dim
    layer = scaled_init(nn.MultiHeadAttention(dim, heads, causal=causal, dtype="float64", backend=name_of(xp)), seed)
    x = normal(seed, (batch, tokens, dim))
    numpy.testing.assert_allclose(host(layer(xp.asarray(x))), ref_attention(params_of(layer), "", x, heads, causal),
                                  rtol=1e-12, atol=1e-12)
    check_module_gradients(layer, [xp.asarray(x)], seed)


class _CrossAttention(nn.Module):
    """Queries from one sequence, keys and values from another: SigLIP's pooling head in miniature."""

    def __init__(self, attention):
        super().__init__()
        self.attention = attention

    def forward(self, x, context):
        return self.attention(x, context)


@given(shape=token_shapes(), context_tokens=st.integers(1, 5), seed=seeds)
def test_cross_attention_with_other_length(xp, shape, context_tokens, seed):
    batch, tokens, heads, head_dim = shape
    dim = heads * head_dim
    layer = scaled_init(nn.MultiHeadAttention(dim, heads, dtype="float64", backend=name_of(xp)), seed)
    x, context = normal(seed, (batch, tokens, dim)), normal(seed + 1, (batch, context_tokens, dim))
    out = layer(xp.asarray(x), context=xp.asarray(context))
    assert out.shape == (batch, tokens, dim)
    numpy.testing.assert_allclose(host(out), ref_attention(params_of(layer), "", x, heads, False, context),
                                  rtol=1e-12, atol=1e-12)
    check_module_gradients(_CrossAttention(layer), [xp.asarray(x), xp.asarray(context)], seed)


@given(shape=token_shapes(min_width=3), activation=activations, causal=st.booleans(), seed=seeds)
def test_block(xp, shape, activation, causal, seed):
    batch, tokens, heads, head_dim = shape
    dim = heads * head_dim
    block = scaled_init(nn.Block(dim, heads, mlp_ratio=2, activation=activation, causal=causal,
                                 dtype="float64", backend=name_of(xp)), seed, std=0.3)
    if activation == "relu":
        block.mlp.fc1.bias.data += xp.asarray(numpy.random.default_rng(seed).choice([-1.0, 1.0], 2 * dim) * 3.0)
    x = normal(seed, (batch, tokens, dim))
    numpy.testing.assert_allclose(host(block(xp.asarray(x))),
                                  ref_block(params_of(block), "", x, heads, activation, causal),
                                  rtol=1e-12, atol=1e-12)
    check_module_gradients(block, [xp.asarray(x)], seed)


@given(shape=token_shapes(min_width=3), depth=st.integers(0, 2), causal=st.booleans(), seed=seeds)
def test_transformer(xp, shape, depth, causal, seed):
    batch, tokens, heads, head_dim = shape
    dim = heads * head_dim
    model = scaled_init(nn.Transformer(dim, depth, heads, mlp_ratio=2, causal=causal, dtype="float64",
                                       backend=name_of(xp)), seed, std=0.3)
    assert len(model.blocks) == depth
    x = normal(seed, (batch, tokens, dim))
    p = params_of(model)
    expected = x
    for i in range(depth):
        expected = ref_block(p, f"blocks.{i}.", expected, heads, "quick_gelu", causal)
    numpy.testing.assert_allclose(host(model(xp.asarray(x))), expected, rtol=1e-12, atol=1e-12)
    if depth:
        check_module_gradients(model, [xp.asarray(x)], seed)


# ---------------------------------------------------------------------------------
# Invariants
# ---------------------------------------------------------------------------------

@given(shape=token_shapes(), data=st.data(), seed=seeds)
def test_causal_mask_hides_later_tokens(xp, shape, data, seed):
    batch, tokens, heads, _ = shape
    tokens += 1
    dim = heads * 3   # layer norm over a width of 1 or 2 keeps (almost) nothing of a token to see
    keep = data.draw(st.integers(1, tokens - 1))   # outputs before this position must not move
    x = normal(seed, (batch, tokens, dim))
    changed = x.copy()
    changed[:, keep:] = normal(seed + 1, (batch, tokens - keep, dim))
    for causal in (True, False):
        model = scaled_init(nn.Transformer(dim, 2, heads, mlp_ratio=2, causal=causal, dtype="float64",
                                           backend=name_of(xp)), seed, std=0.3)
        before, after = host(model(xp.asarray(x))), host(model(xp.asarray(changed)))
        if causal:
            numpy.testing.assert_allclose(after[:, :keep], before[:, :keep], rtol=1e-13, atol=1e-13)
        else:   # without the mask the earlier outputs do see the change (the check above can fail)
            assert not numpy.allclose(after[:, :keep], before[:, :keep], rtol=1e-6, atol=1e-6)


def test_state_dict_round_trip_is_exact(xp):
    source = nn.Transformer(8, 2, 2, backend=name_of(xp), seed=1)
    target = nn.Transformer(8, 2, 2, backend=name_of(xp), seed=2)
    arrays_before = [p.data for p in target.parameters()]
    state = source.state_dict()
    assert list(state) == [name for name, _ in source.named_parameters()]
    target.load_state_dict(state)
    for name, value in target.state_dict().items():
        assert value.dtype == state[name].dtype
        numpy.testing.assert_array_equal(host(value), host(state[name]))
    # loaded into the existing arrays, which keep their dtype and backend
    assert all(p.data is before for p, before in zip(target.parameters(), arrays_before))
    x = xp.asarray(normal(0, (2, 3, 8)), dtype="float32")
    numpy.testing.assert_array_equal(host(target(x)), host(source(x)))


def test_state_dict_holds_copies(xp):
    layer = nn.Linear(3, 2, backend=name_of(xp))
    state = layer.state_dict()
    state["weight"] += 1
    assert not numpy.array_equal(host(layer.weight), host(state["weight"]))


def test_load_converts_dtype_and_backend_to_the_parameters(xp):
    layer = nn.Linear(3, 2, backend=name_of(xp))   # float32
    state = {name: backend.to_numpy(value).astype("float64") + 0.25 for name, value in layer.state_dict().items()}
    layer.load_state_dict(state)
    assert layer.weight.dtype == numpy.float32 and layer.weight.backend == name_of(xp)
    numpy.testing.assert_array_equal(host(layer.weight), state["weight"].astype("float32"))


def test_load_state_dict_names_every_problem():
    model = nn.Transformer(8, 2, 2, seed=0)
    state = model.state_dict()
    del state["blocks.0.ln1.weight"], state["blocks.1.mlp.fc2.bias"]
    state["blocks.2.ln1.weight"] = numpy.ones(8, numpy.float32)
    state["head.weight"] = numpy.ones((8, 8), numpy.float32)
    state["blocks.0.attn.q_proj.weight"] = numpy.ones((8, 4), numpy.float32)
    state["blocks.1.mlp.fc1.bias"] = numpy.ones(3, numpy.float32)
    before = model.state_dict()
    with pytest.raises(ValueError) as caught:
        model.load_state_dict(state)
    message = str(caught.value)
    for key in ("blocks.0.ln1.weight", "blocks.1.mlp.fc2.bias", "blocks.2.ln1.weight", "head.weight"):
        assert key in message
    assert "blocks.0.attn.q_proj.weight: state (8, 4) vs model (8, 8)" in message
    assert "blocks.1.mlp.fc1.bias: state (3,) vs model (32,)" in message
    assert "missing keys (2)" in message and "unexpected keys (2)" in message and "shape mismatches (2)" in message
    for name, value in model.state_dict().items():   # nothing was loaded
        numpy.testing.assert_array_equal(value, before[name])


def test_non_strict_load_reports_keys_but_still_refuses_wrong_shapes():
    model = nn.Block(4, 2, seed=0)
    state = {"ln1.weight": numpy.full(4, 3.0, numpy.float32), "extra": numpy.zeros(2)}
    result = model.load_state_dict(state, strict=False)
    assert result.unexpected_keys == ["extra"]
    assert "ln1.bias" in result.missing_keys and "ln1.weight" not in result.missing_keys
    numpy.testing.assert_array_equal(model.ln1.weight.data, numpy.full(4, 3.0))
    with pytest.raises(ValueError, match=r"ln1\.weight: state \(5,\) vs model \(4,\)"):
        model.load_state_dict({"ln1.weight": numpy.ones(5)}, strict=False)


def test_train_and_eval_reach_every_module():
    model = nn.Transformer(4, 2, 2)
    assert all(module.training for module in model.modules())
    assert model.eval() is model
    assert len(model.modules()) > 10 and not any(module.training for module in model.modules())
    model.blocks[1].train()
    assert model.blocks[1].mlp.fc1.training and not model.blocks[0].mlp.fc1.training
    model.train()
    assert all(module.training for module in model.modules())


# ---------------------------------------------------------------------------------
# Registration, initialisation, errors
# ---------------------------------------------------------------------------------

def test_block_parameter_names_follow_hugging_face_clip():
    names = [name for name, _ in nn.Transformer(4, 1, 2).named_parameters()]
    layers = ["ln1", "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "ln2", "mlp.fc1", "mlp.fc2"]
    assert names == [f"blocks.0.{layer}.{kind}" for layer in layers for kind in ("weight", "bias")]


def test_registration_of_lists_none_and_shared_parameters():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = [nn.Linear(2, 2), nn.Linear(2, 2, bias=False)]
            self.scale = nn.Parameter(numpy.zeros(()))
            self.tied = self.layers[0].weight   # the same Parameter under a second name

    model = Model()
    assert isinstance(model.layers, nn.ModuleList)
    names = [name for name, _ in model.named_parameters()]
    assert names == ["scale", "tied", "layers.0.bias", "layers.1.weight"]   # the shared one once, first name found
    model.scale = None
    assert "scale" not in dict(model.named_parameters())
    with pytest.raises(TypeError, match="Parameter"):
        model.layers[0].weight = tc.tensor(numpy.zeros((2, 2)))


def test_module_without_super_init_is_a_clear_error():
    class Broken(nn.Module):
        def __init__(self):
            self.layer = nn.Linear(2, 2)

    with pytest.raises(AttributeError, match="super\\(\\).__init__"):
        Broken()


def test_initialisation(xp):
    layer = nn.Linear(64, 128, backend=name_of(xp), seed=3)
    assert layer.weight.shape == (128, 64) and layer.weight.dtype == backend.default_dtype()
    assert layer.weight.backend == name_of(xp) and layer.weight.requires_grad
    assert abs(float(host(layer.weight).std()) - 0.02) < 0.002
    assert not host(layer.bias).any()
    norm = nn.LayerNorm(5, dtype="float64", backend=name_of(xp))
    assert norm.weight.dtype == numpy.float64
    numpy.testing.assert_array_equal(host(norm.weight), numpy.ones(5))
    numpy.testing.assert_array_equal(host(norm.bias), numpy.zeros(5))
    # one seed gives one model; the layers inside it draw different weights from the shared stream
    first, second = nn.Block(8, 2, backend=name_of(xp), seed=4), nn.Block(8, 2, backend=name_of(xp), seed=4)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        numpy.testing.assert_array_equal(host(a), host(b), err_msg=name)
    assert not numpy.array_equal(host(first.attn.q_proj.weight), host(first.attn.k_proj.weight))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="activation"):
        nn.MLP(4, 8, activation="swish")
    with pytest.raises(ValueError, match="multiple of heads"):
        nn.MultiHeadAttention(6, 4)
    with pytest.raises(ValueError, match="rng or seed"):
        nn.Linear(2, 2, rng=backend.RNG(0), seed=1)
    with pytest.raises(TypeError, match="floating-point"):
        nn.Linear(2, 2, dtype="int32")
    attention = nn.MultiHeadAttention(4, 2)
    with pytest.raises(ValueError, match=r"x must have shape \(batch, tokens, 4\), got \(2, 3, 5\)"):
        attention(numpy.zeros((2, 3, 5), numpy.float32))
    with pytest.raises(ValueError, match="context has batch size 3"):
        attention(numpy.zeros((2, 3, 4), numpy.float32), context=numpy.zeros((3, 3, 4), numpy.float32))


@pytest.mark.gpu
def test_numpy_state_loads_into_a_cupy_model():
    cpu_model, gpu_model = nn.Block(4, 2, seed=0), nn.Block(4, 2, backend="cupy", seed=1)
    gpu_model.load_state_dict(cpu_model.state_dict())
    assert all(p.backend == "cupy" for p in gpu_model.parameters())
    for name, value in gpu_model.state_dict().items():
        numpy.testing.assert_array_equal(host(value), cpu_model.state_dict()[name])


# --- mimetic initialisation of attention (Trockman & Kolter 2023) ---------------------------------------------------

class _ScriptedRNG:
    """An rng whose normal draws are given in advance, so the expected weights can be computed here."""

    def __init__(self, draws):
        self.draws = list(draws)

    def normal(self, shape, std=1.0, dtype=None):
        draw = self.draws.pop(0)
        assert draw.shape == tuple(shape)
        return draw * std


def _best_rank(target, rank):
    u, sigma, vt = numpy.linalg.svd(target)
    return (u[:, :rank] * sigma[:rank]) @ vt[:rank]


@pytest.mark.parametrize("dim, heads", [(8, 2), (12, 3), (6, 1)])
def test_mimetic_init_gives_each_head_the_best_low_rank_target(dim, heads):
    attention = nn.MultiHeadAttention(dim, heads, dtype="float64", seed=0)
    rng = numpy.random.default_rng(1)
    draws = [rng.standard_normal((dim, dim)) for _ in range(heads + 1)]   # one Z per head, then V/O's
    nn.mimetic_init(attention, _ScriptedRNG(draws), qk=(0.7, 0.5), vo=(0.4, 0.3))
    head = dim // heads
    q, k = attention.q_proj.weight.data, attention.k_proj.weight.data              # (D, D), y = x Wᵀ
    for h in range(heads):
        rows = slice(h * head, (h + 1) * head)
        target = 0.7 * draws[h] * dim ** -0.5 + 0.5 * numpy.eye(dim)
        numpy.testing.assert_allclose(q[rows].T @ k[rows], _best_rank(target, head), atol=1e-12)
    value_output = attention.v_proj.weight.data.T @ attention.out_proj.weight.data.T   # x ↦ x W_vᵀ W_oᵀ
    numpy.testing.assert_allclose(value_output, 0.4 * draws[heads] * dim ** -0.5 - 0.3 * numpy.eye(dim), atol=1e-12)


def test_mimetic_init_makes_attention_prefer_nearby_tokens_with_sincos_positions():
    from tinyclip.models.vision import sincos_position_embedding
    dim, grid = 64, 8
    tokens = sincos_position_embedding(grid, dim)[None]                  # (1, 64, 64): position alone
    mean_weight = {}
    for init in ("random", "mimetic"):
        attention = nn.MultiHeadAttention(dim, 4, dtype="float64", seed=0)
        if init == "mimetic":
            nn.mimetic_init(attention, backend.RNG(3))
        q = tokens @ attention.q_proj.weight.data.T
        k = tokens @ attention.k_proj.weight.data.T
        head = dim // 4
        scores = numpy.stack([q[0, :, h * head:(h + 1) * head] @ k[0, :, h * head:(h + 1) * head].T
                              for h in range(4)]) / math.sqrt(head)
        weights = numpy.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)                        # (heads, T, T)
        y, x = numpy.divmod(numpy.arange(grid * grid), grid)
        distance = numpy.maximum(abs(y[:, None] - y[None]), abs(x[:, None] - x[None]))
        mean_weight[init] = weights.mean(0)[distance <= 1].sum() / (grid * grid)   # share on self + 8 neighbours
    # random weights attend about uniformly (0.118 of the weight on self + neighbours, the share of such pairs);
    # mimetic ones lean local (0.16 at this seed: a mild lean, sin-cos rows of near and far tokens are alike at width 64)
    uniform = (distance <= 1).mean()
    assert abs(mean_weight["random"] - uniform) < 0.1 * uniform
    assert mean_weight["mimetic"] > 1.25 * uniform


def test_mimetic_init_refuses_other_layers_and_draws_nothing_without_values():
    with pytest.raises(TypeError, match="MultiHeadAttention"):
        nn.mimetic_init(nn.Linear(4, 4, seed=0), backend.RNG(0))
    placeholder = nn.MultiHeadAttention(8, 2, rng=nn.NoValues())
    nn.mimetic_init(placeholder, nn.NoValues())                         # no error, nothing written
