"""Property tests for tinyclip.losses: the fused, tiled CLIP and SigLIP losses.

For both losses and every enabled backend: the fused loss and its four
gradients (image_emb, text_emb, log_scale and, for SigLIP, bias) equal the
from-primitives reference (float64, 1e-10 relative) and five-point finite
differences (tests/gradcheck.py), over random batch sizes (1 included),
dimensions, scales, biases and tile sizes. Then the invariants (joint
permutation of the pairs, CLIP's image/text symmetry, SigLIP's row-block
additivity, tile independence, log B at equal logits, float32 against
float64), finiteness at extreme inputs, the worked example of seed
004_9940221f14f73ab9 with its errors pinned, negative masking, and the
errors for bad input.

Tolerances are relative to the largest expected value, with a floor of
t + |b| (a bound on |logit| for unit vectors): a loss is a difference of
log-sum-exps of size t (lse − l_ii), so its rounding error scales with t
even when the loss itself is tiny.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy
import pytest
from hypothesis import assume, given, strategies as st

import tinyclip as tc
from tinyclip import backend, losses

from .gradcheck import check_gradients
from .strategies import normal, seeds

GRAD_NAMES = ("image_emb", "text_emb", "log_scale", "bias")


def unit_rows(seed, shape):
    """Rows of L2 norm 1 (float64): embeddings as the caller hands them to the losses."""
    rows = normal(seed, shape)
    return rows / numpy.linalg.norm(rows, axis=-1, keepdims=True)


def host(value):
    """A NumPy copy of a Tensor or array from either backend."""
    return backend.to_numpy(value.data if isinstance(value, tc.Tensor) else value)


def log_sigmoid(u):
    return numpy.minimum(u, 0) - numpy.log1p(numpy.exp(-numpy.abs(u)))


def sigmoid(u):
    return 1 / (1 + numpy.exp(-u))


@dataclass
class Problem:
    """One batch of pairs: float64 NumPy arrays, moved to a backend and dtype by ``arrays``."""
    image_emb: numpy.ndarray    # (B, D)
    text_emb: numpy.ndarray     # (B, D)
    log_scale: float
    bias: float

    @property
    def batch(self):
        return self.image_emb.shape[0]

    @property
    def logit_bound(self):
        """t + |b|: no logit of unit vectors is larger; the size rounding errors scale with."""
        return math.exp(self.log_scale) + abs(self.bias)

    def logits(self):
        """l = t·X·Yᵀ + b in float64 NumPy (B, B), for checks that look at single pairs."""
        return math.exp(self.log_scale) * self.image_emb @ self.text_emb.T + self.bias

    def arrays(self, xp, dtype="float64"):
        """(image_emb, text_emb, log_scale, bias) as arrays of ``dtype`` on ``xp``; the scalars 0-d."""
        return [xp.asarray(numpy.asarray(a, dtype=dtype))
                for a in (self.image_emb, self.text_emb, self.log_scale, self.bias)]


@st.composite
def problems(draw, min_batch=1, max_batch=6, min_dim=1, max_dim=5, max_scale=100.0):
    """Random unit-norm pairs; scale t = exp(log_scale) in [1, max_scale], bias in [−10, 10]."""
    batch, dim = draw(st.integers(min_batch, max_batch)), draw(st.integers(min_dim, max_dim))
    return Problem(unit_rows(draw(seeds), (batch, dim)), unit_rows(draw(seeds), (batch, dim)),
                   draw(st.floats(0.0, math.log(max_scale))), draw(st.floats(-10.0, 10.0)))


tiles = st.one_of(st.none(), st.integers(1, 8))


@dataclass
class Loss:
    """One of the two losses, called uniformly as fn(image_emb, text_emb, log_scale, bias, **options)."""
    name: str
    fused: Callable
    reference: Callable
    inputs: int          # how many of (image_emb, text_emb, log_scale, bias) it takes


LOSSES = [
    Loss("clip", lambda x, y, s, b, **options: losses.clip_loss(x, y, s, **options),
         lambda x, y, s, b: losses.clip_loss_reference(x, y, s), inputs=3),
    Loss("siglip", losses.siglip_loss, losses.siglip_loss_reference, inputs=4),
]
each_loss = pytest.mark.parametrize("loss", LOSSES, ids=[loss.name for loss in LOSSES])


def bound(fn, **options):
    """``fn`` with its keyword options fixed: called as bound(*tensors)."""
    return lambda *tensors: fn(*tensors, **options)


def evaluate(fn, inputs, arrays):
    """fn's value and the gradients of its first ``inputs`` arguments, as float64 NumPy arrays."""
    tensors = [tc.Tensor(a, requires_grad=True) for a in arrays]
    value = fn(*tensors)
    assert value.shape == ()
    value.backward()
    return host(value).astype(numpy.float64), [host(t.grad).astype(numpy.float64) for t in tensors[:inputs]]


def assert_close(got, expected, rtol, floor, what):
    """|got − expected| ≤ rtol·max(|expected|, floor), elementwise."""
    got, expected = numpy.asarray(got, dtype=numpy.float64), numpy.asarray(expected, dtype=numpy.float64)
    atol = rtol * max(float(numpy.abs(expected).max(initial=0.0)), floor)
    numpy.testing.assert_allclose(got, expected, rtol=rtol, atol=atol, err_msg=what)


