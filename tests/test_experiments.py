"""Tests for examples/experiments/: each experiment runs with --quick and leaves a JSON of results and a plot.

The scripts are started as a reader would start them (this Python, a
subprocess, the checkout on PYTHONPATH); the checks are on what the JSON
must hold for docs/experiments.md to be made from it: every setting the
experiment promises, finite metrics in [0, 1], the command and the machine.
"""

import json
import math
import re
import subprocess
import sys

import numpy
import pytest

from .test_examples import environment
from .test_distributed import ROOT

EXPERIMENTS = ROOT / "examples" / "experiments"
METRICS = ("zeroshot_top1", "retrieval_i2t_r1", "retrieval_t2i_r1", "relation_acc", "control_acc")


def run_quick(name, tmp_path, *extra):
    """Run examples/experiments/<name>.py --quick into tmp_path; returns its JSON after checking the plot."""
    command = [sys.executable, str(EXPERIMENTS / f"{name}.py"), "--quick", "--out", str(tmp_path), *extra]
    done = subprocess.run(command, cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / f"{name}.png").stat().st_size > 1000
    with open(tmp_path / f"{name}.json", encoding="utf-8") as file:
        record = json.load(file)
    assert record["experiment"] == name
    assert f"{name}.py" in record["command"] and record["machine"]["cores"] >= 1
    return record


def check_metrics(row):
    for key in METRICS:
        assert 0.0 <= row[key] <= 1.0, (key, row)


def test_batch_size(tmp_path):
    record = run_quick("batch_size", tmp_path, "--seeds", "1")
    sizes = record["settings"]["batch_sizes"]
    assert {(row["loss"], row["batch_size"]) for row in record["runs"]} == {
        (loss, size) for loss in ("siglip", "clip") for size in sizes}
    for row in record["runs"]:       # the same examples seen at every batch size
        assert row["steps"] * row["batch_size"] == record["settings"]["examples_seen"]
        check_metrics(row)
    assert set(record["table"]["clip"]) == {str(size) for size in sizes}


def test_init(tmp_path):
    record = run_quick("init", tmp_path, "--seeds", "1")
    runs = {(row["log_scale"], row["bias"]): row for row in record["runs"]}
    assert set(runs) == {(scale, bias) for scale in ("log 1", "log 10") for bias in ("0", "-5", "-10", "-log B")}
    for row in runs.values():
        check_metrics(row)
        assert len(row["losses"]) == record["settings"]["steps"] and all(map(math.isfinite, row["losses"]))
    # the first step's loss is the loss at initialisation: cosines near 0, so logits near b; the estimate
    # softplus(-b) + (B-1)·softplus(b) holds within the spread of t·cos (t <= 10)
    for (scale, bias), row in runs.items():
        assert abs(row["first_loss"] - row["estimate_at_start"]) < 0.5 * row["estimate_at_start"], row


def test_negatives(tmp_path):
    record = run_quick("negatives", tmp_path, "--seeds", "2")
    rules = {(row["rule"], row["keep"]) for row in record["runs"]}
    assert rules == {("all", 1.0)} | {(rule, keep) for keep in record["settings"]["keep"]
                                       for rule in ("random", "hard", "easy", "hard, matched")}
    batch = record["settings"]["batch_size"]
    pairs = {row["rule"]: row["pairs_seen"] for row in record["runs"]}
    # matched: the same pairs seen as the full loss (up to rounding the steps); unmatched: fewer
    assert abs(pairs["hard, matched"] - pairs["all"]) <= batch * batch
    assert pairs["hard"] < pairs["all"]
    for row in record["runs"]:
        check_metrics(row)
    check_seeds_and_pairs(record, 2, [("all", 1.0)] + [(rule, keep) for rule in record["versus_all"]
                                                        for keep in record["settings"]["keep"]],
                          lambda row: (row["rule"], row["keep"]))
    for rule, by_keep in record["versus_all"].items():          # each seed's masked score minus its full-loss score
        for keep, by_key in by_keep.items():
            for key, spread in by_key.items():
                mine = [row[key] for row in sorted(record["runs"], key=lambda row: row["seed"])
                        if (row["rule"], str(row["keep"])) == (rule, keep)]
                full = [row[key] for row in sorted(record["runs"], key=lambda row: row["seed"]) if row["rule"] == "all"]
                assert spread["values"] == pytest.approx([a - b for a, b in zip(mine, full)], abs=1e-4)


