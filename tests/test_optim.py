"""Property tests for tinyclip.optim.

SGD and AdamW against their published update rules written out step by step
in plain NumPy float64 (weight decay, momentum, bias correction included);
both bring a quadratic down; the weight-decay grouping rule; the warm-up +
cosine schedule at known steps; gradient clipping; and state_dict round trips
that continue exactly where they stopped.
"""

import dataclasses
import math

import numpy
import pytest
from hypothesis import given, strategies as st

import tinyclip as tc
from tinyclip import backend, models, nn, optim

from .strategies import normal, seeds


def host(value):
    return backend.to_numpy(value.data if isinstance(value, tc.Tensor) else value)


def make_params(xp, seed, shapes=((3, 4), (4,), ())):
    return [tc.Tensor(xp.asarray(normal(seed + i, shape)), requires_grad=True) for i, shape in enumerate(shapes)]


def gradients_for(seed, params, steps):
    """A fixed sequence of gradients, one list per step (NumPy float64)."""
    rng = numpy.random.default_rng(seed)
    return [[rng.standard_normal(p.shape) for p in params] for _ in range(steps)]


def run(optimizer, params, gradients, xp):
    for step_grads in gradients:
        for p, grad in zip(params, step_grads):
            p.grad = xp.asarray(grad)
        optimizer.step()


hyper = st.fixed_dictionaries({
    "lr": st.sampled_from([1e-3, 0.01, 0.1]),
    "weight_decay": st.sampled_from([0.0, 0.05, 0.3]),
})


# ---------------------------------------------------------------------------------
# The update rules, by hand
# ---------------------------------------------------------------------------------

@given(options=hyper, betas=st.sampled_from([(0.9, 0.999), (0.8, 0.95), (0.0, 0.5)]),
       eps=st.sampled_from([1e-8, 1e-3]), steps=st.integers(1, 5), seed=seeds)
def test_adamw_matches_the_published_rule(xp, options, betas, eps, steps, seed):
    params = make_params(xp, seed)
    expected = [host(p).copy() for p in params]
    optimizer = optim.AdamW(params, betas=betas, eps=eps, **options)
    gradients = gradients_for(seed, params, steps)
    run(optimizer, params, gradients, xp)
    lr, wd = options["lr"], options["weight_decay"]
    beta1, beta2 = betas
    m = [numpy.zeros_like(p) for p in expected]
    v = [numpy.zeros_like(p) for p in expected]
    # Loshchilov & Hutter, Algorithm 2, with Adam's bias correction
    for t, step_grads in enumerate(gradients, start=1):
        for i, g in enumerate(step_grads):
            expected[i] = expected[i] - lr * wd * expected[i]
            m[i] = beta1 * m[i] + (1 - beta1) * g
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
            m_hat = m[i] / (1 - beta1 ** t)
            v_hat = v[i] / (1 - beta2 ** t)
            expected[i] = expected[i] - lr * m_hat / (numpy.sqrt(v_hat) + eps)
    for p, want, m_i, v_i in zip(params, expected, m, v):
        numpy.testing.assert_allclose(host(p), want, rtol=1e-12, atol=1e-14)
        numpy.testing.assert_allclose(host(optimizer.state[p]["exp_avg"]), m_i, rtol=1e-12, atol=1e-15)
        numpy.testing.assert_allclose(host(optimizer.state[p]["exp_avg_sq"]), v_i, rtol=1e-12, atol=1e-15)
        assert optimizer.state[p]["step"] == steps


@given(options=hyper, momentum=st.sampled_from([0.0, 0.5, 0.9]), nesterov=st.booleans(),
       steps=st.integers(1, 5), seed=seeds)
