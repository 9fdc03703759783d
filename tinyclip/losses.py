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
The tiles, the running log-sum-exp and the sweeps are the tile engine in
``tinyclip.tiles``, which ``tinyclip.distributed`` builds its losses from too.

Numerics: log-sum-exp with the max subtracted; with e = e^−|u| ∈ (0, 1],
softplus(u) = −log σ(−u) = max(u, 0) + log1p(e), σ(u) = 1/(1 + e) for u ≥ 0 and
e/(1 + e) for u < 0 (``tinyclip.tiles.siglip_terms``); float16 inputs are computed
in float32 and give a float32 loss (their gradients come back in float16).
"""

import functools
import operator

from . import backend
from . import functional as F
from .autograd import Function, Tensor
from .tiles import (TiledLogits, RunningLSE, as_array, check_inputs, clip_gradient_sweep, clip_lse_sweep,
                    default_tile, resolve_tile, scalar_input, scalar_like, scale_saved_gradients, siglip_sweep)

__all__ = ["clip_loss", "siglip_loss", "siglip_negative_mask", "clip_loss_reference", "siglip_loss_reference",
           "default_tile", "clip_loss_of", "CLIPLoss", "SigLIPLoss", "NEGATIVE_CHOICES"]

NEGATIVE_CHOICES = ("random", "hard", "easy")


# ---------------------------------------------------------------------------------
# CLIP: softmax over rows and columns, two sweeps
# ---------------------------------------------------------------------------------

def clip_loss_of(row_lse, column_lse, row_positives, column_positives, batch):
    """1/(2B) [Σ_i (lse_i − l_ii) + Σ_j (lse_j − l_jj)] from the tiles' log-sum-exp values and diagonals.

    Each difference is taken before summing: the lse was computed from the
    same l_ii, so each is ≥ 0 in floating point and the loss can never come
    out below 0 (and is exactly 0 for a batch of one), where a difference of
    two sums could (issue 12).
    """
    return ((row_lse - row_positives).sum() + (column_lse - column_positives).sum()) / (2 * batch)


class CLIPLoss(Function):
    @staticmethod
    def forward(ctx, x, y, log_scale, tile):
        """L = 1/(2B) Σ_i [lse_j l_ij − l_ii] + 1/(2B) Σ_j [lse_i l_ij − l_jj],  l = e^t' X Yᵀ"""
        tiles = TiledLogits(x, y, log_scale, 0.0, tile)
        xp, work, batch = tiles.xp, tiles.work, tiles.rows
        row_stats, column_stats = RunningLSE(xp, batch, work), RunningLSE(xp, batch, work)
        positives = xp.empty(batch, dtype=work)                                       # l_ii from the tiles
        clip_lse_sweep(tiles, row_stats, column_stats, positives)
        row_lse, column_lse = row_stats.lse(), column_stats.lse()                     # (B,), (B,)
        loss = clip_loss_of(row_lse, column_lse, positives, positives, batch)
        if any(ctx.needs_input_grad):
            grad_images, grad_texts = xp.zeros_like(tiles.images), xp.zeros_like(tiles.texts)
            clip_gradient_sweep(tiles, row_lse, column_lse, grad_images, grad_texts, reuse_last=True)
            # G = (P_rows + P_cols − 2I)/(2B): the tiles summed B·G/½ + I, hence the share ½
            grads = tiles.gradients(grad_images, grad_texts, 0.5, log_scale)
            ctx.save_for_backward(grads[0].astype(x.dtype, copy=False), grads[1].astype(y.dtype, copy=False),
                                  grads[2])
        return xp.asarray(loss, dtype=work)   # float32 for float16 inputs: a sum of B² terms

    backward = staticmethod(scale_saved_gradients)


def clip_loss(image_emb, text_emb, log_scale, tile=None):
    """CLIP's symmetric softmax loss of L2-normalised embeddings (B, D); scale = exp(log_scale).

    ``tile`` rows are processed at a time (default ``default_tile``): no B×B matrix is formed.
    Returns a scalar Tensor, ≥ 0 (exactly 0 for a batch of one) in every float type.

    Raises TypeError or ValueError naming the input for embeddings that are
    not (B, D) float arrays of equal shape, empty, or hold NaN/inf; for a
    log_scale that is None, not a scalar, not finite or whose exp overflows;
    and for a tile that is not a positive integer.
    """
    check_inputs(image_emb, text_emb, log_scale)
    batch = as_array(image_emb).shape[0]
    tile = resolve_tile(tile, batch, image_emb)
    return CLIPLoss.apply(image_emb, text_emb, scalar_input(log_scale, image_emb, text_emb), tile=tile)


# ---------------------------------------------------------------------------------
# SigLIP: a sigmoid for every pair, one sweep
# ---------------------------------------------------------------------------------

class SigLIPLoss(Function):
    @staticmethod
    def forward(ctx, x, y, log_scale, bias, tile, keep_negatives=1.0, negatives="random", mask_seed=0):
        """L = −1/B Σ_ij m_ij log σ(z_ij l_ij),  l = e^t' X Yᵀ + b,  z = 2I − 1"""
        tiles = TiledLogits(x, y, log_scale, float(bias), tile)
        xp, batch = tiles.xp, tiles.rows
        want_grad = any(ctx.needs_input_grad)
        grad_images, grad_texts = ((xp.zeros_like(tiles.images), xp.zeros_like(tiles.texts)) if want_grad
                                   else (None, None))
        keep = (functools.partial(_negative_mask_tile, keep_negatives=keep_negatives, negatives=negatives,
                                  seed=mask_seed) if keep_negatives < 1.0 else None)
        loss_sum, sigma_sum = siglip_sweep(tiles, grad_images, grad_texts, keep, positives=True)
        loss = loss_sum / batch
        if want_grad:
            # G = (m ⊙ σ(l) − I)/B: the tiles summed B·G + I, hence the share 1
            grads = tiles.gradients(grad_images, grad_texts, 1.0, log_scale)
            grad_bias = scalar_like(xp, (sigma_sum - batch) / batch, bias)
            ctx.save_for_backward(grads[0].astype(x.dtype, copy=False), grads[1].astype(y.dtype, copy=False),
                                  grads[2], grad_bias)
        return xp.asarray(loss, dtype=tiles.work)   # float32 for float16 inputs: a sum of B² terms

    backward = staticmethod(scale_saved_gradients)


