"""Tests for validation while training: the held-out loss and recall, --val-fraction, and what a run records.

``caption_validation`` is checked against the loss written out from its
formula (SigLIP's and CLIP's, DESIGN.md §4) on embeddings computed image by
image, batch by batch. A run with ``val_fraction`` never trains on a
held-out image, logs ``val_`` metrics and ``examples_seen``, and its summary
holds numbers, not None.
"""

import json
import math


import numpy
import pytest
from PIL import Image

import tinyclip as tc
from tinyclip import evaluate, models, plots, runs, train
from tinyclip.data.captions import CSVCaptions
from tinyclip.data.transforms import preprocess
from tinyclip.tokenizer import Tokenizer

COLOURS = ["red", "green", "blue", "white", "black", "grey", "pink"]


@pytest.fixture
def pairs_csv(tmp_path):
    rows = ["filepath,title"]
    for index in range(14):
        colour = COLOURS[index % 7]
        # noise over the colour: no two images alike, so no tie depends on rounding
        noise = numpy.random.default_rng(index).integers(0, 60, (28, 30 + index, 3), dtype=numpy.uint8)
        Image.fromarray(numpy.asarray(Image.new("RGB", (30 + index, 28), colour)) // 2 + noise).save(
            tmp_path / f"{index}.png")
        rows += [f"{index}.png,a {colour} picture", f"{index}.png,{colour} number {index}"][:1 + index % 2]
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "pairs.csv"


def naive_siglip(image_emb, text_emb, scale, bias):
    logits = scale * image_emb @ text_emb.T + bias
    signs = 2 * numpy.eye(len(logits)) - 1
    return -numpy.log(1 / (1 + numpy.exp(-signs * logits))).sum() / len(logits)


def naive_clip(image_emb, text_emb, scale):
    logits = scale * image_emb @ text_emb.T
    rows = [math.log(numpy.exp(row).sum()) - row[i] for i, row in enumerate(logits)]
    columns = [math.log(numpy.exp(column).sum()) - column[i] for i, column in enumerate(logits.T)]
    return (sum(rows) + sum(columns)) / (2 * len(logits))


@pytest.mark.parametrize("loss", ["siglip", "clip"])
def test_validation_loss_is_the_training_loss_on_first_captions_batch_by_batch(pairs_csv, loss):
    tokenizer = Tokenizer.train([f"a {c} picture number {i}" for c in COLOURS for i in range(14)], vocab_size=540)
    config = models.preset("tiny", vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eot_id,
                           init_bias=-10.0 if loss == "siglip" else None)
    model = models.CLIP(config, dtype="float64", seed=1)
    pairs = CSVCaptions(pairs_csv)
    metrics = evaluate.caption_validation(model, tokenizer, pairs, loss=loss, batch_size=4, encode_batch=3)
    paths = list(dict.fromkeys(pairs.paths))
    first = [pairs.captions[pairs.paths.index(path)] for path in paths]
    with tc.no_grad():
        pixels = numpy.stack([preprocess(p, 16, config.image_normalization) for p in paths]).astype("float64")
        image_emb = numpy.concatenate([model.encode_image(image[None]).data for image in pixels])
        text_emb = numpy.concatenate([model.encode_text(tokenizer([t], context_length=config.context_length)).data
                                      for t in first])
    scale = math.exp(model.log_scale.item())
    batch_losses = [naive_siglip(image_emb[s:s + 4], text_emb[s:s + 4], scale, model.bias.item()) if loss == "siglip"
                    else naive_clip(image_emb[s:s + 4], text_emb[s:s + 4], scale) for s in (0, 4, 8)]   # 12..13 dropped
    assert metrics["val_loss"] == pytest.approx(numpy.mean(batch_losses), rel=1e-9)
    recall, _ = evaluate.caption_retrieval(model, tokenizer, pairs)
    assert {key: metrics[f"val_{key}"] for key in recall} == recall
    assert metrics["val_images"] == 14 and metrics["val_captions"] == 21
    small = evaluate.caption_validation(model, tokenizer, pairs, loss=loss, batch_size=20)   # one batch of all
    expected = naive_siglip(image_emb, text_emb, scale, model.bias.item()) if loss == "siglip" \
        else naive_clip(image_emb, text_emb, scale)
    assert small["val_loss"] == pytest.approx(expected, rel=1e-9)


def run_config(tmp_path, **changes):
    values = dict(preset="tiny", model_overrides={"image_size": 16}, steps=4, batch_size=4, warmup_steps=1,
                  log_every=1, eval_every=2, checkpoint_every=0, tokenizer_captions=50, plots=False,
                  out=str(tmp_path / "run"))
    values.update(changes)
    return train.TrainConfig(**values)


def test_a_run_with_val_fraction_never_trains_on_held_out_images_and_records_validation(pairs_csv, tmp_path, capsys):
    config = run_config(tmp_path, data=str(pairs_csv), val_fraction=0.3, workers=2, plots=True)
    trained, held = train.caption_set(config), train.validation_set(config)
    assert len(set(held.paths)) == 4 and not set(trained.paths) & set(held.paths)
    assert len(trained) + len(held) == 21
    result = train.train(config)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary == result.summary and None not in summary.values()
    assert summary["val_images"] == 4 and summary["examples_seen"] == 16 and "zeroshot_top1" not in summary
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    validations = [record for record in records if "val_loss" in record]
    assert [record["step"] for record in validations] == [2, 4]
    assert validations[-1]["val_loss"] == summary["val_loss"]
    assert all(record["examples_seen"] == 4 * record["step"] for record in records)
    steps = [record for record in records if "loss" in record]
    assert all(record["images_per_second"] > 0 and 0 <= record["data_wait_fraction"] <= 1 for record in steps)
    printed = capsys.readouterr().out
    assert "images/s" in printed and "waiting for data" in printed and "val_loss" in printed
    if plots.available():
        assert (tmp_path / "run" / "loss.png").is_file() and (tmp_path / "run" / "similarity.png").is_file()


def test_data_speed_reports_the_window_since_the_last_report():
    speed = runs.DataSpeed()
    assert speed.report() == {}
    speed.add(8, 0.5, 2.0)
    speed.add(8, 0.0, 2.0)
    assert speed.report() == {"images_per_second": 4.0, "data_wait_fraction": 0.125}
    speed.add(4, 1.0, 1.0)
    assert speed.report() == {"images_per_second": 4.0, "data_wait_fraction": 1.0}


@pytest.mark.parametrize("changes, message", [
    (dict(data="x.csv", val_data="y.csv", val_fraction=0.1), "not both"),
    (dict(val_fraction=0.1), "built-in shapes have their own"),
    (dict(data="s-{0..3}.tar", val_fraction=0.1), "cannot split streamed shards"),
    (dict(data="x.csv", val_fraction=1.0), r"val_fraction must be in \[0, 1\)"),
    (dict(workers=0), "workers must be a positive int"),
])
def test_validation_and_worker_settings_are_checked(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        run_config(tmp_path, **changes)