def test_sgd_matches_the_published_rule(xp, options, momentum, nesterov, steps, seed):
    nesterov = nesterov and momentum > 0
    params = make_params(xp, seed)
    expected = [host(p).copy() for p in params]
    optimizer = optim.SGD(params, momentum=momentum, nesterov=nesterov, **options)
    gradients = gradients_for(seed, params, steps)
    run(optimizer, params, gradients, xp)
    lr, wd = options["lr"], options["weight_decay"]
    buffers = [None] * len(params)
    for step_grads in gradients:   # torch.optim.SGD with dampening 0
        for i, g in enumerate(step_grads):
            d = g + wd * expected[i]
            if momentum:
                buffers[i] = d.copy() if buffers[i] is None else momentum * buffers[i] + d
                d = d + momentum * buffers[i] if nesterov else buffers[i]
            expected[i] = expected[i] - lr * d
    for p, want in zip(params, expected):
        numpy.testing.assert_allclose(host(p), want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("make", [
    lambda params: optim.AdamW(params, lr=0.02, weight_decay=0.0),
    lambda params: optim.SGD(params, lr=0.02, momentum=0.9),
    lambda params: optim.SGD(params, lr=0.02, momentum=0.9, nesterov=True),
], ids=["adamw", "sgd-momentum", "sgd-nesterov"])
def test_optimisers_minimise_a_quadratic(xp, make):
    rng = numpy.random.default_rng(0)
    a = xp.asarray(rng.standard_normal((6, 4)) + 2 * numpy.eye(6, 4))   # well-conditioned least squares
    b = xp.asarray(rng.standard_normal(6))
    x = tc.Tensor(xp.zeros(4), requires_grad=True)
    optimizer = make([x])

    def loss():
        residual = tc.functional.matmul(a, x) - b
        return (residual * residual).sum()

    first = float(loss().item())
    for _ in range(300):
        optimizer.zero_grad()
        value = loss()
        value.backward()
        optimizer.step()
    solution = numpy.linalg.lstsq(host(a), host(b), rcond=None)[0]
    numpy.testing.assert_allclose(host(x), solution, atol=1e-3)
    assert float(loss().item()) < first


def test_parameters_without_gradients_are_left_alone(xp):
    params = make_params(xp, 0)
    before = [host(p).copy() for p in params]
    optimizer = optim.AdamW(params, lr=0.1)
    params[0].grad = xp.ones(params[0].shape)
    optimizer.step()
    assert not numpy.array_equal(host(params[0]), before[0])
    for p, old in zip(params[1:], before[1:]):
        numpy.testing.assert_array_equal(host(p), old)
        assert p not in optimizer.state


def test_groups_carry_their_own_hyperparameters(xp):
    first, second = make_params(xp, 0, shapes=((2, 2), (2, 2)))
    optimizer = optim.SGD([{"params": [first]}, {"params": [second], "lr": 0.0}], lr=0.5)
    assert [group["lr"] for group in optimizer.param_groups] == [0.5, 0.0]
    before = host(second).copy()
    first.grad, second.grad = xp.ones((2, 2)), xp.ones((2, 2))
    optimizer.step()
    numpy.testing.assert_array_equal(host(second), before)
    optimizer.zero_grad()
    assert first.grad is None and second.grad is None


def test_bad_gradients_and_arguments_are_named(xp):
    params = make_params(xp, 0)
    optimizer = optim.AdamW(params)
    params[1].grad = xp.ones(5)
    with pytest.raises(ValueError, match=r"parameter 1 of group 0 has shape \(5,\), the parameter has shape \(4,\)"):
        optimizer.step()
    with pytest.raises(ValueError, match="empty"):
        optim.SGD([], lr=0.1)
    with pytest.raises(TypeError, match="single Tensor"):
        optim.SGD(params[0], lr=0.1)
    with pytest.raises(ValueError, match="more than once"):
        optim.SGD([params[0], params[0]], lr=0.1)
    with pytest.raises(ValueError, match="lr must be >= 0"):
        optim.AdamW(params, lr=-1.0)
    with pytest.raises(ValueError, match="betas"):
        optim.AdamW(params, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="nesterov"):
        optim.SGD(params, lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="unknown hyperparameters"):
        optim.SGD([{"params": params, "momentun": 0.9}], lr=0.1)


# ---------------------------------------------------------------------------------
# Weight-decay groups, schedule, clipping
# ---------------------------------------------------------------------------------

def test_param_groups_for_decay_rule():
    class Tower(nn.Module):
        def __init__(self):
            super().__init__()
            self.token_embedding = nn.Embedding(10, 4)
            self.position_embedding = nn.Parameter(numpy.zeros((5, 4), numpy.float32))
            self.class_embedding = nn.Parameter(numpy.zeros(4, numpy.float32))
            self.patch_proj = nn.Linear(12, 4)
            self.blocks = nn.Transformer(4, 1, 2)
            self.log_scale = nn.Parameter(numpy.zeros((), numpy.float32))
            self.bias = nn.Parameter(numpy.zeros((), numpy.float32))

    model = Tower()
    groups = optim.param_groups_for_decay(model.named_parameters(), weight_decay=0.2)
    names = {id(p): name for name, p in model.named_parameters()}
    decayed = sorted(names[id(p)] for p in groups[0]["params"])
    kept = sorted(names[id(p)] for p in groups[1]["params"])
    assert [group["weight_decay"] for group in groups] == [0.2, 0.0]
    assert decayed == sorted(["patch_proj.weight"] + [f"blocks.blocks.0.{layer}.weight" for layer in
                             ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "mlp.fc1", "mlp.fc2")])
    assert set(kept) == set(names.values()) - set(decayed)
    assert {"token_embedding.weight", "position_embedding", "class_embedding", "log_scale", "bias",
            "patch_proj.bias", "blocks.blocks.0.ln1.weight"} <= set(kept)
    optimizer = optim.AdamW(groups, lr=1e-3, weight_decay=0.5)   # the groups' own decay wins over the default
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.2, 0.0]
    named = optim.param_groups_for_decay(model.named_parameters(), 0.1, no_decay=("mlp",))
    assert sorted(names[id(p)] for p in named[0]["params"]) == [name for name in decayed if "mlp" not in name]


