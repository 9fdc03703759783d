"""How close the fused, tiled losses come to the matrix products they cannot avoid, and what memory they need.

For each batch size B (embeddings (B, D), L2-normalised, float32) this times
forward + backward of ``tinyclip.losses.clip_loss`` and ``siglip_loss`` with
every input a Tensor that requires a gradient (image_emb, text_emb,
log_scale and, for SigLIP, bias), and in the same run the three matrix
products any implementation of either loss performs:

  X·Yᵀ   (B, D)(D, B)   the logits
  G·Y    (B, B)(B, D)   the image gradient, G = ∂L/∂l
  Gᵀ·X   (B, B)(B, D)   the text gradient

with G a (B, B) array made once, outside the timing, and the same three with
X·Yᵀ once more: CLIP's two-sweep floor, four products (docs/losses.md,
section 6). The ratio loss / products is the price of everything else: the
exponentials and logarithms over B² logits, the tiling, and for CLIP, when the
batch takes more than one tile, a second sweep that recomputes the logits. It
is taken round by round (the loss and its products run back to back in each
round, so that a busy neighbour slows both) and printed as the median and the
minimum over the rounds, beside the load average before and after. For comparison the
from-primitives references ``clip_loss_reference`` and
``siglip_loss_reference``, which hold several (B, B) matrices, are timed up
to ``--naive-max-batch``.

Peak extra memory is the most memory in use during one forward + backward
beyond what was held before it (the inputs, with no gradients yet), so it
includes the gradients the step leaves behind; the table also gives it less
those gradients (2·B·D·4 bytes and two scalars). On NumPy it is read from
``tracemalloc`` (NumPy reports its array buffers to it; BLAS's own
thread buffers are not counted); on CuPy from a ``cupy.cuda.MemoryHook``
that follows every allocation from and release to the memory pool. The
median over ``--repeat`` rounds after ``--warmup`` rounds is reported, with
the machine it ran on.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/losses.py --batch 4096 --repeat 9
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/losses.py --batch 8192 --repeat 3

Some machines set OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE, which force an older
BLAS kernel and so change the products' time, the ratios' denominator; the
commands above unset them, and the header says whether they were set.

Targets (issue 18, on the CPU; the table marks them only for ``--backend
numpy``): at B = 4096, SigLIP within 1.15x of its three products and CLIP
within 1.15x of its four (by the median ratio); at most 128 MB of extra
memory beyond the gradients at B = 8192 (one 8192×8192 float32 matrix is
256 MB). MB here is 2²⁰ bytes.
"""

import argparse
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # run from a checkout, uninstalled
import tinyclip as tc  # noqa: E402
from benchmarks.common import machine_description, peak_extra_bytes, synchronizer  # noqa: E402
from tinyclip import backend, parallel  # noqa: E402

MB = 1 << 20
TIME_TARGET_BATCH, TIME_TARGET_RATIO = 4096, 1.15         # fused loss / its products (3 SigLIP, 4 CLIP)
MEMORY_TARGET_BATCH, MEMORY_TARGET_MB = 8192, 128         # peak extra memory of a fused loss
CLIP_LOG_SCALE = math.log(1 / 0.07)                       # CLIP's initial temperature
SIGLIP_LOG_SCALE, SIGLIP_BIAS = math.log(10.0), -10.0     # SigLIP's initial scale and bias


def unit_rows(rng, batch, dim):
    """(batch, dim) float64 Gaussian rows scaled to unit length: what the towers' projections hand the loss."""
    rows = rng.standard_normal((batch, dim))
    return rows / (rows ** 2).sum(axis=1, keepdims=True) ** 0.5


def make_inputs(xp, rng, batch, dim, dtype):
    """Leaf Tensors that all require a gradient: image_emb, text_emb, the two log-scales and SigLIP's bias."""
    def leaf(value):
        return tc.Tensor(xp.asarray(value, dtype=dtype), requires_grad=True)

    return {"image_emb": leaf(unit_rows(rng, batch, dim)), "text_emb": leaf(unit_rows(rng, batch, dim)),
            "clip_log_scale": leaf(CLIP_LOG_SCALE), "siglip_log_scale": leaf(SIGLIP_LOG_SCALE),
            "bias": leaf(SIGLIP_BIAS)}


