"""Tests for tinyclip.checkpoint: the own format, safetensors I/O and Hugging Face import.

Save / load is bitwise in both families; a save that fails halfway leaves
the old checkpoint in place; pickle files are refused unread; weights that do
not fit are refused with every offending key named. Hugging Face import is
tested without transformers on a folder written in Hugging Face's layout
(built from a tinyclip model through the inverse of the key table), and,
where torch and transformers are installed, against randomly initialised
tiny ``CLIPModel`` / ``SiglipModel`` instances saved with ``save_pretrained``.
"""

import json
import os

import numpy
import pytest

from tinyclip import backend, checkpoint
from tinyclip.models import CLIP, preset

from .test_models import SIGLIP_TINY, inputs_for

FAMILIES = {"clip": preset("tiny"), "siglip": preset("tiny", **SIGLIP_TINY)}


def assert_same_weights(first, second):
    first_state, second_state = first.state_dict(), second.state_dict()
    assert list(first_state) == list(second_state)
    for name, value in first_state.items():
        assert value.dtype == second_state[name].dtype, name
        numpy.testing.assert_array_equal(backend.to_numpy(value), backend.to_numpy(second_state[name]), err_msg=name)


def assert_same_embeddings(first, second, xp=numpy):
    images, tokens = inputs_for(first.config, xp, 0)
    numpy.testing.assert_array_equal(second.encode_image(images).numpy(), first.encode_image(images).numpy())
    numpy.testing.assert_array_equal(second.encode_text(tokens).numpy(), first.encode_text(tokens).numpy())


# ---- tinyclip's own format -------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_save_load_round_trip_is_bitwise(tmp_path, family, dtype):
    model = CLIP(FAMILIES[family], dtype=dtype, seed=3)
    checkpoint.save(model, tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["config.json", "model.safetensors"]
    loaded = checkpoint.load(tmp_path / "ckpt")
    assert loaded.config == model.config
    assert_same_weights(model, loaded)
    assert_same_embeddings(model, loaded)
    assert_same_weights(model, checkpoint.from_pretrained(tmp_path / "ckpt"))
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]          # no staging folders left behind


def test_round_trip_on_every_backend(tmp_path, xp):
    name = "numpy" if xp is numpy else "cupy"
    model = CLIP(FAMILIES["siglip"], backend=name, seed=2)
    checkpoint.save(model, tmp_path / "ckpt")                 # CuPy weights are copied to the host
    loaded = checkpoint.load(tmp_path / "ckpt", backend=name)
    assert backend.backend_of(loaded.log_scale.data) == name
    assert_same_weights(model, loaded)
    assert_same_embeddings(model, loaded, xp)
    assert_same_weights(model, checkpoint.load(tmp_path / "ckpt", backend="numpy"))


def test_load_converts_dtype_on_request(tmp_path):
    model = CLIP(FAMILIES["clip"], dtype="float64", seed=1)
    checkpoint.save(model, tmp_path / "ckpt")
    loaded = checkpoint.load(tmp_path / "ckpt", dtype="float32")
    assert loaded.log_scale.data.dtype == numpy.float32
    numpy.testing.assert_array_equal(loaded.log_scale.numpy(), model.log_scale.numpy().astype(numpy.float32))


def test_save_replaces_an_old_checkpoint_only_when_the_new_one_is_complete(tmp_path, monkeypatch):
    old, new = CLIP(FAMILIES["clip"], seed=1), CLIP(FAMILIES["clip"], seed=2)
    checkpoint.save(old, tmp_path / "ckpt")

    def fail_halfway(path, arrays, metadata=None):
        with open(path, "wb") as file:
            file.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "write_safetensors", fail_halfway)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(new, tmp_path / "ckpt")
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    assert_same_weights(old, checkpoint.load(tmp_path / "ckpt"))

    real_replace = os.replace
    calls = []

    def fail_on_swap(source, target):
        calls.append(target)
        if len(calls) == 2:                    # old moved aside, new about to take its place
            raise OSError("rename failed")
        real_replace(source, target)

    monkeypatch.setattr(checkpoint.os, "replace", fail_on_swap)
    with pytest.raises(OSError, match="rename failed"):
        checkpoint.save(new, tmp_path / "ckpt")
    monkeypatch.undo()
    assert_same_weights(old, checkpoint.load(tmp_path / "ckpt"))
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]

    checkpoint.save(new, tmp_path / "ckpt")
    assert_same_weights(new, checkpoint.load(tmp_path / "ckpt"))
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pth", "last.ckpt"])
def test_pickle_files_are_refused_unread(tmp_path, name, monkeypatch):
    import pickle
    monkeypatch.setattr(pickle, "load", lambda *args, **kwargs: pytest.fail("something was unpickled"))
    monkeypatch.setattr(pickle, "loads", lambda *args, **kwargs: pytest.fail("something was unpickled"))
    (tmp_path / name).write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ValueError, match="convert it to safetensors|Convert it to safetensors"):
        checkpoint.from_pretrained(tmp_path / name)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(ValueError, match=f"{name}.*never unpickles.*safetensors"):
        checkpoint.from_pretrained(tmp_path)


