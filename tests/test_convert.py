"""Tests for published models in and out: other resolutions, open_clip import, Hugging Face export.

References, where installed (tests marked ``parity`` skip cleanly otherwise):
torch's ``interpolate(mode="bicubic", align_corners=False)`` and transformers'
``interpolate_pos_encoding`` for the position-embedding resize; open_clip's
own model built from a config dict for the import; transformers'
``CLIPModel`` / ``SiglipModel`` and their tokenizers for the export. Every
reference model is small, random and saved by the test; nothing downloads.
"""

import json

import numpy
import pytest

from tinyclip import backend, checkpoint
from tinyclip.cli import main
from tinyclip.models import CLIP, preset
from tinyclip.models.vision import bicubic_matrix, resize_position_embedding

from . import strict_backend
from .test_checkpoint import hf_tiny


# ---- position embeddings at another resolution ----------------------------------------------------

@pytest.mark.parity
@pytest.mark.parametrize("grid_in, grid_out", [(4, 7), (7, 4), (3, 9), (6, 5), (2, 1)])
@pytest.mark.parametrize("class_token", [True, False])
def test_resize_equals_torch_bicubic_without_antialias(grid_in, grid_out, class_token):
    torch = pytest.importorskip("torch")
    prefix = 1 if class_token else 0
    embedding = numpy.random.default_rng(0).standard_normal((prefix + grid_in ** 2, 5))   # (prefix + g², W)
    resized = resize_position_embedding(embedding, grid_in, grid_out, class_token)
    grid = torch.from_numpy(embedding[prefix:].reshape(1, grid_in, grid_in, 5).transpose(0, 3, 1, 2).copy())
    expected = torch.nn.functional.interpolate(grid, size=(grid_out, grid_out), mode="bicubic",
                                               align_corners=False, antialias=False)
    expected = expected.numpy().transpose(0, 2, 3, 1).reshape(grid_out ** 2, 5)
    assert resized.shape == (prefix + grid_out ** 2, 5)
    numpy.testing.assert_array_equal(resized[:prefix], embedding[:prefix])     # the class token is kept
    numpy.testing.assert_allclose(resized[prefix:], expected, rtol=0, atol=1e-12)


def test_bicubic_rows_sum_to_one_and_the_same_grid_is_the_identity():
    for size_in, size_out in ((4, 7), (7, 4), (1, 3), (5, 5)):
        matrix = bicubic_matrix(numpy, size_in, size_out, numpy.float64)
        numpy.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-12)    # constants stay constant
    numpy.testing.assert_allclose(bicubic_matrix(numpy, 5, 5, numpy.float64), numpy.eye(5), atol=1e-12)
    ramp = numpy.arange(16.0)[:, None] * numpy.ones((1, 3))                  # a linear ramp along the rows
    resized = resize_position_embedding(ramp, 4, 8, class_token=False).reshape(8, 8, 3)
    assert (numpy.diff(resized[:, 0, 0]) > 0).all()                           # stays increasing down the grid


def test_resize_stays_on_the_device(monkeypatch):
    device = strict_backend.install(monkeypatch)
    embedding = device.asarray(numpy.random.default_rng(0).standard_normal((1 + 16, 4)))
    resized = resize_position_embedding(embedding, 4, 6, class_token=True)
    assert isinstance(resized, strict_backend.DeviceArray) and resized.shape == (37, 4)


def test_resize_names_a_grid_that_does_not_fit():
    with pytest.raises(ValueError, match="3x3 patch grid and a class token needs 10"):
        resize_position_embedding(numpy.zeros((9, 4)), 3, 5, class_token=True)


def test_from_pretrained_at_another_image_size(tmp_path):
    model = CLIP(preset("tiny"), seed=1)                   # 16 px, patch 8: a 2x2 grid
    checkpoint.save(model, tmp_path / "tiny")
    larger = checkpoint.from_pretrained(tmp_path / "tiny", image_size=32)
    assert larger.config.image_size == 32 and larger.visual.position_embedding.shape == (1 + 16, 16)
    numpy.testing.assert_array_equal(larger.visual.position_embedding.numpy(),
                                     resize_position_embedding(model.visual.position_embedding.numpy(), 2, 4, True))
    numpy.testing.assert_array_equal(larger.text.token_embedding.weight.numpy(),
                                     model.text.token_embedding.weight.numpy())
    images = numpy.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(numpy.float32)
    assert larger.encode_image(images).shape == (2, 8)
    same = checkpoint.from_pretrained(tmp_path / "tiny", image_size=16)
    numpy.testing.assert_array_equal(same.visual.position_embedding.numpy(), model.visual.position_embedding.numpy())
    with pytest.raises(ValueError, match="not a multiple of patch_size 8"):
        checkpoint.from_pretrained(tmp_path / "tiny", image_size=20)
    checkpoint.save(CLIP(preset("shapes", context_length=8)), tmp_path / "cnn")
    with pytest.raises(ValueError, match="only a ViT image tower"):
        checkpoint.from_pretrained(tmp_path / "cnn", image_size=32)


@pytest.mark.parity
@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("image_size", [48, 24])
def test_another_image_size_equals_transformers_interpolate_pos_encoding(tmp_path, kind, image_size):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    reference = hf_tiny(kind).eval()                        # 32 px, patch 8: a 4x4 grid
    reference.save_pretrained(tmp_path / "hf")
    model = checkpoint.from_pretrained(tmp_path / "hf", image_size=image_size)
    images = numpy.random.default_rng(0).normal(size=(2, image_size, image_size, 3)).astype(numpy.float32)
    with torch.no_grad():
        expected = reference.get_image_features(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy()),
                                                interpolate_pos_encoding=True)
    expected = getattr(expected, "pooler_output", expected).numpy()
    expected /= numpy.linalg.norm(expected, axis=1, keepdims=True)
    numpy.testing.assert_allclose(model.encode_image(images).numpy(), expected, rtol=1e-4, atol=1e-5)


def test_embed_takes_an_image_size_and_prints_json(tmp_path, capsys):
    from PIL import Image

    from tinyclip.tokenizer import Tokenizer
    tokenizer = Tokenizer.train(["a photo of a cat", "a red dog"], vocab_size=520)
    checkpoint.save(CLIP(preset("tiny", vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eot_id)),
                    tmp_path / "model")
    tokenizer.save(str(tmp_path / "model" / "tokenizer.tinyclip.json"))
    Image.new("RGB", (40, 40), (255, 0, 0)).save(tmp_path / "red.png")
    out = tmp_path / "emb.npz"
    assert main(["embed", "--model", str(tmp_path / "model"), "--images", str(tmp_path / "red.png"),
                 "--texts", "a cat", "--out", str(out), "--image-size", "32", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == {"out": str(out), "arrays": {"image_emb": [1, 8], "text_emb": [1, 8]}}
    with numpy.load(out) as arrays:
        numpy.testing.assert_allclose(numpy.linalg.norm(arrays["image_emb"], axis=1), 1.0, rtol=1e-5)
    assert main(["embed", "--model", str(tmp_path / "model"), "--images", str(tmp_path / "red.png"),
                 "--out", str(out), "--image-size", "30"]) == 2
    assert "not a multiple of patch_size" in capsys.readouterr().err
