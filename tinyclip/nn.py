"""Layers with parameters: Module, Parameter and the pieces of a transformer.

``Module`` registers every ``Parameter`` and sub-``Module`` assigned to it
(PyTorch's ``nn.Module`` idea), so ``named_parameters()`` gives dotted names
such as ``blocks.0.attn.q_proj.weight`` and ``state_dict()`` /
``load_state_dict()`` move weights in and out by those names. The layers keep
PyTorch's layouts and Hugging Face CLIP's names (``q_proj``, ``k_proj``,
``v_proj``, ``out_proj``, ``fc1``, ``fc2``; linear weights stored (out, in)),
so published checkpoints map onto them one to one.

The transformer is the pre-LN residual block of GPT-2 and CLIP
(Radford et al. 2019, 2021): ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``,
with multi-head attention from Vaswani et al. 2017 and layer norm from
Ba et al. 2016. Weights start as in CLIP: normal with std 0.02 for linear
and embedding weights, zero biases, layer-norm gains 1 and shifts 0.

Every constructor takes ``dtype`` (default ``backend.default_dtype()``),
``backend`` ('numpy' or 'cupy'; default the rng's, else the default backend)
and either an ``rng`` (a ``backend.RNG``) or a ``seed``. Pass one rng through
a whole model so that its layers draw different weights: two layers built
without either both start from seed 0 and so get identical weights. An
``rng`` that is a ``NoValues`` builds a layer without values (see there).
"""

import collections

import numpy

from . import backend as _backend
from . import functional as F
from .autograd import Tensor


class Parameter(Tensor):
    """A leaf Tensor that a Module owns and an optimiser updates (requires_grad=True).

    ``weight_matrix`` is True for the weight matrix of a linear or convolution
    layer (big_vision's "kernel"), the parameters weight decay applies to
    (``optim.param_groups_for_decay``); Linear and Conv2d set it.
    """

    def __init__(self, data, weight_matrix=False):
        super().__init__(data, requires_grad=True)
        self.weight_matrix = bool(weight_matrix)

    def __repr__(self):
        return f"Parameter(shape={self.shape}, dtype={self.dtype}, backend={self.backend})"


LoadResult = collections.namedtuple("LoadResult", ["missing_keys", "unexpected_keys"])


class Buffer(Tensor):
    """State a Module keeps and saves but nobody trains: batch norm's running statistics (requires_grad=False).

    The layer that owns it updates ``.data`` in place; ``state_dict`` writes it
    and ``load_state_dict`` reads it like a parameter; optimisers never see it.
    """

    def __init__(self, data):
        super().__init__(data, requires_grad=False)

    def __repr__(self):
        return f"Buffer(shape={self.shape}, dtype={self.dtype}, backend={self.backend})"


