"""Train on your own images: a CSV of image paths and captions, in open_clip's format.

The table has a header row and one pair per row; by default the image path is
in the ``filepath`` column and the caption in ``title`` (open_clip's
``--csv-img-key`` / ``--csv-caption-key`` defaults). Relative paths are taken
relative to the CSV file's own folder::

    filepath,title
    images/00000.png,a red circle on the left
    images/00001.png,a small blue square

Every step crops each image at random (90-100% of its area) and resizes it to
the model's input size (``tinyclip.data.random_resized_crop``). The shapes
evaluation does not apply to your data, so the summary holds the loss only.

    python examples/train_csv.py --data pairs.csv [--steps 100] [--out runs/csv]
    python examples/train_csv.py --demo demo_data     # first writes demo_data/pairs.csv and its PNG images

With ``--demo DIR`` the script writes a small data set of rendered shapes
into DIR and trains on it, so it runs without any data of your own.
"""

import argparse
import csv
import os

from PIL import Image

from tinyclip.data import ShapesDataset
from tinyclip.train import TrainConfig, train


def write_demo_data(folder, pairs):
    """``pairs`` rendered shapes as folder/images/*.png, listed with their captions in folder/pairs.csv."""
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    images, captions = ShapesDataset(seed=1).batch(range(pairs))             # (pairs, 64, 64, 3) uint8
    table = os.path.join(folder, "pairs.csv")
    with open(table, "w", newline="", encoding="utf-8") as file:
        rows = csv.writer(file)          # quotes a caption that holds a comma
        rows.writerow(["filepath", "title"])
        for index, (image, caption) in enumerate(zip(images, captions)):
            path = f"images/{index:05d}.png"                                  # relative to the CSV's folder
            Image.fromarray(image).save(os.path.join(folder, path))
            rows.writerow([path, caption])
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="CSV (or tab-separated .tsv) of image paths and captions")
    source.add_argument("--demo", metavar="DIR", help="write a demo CSV with PNG images into DIR and train on it")
    parser.add_argument("--demo-pairs", type=int, default=256, help="image-caption pairs in the demo data")
    parser.add_argument("--image-column", default=TrainConfig.image_column, help="column with image paths")
    parser.add_argument("--caption-column", default=TrainConfig.caption_column, help="column with captions")
    parser.add_argument("--steps", type=int, default=100, help="optimiser steps")
    parser.add_argument("--batch-size", type=int, default=64, help="pairs per step")
    parser.add_argument("--preset", default=TrainConfig.preset, help="model preset (tinyclip.models.PRESETS)")
    parser.add_argument("--image-size", type=int, help="image side in pixels (default: the preset's)")
    parser.add_argument("--out", default="runs/csv", help="run folder")
    args = parser.parse_args(argv)

    data = write_demo_data(args.demo, args.demo_pairs) if args.demo else args.data
    config = TrainConfig(
        data=data,
        image_column=args.image_column,
        caption_column=args.caption_column,
        preset=args.preset,
        model_overrides={"image_size": args.image_size} if args.image_size else {},
        steps=args.steps,
        batch_size=args.batch_size,
        out=args.out,
    )
    # a missing or broken image is skipped with one warning (strict=True would stop instead), and the
    # loader fills its place in the batch with the next readable pair
    result = train(config)

    losses = result.losses
    print(f"\nloss {losses[0]:.4f} at the first step, {losses[-1]:.4f} at step {result.steps}; "
          f"model and tokenizer in {result.out}/model, metrics in {result.out}/metrics.jsonl")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
