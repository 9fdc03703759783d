"""The tile engine both contrastive losses share: tiled logits, running log-sum-exp, sweeps, input checks.

For L2-normalised image embeddings X (B, D), text embeddings Y (M, D), the
scale t = exp(t') and a shift b (SigLIP's bias, 0 for CLIP), the logits are
l_ij = t·⟨x_i, y_j⟩ + b. Neither loss ever holds the (B, M) matrix: the rows
are processed in tiles of ``tile`` rows, each (tile, M) block of logits is
made in a buffer reused by every tile (``TiledLogits``), and what a loss needs
from all of a row's or a column's logits is folded in as the tiles go by:

* ``RunningLSE``, the online softmax (Milakov & Gimelshein 2018, as in
  FlashAttention): per row or column the running max m and rescaled sum
  s = Σ exp(l − m), m' = max(m, max l), s' = s·exp(m − m') + Σ exp(l − m'),
  exact at every step; its (3, n) state can travel between processes.
* ``clip_lse_sweep`` and ``clip_gradient_sweep``: CLIP's two sweeps (the
  log-sum-exp values of every row and column, then the softmax-weighted
  products that make the gradients, recomputing each tile's logits).
* ``siglip_sweep``: SigLIP's one sweep (every pair scored as a negative,
  with its gradient products); ``siglip_terms`` is its element-wise maths.
* ``row_softmax_sweep``: a softmax over whole rows (the all-gather CLIP).

Between a tile's products, its element-wise work (B² exponentials and
logarithms: on one core, some 40% more time on top of the products) runs in
place in the logits' buffer, on row blocks on every core
(``tinyclip.parallel.map_rows``) and in cache-sized chunks of rows
(``CHUNK_ELEMENTS``): each tile is read from memory once per sweep, and no
second (tile, M) buffer is needed. docs/losses.md, section 9, has the costs.

``tinyclip.losses`` (one process) and ``tinyclip.distributed`` (the ring and
all-gather losses over MPI, which pass every rank's text chunk through the
same buffers) are both built from these pieces; the derivations are in
``tinyclip.losses`` and docs/losses.md. This module also holds the input
checks both share (``check_inputs``), so that a bad input gets the same error
from either.

Numerics: float16 inputs are computed in float32 (``work_dtype``): a sum of
B² terms is too much for float16.
"""

import functools
import math
import operator

from . import backend, parallel
from .autograd import Tensor

# Logits per tile. Big enough that the tile's products run at full BLAS speed: Gᵀ·X of a tile
# has the tile's height as its inner dimension, and a thin one starves the CPU's GEMM. A tile
# is one (tile, B) buffer (its element-wise work runs in chunks, see CHUNK_ELEMENTS, with no
# second buffer): on the CPU 64 MB in float32, a quarter of one 8192×8192 matrix, which puts
# B = 4096 in one tile, so that CLIP's second sweep recomputes nothing there.
TILE_ELEMENTS = {"numpy": 1 << 24, "cupy": 1 << 25}

# Logits per chunk of a tile's element-wise work. On the CPU the tile's logits are then read
# from memory once per sweep, and the few chunk-sized arrays the maths passes through (256 KB
# each in float32) stay in the core's caches between its passes; smaller chunks pay more
# Python per logit (some 20 NumPy calls a chunk, ~1 µs each). 2¹⁶ had the lowest minimum CPU time of
# 2¹³ .. 2¹⁸ at B = 4096 on the shared, loaded 2-core AMD EPYC (noisy). On a GPU the chunks only bound the
# scratch memory.
CHUNK_ELEMENTS = {"numpy": 1 << 16, "cupy": 1 << 22}


