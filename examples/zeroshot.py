"""Zero-shot classification with a trained model: class names in prompt templates, ensembled, against images.

Each class name is written into every template ("a small {}", "a large {}"),
the prompts are encoded, and their unit embeddings averaged into one class
embedding (the CLIP paper's prompt ensembling, §3.1.4;
``tinyclip.evaluate.encode_classes``). An image belongs to the class whose
embedding is most similar to its own. Scores are read the way the model was
trained to read them: a softmax over the classes for a CLIP-loss model, an
independent sigmoid per class for a SigLIP-loss one.

    python examples/zeroshot.py RUN/model [IMAGE ...] [--classes "red circle" "blue square" ...]
                                [--template "a photo of a {}." ...] [--top 3] [--count 4]

RUN is a folder written by ``examples/train_shapes.py`` or ``tinyclip train``
(the run folder itself is accepted too). Without IMAGE paths it classifies
``--count`` held-out shapes images and shows their true class; the classes
default to every colour × shape and the templates to the ones the training
run evaluates with.
"""

import argparse
import os

import numpy

from tinyclip import backend, checkpoint, evaluate
from tinyclip.data import preprocess_batch, shapes
from tinyclip.tokenizer import Tokenizer
from tinyclip.checkpoint import TOKENIZER_FILE


def load_model_and_tokenizer(folder):
    """The model saved in ``folder`` (RUN/model, or RUN) and the tokenizer saved beside its weights."""
    if os.path.isdir(os.path.join(folder, "model")):
        folder = os.path.join(folder, "model")
    model = checkpoint.load(folder)
    return model, Tokenizer.load(os.path.join(folder, TOKENIZER_FILE))


def shapes_images(count, image_size):
    """``count`` held-out shapes images of different classes: (uint8 (count, S, S, 3), their class names)."""
    images, labels, names = shapes.zeroshot_set(per_class=1, image_size=image_size)   # one image per class
    # classes are listed colour by colour, so evenly spaced picks differ in colour and in shape
    picks = numpy.linspace(0, len(images) - 1, count).round().astype(int)
    return images[picks], [names[label] for label in labels[picks]]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a model folder written by training (RUN/model), or the run folder")
    parser.add_argument("images", nargs="*", help="image files (default: held-out shapes images)")
    parser.add_argument("--classes", nargs="+", default=shapes.class_names(), help="class names")
    parser.add_argument("--template", dest="templates", action="append",
                        help="prompt with {} for the class name; repeat to ensemble (default: the shapes templates)")
    parser.add_argument("--top", type=int, default=3, help="classes to show per image")
    parser.add_argument("--count", type=int, default=4, help="shapes images to classify when no paths are given")
    args = parser.parse_args(argv)
    templates = args.templates or shapes.ZEROSHOT_TEMPLATES

    model, tokenizer = load_model_and_tokenizer(args.model)
    size, family = model.config.image_size, model.config.family
    if args.images:
        images = preprocess_batch(args.images, size, family)      # (n, S, S, 3) float, normalised
        names = args.images
    else:
        images, truths = shapes_images(args.count, size)          # (n, S, S, 3) uint8, normalised when encoded
        names = [f"shapes image of a {truth}" for truth in truths]

    class_emb = evaluate.encode_classes(model, tokenizer, args.classes, templates)   # (classes, D), unit rows
    image_emb = evaluate.encode_images(model, images)                                # (images, D), unit rows
    cosines = backend.to_numpy(image_emb @ class_emb.T)                              # (images, classes)
    # the learnt temperature (and SigLIP's bias) turn cosines into the logits the loss was trained on
    logits = numpy.exp(model.log_scale.item()) * cosines
    if model.bias is None:             # CLIP: one distribution over the classes
        scores = numpy.exp(logits - logits.max(axis=1, keepdims=True))
        scores /= scores.sum(axis=1, keepdims=True)
    else:                              # SigLIP: each class's own probability of matching the image
        scores = 1 / (1 + numpy.exp(-(logits + model.bias.item())))

    print(f"{len(args.classes)} classes x {len(templates)} templates: {', '.join(map(repr, templates))}")
    for name, row in zip(names, scores):
        best = numpy.argsort(-row)[:args.top]
        print(f"{name}: " + ", ".join(f"{args.classes[i]} {row[i]:.3f}" for i in best))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
