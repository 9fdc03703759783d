"""Tests for published models in and out: other resolutions, open_clip import, Hugging Face export.

References, where installed (tests marked ``parity`` skip cleanly otherwise):
torch's ``interpolate(mode="bicubic", align_corners=False)`` and transformers'
``interpolate_pos_encoding`` for the position-embedding resize; open_clip's
own model built from a config dict for the import; transformers'
``CLIPModel`` / ``SiglipModel`` and their tokenizers for the export. Every
reference model is small, random and saved by the test; nothing downloads.
"""

import dataclasses
import json
import shutil

import numpy
import pytest

from tinyclip import backend, checkpoint
from tinyclip.cli import main
from tinyclip.models import CLIP, preset
from tinyclip.models.vision import bicubic_matrix, resize_position_embedding

from . import strict_backend
from .test_checkpoint import hf_tiny
from .test_siglip_tokenizer import hf_siglip_tokenizer, spiece_file  # noqa: F401  (spiece_file is a fixture)


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


# ---- open_clip checkpoints --------------------------------------------------------------------------

OPEN_CLIP_VISION = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 8, "mlp_ratio": 2.0}
OPEN_CLIP_TEXT = {"context_length": 12, "vocab_size": 99, "width": 32, "heads": 4, "layers": 2, "mlp_ratio": 2.0}
OPEN_CLIP_MODELS = {
    # OpenAI-style CLIP: QuickGELU, causal text pooled at argmax(ids)
    "clip": {"embed_dim": 24, "quick_gelu": True, "vision_cfg": OPEN_CLIP_VISION, "text_cfg": OPEN_CLIP_TEXT},
    # the SigLIP loss on open_clip's own towers: bias, bidirectional text at its last position with a biased
    # projection, exact GELU, eps 1e-6, no ln_pre, SigLIP's pixel normalisation, CustomTextCLIP's layout
    "siglip": {"embed_dim": 24, "init_logit_bias": -10.0, "init_logit_scale": 2.3, "custom_text": True,
               "vision_cfg": {**OPEN_CLIP_VISION, "no_ln_pre": True, "norm_kwargs": {"eps": 1e-6}},
               "text_cfg": {**OPEN_CLIP_TEXT, "no_causal_mask": True, "pool_type": "last", "proj_bias": True,
                            "norm_kwargs": {"eps": 1e-6}}},
    # an end-of-text id pooled by value
    "eos": {"embed_dim": 24, "vision_cfg": {**OPEN_CLIP_VISION, "final_ln_after_pool": True},
            "text_cfg": {**OPEN_CLIP_TEXT, "pool_type": "eos", "eos_id": 7}},
}


def write_open_clip_folder(folder, kind):
    """A random open_clip model of ``kind`` saved as open_clip publishes it; returns the torch model."""
    torch = pytest.importorskip("torch")
    open_clip = pytest.importorskip("open_clip")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    torch.manual_seed(0)
    model_cfg = OPEN_CLIP_MODELS[kind]
    build = open_clip.CustomTextCLIP if model_cfg.get("custom_text") else open_clip.CLIP
    model = build(**{key: value for key, value in model_cfg.items() if key != "custom_text"}).eval()
    with torch.no_grad():              # open_clip starts some weights at zero or one: make every one count
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    folder.mkdir()
    mean, std = ((0.5,) * 3, (0.5,) * 3) if kind == "siglip" else ((0.48145466, 0.4578275, 0.40821073),
                                                                   (0.26862954, 0.26130258, 0.27577711))
    (folder / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": model_cfg, "preprocess_cfg": {"mean": mean, "std": std}}))
    safetensors_torch.save_file({key: value.contiguous() for key, value in model.state_dict().items()},
                                str(folder / "open_clip_model.safetensors"))
    return model


# not a `parity` test: open_clip (with the torchvision it requires) is not in README's parity command, so
# this comparison runs only where open_clip is installed and skips, saying so, elsewhere
@pytest.mark.parametrize("kind", sorted(OPEN_CLIP_MODELS))
def test_open_clip_checkpoint_gives_open_clips_embeddings(tmp_path, kind):
    torch = pytest.importorskip("torch")

    from tinyclip import hub
    reference = write_open_clip_folder(tmp_path / "oc", kind)
    model = hub.load_model(tmp_path / "oc")
    assert model.config.family == ("siglip" if kind == "siglip" else "clip")
    assert model.config.image_normalization == ("siglip" if kind == "siglip" else "clip")
    rng = numpy.random.default_rng(0)
    images = rng.normal(size=(3, 32, 32, 3)).astype(numpy.float32)
    tokens = rng.integers(1, 90, size=(3, 12))
    tokens[:, 8] = 98 if kind == "clip" else 7                  # the end of text, then padding
    tokens[:, 9:] = 0
    with torch.no_grad():
        image_emb = reference.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), normalize=True)
        text_emb = reference.encode_text(torch.from_numpy(tokens), normalize=True)
    numpy.testing.assert_allclose(model.encode_image(images).numpy(), image_emb.numpy(), rtol=1e-4, atol=1e-5)
    numpy.testing.assert_allclose(model.encode_text(tokens).numpy(), text_emb.numpy(), rtol=1e-4, atol=1e-5)
    numpy.testing.assert_allclose(model.log_scale.numpy(), reference.logit_scale.item(), rtol=1e-6)
    if kind == "siglip":
        numpy.testing.assert_allclose(model.bias.numpy(), reference.logit_bias.item(), rtol=1e-6)