def test_weights_that_do_not_fit_are_named(tmp_path):
    model = CLIP(FAMILIES["clip"])
    checkpoint.save(model, tmp_path / "ckpt")
    state = checkpoint.read_safetensors(tmp_path / "ckpt" / "model.safetensors")
    del state["text.ln_final.bias"]
    state["visual.proj.weight"] = numpy.zeros((3, 3), numpy.float32)
    state["visual.extra"] = numpy.zeros(2, numpy.float32)
    checkpoint.write_safetensors(tmp_path / "ckpt" / "model.safetensors", state)
    with pytest.raises(ValueError) as error:
        checkpoint.load(tmp_path / "ckpt")
    message = str(error.value)
    for part in ("text.ln_final.bias", "visual.extra", "visual.proj.weight", "(3, 3)", "ckpt"):
        assert part in message


def test_bad_configs_and_folders_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        checkpoint.load(tmp_path / "nowhere")
    folder = tmp_path / "ckpt"
    checkpoint.save(CLIP(FAMILIES["clip"]), folder)
    document = json.loads((folder / "config.json").read_text())
    document["config"]["colour"] = "red"
    (folder / "config.json").write_text(json.dumps(document))
    with pytest.raises(ValueError, match="colour"):
        checkpoint.load(folder)
    document["tinyclip_format"] = 99
    (folder / "config.json").write_text(json.dumps(document))
    with pytest.raises(ValueError, match="format 99"):
        checkpoint.load(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type 'bert' is not supported"):
        checkpoint.from_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"\xff" * 4)
    with pytest.raises(ValueError, match="not a safetensors file"):
        checkpoint.read_safetensors(folder / "model.safetensors")
    header = json.dumps({"w": {"dtype": "F32", "shape": [2]}}).encode()
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    with pytest.raises(ValueError, match="model.safetensors is not a safetensors file.*data_offsets"):
        checkpoint.read_safetensors(folder / "model.safetensors")
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    with pytest.raises(ValueError, match="model.safetensors is not a safetensors file"):
        checkpoint.read_safetensors(folder / "model.safetensors")


# ---- safetensors -----------------------------------------------------------------------

