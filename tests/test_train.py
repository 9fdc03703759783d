"""Tests for tinyclip.train: a tiny run learns, resumes bit for bit, stops on NaN, refuses a foreign checkpoint.

Every run here is the ``tiny`` preset at 32 px on the shapes data for a
few steps of a small batch, so each takes about a second; the command-line
test runs the ``shapes`` preset for two steps, the CSV test eight plain
pictures. The MPI test trains under
``mpiexec -n 2`` in float64 and compares every logged loss with the
one-process run on the same global batch.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy
import pytest

from tinyclip import checkpoint, cli, train
from tinyclip.models import CLIP, preset

from .test_distributed import ROOT, find_mpiexec, needs_mpi


def tiny_config(out, **changes):
    values = dict(preset="tiny", model_overrides={"image_size": 32}, steps=12, batch_size=8, lr=3e-3,
                  warmup_steps=2, log_every=1, eval_every=0, checkpoint_every=4, eval_per_class=1, eval_pairs=8,
                  tokenizer_captions=300, plots=False, out=str(out))
    values.update(changes)
    return train.TrainConfig(**values)


def weights(folder):
    return checkpoint.read_safetensors(os.path.join(folder, checkpoint.WEIGHTS_FILE))


def losses_in(out):
    with open(os.path.join(out, "metrics.jsonl")) as file:
        return [record["loss"] for record in map(json.loads, file) if "loss" in record]


@pytest.fixture
def loss_calls(monkeypatch):
    """Wrap train.batch_loss: ``calls["hook"](call_number, share)`` may act on (or replace) each share."""
    calls = {"count": 0, "hook": None}
    original = train.batch_loss

    def counted(*args):
        calls["count"] += 1
        share = original(*args)
        return calls["hook"](calls["count"], share) if calls["hook"] else share

    monkeypatch.setattr(train, "batch_loss", counted)
    return calls


@pytest.mark.parametrize("loss", ["siglip", "clip"])
def test_a_tiny_run_lowers_the_loss(tmp_path, loss):
    # 16 examples seen again and again: the loss must fall well below where it started
    result = train.train(tiny_config(tmp_path, loss=loss, examples=16, steps=30, checkpoint_every=0))
    assert len(result.losses) == 30 and all(numpy.isfinite(result.losses))
    assert numpy.mean(result.losses[-3:]) < 0.7 * numpy.mean(result.losses[:3])
    assert losses_in(tmp_path) == result.losses


def test_the_summary_and_the_run_folder(tmp_path):
    result = train.train(tiny_config(tmp_path, steps=3))
    with open(tmp_path / "summary.json") as file:
        summary = json.load(file)
    assert set(summary) == set(train.SUMMARY_KEYS) and summary == result.summary
    assert summary["steps"] == 3 and summary["final_loss"] == result.losses[-1]
    assert all(0 <= summary[key] <= 1 for key in train.SUMMARY_KEYS[:5])
    for name in ("metrics.jsonl", "train_config.json", "model/config.json", "model/tokenizer.tinyclip.json",
                 "checkpoint/step-00000003/state.json", "checkpoint/step-00000003/optimizer.safetensors",
                 "checkpoint/latest"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "checkpoint" / "latest").read_text() == "step-00000003\n"
    model = checkpoint.load(tmp_path / "model")
    assert model.config.image_size == 32 and model.bias is not None


def test_a_clip_run_keeps_the_scale_at_most_100(tmp_path):
    config = tiny_config(tmp_path, loss="clip", steps=3, lr=0.5, model_overrides={"image_size": 32,
                                                                                   "init_log_scale": 4.7})
    train.train(config)
    assert checkpoint.load(tmp_path / "model").log_scale.item() <= numpy.log(100.0)


# the ViT tower, and the CNN tower whose batch-norm running statistics must travel in the checkpoint too
TOWERS = {"vit": {"image_size": 32}, "cnn": {"image_size": 32, "vision_type": "cnn", "conv_channels": (4, 8)}}


@pytest.mark.parametrize("tower", TOWERS)
def test_resume_after_ctrl_c_repeats_the_uninterrupted_losses_bit_for_bit(tmp_path, loss_calls, tower):
    def tiny_config(out, **changes):
        return globals()["tiny_config"](out, model_overrides=TOWERS[tower], **changes)

    whole = train.train(tiny_config(tmp_path / "whole"))

    def interrupt_at_step_5(call, share):
        if call == 5:
            os.kill(os.getpid(), signal.SIGINT)      # as Ctrl-C: the run finishes the step, saves, returns
        return share

    loss_calls["count"], loss_calls["hook"] = 0, interrupt_at_step_5
    first = train.train(tiny_config(tmp_path / "parts"))
    assert first.interrupted and 5 <= first.steps < 12 and not (tmp_path / "parts" / "summary.json").exists()
    loss_calls["hook"] = None
    rest = train.train(tiny_config(tmp_path / "parts"), resume=str(tmp_path / "parts"))
    assert first.losses + rest.losses == whole.losses                 # exactly equal floats
    assert losses_in(tmp_path / "parts") == whole.losses              # the log has each step once
    resumed, uninterrupted = weights(tmp_path / "parts" / "model"), weights(tmp_path / "whole" / "model")
    assert all(numpy.array_equal(resumed[name], uninterrupted[name]) for name in uninterrupted)
    assert rest.summary["steps"] == 12


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, loss_calls):
    loss_calls["hook"] = lambda call, share: share * float("nan") if call >= 7 else share
    with pytest.raises(train.NonFiniteLoss, match=r"step 7: the loss is nan.*last good checkpoint"):
        train.train(tiny_config(tmp_path))
    with open(tmp_path / "checkpoint" / "step-00000004" / "state.json") as file:
        assert json.load(file)["step"] == 4
    assert not (tmp_path / "model").exists()
    # the checkpoint is good: resuming from it (without the NaN) finishes the run
    loss_calls["hook"] = None
    assert train.train(tiny_config(tmp_path), resume=str(tmp_path)).steps == 12


def test_resume_with_a_different_configuration_fails_before_training(tmp_path, loss_calls):
    train.train(tiny_config(tmp_path, steps=4))
    calls_before = loss_calls["count"]
    with pytest.raises(ValueError, match=r"other settings.*lr: 0.003 in the run, 0.01 now"):
        train.train(tiny_config(tmp_path, steps=4, lr=1e-2), resume=str(tmp_path))
    assert loss_calls["count"] == calls_before
    with pytest.raises(ValueError, match="no training checkpoint"):
        train.train(tiny_config(tmp_path / "other"), resume=str(tmp_path / "nowhere"))


def test_training_on_a_csv_of_images_and_captions(tmp_path):
    from PIL import Image
    rows = ["filepath,title"]
    for index, colour in enumerate(["red", "green", "blue", "white"] * 2):
        Image.new("RGB", (40, 36), colour).save(tmp_path / f"{index}.png")
        rows.append(f"{index}.png,a {colour} picture")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    result = train.train(tiny_config(tmp_path / "run", data=str(tmp_path / "pairs.csv"), steps=3, batch_size=4))
    assert result.steps == 3 and "zeroshot_top1" not in result.summary       # no shapes evaluation on real data
    assert checkpoint.load(tmp_path / "run" / "model").config.image_size == 32


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="loss must be 'siglip' or 'clip'"):
        train.TrainConfig(loss="softmax")
    with pytest.raises(ValueError, match=r"warmup_steps \(10\) must be below steps \(5\)"):
        train.TrainConfig(steps=5, warmup_steps=10)
    with pytest.raises(ValueError, match="warmup_steps must be None or a non-negative int"):
        train.TrainConfig(warmup_steps=-1)


def test_the_default_warmup_follows_the_run_length():
    assert train.TrainConfig(steps=400).warmup == 50
    assert train.TrainConfig(steps=1000).warmup == 50       # capped
    assert train.TrainConfig(steps=20).warmup == 2          # a short run needs no --warmup-steps of its own
    assert train.TrainConfig(steps=1).warmup == 0
    assert train.TrainConfig(steps=20, warmup_steps=5).warmup == 5


def test_the_command_line_trains_and_evaluates(tmp_path, capsys):
    out = tmp_path / "run"
    status = cli.main(["train", "--steps", "2", "--batch-size", "4", "--warmup-steps", "1", "--eval-per-class",
                       "1", "--eval-pairs", "8", "--no-plots", "--out", str(out)])
    assert status == 0
    printed = capsys.readouterr().out
    assert "step      2/2" in printed and "summary: zeroshot_top1" in printed
    assert cli.main(["eval", "--model", str(out / "model"), "--eval-per-class", "1", "--eval-pairs", "8"]) == 0
    assert "zeroshot_top1" in json.loads(capsys.readouterr().out)
    assert cli.main(["train", "--steps", "3", "--warmup-steps", "1", "--resume", str(out)]) == 2
    assert "other settings (steps: 2 in the run, 3 now)" in capsys.readouterr().err


@needs_mpi
@pytest.mark.parametrize("model", ["tiny", "shapes"])    # a ViT; the CNN whose batch norm is synchronised
def test_two_ranks_train_like_one_process_on_the_same_global_batch(tmp_path, model):
    arguments = ["--preset", model, "--image-size", "32", "--steps", "4", "--batch-size", "6", "--warmup-steps", "1", "--dtype",
                 "float64", "--log-every", "1", "--eval-every", "0", "--eval-per-class", "1", "--eval-pairs",
                 "8", "--no-plots"]
    environment = {name: value for name, value in os.environ.items()
                   if not name.startswith(("PMI_", "MPI_LOCAL", "OMPI_", "PMIX_"))}
    environment.update(TINYCLIP_BACKEND="numpy", OPENBLAS_NUM_THREADS="1")
    for ranks in (1, 2):
        command = [find_mpiexec(), "-n", str(ranks), sys.executable, "-m", "tinyclip", "train", *arguments,
                   "--out", str(tmp_path / f"ranks{ranks}")]
        completed = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=240)
        assert completed.returncode == 0, completed.stderr[-3000:]
        assert completed.stdout.count("summary:") == 1                  # only rank 0 prints
    one, two = losses_in(tmp_path / "ranks1"), losses_in(tmp_path / "ranks2")
    assert len(one) == 4 and numpy.allclose(one, two, rtol=0, atol=1e-10)


@needs_mpi
def test_ctrl_c_under_mpiexec_saves_and_a_resumed_two_rank_run_repeats_the_uninterrupted_one(tmp_path):
    arguments = ["--preset", "tiny", "--image-size", "32", "--steps", "200", "--batch-size", "6", "--warmup-steps",
                 "2", "--dtype", "float64", "--log-every", "1", "--eval-every", "0", "--checkpoint-every", "0",
                 "--eval-per-class", "1", "--eval-pairs", "8", "--no-plots"]
    environment = {name: value for name, value in os.environ.items()
                   if not name.startswith(("PMI_", "MPI_LOCAL", "OMPI_", "PMIX_"))}
    environment.update(TINYCLIP_BACKEND="numpy", OPENBLAS_NUM_THREADS="1")

    def launch(out, *extra):
        command = [find_mpiexec(), "-n", "2", sys.executable, "-m", "tinyclip", "train", *arguments, "--out", str(out),
                   *extra]
        return subprocess.Popen(command, cwd=ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    parts = tmp_path / "parts"
    job = launch(parts)
    deadline = time.monotonic() + 120
    while job.poll() is None and time.monotonic() < deadline:     # Ctrl-C once the run is under way
        if (parts / "metrics.jsonl").is_file() and len(losses_in(parts)) >= 5:
            job.send_signal(signal.SIGINT)                          # mpiexec passes it on to every rank
            break
        time.sleep(0.02)
    stdout, stderr = job.communicate(timeout=120)
    assert job.returncode == cli.EXIT_INTERRUPTED, stderr[-3000:]
    assert "interrupted by SIGINT: checkpoint of step" in stdout and not (parts / "summary.json").exists()
    first = losses_in(parts)
    assert 5 <= len(first) < 200

    resumed = launch(parts, "--resume", str(parts))
    whole = launch(tmp_path / "whole")
    for job in (resumed, whole):
        stdout, stderr = job.communicate(timeout=240)
        assert job.returncode == 0, stderr[-3000:]
    assert losses_in(parts) == losses_in(tmp_path / "whole")        # exactly equal floats, each step once


def test_lit_starts_from_a_saved_image_tower_and_keeps_it_locked(tmp_path):
    # a CLIP-family model with a CNN image tower, its batch-norm statistics moved away from (0, 1)
    source_config = preset("tiny", image_size=32, vision_type="cnn", conv_channels=(4, 6), embed_dim=12)
    source = CLIP(source_config, seed=7)
    source.encode_image(numpy.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 3)))
    checkpoint.save(source, tmp_path / "source")
    source_state = source.visual.state_dict()

    locked = train.train(tiny_config(tmp_path / "lit", image_tower=str(tmp_path / "source"), lock_image=True,
                                     eval_every=4))              # evaluations in between must not unlock it
    model = checkpoint.load(tmp_path / "lit" / "model")
    assert model.config.conv_channels == (4, 6) and model.config.embed_dim == 12
    assert model.config.family == "siglip" and model.config.image_normalization == "clip"   # the tower's pixels
    for name, value in model.visual.state_dict().items():         # weights and batch-norm statistics untouched
        numpy.testing.assert_array_equal(value, source_state[name])
    fresh = CLIP(model.config, seed=0)                               # what the text tower started from
    assert not numpy.array_equal(model.text.state_dict()["token_embedding.weight"],
                                 fresh.text.state_dict()["token_embedding.weight"])
    assert numpy.mean(locked.losses[-3:]) < numpy.mean(locked.losses[:3])

    train.train(tiny_config(tmp_path / "unlocked", image_tower=str(tmp_path / "source")))
    unlocked = checkpoint.load(tmp_path / "unlocked" / "model").visual.state_dict()
    assert not numpy.array_equal(unlocked["stages.0.conv.weight"], source_state["stages.0.conv.weight"])


def test_lit_settings_are_checked_before_training(tmp_path):
    with pytest.raises(ValueError, match="lock_image needs image_tower"):
        train.TrainConfig(lock_image=True)
    with pytest.raises(ValueError, match="--image-tower .*nowhere"):
        train.train(tiny_config(tmp_path / "run", image_tower=str(tmp_path / "nowhere"), lock_image=True))


def test_the_lit_banner_says_what_is_trained_from_what(tmp_path, capsys):
    source = CLIP(preset("tiny", image_size=32), seed=3)
    checkpoint.save(source, tmp_path / "source")
    train.train(tiny_config(tmp_path / "lit", steps=3, image_tower=str(tmp_path / "source"), lock_image=True))
    banner = capsys.readouterr().out.splitlines()[0]
    assert banner.startswith(f"training the text tower of tiny from scratch against the image tower of "
                             f"{tmp_path / 'source'} (locked) with the siglip loss on the built-in shapes")
    model = checkpoint.load(tmp_path / "lit" / "model")
    text_parameters = sum(parameter.data.size for parameter in model.text.parameters())
    assert f"{text_parameters + 2:,} trained parameters" in banner        # the text tower, the scale and the bias
    assert banner.endswith(f" trained parameters, writing to {tmp_path / 'lit'}")
