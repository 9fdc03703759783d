"""Training runs that survive a cluster (docs/faults.md), tested for real.

Real processes (forked from the test, so that each starts at once) are
killed (SIGKILL) at every step of every atomic write of a checkpoint and of
the final outputs, chosen by index from the recorded sequence of write
steps (tinyclip.files.fault_hook), never by a timer;
real SIGTERM goes to a process and to ``mpiexec``; one rank of a real
``mpiexec -n 2`` job meets an unreadable image or an error; a real full
filesystem (a small tmpfs, mounted when the tests run as root) takes the
writes. Waiting is always for a condition (a file appearing, a process
ending) with a timeout.

Every run is the ``tiny`` preset at 32 px for a few steps of batch 8, so
each process takes about a second.
"""

import contextlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy
import pytest

from tinyclip import checkpoint, cli, runs, train
from tinyclip import files as tinyclip_files      # (the tests name os.walk's lists "files")
from tinyclip.data import captions as caption_sets
from tinyclip.data.loader import BatchOrder

from .test_distributed import ROOT, find_mpiexec, needs_mpi
from .test_train import tiny_config

TINY = ["--preset", "tiny", "--image-size", "32", "--batch-size", "8", "--warmup-steps", "1", "--log-every", "1",
        "--eval-every", "0", "--eval-per-class", "1", "--eval-pairs", "8", "--tokenizer-captions", "200",
        "--no-plots"]
WORKER = [sys.executable, "-m", "tests.mpi.train_with_faults", "train"]
TIMEOUT = 120


def environment(**variables):
    names = {name: value for name, value in os.environ.items()
             if not name.startswith(("PMI_", "MPI_LOCAL", "OMPI_", "PMIX_", "TINYCLIP_TEST_"))}
    names.update(TINYCLIP_BACKEND="numpy", OPENBLAS_NUM_THREADS="1", **variables)
    return names


def run(arguments, ranks=None, **variables):
    command = ([find_mpiexec(), "-n", str(ranks)] if ranks else []) + WORKER + arguments
    return subprocess.run(command, cwd=ROOT, env=environment(**variables), capture_output=True, text=True,
                          timeout=TIMEOUT)


