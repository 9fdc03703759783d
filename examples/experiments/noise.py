"""Noisy pairs: is the sigmoid loss more robust than the softmax loss when some pairs are wrong?

The SigLIP paper (Zhai et al. 2023, "label noise robustness") corrupts a fraction p of
the training pairs — the image replaced by noise, the text replaced by
random tokens, or the pairing broken by giving the image another example's
caption — and reports that the sigmoid loss degrades less than the
softmax loss under every kind of noise. Here each kind at p ∈ {0.1, 0.2,
0.5} (and the clean p = 0) trains both losses; the held-out images are
clean. Corruption is drawn per example from the run's seed and the
example's index, so every run sees the same corrupted pairs.

    python examples/experiments/noise.py            # one seed: ~5 min on a loaded 2-core CPU
    python examples/experiments/noise.py --seeds 3  # docs/experiments.md's run: 41 min at load 6-7
    python examples/experiments/noise.py --quick    # seconds: checks that it runs
"""

import sys
import time

import common                  # first: it sets the BLAS threads before NumPy loads
import numpy

BATCH = 64
STEPS = 80
SEEDS = 1
PROBABILITIES = (0.1, 0.2, 0.5)
KINDS = ("image", "text", "pairing")
LOSSES = ("siglip", "clip")
WORDS = ("a", "an", "small", "large", "red", "blue", "green", "yellow", "circle", "square", "star", "cross",
         "to", "the", "left", "of", "above", "below", "and", "on", "right")   # the captions' own words


def corrupter(kind, probability, seed):
    """corrupt(indices, images, captions) for Toy: each example, with ``probability``, gets ``kind`` of noise."""
    def corrupt(indices, images, captions):
        images, captions = images.copy(), list(captions)
        rng = numpy.random.default_rng([seed, indices[0]])            # the batch's own draws: deterministic
        hit = numpy.flatnonzero(rng.random(len(indices)) < probability)
        for i in hit:
            if kind == "image":                                      # uniform noise pixels
                images[i] = rng.integers(0, 256, images[i].shape, dtype=numpy.uint8)
            elif kind == "text":                                     # as many random words as the caption has
                captions[i] = " ".join(rng.choice(WORDS, len(captions[i].split())))
            else:                                                    # another example's caption
                captions[i] = captions[(i + rng.integers(1, len(captions))) % len(captions)]
        return images, captions
    return corrupt


def main(argv=None):
    args = common.arguments(__doc__, seeds=SEEDS).parse_args(argv)
    started = time.perf_counter()
    batch, steps, probabilities = (16, 3, (0.5,)) if args.quick else (BATCH, STEPS, PROBABILITIES)
    settings = [("clean", 0.0)] + [(kind, p) for kind in KINDS for p in probabilities]
    runs = []
    for loss in LOSSES:
        for kind, p in settings:
            for seed in range(args.seeds):
                cfg = common.config(args.quick, loss=loss, batch_size=batch, steps=steps, seed=seed)
                toy = common.Toy(cfg, corrupt=corrupter(kind, p, seed) if p else None)
                losses = toy.run()
                runs.append({"loss": loss, "noise": kind, "p": p, "seed": seed, "final_loss": round(losses[-1], 4),
                             **toy.evaluate(args.quick)})
                print(runs[-1], flush=True)

    keys = ("zeroshot_top1", "retrieval_i2t_r1")

    def of(loss, kind, p, key):
        kind = "clean" if p == 0 else kind
        return [r[key] for r in runs if (r["loss"], r["noise"], r["p"]) == (loss, kind, p)]      # in seed order

    ps = (0.0, *probabilities)
    table = {loss: {kind: {str(p): {key: common.mean_spread(of(loss, kind, p, key)) for key in keys} for p in ps}
                    for kind in KINDS} for loss in LOSSES}
    # A seed fixes the data, the corrupted pairs and the initial weights for both losses, so the per-seed difference
    # of their scores is a paired comparison, tighter than the two means' spreads.
    clip_minus_siglip = {kind: {str(p): {key: common.mean_spread(numpy.subtract(of("clip", kind, p, key),
                                                                                of("siglip", kind, p, key)))
                                         for key in keys} for p in ps} for kind in KINDS}
    plt = common.pyplot()
    figure, axes = plt.subplots(2, len(KINDS), figsize=(11, 6), sharey="row", sharex=True)
    panels = (("zeroshot_top1", "zero-shot top-1"), ("retrieval_i2t_r1", "image -> text R@1"))
    for row, (key, label) in enumerate(panels):
        for axis, kind in zip(axes[row], KINDS):
            for number, loss in enumerate(LOSSES):
                points = [table[loss][kind][str(p)][key] for p in ps]
                line = axis.errorbar(ps, [x["mean"] for x in points], yerr=[x["std"] for x in points], marker="o",
                                     capsize=3, label=f"{loss} (mean ± std)")
                for p, point in zip(ps, points):        # each seed's own score, nudged sideways to stay visible
                    axis.scatter([p + 0.008 * (2 * number - 1)] * len(point["values"]), point["values"], s=9,
                                 color=line[0].get_color(), alpha=0.5)
            axis.set_title(f"{kind} noise, {args.seeds} seed(s)")
            if row == 1:
                axis.set_xlabel("p (fraction of pairs corrupted)")
        axes[row][0].set_ylabel(f"{label} (clean test)")
        axes[row][0].legend(fontsize=8)
    common.write(args.out, "noise", {"settings": {"batch_size": batch, "steps": steps, "p": list(ps),
                                                  "seeds": args.seeds, "model": common.SMALL},
                                     "runs": runs, "table": table,
                                     "clip_minus_siglip": clip_minus_siglip}, started, figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