def check_seeds_and_pairs(record, seeds, settings, setting_of):
    """Every setting ran once per seed, and each table cell is the mean ± std of exactly those runs' scores."""
    assert record["settings"]["seeds"] == seeds
    for setting in settings:
        assert sorted(row["seed"] for row in record["runs"] if setting_of(row) == setting) == list(range(seeds))
    for cell in cells(record["table"]):
        assert len(cell["values"]) == seeds
        assert cell["mean"] == pytest.approx(sum(cell["values"]) / seeds, abs=1e-4)
        assert cell["std"] == pytest.approx(float(numpy.std(cell["values"])), abs=1e-4)


def cells(table):
    """The {"mean", "std", "values"} leaves of a nested table."""
    if "values" in table:
        yield table
        return
    for value in table.values():
        yield from cells(value)


def test_noise(tmp_path):
    record = run_quick("noise", tmp_path, "--seeds", "2")
    settings = {(row["loss"], row["noise"], row["p"]) for row in record["runs"]}
    for loss in ("siglip", "clip"):
        assert (loss, "clean", 0.0) in settings
        for kind in ("image", "text", "pairing"):
            assert {(loss, kind, p) for p in record["settings"]["p"] if p} <= settings
    for row in record["runs"]:
        check_metrics(row)
    check_seeds_and_pairs(record, 2, settings, lambda row: (row["loss"], row["noise"], row["p"]))

    def scores(loss, kind, p, key):
        kind = "clean" if p == 0 else kind
        return [row[key] for row in sorted(record["runs"], key=lambda row: row["seed"])
                if (row["loss"], row["noise"], row["p"]) == (loss, kind, p)]
    for kind, by_p in record["clip_minus_siglip"].items():     # paired: the same seed's data and corruption
        assert set(by_p) == {str(p) for p in record["settings"]["p"]}
        for p, by_key in by_p.items():
            for key, spread in by_key.items():
                expected = [a - b for a, b in zip(scores("clip", kind, float(p), key),
                                                  scores("siglip", kind, float(p), key))]
                assert spread["values"] == pytest.approx(expected, abs=1e-4)


def test_noise_corrupts_the_fraction_asked_and_the_same_pairs_every_time():
    sys.path.insert(0, str(EXPERIMENTS))
    try:
        import numpy
        import noise
    finally:
        sys.path.remove(str(EXPERIMENTS))
    images = numpy.zeros((2000, 4, 4, 3), numpy.uint8)
    captions = [f"a red circle {i}" for i in range(2000)]
    first = noise.corrupter("pairing", 0.2, seed=3)(list(range(2000)), images, captions)
    again = noise.corrupter("pairing", 0.2, seed=3)(list(range(2000)), images, captions)
    assert first[1] == again[1]
    changed = sum(a != b for a, b in zip(first[1], captions))
    assert 0.17 < changed / 2000 < 0.23
    noisy_images, _ = noise.corrupter("image", 0.5, seed=3)(list(range(2000)), images, captions)
    assert 0.45 < (noisy_images.reshape(2000, -1).any(axis=1)).mean() < 0.55
    assert not images.any()                       # the batch given is not changed in place


def test_relations(tmp_path):
    record = run_quick("relations", tmp_path, "--seeds", "1")
    assert {row["training"] for row in record["runs"]} == {"standard", "hard negatives"}
    for row in record["runs"]:
        check_metrics(row)
        assert row["curve"][-1]["step"] == record["settings"]["steps"]


def test_hard_negatives_are_false_of_the_image():
    sys.path.insert(0, str(EXPERIMENTS))
    try:
        import relations
    finally:
        sys.path.remove(str(EXPERIMENTS))
    from tinyclip.data import shapes
    seen = 0
    for index in range(200):
        scene = shapes.scene(index)
        negatives = relations.hard_negatives(scene, scene.caption)
        if scene.relation in (None, "and"):
            assert negatives == []
            continue
        seen += 1
        first, second = scene.caption.split(f" {scene.relation} ")
        assert negatives == [f"{second} {scene.relation} {first}",
                             f"{first} {relations.OPPOSITE[scene.relation]} {second}"]
        assert scene.caption not in negatives
    assert seen > 30