class Module:
    """Base class of every layer: registers Parameters, Buffers and sub-Modules, and calls ``forward``.

    Subclasses call ``super().__init__()`` before assigning attributes. An
    attribute holding a Parameter, a Buffer, a Module, or a non-empty
    list/tuple of Modules (wrapped into a ``ModuleList``) is registered under
    its name.
    ``forward`` of the base class raises NotImplementedError; ``load_state_dict`` raises ValueError naming
    every key that does not fit.
    """

    def __init__(self):
        object.__setattr__(self, "_parameters", {})   # name -> Parameter, in assignment order
        object.__setattr__(self, "_buffers", {})      # name -> Buffer, in assignment order
        object.__setattr__(self, "_modules", {})      # name -> Module, in assignment order
        object.__setattr__(self, "training", True)

    def __setattr__(self, name, value):
        if "_parameters" not in self.__dict__:
            raise AttributeError(f"{type(self).__name__}: call super().__init__() before assigning "
                                 f"attributes (while assigning {name!r})")
        if name in self._parameters and value is not None and not isinstance(value, Parameter):
            raise TypeError(f"{type(self).__name__}.{name} is a Parameter; assign a Parameter or None, "
                            f"got {type(value).__name__} (update weights in place through .data instead)")
        self._parameters.pop(name, None)
        self._buffers.pop(name, None)
        self._modules.pop(name, None)
        if isinstance(value, (list, tuple)) and value and all(isinstance(item, Module) for item in value):
            value = ModuleList(value)
        if isinstance(value, Parameter):
            self._parameters[name] = value
        elif isinstance(value, Buffer):
            self._buffers[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        object.__setattr__(self, name, value)

    def __delattr__(self, name):
        self._parameters.pop(name, None)
        self._buffers.pop(name, None)
        self._modules.pop(name, None)
        object.__delattr__(self, name)

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    # ---- walking the tree ---------------------------------------------------------
    def named_modules(self, prefix=""):
        """(dotted name, module) for this module ('' or ``prefix``) and every descendant, depth first."""
        yield prefix, self
        for name, child in self._modules.items():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self):
        return [module for _, module in self.named_modules()]

    def named_parameters(self, prefix=""):
        """(dotted name, Parameter) pairs; a Parameter shared by two modules is listed once, first name wins."""
        seen = set()
        for module_name, module in self.named_modules(prefix):
            for name, parameter in module._parameters.items():
                if id(parameter) in seen:
                    continue
                seen.add(id(parameter))
                yield (f"{module_name}.{name}" if module_name else name), parameter

    def parameters(self):
        return [parameter for _, parameter in self.named_parameters()]

    def named_buffers(self, prefix=""):
        """(dotted name, Buffer) pairs, in the order of ``named_modules``."""
        for module_name, module in self.named_modules(prefix):
            for name, buffer in module._buffers.items():
                yield (f"{module_name}.{name}" if module_name else name), buffer

    def _named_state(self):
        """Everything ``state_dict`` saves: the parameters, then the buffers."""
        return [*self.named_parameters(), *self.named_buffers()]

    # ---- modes and gradients ------------------------------------------------------
    def train(self, mode=True):
        """Set ``training`` on this module and every descendant (dropout and the like read it)."""
        for module in self.modules():
            object.__setattr__(module, "training", bool(mode))
        return self

    def eval(self):
        return self.train(False)

    def zero_grad(self):
        for parameter in self.parameters():
            parameter.grad = None

    # ---- weights in and out -------------------------------------------------------
    def state_dict(self):
        """An ordered dict dotted name -> a copy of each parameter's and buffer's array (same dtype and backend)."""
        return collections.OrderedDict((name, tensor.data.copy()) for name, tensor in self._named_state())

    def load_state_dict(self, state, strict=True):
        """Copy arrays from ``state`` into the parameters, in place, keeping each parameter's dtype and backend.

        Nothing is loaded unless everything fits: one ValueError names every
        mis-shaped key (with both shapes) and, when ``strict``, every missing
        and every unexpected key. With ``strict=False`` the keys present in
        both are loaded and a ``LoadResult(missing_keys, unexpected_keys)`` is
        returned; shapes must match either way.
        """
        own = dict(self._named_state())
        values = {}
        not_arrays, mismatched = [], []
        for name, value in state.items():
            if name not in own:
                continue
            value = value.data if isinstance(value, Tensor) else value
            if not hasattr(value, "shape") or not hasattr(value, "dtype"):
                not_arrays.append(f"{name}: {type(value).__name__}")
            elif tuple(value.shape) != own[name].shape:
                mismatched.append(f"{name}: state {tuple(value.shape)} vs model {own[name].shape}")
            values[name] = value
        missing = [name for name in own if name not in state]
        unexpected = [name for name in state if name not in own]
        problems = key_problems(missing if strict else (), unexpected if strict else (), mismatched, not_arrays)
        if problems:
            raise ValueError(f"load_state_dict: the state does not fit {type(self).__name__}; nothing was loaded\n  "
                             + "\n  ".join(problems))
        for name, value in values.items():
            parameter = own[name]
            parameter.data[...] = _backend.asarray(value, _backend.backend_of(parameter.data), parameter.dtype)
        return LoadResult(missing, unexpected)

    # ---- printing -------------------------------------------------------------------
    def extra_repr(self):
        return ""

    def __repr__(self):
        lines = [f"({name}): {child!r}".replace("\n", "\n  ") for name, child in self._modules.items()]
        head = f"{type(self).__name__}({self.extra_repr()}"
        return head + ")" if not lines else head + "\n  " + "\n  ".join(lines) + "\n)"


def key_problems(missing=(), unexpected=(), mismatched=(), not_arrays=()):
    """One line per kind of misfit between a state and a model, each naming every key; [] when all fit.

    Raises nothing.
    """
    kinds = (("missing keys", missing, ", "), ("unexpected keys", unexpected, ", "),
             ("shape mismatches", mismatched, "; "), ("values that are not arrays", not_arrays, ", "))
    return [f"{label} ({len(keys)}): {separator.join(keys)}" for label, keys, separator in kinds if keys]


