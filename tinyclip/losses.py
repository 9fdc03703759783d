"""The two contrastive losses, fused and tiled: CLIP's softmax loss and SigLIP's sigmoid loss.

For L2-normalised image embeddings X (B, D), text embeddings Y (B, D), the
scale t = exp(t') and, for SigLIP, the bias b, the logits are
l_ij = t·⟨x_i, y_j⟩ (+ b); pair i is (x_i, y_i), so positives sit on the
diagonal.

CLIP (Radford et al. 2021), the symmetric cross-entropy over rows and columns:
    L = 1/(2B) Σ_i [lse_j(l_ij) − l_ii] + 1/(2B) Σ_j [lse_i(l_ij) − l_jj]
    G = ∂L/∂l = (softmax_rows(l) − I)/(2B) + (softmax_cols(l) − I)/(2B)

SigLIP (Zhai et al. 2023), a binary classification of every pair, z_ij = +1 if
i = j else −1, with an optional mask m_ij (1 for positives and kept negatives):
    L = −1/B Σ_ij m_ij log σ(z_ij l_ij)
    G = ∂L/∂l = −m_ij z_ij σ(−z_ij l_ij)/B = (m ⊙ σ(l) − I)/B

For both, since l − b = t·X·Yᵀ:
    ∂L/∂X = t·G·Y,   ∂L/∂Y = t·Gᵀ·X,   ∂L/∂b = Σ G,
    ∂L/∂t' = Σ_ij G_ij (l_ij − b) = Σ_i ⟨x_i, ∂L/∂x_i⟩   (an O(B·D) dot, no pass over G).

Memory. The batch is processed in tiles of rows: a tile holds (tile, B) logits,
never (B, B), so memory beyond the inputs and their gradients is O(tile·B).
The gradients are computed in the same sweep as the loss (the loss is the end
of the graph, so the upstream gradient is a scalar that backward multiplies
in): SigLIP needs one sweep, three matrix products (X·Yᵀ, G·Y, Gᵀ·X). CLIP's
column log-sum-exp values are known only after the last row tile, so it needs
two sweeps: the first keeps each column's running max m and rescaled sum s
(the online softmax of Milakov & Gimelshein 2018, as in FlashAttention):
    m' = max(m, max_i l_ij),   s' = s·exp(m − m') + Σ_i exp(l_ij − m'),
exact at every step (s·exp(m) = Σ exp(l) over the rows seen so far), and the
second recomputes each tile's logits to form G — four products instead of
three, the price of never holding B×B. docs/losses.md has the derivations.

Numerics: log-sum-exp with the max subtracted; log σ(u) = min(u, 0) − log1p(e^−|u|);
σ(u) = exp(min(u, 0) − log1p(e^−|u|)); float16 inputs are computed in float32
and give a float32 loss (their gradients come back in float16).
"""

import functools
import math
import operator

from . import backend
from . import functional as F
from .autograd import Function, Tensor

NEGATIVE_CHOICES = ("random", "hard", "easy")

# Logits per tile. Big enough that the tile's products run at full BLAS speed: Gᵀ·X of a tile
# has the tile's height as its inner dimension, and a thin one starves the CPU's GEMM. Small
# enough that the two (tile, B) buffers stay below one B×B matrix: 32 MB each in float32.
_TILE_ELEMENTS = {"numpy": 1 << 23, "cupy": 1 << 25}


def default_tile(batch, backend_name="numpy"):
    """Rows per tile: about 8M logits per buffer on the CPU, 32M on a GPU, never more than the batch."""
    return max(1, min(batch, _TILE_ELEMENTS[backend_name] // max(batch, 1)))


# ---------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------

def _array(value):
    return value.data if isinstance(value, Tensor) else value


def _check_embeddings(image_emb, text_emb):
    for name, emb in (("image_emb", image_emb), ("text_emb", text_emb)):
        emb = _array(emb)
        if not hasattr(emb, "ndim"):
            raise TypeError(f"{name} must be a Tensor or an array, got {type(emb).__name__}")
        if emb.ndim != 2:
            raise ValueError(f"{name} must be 2-D (batch, dim), got shape {tuple(emb.shape)}")
        if emb.dtype.kind != "f":
            raise ValueError(f"{name} must be floating point, got dtype {emb.dtype}")
        if emb.shape[0] == 0 or emb.shape[1] == 0:
            raise ValueError(f"{name} is empty: shape {tuple(emb.shape)}")
    x, y = _array(image_emb), _array(text_emb)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"image_emb and text_emb must hold the same number of pairs, got batch sizes "
                         f"{x.shape[0]} (image_emb) and {y.shape[0]} (text_emb)")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"image_emb and text_emb must have the same dimension, got {x.shape[1]} (image_emb) "
                         f"and {y.shape[1]} (text_emb)")