def start(arguments, ranks=None, **variables):
    command = ([find_mpiexec(), "-n", str(ranks)] if ranks else []) + WORKER + arguments
    return subprocess.Popen(command, cwd=ROOT, env=environment(**variables), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(path, job, timeout=TIMEOUT):
    """Wait until ``path`` exists (the worker writes it once its first step is done)."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if job.poll() is not None:
            raise AssertionError(f"the run ended (status {job.returncode}) before {path} appeared: "
                                 f"{job.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            job.kill()
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.02)


def weights(folder):
    return checkpoint.read_safetensors(os.path.join(folder, checkpoint.WEIGHTS_FILE))


def same_weights(one, two):
    first, second = weights(one), weights(two)
    return first.keys() == second.keys() and all(numpy.array_equal(first[name], second[name]) for name in first)


def latest_step(out):
    folder = checkpoint.latest_training_checkpoint(out)
    return checkpoint.read_training_state(folder)["step"]


def leftovers(folder):
    return sorted(os.path.join(root, name) for root, folders, files in os.walk(folder)
                  for name in folders + files if tinyclip_files.is_leftover(name))


# ---------------------------------------------------------------------------------
# 3, 4: a kill at every step of every write leaves a complete checkpoint, and the run resumes bit for bit
# ---------------------------------------------------------------------------------

def recorded_writes(monkeypatch, arguments):
    """Run ``tinyclip train arguments`` here, recording every step of every atomic write: [(point, path)]."""
    steps = []
    monkeypatch.setattr(tinyclip_files, "fault_hook", lambda point, path: steps.append((point, path)))
    assert cli.main(["train", *arguments]) == 0
    monkeypatch.setattr(tinyclip_files, "fault_hook", None)
    return steps


def stopped_at(index, arguments, action):
    """Run ``tinyclip train arguments`` in a forked child process (tinyclip is already imported: no start-up
    cost) and ``action()`` there at the ``index``-th step of its atomic writes; returns the signal that ended
    the child (None when it exited)."""
    child = os.fork()
    if child == 0:                                  # the child: never returns into pytest
        try:
            count = iter(range(1, 1 << 30))
            tinyclip_files.fault_hook = lambda point, path: action() if next(count) == index else None
            with open(os.devnull, "w") as quiet:
                sys.stdout = sys.stderr = quiet
                cli.main(["train", *arguments])
        finally:
            os._exit(3)
    _, status = os.waitpid(child, 0)
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else None


def test_a_kill_at_every_step_of_a_checkpoint_or_final_write_leaves_a_run_that_resumes_bit_for_bit(tmp_path,
                                                                                                   monkeypatch):
    arguments = TINY + ["--steps", "4", "--checkpoint-every", "1", "--keep-checkpoints", "2"]
    steps = recorded_writes(monkeypatch, arguments + ["--out", str(tmp_path / "whole")])
    # every step of the third checkpoint (its step folder, the pointer, pruning the first) and of the final
    # model and summary.json; a step inside a hidden staging folder changes nothing a reader sees but the
    # leftover, so one of those is enough
    first = next(index for index, (point, path) in enumerate(steps, 1) if "step-00000003" in path)
    last = next(index for index, (point, path) in enumerate(steps, 1) if "step-00000004" in path)
    final = [index for index, (point, path) in enumerate(steps, 1)
             if path in (str(tmp_path / "whole" / "model"), str(tmp_path / "whole" / "summary.json"))]
    hidden = [index for index in range(first, last) if "/." in os.path.dirname(steps[index - 1][1])]
    chosen = [index for index in range(first, last) if index not in hidden] + hidden[:1] + final
    assert {"staged_folder:created", "staged_folder:filled", "swap_in:renamed", "staged_file:written",
            "staged_file:replaced", "save_training_checkpoint:pruning"} <= {steps[index - 1][0] for index in chosen}
    for index in chosen:
        out = tmp_path / f"killed-at-{index}"
        where = f"killed at step {index} of the writes ({steps[index - 1][0]})"
        assert stopped_at(index, arguments + ["--out", str(out)],
                          lambda: os.kill(os.getpid(), signal.SIGKILL)) == signal.SIGKILL, where
        assert latest_step(out) in (2, 3, 4), where            # a complete checkpoint is always there
        assert not train.train(resume=str(out)).interrupted, where
        assert same_weights(out / "model", tmp_path / "whole" / "model"), where
        assert (out / "summary.json").is_file() and leftovers(out) == [], where
        assert sorted(os.listdir(out / "checkpoint")) == ["latest", "step-00000003", "step-00000004"], where


def test_a_second_sigterm_during_a_checkpoint_write_stops_at_once_and_keeps_the_last_checkpoint(tmp_path,
                                                                                                monkeypatch):
    arguments = TINY + ["--steps", "4", "--checkpoint-every", "1"]
    steps = recorded_writes(monkeypatch, arguments + ["--out", str(tmp_path / "whole")])
    filled = next(index for index, (point, path) in enumerate(steps, 1)
                  if point == "staged_folder:filled" and path.endswith("step-00000003"))

    def two_sigterms():
        os.kill(os.getpid(), signal.SIGTERM)      # the first: stop after this step (it is being saved already)
        os.kill(os.getpid(), signal.SIGTERM)      # the second: stop now

    out = tmp_path / "run"
    assert stopped_at(filled, arguments + ["--out", str(out)], two_sigterms) == signal.SIGTERM
    assert latest_step(out) == 2
    assert not train.train(resume=str(out)).interrupted
    assert same_weights(out / "model", tmp_path / "whole" / "model")


# ---------------------------------------------------------------------------------
# 2: SIGTERM is handled like Ctrl-C, alone and under mpiexec; the exit status says "interrupted, saved"
# ---------------------------------------------------------------------------------

def test_sigterm_finishes_the_step_saves_and_exits_with_the_interrupted_status(tmp_path):
    out, ready = tmp_path / "run", tmp_path / "ready"
    job = start(TINY + ["--steps", "500", "--checkpoint-every", "0", "--out", str(out)],
                TINYCLIP_TEST_READY=str(ready))
    wait_for(ready, job)
    job.send_signal(signal.SIGTERM)
    stdout, stderr = job.communicate(timeout=TIMEOUT)
    assert job.returncode == cli.EXIT_INTERRUPTED == 75, stderr[-3000:]
    assert "interrupted by SIGTERM: checkpoint of step" in stdout and f"--resume {out}" in stdout
    saved = latest_step(out)
    assert 1 <= saved < 500 and saved == len(runs.MetricsLog._read(out / "metrics.jsonl"))
    assert not (out / "summary.json").exists()



@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process's environment from /proc")
def test_sigterm_reaches_the_restarted_tinyclip_train_by_the_pid_its_parent_knows(tmp_path):
    """``python -m tinyclip train`` runs itself again with OPENBLAS_THREAD_TIMEOUT (os.execv, the same PID); the
    worker above passes argv and never restarts, so this run is the one that shows the signal reaching the new image."""
    out = tmp_path / "run"
    environment_now = {name: value for name, value in environment().items() if name != "OPENBLAS_THREAD_TIMEOUT"}
    job = subprocess.Popen([sys.executable, "-m", "tinyclip", "train", *TINY, "--steps", "500", "--checkpoint-every",
                            "0", "--out", str(out)], cwd=ROOT, env=environment_now, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    metrics, deadline = out / "metrics.jsonl", time.monotonic() + TIMEOUT
    while not (metrics.exists() and metrics.stat().st_size):     # a logged step: training has started
        assert job.poll() is None, job.stderr.read()[-3000:]
        if time.monotonic() > deadline:
            job.kill()
            raise AssertionError(f"no step logged in {TIMEOUT} s")
        time.sleep(0.05)
    # the image that logs is the restarted one: exec gave the same PID the environment with the variable
    assert b"OPENBLAS_THREAD_TIMEOUT=4" in pathlib.Path(f"/proc/{job.pid}/environ").read_bytes().split(b"\0")
    job.send_signal(signal.SIGTERM)
    stdout, stderr = job.communicate(timeout=TIMEOUT)
    assert job.returncode == cli.EXIT_INTERRUPTED, stderr[-3000:]
    assert stdout.count("interrupted by SIGTERM") == 1 and 1 <= latest_step(out) < 500

@needs_mpi
def test_sigterm_to_mpiexec_stops_every_rank_at_the_same_step_and_saves(tmp_path):
    out, ready = tmp_path / "run", tmp_path / "ready"
    job = start(TINY + ["--steps", "500", "--checkpoint-every", "0", "--out", str(out)], ranks=2,
                TINYCLIP_TEST_READY=str(ready))
    wait_for(ready, job)
    job.send_signal(signal.SIGTERM)                  # mpiexec (hydra) passes it on to every rank
    stdout, stderr = job.communicate(timeout=TIMEOUT)
    assert job.returncode == cli.EXIT_INTERRUPTED, stderr[-3000:]
    assert stdout.count("interrupted by SIGTERM") == 1
    assert 1 <= latest_step(out) < 500


# ---------------------------------------------------------------------------------
# 1: an error on one rank ends the whole job, said once by that rank, the last checkpoint intact
# ---------------------------------------------------------------------------------

def image_table(folder, count=16):
    from PIL import Image
    rows = ["filepath,title"]
    for index in range(count):
        colour = ("red", "green", "blue", "white")[index % 4]
        Image.new("RGB", (40, 36), colour).save(folder / f"{index}.png")
        rows.append(f"{index}.png,a {colour} picture number {index}")
    (folder / "pairs.csv").write_text("\n".join(rows) + "\n")
    return folder / "pairs.csv"


@needs_mpi
def test_an_unreadable_image_only_rank_1_loads_under_strict_ends_the_whole_job(tmp_path):
    table = image_table(tmp_path)
    pairs = caption_sets.CSVCaptions(table)
    # the examples rank 1 of 2 loads at the second step of the first epoch (a global batch of 8, seed 0)
    rank_1 = BatchOrder(pairs, 8, seed=0, rank=1, world_size=2, transform=lambda image, rng: image).indices(0, 1)
    bad = pairs.path(int(rank_1[0]))
    with open(bad, "wb") as file:
        file.write(b"not an image")
    out = tmp_path / "run"
    job = run(TINY + ["--data", str(table), "--strict", "--steps", "6", "--checkpoint-every", "1",
                      "--out", str(out)], ranks=2)
    assert job.returncode not in (0, cli.EXIT_INTERRUPTED)
    assert job.stderr.count("tinyclip train: rank 1 of 2:") == 1 and bad in job.stderr
    assert "rank 0 of 2" not in job.stderr
    assert latest_step(out) == 1 and not (out / "model").exists()


@needs_mpi
def test_a_failure_on_rank_0_ends_the_whole_job_and_keeps_the_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    job = run(TINY + ["--steps", "8", "--checkpoint-every", "1", "--out", str(out)], ranks=2,
              TINYCLIP_TEST_FAIL_RANK="0:4")
    assert job.returncode == cli.EXIT_BAD_INPUT, job.stderr[-3000:]
    assert job.stderr.count("tinyclip train: rank 0 of 2: [Errno 28] no space left on device (injected") == 1
    assert latest_step(out) == 3
    resumed = run(["--resume", str(out)], ranks=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]


@needs_mpi
def test_a_start_that_fails_on_every_rank_is_reported_once_and_makes_no_folder(tmp_path):
    job = run(TINY + ["--data", str(tmp_path / "nowhere.csv"), "--out", str(tmp_path / "run")], ranks=2)
    assert job.returncode == cli.EXIT_BAD_INPUT
    assert job.stderr.count("nowhere.csv") == 1 and not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------
# 4: a full disk at any write: the file or folder is whole or absent, the error names it, --resume recovers
# ---------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A real 8 MiB filesystem (tmpfs) that the test can fill; skipped with the reason where it cannot mount."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill needs root (CI runs the tests as root)")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


def fill(disk):
    """Write zeros into ``disk`` until it is full (the filesystem answers ENOSPC)."""
    chunk = bytes(1 << 16)
    with open(disk / "filler", "wb") as file:
        try:
            while True:
                file.write(chunk)
                file.flush()
        except OSError as error:
            assert error.errno == 28
    return disk / "filler"


def files_are_whole(folder):
    for root, _, files in os.walk(folder):
        for name in files:
            if name.endswith(".json") or name == "latest":
                text = open(os.path.join(root, name), encoding="utf-8").read()
                assert text, f"{name} is empty"
                if name.endswith(".json"):
                    json.loads(text)


@pytest.mark.parametrize("full_at", ["checkpoint", "model", "summary"])
def test_a_full_disk_leaves_every_output_whole_or_absent_and_names_what_was_written(small_disk, monkeypatch,
                                                                                  full_at):
    out = small_disk / "run"
    config = tiny_config(out, steps=4, checkpoint_every=1)
    writers = {"checkpoint": ("save_training_checkpoint", lambda args: args[1] == 3, "the checkpoint of step 3"),
               "model": ("save_model_with_tokenizer", lambda args: args[2] == str(out / "model"),
                         "the final model"),
               "summary": ("write_json", lambda args: args[0].endswith("summary.json"), "the summary")}
    name, when, what = writers[full_at]
    original = getattr(checkpoint, name)
    filler = []

    def fill_first(*args, **kwargs):
        if when(args) and not filler:
            filler.append(fill(small_disk))
        return original(*args, **kwargs)

    monkeypatch.setattr(checkpoint, name, fill_first)
    with pytest.raises(OSError, match=f"writing {what} to {out}.*No space left on device"):
        train.train(config)
    assert leftovers(out) == [] and not (out / "summary.json").exists()
    files_are_whole(out)
    if full_at == "model":
        assert not (out / "model").exists()
    if full_at == "summary":
        assert checkpoint.load(out / "model") is not None
        assert (out / "model" / checkpoint.TOKENIZER_FILE).is_file()
    assert latest_step(out) == (2 if full_at == "checkpoint" else 4)
    os.unlink(filler[0])                           # room again: the same command with --resume finishes the run
    monkeypatch.setattr(checkpoint, name, original)
    result = train.train(resume=str(out))
    assert result.steps == 4 and (out / "summary.json").is_file()


# ---------------------------------------------------------------------------------
# 5, 6, 7, 8: resume — a finished run is left alone, --resume alone continues, state.json is checked,
# two runs cannot share a folder
# ---------------------------------------------------------------------------------

def test_resuming_a_finished_run_changes_nothing_and_says_so(tmp_path, capsys):
    train.train(tiny_config(tmp_path, steps=3, eval_every=0))
    before = {name: (tmp_path / name).read_bytes() for name in ("summary.json", "metrics.jsonl")}
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(tmp_path)]) == cli.EXIT_FINISHED
    assert "has finished (step 3 of 3" in capsys.readouterr().out
    assert {name: (tmp_path / name).read_bytes() for name in before} == before


def test_a_run_stopped_between_its_last_checkpoint_and_its_summary_finishes_with_its_final_loss(tmp_path, capsys):
    train.train(tiny_config(tmp_path, steps=4, checkpoint_every=2, eval_every=0))
    summary = json.loads((tmp_path / "summary.json").read_text())
    (tmp_path / "summary.json").unlink()                       # as a kill just before the summary leaves it
    assert cli.main(["train", "--resume", str(tmp_path)]) == cli.EXIT_FINISHED
    assert f"final_loss {summary['final_loss']:.4g}," in capsys.readouterr().out
    assert json.loads((tmp_path / "summary.json").read_text())["final_loss"] == summary["final_loss"]


def test_resume_with_out_neither_copies_a_finished_run_nor_writes_into_another_run(tmp_path, capsys):
    train.train(tiny_config(tmp_path / "done", steps=3, eval_every=0))
    assert cli.main(["train", "--resume", str(tmp_path / "done"), "--out", str(tmp_path / "copy")]) == 0
    assert f"{tmp_path / 'done'} has finished" in capsys.readouterr().out and not (tmp_path / "copy").exists()
    interrupted_run(tmp_path / "stopped")
    before = sorted(os.listdir(tmp_path / "done"))
    assert cli.main(["train", "--resume", str(tmp_path / "stopped"), "--out", str(tmp_path / "done")]) == 2
    assert f"--out {tmp_path / 'done'} already holds another run" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "done")) == before
    for held in ("done", "stopped"):                   # a finished run, a run with a checkpoint: a new run refused
        assert cli.main(["train", *TINY, "--steps", "3", "--out", str(tmp_path / held)]) == 2
        assert f"--out {tmp_path / held} already holds a run: continue it with --resume" in capsys.readouterr().err


def test_a_run_that_failed_before_its_first_checkpoint_starts_again_in_its_folder(tmp_path, capsys):
    table = image_table(tmp_path, count=8)
    (tmp_path / "3.png").write_bytes(b"not an image")
    again = ["train", *TINY, "--data", str(table), "--strict", "--steps", "4", "--batch-size", "4",
             "--out", str(tmp_path / "run")]
    assert cli.main(again) == 2 and (tmp_path / "run" / "train_config.json").is_file()
    assert "3.png" in capsys.readouterr().err
    image_table(tmp_path, count=8)                     # the image repaired: the same command, not --resume,
    assert cli.main(again) == 0                        # which would find no checkpoint
    assert [record["step"] for record in runs.MetricsLog._read(tmp_path / "run" / "metrics.jsonl")
            if "loss" in record] == [1, 2, 3, 4]


def test_a_run_on_relative_paths_resumes_from_another_directory(tmp_path, monkeypatch, capsys):
    image_table(tmp_path, count=8)
    monkeypatch.chdir(tmp_path)
    stopped = interrupted_run_on(["--data", "pairs.csv", "--batch-size", "4", "--out", "run"])
    assert stopped == cli.EXIT_INTERRUPTED
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["data"] == str(tmp_path / "pairs.csv")
    monkeypatch.chdir(tmp_path.parent)                  # pairs.csv (and run) are not found from here
    assert cli.main(["train", "--resume", str(tmp_path / "run")]) == cli.EXIT_FINISHED, capsys.readouterr().err


@contextlib.contextmanager
def sigterm_at_step(at):
    """Inside the block, SIGTERM reaches this process during step ``at`` (sent from inside the step, as a
    scheduler's would arrive while one runs)."""
    original = train.batch_loss
    calls = []

    def loss(*args):
        calls.append(1)
        if len(calls) == at:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args)

    train.batch_loss = loss
    try:
        yield
    finally:
        train.batch_loss = original


def interrupted_run_on(arguments, steps=6, at=3):
    """The exit status of ``tinyclip train`` stopped by SIGTERM at step ``at``."""
    with sigterm_at_step(at):
        return cli.main(["train", *TINY, "--steps", str(steps), "--checkpoint-every", "0", *arguments])


def interrupted_run(out, steps=6, at=3):
    """A run stopped by SIGTERM at step ``at``."""
    with sigterm_at_step(at):
        return train.train(tiny_config(out, steps=steps, checkpoint_every=0))


def test_resume_alone_continues_from_the_runs_own_settings_and_a_mismatch_lists_each_field(tmp_path, capsys):
    whole = train.train(tiny_config(tmp_path / "whole", steps=6, checkpoint_every=0))
    first = interrupted_run(tmp_path / "run")
    assert first.interrupted and first.steps == 3
    capsys.readouterr()
    status = cli.main(["train", "--resume", str(tmp_path / "run"), "--lr", "0.01", "--batch-size", "4"])
    assert status == cli.EXIT_BAD_INPUT
    error = capsys.readouterr().err
    assert "lr: 0.003 in the run, 0.01 now" in error and "batch_size: 8 in the run, 4 now" in error
    assert cli.main(["train", "--resume", str(tmp_path / "run"), "--log-every", "2"]) == cli.EXIT_FINISHED
    assert same_weights(tmp_path / "run" / "model", tmp_path / "whole" / "model")
    assert [record["step"] for record in runs.MetricsLog._read(tmp_path / "run" / "metrics.jsonl")
            if "loss" in record] == [1, 2, 3, 4, 6]          # every step to 3, then every second one (and the last)
    assert whole.losses[:3] == first.losses


def test_a_moved_run_resumes_where_it_now_is_and_never_writes_to_its_old_folder(tmp_path, capsys):
    whole = train.train(tiny_config(tmp_path / "whole", steps=6, checkpoint_every=0))
    interrupted_run(tmp_path / "old")
    shutil.move(tmp_path / "old", tmp_path / "moved")                  # copied off a cluster, renamed, ...
    assert cli.main(["train", "--resume", str(tmp_path / "moved")]) == cli.EXIT_FINISHED
    assert f"writing to {tmp_path / 'moved'}" in capsys.readouterr().out
    assert not (tmp_path / "old").exists() and (tmp_path / "moved" / "summary.json").is_file()
    assert same_weights(tmp_path / "moved" / "model", tmp_path / "whole" / "model") and whole.steps == 6
    assert cli.main(["train", "--resume", str(tmp_path / "moved")]) == cli.EXIT_FINISHED
    assert f"{tmp_path / 'moved'} has finished" in capsys.readouterr().out


STATE_DAMAGE = {
    "truncated": (lambda text, state: text[:20], "is not valid JSON"),
    "empty": (lambda text, state: "", "is not valid JSON"),
    "no step": (lambda text, state: json.dumps({k: v for k, v in state.items() if k != "step"}),
                "field 'step' is missing"),
    "step as text": (lambda text, state: json.dumps({**state, "step": "4"}), "field 'step' must be a non-negative"),
    "no loader": (lambda text, state: json.dumps({**state, "loader": None}), "field 'loader' must be"),
    "optimizer numbers": (lambda text, state: json.dumps({**state, "optimizer_numbers": {"x": "y"}}),
                          "field 'optimizer_numbers' must be"),
}


@pytest.mark.parametrize("damage", STATE_DAMAGE)
def test_a_damaged_state_json_is_named_with_its_field(tmp_path, capsys, damage):
    train.train(tiny_config(tmp_path, steps=4, checkpoint_every=2))
    (tmp_path / "summary.json").unlink()
    path = tmp_path / "checkpoint" / "step-00000004" / "state.json"
    text = path.read_text()
    change, message = STATE_DAMAGE[damage]
    path.write_text(change(text, json.loads(text)))
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(tmp_path)]) == cli.EXIT_BAD_INPUT
    error = capsys.readouterr().err
    assert str(path) in error and message in error and "Traceback" not in error


