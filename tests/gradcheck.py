"""Gradient checks by random projection (the HIPS autograd ``check_grads`` idea).

For y = f(x₁, …, xₙ) draw a random cotangent u of y's shape and random
directions vᵢ of each input's shape (dense, so every element takes part).
The backward gives gᵢ = ∂⟨u, y⟩/∂xᵢ; the check compares ⟨gᵢ, vᵢ⟩ with the
five-point central difference of s(t) = ⟨u, f(…, xᵢ + t vᵢ, …)⟩ at t = 0,
whose truncation error is O(h⁴): in float64 the two agree to ~1e-10, so a
relative tolerance of 1e-7 catches any wrong term, however small its share.
"""

import numpy

import tinyclip as tc
from tinyclip import backend


def _dot(a, b):
    return float(backend.to_numpy((a * b).sum()))


def check_gradients(fn, inputs, wrt=None, directions=2, step=1e-4, rtol=1e-7, atol=1e-10, seed=0):
    """Assert that the backward of ``fn`` matches finite differences for every input in ``wrt``.

    ``fn`` takes Tensors (one per entry of ``inputs``, float64 arrays on any
    backend; ``None`` entries are passed as they are) and returns a Tensor.
    ``wrt`` lists the positions to check (default: every array input).
    ``atol`` is relative to Σ|u ⊙ y|, the size of the projected output: the
    rounding error of a difference quotient scales with it, so a derivative
    that is truly 0 is not failed for a finite difference of 1e-12.
    """
    xp = backend.get_array_module(*[a for a in inputs if a is not None])
    rng = numpy.random.default_rng(seed)
    wrt = [i for i, a in enumerate(inputs) if a is not None] if wrt is None else list(wrt)

    def run(arrays, requires_grad):
        tensors = [None if a is None else tc.Tensor(a, requires_grad=requires_grad and i in wrt)
                   for i, a in enumerate(arrays)]
        return tensors, fn(*tensors)

    tensors, out = run(inputs, True)
    cotangent = xp.asarray(rng.standard_normal(out.shape))
    magnitude = float(backend.to_numpy(abs(out.data * cotangent).sum()))
    out.backward(cotangent)
    for i in wrt:
        grad = tensors[i].grad
        assert grad is not None, f"input {i} got no gradient"
        assert grad.shape == inputs[i].shape, f"input {i}: gradient shape {grad.shape} != {inputs[i].shape}"
        for _ in range(directions):
            direction = xp.asarray(rng.standard_normal(inputs[i].shape))

            def along(t):
                moved = list(inputs)
                moved[i] = inputs[i] + t * direction
                with tc.no_grad():
                    return _dot(run(moved, False)[1].data, cotangent)

            numeric = (along(-2 * step) - 8 * along(-step) + 8 * along(step) - along(2 * step)) / (12 * step)
            analytic = _dot(grad, direction)
            error = abs(analytic - numeric)
            scale = max(abs(analytic), abs(numeric))
            assert error <= atol * max(magnitude, 1.0) + rtol * scale, (
                f"input {i}: directional derivative {analytic!r} (backward) vs {numeric!r} (finite differences), "
                f"relative error {error / max(scale, 1e-300):.3e}")
