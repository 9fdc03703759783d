"""Tests for tinyclip.models: configs, presets, both towers and the two-tower model.

The whole model, in both families, passes the foundation's gradient check
(float64, every parameter, five-point finite differences) on the ``tiny``
preset; patchify equals a stride-P convolution; the causal text tower
ignores tokens after the end-of-text token; bad images and tokens get errors
that say what was expected.
"""

import dataclasses

import numpy
import pytest
from hypothesis import given, strategies as st

import tinyclip as tc
from tinyclip import backend
from tinyclip.models import CLIP, CLIPConfig, PRESETS, preset

from .gradcheck import check_targets
from .strategies import seeds

SIGLIP_TINY = dict(class_token=False, vision_pre_norm=False, patch_bias=True, vision_pooling="map",
                   vision_projection=False, embed_dim=16, causal=False, text_pooling="last",
                   text_projection_bias=True, activation="gelu_tanh", ln_eps=1e-6, init_bias=-10.0)
FAMILIES = {"clip": preset("tiny"), "siglip": preset("tiny", **SIGLIP_TINY),
            "gap-eos": preset("tiny", vision_pooling="gap", text_pooling="eos", activation="gelu"),
            "cnn": preset("tiny", vision_type="cnn", conv_channels=(3, 4)),
            "sincos": preset("tiny", position_embedding="sincos", vision_pooling="gap", class_token=False)}


def inputs_for(config, xp, seed, batch=3):
    rng = numpy.random.default_rng(seed)
    images = rng.uniform(-1, 1, (batch, config.image_size, config.image_size, 3))
    tokens = rng.integers(1, config.vocab_size - 1, (batch, config.context_length))
    tokens[:, -2] = config.vocab_size - 1      # an end-of-text id (the largest) before a padding position
    tokens[:, -1] = 0
    return xp.asarray(images), xp.asarray(tokens)


