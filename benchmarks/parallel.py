"""What tinyclip.parallel's row blocks buy on the element-wise work of a training step.

tinyclip's element-wise ops hand their work to ``parallel.map_rows``, which
cuts it into row blocks on a thread pool (docs/vit.md, section 2). This
times the ops themselves, as a training step calls them (``tinyclip.functional``
forward and backward, ``optim.AdamW.step``), in float32 at the shapes of a
preset's run, once at each thread count from 1 to the usable cores
(``TINYCLIP_THREADS``, set around each call):

  gelu fwd / bwd      the MLP activation, (B·T, mlp width), vision and text tower;
                      for a CNN tower the first stage's activation, (B·H/2·W/2, channels)
  layer norm fwd/bwd  per token over the width, (B·T, width)
  attention fwd/bwd   softmax over the keys and its backward, (B·heads·T, T) (the
                      products Q Kᵀ and P V, unchanged by the pool, are in the time)
  adamw               one step of a 1 M-parameter model's weight matrices (128 × 512 each)

and prints the median of ``--repeat`` rounds (the thread counts take turns in
each round, so a busy neighbour slows them alike) and the speed-up over one thread.

``--sweep`` instead times the cheapest row function per element handed to the
pool (the softmax backward: three passes) and GELU's forward over flat sizes
from 2^11 to 2^20 elements, one thread against every core, and the hand-off
itself (an empty function); ``parallel.MIN_PARALLEL_SIZE`` is set from it (the
size at which the threaded call stops being slower), so the sweep lowers the
threshold to 0 while it runs.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/parallel.py --preset shapes-vit
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/parallel.py --sweep

Some machines set OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE, which force an
older BLAS kernel; the commands above unset them (they do not touch these
ufuncs, but the attention's products and the other benchmarks' figures are
taken that way). The header says whether they were set, and the load average.
"""

import argparse
import os
import sys

import numpy

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # run from a checkout, uninstalled
import tinyclip as tc  # noqa: E402
from benchmarks.common import machine_description, timed  # noqa: E402
from tinyclip import functional as F, parallel  # noqa: E402
from tinyclip.models import preset  # noqa: E402
from tinyclip.train import TrainConfig  # noqa: E402


def with_threads(count, fn):
    """fn, run with TINYCLIP_THREADS=count (the ops read it at each call)."""
    def call():
        os.environ[parallel.THREADS_ENV] = str(count)
        fn()
    return call


def op_timings(op, shapes, rng):
    """(forward, forward + backward) callables of ``op`` on float32 inputs of ``shapes``."""
    inputs = [tc.Tensor(rng.standard_normal(shape, dtype=numpy.float32), requires_grad=True) for shape in shapes]
    cotangent = rng.standard_normal(op(*inputs).shape, dtype=numpy.float32)

    def forward():
        op(*inputs)

    def both():
        for tensor in inputs:
            tensor.grad = None
        op(*inputs).backward(cotangent)
    return forward, both


def adamw_step(rng, matrices=16, shape=(512, 128)):
    params = [tc.Tensor(rng.standard_normal(shape, dtype=numpy.float32), requires_grad=True) for _ in range(matrices)]
    for p in params:
        p.grad = rng.standard_normal(shape, dtype=numpy.float32)
    optimizer = tc.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1)
    return optimizer.step


