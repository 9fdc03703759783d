"""Hypothesis strategies for tinyclip's property tests.

Values are drawn from a seeded NumPy generator rather than element by
element: hypothesis explores shapes, axes, options and seeds (and shrinks
them), while the numbers stay well-conditioned — away from kinks and poles
where a finite difference would be meaningless. Shapes stay small so the
whole suite runs in minutes on two cores.
"""

import numpy
from hypothesis import strategies as st

seeds = st.integers(min_value=0, max_value=2**32 - 1)


@st.composite
def shapes(draw, min_dims=1, max_dims=4, min_side=1, max_side=5):
    """A small array shape."""
    ndim = draw(st.integers(min_dims, max_dims))
    return tuple(draw(st.integers(min_side, max_side)) for _ in range(ndim))


@st.composite
def broadcastable_pair(draw, min_dims=0, max_dims=4, max_side=4):
    """Two shapes that broadcast together: the second drops leading axes and sets some sides to 1."""
    full = draw(shapes(min_dims=max(min_dims, 1), max_dims=max_dims, max_side=max_side))
    keep = draw(st.integers(min_dims, len(full)))
    other = tuple(1 if draw(st.booleans()) else side for side in full[len(full) - keep:])
    return (full, other) if draw(st.booleans()) else (other, full)


@st.composite
def axes_for(draw, ndim):
    """None, one axis (possibly negative) or a tuple of distinct axes."""
    kind = draw(st.sampled_from(["none", "one", "several"]))
    if kind == "none" or ndim == 0:
        return None
    if kind == "one":
        return draw(st.integers(-ndim, ndim - 1))
    return tuple(sorted(draw(st.sets(st.integers(0, ndim - 1), min_size=1, max_size=ndim))))


def normal(seed, shape, scale=1.0):
    """Standard normal values (float64)."""
    return numpy.random.default_rng(seed).standard_normal(shape) * scale


def positive(seed, shape, low=0.5, high=2.0):
    """Values in [low, high): safe for log, sqrt, division and fractional powers."""
    return numpy.random.default_rng(seed).uniform(low, high, shape)


def away_from_zero(seed, shape, low=0.1, high=2.0):
    """Values of either sign with |x| in [low, high): safe for ReLU's kink and division."""
    rng = numpy.random.default_rng(seed)
    return rng.uniform(low, high, shape) * rng.choice([-1.0, 1.0], shape)


def distinct(seed, shape, gap=0.05):
    """Values at least ``gap``/2 apart (shuffled), so a maximum is never a near-tie."""
    rng = numpy.random.default_rng(seed)
    size = int(numpy.prod(shape))
    return (rng.permutation(size) * gap + rng.uniform(-gap / 4, gap / 4, size) - size * gap / 2).reshape(shape)