def test_a_step_beyond_the_run_is_refused(tmp_path, capsys):
    train.train(tiny_config(tmp_path, steps=4, checkpoint_every=2))
    (tmp_path / "summary.json").unlink()
    folder = tmp_path / "checkpoint" / "step-00000999"
    os.rename(tmp_path / "checkpoint" / "step-00000004", folder)
    state = json.loads((folder / "state.json").read_text())
    state["step"] = state["schedule"]["step_count"] = 999
    (folder / "state.json").write_text(json.dumps(state))
    assert cli.main(["train", "--resume", str(tmp_path)]) == cli.EXIT_BAD_INPUT
    assert f"{folder / 'state.json'}: field 'step' is 999, beyond the run's 4 steps" in capsys.readouterr().err


def test_a_second_run_into_a_folder_in_use_is_refused_at_once_naming_the_holder(tmp_path, capsys):
    out, ready = tmp_path / "run", tmp_path / "ready"
    job = start(TINY + ["--steps", "500", "--checkpoint-every", "0", "--out", str(out)],
                TINYCLIP_TEST_READY=str(ready))
    try:
        wait_for(ready, job)
        settings = (out / "train_config.json").read_bytes()
        for second in (["train", *TINY, "--steps", "3", "--out", str(out)], ["train", "--resume", str(out)]):
            assert cli.main(second) == cli.EXIT_BAD_INPUT
            assert f"in use by another training run (PID {job.pid}" in capsys.readouterr().err
        assert (out / "train_config.json").read_bytes() == settings
    finally:
        job.send_signal(signal.SIGTERM)
        job.communicate(timeout=TIMEOUT)
    assert job.returncode == cli.EXIT_INTERRUPTED
    steps = [record["step"] for record in runs.MetricsLog._read(out / "metrics.jsonl")]
    assert steps == list(range(1, len(steps) + 1))            # one run's records only