def assert_same_results(got, expected, rtol, floor, where=""):
    """Two (value, gradients) results of ``evaluate`` agree."""
    assert_close(got[0], expected[0], rtol, floor, f"{where} loss")
    for name, got_grad, expected_grad in zip(GRAD_NAMES, got[1], expected[1]):
        assert got_grad.shape == expected_grad.shape, name
        assert_close(got_grad, expected_grad, rtol, floor, f"{where} gradient of {name}")


# ---------------------------------------------------------------------------------
# Fused == from primitives == finite differences
# ---------------------------------------------------------------------------------

@each_loss
@given(problem=problems(), tile=tiles)
def test_fused_equals_reference(loss, xp, problem, tile):
    arrays = problem.arrays(xp)
    fused = evaluate(bound(loss.fused, tile=tile), loss.inputs, arrays)
    reference = evaluate(loss.reference, loss.inputs, arrays)
    assert_same_results(fused, reference, 1e-10, problem.logit_bound)


@each_loss
@given(problem=problems(), tile=tiles, seed=seeds)
def test_fused_and_reference_equal_finite_differences(loss, xp, problem, tile, seed):
    arrays = problem.arrays(xp)[:loss.inputs]
    # at t = 100 the logits bend on the scale of the step: allow for the truncation error
    absent = (None,) * (4 - loss.inputs)     # CLIP takes no bias
    check_gradients(lambda *t: loss.fused(*t, *absent, tile=tile), arrays, seed=seed, truncation_allowance=True)
    check_gradients(lambda *t: loss.reference(*t, *absent), arrays, seed=seed, truncation_allowance=True)


# ---------------------------------------------------------------------------------
# Invariants
# ---------------------------------------------------------------------------------

@st.composite
def permutation_equivariant_options(draw, loss):
    """Options that do not tie the result to positions: no masking, or hard / easy (not random) masks."""
    if loss.name == "clip" or draw(st.booleans()):
        return {}
    return {"keep_negatives": draw(st.floats(0.0, 1.0)), "negatives": draw(st.sampled_from(["hard", "easy"]))}


@each_loss
@given(data=st.data())
def test_permuting_the_pairs_permutes_the_gradients(loss, xp, data):
    # D ≥ 2 so that no two logits of a row tie: a tie makes a hard / easy choice depend on position
    problem = data.draw(problems(min_dim=2))
    options = data.draw(permutation_equivariant_options(loss))
    order = numpy.random.default_rng(data.draw(seeds)).permutation(problem.batch)
    shuffled = Problem(problem.image_emb[order], problem.text_emb[order], problem.log_scale, problem.bias)
    value, grads = evaluate(bound(loss.fused, **options), loss.inputs, problem.arrays(xp))
    shuffled_value, shuffled_grads = evaluate(bound(loss.fused, **options), loss.inputs, shuffled.arrays(xp))
    expected = (value, [grads[0][order], grads[1][order]] + grads[2:])
    assert_same_results((shuffled_value, shuffled_grads), expected, 1e-12, problem.logit_bound)


@given(problem=problems(), tile=tiles)
def test_clip_is_symmetric_in_images_and_texts(xp, problem, tile):
    image, text, log_scale, _ = problem.arrays(xp)
    value, grads = evaluate(bound(losses.clip_loss, tile=tile), 3, [image, text, log_scale])
    swapped_value, swapped_grads = evaluate(bound(losses.clip_loss, tile=tile), 3, [text, image, log_scale])
    expected = (value, [grads[1], grads[0], grads[2]])
    assert_same_results((swapped_value, swapped_grads), expected, 1e-12, problem.logit_bound)


def siglip_row_block(problem, rows, xp, tile):
    """B × (the SigLIP loss of rows R of image_emb against every text), and its gradients, by the public API.

    siglip_loss takes a square batch with the positives on the diagonal, so
    rows R against all texts cannot be asked for directly. Instead the image
    rows outside R become zero vectors: their logits are all exactly b, so
    each adds the known −log σ(b) − (B−1)·log σ(−b) to B·L and
    −σ(−b) + (B−1)·σ(b) to B·∂L/∂b, and nothing to the gradients of
    text_emb and log_scale (l − b = 0 on those rows), all of which is taken off.
    Returns (B·L_R, [B·∂L_R/∂X on rows R, B·∂L_R/∂Y, B·∂L_R/∂t', B·∂L_R/∂b]).
    """
    batch, bias = problem.batch, problem.bias
    image = numpy.zeros_like(problem.image_emb)
    image[rows] = problem.image_emb[rows]
    arrays = Problem(image, problem.text_emb, problem.log_scale, bias).arrays(xp)
    value, grads = evaluate(bound(losses.siglip_loss, tile=tile), 4, arrays)
    others = batch - len(rows)
    zero_row_loss = -log_sigmoid(bias) - (batch - 1) * log_sigmoid(-bias)
    zero_row_bias_grad = -sigmoid(-bias) + (batch - 1) * sigmoid(bias)
    return (batch * value - others * zero_row_loss,
            [batch * grads[0][rows], batch * grads[1], batch * grads[2], batch * grads[3] - others * zero_row_bias_grad])