def _check_scalar(name, value):
    array = _array(value)
    size = getattr(array, "size", None)
    if size is None:
        if not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a scalar (a number, a 0-d array or a one-element Tensor), "
                             f"got {type(value).__name__}")
        if not math.isfinite(value):
            raise ValueError(f"{name} is {value}: it must be finite")
        return
    if size != 1:
        raise ValueError(f"{name} must be a scalar, got shape {tuple(array.shape)}")


def _check_finite(**arrays):
    """NaN or inf anywhere in the inputs gives an error naming the input, never a silent NaN loss."""
    for name, value in arrays.items():
        array = _array(value)
        if hasattr(array, "dtype") and not bool(backend.get_array_module(array).isfinite(array).all()):
            raise ValueError(f"{name} contains NaN or inf")


def _check_inputs(image_emb, text_emb, log_scale, bias=None):
    _check_embeddings(image_emb, text_emb)
    _check_scalar("log_scale", log_scale)
    named = {"image_emb": image_emb, "text_emb": text_emb, "log_scale": log_scale}
    if bias is not None:
        _check_scalar("bias", bias)
        named["bias"] = bias
    _check_finite(**named)


def _work_dtype(x, y):
    """The type the tiles are computed in: the inputs' own, float32 for float16 (too narrow for sums of B²)."""
    dtype = backend.get_array_module(x).result_type(x.dtype, y.dtype)
    return dtype if dtype.itemsize >= 4 else backend.get_array_module(x).dtype("float32")