# ---------------------------------------------------------------------------------
# 9, 10, 11, 12: divergence reported one way, skipped examples counted, nothing made by a failed start,
# outputs with the user's umask
# ---------------------------------------------------------------------------------

def test_embeddings_that_diverge_are_reported_as_a_non_finite_loss(tmp_path, capsys):
    status = cli.main(["train", *TINY, "--steps", "20", "--lr", "10000", "--grad-clip", "0", "--checkpoint-every",
                       "2", "--out", str(tmp_path)])
    assert status == cli.EXIT_FAILED
    error = capsys.readouterr().err
    assert "hold inf or NaN; training stopped (the last good checkpoint is" in error and "try a lower --lr" in error
    assert "ValueError" not in error and not (tmp_path / "model").exists()


def test_non_finite_embeddings_on_one_rank_are_a_non_finite_loss_on_every_rank(tmp_path):
    model = train.CLIP(train.preset("tiny", image_size=32), dtype="float64")
    images, tokens = numpy.zeros((2, 32, 32, 3)), numpy.ones((2, 8), dtype=numpy.int64)
    model.log_scale.data[...] = numpy.inf
    with pytest.raises(train.NonFiniteLoss, match="log_scale hold inf or NaN"):
        train.batch_loss(model, tiny_config(tmp_path), images, tokens, train.distributed.SingleProcess())


