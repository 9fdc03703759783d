"""The modality gap: image and text embeddings sit in two separate clouds — how far apart, and does it matter?

Liang et al. 2022 ("Mind the Gap", NeurIPS) found that CLIP's image and text
embeddings occupy two narrow cones apart from each other on the sphere: it
starts at initialisation (each randomly initialised tower maps everything
into its own cone) and contrastive training at CLIP's low temperature keeps
it; a higher temperature narrows it; and shifting one cloud along the gap
vector changes zero-shot accuracy only a little. This script trains the
CLIP loss with the scale t = 1/τ fixed at 1, 10 and 100, and learned from
CLIP's initial 1/0.07, and every few steps measures on 200 held-out pairs:

* the gap: ‖mean(image embeddings) − mean(text embeddings)‖ (0 to 2);
* linear separability: a logistic regression told "image or text?", fitted on
  half the embeddings and tested on the other half (0.5: indistinguishable);

then, at the end, moves the image embeddings by λ·(text centroid − image
centroid) (renormalised) for λ from 0 to 1 and measures zero-shot top-1.

    python examples/experiments/modality_gap.py            # one seed: ~5 min on a loaded 2-core CPU
    python examples/experiments/modality_gap.py --seeds 3  # three seeds: about 3x that
    python examples/experiments/modality_gap.py --quick    # seconds: checks that it runs
"""

import math
import sys
import time

import common                  # first: it sets the BLAS threads before NumPy loads
import numpy
from tinyclip import evaluate

BATCH = 64
STEPS = 250
MEASURE_EVERY = 25
SCALES = {"t=1 (fixed)": 1.0, "t=10 (fixed)": 10.0, "t=100 (fixed)": 100.0, "learned from 1/0.07": None}
SHIFTS = (0.0, 0.25, 0.5, 0.75, 1.0)


def gap_and_separability(model, tokenizer, retrieval):
    """(centroid distance, held-out accuracy of a linear image-vs-text classifier) on the retrieval pairs."""
    images = evaluate.encode_images(model, retrieval.images)                        # (n, D), unit rows
    texts = evaluate.encode_texts(model, tokenizer, retrieval.captions)             # (n, D)
    gap = float(numpy.linalg.norm(images.mean(axis=0) - texts.mean(axis=0)))
    half = len(images) // 2
    train = numpy.concatenate([images[:half], texts[:half]])
    test = numpy.concatenate([images[half:], texts[half:]])
    labels = lambda n: numpy.repeat([0, 1], n)                                     # noqa: E731  image 0, text 1
    accuracy, _ = evaluate.linear_probe(train, labels(half), test, labels(len(images) - half), classes=2)
    return gap, accuracy


def shifted_zeroshot(model, tokenizer, zeroshot, retrieval):
    """Zero-shot top-1 with the image embeddings moved by λ·(text centroid − image centroid), for each λ."""
    model.eval()
    images = evaluate.encode_images(model, retrieval.images)
    texts = evaluate.encode_texts(model, tokenizer, retrieval.captions)
    direction = texts.mean(axis=0) - images.mean(axis=0)                             # (D,): measured off the test set
    queries = evaluate.encode_images(model, zeroshot.images)
    classes = evaluate.encode_classes(model, tokenizer, zeroshot.class_names, zeroshot.templates)
    scores = {}
    for shift in SHIFTS:
        moved = queries + shift * direction
        moved /= numpy.linalg.norm(moved, axis=1, keepdims=True)
        scores[str(shift)] = round(evaluate.zeroshot_accuracy(moved, classes, zeroshot.labels)["top1"], 4)
    model.train()
    return scores


def train_and_measure(name, scale, seed, batch, steps, every, sets, quick):
    """One run of the CLIP loss at a fixed (or learned) scale: its gap curve, final scores and shifted zero-shot."""
    init = math.log(scale if scale else 1 / 0.07)
    cfg = common.config(quick, loss="clip", batch_size=batch, steps=steps, seed=seed,
                        model_overrides={"init_log_scale": init})
    toy = common.Toy(cfg)
    toy.model.log_scale.requires_grad = scale is None                 # a fixed temperature takes no step
    curve = []

    def measure(toy):
        toy.model.eval()
        gap, separable = gap_and_separability(toy.model, toy.tokenizer, sets["retrieval"])
        toy.model.train()
        curve.append({"step": toy.steps_done, "gap": round(gap, 4), "separability": round(separable, 4),
                      "scale": round(math.exp(float(toy.model.log_scale.item())), 3)})
        print(name, seed, curve[-1], flush=True)

    measure(toy)                                                        # step 0: the gap at initialisation
    toy.run(every=every, callback=measure)
    run = {"setting": name, "seed": seed, "curve": curve, **toy.evaluate(quick),
           "zeroshot_after_shift": shifted_zeroshot(toy.model, toy.tokenizer, sets["zeroshot"], sets["retrieval"])}
    print(name, seed, run["zeroshot_after_shift"], flush=True)
    return run


def main(argv=None):
    args = common.arguments(__doc__).parse_args(argv)
    started = time.perf_counter()
    batch, steps, every = (16, 4, 2) if args.quick else (BATCH, STEPS, MEASURE_EVERY)
    sets = common.eval_sets(args.quick)
    runs = []
    for name, scale in SCALES.items():
        for seed in range(args.seeds):
            runs.append(train_and_measure(name, scale, seed, batch, steps, every, sets, args.quick))

    def of(name, pick):
        return [pick(run) for run in runs if run["setting"] == name]                   # in seed order

    final = {"gap": lambda run: run["curve"][-1]["gap"], "separability": lambda run: run["curve"][-1]["separability"],
             "scale": lambda run: run["curve"][-1]["scale"]}
    final.update({key: (lambda run, key=key: run[key]) for key in ("zeroshot_top1", "retrieval_i2t_r1")})
    final.update({f"zeroshot_shift_{s}": (lambda run, s=s: run["zeroshot_after_shift"][str(s)]) for s in SHIFTS})
    final["zeroshot_largest_shift_change"] = lambda run: max(abs(score - run["zeroshot_after_shift"]["0.0"])
                                                            for score in run["zeroshot_after_shift"].values())
    table = {name: {key: common.mean_spread(of(name, pick)) for key, pick in final.items()} for name in SCALES}
    plt = common.pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    colours = dict(zip(SCALES, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for run in runs:                        # one line per seed, a colour per setting
        look = {"color": colours[run["setting"]], "label": run["setting"] if run["seed"] == 0 else None,
                "alpha": 1.0 if run["seed"] == 0 else 0.5}
        axes[0].plot([p["step"] for p in run["curve"]], [p["gap"] for p in run["curve"]], "o-", ms=3, **look)
        axes[1].plot([p["step"] for p in run["curve"]], [p["separability"] for p in run["curve"]], "o-", ms=3,
                     **look)
        axes[2].plot(SHIFTS, [run["zeroshot_after_shift"][str(s)] for s in SHIFTS], "o-", ms=3, **look)
    axes[0].set(xlabel="step", ylabel="‖image centroid − text centroid‖", title=f"the gap ({args.seeds} seed(s))")
    axes[1].set(xlabel="step", ylabel="held-out accuracy", title="linear separability of image vs text")
    axes[2].set(xlabel="λ (image embeddings moved by λ·gap)", ylabel="zero-shot top-1", title="closing the gap")
    axes[0].legend(fontsize=7)
    common.write(args.out, "modality_gap", {"settings": {"batch_size": batch, "steps": steps, "loss": "clip",
                                                         "seeds": args.seeds, "model": common.SMALL},
                                            "runs": runs, "table": table}, started, figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