def test_safetensors_round_trip_and_bfloat16(tmp_path):
    arrays = {"scalar": numpy.array(1.5), "matrix": numpy.arange(6, dtype=numpy.float32).reshape(2, 3).T,
              "half": numpy.array([1.0, -2.5], numpy.float16), "ids": numpy.array([[1, 2]], numpy.int64),
              "flags": numpy.array([True, False])}
    checkpoint.write_safetensors(tmp_path / "a.safetensors", arrays, metadata={"note": "x"})
    back = checkpoint.read_safetensors(tmp_path / "a.safetensors")
    assert sorted(back) == sorted(arrays)
    for name, array in arrays.items():
        assert back[name].dtype == array.dtype and back[name].shape == array.shape
        numpy.testing.assert_array_equal(back[name], array)
    # bfloat16 is the top 16 bits of a float32: write some by hand and read them back as float32
    values = numpy.array([1.0, -3.0, 0.15625], numpy.float32)
    bits = (values.view(numpy.uint32) >> 16).astype("<u2").tobytes()
    header = json.dumps({"w": {"dtype": "BF16", "shape": [3], "data_offsets": [0, len(bits)]}}).encode()
    (tmp_path / "b.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bits)
    numpy.testing.assert_array_equal(checkpoint.read_safetensors(tmp_path / "b.safetensors")["w"], values)


def test_safetensors_matches_the_reference_library(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    arrays = {"a": numpy.arange(12, dtype=numpy.float32).reshape(3, 4), "b": numpy.array(2.0),
              "c": numpy.ones((2, 2), numpy.float16)}
    checkpoint.write_safetensors(tmp_path / "ours.safetensors", arrays)
    safetensors_numpy.save_file(arrays, str(tmp_path / "theirs.safetensors"))
    for ours, theirs in ((checkpoint.read_safetensors(tmp_path / "theirs.safetensors"), arrays),
                         (safetensors_numpy.load_file(str(tmp_path / "ours.safetensors")), arrays)):
        for name, array in theirs.items():
            assert ours[name].shape == array.shape and ours[name].dtype == array.dtype
            numpy.testing.assert_array_equal(ours[name], array)


# ---- Hugging Face layout, without transformers -------------------------------------------

def hf_config_for(config, legacy_eos=True):
    """A Hugging Face config.json for a tinyclip config (the inverse of checkpoint.config_from_hf)."""
    act = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}[config.activation]
    vision = {"hidden_size": config.vision_width, "num_hidden_layers": config.vision_layers,
              "num_attention_heads": config.vision_heads,
              "intermediate_size": int(config.vision_width * config.vision_mlp_ratio),
              "image_size": config.image_size, "patch_size": config.patch_size, "hidden_act": act,
              "layer_norm_eps": config.ln_eps}
    text = {"hidden_size": config.text_width, "num_hidden_layers": config.text_layers,
            "num_attention_heads": config.text_heads, "intermediate_size": int(config.text_width * config.text_mlp_ratio),
            "vocab_size": config.vocab_size, "max_position_embeddings": config.context_length, "hidden_act": act,
            "layer_norm_eps": config.ln_eps}
    if config.family == "clip":
        text["eos_token_id"] = 2 if legacy_eos else config.eos_id
        return {"model_type": "clip", "projection_dim": config.embed_dim, "logit_scale_init_value":
                config.init_log_scale, "vision_config": vision, "text_config": text}
    text["projection_size"] = config.embed_dim
    return {"model_type": "siglip", "vision_config": vision, "text_config": text}


def hf_state_for(model):
    """The model's weights under Hugging Face's names and layouts (the inverse of checkpoint.state_from_hf)."""
    config, state, packed = model.config, {}, {}
    for name, value in model.state_dict().items():
        key = checkpoint.hf_name(name, config.family)
        kind, shape = checkpoint.hf_layout(name, value.shape, config)
        if kind == "patch":              # (W, P·P·3) -> (W, P, P, 3) -> (W, 3, P, P)
            p = config.patch_size
            state[key] = value.reshape(value.shape[0], p, p, 3).transpose(0, 3, 1, 2)
        elif kind in ("q", "k", "v"):
            packed.setdefault(key, {})[kind] = value
        else:
            state[key] = value.reshape(shape)
    for key, parts in packed.items():
        state[key] = numpy.concatenate([parts["q"], parts["k"], parts["v"]])
    return state


def write_hf_folder(folder, model, legacy_eos=True, extra=None):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf_config_for(model.config, legacy_eos)))
    state = {**hf_state_for(model), **(extra or {})}
    checkpoint.write_safetensors(folder / "model.safetensors", state)
    return state


HF_VARIANTS = {"clip": (FAMILIES["clip"], True), "clip-eos": (preset("tiny", text_pooling="eos"), False),
               "siglip": (FAMILIES["siglip"], True)}


@pytest.mark.parametrize("variant", HF_VARIANTS)
def test_hugging_face_layout_imports_to_the_same_model(tmp_path, variant):
    config, legacy_eos = HF_VARIANTS[variant]
    model = CLIP(config, seed=7)
    state = write_hf_folder(tmp_path / "hf", model, legacy_eos,
                            extra={"text_model.embeddings.position_ids": numpy.arange(config.context_length)[None]})
    if config.family == "clip":
        assert state["vision_model.embeddings.patch_embedding.weight"].shape == (16, 3, 8, 8)
        assert state["logit_scale"].shape == ()
        assert "vision_model.pre_layrnorm.weight" in state and "text_projection.weight" in state
    else:
        assert state["vision_model.head.attention.in_proj_weight"].shape == (48, 16)
        assert state["logit_bias"].shape == (1,) and "text_model.head.bias" in state
    imported = checkpoint.from_pretrained(tmp_path / "hf")
    assert imported.config.family == config.family
    assert imported.config.text_pooling == config.text_pooling
    assert_same_weights(model, imported)
    assert_same_embeddings(model, imported)