def test_skipped_examples_are_counted_per_epoch_and_in_the_summary_naming_the_first(tmp_path, capsys):
    table = image_table(tmp_path, count=8)
    for index in (1, 4, 6):
        (tmp_path / f"{index}.png").write_bytes(b"not an image")
    result = train.train(tiny_config(tmp_path / "run", data=str(table), steps=4, batch_size=4, examples=8))
    printed = capsys.readouterr().out
    assert result.summary["skipped_examples"] == 6                 # 3 unreadable images in each of 2 epochs
    assert "epoch 1: skipped 3 examples whose image could not be read (first on rank 0: " in printed
    assert all(str(tmp_path / f"{index}.png") in printed for index in (1, 4, 6))
    records = runs.MetricsLog._read(tmp_path / "run" / "metrics.jsonl")
    assert records[-1]["skipped_examples"] == 6 and records[1]["skipped_examples"] == 3
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["skipped_examples"] == 6


def test_an_image_skipped_in_every_epoch_is_named_once(tmp_path, capsys):
    table = image_table(tmp_path, count=8)
    (tmp_path / "1.png").write_bytes(b"not an image")
    train.train(tiny_config(tmp_path / "run", data=str(table), steps=4, batch_size=4, examples=8))
    last = [line for line in capsys.readouterr().out.splitlines() if line.startswith("the run: skipped 2")]
    assert last == [f"the run: skipped 2 examples whose image could not be read (first on rank 0: {tmp_path / '1.png'})"]


