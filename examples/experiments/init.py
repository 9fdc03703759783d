"""Temperature and bias initialisation of the sigmoid loss: why SigLIP starts at t' = log 10, b = -10.

SigLIP (Zhai et al. 2023, where it defines the loss) starts the scale at t = exp(t') = 10 and the
bias at b = -10, "to ensure the training starts roughly close to the prior
and does not require massive over-correction": of the B² pairs in a batch
only B are positives, so at the start (cosines near 0, logits near b) the
loss per image is about softplus(-b) + (B-1)·softplus(b) — 44 with b = 0 at
B = 64, but 10 with b = -10. This script trains the same small model with
t' ∈ {log 1, log 10} and b ∈ {0, -5, -10, -log B} and records the loss of
the first steps (with that estimate beside it) and the held-out accuracy at
the end.

    python examples/experiments/init.py             # ~8 min on a loaded 2-core CPU
    python examples/experiments/init.py --quick     # seconds: checks that it runs
"""

import math
import sys
import time

import common

BATCH = 64
STEPS = 120
EARLY = 10                    # "early loss": the mean of the first EARLY steps
SEEDS = 2
LOG_SCALES = {"log 1": 0.0, "log 10": math.log(10.0)}
BIASES = {"0": 0.0, "-5": -5.0, "-10": -10.0, "-log B": -math.log(BATCH)}


def initial_loss(bias, batch):
    """The loss when every cosine is 0 (logits = b): softplus(-b) + (B-1)·softplus(b), per image."""
    softplus = lambda u: math.log1p(math.exp(-abs(u))) + max(u, 0.0)        # noqa: E731
    return softplus(-bias) + (batch - 1) * softplus(bias)


def main(argv=None):
    args = common.arguments(__doc__, seeds=SEEDS).parse_args(argv)
    started = time.perf_counter()
    batch, steps, early = (16, 4, 2) if args.quick else (BATCH, STEPS, EARLY)
    runs = []
    for scale_name, log_scale in LOG_SCALES.items():
        for bias_name, bias in BIASES.items():
            bias = -math.log(batch) if bias_name == "-log B" else bias
            for seed in range(args.seeds):
                cfg = common.config(args.quick, loss="siglip", batch_size=batch, steps=steps, seed=seed,
                                    model_overrides={"init_log_scale": log_scale, "init_bias": bias})
                toy = common.Toy(cfg)
                losses = toy.run()
                runs.append({"log_scale": scale_name, "bias": bias_name, "seed": seed,
                             "first_loss": round(losses[0], 4),
                             "estimate_at_start": round(initial_loss(bias, batch), 4),
                             "early_loss": round(sum(losses[:early]) / early, 4), "final_loss": round(losses[-1], 4),
                             "final_bias": round(float(toy.model.bias.item()), 3),
                             "final_scale": round(math.exp(float(toy.model.log_scale.item())), 3),
                             "losses": [round(x, 4) for x in losses], **toy.evaluate(args.quick)})
                print({k: v for k, v in runs[-1].items() if k != "losses"}, flush=True)

    plt = common.pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for run in runs:
        if run["seed"] == 0:
            style = "-" if run["log_scale"] == "log 10" else "--"
            axes[0].plot(range(1, len(run["losses"]) + 1), run["losses"], style,
                         label=f"t'={run['log_scale']}, b={run['bias']}")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel(f"sigmoid loss (batch {batch})")
    axes[0].legend(fontsize=7)
    labels = [f"{s}\nb={b}" for s in LOG_SCALES for b in BIASES]
    means = [sum(r["zeroshot_top1"] for r in runs if (r["log_scale"], r["bias"]) == (s, b)) / args.seeds
             for s in LOG_SCALES for b in BIASES]
    axes[1].bar(range(len(labels)), means)
    axes[1].set_xticks(range(len(labels)), labels, fontsize=7)
    axes[1].set_ylabel(f"zero-shot top-1 after {steps} steps")
    common.write(args.out, "init", {"settings": {"batch_size": batch, "steps": steps, "early_steps": early,
                                                 "seeds": args.seeds, "model": common.SMALL}, "runs": runs},
                 started, figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