def test_hugging_face_keys_that_do_not_fit_are_all_named(tmp_path):
    model = CLIP(FAMILIES["siglip"])
    state = hf_state_for(model)
    del state["vision_model.head.probe"]
    del state["text_model.final_layer_norm.bias"]
    state["vision_model.head.attention.in_proj_bias"] = numpy.zeros(5, numpy.float32)
    state["text_model.encoder.layers.7.mlp.fc1.weight"] = numpy.zeros((2, 2), numpy.float32)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf_config_for(model.config)))
    checkpoint.write_safetensors(tmp_path / "hf" / "model.safetensors", state)
    with pytest.raises(ValueError) as error:
        checkpoint.from_pretrained(tmp_path / "hf")
    message = str(error.value)
    for part in ("missing keys (2)", "vision_model.head.probe", "text_model.final_layer_norm.bias",
                 "unexpected keys (1)", "text_model.encoder.layers.7.mlp.fc1.weight",
                 "vision_model.head.attention.in_proj_bias: checkpoint (5,) vs model (48,)"):
        assert part in message, part


def test_hugging_face_config_defaults_and_conflicts():
    config = checkpoint.config_from_hf({"model_type": "clip", "text_config": {"eos_token_id": 2},
                                        "vision_config": {}})
    assert config == checkpoint.CLIPConfig(**{**preset("ViT-B-32").to_dict(),
                                              "init_log_scale": 2.6592})
    siglip = checkpoint.config_from_hf({"model_type": "siglip"})
    base = preset("siglip-base-patch16-224")
    assert siglip.to_dict() == {**base.to_dict(), "eos_id": siglip.eos_id}
    with pytest.raises(ValueError, match="one activation for both towers"):
        checkpoint.config_from_hf({"model_type": "clip", "text_config": {"hidden_act": "gelu", "eos_token_id": 2}})


# ---- parity with transformers, where installed (committed outputs: test_reference_outputs.py) --

def hf_tiny(kind):
    transformers = pytest.importorskip("transformers")
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "image_size": 32, "patch_size": 8}
    text = {"vocab_size": 99, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 16}
    if kind.startswith("clip"):      # "clip-legacy": eos_token_id 2, pooled at argmax(ids) as OpenAI does
        eos = 2 if kind == "clip-legacy" else 98
        return transformers.CLIPModel(transformers.CLIPConfig(
            vision_config=vision, text_config={**text, "eos_token_id": eos}, projection_dim=24))
    return transformers.SiglipModel(transformers.SiglipConfig(vision_config=vision, text_config=text))


@pytest.mark.parity
@pytest.mark.parametrize("kind", ["clip", "clip-legacy", "siglip"])
def test_parity_with_transformers(tmp_path, kind):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    reference = hf_tiny(kind).eval()
    reference.save_pretrained(tmp_path / "hf")
    if not (tmp_path / "hf" / "model.safetensors").exists():
        pytest.skip("this transformers version did not write model.safetensors")
    model = checkpoint.from_pretrained(tmp_path / "hf")
    rng = numpy.random.default_rng(0)
    images = rng.normal(size=(3, 32, 32, 3)).astype(numpy.float32)        # ours: (B, H, W, 3)
    tokens = rng.integers(1, 98, size=(3, 16))
    if kind.startswith("clip"):
        tokens[:, 9] = 98                                 # end of text (also the largest id), then padding
        tokens[:, 10:] = 0
    with torch.no_grad():
        outputs = reference(input_ids=torch.from_numpy(tokens),
                            pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))  # (B, 3, H, W)
    numpy.testing.assert_allclose(model.encode_image(images).numpy(), outputs.image_embeds.numpy(),
                                  rtol=1e-4, atol=1e-5)
    numpy.testing.assert_allclose(model.encode_text(tokens).numpy(), outputs.text_embeds.numpy(),
                                  rtol=1e-4, atol=1e-5)
    numpy.testing.assert_allclose(numpy.exp(model.log_scale.numpy()), reference.logit_scale.exp().item(), rtol=1e-6)


# ---- untrusted folders: checked before anything is built, loaded without drawing ------------------

def test_bfloat16_weights_load_through_ml_dtypes_as_float32(tmp_path):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    model = CLIP(FAMILIES["siglip"], seed=4)
    state = {name: value.astype(ml_dtypes.bfloat16) for name, value in model.state_dict().items()}
    folder = tmp_path / "ckpt"
    checkpoint.save(model, folder)
    checkpoint.write_safetensors(folder / "model.safetensors", state)
    loaded = checkpoint.load(folder)
    for name, value in loaded.state_dict().items():
        assert value.dtype == numpy.float32, name
        numpy.testing.assert_array_equal(value, state[name].astype(numpy.float32), err_msg=name)