class _TiledLogits:
    """The logits l = t·X·Yᵀ + b one tile of rows at a time, in buffers reused by every tile.

    X holds the rows (images), Y the columns (texts). Y can be swapped for
    another block of columns of at most ``columns`` rows (``use_texts``): the
    distributed losses pass every rank's text chunk through the same buffers.
    Holds two (tile, columns) buffers (the logits and a work buffer), a
    (tile, D) buffer for t·X of the tile's rows and the two products' outputs:
    with the inputs, that is all the memory a sweep needs. float16 inputs are
    computed in float32.
    """

    def __init__(self, x, y, log_scale, shift, tile, columns=None):
        self.xp = xp = backend.get_array_module(x, y)
        self.work = _work_dtype(x, y)
        try:
            scale = math.exp(float(log_scale))
        except OverflowError:
            scale = math.inf
        if scale > float(xp.finfo(self.work).max):
            raise ValueError(f"log_scale = {float(log_scale)} makes the scale exp(log_scale) overflow {self.work}")
        self.images = x.astype(self.work, copy=False)
        self.scale, self.shift = scale, shift
        self.rows, self.tile = x.shape[0], min(tile, x.shape[0])
        self.columns = y.shape[0] if columns is None else columns
        # flat, so that a tile of n rows and m ≤ columns columns is one contiguous (n, m) view
        self.logits = xp.empty(self.tile * self.columns, dtype=self.work)
        self.buffer = xp.empty_like(self.logits)
        self.scaled_rows = xp.empty((self.tile, x.shape[1]), dtype=self.work)      # (tile, D)
        self.row_product = xp.empty_like(self.scaled_rows)                          # (tile, D): G·Y of a tile
        self.column_product = xp.empty((self.columns, x.shape[1]), dtype=self.work)  # (columns, D): Gᵀ·X
        self.use_texts(y)

    def use_texts(self, y):
        """Score the rows against ``y`` (m ≤ columns rows) from now on."""
        if y.shape[0] > self.columns:
            raise ValueError(f"a block of {y.shape[0]} texts does not fit buffers made for {self.columns}")
        self.texts = y.astype(self.work, copy=False)

    def ranges(self, reverse=False):
        starts = range(0, self.rows, self.tile)
        for start in (reversed(starts) if reverse else starts):
            yield start, min(start + self.tile, self.rows)

    def _view(self, flat, rows):
        return flat[:rows * self.texts.shape[0]].reshape(rows, self.texts.shape[0])

    def logits_of(self, start, stop):
        """The logits buffer as the last ``compute(start, stop)`` left it."""
        return self._view(self.logits, stop - start)

    def compute(self, start, stop):
        """Fill and return the logits of rows start .. stop−1 against the current texts: (n, m)."""
        xp, n = self.xp, stop - start
        scaled = xp.multiply(self.images[start:stop], self.scale, out=self.scaled_rows[:n])   # (n, D)
        block = xp.matmul(scaled, self.texts.T, out=self._view(self.logits, n))
        if self.shift:
            block += self.shift
        return block

    def work_buffer(self, start, stop):
        """The (n, m) work buffer beside the logits of rows start .. stop−1."""
        return self._view(self.buffer, stop - start)

    def accumulate(self, weights, start, stop, grad_images, grad_texts):
        """grad_images[start:stop] += W·Y and grad_texts += Wᵀ·X[start:stop] for a tile's weights W (n, m)."""
        xp, n = self.xp, stop - start
        grad_images[start:stop] += xp.matmul(weights, self.texts, out=self.row_product[:n])
        grad_texts += xp.matmul(weights.T, self.images[start:stop], out=self.column_product[:weights.shape[1]])

    def positives(self):
        """l_ii for every pair (row i with text i of the current texts, which must be the rows' own): (n,)."""
        return self.scale * self.xp.einsum("ij,ij->i", self.images, self.texts) + self.shift

    def gradients(self, grad_images, grad_texts, row_share, log_scale, batch=None):
        """Finish dX = t·G·Y and dY = t·Gᵀ·X from the sums of the tiles' (row_share · B·G + I)-products.

        ``batch`` is B, the global batch (default: the rows here). The tiles
        multiplied only the non-identity part of B·G / row_share; the
        identity's share, −1/B on the diagonal of G, adds −t·y_i/B to dX_i and
        −t·x_i/B to dY_i (the current texts must be the rows' own). Everything
        in place: no (n, D) temporary. Returns dX, dY and d log_scale = Σ_i ⟨x_i, dX_i⟩.
        """
        batch = self.rows if batch is None else batch
        for grad, partner in ((grad_images, self.texts), (grad_texts, self.images)):
            grad *= row_share
            grad -= partner
            grad *= self.scale / batch
        grad_log_scale = self.xp.einsum("ij,ij->", self.images, grad_images)
        return grad_images, grad_texts, _scalar_like(self.xp, grad_log_scale, log_scale)


class _RunningLSE:
    """Log-sum-exp of logits that arrive in pieces (the online softmax), for n rows or columns.

    Keeps the running max m and the rescaled sum s = Σ exp(l − m): on a new
    piece, m' = max(m, max l), s' = s·exp(m − m') + Σ exp(l − m'), exact at
    every step. With ``weighted``, also w = Σ exp(l − m)·l, rescaled alike, so
    that w/s is the softmax-weighted mean logit: the derivative of lse with
    respect to the log-scale is that mean (for unbiased logits l = t·⟨x, y⟩).
    The three live in one (3, n) array, ``stats``, so that they travel as one message.
    """

    def __init__(self, xp, n, dtype, weighted=False, stats=None):
        self.xp, self.weighted = xp, weighted
        if stats is None:
            stats = xp.zeros((3, n), dtype=dtype)
            stats[0] = -xp.inf
        self.stats = stats

    def update(self, block, axis, exps, part=slice(None)):
        """Add a piece ``block`` reduced over ``axis`` to the entries ``part``; ``exps`` is a work buffer like block."""
        xp = self.xp
        old_max, total, weighted = self.stats[0, part], self.stats[1, part], self.stats[2, part]
        new_max = xp.maximum(old_max, block.max(axis=axis))
        xp.exp(xp.subtract(block, xp.expand_dims(new_max, axis), out=exps), out=exps)
        decay = xp.exp(old_max - new_max)
        total *= decay
        total += exps.sum(axis=axis)
        if self.weighted:
            weighted *= decay
            weighted += xp.einsum("ij,ij->i" if axis == 1 else "ij,ij->j", exps, block)
        old_max[...] = new_max

    def merge(self, other):
        """Fold in ``other``, the (3, n) stats of the same entries over other logits."""
        xp = self.xp
        new_max = xp.maximum(self.stats[0], other[0])
        mine, theirs = xp.exp(self.stats[0] - new_max), xp.exp(other[0] - new_max)
        self.stats[1:] = self.stats[1:] * mine + other[1:] * theirs
        self.stats[0] = new_max

    def lse(self):
        return self.stats[0] + self.xp.log(self.stats[1])

    def mean_logit(self):
        return self.stats[2] / self.stats[1]


