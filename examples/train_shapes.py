"""Train a small CLIP or SigLIP model on the built-in synthetic shapes, then read its scores against chance.

The shapes data (``tinyclip.data.shapes``) are grey squares with one or two
coloured shapes and a caption that says what is drawn. ``train`` draws the
training pairs, trains a BPE tokenizer on their captions, runs the loop and
evaluates on held-out images: zero-shot classification over every colour ×
shape class, image ↔ text retrieval, and the spatial-relation probe with its
control. This script sets up a ``TrainConfig``, calls ``train`` and prints
those figures beside what guessing would score.

    python examples/train_shapes.py [--steps 100] [--loss siglip|clip] [--out runs/shapes]

The run folder then holds metrics.jsonl, summary.json, loss.png,
similarity.png and model/ (weights and tokenizer), which
``python examples/zeroshot.py OUT/model`` classifies images with.
"""

import argparse

from tinyclip.data import shapes
from tinyclip.train import TrainConfig, train


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="optimiser steps")
    parser.add_argument("--loss", choices=("siglip", "clip"), default=TrainConfig.loss,
                        help="sigmoid (SigLIP) or softmax (CLIP) loss")
    parser.add_argument("--out", default="runs/shapes", help="run folder")
    parser.add_argument("--preset", default=TrainConfig.preset, help="model preset (tinyclip.models.PRESETS)")
    parser.add_argument("--image-size", type=int, help="image side in pixels (default: the preset's)")
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size, help="pairs per step")
    args = parser.parse_args(argv)

    config = TrainConfig(
        preset=args.preset,
        model_overrides={"image_size": args.image_size} if args.image_size else {},
        loss=args.loss,
        steps=args.steps,
        batch_size=args.batch_size,
        out=args.out,
    )
    result = train(config)             # prints progress; writes the run folder

    summary = result.summary           # also in OUT/summary.json
    classes = len(shapes.class_names())
    # (summary key, what it measures, the score of a model that guesses, why)
    rows = [("zeroshot_top1", "zero-shot top-1", 1 / classes, f"one of {classes} classes"),
            ("retrieval_i2t_r1", "image -> text R@1", 1 / config.eval_pairs, f"one of {config.eval_pairs} captions"),
            ("retrieval_t2i_r1", "text -> image R@1", 1 / config.eval_pairs, f"one of {config.eval_pairs} images"),
            ("relation_acc", "relation probe", 0.5, "true or swapped caption"),
            ("control_acc", "control probe", 0.5, "true caption or one naming an absent object")]
    print(f"\n{'held-out metric':<20} {'score':>6}  {'chance':>6}")
    for key, name, chance, why in rows:
        print(f"{name:<20} {summary[key]:6.3f}  {chance:6.3f}  ({why})")
    print(f"final loss {summary['final_loss']:.4f} after {summary['steps']} steps in {summary['seconds']:.0f} s; "
          f"model in {result.out}/model")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