def test_a_loaded_model_draws_nothing_and_allocates_the_weights_once(tmp_path, monkeypatch):
    import tracemalloc
    model = CLIP(preset("tiny", vision_width=64, text_width=64, vocab_size=8192, eos_id=8191), seed=5)
    checkpoint.save(model, tmp_path / "ckpt")
    weights = sum(value.nbytes for value in model.state_dict().values())
    monkeypatch.setattr(backend.RNG, "normal", lambda *args, **kwargs: pytest.fail("a weight was drawn"))
    tracemalloc.start()
    start, _ = tracemalloc.get_traced_memory()
    loaded = checkpoint.load(tmp_path / "ckpt")
    peak = tracemalloc.get_traced_memory()[1] - start
    tracemalloc.stop()
    monkeypatch.undo()
    assert_same_weights(model, loaded)
    assert weights > 2**21 and weights <= peak < 1.5 * weights   # the weights and the modules, not two copies
    for parameter in loaded.parameters():             # each parameter owns real, writable storage
        assert parameter.data.flags.writeable and parameter.data.flags.c_contiguous
        assert 0 not in parameter.data.strides or parameter.data.size <= 1


def test_header_shapes_are_checked_before_the_model_is_built(tmp_path, monkeypatch):
    folder = tmp_path / "ckpt"
    checkpoint.save(CLIP(FAMILIES["clip"]), folder)
    document = json.loads((folder / "config.json").read_text())
    document["config"]["text_layers"] = 400                 # valid, but not what the weights hold
    (folder / "config.json").write_text(json.dumps(document))
    built = []
    real_clip = checkpoint.CLIP
    monkeypatch.setattr(checkpoint, "CLIP", lambda *args, **kwargs: built.append(kwargs) or real_clip(*args, **kwargs))
    with pytest.raises(ValueError, match=r"(?s)model.safetensors do not fit.*missing keys \(6384\): text.transfor"):
        checkpoint.load(folder)
    assert built == [{"dtype": numpy.float32, "backend": None, "values": False}]   # built without values only


def test_sharded_folders_load_and_their_index_is_checked(tmp_path):
    model = CLIP(FAMILIES["clip"], seed=6)
    folder = tmp_path / "ckpt"
    checkpoint.save(model, folder)
    state = checkpoint.read_safetensors(folder / "model.safetensors")
    names = sorted(state)
    halves = {"model-1.safetensors": names[: len(names) // 2], "model-2.safetensors": names[len(names) // 2:]}
    for shard, keys in halves.items():
        checkpoint.write_safetensors(folder / shard, {key: state[key] for key in keys})
    (folder / "model.safetensors").unlink()
    weight_map = {key: shard for shard, keys in halves.items() for key in keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert_same_weights(model, checkpoint.load(folder))
    checkpoint.write_safetensors(folder / "model-2.safetensors", {names[0]: state[names[0]]})
    with pytest.raises(ValueError, match=f"model-2.safetensors: tensor '{names[0]}' is also in .*model-1"):
        checkpoint.load(folder)


def test_hugging_face_config_fields_are_checked_by_name():
    for config, message in (({"model_type": "siglip", "vision_config": {"hidden_size": "16"}},
                             r"vision_config.hidden_size '16' must be a positive integer"),
                            ({"model_type": "siglip", "text_config": {"num_attention_heads": 0}},
                             "text_config.num_attention_heads 0 must be a positive integer"),
                            ({"model_type": "siglip", "vision_config": []}, "vision_config must be a JSON object"),
                            ({"model_type": "clip", "projection_dim": 2**31},
                             r"embed_dim 2147483648 is outside \[1, 16384\]"),
                            ({"model_type": "siglip", "vision_config": {"vision_use_head": 1}},
                             "vision_config.vision_use_head 1 must be true or false")):
        with pytest.raises(ValueError, match=message):
            checkpoint.config_from_hf(config)
    siglip = checkpoint.config_from_hf({"model_type": "siglip"})   # SigLIP's initial scale and bias: one home
    from tinyclip.models import config as config_module
    assert (siglip.init_log_scale, siglip.init_bias) == (config_module.SIGLIP_INIT_LOG_SCALE,
                                                         config_module.SIGLIP_INIT_BIAS)
