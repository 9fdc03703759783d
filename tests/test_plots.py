"""Tests for tinyclip.plots: training curves and the similarity matrix come out as PNG files.

The pictures themselves are judged by eye; these tests check that each
kind of input draws, that the file is a whole PNG of the expected size
written without leftovers beside it, that bad inputs are named, and that a
missing matplotlib gives the install command instead of a traceback.
"""

import math
import os
import sys

import numpy
import pytest
from PIL import Image

from tinyclip import plots


def png_size(path):
    """(width, height) of a PNG that decodes in full."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()
        return image.size


def training_records(steps=60, eval_every=20, loss_offset=0.1):
    records = [{"step": step, "loss": 4.0 * math.exp(-step / 20) + loss_offset, "lr": 1e-3} for step in range(steps)]
    for step in range(0, steps, eval_every):
        records.append({"step": step, "zeroshot_top1": step / steps, "zeroshot_top5": min(1.0, 2 * step / steps),
                        "retrieval_i2t_r1": step / (2 * steps), "retrieval_t2i_r1": step / (3 * steps),
                        "relation_acc": 0.5, "control_acc": 0.5 + step / (2 * steps)})
    return records


@pytest.fixture
def matplotlib_installed():
    return pytest.importorskip("matplotlib")


@pytest.mark.parametrize("records", [
    training_records(),
    training_records(eval_every=1000),                                   # no evaluation yet
    training_records(loss_offset=-1.0),                                  # losses below zero: a linear axis
    training_records() + [{"step": 60, "loss": float("nan")}],           # a NaN loss is left out
], ids=["with-evaluation", "loss-only", "negative-loss", "nan-loss"])
def test_plot_training_writes_one_png(matplotlib_installed, tmp_path, records):
    path = tmp_path / "training.png"
    plots.plot_training(iter(records), path)
    assert png_size(path) == (1200, 450)
    assert os.listdir(tmp_path) == ["training.png"]          # the temporary file was renamed, not left behind


def test_plot_training_replaces_an_existing_picture(matplotlib_installed, tmp_path):
    path = tmp_path / "training.png"
    path.write_bytes(b"an old picture")
    plots.plot_training(training_records(), str(path))
    assert png_size(path) == (1200, 450)


def test_plot_training_bad_records_are_named(matplotlib_installed, tmp_path):
    with pytest.raises(ValueError, match="no record has a \"step\" and a finite \"loss\""):
        plots.plot_training([{"step": 0, "zeroshot_top1": 0.5}], tmp_path / "training.png")
    with pytest.raises(ValueError, match="metrics_records must be dicts"):
        plots.plot_training(["step 0 loss 1.0"], tmp_path / "training.png")
    assert os.listdir(tmp_path) == []


def similarity_inputs(pairs, seed=0):
    rng = numpy.random.default_rng(seed)
    image_emb = rng.normal(size=(pairs, 8))
    text_emb = image_emb + 0.5 * rng.normal(size=(pairs, 8))
    images = rng.integers(0, 256, (pairs, 16, 16, 3), dtype=numpy.uint8)
    captions = [f"a red circle left of a blue square, pair {index}" for index in range(pairs)]
    return image_emb, text_emb, images, captions


@pytest.mark.parametrize("pairs, size", [(3, (640, 440)), (15, (1360, 1160))])   # 15 pairs are cut to 12
def test_plot_similarity_writes_one_png_of_at_most_twelve_pairs(matplotlib_installed, tmp_path, pairs, size):
    path = tmp_path / "similarity.png"
    plots.plot_similarity(*similarity_inputs(pairs), path)
    assert png_size(path) == size
    assert os.listdir(tmp_path) == ["similarity.png"]


def test_plot_similarity_shows_preprocessed_float_images(matplotlib_installed, tmp_path):
    image_emb, text_emb, images, captions = similarity_inputs(4)
    float_images = (images.astype(numpy.float32) / 255 - 0.5) / 0.5
    float_images[0] = 0.0                                      # a flat image must not divide by zero
    plots.plot_similarity(image_emb, text_emb, float_images, captions, tmp_path / "similarity.png")
    assert png_size(tmp_path / "similarity.png")[0] > 0


@pytest.mark.parametrize("change, message", [
    (lambda inputs: (inputs[0][:3], *inputs[1:]), "one entry per pair"),
    (lambda inputs: (inputs[0], inputs[1][:, :4], *inputs[2:]), "same width"),
    (lambda inputs: (inputs[0], inputs[1], inputs[2][..., 0], inputs[3]), "images must be a non-empty 4-D array"),
    (lambda inputs: (*inputs[:3], "one caption"), "captions must be a list of str"),
    (lambda inputs: (numpy.zeros_like(inputs[0]), *inputs[1:]), "image_emb has a zero or non-finite row"),
])
def test_plot_similarity_bad_inputs_are_named(matplotlib_installed, tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        plots.plot_similarity(*change(similarity_inputs(4)), tmp_path / "similarity.png")


def test_missing_matplotlib_names_the_install_command(monkeypatch, tmp_path):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)              # a None entry makes the import fail
    assert not plots.available()
    with pytest.raises(ImportError, match=r"pip install 'tinyclip\[plot\]'"):
        plots.plot_training(training_records(), tmp_path / "training.png")
    with pytest.raises(ImportError, match=r"pip install 'tinyclip\[plot\]'"):
        plots.plot_similarity(*similarity_inputs(2), tmp_path / "similarity.png")
    assert os.listdir(tmp_path) == []