@given(problem=problems(min_batch=2, max_batch=8), blocks=st.integers(2, 4), seed=seeds, tile=tiles)
def test_siglip_splits_into_the_sum_of_its_row_blocks(xp, problem, blocks, seed, tile):
    batch = problem.batch
    owner = numpy.random.default_rng(seed).integers(0, blocks, size=batch)   # any partition of the rows
    value, grads = evaluate(bound(losses.siglip_loss, tile=tile), 4, problem.arrays(xp))
    total_value, total_image_grad = 0.0, numpy.zeros_like(grads[0])
    total_rest = [numpy.zeros_like(g) for g in grads[1:]]
    for block in range(blocks):
        rows = numpy.flatnonzero(owner == block)
        if rows.size == 0:
            continue
        block_value, block_grads = siglip_row_block(problem, rows, xp, tile)
        # the same block from the reference, which takes a mask of the pairs that count
        row_mask = numpy.zeros((batch, batch), dtype=bool)
        row_mask[rows] = True
        reference = losses.siglip_loss_reference(*problem.arrays(xp), mask=xp.asarray(row_mask))
        assert_close(block_value, batch * host(reference), 1e-10, batch * problem.logit_bound, "block loss")
        total_value += block_value
        total_image_grad[rows] += block_grads[0]
        total_rest = [a + b for a, b in zip(total_rest, block_grads[1:])]
    assert_close(total_value, batch * value, 1e-10, batch * problem.logit_bound, "sum of the blocks' losses")
    for name, got, expected in zip(GRAD_NAMES, [total_image_grad] + total_rest, grads):
        assert_close(got, batch * expected, 1e-10, batch * problem.logit_bound, f"sum of the blocks' {name} gradients")


@each_loss
@given(problem=problems(max_batch=7), masked=st.booleans())
def test_results_do_not_depend_on_the_tile(loss, xp, problem, masked):
    batch = problem.batch
    options = ({"keep_negatives": 0.5, "negatives": "random", "mask_seed": 7}
               if masked and loss.name == "siglip" else {})
    arrays = problem.arrays(xp)
    results = {tile: evaluate(bound(loss.fused, tile=tile, **options), loss.inputs, arrays)
               for tile in (None, 1, 2, 3, batch, batch + 3)}
    for tile, result in results.items():
        assert_same_results(result, results[None], 1e-12, problem.logit_bound, f"tile {tile}:")


@pytest.mark.parametrize("batch", [1, 2, 5, 37])
def test_default_tile_is_a_whole_number_of_rows(batch):
    tile = losses.default_tile(batch)
    assert isinstance(tile, int) and 1 <= tile <= batch


@given(problem=problems(), tile=tiles)
def test_clip_loss_is_log_batch_when_all_logits_are_equal(xp, problem, tile):
    batch = problem.batch
    image, text, _, _ = problem.arrays(xp)
    # a vanishing scale: every logit is 0 to within 1e-26
    tiny_scale = losses.clip_loss(image, text, xp.asarray(-60.0), tile=tile)
    assert_close(host(tiny_scale), math.log(batch), 1e-12, 1.0, "loss at t = e^-60")
    # one embedding for every image and text: every logit is t, the softmaxes uniform, the gradients 0
    same = xp.broadcast_to(image[:1], image.shape).copy()
    value, grads = evaluate(bound(losses.clip_loss, tile=tile), 3, [same, same.copy(), xp.asarray(problem.log_scale)])
    assert_close(value, math.log(batch), 1e-12, problem.logit_bound, "loss of identical embeddings")
    for name, grad in zip(GRAD_NAMES, grads):
        assert_close(grad, 0.0, 1e-12, problem.logit_bound, f"gradient of {name}")


@each_loss
@given(problem=problems(), tile=tiles)
def test_float32_agrees_with_float64(loss, xp, problem, tile):
    wide = evaluate(bound(loss.fused, tile=tile), loss.inputs, problem.arrays(xp, "float64"))
    narrow_arrays = problem.arrays(xp, "float32")
    assert loss.fused(*narrow_arrays, tile=tile).dtype == numpy.float32
    narrow = evaluate(bound(loss.fused, tile=tile), loss.inputs, narrow_arrays)
    # float32 rounds the logits by ~1e-7·(t + |b|): the floor of the tolerance scales with it
    assert_same_results(narrow, wide, 1e-5, problem.logit_bound)


# ---------------------------------------------------------------------------------
# Numerics: finite at extreme scales, biases and embeddings, in every float type
# ---------------------------------------------------------------------------------

def extreme_embeddings(kind, batch=4, dim=8):
    image = unit_rows(0, (batch, dim))
    if kind == "identical":      # X == Y, every row the same: all logits tie at t + b
        image = numpy.broadcast_to(image[:1], image.shape).copy()
        return image, image.copy()
    if kind == "opposite":       # Y = −X: every positive as wrong as it can be
        return image, -image
    return image, unit_rows(1, (batch, dim))


EXTREME_OPTIONS = {"clip": [{}],
                   "siglip": [{}, {"keep_negatives": 0.5, "negatives": "hard"}, {"keep_negatives": 0.5, "negatives": "easy"},
                              {"keep_negatives": 0.5, "negatives": "random"}]}