def _masked_sum(xp, terms, keep):
    """Σ terms, or Σ keep ⊙ terms as one dot product (no (n, B) temporary) when a mask is given."""
    return terms.sum() if keep is None else xp.vdot(terms.ravel(), keep.ravel())


def _scalar_like(xp, value, like):
    """``value`` as an array (never an immutable NumPy scalar) of ``like``'s dtype and shape."""
    return xp.asarray(value, dtype=like.dtype).reshape(like.shape)


def _scale_saved_gradients(ctx, g):
    """The fused forward saved d(loss)/d(input); the chain rule multiplies by the upstream scalar g.

    The context owns those arrays and is released after this call, so they are scaled in place.
    """
    grads = ctx.saved_tensors
    for grad in grads:
        grad *= g
    return grads


def _scalar_input(value, image_emb, text_emb):
    """Numbers become 0-d arrays of the tiles' type: float16 embeddings must not round the scale to float16."""
    if isinstance(value, Tensor) or (hasattr(value, "shape") and not isinstance(value, float)):
        return value
    x, y = _array(image_emb), _array(text_emb)
    return backend.get_array_module(x).asarray(value, dtype=_work_dtype(x, y))


# ---------------------------------------------------------------------------------
# CLIP: softmax over rows and columns, two sweeps
# ---------------------------------------------------------------------------------

def _clip_lse_sweep(tiles, row_stats, column_stats):
    """Sweep 1: fold every tile of the current block into the rows' and the columns' running log-sum-exp."""
    for start, stop in tiles.ranges():
        block, exps = tiles.compute(start, stop), tiles.work_buffer(start, stop)     # (n, m)
        row_stats.update(block, 1, exps, slice(start, stop))
        column_stats.update(block, 0, exps)


def _clip_gradient_sweep(tiles, row_lse, column_lse, grad_images, grad_texts, reuse_last=False):
    """Sweep 2, last tile first: add (P_rows + P_cols)·Y to grad_images and its transpose's product to grad_texts.

    With ``reuse_last`` the last tile's logits are still in the buffer from
    sweep 1, so with one tile nothing is recomputed.
    """
    xp = tiles.xp
    for index, (start, stop) in enumerate(tiles.ranges(reverse=True)):
        block = tiles.logits_of(start, stop) if reuse_last and index == 0 else tiles.compute(start, stop)
        probs = tiles.work_buffer(start, stop)                                            # (n, m)
        xp.exp(xp.subtract(block, row_lse[start:stop, None], out=probs), out=probs)   # softmax over j
        xp.exp(xp.subtract(block, column_lse, out=block), out=block)                  # softmax over i
        probs += block
        tiles.accumulate(probs, start, stop, grad_images, grad_texts)