def small(name):
    """The preset with every switch as published but tiny widths and one or two layers, so it builds in a moment."""
    config = models.preset(name)
    vision_width = 2 * config.vision_heads
    changes = dict(vision_width=vision_width, vision_layers=min(config.vision_layers, 2),
                   text_width=2 * config.text_heads, text_layers=min(config.text_layers, 2),
                   vocab_size=config.eos_id + 1 if config.eos_id > 16 else 16, context_length=8,
                   embed_dim=8 if config.vision_projection else vision_width)
    if config.vision_type == "cnn":
        changes["conv_channels"] = tuple(2 + n for n in range(len(config.conv_channels)))
    else:
        changes["image_size"] = 2 * config.patch_size
    return dataclasses.replace(config, **changes)


@pytest.mark.parametrize("name", sorted(models.PRESETS))
def test_only_the_weight_matrices_of_linear_and_convolution_layers_decay_on_every_preset(name):
    model = models.CLIP(small(name), seed=0)
    matrices = {id(module.weight) for module in model.modules() if isinstance(module, (nn.Linear, nn.Conv2d))}
    names = dict((id(p), n) for n, p in model.named_parameters())
    groups = optim.param_groups_for_decay(model.named_parameters(), weight_decay=0.1)
    decayed = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert decayed == matrices, sorted(names[i] for i in decayed ^ matrices)
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(names)
    kept = {names[id(p)] for p in groups[1]["params"]}
    config = model.config
    expected_kept = {"log_scale", "text.position_embedding", "text.token_embedding.weight", "text.ln_final.weight"}
    if config.init_bias is not None:
        expected_kept.add("bias")
    if config.vision_pooling == "map":
        expected_kept.add("visual.head.probe")                 # (1, 1, W): a query, not a weight matrix
    if config.vision_type == "vit":
        expected_kept.add("visual.position_embedding")
        if config.class_token:
            expected_kept.add("visual.class_embedding")
    assert expected_kept <= kept, expected_kept - kept
    assert all(n.endswith("bias") or ".ln" in n or "norm" in n for n in kept - expected_kept), kept - expected_kept