def default_tile(batch, backend_name="numpy"):
    """Rows per tile: about 16M logits per tile on the CPU, 32M on a GPU, never more than the batch.

    Raises KeyError for a backend name other than "numpy" or "cupy".
    """
    return max(1, min(batch, TILE_ELEMENTS[backend_name] // max(batch, 1)))


def resolve_tile(tile, batch, like):
    """``tile`` as a number of rows, or ``default_tile(batch)`` on ``like``'s backend when it is None.

    Raises ValueError unless ``tile`` is None or a positive integer (bools and floats are refused).
    """
    if tile is None:
        return default_tile(batch, backend.backend_of(as_array(like)))
    try:
        rows = operator.index(tile)   # ints and NumPy integers, not floats or bools
    except TypeError:
        rows = 0
    if isinstance(tile, bool) or rows < 1:
        raise ValueError(f"tile must be a positive integer, got {tile!r}")
    return rows


# ---------------------------------------------------------------------------------
# Input checks, shared by the single-process and the distributed losses
# ---------------------------------------------------------------------------------

def as_array(value):
    """The array inside a Tensor, or ``value`` itself."""
    return value.data if isinstance(value, Tensor) else value


def check_embeddings(image_emb, text_emb):
    """Both must be non-empty 2-D floating-point (B, D) arrays or Tensors with the same B and D.

    Raises TypeError for something that is not an array or a Tensor (None included),
    ValueError for a wrong shape, dtype, an empty batch or mismatched sizes; each names the input.
    """
    for name, emb in (("image_emb", image_emb), ("text_emb", text_emb)):
        emb = as_array(emb)
        if not hasattr(emb, "ndim"):
            raise TypeError(f"{name} must be a Tensor or an array, got {type(emb).__name__}")
        if emb.ndim != 2:
            raise ValueError(f"{name} must be 2-D (batch, dim), got shape {tuple(emb.shape)}")
        if emb.dtype.kind != "f":
            raise ValueError(f"{name} must be floating point, got dtype {emb.dtype}")
        if emb.shape[0] == 0 or emb.shape[1] == 0:
            raise ValueError(f"{name} is empty: shape {tuple(emb.shape)}")
    x, y = as_array(image_emb), as_array(text_emb)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"image_emb and text_emb must hold the same number of pairs, got batch sizes "
                         f"{x.shape[0]} (image_emb) and {y.shape[0]} (text_emb)")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"image_emb and text_emb must have the same dimension, got {x.shape[1]} (image_emb) "
                         f"and {y.shape[1]} (text_emb)")


# why a None scalar is wrong, by name: the usual way to get one is a model of the other family
_MISSING_SCALAR = {
    "bias": "bias is None: SigLIP's loss needs the learned bias b (logit_bias); a CLIP-family model has no "
            "bias (its forward returns None for it): use clip_loss for it, or give a number",
    "log_scale": "log_scale is None: the loss needs the learned log-scale t' (logit_scale), scale = exp(t')",
}


def check_scalar(name, value):
    """``value`` must be a finite number, a 0-d/one-element array or a one-element Tensor.

    Raises ValueError naming ``name`` for None (a CLIP model's bias given to a
    SigLIP loss), a non-number, a non-finite number or more than one element.
    """
    if value is None:
        raise ValueError(_MISSING_SCALAR.get(name, f"{name} is None: it must be a number"))
    array = as_array(value)
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


def check_finite(**arrays):
    """NaN or inf anywhere in the inputs gives an error naming the input, never a silent NaN loss.

    Raises ValueError naming the first input that holds NaN or inf.
    """
    for name, value in arrays.items():
        array = as_array(value)
        if hasattr(array, "dtype") and not bool(backend.get_array_module(array).isfinite(array).all()):
            raise ValueError(f"{name} contains NaN or inf")


def check_inputs(image_emb, text_emb, log_scale, bias=None, needs_bias=False):
    """Every check a contrastive loss makes before it computes anything.

    ``bias`` is checked when given or when ``needs_bias`` (SigLIP): then None
    is an error, not a silent NaN. Raises TypeError or ValueError naming the input.
    """
    check_embeddings(image_emb, text_emb)
    check_scalar("log_scale", log_scale)
    named = {"image_emb": image_emb, "text_emb": text_emb, "log_scale": log_scale}
    if bias is not None or needs_bias:
        check_scalar("bias", bias)
        named["bias"] = bias
    check_finite(**named)