@each_loss
@pytest.mark.parametrize("embeddings", ["random", "identical", "opposite"])
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_loss_and_gradients_stay_finite_at_extremes(loss, xp, embeddings, dtype):
    image, text = extreme_embeddings(embeddings)
    for scale in (1.0, 100.0, 1e4):
        for bias in (-50.0, 0.0, 50.0):
            problem = Problem(image, text, math.log(scale), bias)
            for options in EXTREME_OPTIONS[loss.name]:
                arrays = problem.arrays(xp, dtype)
                tensors = [tc.Tensor(a, requires_grad=True) for a in arrays]
                value = loss.fused(*tensors, **options)
                value.backward()
                where = f"t={scale}, b={bias}, {options}"
                # float16 is computed in float32, and the loss (a sum of B² terms) stays float32
                assert value.dtype == numpy.dtype("float32" if dtype == "float16" else dtype), where
                assert bool(xp.isfinite(value.data)), f"loss {host(value)} at {where}"
                for name, tensor in zip(GRAD_NAMES, tensors[:loss.inputs]):
                    assert tensor.grad.dtype == numpy.dtype(dtype), f"{name} at {where}"
                    assert bool(xp.isfinite(tensor.grad).all()), f"gradient of {name} at {where}"
                if dtype == "float64":    # and still right: the reference is stable too
                    fused = evaluate(bound(loss.fused, **options), loss.inputs, arrays)
                    reference_fn = (loss.reference if not options else
                                    bound(loss.reference, mask=losses.siglip_negative_mask(
                                        *arrays, options["keep_negatives"], options["negatives"])))
                    reference = evaluate(reference_fn, loss.inputs, arrays)
                    assert_same_results(fused, reference, 1e-10, problem.logit_bound, where)


@each_loss
def test_float16_embeddings_give_a_finite_loss_beyond_the_float16_range(loss, xp):
    # identical embeddings at t = 1e4, b = 50: every SigLIP negative costs ~1e4, so the loss is
    # (B − 1)·(t + b) ≈ 1.5e5 > 65504, the largest float16; log_scale and bias stay float32
    # parameters, as in mixed precision. CLIP's loss here is log B; it is checked alongside.
    image, text = extreme_embeddings("identical", batch=16)
    problem = Problem(image, text, math.log(1e4), 50.0)
    arrays = problem.arrays(xp, "float16")[:2] + problem.arrays(xp, "float32")[2:]
    tensors = [tc.Tensor(a, requires_grad=True) for a in arrays]
    value = loss.fused(*tensors)
    value.backward()
    assert bool(xp.isfinite(value.data)), f"loss {host(value)} ({value.dtype}) for float16 embeddings"
    for name, tensor in zip(GRAD_NAMES, tensors[:loss.inputs]):
        assert bool(xp.isfinite(tensor.grad).all()), f"gradient of {name}"


# ---------------------------------------------------------------------------------
# The worked example of seed 004_9940221f14f73ab9: three pairs, τ = 0.07
# ---------------------------------------------------------------------------------

SEED_IMAGES = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
# not unit length (norms 0.906, 0.812, 0.762): the seed says "assume they are"; the losses
# take embeddings as they come, so they are used as given
SEED_TEXTS = [[0.9, 0.1, 0.0], [0.1, 0.8, 0.1], [0.0, 0.3, 0.7]]
SEED_TAU = 0.07
SEED_LOGITS = [[12.857, 1.4286, 0.0], [1.4286, 11.4286, 4.2857], [0.0, 1.4286, 10.0]]   # as printed
SEED_ROW_SUMS = [383523, 91987, 22031]                                                 # Σ_j e^{l_ij}, as printed
SEED_SOFTMAX = [[0.9999, 0, 0], [0, 0.9992, 0.0008], [0, 0.0002, 0.9998]]              # as printed
SEED_PAIR_LOGS = [-0.0000, -0.0004, -0.0001]      # printed as "L_{I_i→T_i} = log(p_ii)"
SEED_IMAGE_TO_TEXT = 0.00016                      # printed as L_{I→T}

# The exact values (float64, from the formulas; checked by the hand computation below).
IMAGE_TO_TEXT = 3.6128092043933674e-4       # 1/3 Σ_i −ln p_ii over rows; the seed printed 0.00016
TEXT_TO_IMAGE = 1.1475368296819017e-3       # 1/3 Σ_j −ln p_jj over columns; the seed gives none
CLIP_LOSS = 7.544088750606193e-4            # (I→T + T→I)/2; the seed gives none
SIGLIP_LOSS_BIAS_MINUS_10 = 0.3225910527723952   # −1/3 Σ_ij log σ(z_ij (l_ij − 10)); not in the seed


def seed_logits_by_hand():
    return [[sum(i * t for i, t in zip(image, text)) / SEED_TAU for text in SEED_TEXTS] for image in SEED_IMAGES]


def test_seed_logit_matrix_is_reproduced():
    logits = seed_logits_by_hand()
    for row, printed_row in zip(logits, SEED_LOGITS):
        for value, printed in zip(row, printed_row):
            assert abs(value - printed) <= 5e-4, (value, printed)   # the seed prints 4 decimals or 5 figures
    assert logits[0][0] == pytest.approx(0.9 / 0.07, rel=1e-15)