def loss_steps(inputs, tile):
    """Name → a function that runs forward + backward once, leaving the gradients in the leaves' ``.grad``."""
    x, y = inputs["image_emb"], inputs["text_emb"]
    clip_scale, siglip_scale, bias = inputs["clip_log_scale"], inputs["siglip_log_scale"], inputs["bias"]
    return {
        "clip_loss (fused)": lambda: tc.losses.clip_loss(x, y, clip_scale, tile=tile).backward(),
        "siglip_loss (fused)": lambda: tc.losses.siglip_loss(x, y, siglip_scale, bias, tile=tile).backward(),
        "clip_loss_reference": lambda: tc.losses.clip_loss_reference(x, y, clip_scale).backward(),
        "siglip_loss_reference": lambda: tc.losses.siglip_loss_reference(x, y, siglip_scale, bias).backward(),
    }


def make_products(xp, rng, batch, dim, dtype, logits_twice=False):
    """The three products of a loss's forward and backward, on arrays of the loss's shapes and layouts.

    With ``logits_twice`` X·Yᵀ is made twice: CLIP's two sweeps, four products.
    """
    images = xp.asarray(unit_rows(rng, batch, dim), dtype=dtype)   # (B, D)
    texts = xp.asarray(unit_rows(rng, batch, dim), dtype=dtype)    # (B, D)
    grad_logits = xp.asarray(rng.standard_normal((batch, batch)), dtype=dtype)   # (B, B), made once

    def run():
        images @ texts.T            # logits (B, B)
        if logits_twice:
            images @ texts.T        # again, for CLIP's second sweep
        grad_logits @ texts         # dX ∝ G Y   (B, D)
        grad_logits.T @ images      # dY ∝ Gᵀ X  (B, D)

    return run


def clearing_gradients(step, leaves):
    """The step after dropping the leaves' gradients, so that every run does the same work."""
    def run():
        for leaf in leaves:
            leaf.grad = None
        step()
    return run


def timed_rounds(functions, xp, repeat, warmup, clock=time.perf_counter):
    """Seconds of each function in each of ``repeat`` rounds after ``warmup`` rounds: [[s, ...], ...].

    The functions take turns within each round (device synchronised), so that
    ratios taken within a round compare runs under the same load. ``clock``:
    wall time, or ``time.process_time`` (the CPU time of all this process's
    threads, which a busy neighbour inflates less).
    """
    synchronize = synchronizer(xp)
    times = [[] for _ in functions]
    for round_index in range(warmup + repeat):
        for fn, samples in zip(functions, times):
            synchronize()
            start = clock()
            fn()
            synchronize()
            if round_index >= warmup:
                samples.append(clock() - start)
    return times


def ratios(samples, base):
    """(median, min) over the rounds of samples[r] / base[r]."""
    per_round = [mine / theirs for mine, theirs in zip(samples, base)]
    return statistics.median(per_round), min(per_round)


def load_average():
    return "/".join(f"{value:.2f}" for value in os.getloadavg()) if hasattr(os, "getloadavg") else "unknown"