def test_a_table_that_is_not_utf8_is_named(tmp_path, capsys):
    (tmp_path / "pairs.csv").write_bytes("filepath,title\na.png,café\n".encode("latin-1"))
    assert cli.main(["train", *TINY, "--data", str(tmp_path / "pairs.csv"), "--out", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err
    assert f"{tmp_path / 'pairs.csv'}: not UTF-8 text" in error and not (tmp_path / "run").exists()


FAILED_STARTS = {
    "missing data": ["--data", "nowhere.csv"],
    "missing folder": ["--data", "nowhere/"],
    "missing validation data": ["--data", "pairs.csv", "--val-data", "nowhere.csv"],
    "init a name, not a folder": ["--init", "siglip-base-patch16-224", "--data", "pairs.csv"],
    "image tower a name, not a folder": ["--image-tower", "clip-vit-base-patch32", "--lock-image"],
    "data smaller than a batch": ["--data", "pairs.csv", "--batch-size", "4", "--examples", "3"],
    "wrong column": ["--data", "pairs.csv", "--caption-column", "caption"],
    "preset too small for the shapes": ["--preset", "tiny", "--image-size", "16"],
    "image tower missing": ["--image-tower", "nowhere", "--lock-image"],
    "resume of nothing": ["--resume", "nowhere"],
}


@pytest.mark.parametrize("failure", FAILED_STARTS)
def test_a_failed_start_creates_no_folder(tmp_path, monkeypatch, capsys, failure):
    image_table(tmp_path, count=2)
    monkeypatch.chdir(tmp_path)
    before = sorted(os.listdir(tmp_path))
    assert cli.main(["train", *TINY, *FAILED_STARTS[failure]]) == cli.EXIT_BAD_INPUT
    error = capsys.readouterr().err
    assert "Traceback" not in error and error.count("\n") == 1 and error.startswith("tinyclip train: ")
    if "a name, not a folder" in failure:
        assert "no such model folder (nothing is downloaded" in error
    assert sorted(os.listdir(tmp_path)) == before                  # no runs/<timestamp>/ either


def test_outputs_get_the_users_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        train.train(tiny_config(tmp_path, steps=3, checkpoint_every=1))
    finally:
        os.umask(previous)
    for root, folders, files in os.walk(tmp_path):
        for name in folders:
            assert os.stat(os.path.join(root, name)).st_mode & 0o777 == 0o755, os.path.join(root, name)
        for name in files:
            assert os.stat(os.path.join(root, name)).st_mode & 0o777 == 0o644, os.path.join(root, name)
