"""Tests for tinyclip.tiles, the tile engine both losses share, through its public interface.

The losses' own tests (test_losses.py, test_distributed.py) hold the sweeps
against references and finite differences; here are the pieces: the tiled
logits equal t·X·Yᵀ + b, the running log-sum-exp of logits in any pieces
(folded in tile by tile, or merged from another process's stats) equals the
log-sum-exp of all of them and is never below any of them, and a tile's
diagonal is the pairs' own logits.
"""

import itertools
import math

import numpy
import pytest
from hypothesis import given, strategies as st

from tinyclip import Tensor, backend, distributed, losses, tiles

from .strategies import normal, seeds


def host(array):
    return backend.to_numpy(array)


@given(seed=seeds, rows=st.integers(1, 9), columns=st.integers(1, 9), tile=st.integers(1, 10),
       log_scale=st.floats(-2.0, 4.0), shift=st.floats(-5.0, 5.0))
def test_tiled_logits_are_the_scaled_products_plus_the_shift(xp, seed, rows, columns, tile, log_scale, shift):
    x, y = normal(seed, (rows, 3)), normal(seed + 1, (columns, 3))
    logits = tiles.TiledLogits(xp.asarray(x), xp.asarray(y), log_scale, shift, tile)
    expected = math.exp(log_scale) * x @ y.T + shift
    for start, stop in logits.ranges():
        numpy.testing.assert_allclose(host(logits.compute(start, stop)), expected[start:stop], rtol=1e-12,
                                      atol=1e-12)
    assert [start for start, _ in logits.ranges(reverse=True)] == list(reversed(range(0, rows, min(tile, rows))))


@given(seed=seeds, rows=st.integers(1, 6), columns=st.integers(1, 9), cuts=st.lists(st.integers(1, 8), max_size=3),
       scale=st.floats(0.1, 100.0))
def test_running_log_sum_exp_of_pieces_equals_that_of_the_whole(xp, seed, rows, columns, cuts, scale):
    logits = normal(seed, (rows, columns), scale=scale)
    whole = numpy.log(numpy.exp(logits - logits.max(axis=1, keepdims=True)).sum(axis=1)) + logits.max(axis=1)
    bounds = sorted({0, columns, *[c for c in cuts if c < columns]})
    folded = tiles.RunningLSE(xp, rows, numpy.float64, weighted=True)
    merged = tiles.RunningLSE(xp, rows, numpy.float64, weighted=True)
    for start, stop in zip(bounds[:-1], bounds[1:]):
        piece = xp.asarray(logits[:, start:stop])
        folded.update(piece, 1, xp.empty_like(piece))
        alone = tiles.RunningLSE(xp, rows, numpy.float64, weighted=True)     # another process's stats
        alone.update(piece, 1, xp.empty_like(piece))
        merged.merge(alone.stats)
    softmax = numpy.exp(logits - whole[:, None])
    for stats in (folded, merged):
        numpy.testing.assert_allclose(host(stats.lse()), whole, rtol=1e-12, atol=1e-12)
        numpy.testing.assert_allclose(host(stats.mean_logit()), (softmax * logits).sum(axis=1), rtol=1e-9,
                                      atol=1e-9 * scale)
        assert (host(stats.lse()) >= logits.max(axis=1)).all()     # the largest logit adds exactly e⁰ = 1


@given(seed=seeds, rows=st.integers(1, 6), extra=st.integers(0, 5))
def test_diagonal_of_a_tile_is_a_writeable_view_of_the_pairs_logits(xp, seed, rows, extra):
    block = xp.asarray(normal(seed, (rows, rows + extra)))
    offset = extra
    diagonal = tiles.diagonal_of(block, offset)
    numpy.testing.assert_array_equal(host(diagonal), host(block)[numpy.arange(rows), offset + numpy.arange(rows)])
    diagonal[...] = 7.0
    assert (host(block)[numpy.arange(rows), offset + numpy.arange(rows)] == 7.0).all()


@pytest.mark.parametrize("name", ["log_scale", "bias"])
def test_a_missing_scalar_is_an_error_that_names_it(name):
    with pytest.raises(ValueError, match=f"^{name} is None"):
        tiles.check_scalar(name, None)


def test_default_tile_never_exceeds_the_batch_and_refuses_a_bad_tile():
    assert tiles.default_tile(10) == 10 and tiles.default_tile(1 << 13) == 1 << 11
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="tile must be a positive integer"):
            tiles.resolve_tile(bad, 10, numpy.zeros((2, 2)))


# ---------------------------------------------------------------------------------
# The sweeps' element-wise work: its stable forms, its chunks and its threads
# ---------------------------------------------------------------------------------

