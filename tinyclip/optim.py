"""Optimisers, the learning-rate schedule and gradient clipping.

* ``SGD``: stochastic gradient descent with (Nesterov) momentum and L2
  weight decay, the update of ``torch.optim.SGD`` (dampening 0).
* ``AdamW``: Adam (Kingma & Ba 2015) with decoupled weight decay
  (Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization"),
  step for step the update of ``torch.optim.AdamW``, which CLIP and SigLIP
  train with.
* ``param_groups_for_decay``: weight decay on the weight matrices of linear
  and convolution layers only; gains, biases, embeddings, SigLIP's probe
  and the temperature are kept out (CLIP paper, §2.5; big_vision).
* ``WarmupCosine``: linear warm-up whose first update is already non-zero,
  then the cosine decay of SGDR (Loshchilov & Hutter 2017) without
  restarts, as open_clip's ``cosine_lr``.
* ``clip_grad_norm``: rescale all gradients together so their global L2
  norm is at most ``max_norm`` (Pascanu et al. 2013).

Parameters are updated in place (``p.data``), with the array module of the
parameters themselves, so the same code runs on NumPy and CuPy; AdamW's
update of a large parameter is cut into row blocks on ``parallel``'s thread
pool (each element's update unchanged, so bit for bit the same). Parameters
whose ``grad`` is None are skipped. Optimiser state is plain arrays and
numbers, so a checkpoint stores it without pickle.
"""

import math

from . import backend, parallel
from .autograd import Tensor