class CLIPLoss(Function):
    @staticmethod
    def forward(ctx, x, y, log_scale, tile):
        """L = 1/(2B) Σ_i [lse_j l_ij − l_ii] + 1/(2B) Σ_j [lse_i l_ij − l_jj],  l = e^t' X Yᵀ"""
        tiles = _TiledLogits(x, y, log_scale, 0.0, tile)
        xp, work, batch = tiles.xp, tiles.work, tiles.rows
        row_stats, column_stats = _RunningLSE(xp, batch, work), _RunningLSE(xp, batch, work)
        _clip_lse_sweep(tiles, row_stats, column_stats)
        row_lse, column_lse = row_stats.lse(), column_stats.lse()                     # (B,), (B,)
        loss = (row_lse.sum() + column_lse.sum() - 2 * tiles.positives().sum()) / (2 * batch)
        if any(ctx.needs_input_grad):
            grad_images, grad_texts = xp.zeros_like(tiles.images), xp.zeros_like(tiles.texts)
            _clip_gradient_sweep(tiles, row_lse, column_lse, grad_images, grad_texts, reuse_last=True)
            # G = (P_rows + P_cols − 2I)/(2B): the tiles summed B·G/½ + I, hence the share ½
            grads = tiles.gradients(grad_images, grad_texts, 0.5, log_scale)
            ctx.save_for_backward(grads[0].astype(x.dtype, copy=False), grads[1].astype(y.dtype, copy=False),
                                  grads[2])
        return xp.asarray(loss, dtype=work)   # float32 for float16 inputs: a sum of B² terms

    backward = staticmethod(_scale_saved_gradients)


def clip_loss(image_emb, text_emb, log_scale, tile=None):
    """CLIP's symmetric softmax loss of L2-normalised embeddings (B, D); scale = exp(log_scale).

    ``tile`` rows are processed at a time (default ``default_tile``): no B×B matrix is formed.
    """
    _check_inputs(image_emb, text_emb, log_scale)
    batch = _array(image_emb).shape[0]
    tile = _resolve_tile(tile, batch, image_emb)
    return CLIPLoss.apply(image_emb, text_emb, _scalar_input(log_scale, image_emb, text_emb), tile=tile)


def _resolve_tile(tile, batch, like):
    if tile is None:
        return default_tile(batch, backend.backend_of(_array(like)))
    try:
        rows = operator.index(tile)   # ints and NumPy integers, not floats or bools
    except TypeError:
        rows = 0
    if isinstance(tile, bool) or rows < 1:
        raise ValueError(f"tile must be a positive integer, got {tile!r}")
    return rows


# ---------------------------------------------------------------------------------
# SigLIP: a sigmoid for every pair, one sweep
# ---------------------------------------------------------------------------------

def _siglip_sweep(tiles, grad_images=None, grad_texts=None, keep=None):
    """Score every pair of the current block as a negative; return (Σ −log σ(−l), Σ σ(l)) over the counted pairs.

    With gradient buffers, also adds σ(l)·Y to grad_images and σ(l)ᵀ·X to
    grad_texts. ``keep(block, start)`` gives a tile's 0/1 mask of counted
    pairs (negative masking); None counts every pair. Positives are scored as
    negatives here too: the caller corrects for them (softplus(−l) = softplus(l) − l).
    Sums are float64 0-d arrays.
    """
    xp = tiles.xp
    loss_sum = xp.zeros((), dtype=xp.float64)
    sigma_sum = xp.zeros((), dtype=xp.float64)
    for start, stop in tiles.ranges():
        block, other = tiles.compute(start, stop), tiles.work_buffer(start, stop)     # (n, m)
        mask = None if keep is None else keep(block, start).astype(tiles.work)       # (n, m) of 0 and 1
        # every pair as if negative: −log σ(−l) = softplus(l) = max(l, 0) + log1p(e^−|l|),
        # summed term by term (all terms ≥ 0, so nothing cancels). One of max(l, 0) and
        # min(l, 0) is 0, so l − max = min and min − max = −|l| exactly: two subtractions
        # stand in for the min, abs and negate passes.
        xp.maximum(block, 0, out=other)
        loss_sum += _masked_sum(xp, other, mask)
        block -= other                                                               # min(l, 0)
        xp.subtract(block, other, out=other)                                         # −|l|
        xp.log1p(xp.exp(other, out=other), out=other)                               # log1p(e^−|l|)
        loss_sum += _masked_sum(xp, other, mask)
        if grad_images is not None:
            # log σ(l) = min(l, 0) − log1p(e^−|l|), in the logits' buffer; σ(l) is its exp
            block -= other
            xp.exp(block, out=block)
            if mask is not None:
                block *= mask
            sigma_sum += block.sum()
            tiles.accumulate(block, start, stop, grad_images, grad_texts)
    return loss_sum, sigma_sum


