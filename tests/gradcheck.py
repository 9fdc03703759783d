"""Gradient checks by random projection (the HIPS autograd ``check_grads`` idea).

For y = f(…) draw a random cotangent u of y's shape and a random direction
v of each checked tensor x's shape (dense, so every element takes part).
The backward gives g = ∂⟨u, y⟩/∂x; the check compares ⟨g, v⟩ with the
five-point central difference of s(t) = ⟨u, f(… x + t v …)⟩ at t = 0, whose
truncation error is O(h⁴): in float64 the two agree to ~1e-10, so a
relative tolerance of 1e-7 catches any wrong term, however small its share.
"""

import numpy

import tinyclip as tc
from tinyclip import backend


def _dot(a, b):
    return float(backend.to_numpy((a * b).sum()))


def check_targets(forward, targets, seed=0, directions=1, step=1e-4, rtol=1e-7, atol=1e-10,
                  truncation_allowance=False):
    """Assert that backward of ``forward()`` gives every target's gradient, by finite differences.

    ``forward`` recomputes the output Tensor from the current ``.data`` of the
    ``targets``, a list of (name, leaf Tensor with requires_grad) pairs.
    ``atol`` is relative to Σ|u ⊙ y|, the size of the projected output: the
    rounding error of a difference quotient scales with it, so a derivative
    that is truly 0 is not failed for a finite difference of 1e-12. With
    ``truncation_allowance`` the difference between the five-point estimates
    at h and h/2 is allowed too: it bounds the truncation error where the
    function bends sharply at the scale of h (a layer norm over nearly equal
    features), and vanishes next to any real error in a backward.
    """
    rng = numpy.random.default_rng(seed)
    for _, target in targets:
        target.grad = None
    out = forward()
    xp = out.xp
    cotangent = xp.asarray(rng.standard_normal(out.shape))
    magnitude = _dot(abs(out.data), abs(cotangent))
    out.backward(cotangent)
    for name, target in targets:
        grad = target.grad
        assert grad is not None, f"{name} got no gradient"
        assert grad.shape == target.shape, f"{name}: gradient shape {grad.shape} != {target.shape}"
        original = target.data
        for _ in range(directions):
            direction = xp.asarray(rng.standard_normal(target.shape))

            def along(t, direction=direction):
                target.data = original + t * direction
                with tc.no_grad():
                    return _dot(forward().data, cotangent)

            def five_point(h):
                return (along(-2 * h) - 8 * along(-h) + 8 * along(h) - along(2 * h)) / (12 * h)

            try:
                numeric = five_point(step)
                allowance = abs(five_point(2 * step) - numeric) if truncation_allowance else 0.0
            finally:
                target.data = original
            analytic = _dot(grad, direction)
            error = abs(analytic - numeric)
            scale = max(abs(analytic), abs(numeric))
            assert error <= atol * max(magnitude, 1.0) + rtol * scale + allowance, (
                f"{name}: directional derivative {analytic!r} (backward) vs {numeric!r} (finite differences), "
                f"relative error {error / max(scale, 1e-300):.3e}")


def check_gradients(fn, inputs, wrt=None, seed=0, directions=2, **options):
    """Check the backward of ``fn`` for every input in ``wrt`` (default: every array input).

    ``fn`` takes Tensors (one per entry of ``inputs``, float64 arrays on any
    backend; ``None`` entries are passed as they are) and returns a Tensor.
    """
    wrt = [i for i, a in enumerate(inputs) if a is not None] if wrt is None else list(wrt)
    tensors = [None if a is None else tc.Tensor(a, requires_grad=i in wrt) for i, a in enumerate(inputs)]
    check_targets(lambda: fn(*tensors), [(f"input {i}", tensors[i]) for i in wrt], seed=seed,
                  directions=directions, **options)