class Optimizer:
    """Base class: holds ``param_groups`` (dicts with 'params' and hyperparameters) and per-parameter ``state``.

    ``params`` is an iterable of Tensors, or of dicts each with a 'params'
    list and any hyperparameters that differ from the defaults for that group
    (as in PyTorch). ``state`` maps a parameter to a dict of arrays and numbers.
    """

    def __init__(self, params, defaults):
        self.defaults = dict(defaults)
        if isinstance(params, Tensor):
            raise TypeError(f"{type(self).__name__}: params must be an iterable of Tensors or of dicts, "
                            "got a single Tensor (wrap it in a list)")
        groups = list(params)
        if not groups:
            raise ValueError(f"{type(self).__name__}: got an empty list of parameters")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        self.param_groups = []
        self.state = {}
        for group in groups:
            self.add_param_group(group)

    def add_param_group(self, group):
        """Add a group: a dict with 'params' and optional hyperparameters (missing ones take the defaults)."""
        if not isinstance(group, dict) or "params" not in group:
            raise TypeError(f"{type(self).__name__}: a parameter group must be a dict with a 'params' entry, "
                            f"got {type(group).__name__}")
        unknown = sorted(set(group) - set(self.defaults) - {"params"})
        if unknown:
            raise ValueError(f"{type(self).__name__}: unknown hyperparameters {unknown} in a parameter group "
                             f"(known: {sorted(self.defaults)})")
        group = {**self.defaults, **group}
        params = group["params"]
        group["params"] = [params] if isinstance(params, Tensor) else list(params)
        seen = {id(p) for existing in self.param_groups for p in existing["params"]}
        for index, p in enumerate(group["params"]):
            where = f"parameter {index} of group {len(self.param_groups)}"
            if not isinstance(p, Tensor):
                raise TypeError(f"{type(self).__name__}: {where} is a {type(p).__name__}, not a Tensor")
            if not p.requires_grad or not p.is_leaf:
                raise ValueError(f"{type(self).__name__}: {where} (shape {p.shape}) must be a leaf Tensor "
                                 "with requires_grad=True")
            if id(p) in seen:
                raise ValueError(f"{type(self).__name__}: {where} (shape {p.shape}) appears more than once")
            seen.add(id(p))
        self._check_hyperparameters(group)
        self.param_groups.append(group)

    def _check_hyperparameters(self, group):
        for name in ("lr", "weight_decay", "eps", "momentum"):
            if name in group and not group[name] >= 0:
                raise ValueError(f"{type(self).__name__}: {name} must be >= 0, got {group[name]}")

    def zero_grad(self):
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def step(self):
        raise NotImplementedError

    def _gradients(self):
        """(group, parameter, gradient array) for every parameter that has a gradient, checked against it."""
        for group_index, group in enumerate(self.param_groups):
            for index, p in enumerate(group["params"]):
                grad = p.grad
                if grad is None:
                    continue
                if grad.shape != p.shape:
                    raise ValueError(f"{type(self).__name__}: the gradient of parameter {index} of group "
                                     f"{group_index} has shape {grad.shape}, the parameter has shape {p.shape}")
                if backend.get_array_module(grad) is not backend.get_array_module(p.data):
                    raise TypeError(f"{type(self).__name__}: the gradient of parameter {index} of group "
                                    f"{group_index} lives on {backend.backend_of(grad)}, the parameter on "
                                    f"{backend.backend_of(p.data)}")
                yield group, p, grad.astype(p.dtype, copy=False)

    # ---- state as plain data ----------------------------------------------------------
    def state_dict(self):
        """{'state': {index: {name: array copy or number}}, 'param_groups': [{..., 'params': [index, ...]}]}.

        Parameters are numbered across groups in order; the arrays keep their dtype and backend.
        """
        index_of, groups = {}, []
        for group in self.param_groups:
            indices = []
            for p in group["params"]:
                index_of[id(p)] = len(index_of)
                indices.append(index_of[id(p)])
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": indices})
        state = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p in self.state:
                    state[index_of[id(p)]] = {name: value.copy() if hasattr(value, "shape") else value
                                              for name, value in self.state[p].items()}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict):
        """Restore hyperparameters and state saved by ``state_dict`` (arrays copied onto each parameter's backend)."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"{type(self).__name__}.load_state_dict: the state has {len(saved_groups)} parameter "
                             f"groups, this optimiser has {len(self.param_groups)}")
        params = []
        for group_index, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"{type(self).__name__}.load_state_dict: group {group_index} has "
                                 f"{len(saved['params'])} parameters in the state, {len(group['params'])} here")
            params.extend(group["params"])
        state = {}
        for index, entry in state_dict["state"].items():
            index = int(index)
            if not 0 <= index < len(params):
                raise ValueError(f"{type(self).__name__}.load_state_dict: state for parameter {index}, "
                                 f"but there are only {len(params)}")
            p = params[index]
            restored = {}
            for name, value in entry.items():
                if hasattr(value, "shape"):
                    if tuple(value.shape) == p.shape:   # a per-element array (moments, momentum buffer)
                        value = backend.asarray(value, backend.backend_of(p.data)).copy()
                    elif value.ndim == 0:               # a number that went through an array file (the step)
                        value = value.item()
                    else:
                        raise ValueError(f"{type(self).__name__}.load_state_dict: state {name!r} of parameter "
                                         f"{index} has shape {tuple(value.shape)}, the parameter {p.shape}")
                restored[name] = value
            state[p] = restored
        for saved, group in zip(saved_groups, self.param_groups):
            for name, value in saved.items():
                if name != "params":
                    group[name] = _plain(value)
        self.state = state


def _plain(value):
    """A hyperparameter as Python data: 0-d arrays become numbers, sequences (betas) tuples."""
    if hasattr(value, "shape"):
        value = value.item() if value.ndim == 0 else value.tolist()
    return tuple(value) if isinstance(value, list) else value


class SGD(Optimizer):
    """p ← p - lr · d,  d = g + wd·p, or with momentum μ: b ← μ b + d, d = b (Nesterov: d + μ b)."""

    def __init__(self, params, lr, momentum=0.0, weight_decay=0.0, nesterov=False):
        if nesterov and momentum <= 0:
            raise ValueError("SGD: nesterov=True needs momentum > 0")
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                                  "nesterov": nesterov})

    def step(self):
        for group, p, grad in self._gradients():
            lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
            if weight_decay:
                grad = grad + weight_decay * p.data
            if momentum:
                state = self.state.setdefault(p, {})
                # the first step starts the buffer at d; a new array each step, since NumPy turns
                # 0-d results (a scalar parameter's) into immutable scalars that *= cannot update
                buffer = state.get("momentum_buffer")
                buffer = grad.copy() if buffer is None else momentum * buffer + grad
                state["momentum_buffer"] = buffer
                grad = grad + momentum * buffer if group["nesterov"] else buffer
            p.data -= lr * grad


class AdamW(Optimizer):
    """Adam with decoupled weight decay, at step t with gradient g:

    p ← p - lr·wd·p;  m ← β₁m + (1-β₁)g;  v ← β₂v + (1-β₂)g²;
    p ← p - lr · m̂ / (√v̂ + eps),  m̂ = m / (1-β₁ᵗ),  v̂ = v / (1-β₂ᵗ).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    def _check_hyperparameters(self, group):
        super()._check_hyperparameters(group)
        if len(group["betas"]) != 2 or not all(0 <= beta < 1 for beta in group["betas"]):
            raise ValueError(f"AdamW: betas must be two numbers in [0, 1), got {group['betas']}")

    def step(self):
        for group, p, grad in self._gradients():
            xp = backend.get_array_module(p.data)
            lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            state = self.state.setdefault(p, {})
            if not state:
                state.update(step=0, exp_avg=xp.zeros_like(p.data), exp_avg_sq=xp.zeros_like(p.data))
            state["step"] = int(state["step"]) + 1
            hyperparameters = (lr, weight_decay, beta1, beta2, eps, state["step"])
            arrays = (grad, state["exp_avg"], state["exp_avg_sq"])
            if p.data.ndim == 0:        # a scalar (the temperature, the bias): nothing to cut into rows
                _adamw_update(p.data, *arrays, *hyperparameters)
            else:                       # the rows of a large matrix on every core, each element's update unchanged
                parallel.map_rows(_adamw_update, p.data, *arrays, *hyperparameters)