def test_seed_clip_loss_by_hand_and_by_the_fused_loss(xp):
    logits = seed_logits_by_hand()
    columns = [list(column) for column in zip(*logits)]

    def lse(values):
        top = max(values)
        return top + math.log(sum(math.exp(v - top) for v in values))

    rows_nll = [lse(row) - row[i] for i, row in enumerate(logits)]            # −ln p_ii, row softmax
    columns_nll = [lse(column) - column[j] for j, column in enumerate(columns)]
    assert sum(rows_nll) / 3 == pytest.approx(IMAGE_TO_TEXT, rel=1e-12)
    assert sum(columns_nll) / 3 == pytest.approx(TEXT_TO_IMAGE, rel=1e-12)
    assert (sum(rows_nll) + sum(columns_nll)) / 6 == pytest.approx(CLIP_LOSS, rel=1e-12)

    # the seed's intermediate figures: row sums truncated (383523.56, 91987.41, 22031.64)
    for row, printed in zip(logits, SEED_ROW_SUMS):
        assert 0 <= sum(math.exp(v) for v in row) - printed < 1
    # the softmax to its 4 decimals; p_11 = 0.999987 is printed truncated as 0.9999 (it rounds to 1.0000)
    for i, row in enumerate(logits):
        for j, value in enumerate(row):
            p = math.exp(value - lse(row))
            assert abs(p - SEED_SOFTMAX[i][j]) <= (1e-4 if (i, j) == (0, 0) else 5e-5), (i, j, p)
    # The seed's per-pair figures and its L_{I→T} are base-10 logarithms: log10 p_ii =
    # (−0.0000059, −0.00036, −0.00010) rounds to its (−0.0000, −0.0004, −0.0001), and their mean
    # 0.000157 to its 0.00016. The loss is −ln p_ii = (1.35e-5, 8.36e-4, 2.35e-4) (positive; ln 0.9992
    # alone is −8.0e-4, not −0.0004), so L_{I→T} = 0.000361: the seed's is ln 10 = 2.3 times too small.
    for nll, printed in zip(rows_nll, SEED_PAIR_LOGS):
        assert abs(-nll / math.log(10) - printed) <= 5e-5
    assert abs(IMAGE_TO_TEXT / math.log(10) - SEED_IMAGE_TO_TEXT) <= 5e-6
    assert abs(IMAGE_TO_TEXT - SEED_IMAGE_TO_TEXT) > 1e-4

    images, texts = xp.asarray(SEED_IMAGES), xp.asarray(SEED_TEXTS)
    log_scale = xp.asarray(-math.log(SEED_TAU))                    # t = 1/τ
    for tile in (None, 1, 2):
        fused = float(host(losses.clip_loss(images, texts, log_scale, tile=tile)))
        assert fused == pytest.approx(CLIP_LOSS, rel=1e-10), tile
    reference = float(host(losses.clip_loss_reference(images, texts, log_scale)))
    assert reference == pytest.approx(CLIP_LOSS, rel=1e-10)


def test_seed_siglip_loss_by_hand_and_by_the_fused_loss(xp):
    logits = seed_logits_by_hand()
    by_hand = -sum(min(u, 0) - math.log1p(math.exp(-abs(u)))
                   for u in ((1 if i == j else -1) * (logits[i][j] - 10.0) for i in range(3) for j in range(3))) / 3
    assert by_hand == pytest.approx(SIGLIP_LOSS_BIAS_MINUS_10, rel=1e-13)
    images, texts = xp.asarray(SEED_IMAGES), xp.asarray(SEED_TEXTS)
    log_scale, bias = xp.asarray(-math.log(SEED_TAU)), xp.asarray(-10.0)
    for tile in (None, 1, 2):
        fused = float(host(losses.siglip_loss(images, texts, log_scale, bias, tile=tile)))
        assert fused == pytest.approx(SIGLIP_LOSS_BIAS_MINUS_10, rel=1e-12), tile


# ---------------------------------------------------------------------------------
# Negative masking (the SigLIP paper's ablation)
# ---------------------------------------------------------------------------------

negative_choices = st.sampled_from(["random", "hard", "easy"])


@given(problem=problems(max_batch=9), keep=st.floats(0.0, 1.0), negatives=negative_choices,
       mask_seed=seeds, identical=st.booleans())
def test_mask_keeps_every_positive_and_exactly_k_negatives_per_row(xp, problem, keep, negatives, mask_seed,
                                                                  identical):
    batch = problem.batch
    if identical:     # all logits tie: the count must still be exact
        problem.text_emb = problem.image_emb = numpy.broadcast_to(problem.image_emb[:1], problem.image_emb.shape)
    mask = losses.siglip_negative_mask(*problem.arrays(xp), keep, negatives, mask_seed=mask_seed)
    assert backend.get_array_module(mask) is xp
    assert mask.dtype == numpy.bool_ and mask.shape == (batch, batch)
    mask = host(mask)
    assert mask.diagonal().all(), "a positive was dropped"
    kept_negatives = mask.sum(axis=1) - 1
    numpy.testing.assert_array_equal(kept_negatives, round(keep * (batch - 1)))


@given(problem=problems(min_batch=2, max_batch=9, min_dim=2), keep=st.floats(0.0, 1.0), hard=st.booleans())
def test_hard_keeps_the_highest_logits_and_easy_the_lowest(xp, problem, keep, hard):
    batch = problem.batch
    count = round(keep * (batch - 1))
    mask = host(losses.siglip_negative_mask(*problem.arrays(xp), keep, "hard" if hard else "easy"))
    logits = problem.logits()
    for row in range(batch):
        others = numpy.delete(numpy.arange(batch), row)                 # the negatives' columns
        ranked = others[numpy.argsort(-logits[row, others] if hard else logits[row, others], kind="stable")]
        if 0 < count < batch - 1:    # a near-tie at the cut would make either choice right
            assume(abs(logits[row, ranked[count - 1]] - logits[row, ranked[count]]) > 1e-9)
        assert set(numpy.flatnonzero(mask[row] & (numpy.arange(batch) != row))) == set(ranked[:count]), row
        # highest logit = highest loss: −log σ(−l) grows with l
        negative_loss = -log_sigmoid(-logits[row])
        kept, dropped = mask[row] & (numpy.arange(batch) != row), ~mask[row]
        if kept.any() and dropped.any():
            if hard:
                assert negative_loss[kept].min() >= negative_loss[dropped].max()
            else:
                assert negative_loss[kept].max() <= negative_loss[dropped].min()


