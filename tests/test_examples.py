"""Tests for examples/: each script runs as a user would run it, for a few steps of the ``tiny`` preset.

The scripts are started with this Python in a subprocess and checked by what
they leave behind and print: the run folder and summary.json of a training
run, class names in the zero-shot lines, the demo CSV and its images. The
MPI example runs under ``mpiexec -n 2`` and must train exactly like the
one-process shapes example with the same settings.
"""

import csv
import json
import math
import os
import subprocess
import sys

import pytest

from tinyclip.checkpoint import TOKENIZER_FILE
from tinyclip.data import shapes
from tinyclip.train import SUMMARY_KEYS

from .test_distributed import ROOT, find_mpiexec, needs_mpi

EXAMPLES = ROOT / "examples"
TINY_RUN = ["--preset", "tiny", "--image-size", "32", "--steps", "3", "--batch-size", "8"]


def environment():
    """This environment without an outer MPI launcher's variables, and with this checkout importable."""
    values = {name: value for name, value in os.environ.items()
              if not name.startswith(("PMI_", "MPI_LOCAL", "OMPI_", "PMIX_"))}
    values["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return values


def run_example(script, *arguments, cwd, launcher=(), env=None):
    """Run examples/<script> with ``arguments``; returns its stdout after checking that it succeeded."""
    command = [*launcher, sys.executable, str(EXAMPLES / script), *map(str, arguments)]
    completed = subprocess.run(command, cwd=cwd, env=env or environment(), capture_output=True, text=True,
                               timeout=240)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stdout


def read_summary(run):
    with open(run / "summary.json", encoding="utf-8") as file:
        return json.load(file)


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory):
    """(run folder, printed output) of examples/train_shapes.py on the tiny preset."""
    folder = tmp_path_factory.mktemp("examples")
    out = run_example("train_shapes.py", *TINY_RUN, "--out", folder / "run", cwd=folder)
    return folder / "run", out


def test_quickstart_learns_above_chance(tmp_path):
    out = run_example("quickstart.py", "--steps", "40", "--batch", "64", cwd=tmp_path)
    last = out.strip().splitlines()[-1]
    assert last.startswith("done in") and "among 512 (chance 0.2%)" in last
    assert float(last.split("top-1 ")[1].split("%")[0]) > 2.0          # ten times chance after 40 steps


def test_train_shapes_writes_and_prints_the_summary(shapes_run):
    run, out = shapes_run
    summary = read_summary(run)
    assert set(summary) == set(SUMMARY_KEYS) and summary["steps"] == 3 and math.isfinite(summary["final_loss"])
    assert (run / "model" / TOKENIZER_FILE).is_file()
    table = out[out.index("held-out metric"):]
    for name in ("zero-shot top-1", "image -> text R@1", "text -> image R@1", "relation probe", "control probe"):
        assert name in table
    assert f"{summary['zeroshot_top1']:6.3f}" in table


def test_zeroshot_classifies_shapes_images_with_the_trained_model(shapes_run, tmp_path):
    run, _ = shapes_run
    out = run_example("zeroshot.py", run, "--count", "3", "--top", "2", cwd=tmp_path)
    header, *lines = out.strip().splitlines()
    assert header.startswith(f"{len(shapes.class_names())} classes x {len(shapes.ZEROSHOT_TEMPLATES)} templates")
    assert len(lines) == 3
    for line in lines:
        truth, ranked = line.split(": ", 1)
        assert truth.removeprefix("shapes image of a ") in shapes.class_names()
        predicted = [part.rsplit(" ", 1)[0] for part in ranked.split(", ")]
        assert len(predicted) == 2 and set(predicted) <= set(shapes.class_names())


def test_zeroshot_classifies_image_files_against_given_classes_and_templates(shapes_run, tmp_path):
    from PIL import Image
    run, _ = shapes_run
    image = tmp_path / "red.png"
    Image.new("RGB", (50, 40), "red").save(image)
    out = run_example("zeroshot.py", run / "model", image, "--classes", "red circle", "blue star",
                      "--template", "a {}", "--template", "a photo of a {}.", cwd=tmp_path)
    header, line = out.strip().splitlines()
    assert header == "2 classes x 2 templates: 'a {}', 'a photo of a {}.'"
    path, ranked = line.split(": ", 1)
    scores = {part.rsplit(" ", 1)[0]: float(part.rsplit(" ", 1)[1]) for part in ranked.split(", ")}
    assert path == str(image) and set(scores) == {"red circle", "blue star"}
    assert all(0 <= score <= 1 for score in scores.values())


def test_train_csv_writes_a_demo_data_set_and_trains_on_it(tmp_path):
    out = run_example("train_csv.py", "--demo", tmp_path / "demo", "--demo-pairs", "16", *TINY_RUN,
                      "--out", tmp_path / "run", cwd=tmp_path)
    with open(tmp_path / "demo" / "pairs.csv", newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 16 and all((tmp_path / "demo" / row["filepath"]).is_file() and row["title"] for row in rows)
    summary = read_summary(tmp_path / "run")
    assert summary["steps"] == 3 and math.isfinite(summary["final_loss"])
    assert "zeroshot_top1" not in summary                    # no shapes evaluation on a CSV
    assert "at the first step" in out and (tmp_path / "run" / "model" / TOKENIZER_FILE).is_file()


@needs_mpi
def test_train_mpi_on_two_ranks_trains_like_one_process(shapes_run, tmp_path):
    env = {**environment(), "OPENBLAS_NUM_THREADS": "1"}     # two ranks on few cores: one BLAS thread each
    out = run_example("train_mpi.py", *TINY_RUN, "--out", tmp_path / "run", cwd=tmp_path,
                      launcher=[find_mpiexec(), "-n", "2"], env=env)
    assert out.startswith("2 rank(s) share every global batch of 8 pairs")
    assert out.count("summary:") == 1 and out.count("final loss") == 1      # only rank 0 prints
    one_process, two_ranks = read_summary(shapes_run[0]), read_summary(tmp_path / "run")
    # the same global batches and loss, summed in another order in float32
    assert two_ranks["final_loss"] == pytest.approx(one_process["final_loss"], rel=1e-3)
