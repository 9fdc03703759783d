"""tinyclip against committed outputs of Hugging Face transformers, without torch or transformers installed.

tests/make_reference_outputs.py built small random ``CLIPModel`` and
``SiglipModel``s with transformers (fixed seeds), saved them as Hugging Face
folders (config.json + model.safetensors) in tests/fixtures/hf-*/ and wrote
beside each ``outputs.npz``: the inputs and transformers' image and text
embeddings, logit scale and bias. Here ``checkpoint.from_pretrained`` reads
each folder and must give the same outputs. The live comparison, against the
installed transformers, is tests/test_checkpoint.py's ``parity`` test.
"""

from pathlib import Path

import numpy
import pytest

from tinyclip import checkpoint

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("kind", ["clip", "clip-legacy", "siglip"])
def test_outputs_equal_transformers_committed_outputs(kind):
    folder = FIXTURES / f"hf-{kind}"
    model = checkpoint.from_pretrained(folder)
    with numpy.load(folder / "outputs.npz", allow_pickle=False) as reference:
        images, tokens = reference["images"], reference["tokens"]     # (B, H, W, 3) float32, (B, T) int64
        assert images.shape[0] == tokens.shape[0] == 3
        numpy.testing.assert_allclose(model.encode_image(images).numpy(), reference["image_embeds"],
                                      rtol=1e-4, atol=1e-5)
        numpy.testing.assert_allclose(model.encode_text(tokens).numpy(), reference["text_embeds"],
                                      rtol=1e-4, atol=1e-5)
        numpy.testing.assert_allclose(numpy.exp(model.log_scale.numpy()), numpy.exp(reference["logit_scale"]),
                                      rtol=1e-6)
        if kind == "siglip":
            numpy.testing.assert_allclose(model.bias.numpy(), reference["logit_bias"], rtol=1e-6)
        else:
            assert model.bias is None and numpy.isnan(reference["logit_bias"])


def test_the_fixtures_stay_small():
    total = sum(path.stat().st_size for path in FIXTURES.rglob("*") if path.is_file())
    assert total < 400_000, f"tests/fixtures holds {total} bytes"