@pytest.mark.parametrize("family", FAMILIES)
def test_whole_model_gradients_match_finite_differences(xp, family):
    config = FAMILIES[family]
    model = CLIP(config, dtype="float64", backend="numpy" if xp is numpy else "cupy", seed=1)
    images, tokens = inputs_for(config, xp, 2)

    def forward():
        image_emb, text_emb, log_scale, bias = model(images, tokens)
        if bias is None:
            return tc.losses.clip_loss(image_emb, text_emb, log_scale)
        return tc.losses.siglip_loss(image_emb, text_emb, log_scale, bias)

    check_targets(forward, list(model.named_parameters()), seed=3, truncation_allowance=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_outputs_are_unit_vectors_of_the_embedding_width(xp, family):
    config = FAMILIES[family]
    model = CLIP(config, backend="numpy" if xp is numpy else "cupy")
    image_emb, text_emb, log_scale, bias = model(*inputs_for(config, xp, 0))
    for emb in (image_emb, text_emb):
        assert emb.shape == (3, config.embed_dim)
        numpy.testing.assert_allclose(numpy.linalg.norm(emb.numpy(), axis=1), 1.0, rtol=1e-5)
    assert log_scale.item() == pytest.approx(config.init_log_scale, rel=1e-6)
    assert (bias is None) == (config.init_bias is None)
    raw = model.encode_image(inputs_for(config, xp, 0)[0], normalize=False).numpy()
    assert not numpy.allclose(numpy.linalg.norm(raw, axis=1), 1.0)


@given(seed=seeds)
def test_patchify_equals_a_stride_p_convolution(seed):
    config = preset("tiny", image_size=24, patch_size=8)
    tower = CLIP(config, dtype="float64").visual
    images, _ = inputs_for(config, numpy, seed)
    patches = tower.patch_embed(tower.patchify(images)).numpy()         # (B, N, W)
    # the same weight as a convolution kernel (W, 3, P, P), applied patch by patch
    p, width = config.patch_size, config.vision_width
    kernel = tower.patch_embed.weight.numpy().reshape(width, p, p, 3).transpose(0, 3, 1, 2)
    grid = config.image_size // p
    expected = numpy.empty((images.shape[0], grid * grid, width))
    for gy in range(grid):
        for gx in range(grid):
            window = images[:, gy * p:(gy + 1) * p, gx * p:(gx + 1) * p, :]          # (B, P, P, 3)
            expected[:, gy * grid + gx] = numpy.einsum("byxc,wcyx->bw", window, kernel)
    numpy.testing.assert_allclose(patches, expected, rtol=1e-12, atol=1e-12)


@given(seed=seeds, later=st.integers(1, 62))
def test_causal_text_tower_ignores_tokens_after_end_of_text(seed, later):
    config = preset("tiny")
    model = CLIP(config, dtype="float64", seed=seed % 1000)
    _, tokens = inputs_for(config, numpy, seed)
    tokens[:, 3] = config.vocab_size - 1            # end of text at position 3, so argmax pools there
    tokens[:, 4:] = 0
    before = model.encode_text(tokens).numpy()
    tokens[:, 4:] = later
    numpy.testing.assert_array_equal(model.encode_text(tokens).numpy(), before)


def test_bidirectional_text_tower_sees_every_token():
    config = FAMILIES["siglip"]
    model = CLIP(config, dtype="float64")
    _, tokens = inputs_for(config, numpy, 0)
    before = model.encode_text(tokens).numpy()
    tokens[:, 0] = (tokens[:, 0] + 1) % config.vocab_size
    assert not numpy.allclose(model.encode_text(tokens).numpy(), before)


def test_parameter_names_and_counts():
    model = CLIP(preset("tiny"))
    names = dict(model.named_parameters())
    for name in ("visual.patch_embed.weight", "visual.class_embedding", "visual.position_embedding",
                 "visual.ln_pre.weight", "visual.transformer.blocks.0.attn.q_proj.weight",
                 "visual.ln_post.bias", "visual.proj.weight", "text.token_embedding.weight",
                 "text.position_embedding", "text.transformer.blocks.0.mlp.fc1.weight", "text.ln_final.weight",
                 "text.proj.weight", "log_scale"):
        assert name in names, name
    assert "bias" not in names
    siglip = dict(CLIP(FAMILIES["siglip"]).named_parameters())
    assert {"bias", "visual.head.probe", "visual.patch_embed.bias", "text.proj.bias"} <= set(siglip)
    assert not {"visual.class_embedding", "visual.ln_pre.weight", "visual.proj.weight"} & set(siglip)


def test_same_seed_same_weights_and_state_dict_round_trip():
    first, second = CLIP(preset("tiny"), seed=4), CLIP(preset("tiny"), seed=4)
    state = first.state_dict()
    for name, value in second.state_dict().items():
        numpy.testing.assert_array_equal(value, state[name])
    third = CLIP(preset("tiny"), seed=5)
    third.load_state_dict(state)
    for name, value in third.state_dict().items():
        numpy.testing.assert_array_equal(value, state[name])


def test_init_follows_clip_standard_deviations():
    config = preset("bench-tiny")
    params = dict(CLIP(config).named_parameters())
    width, layers = config.vision_width, config.vision_layers
    std = lambda name: float(params[name].numpy().std())   # noqa: E731
    assert std("visual.transformer.blocks.0.attn.q_proj.weight") == pytest.approx(width ** -0.5, rel=0.05)
    assert std("visual.transformer.blocks.0.mlp.fc2.weight") == pytest.approx(
        width ** -0.5 * (2 * layers) ** -0.5, rel=0.05)
    assert std("text.token_embedding.weight") == pytest.approx(0.02, rel=0.05)


def test_every_preset_is_a_valid_config():
    for name, config in PRESETS.items():
        assert isinstance(config, CLIPConfig), name
        assert CLIPConfig.from_dict(config.to_dict()) == config
    bench = preset("bench-tiny")   # DESIGN.md's speed yardstick, field by field
    assert (bench.image_size, bench.patch_size, bench.vision_width, bench.vision_layers, bench.vision_heads,
            bench.context_length, bench.vocab_size, bench.text_width, bench.text_layers, bench.text_heads,
            bench.embed_dim, bench.activation, bench.vision_pooling, bench.causal) == (
        64, 8, 256, 6, 4, 32, 4096, 256, 6, 4, 256, "quick_gelu", "cls", True)
    assert preset("siglip-base-patch16-224").family == "siglip"
    assert preset("ViT-B-32").family == "clip"


def test_cnn_tower_is_conv_batch_norm_stages_then_the_mean_and_a_projection():
    config = preset("tiny", vision_type="cnn", conv_channels=(3, 4), image_size=16)
    model = CLIP(config, dtype="float64", seed=0)
    assert [name for name, _ in model.visual.named_parameters()] == [
        "stages.0.conv.weight", "stages.0.norm.weight", "stages.0.norm.bias",
        "stages.1.conv.weight", "stages.1.norm.weight", "stages.1.norm.bias", "proj.weight"]
    assert "visual.stages.1.norm.running_var" in model.state_dict()
    images = numpy.random.default_rng(0).uniform(-1, 1, (3, 16, 16, 3))
    # by hand: two stages of conv 3×3 / 2 (16 -> 8 -> 4), batch norm on the batch's statistics, the activation
    x = images
    for stage in model.visual.stages:
        x = numpy.asarray(stage.conv(x).numpy())
        mean, var = x.reshape(-1, x.shape[-1]).mean(0), x.reshape(-1, x.shape[-1]).var(0)
        x = tc.nn.ACTIVATIONS[config.activation](tc.Tensor((x - mean) / numpy.sqrt(var + 1e-5))).numpy()
    assert x.shape == (3, 4, 4, 4)
    expected = x.mean(axis=(1, 2)) @ model.visual.proj.weight.numpy().T
    numpy.testing.assert_allclose(model.encode_image(images, normalize=False).numpy(), expected, rtol=1e-10)
    # in eval mode an image's embedding does not depend on the rest of the batch
    model.eval()
    alone = model.encode_image(images[:1]).numpy()
    numpy.testing.assert_allclose(model.encode_image(images).numpy()[:1], alone, rtol=1e-12)


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="vision_type 'cnn' needs conv_channels"):
        preset("tiny", vision_type="cnn")
    with pytest.raises(ValueError, match="conv_channels is for vision_type 'cnn'"):
        preset("tiny", conv_channels=(4,))
    with pytest.raises(ValueError, match="vision_type 'resnet' is not one of"):
        preset("tiny", vision_type="resnet")
    with pytest.raises(ValueError, match="pixel_norm 'imagenet' is not one of"):
        preset("tiny", pixel_norm="imagenet")
    assert preset("tiny").image_normalization == "clip" and preset("shapes").image_normalization == "siglip"
    assert preset("shapes", pixel_norm="clip").image_normalization == "clip"
    with pytest.raises(ValueError, match="image_size 30 is not a multiple of patch_size 8"):
        preset("tiny", image_size=30)
    with pytest.raises(ValueError, match="vision_pooling 'cls' needs class_token=True"):
        preset("tiny", class_token=False)
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        preset("huge")
    with pytest.raises(ValueError, match=r"unknown fields \['colour'\]"):
        CLIPConfig.from_dict({**preset("tiny").to_dict(), "colour": "red"})
    with pytest.raises(TypeError, match="needs a CLIPConfig"):
        CLIP({"image_size": 16})