class SigLIPLoss(Function):
    @staticmethod
    def forward(ctx, x, y, log_scale, bias, tile, keep_negatives=1.0, negatives="random", mask_seed=0):
        """L = −1/B Σ_ij m_ij log σ(z_ij l_ij),  l = e^t' X Yᵀ + b,  z = 2I − 1"""
        tiles = _TiledLogits(x, y, log_scale, float(bias), tile)
        xp, batch = tiles.xp, tiles.rows
        want_grad = any(ctx.needs_input_grad)
        grad_images, grad_texts = ((xp.zeros_like(tiles.images), xp.zeros_like(tiles.texts)) if want_grad
                                   else (None, None))
        keep = (functools.partial(_negative_mask_tile, keep_negatives=keep_negatives, negatives=negatives,
                                  seed=mask_seed) if keep_negatives < 1.0 else None)
        loss_sum, sigma_sum = _siglip_sweep(tiles, grad_images, grad_texts, keep)
        # positives were counted as negatives above: softplus(−l) = softplus(l) − l
        loss = (loss_sum - tiles.positives().sum()) / batch
        if want_grad:
            # G = (m ⊙ σ(l) − I)/B: the tiles summed B·G + I, hence the share 1
            grads = tiles.gradients(grad_images, grad_texts, 1.0, log_scale)
            grad_bias = _scalar_like(xp, (sigma_sum - batch) / batch, bias)
            ctx.save_for_backward(grads[0].astype(x.dtype, copy=False), grads[1].astype(y.dtype, copy=False),
                                  grads[2], grad_bias)
        return xp.asarray(loss, dtype=tiles.work)   # float32 for float16 inputs: a sum of B² terms

    backward = staticmethod(_scale_saved_gradients)


def siglip_loss(image_emb, text_emb, log_scale, bias, tile=None, keep_negatives=1.0, negatives="random",
                mask_seed=0):
    """SigLIP's pairwise sigmoid loss of L2-normalised embeddings (B, D); scale = exp(log_scale).

    ``keep_negatives`` < 1 keeps, in every row, exactly round(keep_negatives·(B−1))
    negatives chosen by ``negatives``: "random" (a fixed pseudo-random choice
    from ``mask_seed``), "hard" (the highest logits, i.e. the highest losses)
    or "easy" (the lowest); positives are always kept and the loss is still
    divided by B, as in the SigLIP paper's ablation. ``tile`` rows are
    processed at a time (default ``default_tile``): no B×B matrix is formed.
    """
    _check_inputs(image_emb, text_emb, log_scale, bias)
    _check_masking(keep_negatives, negatives)
    batch = _array(image_emb).shape[0]
    tile = _resolve_tile(tile, batch, image_emb)
    log_scale, bias = (_scalar_input(value, image_emb, text_emb) for value in (log_scale, bias))
    return SigLIPLoss.apply(image_emb, text_emb, log_scale, bias, tile=tile, keep_negatives=float(keep_negatives),
                            negatives=negatives, mask_seed=int(mask_seed))


# ---------------------------------------------------------------------------------
# Negative masking (the SigLIP paper's ablation)
# ---------------------------------------------------------------------------------

def _check_masking(keep_negatives, negatives):
    if not 0.0 <= float(keep_negatives) <= 1.0:
        raise ValueError(f"keep_negatives must be in [0, 1], got {keep_negatives}")
    if negatives not in NEGATIVE_CHOICES:
        raise ValueError(f"negatives must be one of {NEGATIVE_CHOICES}, got {negatives!r}")


def _pair_hash(xp, rows, cols, batch, seed):
    """A pseudo-random uint64 for every pair (i, j) from (seed, i·B + j): SplitMix64's finaliser.

    Counter-based, so the choice of a pair never depends on how the batch is tiled.
    """
    z = (rows[:, None].astype(xp.uint64) * xp.uint64(batch) + cols[None, :].astype(xp.uint64)
         + xp.uint64((seed * 0x9E3779B97F4A7C15) % (1 << 64)))
    z = (z ^ (z >> xp.uint64(30))) * xp.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> xp.uint64(27))) * xp.uint64(0x94D049BB133111EB)
    return z ^ (z >> xp.uint64(31))


