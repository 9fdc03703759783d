"""Which negatives to drop from the sigmoid loss: random, hard, easy — and hard with the pairs seen matched.

The SigLIP paper (Zhai et al. 2023, "negative ratio in sigmoid loss") masks negatives out of
the loss, keeping a fraction of each row's: chosen at random, the hardest
(highest logits), or the easiest; and, because keeping fewer pairs means
learning from fewer pairs, hard negatives again with more steps so that
the number of pairs the loss sees matches the full loss's. Its finding:
dropping random or easy negatives hurts, hard ones hurt less, and hard
negatives with matched pairs seen do best. The masking is
``siglip_loss(..., keep_negatives=, negatives=)``, exposed as the
TrainConfig fields (``tinyclip train --keep-negatives 0.25 --negatives hard``).

    python examples/experiments/negatives.py            # one seed: ~9 min on a loaded 2-core CPU
    python examples/experiments/negatives.py --seeds 3  # docs/experiments.md's run: 3x that (43 min at load 6-7)
    python examples/experiments/negatives.py --quick    # seconds: checks that it runs
"""

import sys
import time

import common                  # first: it sets the BLAS threads before NumPy loads
import numpy

BATCH = 64
STEPS = 80                    # steps of every run but the matched ones
SEEDS = 1
KEEP = (0.5, 0.25, 0.1)       # fraction of each row's B - 1 negatives kept
RULES = ("random", "hard", "easy", "hard, matched")


def pairs_per_row(keep, batch):
    """The pairs of a row the masked loss sees: its positive and round(keep·(B-1)) negatives."""
    return 1 + round(keep * (batch - 1))


def main(argv=None):
    args = common.arguments(__doc__, seeds=SEEDS).parse_args(argv)
    started = time.perf_counter()
    batch, steps, keeps = (16, 3, (0.5,)) if args.quick else (BATCH, STEPS, KEEP)
    settings = [("all", 1.0, "random", steps)]
    for keep in keeps:
        for rule in RULES:
            matched = rule.endswith("matched")
            run_steps = round(steps * batch / pairs_per_row(keep, batch)) if matched else steps
            settings.append((rule, keep, rule.split(",")[0], run_steps))
    runs = []
    for rule, keep, negatives, run_steps in settings:
        for seed in range(args.seeds):
            cfg = common.config(args.quick, loss="siglip", batch_size=batch, steps=run_steps, seed=seed,
                                keep_negatives=keep, negatives=negatives)
            losses = (toy := common.Toy(cfg)).run()
            runs.append({"rule": rule, "keep": keep, "seed": seed, "steps": run_steps,
                         "pairs_seen": run_steps * batch * pairs_per_row(keep, batch),
                         "final_loss": round(losses[-1], 4), **toy.evaluate(args.quick)})
            print(runs[-1], flush=True)

    keys = ("zeroshot_top1", "retrieval_i2t_r1", "retrieval_t2i_r1")

    def of(rule, keep, key):
        return [r[key] for r in runs if r["rule"] == rule and r["keep"] == keep]      # in seed order

    table = {rule: {str(keep): {key: common.mean_spread(of(rule, keep, key)) for key in keys} for keep in keeps}
             for rule in RULES}
    table["all"] = {"1.0": {key: common.mean_spread(of("all", 1.0, key)) for key in keys}}
    # A seed fixes the initial weights and the batches, so the run with all negatives and a masked run of the same
    # seed differ only by the masking: their per-seed difference is a paired comparison, tighter than two means.
    versus_all = {rule: {str(keep): {key: common.mean_spread(numpy.subtract(of(rule, keep, key), of("all", 1.0, key)))
                                     for key in keys} for keep in keeps} for rule in RULES}
    plt = common.pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for axis, key, title in zip(axes, ("zeroshot_top1", "retrieval_i2t_r1"), ("zero-shot top-1", "image -> text R@1")):
        for number, rule in enumerate(RULES):
            points = [table[rule][str(k)][key] for k in keeps]
            line = axis.errorbar(keeps, [p["mean"] for p in points], yerr=[p["std"] for p in points], marker="o",
                                 capsize=3, label=rule)
            for k, point in zip(keeps, points):        # each seed's own score, nudged sideways to stay visible
                axis.scatter([k * 1.03 ** (number - 1.5)] * len(point["values"]), point["values"], s=9,
                             color=line[0].get_color(), alpha=0.5)
        axis.axhline(table["all"]["1.0"][key]["mean"], color="grey", linestyle=":", label="all negatives (mean)")
        axis.set_xscale("log")
        axis.set_xlabel(f"fraction of negatives kept (batch {batch})")
        axis.set_title(f"{title}: mean ± std, dots: seeds ({args.seeds})")
        axis.legend(fontsize=7)
    common.write(args.out, "negatives", {"settings": {"batch_size": batch, "steps": steps, "keep": list(keeps),
                                                      "seeds": args.seeds, "model": common.SMALL},
                                         "runs": runs, "table": table, "versus_all": versus_all}, started, figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