def write_open_clip_config(folder, model_cfg, preprocess_cfg=None):
    folder.mkdir(exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg,
                                                              "preprocess_cfg": preprocess_cfg or {}}))
    return folder


@pytest.mark.parametrize("change, message", [
    ({"vision_cfg": {"timm_model_name": "vit_base_patch16_siglip_224"}}, "timm model"),
    ({"text_cfg": {"hf_model_name": "roberta-base"}}, "Hugging Face model"),
    ({"vision_cfg": {"layers": [3, 4, 6, 3]}}, "ModifiedResNet"),
    ({"vision_cfg": {**OPEN_CLIP_VISION, "pool_type": "avg", "ls_init_value": 1e-4}},
     "vision_cfg.ls_init_value is 0.0001.*vision_cfg.pool_type is 'avg'"),
    ({"vision_cfg": {**OPEN_CLIP_VISION, "width": "wide"}}, "vision_cfg.width must be a positive integer"),
    ({"text_cfg": {**OPEN_CLIP_TEXT, "norm_kwargs": {"eps": 1e-6}}}, "eps differs between towers"),
    ({"wat": 1}, "model_cfg.wat is not an open_clip CLIP field"),
])
def test_open_clip_configs_tinyclip_cannot_express_are_refused_with_the_reason(tmp_path, change, message):
    from tinyclip import hub
    model_cfg = {"embed_dim": 24, "vision_cfg": OPEN_CLIP_VISION, "text_cfg": OPEN_CLIP_TEXT, **change}
    folder = write_open_clip_config(tmp_path / "oc", model_cfg)
    with pytest.raises(ValueError, match=message) as raised:
        hub.load_model(folder)
    assert "open_clip_config.json" in str(raised.value)