def _negative_mask_tile(block, start, keep_negatives, negatives, seed):
    """Boolean (n, B): True for the positive and the kept negatives of rows start .. start+n−1."""
    xp = backend.get_array_module(block)
    rows, batch = block.shape
    row_ids = xp.arange(start, start + rows)
    keep = int(round(keep_negatives * (batch - 1)))
    mask = xp.zeros(block.shape, dtype=bool)
    mask[xp.arange(rows), row_ids] = True
    if keep == 0:
        return mask
    # a sort key per pair, smallest kept first; the positive gets the largest key so it is never counted
    if negatives == "random":
        key = _pair_hash(xp, row_ids, xp.arange(batch), batch, seed).astype(xp.float64)
    elif negatives == "hard":
        key = -block.astype(xp.float64)
    else:
        key = block.astype(xp.float64)
    key[xp.arange(rows), row_ids] = xp.inf
    chosen = xp.argpartition(key, keep - 1, axis=1)[:, :keep]                 # (n, keep)
    mask[xp.arange(rows)[:, None], chosen] = True
    return mask


def siglip_negative_mask(image_emb, text_emb, log_scale, bias, keep_negatives, negatives="random", mask_seed=0):
    """The (B, B) boolean mask ``siglip_loss`` uses: True where a pair counts (positives always).

    It materialises B×B: meant for tests and for looking at which negatives a rule keeps.
    """
    _check_inputs(image_emb, text_emb, log_scale, bias)
    _check_masking(keep_negatives, negatives)
    x, y = _array(image_emb), _array(text_emb)
    xp = backend.get_array_module(x, y)
    batch = x.shape[0]
    if float(keep_negatives) >= 1.0:
        return xp.ones((batch, batch), dtype=bool)
    # the logits exactly as the loss's tiles compute them, so that ties break the same way
    tiles = _TiledLogits(x, y, _array(log_scale), float(_array(bias)), batch)
    logits = tiles.compute(0, batch)
    return _negative_mask_tile(logits, 0, float(keep_negatives), negatives, int(mask_seed))


# ---------------------------------------------------------------------------------
# From primitives: the readable reference, and the tests' oracle
# ---------------------------------------------------------------------------------

def _as_tensor(value, like):
    """A Tensor as is; an array or a number as a constant Tensor of ``like``'s float type and backend."""
    if isinstance(value, Tensor):
        return value
    xp = backend.get_array_module(_array(like))
    return Tensor(xp.asarray(value, dtype=_array(like).dtype))


def _diagonal(matrix):
    index = matrix.xp.arange(matrix.shape[0])
    return F.getitem(matrix, (index, index))


def clip_loss_reference(image_emb, text_emb, log_scale):
    """CLIP's loss from functional ops, holding the B×B logits (Radford et al. 2021, Figure 3)."""
    image_emb, text_emb = _as_tensor(image_emb, image_emb), _as_tensor(text_emb, image_emb)
    log_scale = _as_tensor(log_scale, image_emb)
    logits = F.exp(log_scale) * F.matmul(image_emb, F.transpose(text_emb))     # (B, B)
    image_to_text = -F.mean(_diagonal(F.log_softmax(logits, axis=1)))           # each image picks its text
    text_to_image = -F.mean(_diagonal(F.log_softmax(logits, axis=0)))           # each text picks its image
    return (image_to_text + text_to_image) / 2


def siglip_loss_reference(image_emb, text_emb, log_scale, bias, mask=None):
    """SigLIP's loss from functional ops, holding the B×B logits (Zhai et al. 2023, Algorithm 1)."""
    image_emb, text_emb = _as_tensor(image_emb, image_emb), _as_tensor(text_emb, image_emb)
    log_scale, bias = _as_tensor(log_scale, image_emb), _as_tensor(bias, image_emb)
    xp = image_emb.xp
    batch = image_emb.shape[0]
    logits = F.exp(log_scale) * F.matmul(image_emb, F.transpose(text_emb)) + bias   # (B, B)
    labels = 2 * xp.eye(batch, dtype=logits.dtype) - 1                               # +1 positives, −1 negatives
    pair_terms = F.log_sigmoid(labels * logits)
    if mask is not None:
        pair_terms = pair_terms * xp.asarray(mask, dtype=logits.dtype)
    return -F.sum(pair_terms) / batch
