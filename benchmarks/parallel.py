"""What tinyclip.parallel's row blocks buy on the element-wise work of the default run.

The default run (``tinyclip train``: TrainConfig's preset and batch) spends
the part of its step that is not matrix products in a few element-wise
kernels (the profile is in docs/vit.md). This times each of them at the
default run's shapes, in float32, written the way tinyclip computes them
(``out=`` ufuncs), once in the calling thread and once cut into row blocks
by ``parallel.map_rows`` at each thread count up to the usable cores:

  gelu fwd / bwd   the MLP activation, (B·T, mlp width), vision and text tower;
                   for a CNN tower the first stage's activation, (B·H/2·W/2, channels)
  layer norm       per token over the width, (B·T, width)
  softmax          attention probabilities over the keys, (B·heads·T, T)
  adamw            one update of every parameter, flat

and prints the median of ``--repeat`` rounds (the functions take turns in
each round, so a busy neighbour slows them alike) and the speed-up.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/parallel.py --repeat 20

Some machines set OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE, which force an
older BLAS kernel; the command above unsets them (they do not touch these
ufuncs, but the other benchmarks' figures are taken that way). The header
says whether they were set.
"""

import argparse
import os
import sys

import numpy

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # run from a checkout, uninstalled
from benchmarks.common import machine_description, timed  # noqa: E402
from tinyclip import parallel  # noqa: E402
from tinyclip.models import preset  # noqa: E402
from tinyclip.train import TrainConfig  # noqa: E402

SQRT_2_OVER_PI = numpy.float32(0.7978845608028654)
GELU_CUBIC = numpy.float32(0.044715)


def gelu_forward(out, x):
    numpy.multiply(x, x, out=out)                      # out = tanh(√(2/π)(x + 0.044715 x³)), then ½x(1 + out)
    out *= x
    out *= GELU_CUBIC
    out += x
    out *= SQRT_2_OVER_PI
    numpy.tanh(out, out=out)
    out += 1
    out *= x
    out *= 0.5


def gelu_backward(out, x, tanh, grad):
    """functional.GELUTanh.backward's sequence: the saved t = tanh(inner) comes in, g · f'(x) goes out."""
    numpy.multiply(x, x, out=out)
    numpy.minimum(out, numpy.float32(1e4), out=out)
    out *= 3 * GELU_CUBIC
    out += 1
    out *= SQRT_2_OVER_PI * numpy.float32(0.5)
    out *= 1 - tanh * tanh
    out *= x
    out += numpy.float32(0.5) * (1 + tanh)
    out *= grad


def layer_norm(out, x, gain, shift):
    mean = x.mean(axis=-1, keepdims=True)
    numpy.subtract(x, mean, out=out)
    variance = numpy.mean(out * out, axis=-1, keepdims=True)
    variance += numpy.float32(1e-5)
    out /= numpy.sqrt(variance)
    out *= gain
    out += shift


def softmax(out, x):
    numpy.subtract(x, x.max(axis=-1, keepdims=True), out=out)
    numpy.exp(out, out=out)
    out /= out.sum(axis=-1, keepdims=True)


def adamw(out, param, grad, m, v):
    m *= numpy.float32(0.9)
    m += numpy.float32(0.1) * grad
    v *= numpy.float32(0.98)
    v += numpy.float32(0.02) * grad * grad
    denominator = numpy.sqrt(v)
    denominator += numpy.float32(1e-6)
    numpy.divide(m, denominator, out=out)
    out *= numpy.float32(-1e-3)
    out += param * numpy.float32(1 - 1e-4)


def workloads(batch, config):
    """[(name, fn, out shape, input count)] at the run's shapes: the ViT's tokens, or the CNN's first stage."""
    text_tokens = config.context_length
    text_mlp = int(config.text_width * config.text_mlp_ratio)
    parameters = 1_000_000                                        # about the default model's size
    if config.vision_type == "cnn":                               # the largest activation: stage 1, (B·H/2·W/2, C1)
        side, channels = config.image_size // 2, config.conv_channels[0]
        vision = [("gelu fwd, cnn stage 1", gelu_forward, (batch * side * side, channels), 1),
                  ("gelu bwd, cnn stage 1", gelu_backward, (batch * side * side, channels), 3)]
    else:
        tokens = config.num_patches + (1 if config.class_token else 0)
        mlp = int(config.vision_width * config.vision_mlp_ratio)
        vision = [("gelu fwd, vision", gelu_forward, (batch * tokens, mlp), 1),
                  ("gelu bwd, vision", gelu_backward, (batch * tokens, mlp), 3),
                  ("layer norm, vision", layer_norm, (batch * tokens, config.vision_width), 1),
                  ("softmax, vision attention", softmax, (batch * config.vision_heads * tokens, tokens), 1)]
    return vision + [
        ("gelu fwd, text", gelu_forward, (batch * text_tokens, text_mlp), 1),
        ("layer norm, text", layer_norm, (batch * text_tokens, config.text_width), 1),
        ("softmax, text attention", softmax, (batch * config.text_heads * text_tokens, text_tokens), 1),
        ("adamw, all parameters", adamw, (parameters,), 4),
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--preset", default=TrainConfig.preset)
    parser.add_argument("--batch", type=int, default=TrainConfig.batch_size)
    args = parser.parse_args()
    config = preset(args.preset)
    cores = parallel.thread_count()
    print(machine_description(numpy, "numpy"))
    print("OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE set: "
          f"{[name for name in ('OPENBLAS_CORETYPE', 'OPENBLAS_L2_SIZE') if name in os.environ] or 'neither'}")
    print(f"preset {args.preset}, batch {args.batch}, float32, median of {args.repeat} rounds; threads 1..{cores}\n")
    counts = list(range(2, cores + 1))
    columns = " ".join(f"{f'{n} thr ms':>9s} {'×':>5s}" for n in counts)
    print(f"{'work':28s} {'shape':>16s} {'serial ms':>10s} {columns}")
    rng = numpy.random.default_rng(0)
    for name, fn, shape, inputs in workloads(args.batch, config):
        arrays = [rng.standard_normal(shape, dtype=numpy.float32) for _ in range(inputs)]
        if fn is layer_norm:
            arrays += [numpy.ones(shape[-1:], numpy.float32), numpy.zeros(shape[-1:], numpy.float32)]
        if fn is adamw:
            arrays[3] = numpy.abs(arrays[3])
        if fn is gelu_backward:
            arrays[1] = numpy.tanh(arrays[1])
        out = numpy.empty(shape, numpy.float32)
        calls = [lambda: fn(out, *arrays)]
        calls += [lambda n=n: parallel.map_rows(fn, out, *arrays, threads=n) for n in counts]
        times = timed(calls, numpy, args.repeat, args.warmup)
        row = f"{name:28s} {str(shape):>16s} {times[0] * 1e3:10.2f} "
        row += " ".join(f"{t * 1e3:9.2f} {times[0] / t:5.2f}" for t in times[1:])
        print(row)


if __name__ == "__main__":
    main()