def work_dtype(x, y):
    """The type the tiles are computed in: the inputs' own, float32 for float16 (too narrow for sums of B²)."""
    dtype = backend.get_array_module(x).result_type(x.dtype, y.dtype)
    return dtype if dtype.itemsize >= 4 else backend.get_array_module(x).dtype("float32")


def scalar_input(value, image_emb, text_emb):
    """Numbers become 0-d arrays of the tiles' type: float16 embeddings must not round the scale to float16."""
    if isinstance(value, Tensor) or (hasattr(value, "shape") and not isinstance(value, float)):
        return value
    x, y = as_array(image_emb), as_array(text_emb)
    return backend.get_array_module(x).asarray(value, dtype=work_dtype(x, y))


def scalar_like(xp, value, like):
    """``value`` as an array (never an immutable NumPy scalar) of ``like``'s dtype and shape."""
    return xp.asarray(value, dtype=like.dtype).reshape(like.shape)


def scale_saved_gradients(ctx, g):
    """The backward of a fused loss: its forward saved d(loss)/d(input); multiply by the upstream scalar g.

    The context owns those arrays and is released after this call, so they are scaled in place.
    """
    grads = ctx.saved_tensors
    for grad in grads:
        grad *= g
    return grads


# ---------------------------------------------------------------------------------
# The tiles and the running log-sum-exp
# ---------------------------------------------------------------------------------