class ModuleList(Module):
    """A list of Modules registered under the names '0', '1', ...

    Indexing raises IndexError like a list.
    """

    def __init__(self, modules=()):
        super().__init__()
        for module in modules:
            self.append(module)

    def append(self, module):
        if not isinstance(module, Module):
            raise TypeError(f"ModuleList holds Modules, got {type(module).__name__}")
        setattr(self, str(len(self._modules)), module)
        return self

    def __getitem__(self, index):
        return list(self._modules.values())[index]

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())


# ---------------------------------------------------------------------------------
# Initialisation
# ---------------------------------------------------------------------------------

class NoValues:
    """Pass as ``rng`` to build a layer (or a whole model) that is about to receive its weights from a file.

    Every parameter gets its shape and dtype but no storage: its array is a
    read-only zero-stride view of one element (``broadcast_to``), so building
    allocates nothing whatever the shapes, and draws and writes nothing.
    Such a layer cannot run, and ``load_state_dict`` cannot copy into it,
    until each parameter's and buffer's ``data`` is replaced by a real array,
    which is what ``tinyclip.checkpoint`` does after checking every shape
    against the file. It stands in for ``backend.RNG``: ``normal`` and
    ``uniform`` take the same arguments.
    """

    def __init__(self, backend=None):
        self.backend = backend if backend is not None else _backend.default_backend()
        self.xp = _backend.backend_module(self.backend)

    def placeholder(self, shape, dtype=None):
        dtype = self.xp.dtype(_backend.default_dtype() if dtype is None else dtype)
        return self.xp.broadcast_to(self.xp.empty((), dtype=dtype), shape)

    def normal(self, shape, std=1.0, mean=0.0, dtype=None):
        return self.placeholder(shape, dtype)

    uniform = normal


class _Init:
    """Where a module's parameters go (dtype, backend) and where their random values come from."""

    def __init__(self, dtype=None, backend=None, rng=None, seed=None):
        if rng is not None and seed is not None:
            raise ValueError("give either rng or seed, not both")
        if backend is None:
            backend = rng.backend if rng is not None else _backend.default_backend()
        self.backend = backend
        self.xp = _backend.backend_module(backend)
        self.dtype = self.xp.dtype(_backend.default_dtype() if dtype is None else dtype)
        if self.dtype.kind != "f":
            raise TypeError(f"parameters need a floating-point dtype, got {self.dtype}")
        self.rng = rng if rng is not None else _backend.RNG(0 if seed is None else seed, backend)

    def child(self):
        """Keyword arguments that make a sub-layer draw from the same stream onto the same backend."""
        return {"dtype": self.dtype, "backend": self.backend, "rng": self.rng}

    def normal(self, shape, std, weight_matrix=False):
        draw = self.rng.normal(shape, std=std, dtype=self.dtype)
        return Parameter(_backend.asarray(draw, self.backend, self.dtype), weight_matrix=weight_matrix)

    def filled(self, shape, value):
        """An array of ``value`` (a placeholder without values when the rng is a ``NoValues``)."""
        if isinstance(self.rng, NoValues):
            return self.rng.placeholder(shape, self.dtype)
        return self.xp.full(shape, value, dtype=self.dtype)

    def constant(self, shape, value):
        return Parameter(self.filled(shape, value))


# ---------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------

class Linear(Module):
    """y = x Wᵀ + b, W of shape (out, in) as in PyTorch.

    Calling it raises what ``functional.linear`` raises (ValueError for an input whose last axis is not ``in``).
    """

    def __init__(self, in_features, out_features, bias=True, std=0.02, dtype=None, backend=None, rng=None, seed=None):
        super().__init__()
        init = _Init(dtype, backend, rng, seed)
        self.in_features, self.out_features = in_features, out_features
        self.weight = init.normal((out_features, in_features), std, weight_matrix=True)   # (out, in)
        self.bias = init.constant((out_features,), 0.0) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}"


class LayerNorm(Module):
    """y = (x - μ) / √(σ² + eps) · weight + bias over the last axis.

    Calling it raises what ``functional.layer_norm`` raises.
    """

    def __init__(self, dim, eps=1e-5, dtype=None, backend=None, rng=None, seed=None):
        super().__init__()
        init = _Init(dtype, backend, rng, seed)
        self.dim, self.eps = dim, eps
        self.weight = init.constant((dim,), 1.0)
        self.bias = init.constant((dim,), 0.0)

    def forward(self, x):
        return F.layer_norm(x, self.weight, self.bias, eps=self.eps)

    def extra_repr(self):
        return f"{self.dim}, eps={self.eps}"