def test_warmup_cosine_at_known_steps():
    schedule = optim.WarmupCosine(2.0, warmup_steps=10, total_steps=110, min_lr=0.2)
    assert schedule.lr_at(0) == pytest.approx(0.2)               # the first update already moves the weights
    assert schedule.lr_at(4) == pytest.approx(1.0)
    assert schedule.lr_at(9) == pytest.approx(2.0)               # the peak at the warm-up's last update
    assert schedule.lr_at(10) == pytest.approx(2.0)
    assert schedule.lr_at(60) == pytest.approx(1.1)              # half way down: (2 + 0.2) / 2
    assert schedule.lr_at(35) == pytest.approx(0.2 + 1.8 * (1 + math.cos(math.pi / 4)) / 2)
    assert schedule.lr_at(110) == pytest.approx(0.2)
    assert schedule.lr_at(500) == pytest.approx(0.2)
    values = [schedule.lr_at(step) for step in range(111)]
    assert all(a < b for a, b in zip(values[:9], values[1:10]))     # rises through the warm-up
    assert all(a >= b for a, b in zip(values[10:], values[11:]))    # then only falls


def test_warmup_cosine_the_issue_example():
    schedule = optim.WarmupCosine(1e-3, warmup_steps=4, total_steps=10)
    rates = [schedule.lr_at(0)] + [schedule.step() for _ in range(9)]      # the rate of each of the 10 updates
    assert rates[:5] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])
    assert rates[5:] == pytest.approx([0.5e-3 * (1 + math.cos(math.pi * e / 6)) for e in range(1, 6)])


@given(warmup=st.integers(0, 30), extra=st.integers(1, 60), base=st.floats(1e-6, 10.0),
       floor=st.floats(0.0, 1.0))
def test_warmup_cosine_is_the_formula_at_every_update(warmup, extra, base, floor):
    total, min_lr = warmup + extra, base * floor
    schedule = optim.WarmupCosine(base, warmup_steps=warmup, total_steps=total, min_lr=min_lr)
    got = [schedule.lr_at(0)] + [schedule.step() for _ in range(total + 2)]
    for s, rate in enumerate(got):
        if s < warmup:
            expected = base * (s + 1) / warmup
        else:
            expected = min_lr + (base - min_lr) * (1 + math.cos(math.pi * min(s - warmup, extra) / extra)) / 2
        assert rate == pytest.approx(expected, rel=1e-12, abs=1e-15), s
    assert got[0] > 0 and max(got) == pytest.approx(base)
    assert got[max(warmup - 1, 0)] == pytest.approx(base)


def test_warmup_cosine_equals_open_clips_cosine_lr():
    scheduler = pytest.importorskip("open_clip_train.scheduler")

    class Groups:   # what open_clip's schedule writes into
        param_groups = [{"lr": None}]

    for warmup, total in [(4, 10), (0, 7), (50, 700), (1, 2)]:
        reference = scheduler.cosine_lr(Groups, 3e-3, warmup, total)
        schedule = optim.WarmupCosine(3e-3, warmup_steps=warmup, total_steps=total)
        mine = [schedule.lr_at(0)] + [schedule.step() for _ in range(total - 1)]
        assert mine == pytest.approx([reference(step) for step in range(total)], rel=1e-12), (warmup, total)


def test_warmup_cosine_writes_each_groups_rate(xp):
    first, second = make_params(xp, 0, shapes=((2,), (2,)))
    optimizer = optim.SGD([{"params": [first], "lr": 1.0}, {"params": [second], "lr": 0.1}], lr=1.0)
    schedule = optim.WarmupCosine(optimizer, warmup_steps=4, total_steps=8)
    assert [group["lr"] for group in optimizer.param_groups] == [0.25, 0.025]
    schedule.step()
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([0.5, 0.05])
    for _ in range(2):
        schedule.step()
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([1.0, 0.1])
    restored = optim.WarmupCosine(optimizer, warmup_steps=1, total_steps=2)
    restored.load_state_dict(schedule.state_dict())
    assert [restored.step() for _ in range(3)] == [schedule.step() for _ in range(3)]
    with pytest.raises(ValueError, match="warmup_steps < total_steps"):
        optim.WarmupCosine(1.0, warmup_steps=5, total_steps=5)


