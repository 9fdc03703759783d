"""Does a trained image tower encode shape? A linear probe on its frozen embeddings (docs/vit.md, section 1b).

    PYTHONPATH=. python docs/vit/linear_probe.py RUN/checkpoint/step-N [...]

For each training checkpoint, embeds `shapes.zeroshot_set(20, seed=1)` (1,200
single-object images) to fit a logistic regression (`evaluate.linear_probe`) and
`zeroshot_set(10, seed=0)` (600) to test it. It does this twice, once on the shape
alone (chance 1/6) and once on the colour alone (chance 1/10). A checkpoint of a
run with a preset registered only inside docs/vit/run.py still loads, because
the model folder carries its whole config.
"""
import sys

import numpy

from tinyclip import checkpoint, evaluate
from tinyclip.data import shapes
from tinyclip.data.transforms import model_input


def embeddings(model, images, batch=100):
    rows = []
    for start in range(0, len(images), batch):
        pixels = numpy.stack([numpy.asarray(image) for image in images[start:start + batch]])   # uint8
        rows.append(model.encode_image(model_input(pixels, model.config.image_normalization, "numpy",
                                                   "float32")).data)
    return numpy.concatenate(rows)


def main(paths):
    train_images, train_labels, _ = shapes.zeroshot_set(20, seed=1)
    test_images, test_labels, _ = shapes.zeroshot_set(10, seed=0)
    train_labels, test_labels = numpy.asarray(train_labels), numpy.asarray(test_labels)
    shape_count = len(shapes.SHAPES)                     # label = colour index × shapes + shape index
    for path in paths:
        model = checkpoint.load(f"{path}/model")
        train_x, test_x = embeddings(model, train_images), embeddings(model, test_images)
        shape = evaluate.linear_probe(train_x, train_labels % shape_count, test_x, test_labels % shape_count,
                                      shape_count)[0]
        colour = evaluate.linear_probe(train_x, train_labels // shape_count, test_x, test_labels // shape_count,
                                       len(shapes.COLOURS))[0]
        print(f"{path}: shape {shape:.3f}, colour {colour:.3f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