class Conv2d(Module):
    """A 2-D convolution on channels-last images: (B, H, W, C_in) -> (B, H', W', C_out).

    ``linear(patches(x, kernel, stride, padding), W, b)``: every kernel × kernel
    window (zero padding) is flattened as (ky, kx, c) and mapped by W of shape
    (out, kernel·kernel·in), which is PyTorch's (out, in, k, k) weight
    permuted to (out, k, k, in). Weights start normal with std 1/√(k·k·in).
    Calling it raises ValueError for an input that is not (B, H, W, C_in), and what ``functional.patches``
    raises.
    """

    def __init__(self, in_channels, out_channels, kernel, stride=1, padding=0, bias=True,
                 dtype=None, backend=None, rng=None, seed=None):
        super().__init__()
        init = _Init(dtype, backend, rng, seed)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel, self.stride, self.padding = kernel, stride, padding
        fan_in = kernel * kernel * in_channels
        self.weight = init.normal((out_channels, fan_in), fan_in ** -0.5, weight_matrix=True)   # (out, k·k·in)
        self.bias = init.constant((out_channels,), 0.0) if bias else None

    def forward(self, x):
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"Conv2d: expected input (batch, height, width, {self.in_channels}), got {tuple(x.shape)}")
        return F.linear(F.patches(x, self.kernel, self.stride, self.padding), self.weight, self.bias)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel={self.kernel}, stride={self.stride}, "
                f"padding={self.padding}, bias={self.bias is not None}")


class BatchNorm(Module):
    """Batch normalisation over every axis but the last (Ioffe & Szegedy 2015), channels last.

    Training: y = (x - μ_batch) / √(σ²_batch + eps) · weight + bias, and the
    running mean and variance (Buffers, saved with the weights) move towards
    the batch's by ``momentum``. Evaluation (``module.eval()``): the running
    statistics are used instead, so one image gives the same answer alone or
    in a batch. Statistics are those of the batch this process sees, unless
    the layer owns a communicator ``comm`` (a ``tinyclip.distributed``
    communicator, given here or by ``synchronise_batch_norm``): then they are
    the whole global batch's over all ranks (synchronised batch norm, PyTorch's
    SyncBatchNorm: the per-channel sums are all-reduced, two small messages
    forward and one backward), so that N ranks train exactly as one process.
    The op ``functional.batch_norm`` stays pure: the layer hands it the
    communicator's all-reduce as the way to sum over the parts of the batch.
    Raises what ``functional.batch_norm`` raises.
    """

    def __init__(self, channels, eps=1e-5, momentum=0.1, dtype=None, backend=None, rng=None, seed=None, comm=None):
        super().__init__()
        init = _Init(dtype, backend, rng, seed)
        self.channels, self.eps, self.momentum = channels, eps, momentum
        self.weight = init.constant((channels,), 1.0)
        self.bias = init.constant((channels,), 0.0)
        self.running_mean = Buffer(init.filled((channels,), 0.0))
        self.running_var = Buffer(init.filled((channels,), 1.0))
        self.comm = comm                # a communicator: normalise over the global batch of all ranks

    def forward(self, x):
        return F.batch_norm(x, self.weight, self.bias, eps=self.eps,
                            running=(self.running_mean.data, self.running_var.data),
                            momentum=self.momentum, training=self.training,
                            sum_over_batch=None if self.comm is None else self.comm.all_reduce)

    def extra_repr(self):
        return f"{self.channels}, eps={self.eps}, momentum={self.momentum}" + (
            f", comm={self.comm!r}" if self.comm is not None else "")


def synchronise_batch_norm(model, comm):
    """Give every ``BatchNorm`` layer in ``model`` the communicator ``comm``: synchronised batch norm.

    Called where a model is built for data-parallel training (``tinyclip.train``
    does it under MPI), so that the statistics are those of the global batch
    and N ranks train exactly as one process. ``comm=None`` turns it off.
    Returns the number of layers changed.
    Raises nothing; the layers raise at their next forward if ``comm`` has no ``all_reduce``.
    """
    layers = [module for module in model.modules() if isinstance(module, BatchNorm)]
    for layer in layers:
        layer.comm = comm
    return len(layers)


