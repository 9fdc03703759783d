"""The distributed losses under ``mpiexec -n D``: time, per-rank memory and bytes sent, against the theory.

    mpiexec -n 4 python benchmarks/distributed.py [--batch 4096 16384 65536] [--dim 256]

For each global batch B (split evenly, b = B/D pairs per rank, float32,
L2-normalised), each method runs one forward + backward with every input
requiring a gradient:

  siglip ring          the SigLIP paper's chunked ring
  siglip ring 2-way    the same, the chunks sent both ways round
  clip ring            two trips round the ring
  clip gather          all-gather, then reduce-scatter of the gradients

and rank 0 prints, per method: the wall time (the slowest rank's median),
the per-rank peak extra memory (the largest over ranks, by tracemalloc on
the CPU, by the CuPy pool on a GPU), that memory divided by b (flat as B
grows means memory linear in the local batch, never b×B or B²), and the
bytes each rank handed to MPI beside what the theory says a ring sends:

  siglip ring          (D−1)·b·d text values out, (D−1)·b·d gradient values back
  siglip ring 2-way    (D−1)·b·d text values, the gradients out with their chunks
                       (up−1 + down−1 hops) and home the shorter way round
  clip ring            trip 1: (D−1)·(b·d texts + 3b log-sum-exp statistics);
                       trip 2: (D−1)·(b·d texts + b log-sum-exps + b·d gradients)
  clip gather          the payloads given to all-gather (2·b·d) and reduce-scatter
                       (2·B·d); what crosses the links depends on the MPI's algorithms

On a machine with fewer cores than ranks, the ranks share cores, so time
per step is the work of all ranks divided among the cores.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # run from a checkout, uninstalled

import numpy  # noqa: E402

import tinyclip as tc  # noqa: E402
from benchmarks.common import machine_description, peak_extra_bytes, timed  # noqa: E402
from tinyclip import backend, distributed  # noqa: E402

MB = 2 ** 20


def theory_values(method, size, rows, dim):
    """Values (not bytes) one rank sends for one forward + backward, by the ring's schedule."""
    hops = size - 1
    if method == "siglip ring":
        return 2 * hops * rows * dim
    if method == "siglip ring 2-way":
        up, down = distributed.ring_hops(size, bidirectional=True)
        trips = [length for length in (up, down) if length > 0]
        outgoing = sum(max(length - 1, 0) for length in trips)
        home = sum(min(size - length, length) for length in trips)
        return hops * rows * dim + (outgoing + home) * rows * dim
    if method == "clip ring":
        return hops * (rows * dim + 3 * rows) + hops * (rows * dim + rows + rows * dim)
    return 2 * rows * dim + 2 * size * rows * dim          # gather: payloads handed to the collectives


def loss_of(method, comm, tile):
    if method.startswith("siglip"):
        two_way = method.endswith("2-way")
        return lambda x, y, t, b: distributed.siglip_loss(x, y, t, b, comm=comm, tile=tile, bidirectional=two_way)
    how = method.split()[1]
    return lambda x, y, t, b: distributed.clip_loss(x, y, t, comm=comm, method=how, tile=tile)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[4096, 16384, 65536], help="global batch sizes")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--tile", type=int, default=None, help="rows per tile (default: losses.default_tile)")
    parser.add_argument("--methods", nargs="+", default=["siglip ring", "siglip ring 2-way", "clip ring",
                                                          "clip gather"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--backend", choices=backend.BACKENDS, default=backend.default_backend())
    parser.add_argument("--json", action="store_true", help="also print one JSON line per row")
    args = parser.parse_args()
    backend.tune_malloc()   # as the tinyclip command and train() do: the figures are those of a real run

    comm = distributed.world()
    xp = backend.backend_module(args.backend)
    if comm.rank == 0:
        print(machine_description(xp, args.backend))
        print(f"ranks: {comm.size} ({type(comm).__name__}); CUDA-aware MPI assumed: {comm.cuda_aware}")
        print(f"d = {args.dim}, float32, every input requires a gradient; median of {args.repeat} rounds after "
              f"{args.warmup} warm-up; memory: per-rank peak extra over one forward + backward, MB = 2^20 bytes")
        print(f"{'B':>6} {'b':>6}  {'method':18} {'ms':>9} {'peak MB':>8} {'bytes/b':>8} "
              f"{'sent MB':>9} {'theory MB':>9}")
        print("-" * 83)
    for batch in args.batch:
        if batch % comm.size:
            raise SystemExit(f"--batch {batch} does not split evenly over {comm.size} ranks")
        rows = batch // comm.size
        rng = numpy.random.default_rng(comm.rank)
        leaves = []
        for _ in range(2):
            emb = rng.normal(size=(rows, args.dim)).astype(numpy.float32)
            emb /= numpy.linalg.norm(emb, axis=1, keepdims=True)
            leaves.append(tc.tensor(xp.asarray(emb), requires_grad=True))
        leaves += [tc.tensor(xp.asarray(numpy.float32(numpy.log(10.0))), requires_grad=True),
                   tc.tensor(xp.asarray(numpy.float32(-10.0)), requires_grad=True)]
        for method in args.methods:
            loss = loss_of(method, comm, args.tile)

            def step():
                for leaf in leaves:
                    leaf.grad = None
                loss(*leaves).backward()

            comm.barrier()
            before = comm.bytes_sent
            step()
            sent = comm.bytes_sent - before
            comm.barrier()
            [seconds] = timed([step], xp, args.repeat, args.warmup)
            peak = peak_extra_bytes(step, xp, args.backend)
            every = comm.all_gather_values([seconds, peak, sent], numpy.float64)
            if comm.rank == 0:
                theory = theory_values(method, comm.size, rows, args.dim) * 4
                row = {"batch": batch, "rows": rows, "method": method, "ms": every[:, 0].max() * 1e3,
                       "peak_mb": every[:, 1].max() / MB, "sent_mb": every[:, 2].max() / MB,
                       "theory_mb": theory / MB}
                print(f"{batch:>6} {rows:>6}  {method:18} {row['ms']:>9.1f} {row['peak_mb']:>8.1f} "
                      f"{every[:, 1].max() / rows:>8.0f} {row['sent_mb']:>9.2f} {row['theory_mb']:>9.2f}",
                      flush=True)
                if args.json:
                    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