def test_random_mask_is_fixed_by_its_seed_and_not_by_the_tile(xp):
    problem = Problem(unit_rows(0, (16, 4)), unit_rows(1, (16, 4)), math.log(10.0), -2.0)
    arrays = problem.arrays(xp)
    masks = [host(losses.siglip_negative_mask(*arrays, 0.5, "random", mask_seed=seed)) for seed in range(4)]
    numpy.testing.assert_array_equal(host(losses.siglip_negative_mask(*arrays, 0.5, "random", mask_seed=0)), masks[0])
    for a in range(4):
        for b in range(a + 1, 4):
            assert (masks[a] != masks[b]).any(), f"mask seeds {a} and {b} give the same mask"
    for seed in (0, 3):
        expected = evaluate(bound(losses.siglip_loss_reference, mask=xp.asarray(masks[seed])), 4, arrays)
        for tile in (None, 1, 3, 5, 16, 40):
            got = evaluate(bound(losses.siglip_loss, tile=tile, keep_negatives=0.5, negatives="random",
                                 mask_seed=seed), 4, arrays)
            assert_same_results(got, expected, 1e-10, problem.logit_bound, f"mask seed {seed}, tile {tile}:")


@given(problem=problems(max_batch=8), keep=st.floats(0.0, 1.0), negatives=negative_choices, mask_seed=seeds,
       tile=tiles)
def test_masked_loss_equals_the_reference_with_the_same_mask(xp, problem, keep, negatives, mask_seed, tile):
    arrays = problem.arrays(xp)
    options = {"keep_negatives": keep, "negatives": negatives, "mask_seed": mask_seed}
    mask = losses.siglip_negative_mask(*arrays, keep, negatives, mask_seed=mask_seed)
    fused = evaluate(bound(losses.siglip_loss, tile=tile, **options), 4, arrays)
    reference = evaluate(bound(losses.siglip_loss_reference, mask=mask), 4, arrays)
    assert_same_results(fused, reference, 1e-10, problem.logit_bound)


@given(problem=problems(max_batch=8), keep=st.floats(0.0, 1.0), mask_seed=seeds, tile=tiles, seed=seeds)
def test_randomly_masked_loss_equals_finite_differences(xp, problem, keep, mask_seed, tile, seed):
    # a random mask does not move with the logits; a hard or easy one is piecewise constant in them
    check_gradients(bound(losses.siglip_loss, tile=tile, keep_negatives=keep, mask_seed=mask_seed),
                    problem.arrays(xp), seed=seed, truncation_allowance=True)


@given(problem=problems(max_batch=8), negatives=negative_choices, tile=tiles)
def test_keeping_every_negative_is_the_unmasked_loss(xp, problem, negatives, tile):
    arrays = problem.arrays(xp)
    assert bool(losses.siglip_negative_mask(*arrays, 1.0, negatives).all())
    plain = evaluate(bound(losses.siglip_loss, tile=tile), 4, arrays)
    kept = evaluate(bound(losses.siglip_loss, tile=tile, keep_negatives=1.0, negatives=negatives), 4, arrays)
    assert_same_results(kept, plain, 0.0, 0.0)


@given(problem=problems(max_batch=8), negatives=negative_choices, tile=tiles)
def test_keeping_no_negative_leaves_the_positives_divided_by_b(xp, problem, negatives, tile):
    value = host(losses.siglip_loss(*problem.arrays(xp), tile=tile, keep_negatives=0.0, negatives=negatives))
    expected = -log_sigmoid(problem.logits().diagonal()).sum() / problem.batch
    assert_close(value, expected, 1e-12, problem.logit_bound, "loss of the positives alone")


# ---------------------------------------------------------------------------------
# What the losses accept
# ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_log_scale_and_bias_may_be_numbers_arrays_or_tensors(xp, dtype):
    # a number is taken at the precision the loss computes in, never rounded to float16 first:
    # near log 20, float16 steps by 0.002, which would move the scale by 0.2%
    problem = Problem(unit_rows(0, (5, 3)), unit_rows(1, (5, 3)), math.log(20.0), -3.3)
    image, text, _, _ = problem.arrays(xp, dtype)
    _, _, log_scale, bias = problem.arrays(xp, "float64")
    clip = float(host(losses.clip_loss(image, text, log_scale)))
    siglip = float(host(losses.siglip_loss(image, text, log_scale, bias)))
    for scale_form in (problem.log_scale, numpy.float64(problem.log_scale), log_scale, tc.Tensor(log_scale)):
        where = f"log_scale as {type(scale_form).__name__}, {dtype} embeddings"
        assert float(host(losses.clip_loss(image, text, scale_form))) == pytest.approx(clip, rel=2e-6), where
        for bias_form in (problem.bias, bias, tc.Tensor(bias)):
            assert (float(host(losses.siglip_loss(image, text, scale_form, bias_form)))
                    == pytest.approx(siglip, rel=2e-6)), f"{where}, bias as {type(bias_form).__name__}"