class Embedding(Module):
    """y = weight[ids]: a lookup table of ``num`` rows of width ``dim``.

    Calling it raises what ``functional.embedding`` raises (TypeError for non-integer ids, IndexError out of
    range).
    """

    def __init__(self, num, dim, std=0.02, dtype=None, backend=None, rng=None, seed=None):
        super().__init__()
        init = _Init(dtype, backend, rng, seed)
        self.num, self.dim = num, dim
        self.weight = init.normal((num, dim), std)   # (num, dim)

    def forward(self, ids):
        return F.embedding(self.weight, ids)

    def extra_repr(self):
        return f"{self.num}, {self.dim}"


ACTIVATIONS = {
    "quick_gelu": F.quick_gelu,                                  # OpenAI CLIP: x · σ(1.702 x)
    "gelu": lambda x: F.gelu(x, approximate="none"),             # exact, erf-based (Hugging Face "gelu")
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),        # SigLIP ("gelu_pytorch_tanh")
    "relu": F.relu,
}


class MLP(Module):
    """y = fc2(act(fc1(x))): widen to ``hidden``, apply the activation, project back to ``dim``.

    Raises ValueError for an unknown activation; calling it raises what ``functional.linear`` raises.
    """

    def __init__(self, dim, hidden, activation="quick_gelu", dtype=None, backend=None, rng=None, seed=None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"MLP: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        init = _Init(dtype, backend, rng, seed)
        self.activation = activation
        self.fc1 = Linear(dim, hidden, **init.child())
        self.fc2 = Linear(hidden, dim, **init.child())

    def forward(self, x):
        return self.fc2(ACTIVATIONS[self.activation](self.fc1(x)))

    def extra_repr(self):
        return f"activation={self.activation!r}"


class MultiHeadAttention(Module):
    """y = out_proj(concat_h softmax(Q_h K_hᵀ / √d) V_h),  Q = q_proj(x), K = k_proj(c), V = v_proj(c).

    Queries come from ``x`` (B, Tq, D) and keys/values from c = ``context``
    (B, Tk, D), which defaults to ``x`` (self-attention); a different context
    gives cross-attention, as in SigLIP's attention-pooling head, where one
    learned query attends over all patch tokens. ``causal`` hides later keys
    from each query (the text tower) and needs Tq == Tk.
    Raises ValueError for a width that the heads do not divide, and, when called, for a context whose batch
    or width does not fit.
    """

    def __init__(self, dim, heads, causal=False, dtype=None, backend=None, rng=None, seed=None):
        super().__init__()
        if heads < 1 or dim % heads:
            raise ValueError(f"MultiHeadAttention: dim {dim} must be a positive multiple of heads {heads}")
        init = _Init(dtype, backend, rng, seed)
        self.dim, self.heads, self.causal = dim, heads, causal
        self.q_proj = Linear(dim, dim, **init.child())
        self.k_proj = Linear(dim, dim, **init.child())
        self.v_proj = Linear(dim, dim, **init.child())
        self.out_proj = Linear(dim, dim, **init.child())

    def _split_heads(self, x):
        batch, length, _ = x.shape
        x = x.reshape(batch, length, self.heads, self.dim // self.heads)   # (B, T, H, d)
        return x.transpose(0, 2, 1, 3)                                     # (B, H, T, d)

    def forward(self, x, context=None):
        _check_tokens("MultiHeadAttention", "x", x, self.dim)
        if context is None:
            context = x
        else:
            _check_tokens("MultiHeadAttention", "context", context, self.dim)
            if context.shape[0] != x.shape[0]:
                raise ValueError(f"MultiHeadAttention: context has batch size {context.shape[0]}, "
                                 f"x has {x.shape[0]}")
        batch, length, _ = x.shape
        q = self._split_heads(self.q_proj(x))         # (B, H, Tq, d)
        k = self._split_heads(self.k_proj(context))   # (B, H, Tk, d)
        v = self._split_heads(self.v_proj(context))   # (B, H, Tk, d)
        heads = F.scaled_dot_product_attention(q, k, v, causal=self.causal)   # (B, H, Tq, d)
        merged = heads.transpose(0, 2, 1, 3).reshape(batch, length, self.dim)  # (B, Tq, H·d)
        return self.out_proj(merged)

    def extra_repr(self):
        return f"{self.dim}, heads={self.heads}, causal={self.causal}"


def _check_tokens(layer, name, x, dim):
    if x.ndim != 3 or x.shape[-1] != dim:
        raise ValueError(f"{layer}: {name} must have shape (batch, tokens, {dim}), got {tuple(x.shape)}")


def mimetic_init(attention, rng, qk=(0.7, 0.7), vo=(0.4, 0.4)):
    """Redraw ``attention``'s four weights in place so that it starts out mixing nearby tokens.

    Mimetic initialisation (Trockman & Kolter 2023, "Mimetic Initialization of
    Self-Attention Layers"): trained ViTs' attention maps show, per head,
    W_q W_kᵀ ≈ α₁Z₁ + β₁I and, over the concatenated heads, W_v W_o ≈ α₂Z₂ − β₂I,
    with Z (D, D) Gaussian of variance 1/D. Starting there, a token's query
    matches keys like its own input (with a sin-cos position embedding, a mild
    lean towards nearby tokens), and the value path starts as a damped copy,
    the statistics of a trained ViT that a small one on little data would
    otherwise have to learn. Each head's
    (D, d) maps are the rank-d factors of the target's SVD, so W_q^h W_k^hᵀ is
    its best rank-d approximation; V and O factor their (D, D) target exactly.
    ``qk`` = (α₁, β₁) and ``vo`` = (α₂, β₂) are the paper's ViT values. The
    layer's convention is y = x Wᵀ, so W_q^h is rows h·d … (h+1)·d of q_proj.weight.
    Raises TypeError for anything but a MultiHeadAttention.
    """
    if not isinstance(attention, MultiHeadAttention):
        raise TypeError(f"mimetic_init needs a MultiHeadAttention, got {type(attention).__name__}")
    if isinstance(rng, NoValues):
        return                                          # weights come from a file; nothing to draw
    dim, head = attention.dim, attention.dim // attention.heads

    def factors(alpha, beta, rank):
        """(A, B), each (rank, D): Aᵀ B is the best rank-``rank`` approximation of αZ + βI."""
        z = rng.normal((dim, dim), std=dim ** -0.5, dtype="float64")
        u, sigma, vt = numpy.linalg.svd(alpha * _backend.to_numpy(z) + beta * numpy.eye(dim))
        root = numpy.sqrt(sigma[:rank])[:, None]
        return root * u[:, :rank].T, root * vt[:rank]

    q = numpy.empty((dim, dim))
    k = numpy.empty((dim, dim))
    for first in range(0, dim, head):                   # one target per head
        q[first:first + head], k[first:first + head] = factors(qk[0], qk[1], head)
    v, o = factors(vo[0], -vo[1], dim)                  # x W_vᵀ W_oᵀ ≈ x (α₂Z₂ − β₂I)
    for layer, value in ((attention.q_proj, q), (attention.k_proj, k), (attention.v_proj, v),
                         (attention.out_proj, o.T)):
        weight = layer.weight
        weight.data[...] = _backend.asarray(value, _backend.backend_of(weight.data), weight.dtype)


class Block(Module):
    """Pre-LN residual block: x ← x + attn(ln1(x)); x ← x + mlp(ln2(x)).

    Calling it raises what its attention and MLP raise.
    """

    def __init__(self, dim, heads, mlp_ratio=4, activation="quick_gelu", causal=False, eps=1e-5,
                 dtype=None, backend=None, rng=None, seed=None):
        super().__init__()
        init = _Init(dtype, backend, rng, seed)
        self.ln1 = LayerNorm(dim, eps, **init.child())
        self.attn = MultiHeadAttention(dim, heads, causal, **init.child())
        self.ln2 = LayerNorm(dim, eps, **init.child())
        self.mlp = MLP(dim, int(dim * mlp_ratio), activation, **init.child())

    def forward(self, x):
        x = x + self.attn(self.ln1(x))   # (B, T, D)
        return x + self.mlp(self.ln2(x))


class Transformer(Module):
    """``depth`` pre-LN Blocks applied in turn, named ``blocks.0`` ... ``blocks.{depth-1}``.

    Calling it raises what its blocks raise.
    """

    def __init__(self, dim, depth, heads, mlp_ratio=4, activation="quick_gelu", causal=False, eps=1e-5,
                 dtype=None, backend=None, rng=None, seed=None):
        super().__init__()
        init = _Init(dtype, backend, rng, seed)
        self.blocks = ModuleList(Block(dim, heads, mlp_ratio, activation, causal, eps, **init.child())
                                 for _ in range(depth))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x
