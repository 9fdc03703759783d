"""Tests for tinyclip.tiles, the tile engine both losses share, through its public interface.

The losses' own tests (test_losses.py, test_distributed.py) hold the sweeps
against references and finite differences; here are the pieces: the tiled
logits equal t·X·Yᵀ + b, the running log-sum-exp of logits in any pieces
(folded in tile by tile, or merged from another process's stats) equals the
log-sum-exp of all of them and is never below any of them, and a tile's
diagonal is the pairs' own logits.
"""

import math

import numpy
import pytest
from hypothesis import given, strategies as st

from tinyclip import backend, tiles

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