def _adamw_update(param, grad, m, v, lr, weight_decay, beta1, beta2, eps, step):
    """One AdamW update of a block of rows of a parameter and its moments m, v, all in place (AdamW's formula)."""
    xp = backend.get_array_module(param)
    if weight_decay:
        param *= 1 - lr * weight_decay
    m *= beta1
    m += (1 - beta1) * grad
    v *= beta2
    v += (1 - beta2) * (grad * grad)
    bias1 = 1 - beta1 ** step
    bias2 = 1 - beta2 ** step
    denominator = xp.sqrt(v) / math.sqrt(bias2) + eps   # √v̂ + eps
    param -= (lr / bias1) * m / denominator


def param_groups_for_decay(named_parameters, weight_decay, no_decay=()):
    """Split parameters into a group with ``weight_decay`` and one without: only weight matrices decay.

    The rule is by a parameter's role, not its shape: a parameter decays when
    it is the weight matrix of a linear or convolution layer (``nn.Linear``,
    ``nn.Conv2d``: ``Parameter.weight_matrix`` is True), as big_vision decays
    only kernels. So biases, layer-norm gains and shifts, batch-norm scales,
    the token, position and class embeddings, SigLIP's attention-pool probe
    (a (1, 1, W) array) and the contrastive head's ``log_scale`` and ``bias``
    never decay. ``named_parameters`` is an iterable of (name, Tensor) pairs,
    e.g. ``model.named_parameters()``; a dotted name containing one of the
    ``no_decay`` substrings is kept out as well. Empty groups are left out.
    Returns [{"params": [...], "weight_decay": weight_decay}, {"params": [...], "weight_decay": 0.0}].
    """
    decay, keep = [], []
    for name, p in named_parameters:
        decays = getattr(p, "weight_matrix", False) and not any(pattern in name for pattern in no_decay)
        (decay if decays else keep).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