def test_bad_images_and_tokens_say_what_was_expected():
    config = preset("tiny")
    model = CLIP(config)
    images, tokens = inputs_for(config, numpy, 0)
    with pytest.raises(ValueError, match=r"images must have shape \(batch, 16, 16, 3\).*got \(3, 32, 32, 3\)"):
        model.encode_image(numpy.zeros((3, 32, 32, 3)))
    with pytest.raises(ValueError, match="id 64 is outside the vocabulary of 64 ids"):
        model.encode_text(numpy.full((2, 4), 64))
    with pytest.raises(ValueError, match="tokens must be an integer array"):
        model.encode_text(numpy.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"1 <= length <= 8"):
        model.encode_text(numpy.zeros((2, 9), dtype=int))
    assert dataclasses.is_dataclass(config)


def test_config_types_ranges_and_bounds_are_checked_when_made():
    for overrides, message in (({"vision_width": "16"}, "vision_width '16' must be an integer"),
                               ({"class_token": 1}, "class_token 1 must be true or false"),
                               ({"vision_mlp_ratio": "4"}, "vision_mlp_ratio '4' must be a number"),
                               ({"activation": 5}, "activation 5 must be a string"),
                               ({"patch_size": 0}, r"patch_size 0 is outside \[1, 8192\]"),
                               ({"vision_heads": 0}, r"vision_heads 0 is outside"),
                               ({"vision_layers": 10**6}, r"vision_layers 1000000 is outside \[1, 512\]"),
                               ({"embed_dim": 2**31}, r"embed_dim 2147483648 is outside \[1, 16384\]"),
                               ({"ln_eps": 0.0}, r"ln_eps 0.0 is outside"),
                               ({"init_log_scale": float("nan")}, "init_log_scale nan is not a finite number"),
                               ({"init_bias": "x"}, "init_bias 'x' must be a number or None"),
                               ({"vision_mlp_ratio": 0.01}, "gives an MLP of no width"),
                               ({"conv_channels": "abc"}, "conv_channels 'abc' must be a list"),
                               ({"text_pooling": "mean"}, "text_pooling 'mean' is not one of")):
        with pytest.raises(ValueError, match=message):
            preset("tiny", **overrides)
    with pytest.raises(ValueError, match="a config is a JSON object"):
        CLIPConfig.from_dict(["tiny"])