@each_loss
@given(problem=problems(max_batch=8), negatives=negative_choices, keep=st.floats(0.0, 1.0), tile=tiles)
def test_float16_inputs_are_computed_as_their_float32_values(loss, xp, problem, negatives, keep, tile):
    options = {"keep_negatives": keep, "negatives": negatives} if loss.name == "siglip" else {}
    half = problem.arrays(xp, "float16")[:2] + problem.arrays(xp, "float32")[2:]
    single = [a.astype("float32") for a in half]
    half_value, half_grads = evaluate(bound(loss.fused, tile=tile, **options), loss.inputs, half)
    single_value, single_grads = evaluate(bound(loss.fused, tile=tile, **options), loss.inputs, single)
    assert half_value == single_value
    for name, half_grad, single_grad in zip(GRAD_NAMES, half_grads, single_grads):
        expected = single_grad.astype("float16") if name in ("image_emb", "text_emb") else single_grad
        numpy.testing.assert_array_equal(half_grad, expected, err_msg=name)


@pytest.mark.parametrize("negatives", ["hard", "easy"])
def test_float16_mask_is_the_mask_the_loss_uses(xp, negatives):
    # the loss ranks float16 inputs by their float32 logits; so must the mask it is shown by.
    # Rounding the logits to float16 ties neighbours (steps of 0.06 near t = 100) and breaks the ties
    # differently: at B = 256 that happens in a few rows
    problem = Problem(unit_rows(0, (256, 32)), unit_rows(1, (256, 32)), math.log(100.0), -5.0)
    half = problem.arrays(xp, "float16")[:2] + problem.arrays(xp, "float32")[2:]
    single = [a.astype("float32") for a in half]
    for keep in (0.1, 0.3, 0.7):
        mask_half = host(losses.siglip_negative_mask(*half, keep, negatives))
        mask_single = host(losses.siglip_negative_mask(*single, keep, negatives))
        differ = int((mask_half != mask_single).sum())
        assert differ == 0, f"keep {keep}: {differ} pairs differ between float16 inputs and their float32 values"


def test_gradients_go_only_where_they_are_asked_for(xp):
    image, text, log_scale, bias = Problem(unit_rows(0, (4, 3)), unit_rows(1, (4, 3)), 1.0, 0.5).arrays(xp)
    wanted, constant = tc.Tensor(image, requires_grad=True), tc.Tensor(text)
    losses.siglip_loss(wanted, constant, log_scale, tc.Tensor(bias)).backward()
    assert wanted.grad is not None and wanted.grad.shape == (4, 3) and constant.grad is None
    assert not losses.clip_loss(image, text, log_scale).requires_grad


# ---------------------------------------------------------------------------------
# Bad input: a ValueError that names the argument, never a silent NaN
# ---------------------------------------------------------------------------------

GOOD = {"image_emb": unit_rows(0, (3, 4)), "text_emb": unit_rows(1, (3, 4)),
        "log_scale": numpy.asarray(1.0), "bias": numpy.asarray(-1.0)}


def with_nan(array, value=numpy.nan):
    array = array.copy()
    array.flat[-1] = value
    return array


BAD_INPUTS = [   # (id, replaced arguments, the name the message must hold)
    ("image-1d", {"image_emb": numpy.ones(4)}, "image_emb"),
    ("image-3d", {"image_emb": numpy.ones((3, 4, 1))}, "image_emb"),
    ("text-1d", {"text_emb": numpy.ones(4)}, "text_emb"),
    ("batch-mismatch", {"text_emb": unit_rows(1, (2, 4))}, "image_emb and text_emb"),
    ("dim-mismatch", {"text_emb": unit_rows(1, (3, 5))}, "image_emb and text_emb"),
    ("empty-batch", {"image_emb": numpy.ones((0, 4)), "text_emb": numpy.ones((0, 4))}, "image_emb"),
    ("empty-text-batch", {"text_emb": numpy.ones((0, 4))}, "text_emb"),
    ("log-scale-vector", {"log_scale": numpy.ones(2)}, "log_scale"),
    ("log-scale-matrix", {"log_scale": numpy.ones((2, 2))}, "log_scale"),
    ("bias-vector", {"bias": numpy.ones(3)}, "bias"),
    ("image-nan", {"image_emb": with_nan(GOOD["image_emb"])}, "image_emb"),
    ("text-inf", {"text_emb": with_nan(GOOD["text_emb"], numpy.inf)}, "text_emb"),
    ("log-scale-nan", {"log_scale": numpy.asarray(numpy.nan)}, "log_scale"),
    ("log-scale-inf-number", {"log_scale": math.inf}, "log_scale"),
    ("bias-inf", {"bias": numpy.asarray(-numpy.inf)}, "bias"),
    ("bias-nan-number", {"bias": math.nan}, "bias"),
    ("log-scale-overflows", {"log_scale": 800.0}, "log_scale"),
    ("log-scale-none", {"log_scale": None}, "log_scale is None"),
    ("bias-none", {"bias": None}, "bias is None"),
]


def call_with(fn, arguments, xp, tensors):
    def place(value):
        if not hasattr(value, "shape"):
            return value
        value = xp.asarray(value)
        return tc.Tensor(value, requires_grad=True) if tensors else value
    return fn(**{name: place(value) for name, value in arguments.items()})


