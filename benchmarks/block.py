"""How close one transformer Block comes to the speed of its own matrix products.

Times forward + backward of one ``tinyclip.nn.Block`` (the bench-tiny
vision block: width 256, 65 tokens, 4 heads, MLP x4, QuickGELU, float32,
batch 128) and, in the same run, only the GEMMs that block performs, called
directly on the same array module with the same shapes and layouts:

  forward   q/k/v/out projections, Q Kᵀ, P V, fc1, fc2
  backward  for each linear map dX = G W and dW = Gᵀ X; for attention
            dV = Pᵀ G, dP = G Vᵀ, dQ = dS K, dK = dSᵀ Q

The ratio block / GEMMs is the price of everything else (layer norms,
softmax, activation, reshapes, autograd bookkeeping); the median over
``--repeat`` runs after a warm-up is reported, with the machine it ran on.

    python benchmarks/block.py --backend numpy --repeat 10

On Linux with glibc, the benchmark calls ``tinyclip.backend.tune_malloc()``
(as the ``tinyclip`` command and ``train()`` do), which raises malloc's mmap and trim
thresholds so that large freed temporaries are reused rather than returned
to the kernel (see ``tinyclip.backend``); TINYCLIP_MALLOC_TUNING=0 turns
that off, and the machine description says which way it ran.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # run from a checkout, uninstalled
import tinyclip as tc  # noqa: E402
from benchmarks.common import machine_description, timed  # noqa: E402
from tinyclip import backend  # noqa: E402

WIDTH, TOKENS, BATCH, HEADS, MLP_RATIO = 256, 65, 128, 4, 4


def block_step(block, x, cotangent):
    """Forward and backward of the block; the gradients are dropped so every run does the same work."""
    block.zero_grad()
    x.grad = None
    block(x).backward(cotangent)


def make_gemms(xp, rng, dtype):
    """The block's matrix products as a closure over arrays of the block's shapes and layouts."""
    tokens, width, hidden, head_dim = BATCH * TOKENS, WIDTH, WIDTH * MLP_RATIO, WIDTH // HEADS

    def normal(*shape):
        return xp.asarray(rng.standard_normal(shape), dtype=dtype)

    x = normal(tokens, width)                                   # (N, D): rows of every token
    w_square = [normal(width, width) for _ in range(4)]         # q, k, v, out: (D, D) stored (out, in)
    w_fc1, w_fc2 = normal(hidden, width), normal(width, hidden)  # (4D, D), (D, 4D)
    g_width, g_hidden = normal(tokens, width), normal(tokens, hidden)
    h_in = normal(tokens, hidden)

    def heads(a):
        return a.reshape(BATCH, TOKENS, HEADS, head_dim).transpose(0, 2, 1, 3)   # (B, H, T, d), a strided view

    q, k, v = heads(normal(tokens, width)), heads(normal(tokens, width)), heads(normal(tokens, width))
    probs = normal(BATCH, HEADS, TOKENS, TOKENS)                # (B, H, T, T)
    g_heads = heads(normal(tokens, width))   # (B, H, T, d): the gradient comes back through the merge's transpose

    def run():
        for w in w_square:                    # q, k, v, out projections
            x @ w.T                           # forward   (N, D) = (N, D)(D, D)
            g_width @ w                       # backward dX
            g_width.T @ x                     # backward dW  (D, D) = (D, N)(N, D)
        x @ w_fc1.T                           # fc1 forward (N, 4D)
        g_hidden @ w_fc1                      # fc1 dX (N, D)
        g_hidden.T @ x                        # fc1 dW (4D, D)
        h_in @ w_fc2.T                        # fc2 forward (N, D)
        g_width @ w_fc2                       # fc2 dX (N, 4D)
        g_width.T @ h_in                      # fc2 dW (D, 4D)
        q @ k.swapaxes(-1, -2)                # scores (B, H, T, T)
        probs @ v                             # P V (B, H, T, d)
        probs.swapaxes(-1, -2) @ g_heads      # dV = Pᵀ G
        g_heads @ v.swapaxes(-1, -2)          # dP = G Vᵀ
        probs @ k                             # dQ = dS K (dS has P's shape and layout; P stands in)
        probs.swapaxes(-1, -2) @ q            # dK = dSᵀ Q

    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=backend.BACKENDS, default="numpy")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    backend.tune_malloc()   # as the tinyclip command and train() do: the figures are those of a real run

    xp = backend.backend_module(args.backend)
    dtype = xp.float32
    block = tc.nn.Block(WIDTH, HEADS, mlp_ratio=MLP_RATIO, activation="quick_gelu",
                        dtype=dtype, backend=args.backend, seed=0)
    host_rng = backend.backend_module("numpy").random.default_rng(0)
    x = tc.Tensor(xp.asarray(host_rng.standard_normal((BATCH, TOKENS, WIDTH)), dtype=dtype), requires_grad=True)
    cotangent = xp.asarray(host_rng.standard_normal((BATCH, TOKENS, WIDTH)), dtype=dtype)

    block_time, gemm_time = timed([lambda: block_step(block, x, cotangent), make_gemms(xp, host_rng, dtype)],
                                  xp, args.repeat, args.warmup)

    print(machine_description(xp, args.backend))
    print(f"shape: batch {BATCH}, tokens {TOKENS}, width {WIDTH}, heads {HEADS}, MLP x{MLP_RATIO}, "
          f"quick_gelu, float32; median of {args.repeat} rounds after {args.warmup} warm-up rounds")
    print(f"block forward+backward: {block_time * 1e3:9.2f} ms")
    print(f"its matrix products:    {gemm_time * 1e3:9.2f} ms")
    print(f"ratio block / GEMMs:    {block_time / gemm_time:9.2f}")


if __name__ == "__main__":
    main()