@pytest.mark.parametrize("family", FAMILIES)
def test_a_model_built_without_values_has_the_shapes_and_no_storage(family):
    config = FAMILIES[family]
    empty, full = CLIP(config, values=False), CLIP(config)
    shapes = {name: (value.shape, value.dtype) for name, value in full.named_parameters()}
    assert {name: (value.shape, value.dtype) for name, value in empty.named_parameters()} == shapes
    assert [name for name, _ in empty.named_buffers()] == [name for name, _ in full.named_buffers()]
    for _, value in list(empty.named_parameters()) + list(empty.named_buffers()):
        assert not value.data.flags.writeable and value.data.size <= 1 or 0 in value.data.strides
    large = CLIP(preset("ViT-L-14"), values=False)             # 428 million parameters, nothing allocated
    assert sum(parameter.data.size for parameter in large.parameters()) > 4e8
    assert sum(parameter.data.base.nbytes for parameter in large.parameters()) < 1e5


# ---- padding length (issue 12): the same embedding at every padding, or an error that says why ----------------

TEXT_TOWERS = {   # (causal, text_pooling) → whether the embedding may be computed from a shorter padding
    (True, "argmax"): True, (True, "eos"): True, (True, "last"): False,
    (False, "argmax"): False, (False, "eos"): False, (False, "last"): False,
}


@given(seed=seeds, end=st.integers(0, 14), length=st.integers(1, 15),
       tower=st.sampled_from(sorted(TEXT_TOWERS)))
def test_the_embedding_never_depends_on_how_far_captions_are_padded(seed, end, length, tower):
    causal, pooling = tower
    config = preset("tiny", context_length=16, causal=causal, text_pooling=pooling, eos_id=63)
    model = CLIP(config, seed=seed % 7)
    rng = numpy.random.default_rng(seed)
    full = numpy.zeros((2, 16), dtype=numpy.int64)            # start, words, end of text (63, the largest id), 0s
    full[:, :end + 1] = rng.integers(1, 62, (2, end + 1))
    full[:, end] = 63
    whole = model.encode_text(full).numpy()
    shorter = full[:, :max(length, end + 1)]
    if shorter.shape[1] == 16:
        return
    if TEXT_TOWERS[tower]:
        numpy.testing.assert_allclose(model.encode_text(shorter).numpy(), whole, rtol=1e-5, atol=1e-6)
    else:
        with pytest.raises(ValueError, match=f"padded to its full context of 16 tokens, got {shorter.shape[1]}"):
            model.encode_text(shorter)