class WarmupCosine:
    """lr(s) = base · (s + 1) / W for s < W; then min + (base - min) · (1 + cos(π (s - W) / (S - W))) / 2; min after S.

    ``s`` counts the updates made so far (0 for the first update), ``W`` =
    ``warmup_steps``, ``S`` = ``total_steps``. The convention is open_clip's
    ``cosine_lr`` (``open_clip_train/scheduler.py``, with ``min_lr`` added):
    the first update already runs at base / W and the warm-up's last update,
    s = W - 1, at the peak, so with S=10, W=4, base 1e-3 the updates run at
    2.5e-4, 5e-4, 7.5e-4, 1e-3, then the cosine from 1e-3 (s = W) down to
    min + (base - min)(1 + cos(π (S - 1 - W) / (S - W))) / 2 at the last
    update, s = S - 1, as open_clip's does. Given an optimiser, the base of
    each group is that group's lr when the schedule is made, the schedule
    writes lr(0) into the groups at once, and each ``step()`` advances s by
    one and writes lr(s): call it after each optimiser step. Given a number,
    it is the base and ``step()`` only counts and returns lr(s).

    Raises ValueError unless 0 <= warmup_steps < total_steps and 0 <= min_lr <= base.
    """

    def __init__(self, optimizer_or_base_lr, warmup_steps, total_steps, min_lr=0.0):
        if not 0 <= warmup_steps < total_steps:
            raise ValueError(f"WarmupCosine: need 0 <= warmup_steps < total_steps, got "
                             f"warmup_steps={warmup_steps}, total_steps={total_steps}")
        if isinstance(optimizer_or_base_lr, Optimizer):
            self.optimizer = optimizer_or_base_lr
            self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        else:
            self.optimizer = None
            self.base_lrs = [float(optimizer_or_base_lr)]
        if min_lr < 0 or any(min_lr > base for base in self.base_lrs):
            raise ValueError(f"WarmupCosine: min_lr must be in [0, base lr], got {min_lr} for base {self.base_lrs}")
        self.warmup_steps, self.total_steps, self.min_lr = warmup_steps, total_steps, min_lr
        self.step_count = 0
        self._write()

    def lr_at(self, step, base_lr=None):
        """The learning rate at ``step`` for ``base_lr`` (default: the first group's base)."""
        base = self.base_lrs[0] if base_lr is None else base_lr
        if step < self.warmup_steps:
            return base * (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.min_lr + (base - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def step(self):
        self.step_count += 1
        return self._write()

    def _write(self):
        if self.optimizer is not None:
            for group, base in zip(self.optimizer.param_groups, self.base_lrs):
                group["lr"] = self.lr_at(self.step_count, base)
        return self.lr_at(self.step_count)

    def state_dict(self):
        return {"step_count": self.step_count, "base_lrs": list(self.base_lrs), "warmup_steps": self.warmup_steps,
                "total_steps": self.total_steps, "min_lr": self.min_lr}

    def load_state_dict(self, state):
        if len(state["base_lrs"]) != len(self.base_lrs):
            raise ValueError(f"WarmupCosine.load_state_dict: the state has {len(state['base_lrs'])} base rates, "
                             f"this schedule has {len(self.base_lrs)}")
        self.step_count = int(state["step_count"])
        self.base_lrs = [float(base) for base in state["base_lrs"]]
        self.warmup_steps, self.total_steps = int(state["warmup_steps"]), int(state["total_steps"])
        self.min_lr = float(state["min_lr"])
        self._write()


def clip_grad_norm(parameters, max_norm):
    """Scale every gradient by min(1, max_norm / ‖g‖), ‖g‖ the L2 norm of all of them together; return ‖g‖.

    The norm is accumulated in float64 on the parameters' device and read
    back once. Gradients are replaced (``p.grad = p.grad * scale``), never
    scaled in place, so an array the caller still holds is never changed. A non-finite
    norm raises FloatingPointError rather than spreading NaN into the weights.
    """
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    if not (max_norm >= 0 and math.isfinite(max_norm)):
        raise ValueError(f"clip_grad_norm: max_norm must be a finite number >= 0, got {max_norm}")
    with_grad = [p for p in parameters if p.grad is not None]
    if not with_grad:
        return 0.0
    xp = backend.get_array_module(with_grad[0].grad)
    squares = xp.zeros((), dtype="float64")
    for p in with_grad:
        grad = p.grad.astype("float64", copy=False).ravel()
        squares += xp.dot(grad, grad)
    norm = float(xp.sqrt(squares))
    if not math.isfinite(norm):
        raise FloatingPointError(f"clip_grad_norm: the gradient norm is {norm}; "
                                 "some gradient holds inf or NaN (check the loss and the learning rate)")
    if norm > max_norm:
        scale = max_norm / norm
        for p in with_grad:
            p.grad = p.grad * scale
    return norm
