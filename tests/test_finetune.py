"""Tests for fine-tuning a whole pretrained model: ``train --init MODEL`` with ``--lock-text`` / ``--lock-image``.

The init models are a tinyclip run's model and a random Hugging Face
SigLIP folder with a SentencePiece tokenizer (built here; nothing downloads).
"""

import json
import os

import numpy
import pytest

from tinyclip import checkpoint, train
from tinyclip.cli import main

from .test_siglip_tokenizer import hf_siglip_tokenizer, spiece_file  # noqa: F401  (spiece_file is a fixture)


def tiny_config(out, **changes):
    values = dict(preset="tiny", model_overrides={"image_size": 32}, steps=12, batch_size=8, lr=3e-3,
                  warmup_steps=2, log_every=1, eval_every=0, checkpoint_every=0, eval_per_class=1, eval_pairs=8,
                  tokenizer_captions=300, plots=False, out=str(out), examples=16)
    values.update(changes)
    return train.TrainConfig(**values)


def state_of(folder, prefix):
    model = checkpoint.from_pretrained(folder)
    return {name: array for name, array in model.state_dict().items() if name.startswith(prefix)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tinyclip run's model folder (SigLIP loss, BPE tokenizer)."""
    out = tmp_path_factory.mktemp("first")
    train.train(tiny_config(out, loss="siglip", steps=8))
    return out / "model"


def test_init_continues_to_lower_the_loss_with_the_text_tower_locked(trained, tmp_path, capsys):
    config = tiny_config(tmp_path, init=str(trained), lock_text=True, model_overrides={}, steps=20)
    assert config.loss == "siglip"                                  # the init model's family
    result = train.train(config)
    out = capsys.readouterr().out
    assert "continues from the model's bias" in out
    assert numpy.mean(result.losses[-3:]) < numpy.mean(result.losses[:3])
    before, after = state_of(trained, "text."), state_of(tmp_path / "model", "text.")
    assert before.keys() == after.keys()
    for name in before:
        numpy.testing.assert_array_equal(after[name], before[name], err_msg=name)   # bit-identical
    image_before, image_after = state_of(trained, "visual."), state_of(tmp_path / "model", "visual.")
    assert any(not numpy.array_equal(image_before[name], image_after[name]) for name in image_before)
    saved = tmp_path / "model" / checkpoint.TOKENIZER_FILE                # the init tokenizer, not a new one
    assert saved.read_bytes() == (trained / checkpoint.TOKENIZER_FILE).read_bytes()


def test_the_clip_loss_on_a_siglip_model_drops_the_bias_and_says_so(trained, tmp_path, capsys):
    result = train.train(tiny_config(tmp_path, init=str(trained), loss="clip", model_overrides={}, steps=3))
    assert len(result.losses) == 3 and "the CLIP loss has no bias" in capsys.readouterr().out
    model = checkpoint.from_pretrained(tmp_path / "model")
    assert model.bias is None and model.config.family == "clip"


def test_init_configurations_that_cannot_work_are_named(trained, tmp_path):
    with pytest.raises(ValueError, match="lock_text needs init"):
        train.TrainConfig(lock_text=True)
    with pytest.raises(ValueError, match="init or image_tower, not both"):
        train.TrainConfig(init=str(trained), image_tower=str(trained))
    with pytest.raises(ValueError, match=r"model_overrides \['text_layers'\]"):
        train.TrainConfig(init=str(trained), model_overrides={"text_layers": 3})
    with pytest.raises(ValueError, match="--init .*nowhere"):
        train.TrainConfig(init=str(tmp_path / "nowhere"))


@pytest.mark.parity
def test_fine_tune_a_hugging_face_siglip_folder_from_the_command_line(spiece_file, tmp_path, capsys, monkeypatch):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from PIL import Image
    tokenizer = hf_siglip_tokenizer(spiece_file, monkeypatch)
    torch.manual_seed(0)
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
              "image_size": 32, "patch_size": 8}
    text = {"vocab_size": tokenizer.vocab_size, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 4, "max_position_embeddings": 16}
    transformers.SiglipModel(transformers.SiglipConfig(vision_config=vision, text_config=text)).save_pretrained(
        tmp_path / "siglip")
    (tmp_path / "siglip" / "spiece.model").write_bytes(spiece_file.read_bytes())
    rows = ["filepath\ttitle"]
    for index, (colour, word) in enumerate([((255, 0, 0), "red"), ((0, 0, 255), "blue"), ((0, 255, 0), "green"),
                                            ((255, 255, 0), "yellow")] * 2):
        Image.new("RGB", (40, 40), colour).save(tmp_path / f"{index}.png")
        rows.append(f"{tmp_path / f'{index}.png'}\ta {word} square")
    (tmp_path / "pairs.tsv").write_text("\n".join(rows) + "\n")
    code = main(["train", "--init", str(tmp_path / "siglip"), "--data", str(tmp_path / "pairs.tsv"),
                 "--lock-image", "--steps", "4", "--batch-size", "4", "--warmup-steps", "1", "--log-every", "1",
                 "--eval-every", "0", "--checkpoint-every", "0", "--no-plots", "--out", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert code == 0 and "with the siglip loss" in out and "continues from the model's bias" in out
    assert (tmp_path / "run" / "model" / "spiece.model").read_bytes() == spiece_file.read_bytes()
    before = checkpoint.from_pretrained(tmp_path / "siglip").state_dict()
    after = checkpoint.from_pretrained(tmp_path / "run" / "model").state_dict()
    for name in before:
        if name.startswith("visual."):
            numpy.testing.assert_array_equal(after[name], before[name], err_msg=name)
    assert main(["zeroshot", "--model", str(tmp_path / "run" / "model"), "--images", str(tmp_path / "0.png"),
                 "--labels", "red", "blue", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["scores"] == "sigmoid" and os.path.join(str(tmp_path), "0.png") in result["images"]


def test_an_init_model_that_cannot_start_is_refused_before_the_run_folder_naming_it(trained, tmp_path, capsys):
    import shutil
    untokenized = tmp_path / "untokenized"
    untokenized.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(trained / name, untokenized / name)
    tiny = ["--eval-per-class", "1", "--eval-pairs", "8", "--no-plots", "--steps", "2", "--batch-size", "8"]
    for init, extra, said in ((untokenized, [], f"--init {untokenized}: {untokenized} holds no tokenizer"),
                              (trained, ["--image-size", "40"], None),        # the tiny ViT's patch is 8: fine
                              (trained, ["--image-size", "36"], "image_size 36 is not a multiple of patch_size 8")):
        out = tmp_path / "run"
        status = main(["train", "--init", str(init), *extra, *tiny, "--out", str(out)])
        error = capsys.readouterr().err
        if said is None:
            assert status == 0, error                 # it was refused against the default preset's patch of 16
            shutil.rmtree(out)
        else:
            assert status == 2 and said in error and "Traceback" not in error and not out.exists()


def test_a_preset_given_with_init_is_refused_not_ignored(trained, tmp_path, capsys):
    out = tmp_path / "run"
    status = main(["train", "--init", str(trained), "--preset", "shapes-vit", "--steps", "2", "--out", str(out)])
    error = capsys.readouterr().err
    assert status == 2 and "--preset shapes-vit with --init" in error and "Traceback" not in error
    assert not out.exists()