def test_siglips_text_tower_refuses_a_short_padding_and_says_why():
    config = preset("tiny", **SIGLIP_TINY, context_length=16)
    model = CLIP(config, seed=0)
    tokens = numpy.zeros((1, 10), dtype=numpy.int64)
    tokens[0, :4] = [5, 6, 7, 63]
    with pytest.raises(ValueError, match=r"causal=False, text_pooling='last'.*every position attends to the padding"
                                         r".*context_length=16"):
        model.encode_text(tokens)
    padded = numpy.zeros((1, 16), dtype=numpy.int64)
    padded[:, :10] = tokens
    assert numpy.isfinite(model.encode_text(padded).numpy()).all()


def test_sincos_position_embedding_follows_the_moco_v3_formula():
    from tinyclip.models.vision import sincos_position_embedding
    grid, width = 3, 8
    table = sincos_position_embedding(grid, width, class_token=True)
    assert table.shape == (1 + grid * grid, width) and not table[0].any()     # the class token's row is zero
    omega = 1.0 / 10000 ** (numpy.arange(2) / 2)
    for y in range(grid):
        for x in range(grid):
            expected = numpy.concatenate([numpy.sin(x * omega), numpy.cos(x * omega),
                                          numpy.sin(y * omega), numpy.cos(y * omega)])
            numpy.testing.assert_allclose(table[1 + y * grid + x], expected, rtol=0, atol=1e-15)
    assert len({row.tobytes() for row in table}) == len(table)                 # every position is told apart
    with pytest.raises(ValueError, match="multiple of 4"):
        sincos_position_embedding(2, 6)


def test_sincos_tower_has_no_position_parameter_and_uses_the_fixed_table():
    config = preset("tiny", position_embedding="sincos")
    model = CLIP(config, dtype="float64", seed=0)
    names = [name for name, _ in model.visual.named_parameters()]
    assert "position_embedding" not in names and "position_embedding" not in model.state_dict()
    assert not isinstance(model.visual.position_embedding, tc.Tensor)
    from tinyclip.models.vision import sincos_position_embedding
    numpy.testing.assert_array_equal(model.visual.position_embedding,
                                     sincos_position_embedding(2, config.vision_width, class_token=True))
    images, tokens = inputs_for(config, numpy, 0)
    moved = numpy.roll(images, config.patch_size, axis=2)        # the same patches, one column to the right
    assert not numpy.allclose(model.encode_image(images).data, model.encode_image(moved).data)


def test_position_embedding_kind_is_checked():
    with pytest.raises(ValueError, match="position_embedding .rope. is not one of"):
        preset("tiny", position_embedding="rope")
    with pytest.raises(ValueError, match="divisible by 4"):
        preset("tiny", position_embedding="sincos", vision_width=18, vision_heads=2)


def test_sincos_model_saves_and_loads_without_the_table(tmp_path):
    from tinyclip import checkpoint
    config = preset("tiny", position_embedding="sincos", vision_pooling="gap", class_token=False)
    model = CLIP(config, dtype="float64", seed=4)
    checkpoint.save(model, str(tmp_path / "model"))
    loaded = checkpoint.load(str(tmp_path / "model"))
    assert loaded.config == config
    images, _ = inputs_for(config, numpy, 5)
    numpy.testing.assert_array_equal(loaded.encode_image(images).data, model.encode_image(images).data)


def test_mimetic_attention_init_changes_only_the_image_towers_attention():
    plain = CLIP(preset("tiny", vision_layers=2), seed=0, dtype="float64")
    mimetic = CLIP(preset("tiny", vision_layers=2, vision_attention_init="mimetic"), seed=0, dtype="float64")
    changed = {name for name, p in plain.named_parameters()
               if not numpy.array_equal(p.data, dict(mimetic.named_parameters())[name].data)}
    assert changed == {f"visual.transformer.blocks.{i}.attn.{proj}.weight"
                       for i in range(2) for proj in ("q_proj", "k_proj", "v_proj", "out_proj")}
    with pytest.raises(ValueError, match="vision_attention_init"):
        preset("tiny", vision_attention_init="identity")