@given(seed=seeds, max_norm=st.sampled_from([0.0, 0.1, 1.0, 100.0]))
def test_clip_grad_norm(xp, seed, max_norm):
    params = make_params(xp, seed)
    grads = gradients_for(seed, params, 1)[0]
    for p, grad in zip(params, grads):
        p.grad = xp.asarray(grad)
    originals = [p.grad for p in params]
    norm = optim.clip_grad_norm(params, max_norm)
    expected_norm = math.sqrt(sum(float((g * g).sum()) for g in grads))
    assert norm == pytest.approx(expected_norm, rel=1e-14)
    scale = min(1.0, max_norm / expected_norm)
    for p, grad, original in zip(params, grads, originals):
        numpy.testing.assert_allclose(host(p.grad), grad * scale, rtol=1e-14, atol=0)
        numpy.testing.assert_array_equal(host(original), grad)   # the old array is not scaled in place
    clipped = math.sqrt(sum(float((host(p.grad) ** 2).sum()) for p in params))
    assert clipped == pytest.approx(min(max_norm, expected_norm), rel=1e-12, abs=1e-300)


def test_clip_grad_norm_in_float32_skips_missing_and_refuses_nan(xp):
    params = [tc.Tensor(xp.zeros(3, dtype="float32"), requires_grad=True) for _ in range(3)]
    params[0].grad = xp.asarray([3.0, 0.0, 0.0], dtype="float32")
    params[1].grad = xp.asarray([0.0, 4.0, 0.0], dtype="float32")
    assert optim.clip_grad_norm(params, 1.0) == pytest.approx(5.0)
    assert params[0].grad.dtype == numpy.float32 and params[2].grad is None
    numpy.testing.assert_allclose(host(params[1].grad), [0.0, 0.8, 0.0], rtol=1e-6)
    params[2].grad = xp.asarray([numpy.nan, 0.0, 0.0], dtype="float32")
    with pytest.raises(FloatingPointError, match="nan"):
        optim.clip_grad_norm(params, 1.0)


# ---------------------------------------------------------------------------------
# Saving and resuming
# ---------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda params: optim.AdamW(params, lr=0.01, weight_decay=0.1),
    lambda params: optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=0.1, nesterov=True),
], ids=["adamw", "sgd"])
def test_state_dict_round_trip_continues_identically(xp, make):
    params = make_params(xp, 1)
    gradients = gradients_for(1, params, 6)
    optimizer = make(params)
    run(optimizer, params, gradients[:3], xp)
    saved_state = optimizer.state_dict()
    saved_params = [host(p).copy() for p in params]
    run(optimizer, params, gradients[3:], xp)          # the reference run goes on
    assert all(hasattr(v, "shape") or isinstance(v, (int, float))
               for entry in saved_state["state"].values() for v in entry.values())

    resumed_params = [tc.Tensor(xp.asarray(p), requires_grad=True) for p in saved_params]
    resumed = make(resumed_params)
    # stored through NumPy, as a checkpoint would: plain arrays and numbers only
    on_host = {"state": {i: {k: backend.to_numpy(v) if hasattr(v, "shape") else v for k, v in entry.items()}
                         for i, entry in saved_state["state"].items()},
               "param_groups": saved_state["param_groups"]}
    resumed.load_state_dict(on_host)
    run(resumed, resumed_params, gradients[3:], xp)
    for p, q in zip(params, resumed_params):
        numpy.testing.assert_array_equal(host(p), host(q))


def test_load_state_dict_refuses_a_different_layout():
    params = make_params(numpy, 0)
    optimizer = optim.AdamW(params)
    run(optimizer, params, gradients_for(0, params, 1), numpy)
    state = optimizer.state_dict()
    with pytest.raises(ValueError, match="group 0 has 3 parameters in the state, 2 here"):
        optim.AdamW(params[:2]).load_state_dict(state)
    reshaped = make_params(numpy, 0, shapes=((4, 3), (4,), ()))
    with pytest.raises(ValueError, match=r"has shape \(3, 4\), the parameter \(4, 3\)"):
        optim.AdamW(reshaped).load_state_dict(state)