# logits from deep in either tail to 0: e = exp(−|l|) runs from 1 down past float32's smallest
# normal number, through the range where log(1 + e) alone would lose e's digits (|l| ≳ 9) or all
# of them (|l| > 16.6)
SIGLIP_LOGITS = numpy.concatenate([numpy.linspace(-87.0, 87.0, 2001), [-17.0, -16.0, -1e-6, 0.0, 1e-6, 16.0, 17.0]])


def test_siglip_terms_are_softplus_and_sigmoid_to_a_few_units_in_the_last_place(xp):
    logits32 = SIGLIP_LOGITS.astype(numpy.float32)
    exact = logits32.astype(numpy.float64)                  # the float32 values, in float64
    softplus = numpy.logaddexp(0.0, exact)                  # −log σ(−l)
    sigmoid = numpy.exp(-numpy.logaddexp(0.0, -exact))      # σ(l)
    # one logit per row: each row's sum is that logit's own term
    logits = xp.asarray(logits32[:, None].copy())
    loss_rows, sigma_rows = xp.empty((2, logits.shape[0]), dtype=numpy.float32)
    tiles.siglip_terms(logits, loss_rows, sigma_rows, step=7)
    unit = float(numpy.finfo(numpy.float32).eps)
    numpy.testing.assert_allclose(host(loss_rows), softplus, rtol=3 * unit, atol=0)
    numpy.testing.assert_allclose(host(sigma_rows), sigmoid, rtol=3 * unit, atol=0)
    numpy.testing.assert_array_equal(host(logits)[:, 0], host(sigma_rows))     # the logits became σ(l)
    # a positive scores softplus(−l), ≥ 0 however it rounds
    logits = xp.asarray(logits32[:, None].copy())
    tiles.siglip_terms(logits, loss_rows, sigma_rows, positive_columns=xp.zeros(logits.shape[0], dtype=int))
    numpy.testing.assert_allclose(host(loss_rows), numpy.logaddexp(0.0, -exact), rtol=3 * unit, atol=0)
    assert (host(loss_rows) >= 0).all()


def on_threads(threads, fn):
    """fn() with chunks of a few logits and every map_rows call on ``threads`` threads: small tests take every path."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(tiles.CHUNK_ELEMENTS, "numpy", 5)
        patch.setattr(tiles.parallel, "MIN_PARALLEL_SIZE", 1)
        patch.setenv(tiles.parallel.THREADS_ENV, str(threads))
        return fn()


def _loss_and_grads(loss, arrays):
    inputs = [Tensor(array, requires_grad=True) for array in arrays]
    value = loss(*inputs)
    value.backward()
    return [value.data] + [tensor.grad for tensor in inputs]


@given(seed=seeds, batch=st.integers(2, 11), tile=st.integers(1, 11), masked=st.booleans())
def test_siglip_is_the_same_bit_for_bit_at_every_thread_count(seed, batch, tile, masked):
    x, y = normal(seed, (batch, 3)), normal(seed + 1, (batch, 3))
    arrays = [x, y, numpy.asarray(1.5), numpy.asarray(-2.0)]
    options = {"keep_negatives": 0.5} if masked else {}
    results = [on_threads(threads, lambda: _loss_and_grads(
        lambda *t: losses.siglip_loss(*t, tile=tile, **options), arrays)) for threads in (1, 2, 3)]
    for other in results[1:]:
        for got, expected in zip(other, results[0]):
            numpy.testing.assert_array_equal(got, expected)
    reference = losses.siglip_loss_reference(x, y, 1.5, -2.0, mask=losses.siglip_negative_mask(
        x, y, 1.5, -2.0, 0.5) if masked else None)
    numpy.testing.assert_allclose(results[0][0], reference.data, rtol=1e-12)


@given(seed=seeds, batch=st.integers(2, 11), tile=st.integers(1, 11), log_scale=st.sampled_from([2.0, 7.0]))
def test_clip_on_threads_is_deterministic_and_equals_the_reference(seed, batch, tile, log_scale):
    # at log_scale 7 the logits reach ~10³: a shift below a column's max would overflow exp in float64
    x, y = normal(seed, (batch, 3)), normal(seed + 1, (batch, 3))
    arrays = [x, y, numpy.asarray(log_scale)]
    reference = _loss_and_grads(losses.clip_loss_reference, arrays)
    fused = {"one process": lambda *t: losses.clip_loss(*t, tile=tile),
             # the all-gather method's two sides are softmaxes over whole rows (row_softmax_sweep)
             "gather": lambda *t: distributed.clip_loss(*t, comm=distributed.SingleProcess(), method="gather",
                                                        tile=tile)}
    for threads, loss in itertools.product((1, 2, 3), fused.values()):
        run = lambda: _loss_and_grads(loss, arrays)   # noqa: E731
        first, again = on_threads(threads, run), on_threads(threads, run)
        for got, repeated, expected in zip(first, again, reference):
            numpy.testing.assert_array_equal(got, repeated)        # column sums merge in row order
            numpy.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