class TiledLogits:
    """The logits l = t·X·Yᵀ + b one tile of rows at a time, in buffers reused by every tile.

    ``x`` (B, D) holds the rows (images), ``y`` (M, D) the columns (texts);
    ``log_scale`` is t' (a number or a one-element array), ``shift`` the
    number b. Y can be swapped for another block of at most ``columns`` rows
    (``use_texts``): the distributed losses pass every rank's text chunk
    through the same buffers. Holds one (tile, columns) buffer for the
    logits (the sweeps turn them into G in place, chunk by chunk), a
    (tile, D) buffer for t·X of the tile's rows and the two products'
    outputs: with the inputs, that is all the memory a sweep needs, besides
    each thread's chunk-sized scratch. float16 inputs are computed in float32.

    Raises ValueError when exp(log_scale) overflows the work type.
    """

    def __init__(self, x, y, log_scale, shift, tile, columns=None):
        self.xp = xp = backend.get_array_module(x, y)
        self.work = work_dtype(x, y)
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
        self.scaled_rows = xp.empty((self.tile, x.shape[1]), dtype=self.work)      # (tile, D)
        self.row_product = xp.empty_like(self.scaled_rows)                          # (tile, D): G·Y of a tile
        self.column_product = xp.empty((self.columns, x.shape[1]), dtype=self.work)  # (columns, D): Gᵀ·X
        self.use_texts(y)

    def use_texts(self, y):
        """Score the rows against ``y`` (m ≤ columns rows) from now on. Raises ValueError when m > columns."""
        if y.shape[0] > self.columns:
            raise ValueError(f"a block of {y.shape[0]} texts does not fit buffers made for {self.columns}")
        self.texts = y.astype(self.work, copy=False)

    def ranges(self, reverse=False):
        """(start, stop) of every tile of rows, first to last (or last to first)."""
        starts = range(0, self.rows, self.tile)
        for start in (reversed(starts) if reverse else starts):
            yield start, min(start + self.tile, self.rows)

    def _view(self, flat, rows):
        return flat[:rows * self.texts.shape[0]].reshape(rows, self.texts.shape[0])

    def logits_of(self, start, stop):
        """The logits buffer as the last ``compute(start, stop)`` left it."""
        return self._view(self.logits, stop - start)

    def compute(self, start, stop, shifted=True):
        """Fill and return the logits of rows start .. stop−1 against the current texts: (n, m).

        With ``shifted=False`` the shift b is not added: the caller adds it
        chunk by chunk (SigLIP's sweep), saving a pass over the tile in memory.
        """
        xp, n = self.xp, stop - start
        scaled = xp.multiply(self.images[start:stop], self.scale, out=self.scaled_rows[:n])   # (n, D)
        block = xp.matmul(scaled, self.texts.T, out=self._view(self.logits, n))
        if self.shift and shifted:
            block += self.shift
        return block

    def chunk_rows(self):
        """Rows per chunk of the element-wise work: about ``CHUNK_ELEMENTS`` logits, at least one row."""
        columns = max(1, self.texts.shape[0])
        return max(1, CHUNK_ELEMENTS[backend.backend_of(self.logits)] // columns)

    def accumulate(self, weights, start, stop, grad_images, grad_texts):
        """grad_images[start:stop] += W·Y and grad_texts += Wᵀ·X[start:stop] for a tile's weights W (n, m)."""
        xp, n = self.xp, stop - start
        grad_images[start:stop] += xp.matmul(weights, self.texts, out=self.row_product[:n])
        grad_texts += xp.matmul(weights.T, self.images[start:stop], out=self.column_product[:weights.shape[1]])

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
        return grad_images, grad_texts, scalar_like(self.xp, grad_log_scale, log_scale)


class RunningLSE:
    """Log-sum-exp of logits that arrive in pieces (the online softmax), for n rows or columns.

    Keeps the running max m and the rescaled sum s = Σ exp(l − m): on a new
    piece, m' = max(m, max l), s' = s·exp(m − m') + Σ exp(l − m'), exact at
    every step. With ``weighted``, also w = Σ exp(l − m)·l, rescaled alike, so
    that w/s is the softmax-weighted mean logit: the derivative of lse with
    respect to the log-scale is that mean (for unbiased logits l = t·⟨x, y⟩).
    The three live in one (3, n) array, ``stats`` (given, or made empty), so
    that they travel as one message. Since the largest logit contributes
    exp(0) = 1 to s, lse = m + log s is never below any logit folded in.
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
        """log Σ exp(l) of every entry: (n,)."""
        return self.stats[0] + self.xp.log(self.stats[1])

    def mean_logit(self):
        """Σ softmax(l)·l of every entry (needs ``weighted``): (n,)."""
        return self.stats[2] / self.stats[1]


# ---------------------------------------------------------------------------------
# The sweeps
# ---------------------------------------------------------------------------------
#
# A sweep makes each tile's logits with one product (BLAS, on every core), hands the tile's
# element-wise work to ``parallel.map_rows`` (row blocks on a thread pool: NumPy's ufuncs use
# one core each) and multiplies what that left in the logits' buffer into the gradients (BLAS
# again). Each thread walks its rows in chunks of about ``CHUNK_ELEMENTS`` logits, so that a
# tile is read from memory once and its element-wise passes run in cache. Work on a row needs
# only that row, so it is the same, bit for bit, at every thread count; what a column sums
# across rows (CLIP's column log-sum-exp) is summed per row block and the blocks' sums are
# merged in row order: deterministic for a given thread count.

def _chunks(rows, step):
    """(lo, hi) of consecutive chunks of ``step`` rows (the last may be shorter)."""
    for lo in range(0, rows, step):
        yield lo, min(lo + step, rows)


def clip_lse_sweep(tiles, row_stats, column_stats, positives=None):
    """CLIP's sweep 1: fold every tile of the current block into the rows' and the columns' running log-sum-exp.

    With ``positives`` (an (n,) array; the current texts must be the rows'
    own), also copy each tile's diagonal l_ii into it: the very values the
    log-sum-exp saw, so that lse_i − l_ii ≥ 0 holds in floating point too
    (a separate product could round l_ii a step above them).
    """
    host = backend.backend_module("numpy")
    for start, stop in tiles.ranges():
        block = tiles.compute(start, stop)                                       # (n, m)
        if positives is not None:
            positives[start:stop] = diagonal_of(block, start)                 # l_ii, i in start .. stop−1
        partials = {}                                                            # first row → columns' stats
        fold = functools.partial(_clip_lse_rows, partials=partials, step=tiles.chunk_rows(),
                                 weighted=row_stats.weighted)
        # the rows' stats as (n, 3), so that map_rows hands each thread its own rows of them
        parallel.map_rows(fold, block, row_stats.stats[:, start:stop].T, host.arange(stop - start))
        for first_row in sorted(partials):
            column_stats.merge(partials[first_row])


def _clip_lse_rows(logits, row_stats, row_ids, partials, step, weighted):
    """Sweep 1's element-wise work on rows of a tile: ``logits`` (k, m), their stats ``row_stats`` (k, 3).

    Folds the rows into their running log-sum-exp and leaves the columns'
    (3, m) stats over these rows in ``partials[row_ids[0]]``.
    """
    xp = backend.get_array_module(logits)
    rows, width = logits.shape
    exps_all = xp.empty((min(step, rows), width), dtype=logits.dtype)
    row_lse = RunningLSE(xp, rows, logits.dtype, weighted, stats=row_stats.T)
    columns = RunningLSE(xp, width, logits.dtype, weighted)
    # one shift per column for all these rows: the chunks' sums then add up with no rescaling
    columns.stats[0] = logits.max(axis=0)
    for lo, hi in _chunks(rows, step):
        chunk, exps = logits[lo:hi], exps_all[:hi - lo]
        row_lse.update(chunk, 1, exps, slice(lo, hi))
        xp.exp(xp.subtract(chunk, columns.stats[0], out=exps), out=exps)
        columns.stats[1] += exps.sum(axis=0)
        if weighted:
            columns.stats[2] += xp.einsum("ij,ij->j", exps, chunk)
    partials[int(row_ids[0])] = columns.stats


def clip_gradient_sweep(tiles, row_lse, column_lse, grad_images, grad_texts, reuse_last=False):
    """CLIP's sweep 2, last tile first: add P·Y to grad_images and Pᵀ·X to grad_texts, P = P_rows + P_cols.

    ``row_lse`` (n,) and ``column_lse`` (m,) are the finished log-sum-exp
    values. With ``reuse_last`` the last tile's logits are still in the
    buffer from sweep 1, so with one tile nothing is recomputed.
    """
    softmaxes = functools.partial(_clip_probability_rows, column_lse=column_lse, step=tiles.chunk_rows())
    for index, (start, stop) in enumerate(tiles.ranges(reverse=True)):
        block = tiles.logits_of(start, stop) if reuse_last and index == 0 else tiles.compute(start, stop)
        parallel.map_rows(softmaxes, block, row_lse[start:stop])          # block becomes P, (n, m)
        tiles.accumulate(block, start, stop, grad_images, grad_texts)


def _clip_probability_rows(logits, row_lse, column_lse, step):
    """P = softmax over each row + softmax over each column, in place of ``logits`` (k, m); ``row_lse`` (k,)."""
    xp = backend.get_array_module(logits)
    rows, width = logits.shape
    probs_all = xp.empty((min(step, rows), width), dtype=logits.dtype)
    for lo, hi in _chunks(rows, step):
        chunk, probs = logits[lo:hi], probs_all[:hi - lo]
        xp.exp(xp.subtract(chunk, row_lse[lo:hi, None], out=probs), out=probs)   # softmax over j
        xp.exp(xp.subtract(chunk, column_lse, out=chunk), out=chunk)             # softmax over i
        chunk += probs


def row_softmax_sweep(tiles, stats, positives, offset, grad_rows=None, grad_columns=None):
    """A softmax over whole rows only (the all-gather CLIP's two sides): fold every tile into ``stats``.

    The current texts must be all the columns, so that each tile's rows are
    complete. Copies each tile's l_ii, at column ``offset`` + row, into
    ``positives`` (n,); with gradient buffers also adds P·Y to ``grad_rows``
    and Pᵀ·X to ``grad_columns``, P the rows' softmax.
    """
    want_probs = grad_rows is not None
    softmax = functools.partial(_row_softmax_rows, weighted=stats.weighted, step=tiles.chunk_rows(),
                                want_probs=want_probs)
    for start, stop in tiles.ranges():
        block = tiles.compute(start, stop)                                       # (n, m)
        positives[start:stop] = diagonal_of(block, offset + start)
        parallel.map_rows(softmax, block, stats.stats[:, start:stop].T)        # block becomes P when wanted
        if want_probs:
            tiles.accumulate(block, start, stop, grad_rows, grad_columns)


def _row_softmax_rows(logits, row_stats, weighted, step, want_probs):
    """Fold rows ``logits`` (k, m) into their stats ``row_stats`` (k, 3); ``want_probs``: make them their softmax."""
    xp = backend.get_array_module(logits)
    rows, width = logits.shape
    exps_all = xp.empty((min(step, rows), width), dtype=logits.dtype)
    row_lse = RunningLSE(xp, rows, logits.dtype, weighted, stats=row_stats.T)
    for lo, hi in _chunks(rows, step):
        chunk, exps = logits[lo:hi], exps_all[:hi - lo]
        row_lse.update(chunk, 1, exps, slice(lo, hi))                            # exps = e^(l − max)
        if want_probs:
            xp.divide(exps, row_stats[lo:hi, 1:2], out=chunk)                    # the rows are whole: e^(l − max)/s


def diagonal_of(block, offset):
    """block[k, offset + k] for every row k of a C-contiguous (n, m) block, as a writeable view: (n,).

    A tile of rows start .. stop−1 holds its pairs' logits l_ii at offset ``start``.
    """
    rows, columns = block.shape
    return block.reshape(-1)[offset:offset + (rows - 1) * (columns + 1) + 1:columns + 1]


def siglip_sweep(tiles, grad_images=None, grad_texts=None, keep=None, positives=False):
    """Score every pair of the current block; return (Σ −log σ(z·l), Σ σ(l)) over the counted pairs.

    Pairs are negatives (z = −1, the term softplus(l)), except, with
    ``positives`` (the current texts are the rows' own), the diagonal
    (z = +1, the term softplus(−l) = softplus(l) − l). With gradient buffers,
    also adds σ(l)·Y to grad_images and σ(l)ᵀ·X to grad_texts (the caller
    adds the positives' −I). ``keep(block, start)`` gives a tile's 0/1 mask
    of counted pairs (negative masking); None counts every pair. Every term
    summed is ≥ 0, so the loss is too, in floating point as well. Sums are
    float64 0-d arrays, of the rows' sums in row order (the same at every
    thread count).
    """
    xp = tiles.xp
    want_sigma = grad_images is not None
    loss_sum = xp.zeros((), dtype=xp.float64)
    sigma_sum = xp.zeros((), dtype=xp.float64)
    loss_rows, sigma_rows = xp.empty((2, tiles.tile), dtype=tiles.work)
    # the mask is chosen from the finished logits; without one the chunks add the shift, in cache
    shift = 0.0 if keep is not None else tiles.shift
    score = functools.partial(siglip_terms, shift=shift, step=tiles.chunk_rows(), want_sigma=want_sigma)
    for start, stop in tiles.ranges():
        n = stop - start
        block = tiles.compute(start, stop, shifted=keep is not None)                 # (n, m)
        mask = None if keep is None else keep(block, start).astype(tiles.work)       # (n, m) of 0 and 1
        positive_columns = xp.arange(start, stop) if positives else None             # row i's pair: column i
        parallel.map_rows(score, block, loss_rows[:n], sigma_rows[:n], positive_columns, mask)
        loss_sum += loss_rows[:n].sum(dtype=xp.float64)
        if want_sigma:
            sigma_sum += sigma_rows[:n].sum(dtype=xp.float64)
            tiles.accumulate(block, start, stop, grad_images, grad_texts)            # block holds σ(l)
    return loss_sum, sigma_sum


def siglip_terms(logits, loss_rows, sigma_rows, positive_columns=None, mask=None, shift=0.0, step=None,
                 want_sigma=True):
    """SigLIP's element-wise work on rows of logits, in place: each row's Σ −log σ(z·l) and Σ σ(l).

    The logits are l = ``logits`` + ``shift``, the shift (a number) added
    here. ``logits`` (k, m) become σ(l) (masked); ``loss_rows`` and ``sigma_rows``
    (k,) receive each row's sums of −log σ(z_ij l_ij) and of σ(l_ij) over
    its counted pairs (``sigma_rows`` only when ``want_sigma``).
    ``positive_columns`` (k,), or None when every pair is a negative: the
    column of each row's positive. ``mask`` (k, m) of 0 and 1, or None.
    ``step`` rows are done at a time (default all). Every term is ≥ 0.

    The stable forms (docs/losses.md, section 4), from e = exp(−|l|) ∈ (0, 1]:
    softplus(l) = max(l, 0) + log1p(e), σ(|l|) = 1/(1 + e), σ(−|l|) = e/(1 + e).
    """
    xp = backend.get_array_module(logits)
    rows, width = logits.shape
    step = rows if step is None else min(step, rows)
    e_all, w_all, twice_all, lost_all, upper_all = xp.empty((5, step, width), dtype=logits.dtype)
    # Each line below is one pass over the chunk, and they are chosen by cost: transcendental ufuncs
    # (exp, log) cost ~2-3 ns a logit on one core, simple ones ~0.2 ns; a masked copy (copyto's
    # where=) ~6 ns and a maximum against the scalar 0 ~0.8 ns are avoided (NumPy 2.4, AVX2).
    for lo, hi in _chunks(rows, step):
        k = hi - lo
        l = logits[lo:hi]
        e, w, twice, lost, upper = e_all[:k], w_all[:k], twice_all[:k], lost_all[:k], upper_all[:k]
        if shift:
            l += shift
        xp.abs(l, out=e)
        # every pair as if negative: −log σ(−l) = softplus(l) = max(l, 0) + log1p(e); l + |l| = 2·max(l, 0)
        # exactly (either 2l or 0), and halving the row's sum is exact too
        xp.add(l, e, out=twice)
        if positive_columns is not None:
            # a positive's term is softplus(−l) = max(−l, 0) + log1p(e), and (l + |l|) − 2l = |l| − l
            # = 2·max(−l, 0) is exact (either 0 or −2l), so the term cannot go below 0 through rounding
            diagonal = (xp.arange(k), positive_columns[lo:hi])
            twice[diagonal] -= 2 * l[diagonal]
        xp.greater_equal(l, 0, out=upper)                # 1 where l ≥ 0, else 0: which form σ(l) takes
        xp.exp(xp.negative(e, out=e), out=e)             # e = exp(−|l|) ∈ (0, 1]: never overflows
        xp.add(e, 1, out=w)                              # w = 1 + e, rounded
        xp.divide(1, w, out=l)                           # σ(|l|) = 1/w; the logits are not needed any more
        # log1p(e) from log: NumPy's log1p is a scalar loop, several times the cost of its vectorised log,
        # and log w alone loses e's digits when e is small (all of them for e < 2⁻²⁴, in float32). With
        # w − 1 exact (Sterbenz), 1 + e = w + δ, δ = e − (w − 1) the part of e that rounding dropped, so
        # log1p(e) = log w + log(1 + δ/w) = log w + δ/w, to within (δ/w)²/2 ≤ 2⁻⁴⁹ (float32): accurate to
        # a unit or two in the last place, and exactly e when w = 1.
        xp.subtract(w, 1, out=lost)
        lost -= e                                        # −δ
        xp.log(w, out=w)
        if mask is None:
            loss_rows[lo:hi] = twice.sum(axis=1) / 2 + w.sum(axis=1) - xp.einsum("ij,ij->i", lost, l)
        else:
            twice /= 2
            twice += w
            lost *= l
            twice -= lost                                # softplus(l), or softplus(−l) for a positive
            loss_rows[lo:hi] = xp.einsum("ij,ij->i", twice, mask[lo:hi])
        if want_sigma:
            # σ(l) = σ(|l|)·e^min(l, 0): the factor is 1 where l ≥ 0 and e where l < 0, which is max(e, upper)
            l *= xp.maximum(e, upper, out=e)
            if mask is not None:
                l *= mask[lo:hi]
            sigma_rows[lo:hi] = l.sum(axis=1)
