"""Data-parallel training over MPI: several processes share every global batch and one distributed loss.

Launched with ``mpiexec -n D``, each of the D processes (ranks) builds the
same model (rank 0's initial weights are broadcast to all), loads its own
slice of every global batch and encodes only that slice. The loss is the one
of the whole global batch, as a single process would compute it: every
image is contrasted with every caption of all ranks. ``tinyclip.distributed``
computes it by passing caption embeddings round a ring of ranks, so no rank
ever holds the full B × B logits (SigLIP's chunked loss, and a two-pass ring
for CLIP's softmax; ``--clip-method gather`` is the simple all-gather
baseline). The gradients are then summed over the ranks, and every rank takes
the same optimiser step. ``train`` does all of this when it is handed the
job's communicator; only rank 0 prints and writes the run folder.

    OPENBLAS_NUM_THREADS=1 mpiexec -n 4 python examples/train_mpi.py [--steps 100] [--loss siglip|clip]

One BLAS thread per rank keeps D ranks from each starting a thread per core.
``pip install 'tinyclip[mpi]'`` provides mpi4py and MPICH's ``mpiexec``.
Without ``mpiexec`` the same script trains on one process.
"""

import argparse

from tinyclip import distributed
from tinyclip.train import TrainConfig, train


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="optimiser steps")
    parser.add_argument("--loss", choices=("siglip", "clip"), default=TrainConfig.loss,
                        help="sigmoid (SigLIP) or softmax (CLIP) loss")
    parser.add_argument("--clip-method", choices=("ring", "gather"), default=TrainConfig.clip_method,
                        help="how the CLIP loss crosses the ranks (same numbers either way)")
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size, help="global batch over all ranks")
    parser.add_argument("--preset", default=TrainConfig.preset, help="model preset (tinyclip.models.PRESETS)")
    parser.add_argument("--image-size", type=int, help="image side in pixels (default: the preset's)")
    parser.add_argument("--out", default="runs/mpi", help="run folder (written by rank 0)")
    args = parser.parse_args(argv)

    comm = distributed.world()          # MPI's world under mpiexec, a one-process stand-in otherwise
    lead = comm.rank == 0
    if lead:
        print(f"{comm.size} rank(s) share every global batch of {args.batch_size} pairs, about "
              f"{args.batch_size // comm.size} each; the {args.loss} loss spans the whole batch")

    config = TrainConfig(
        preset=args.preset,
        model_overrides={"image_size": args.image_size} if args.image_size else {},
        loss=args.loss,
        clip_method=args.clip_method,
        steps=args.steps,
        batch_size=args.batch_size,    # global: the same number on any count of ranks gives the same run
        out=args.out,
    )
    result = train(config, comm=comm)  # every rank runs the loop; only rank 0 prints and writes files

    if lead:
        summary = result.summary
        print(f"\n{comm.size} ranks, {summary['steps']} steps in {summary['seconds']:.0f} s: "
              f"final loss {summary['final_loss']:.4f}, held-out zero-shot top-1 {summary['zeroshot_top1']:.3f}; "
              f"run folder {result.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
