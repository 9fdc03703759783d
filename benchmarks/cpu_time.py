"""Process CPU time of three workloads, for comparing two versions of tinyclip on a busy machine.

Wall time on a shared machine swings with the load; the CPU time a process
spends, with one BLAS thread, swings far less. Run this once per checkout,
alternating, and compare the best rounds:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OPENBLAS_NUM_THREADS=1 PYTHONPATH=OLD python benchmarks/cpu_time.py
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OPENBLAS_NUM_THREADS=1 PYTHONPATH=NEW python benchmarks/cpu_time.py

(the two OPENBLAS_* variables force an older kernel on some machines here; unset, the GEMMs run at their
native speed). The workloads use only names every version has:

  block   forward + backward of one transformer block (width 256, 65 tokens, batch 64, QuickGELU, float32)
  losses  clip_loss and siglip_loss forward + backward at B = 1024, D = 512, float32
  step    one AdamW training step of the ``shapes`` model with the SigLIP loss at batch 32
"""

import argparse
import math
import os
import sys
import time

import numpy

if "PYTHONPATH" not in os.environ:   # run from a checkout, uninstalled
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tinyclip as tc  # noqa: E402
from tinyclip import backend  # noqa: E402


def block_workload(rng):
    block = tc.nn.Block(256, 4, mlp_ratio=4, activation="quick_gelu", dtype=numpy.float32, seed=0)
    x = tc.Tensor(rng.standard_normal((64, 65, 256)).astype(numpy.float32), requires_grad=True)
    cotangent = rng.standard_normal((64, 65, 256)).astype(numpy.float32)

    def once():
        block.zero_grad()
        x.grad = None
        block(x).backward(cotangent)
    return once


def losses_workload(rng):
    def unit(a):
        return (a / numpy.linalg.norm(a, axis=1, keepdims=True)).astype(numpy.float32)
    image_emb = tc.Tensor(unit(rng.standard_normal((1024, 512))), requires_grad=True)
    text_emb = tc.Tensor(unit(rng.standard_normal((1024, 512))), requires_grad=True)
    log_scale = tc.Tensor(numpy.float32(math.log(10)), requires_grad=True)
    bias = tc.Tensor(numpy.float32(-10), requires_grad=True)

    def once():
        for tensor in (image_emb, text_emb, log_scale, bias):
            tensor.grad = None
        tc.losses.clip_loss(image_emb, text_emb, log_scale).backward()
        tc.losses.siglip_loss(image_emb, text_emb, log_scale, bias).backward()
    return once


def step_workload(rng):
    config = tc.models.preset("shapes", vocab_size=1024, eos_id=1023)
    model = tc.models.CLIP(config, seed=0)
    images = rng.standard_normal((32, config.image_size, config.image_size, 3)).astype(numpy.float32)
    tokens = rng.integers(1, 1000, (32, config.context_length))
    tokens[:, -1] = 1023
    optimizer = tc.optim.AdamW(list(model.parameters()), lr=1e-3, weight_decay=0.1)

    def once():
        optimizer.zero_grad()
        image_emb, text_emb, log_scale, bias = model(images, tokens)
        tc.losses.siglip_loss(image_emb, text_emb, log_scale, bias).backward()
        optimizer.step()
    return once


WORKLOADS = {"block": block_workload, "losses": losses_workload, "step": step_workload}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", choices=tuple(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    if hasattr(backend, "tune_malloc"):      # versions before it tuned malloc at import
        backend.tune_malloc()
    print(f"tinyclip {tc.__version__} from {os.path.dirname(tc.__file__)}; NumPy {numpy.__version__}; "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}; "
          f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', 'unset')}; {os.cpu_count()} CPUs")
    for name in args.workloads:
        once = WORKLOADS[name](numpy.random.default_rng(0))
        once()                                                   # warm-up: pools, caches, first allocations
        seconds = []
        for _ in range(args.repeat):
            start = time.process_time()
            once()
            seconds.append(time.process_time() - start)
        seconds.sort()
        print(f"{name:7s} CPU ms: best {seconds[0] * 1e3:8.1f}  median {seconds[len(seconds) // 2] * 1e3:8.1f}")


if __name__ == "__main__":
    main()