def target_note(backend_name, batch, name, ratio, extra_mb, beyond_gradients_mb):
    """What the issue's targets (set for the CPU) say of this row, or nothing where none applies."""
    if backend_name != "numpy" or name.startswith("products") or "reference" in name:
        return ""
    notes = []
    if batch == TIME_TARGET_BATCH:
        products = "4 products" if name.startswith("clip") else "3 products"
        notes.append(f"≤ {TIME_TARGET_RATIO}x {products}: {'met' if ratio <= TIME_TARGET_RATIO else 'missed'}")
    if batch == MEMORY_TARGET_BATCH:
        notes.append(f"≤ {MEMORY_TARGET_MB} MB beyond grads: "
                     f"{'met' if beyond_gradients_mb <= MEMORY_TARGET_MB else 'missed'}")
    return "; ".join(notes)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=backend.BACKENDS, default="numpy")
    parser.add_argument("--batch", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--tile", type=int, default=None, help="rows per tile (default: tinyclip.losses.default_tile)")
    parser.add_argument("--naive-max-batch", type=int, default=4096,
                        help="time the from-primitives references only up to this batch (they hold B×B matrices)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall time (the targets' measure), or the CPU time of all the process's threads "
                             "(a check on a loaded machine; OpenBLAS threads that spin while waiting count in it)")
    args = parser.parse_args()
    backend.tune_malloc()   # as the tinyclip command and train() do: the figures are those of a real run

    xp = backend.backend_module(args.backend)
    dtype = xp.float32
    host_rng = backend.backend_module("numpy").random.default_rng(0)

    print(machine_description(xp, args.backend))
    print("OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE set: "
          f"{[name for name in ('OPENBLAS_CORETYPE', 'OPENBLAS_L2_SIZE') if name in os.environ] or 'neither'}; "
          f"tinyclip threads: {parallel.thread_count()}")
    print(f"D = {args.dim}, float32, every input requires a gradient; {args.repeat} rounds after {args.warmup} "
          f"warm-up rounds, median and min of {args.clock} time; peak extra memory over one forward + backward, "
          f"MB = 2^20 bytes")
    header = (f"{'B':>6} {'tile':>5}  {'':26}{'ms median':>10} {'min':>8} {'/3 prod med':>12} {'min':>6} "
              f"{'/4 prod med':>12} {'min':>6} {'peak MB':>8} {'less grads':>11}  target")
    print(header)
    print("-" * len(header))
    for batch in args.batch:
        tile = args.tile or tc.losses.default_tile(batch, args.backend)
        inputs = make_inputs(xp, host_rng, batch, args.dim, dtype)
        leaves = list(inputs.values())
        steps = loss_steps(inputs, args.tile)
        if batch > args.naive_max_batch:
            steps = {name: step for name, step in steps.items() if "reference" not in name}
        names = ["products X·Yᵀ, G·Y, Gᵀ·X", "products, X·Yᵀ twice"] + list(steps)
        functions = ([make_products(xp, host_rng, batch, args.dim, dtype),
                      make_products(xp, host_rng, batch, args.dim, dtype, logits_twice=True)] + list(steps.values()))
        load_before = load_average()
        clock = time.perf_counter if args.clock == "wall" else time.process_time
        times = timed_rounds([clearing_gradients(fn, leaves) for fn in functions], xp, args.repeat, args.warmup,
                             clock)
        print(f"load average (1/5/15 min) before: {load_before}, after: {load_average()}")
        for name, fn, samples in zip(names, functions, times):
            for leaf in leaves:   # what is held before: the inputs, no gradients
                leaf.grad = None
            extra_mb = peak_extra_bytes(fn, xp, args.backend) / MB
            # what the step leaves behind in the leaves' .grad, counted in the peak
            beyond_gradients_mb = extra_mb - sum(leaf.grad.nbytes for leaf in leaves if leaf.grad is not None) / MB
            to_three, to_three_min = ratios(samples, times[0])
            to_four, to_four_min = ratios(samples, times[1])
            own_ratio = to_four if name.startswith("clip") else to_three
            note = target_note(args.backend, batch, name, own_ratio, extra_mb, beyond_gradients_mb)
            median_ms, min_ms = statistics.median(samples) * 1e3, min(samples) * 1e3
            print(f"{batch:>6} {tile:>5}  {name:<26}{median_ms:>10.1f} {min_ms:>8.1f} "
                  f"{to_three:>12.3f} {to_three_min:>6.3f} {to_four:>12.3f} {to_four_min:>6.3f} {extra_mb:>8.1f} "
                  f"{beyond_gradients_mb:>11.1f}  {note}".rstrip(), flush=True)
        del inputs, leaves, steps, functions   # free this batch's arrays (G is B×B) before the next is made
    print("peak extra memory includes the gradients the step leaves in the leaves' .grad (image and text: "
          "2·B·D·4 bytes); 'less grads' is the peak without them")
    print(f"targets (on the CPU): at B = {TIME_TARGET_BATCH}, SigLIP within {TIME_TARGET_RATIO}x of its 3 products "
          f"and CLIP of its 4 (median ratio); at most {MEMORY_TARGET_MB} MB extra beyond the gradients at "
          f"B = {MEMORY_TARGET_BATCH}")


if __name__ == "__main__":
    main()