def test_open_clip_pickles_are_refused_and_missing_weights_named(tmp_path):
    from tinyclip import hub
    folder = write_open_clip_config(tmp_path / "oc", {"embed_dim": 24, "vision_cfg": OPEN_CLIP_VISION,
                                                      "text_cfg": OPEN_CLIP_TEXT})
    with pytest.raises(FileNotFoundError, match="open_clip_model.safetensors"):
        hub.load_model(folder)
    (folder / "open_clip_pytorch_model.bin").write_bytes(b"\x80\x04 not to be unpickled")
    with pytest.raises(ValueError, match="never unpickles"):
        hub.load_model(folder)
    with pytest.raises(ValueError, match="never unpickles"):
        hub.load_model(folder / "open_clip_pytorch_model.bin")
    (folder / "open_clip_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="open_clip_model.safetensors"):
        hub.load_model(folder)
    write_open_clip_config(folder, {"embed_dim": 24, "vision_cfg": OPEN_CLIP_VISION, "text_cfg": OPEN_CLIP_TEXT},
                           {"mean": [0.1, 0.2, 0.3], "std": [1, 1, 1]})
    with pytest.raises(ValueError, match="mean"):
        hub.load_model(folder)


def test_open_clip_weights_that_do_not_fit_are_all_named(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    from tinyclip import hub
    model_cfg = {"embed_dim": 8, "vision_cfg": {**OPEN_CLIP_VISION, "layers": 1},
                 "text_cfg": {**OPEN_CLIP_TEXT, "layers": 1}}
    folder = write_open_clip_config(tmp_path / "oc", model_cfg)
    safetensors_numpy.save_file({"visual.conv1.weight": numpy.zeros((32, 3, 4, 4), numpy.float32),
                                 "extra": numpy.zeros(2, numpy.float32)}, str(folder / "open_clip_model.safetensors"))
    with pytest.raises(ValueError) as raised:
        hub.load_model(folder)
    text = str(raised.value)
    assert "visual.conv1.weight: checkpoint (32, 3, 4, 4) vs model (32, 3, 8, 8)" in text
    assert "unexpected keys (1): extra" in text and "missing keys" in text and "logit_scale" in text


# ---- export to Hugging Face -------------------------------------------------------------------------

CAPTIONS = ["a photo of a cat.", "Two dogs on the grass", "a red circle and a blue square"]


@pytest.fixture
def clip_folder(tmp_path):
    """A tinyclip CLIP-architecture model with random weights and a BPE tokenizer trained on CAPTIONS."""
    from tinyclip.tokenizer import Tokenizer
    tokenizer = Tokenizer.train(CAPTIONS * 3, vocab_size=540)
    config = preset("tiny", vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eot_id, context_length=16,
                    image_size=32)
    model = CLIP(config, seed=3)
    checkpoint.save(model, tmp_path / "clip")
    tokenizer.save(str(tmp_path / "clip" / "tokenizer.tinyclip.json"))
    return tmp_path / "clip"


def test_export_round_trips_through_from_pretrained(clip_folder, tmp_path, capsys):
    assert main(["export", "--model", str(clip_folder), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert "CLIPModel" in capsys.readouterr().out
    names = sorted(path.name for path in (tmp_path / "hf").iterdir())
    assert names == ["config.json", "merges.txt", "model.safetensors", "preprocessor_config.json",
                     "tokenizer_config.json", "vocab.json"]
    original, exported = checkpoint.load(clip_folder), checkpoint.from_pretrained(tmp_path / "hf")
    assert exported.config == original.config
    for (name, first), (_, second) in zip(original.state_dict().items(), exported.state_dict().items()):
        numpy.testing.assert_array_equal(first, second, err_msg=name)


def test_a_clip_model_trained_with_the_siglip_loss_keeps_its_bias_through_export(clip_folder, tmp_path, capsys):
    # CLIPModel has no logit bias: export keeps it in config.json, and loading it back must not drop it (else the
    # model would come back as a CLIP-loss model: softmax zero-shot, --init under the CLIP loss)
    from tinyclip import hub
    original = checkpoint.load(clip_folder)
    original = CLIP(dataclasses.replace(original.config, init_bias=-7.25), seed=3)
    checkpoint.save(original, tmp_path / "siglip-loss")
    shutil.copy(clip_folder / "tokenizer.tinyclip.json", tmp_path / "siglip-loss")
    assert main(["export", "--model", str(tmp_path / "siglip-loss"), "--out", str(tmp_path / "hf")]) == 0
    assert "kept in config.json as tinyclip_logit_bias" in capsys.readouterr().out
    exported = checkpoint.from_pretrained(tmp_path / "hf")
    assert exported.config.family == hub.model_family(tmp_path / "hf") == "siglip"
    for (name, first), (_, second) in zip(original.state_dict().items(), exported.state_dict().items()):
        numpy.testing.assert_array_equal(first, second, err_msg=name)
    assert main(["export", "--model", str(tmp_path / "hf"), "--out", str(tmp_path / "hf")]) == 0     # and again
    assert float(checkpoint.from_pretrained(tmp_path / "hf").bias.data) == -7.25
    document = json.loads((tmp_path / "hf" / "config.json").read_text())
    for bad in ("-7", None, True):
        (tmp_path / "hf" / "config.json").write_text(json.dumps({**document, "tinyclip_logit_bias": bad}))
        with pytest.raises(ValueError, match="tinyclip_logit_bias .* must be a finite number"):
            checkpoint.from_pretrained(tmp_path / "hf")


def test_export_refuses_what_transformers_cannot_express(tmp_path, capsys):
    from tinyclip.tokenizer import Tokenizer
    tokenizer = Tokenizer.train(CAPTIONS, vocab_size=520)
    for name, config in (("cnn", preset("shapes", vocab_size=520, eos_id=519)),
                         ("gap", preset("tiny", vocab_size=520, eos_id=519, vision_pooling="gap"))):
        checkpoint.save(CLIP(config), tmp_path / name)
        tokenizer.save(str(tmp_path / name / "tokenizer.tinyclip.json"))
        assert main(["export", "--model", str(tmp_path / name), "--out", str(tmp_path / f"{name}-hf")]) == 2
        assert not (tmp_path / f"{name}-hf").exists()
    errors = capsys.readouterr().err
    assert "'cnn' tower: transformers' CLIPModel and SiglipModel have only Vision Transformer" in errors
    assert "vision_pooling='gap' (needs 'cls')" in errors


@pytest.mark.parity
def test_exported_clip_loads_in_transformers_with_the_same_embeddings_and_ids(clip_folder, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tinyclip import hub
    from tinyclip.tokenizer import find_tokenizer
    assert main(["export", "--model", str(clip_folder), "--out", str(tmp_path / "hf")]) == 0
    reference = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()
    processor = transformers.AutoProcessor.from_pretrained(tmp_path / "hf")
    model, tokenizer = hub.load_model(clip_folder), find_tokenizer(clip_folder)
    ours = tokenizer(CAPTIONS, context_length=16)
    theirs = processor.tokenizer(CAPTIONS, padding="max_length", max_length=16, truncation=True).input_ids
    for row, ids in zip(ours, theirs):
        end = list(row).index(tokenizer.eot_id) + 1
        assert ids[:end] == list(row[:end])               # then transformers pads with <|endoftext|>, we with 0
    images = numpy.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(numpy.float32)
    with torch.no_grad():
        outputs = reference(input_ids=torch.tensor(theirs),
                            pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
    numpy.testing.assert_allclose(model.encode_image(images).numpy(), outputs.image_embeds.numpy(),
                                  rtol=1e-4, atol=1e-5)
    numpy.testing.assert_allclose(model.encode_text(ours).numpy(), outputs.text_embeds.numpy(), rtol=1e-4, atol=1e-5)
    assert processor.image_processor.crop_size == {"height": 32, "width": 32}


@pytest.mark.parity
def test_exported_siglip_loads_in_transformers_with_the_same_embeddings_and_ids(spiece_file, tmp_path, capsys,
                                                                               monkeypatch):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tinyclip.tokenizer import SiglipTokenizer
    hf_siglip_tokenizer(spiece_file, monkeypatch)          # lets SiglipTokenizer load without protobuf
    torch.manual_seed(0)
    tokenizer = SiglipTokenizer.from_file(spiece_file)
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "image_size": 32, "patch_size": 8}
    text = {"vocab_size": tokenizer.vocab_size, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 16}
    original = transformers.SiglipModel(transformers.SiglipConfig(vision_config=vision, text_config=text)).eval()
    original.save_pretrained(tmp_path / "siglip")
    (tmp_path / "siglip" / "spiece.model").write_bytes(spiece_file.read_bytes())
    assert main(["export", "--model", str(tmp_path / "siglip"), "--out", str(tmp_path / "hf")]) == 0
    assert "SiglipModel" in capsys.readouterr().out
    exported = transformers.SiglipModel.from_pretrained(tmp_path / "hf").eval()
    processor = transformers.AutoProcessor.from_pretrained(tmp_path / "hf")
    ids = processor.tokenizer(CAPTIONS, padding="max_length", max_length=16, truncation=True).input_ids
    assert ids == tokenizer(CAPTIONS, context_length=16).tolist()
    pixel_values = torch.from_numpy(numpy.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(numpy.float32))
    with torch.no_grad():
        expected = original(input_ids=torch.tensor(ids), pixel_values=pixel_values)
        got = exported(input_ids=torch.tensor(ids), pixel_values=pixel_values)
    for name in ("image_embeds", "text_embeds", "logits_per_image"):
        numpy.testing.assert_allclose(getattr(got, name).numpy(), getattr(expected, name).numpy(),
                                      rtol=1e-5, atol=1e-6, err_msg=name)