@pytest.mark.parametrize("name,replaced,message", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
@pytest.mark.parametrize("tensors", [False, True], ids=["arrays", "tensors"])
def test_bad_input_is_a_value_error_naming_the_argument(xp, name, replaced, message, tensors):
    arguments = {**GOOD, **replaced}
    calls = [losses.siglip_loss,
             lambda **a: losses.siglip_negative_mask(**a, keep_negatives=0.5)]
    if "bias" not in replaced:
        calls.append(lambda bias, **a: losses.clip_loss(**a))
    for fn in calls:
        with pytest.raises(ValueError, match=message):
            call_with(fn, arguments, xp, tensors)


@pytest.mark.parametrize("options,message", [
    ({"keep_negatives": -0.1}, "keep_negatives"),
    ({"keep_negatives": 1.5}, "keep_negatives"),
    ({"keep_negatives": math.nan}, "keep_negatives"),
    ({"negatives": "medium"}, "negatives"),
    ({"tile": 0}, "tile"),
    ({"keep_negatives": None}, "keep_negatives"),
    ({"mask_seed": None}, "mask_seed"),
], ids=["keep-below-0", "keep-above-1", "keep-nan", "unknown-negatives", "tile-0", "keep-none", "seed-none"])
def test_bad_masking_or_tile_option_is_a_value_error_naming_it(xp, options, message):
    arguments = {name: xp.asarray(value) for name, value in GOOD.items()}
    with pytest.raises(ValueError, match=message):
        losses.siglip_loss(**arguments, **options)
    if "tile" in options:
        with pytest.raises(ValueError, match=message):
            losses.clip_loss(arguments["image_emb"], arguments["text_emb"], arguments["log_scale"], **options)
    else:
        with pytest.raises(ValueError, match=message):
            losses.siglip_negative_mask(**arguments, **{"keep_negatives": 0.5, **options})


# ---------------------------------------------------------------------------------
# Issue 12: a missing bias is an error naming it (fault 4); the loss is never below 0 (fault 5)
# ---------------------------------------------------------------------------------

def test_a_missing_bias_is_an_error_that_names_it_and_points_to_clip_loss(xp):
    image_emb, text_emb = (xp.asarray(unit_rows(seed, (3, 4))) for seed in (0, 1))
    with pytest.raises(ValueError, match=r"bias is None.*CLIP-family model has no bias.*use clip_loss"):
        losses.siglip_loss(image_emb, text_emb, math.log(10), None)


def test_siglip_loss_of_a_clip_model_names_the_missing_bias():
    from tinyclip.models import CLIP, preset
    config = preset("tiny")
    rng = numpy.random.default_rng(0)
    images = rng.normal(size=(2, config.image_size, config.image_size, 3)).astype(numpy.float32)
    tokens = rng.integers(1, config.vocab_size - 1, (2, config.context_length))
    tokens[:, -1] = config.eos_id
    outputs = CLIP(config, seed=0)(images, tokens)
    assert outputs[3] is None
    with pytest.raises(ValueError, match="bias is None"):
        losses.siglip_loss(*outputs)


matched_pairs = st.tuples(seeds, st.sampled_from([1, 2, 4, 8]), st.sampled_from([1, 2, 4]))


def matched(seed, batch, dim=512, dtype=numpy.float32):
    """``batch`` perfectly matched pairs: each text embedding equals its image embedding."""
    rows = unit_rows(seed, (batch, dim)).astype(dtype)
    return rows, rows.copy()


@given(case=matched_pairs)
def test_clip_loss_of_matched_pairs_is_never_below_zero_in_float32(xp, case):
    # lse_i is computed from the very l_ii it is compared with (the tile's diagonal), and the
    # differences are taken before the sums, so rounding can never push the loss below 0
    seed, batch, tile = case
    image_emb, text_emb = matched(seed, batch)
    for log_scale in (math.log(100), math.log(10), 0.0):
        value = float(host(losses.clip_loss(xp.asarray(image_emb), xp.asarray(text_emb), log_scale, tile=tile)))
        assert value >= 0.0, (value, log_scale)


@given(seed=seeds, dim=st.sampled_from([1, 3, 512]), log_scale=st.floats(-3.0, math.log(100)),
       dtype=st.sampled_from(["float32", "float64"]), perturb=st.booleans())
def test_clip_loss_of_a_batch_of_one_is_exactly_zero(xp, seed, dim, log_scale, dtype, perturb):
    image_emb = unit_rows(seed, (1, dim))
    text_emb = unit_rows(seed + 1, (1, dim)) if perturb else image_emb    # one pair: its own only candidate
    value = host(losses.clip_loss(xp.asarray(image_emb.astype(dtype)), xp.asarray(text_emb.astype(dtype)),
                                  log_scale))
    assert value == 0.0


@given(case=matched_pairs, bias=st.floats(-20.0, 20.0))
def test_siglip_loss_of_matched_pairs_is_never_below_zero_in_float32(xp, case, bias):
    seed, batch, tile = case
    image_emb, text_emb = matched(seed, batch)
    for log_scale in (math.log(100), math.log(10)):
        value = float(host(losses.siglip_loss(xp.asarray(image_emb), xp.asarray(text_emb), log_scale, bias,
                                              tile=tile)))
        assert value >= 0.0, (value, log_scale, bias)