def test_modality_gap(tmp_path):
    record = run_quick("modality_gap", tmp_path, "--seeds", "2")
    assert len(record["runs"]) == 8
    check_seeds_and_pairs(record, 2, set(record["table"]), lambda row: row["setting"])
    for row in record["runs"]:                # the table's last-point gap is each seed's curve's last point
        assert record["table"][row["setting"]]["gap"]["values"][row["seed"]] == row["curve"][-1]["gap"]
    for row in record["runs"]:
        check_metrics(row)
        assert row["curve"][0]["step"] == 0 and row["curve"][-1]["step"] == record["settings"]["steps"]
        for point in row["curve"]:
            assert 0.0 <= point["gap"] <= 2.0 and 0.0 <= point["separability"] <= 1.0
        assert set(row["zeroshot_after_shift"]) == {"0.0", "0.25", "0.5", "0.75", "1.0"}
    fixed = [row for row in record["runs"] if "fixed" in row["setting"] and row["seed"] == 0]
    assert [row["curve"][-1]["scale"] for row in fixed] == [1.0, 10.0, 100.0]     # a fixed scale stays fixed


def test_loss_cost(tmp_path):
    record = run_quick("loss_cost", tmp_path)
    names = {row["loss"] for row in record["single_process"]}
    assert names == {"clip_loss (fused)", "siglip_loss (fused)", "clip_loss_reference", "siglip_loss_reference"}
    assert all(row["ms"] > 0 and row["peak_mb"] > 0 for row in record["single_process"])
    if record["across_ranks_missing"] is None:
        assert {row["method"] for row in record["across_ranks"]} == {"clip ring", "clip gather", "siglip ring"}
        for row in record["across_ranks"]:        # the bytes sent are what the ring's schedule says
            assert row["sent_mb"] == pytest.approx(row["theory_mb"], rel=1e-6)


# ---- the TrainConfig fields negatives.py trains with: keep_negatives / negatives reach the loss ----

def test_keep_negatives_reaches_the_sigmoid_loss_of_a_training_step():
    import numpy
    from tinyclip import losses
    from tinyclip.distributed import SingleProcess
    from tinyclip.models import CLIP, preset
    from tinyclip.train import TrainConfig, batch_loss

    model = CLIP(preset("tiny", image_size=32, init_bias=-10.0, init_log_scale=math.log(10.0)), dtype="float64")
    rng = numpy.random.default_rng(0)
    images = rng.standard_normal((12, 32, 32, 3))                            # (B, H, W, 3)
    tokens = rng.integers(1, 60, (12, 8))                                     # (B, T)
    image_emb, text_emb, log_scale, bias = model(images, tokens)
    overrides = {"image_size": 32}
    full = batch_loss(model, TrainConfig(preset="tiny", model_overrides=overrides), images, tokens, SingleProcess())
    for negatives in losses.NEGATIVE_CHOICES:
        config = TrainConfig(preset="tiny", model_overrides=overrides, keep_negatives=0.25, negatives=negatives,
                             seed=3)
        masked = batch_loss(model, config, images, tokens, SingleProcess())
        expected = losses.siglip_loss(image_emb, text_emb, log_scale, bias, keep_negatives=0.25,
                                      negatives=negatives, mask_seed=3)
        assert masked.item() == pytest.approx(expected.item(), rel=1e-12)
        assert masked.item() < full.item()        # fewer negatives, each term positive: a smaller sum


@pytest.mark.parametrize("fields, message", [({"keep_negatives": 1.5}, "keep_negatives must be in [0, 1]"),
                                             ({"keep_negatives": True}, "keep_negatives must be in [0, 1]"),
                                             ({"keep_negatives": 0.5, "loss": "clip"}, "the CLIP loss has none"),
                                             ({"negatives": "medium"}, "negatives must be one of")])
def test_bad_negative_masking_is_refused_by_name(fields, message):
    from tinyclip.train import TrainConfig
    with pytest.raises(ValueError, match=re.escape(message)):
        TrainConfig(**fields)


def test_the_command_line_takes_the_masking_flags():
    from tinyclip.cli import build_parser
    args = build_parser().parse_args(["train", "--keep-negatives", "0.25", "--negatives", "hard"])
    assert (args.keep_negatives, args.negatives) == (0.25, "hard")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--negatives", "medium"])
