"""Batch size, sigmoid vs softmax: does SigLIP's loss beat CLIP's mainly at small batches?

The claim (SigLIP, Zhai et al. 2023, its study of the batch size): the sigmoid loss is
clearly better than the softmax loss at small batch sizes and the gap closes
as the batch grows. Here both losses train the same small model on the
synthetic shapes with every batch size from 16 to 512 at a fixed number of
examples seen (so a batch of 16 takes 32 times the steps of one of 512),
then are scored on held-out images: zero-shot top-1 over 60 colour x shape
classes and image -> text retrieval R@1 among 200 captions.

    python examples/experiments/batch_size.py            # ~9 min on a loaded 2-core CPU
    python examples/experiments/batch_size.py --quick    # seconds: checks that it runs
"""

import sys
import time

import common

BATCH_SIZES = (16, 32, 64, 128, 256, 512)
LOSSES = ("siglip", "clip")
EXAMPLES_SEEN = 8192          # every run sees this many pairs, whatever its batch size
LR = 2e-3                     # the same peak learning rate for every batch size (TrainConfig's default)
SEEDS = 2


def main(argv=None):
    args = common.arguments(__doc__, seeds=SEEDS).parse_args(argv)
    started = time.perf_counter()
    sizes, examples = ((8, 16), 32) if args.quick else (BATCH_SIZES, EXAMPLES_SEEN)
    runs = []
    for loss in LOSSES:
        for batch in sizes:
            for seed in range(args.seeds):
                cfg = common.config(args.quick, loss=loss, batch_size=batch, steps=examples // batch, lr=LR,
                                    seed=seed)
                toy = common.Toy(cfg)
                losses = toy.run()
                metrics = toy.evaluate(args.quick)
                runs.append({"loss": loss, "batch_size": batch, "seed": seed, "steps": cfg.steps,
                             "final_loss": round(losses[-1], 4), **metrics})
                print(runs[-1], flush=True)

    table = {loss: {str(batch): {key: common.mean_spread([r[key] for r in runs
                                                          if r["loss"] == loss and r["batch_size"] == batch])
                                 for key in ("zeroshot_top1", "retrieval_i2t_r1")}
                    for batch in sizes} for loss in LOSSES}
    plt = common.pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for axis, key, title in zip(axes, ("zeroshot_top1", "retrieval_i2t_r1"),
                                ("zero-shot top-1 (60 classes)", "image -> text R@1")):
        for loss in LOSSES:
            means = [table[loss][str(b)][key]["mean"] for b in sizes]
            stds = [table[loss][str(b)][key]["std"] for b in sizes]
            axis.errorbar(sizes, means, yerr=stds, marker="o", capsize=3, label=loss)
        axis.set_xscale("log", base=2)
        axis.set_xlabel(f"batch size ({examples} examples seen)")
        axis.set_title(title)
        axis.legend()
    common.write(args.out, "batch_size", {"settings": {"batch_sizes": list(sizes), "examples_seen": examples,
                                                       "lr": LR, "seeds": args.seeds, "model": common.SMALL},
                                          "runs": runs, "table": table}, started, figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