def workloads(batch, config):
    """[(name, op, input shapes)] at the run's shapes: the ViT's tokens, or the CNN's first stage, and the text tower."""
    text_tokens = config.context_length
    text_mlp = int(config.text_width * config.text_mlp_ratio)
    head = config.text_width // config.text_heads
    gelu = (lambda x: F.gelu(x, approximate="tanh")) if config.activation == "gelu_tanh" else \
        (lambda x: F.gelu(x, approximate="none")) if config.activation == "gelu" else F.quick_gelu
    if config.vision_type == "cnn":                               # the largest activation: stage 1, (B·H/2·W/2, C1)
        side, channels = config.image_size // 2, config.conv_channels[0]
        vision = [("gelu, cnn stage 1", gelu, [(batch * side * side, channels)])]
    else:
        tokens = config.num_patches + (1 if config.class_token else 0)
        mlp = int(config.vision_width * config.vision_mlp_ratio)
        width, heads = config.vision_width, config.vision_heads
        vision = [("gelu, vision", gelu, [(batch * tokens, mlp)]),
                  ("layer norm, vision", F.layer_norm, [(batch * tokens, width), (width,), (width,)]),
                  ("attention, vision", F.scaled_dot_product_attention, [(batch, heads, tokens, width // heads)] * 3)]
    return vision + [
        ("gelu, text", gelu, [(batch * text_tokens, text_mlp)]),
        ("layer norm, text", F.layer_norm, [(batch * text_tokens, config.text_width), (config.text_width,),
                                            (config.text_width,)]),
        ("attention, text", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, causal=config.causal),
         [(batch, config.text_heads, text_tokens, head)] * 3),
    ]


def header(args_line):
    print(machine_description(numpy, "numpy"))
    print("OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE set: "
          f"{[name for name in ('OPENBLAS_CORETYPE', 'OPENBLAS_L2_SIZE') if name in os.environ] or 'neither'}")
    print(f"load average at the start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(args_line + "\n")


def run_ops(args):
    config = preset(args.preset)
    counts = list(range(1, args.threads + 1))
    header(f"preset {args.preset}, batch {args.batch}, float32, median of {args.repeat} rounds; "
           f"threads 1..{args.threads}; MIN_PARALLEL_SIZE {parallel.MIN_PARALLEL_SIZE}")
    columns = " ".join(f"{f'{n} thr ms':>9s} {'×':>5s}" for n in counts[1:])
    print(f"{'work':34s} {'shapes':>30s} {'1 thr ms':>9s} {columns}")
    rng = numpy.random.default_rng(0)
    rows = []
    for name, op, shapes in workloads(args.batch, config):
        forward, both = op_timings(op, shapes, rng)
        rows += [(f"{name} fwd", str(shapes[0]), forward), (f"{name} fwd+bwd", str(shapes[0]), both)]
    rows.append(("adamw step, 16 × (512, 128)", "", adamw_step(rng)))
    for name, shape, fn in rows:
        times = timed([with_threads(n, fn) for n in counts], numpy, args.repeat, args.warmup)
        line = f"{name:34s} {shape:>30s} {times[0] * 1e3:9.2f} "
        line += " ".join(f"{t * 1e3:9.2f} {times[0] / t:5.2f}" for t in times[1:])
        print(line, flush=True)
    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def softmax_backward_rows(ds, dp, p):
    """The softmax backward's row work (functional.ScaledDotProductAttention.backward): 3 passes per element."""
    numpy.subtract(dp, numpy.einsum("...j,...j->...", dp, p)[..., None], out=ds)
    ds *= p


def gelu_rows(y, x):
    numpy.multiply(x, x, out=y)
    y *= numpy.float32(0.044715)
    y += 1
    y *= x
    y *= numpy.float32(0.7978845608028654)
    numpy.tanh(y, out=y)
    y += 1
    y *= x
    y *= 0.5


def nothing(out):
    pass


def run_sweep(args):
    parallel.MIN_PARALLEL_SIZE = 0
    header(f"float32, median of {args.repeat} rounds; 1 thread against {args.threads}; rows of 64 elements; "
           f"BLOCKS_PER_THREAD {parallel.BLOCKS_PER_THREAD}")
    print(f"{'elements':>9s} {'hand-off µs':>12s} {'softmax bwd 1 thr µs':>21s} {'threaded µs':>12s} {'×':>5s} "
          f"{'gelu fwd 1 thr µs':>18s} {'threaded µs':>12s} {'×':>5s}")
    rng = numpy.random.default_rng(0)
    for power in range(11, 21):
        size = 1 << power
        shape = (size // 64, 64)                                   # the attention's rows are T = 65 keys long
        dp, p = rng.standard_normal(shape, dtype=numpy.float32), rng.random(shape, dtype=numpy.float32)
        x, y = rng.standard_normal(shape, dtype=numpy.float32), numpy.empty(shape, numpy.float32)
        ds = numpy.empty(shape, numpy.float32)
        calls = [lambda: parallel.map_rows(nothing, y, threads=args.threads)]
        for fn, out, arrays in ((softmax_backward_rows, ds, (dp, p)), (gelu_rows, y, (x,))):
            calls += [lambda fn=fn, out=out, arrays=arrays, n=n: parallel.map_rows(fn, out, *arrays, threads=n)
                      for n in (1, args.threads)]
        times = [t * 1e6 for t in timed(calls, numpy, args.repeat, args.warmup)]
        print(f"{size:9d} {times[0]:12.1f} {times[1]:21.1f} {times[2]:12.1f} {times[1] / times[2]:5.2f} "
              f"{times[3]:18.1f} {times[4]:12.1f} {times[3] / times[4]:5.2f}", flush=True)
    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--preset", default=TrainConfig.preset)
    parser.add_argument("--batch", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--threads", type=int, default=None, help="the most threads (default: the usable cores)")
    parser.add_argument("--sweep", action="store_true", help="time sizes 2^11..2^20 to set MIN_PARALLEL_SIZE")
    parser.add_argument("--blocks-per-thread", type=int, default=parallel.BLOCKS_PER_THREAD)
    args = parser.parse_args()
    parallel.BLOCKS_PER_THREAD = args.blocks_per_thread
    args.threads = args.threads or parallel.thread_count()
    run_sweep(args) if args.sweep else run_ops(args)


if __name__ == "__main__":
    main()