def siglip_loss(image_emb, text_emb, log_scale, bias, tile=None, keep_negatives=1.0, negatives="random",
                mask_seed=0):
    """SigLIP's pairwise sigmoid loss of L2-normalised embeddings (B, D); scale = exp(log_scale).

    ``keep_negatives`` < 1 keeps, in every row, exactly round(keep_negatives·(B−1))
    negatives chosen by ``negatives``: "random" (a fixed pseudo-random choice
    from ``mask_seed``), "hard" (the highest logits, i.e. the highest losses)
    or "easy" (the lowest); positives are always kept and the loss is still
    divided by B, as in the SigLIP paper's ablation. ``tile`` rows are
    processed at a time (default ``default_tile``): no B×B matrix is formed.
    Returns a scalar Tensor, ≥ 0 in every float type.

    Raises what ``clip_loss`` raises, and ValueError naming ``bias`` when it is
    None (a CLIP-family model has no bias: use clip_loss), not a scalar or not
    finite, and naming ``keep_negatives``, ``negatives`` or ``mask_seed`` when
    they are out of range or of the wrong type.
    """
    check_inputs(image_emb, text_emb, log_scale, bias, needs_bias=True)
    _check_masking(keep_negatives, negatives, mask_seed)
    batch = as_array(image_emb).shape[0]
    tile = resolve_tile(tile, batch, image_emb)
    log_scale, bias = (scalar_input(value, image_emb, text_emb) for value in (log_scale, bias))
    return SigLIPLoss.apply(image_emb, text_emb, log_scale, bias, tile=tile, keep_negatives=float(keep_negatives),
                            negatives=negatives, mask_seed=int(mask_seed))


# ---------------------------------------------------------------------------------
# Negative masking (the SigLIP paper's ablation)
# ---------------------------------------------------------------------------------

def _check_masking(keep_negatives, negatives, mask_seed):
    if (isinstance(keep_negatives, bool) or not isinstance(keep_negatives, (int, float))
            or not 0.0 <= float(keep_negatives) <= 1.0):
        raise ValueError(f"keep_negatives must be a number in [0, 1], got {keep_negatives!r}")
    if negatives not in NEGATIVE_CHOICES:
        raise ValueError(f"negatives must be one of {NEGATIVE_CHOICES}, got {negatives!r}")
    try:
        operator.index(mask_seed)
    except TypeError:
        raise ValueError(f"mask_seed must be an integer, got {mask_seed!r}") from None


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
    Raises what ``siglip_loss`` raises.
    """
    check_inputs(image_emb, text_emb, log_scale, bias, needs_bias=True)
    _check_masking(keep_negatives, negatives, mask_seed)
    x, y = as_array(image_emb), as_array(text_emb)
    xp = backend.get_array_module(x, y)
    batch = x.shape[0]
    if float(keep_negatives) >= 1.0:
        return xp.ones((batch, batch), dtype=bool)
    # the logits exactly as the loss's tiles compute them, so that ties break the same way
    tiles = TiledLogits(x, y, as_array(log_scale), float(as_array(bias)), batch)
    logits = tiles.compute(0, batch)
    return _negative_mask_tile(logits, 0, float(keep_negatives), negatives, int(mask_seed))


# ---------------------------------------------------------------------------------
# From primitives: the readable reference, and the tests' oracle
# ---------------------------------------------------------------------------------

def _as_tensor(value, like):
    """A Tensor as is; an array or a number as a constant Tensor of ``like``'s float type and backend."""
    if isinstance(value, Tensor):
        return value
    xp = backend.get_array_module(as_array(like))
    return Tensor(xp.asarray(value, dtype=as_array(like).dtype))


def _diagonal(matrix):
    index = matrix.xp.arange(matrix.shape[0])
    return F.getitem(matrix, (index, index))


def clip_loss_reference(image_emb, text_emb, log_scale):
    """CLIP's loss from functional ops, holding the B×B logits (Radford et al. 2021, Figure 3).

    No input checks (it is the tests' oracle): raises what the ops raise.
    """
    image_emb, text_emb = _as_tensor(image_emb, image_emb), _as_tensor(text_emb, image_emb)
    log_scale = _as_tensor(log_scale, image_emb)
    logits = F.exp(log_scale) * F.matmul(image_emb, F.transpose(text_emb))     # (B, B)
    image_to_text = -F.mean(_diagonal(F.log_softmax(logits, axis=1)))           # each image picks its text
    text_to_image = -F.mean(_diagonal(F.log_softmax(logits, axis=0)))           # each text picks its image
    return (image_to_text + text_to_image) / 2


def siglip_loss_reference(image_emb, text_emb, log_scale, bias, mask=None):
    """SigLIP's loss from functional ops, holding the B×B logits (Zhai et al. 2023, Algorithm 1).

    No input checks (it is the tests' oracle): raises what the ops raise.
    """
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
