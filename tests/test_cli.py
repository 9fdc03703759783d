"""Tests for tinyclip/cli.py and ``python -m tinyclip``."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tinyclip
from tinyclip import backend
from tinyclip.cli import main

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"tinyclip {tinyclip.__version__}\n"


def test_help_lists_the_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: tinyclip") and "info" in out and "--version" in out


def test_no_command_prints_usage_and_fails(capsys):
    assert main([]) == 2
    assert "usage: tinyclip" in capsys.readouterr().err


def test_unknown_command_is_a_usage_error(capsys):
    assert main(["fly"]) == 2
    assert "invalid choice: 'fly'" in capsys.readouterr().err


def test_info(capsys, monkeypatch):
    monkeypatch.delenv("TINYCLIP_BACKEND", raising=False)
    assert main(["info"]) == 0
    lines = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert lines["tinyclip"] == tinyclip.__version__
    assert lines["python"].startswith(platform.python_version())
    assert lines["numpy"] == np.__version__
    assert lines["backend"] == "numpy (from built-in default)"
    assert lines["gpu"].startswith("yes" if backend.gpu_available() else "no")
    assert lines["cpus"].endswith(f"of {os.cpu_count()}")


def test_info_reports_the_backend_from_the_environment(capsys, monkeypatch):
    monkeypatch.setenv("TINYCLIP_BACKEND", "cupy")
    assert main(["info"]) == 0
    assert "backend   cupy (from TINYCLIP_BACKEND)" in capsys.readouterr().out


def test_info_with_an_invalid_backend_says_so_and_fails(capsys, monkeypatch):
    monkeypatch.setenv("TINYCLIP_BACKEND", "jax")
    assert main(["info"]) == 1
    out = capsys.readouterr().out
    assert "backend   invalid: TINYCLIP_BACKEND must be one of" in out and "cpus" in out


def test_python_dash_m_tinyclip():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "tinyclip", "--version"], capture_output=True, text=True,
                            cwd=REPO_ROOT, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"tinyclip {tinyclip.__version__}\n"


def test_console_script():
    script = Path(sys.executable).parent / "tinyclip"
    if not script.exists():
        pytest.skip("the tinyclip console script is not installed next to this Python (pip install -e .)")
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"tinyclip {tinyclip.__version__}\n"


RESTART_PROBE = ("import os, tinyclip.cli as cli; print(os.environ.get('OPENBLAS_THREAD_TIMEOUT'), flush=True); "
                 "cli._restart_with_blas_thread_timeout()")


@pytest.mark.parametrize("preset, launcher, printed", [
    (None, None, "None\n4\n"),              # unset: the same command line runs again, now with the variable
    ("10", None, "10\n"),                    # the user's value is kept, no restart
    (None, "PMI_SIZE", "None\n"),            # under an MPI launcher (even of one rank) a rank is never replaced
    (None, "OMPI_COMM_WORLD_SIZE", "None\n"),
])
def test_train_restarts_itself_once_with_the_blas_thread_timeout(preset, launcher, printed):
    if os.name != "posix":
        pytest.skip("the restart uses os.execv, POSIX only")
    env = {name: value for name, value in os.environ.items()
           if name not in ("OPENBLAS_THREAD_TIMEOUT", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])
    if preset is not None:
        env["OPENBLAS_THREAD_TIMEOUT"] = preset
    if launcher is not None:
        env[launcher] = "1"
    result = subprocess.run([sys.executable, "-c", RESTART_PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == printed


def test_a_restart_that_cannot_exec_goes_on_without_it(tmp_path):
    # an interpreter that cannot be run (here: a file that is not executable) must not end the command
    probe = (f"import os, sys; sys.executable = {str(tmp_path / 'python')!r}; import tinyclip.cli as cli; "
             "cli._restart_with_blas_thread_timeout(); print('went on', os.environ.get('OPENBLAS_THREAD_TIMEOUT'))")
    (tmp_path / "python").write_text("")
    env = {name: value for name, value in os.environ.items()
           if name not in ("OPENBLAS_THREAD_TIMEOUT", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0 and result.stdout == "went on None\n", result.stderr


def test_only_train_from_the_command_line_asks_for_the_restart(monkeypatch, tmp_path):
    from tinyclip import cli
    asked = []
    monkeypatch.setattr(cli, "_restart_with_blas_thread_timeout", lambda: asked.append(True))
    monkeypatch.setattr(cli, "_started_as_the_tinyclip_command", lambda: True)     # pytest's __main__ is not
    monkeypatch.setattr(sys, "argv", ["tinyclip", "train", "--steps", "-1", "--out", str(tmp_path / "run")])
    assert main() == 2 and asked == [True]              # sys.argv's train: asked, then the bad --steps refused
    assert main(["train", "--steps", "-1"]) == 2 and asked == [True]     # in-process calls with argv never exec
    monkeypatch.setattr(sys, "argv", ["tinyclip", "info"])
    main()
    assert asked == [True]



# what pip writes for the console script (``tinyclip = tinyclip.cli:main``)
CONSOLE_SCRIPT = """import re
import sys
from tinyclip.cli import main
if __name__ == '__main__':
    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])
    sys.exit(main())
"""
USER_SCRIPT = "import sys\nprint('script ran', flush=True)\nfrom tinyclip.cli import main\nsys.exit(main())\n"


@pytest.mark.parametrize("how, restarted", [("-m", True), ("console script", True), ("own script", False),
                                            ("script on stdin", False)])
def test_only_the_tinyclip_command_itself_is_restarted(tmp_path, how, restarted):
    """A script of the user's that calls main() would run again from its first line, and one read from stdin
    would find stdin spent and silently do nothing: only ``python -m tinyclip`` and the console script restart."""
    if os.name != "posix":
        pytest.skip("the restart uses os.execv, POSIX only")
    # sitecustomize runs as each interpreter starts, so it shows every start and the variable it saw
    (tmp_path / "sitecustomize.py").write_text("import os, sys\n"
                                               "print('start', os.environ.get('OPENBLAS_THREAD_TIMEOUT'), flush=True)\n")
    (tmp_path / "tinyclip").write_text(CONSOLE_SCRIPT)
    (tmp_path / "own.py").write_text(USER_SCRIPT)
    env = {name: value for name, value in os.environ.items()
           if name not in ("OPENBLAS_THREAD_TIMEOUT", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE")}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])
    train = ["train", "--data", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "run")]
    command, stdin = {"-m": (["-m", "tinyclip"], None), "console script": ([str(tmp_path / "tinyclip")], None),
                      "own script": ([str(tmp_path / "own.py")], None), "script on stdin": (["-"], USER_SCRIPT)}[how]
    result = subprocess.run([sys.executable, *command, *train], input=stdin, capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and "missing.csv: no such file or folder" in result.stderr, result.stderr
    ran = "script ran\n" if how in ("own script", "script on stdin") else ""
    assert result.stdout == ("start None\nstart 4\n" if restarted else f"start None\n{ran}")


# ---------------------------------------------------------------------------------
# zeroshot and embed, on a tiny saved model with a tokenizer trained on its prompts
# ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    from PIL import Image

    from tinyclip import checkpoint, models
    from tinyclip.tokenizer import Tokenizer
    folder = tmp_path_factory.mktemp("model")
    words = ["cat", "dog", "bird", "red", "blue", "a", "photo", "of", "circle", "square"]
    tokenizer = Tokenizer.train([f"a photo of a {w} {v}." for w in words for v in words], vocab_size=560)
    config = models.preset("tiny", vocab_size=tokenizer.vocab_size, eos_id=tokenizer.vocab_size - 1)
    checkpoint.save(models.CLIP(config, seed=0), str(folder / "clip"))
    tokenizer.save(str(folder / "clip" / "tokenizer.tinyclip.json"))
    for name, colour in (("red.png", (255, 0, 0)), ("blue.png", (0, 0, 255))):
        Image.new("RGB", (40, 30), colour).save(folder / name)
    (folder / "broken.png").write_bytes(b"not an image")
    return folder


def test_zeroshot_prints_a_distribution_over_the_labels(model_folder, capsys):
    images = [str(model_folder / "red.png"), str(model_folder / "blue.png")]
    code = main(["zeroshot", "--model", str(model_folder / "clip"), "--images", *images,
                 "--labels", "cat", "dog", "bird", "--top", "3"])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == images
    for line in lines:
        scores = [float(part.split()[-1]) for part in line.split(": ", 1)[1].split(", ")]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True)
        assert sum(scores) == pytest.approx(1.0, abs=2e-3)   # printed to three decimals


def printed_scores(out):
    """{image path: {label: score}} from zeroshot's lines "path: label score, label score, ..."."""
    scores = {}
    for line in out.strip().splitlines():
        path, ranked = line.split(": ", 1)
        scores[path] = {label: float(score) for label, score in (part.rsplit(" ", 1) for part in ranked.split(", "))}
    return scores


def test_zeroshot_ensembles_several_templates_as_encode_classes_does(model_folder, capsys):
    from tinyclip import checkpoint, evaluate
    from tinyclip.data import preprocess_batch
    from tinyclip.tokenizer import Tokenizer
    images = [str(model_folder / "red.png"), str(model_folder / "blue.png")]
    labels, templates = ["cat", "dog", "bird"], ["a photo of a {}.", "a {} photo."]
    code = main(["zeroshot", "--model", str(model_folder / "clip"), "--images", *images, "--labels", *labels,
                 "--template", templates[0], "--template", templates[1], "--top", "3"])
    assert code == 0
    printed = printed_scores(capsys.readouterr().out)

    model = checkpoint.load(model_folder / "clip")
    tokenizer = Tokenizer.load(str(model_folder / "clip" / "tokenizer.tinyclip.json"))
    image_emb = backend.to_numpy(evaluate.encode_images(model, preprocess_batch(images, model.config.image_size)))

    def softmax_scores(class_templates):
        class_emb = backend.to_numpy(evaluate.encode_classes(model, tokenizer, labels, class_templates))
        logits = np.exp(model.log_scale.item()) * image_emb @ class_emb.T          # (images, labels)
        return np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)

    expected = softmax_scores(templates)
    assert not np.allclose(expected, softmax_scores(templates[:1]), atol=2e-3)   # the second template counts
    for path, row in zip(images, expected):
        assert printed[path] == pytest.approx(dict(zip(labels, row.tolist())), abs=6e-4)   # three decimals


def test_zeroshot_refuses_a_template_without_exactly_one_placeholder(model_folder, capsys):
    for bad in ("a photo of a cat", "a {} next to a {}", "a {label}"):
        code = main(["zeroshot", "--model", str(model_folder / "clip"), "--images", str(model_folder / "red.png"),
                     "--labels", "cat", "--template", "a {}.", "--template", bad])
        assert code == 2
        assert f"argument --template: prompt template {bad!r} must contain exactly one {{}}" in capsys.readouterr().err


@pytest.mark.parametrize("command, said", [
    (["zeroshot", "--labels", "cat", "--top", "0"], "argument --top: 0 must be at least 1"),
    (["zeroshot", "--labels", "cat", "dog", "cat"], "--labels: 'cat' given more than once"),
    (["eval", "--classes", "x", "--linear-probe", "--probe-c", "-1"], "argument --probe-c: -1.0 must be a positive"),
    (["eval", "--classes", "x", "--linear-probe", "--probe-test-fraction", "1"],
     "argument --probe-test-fraction: 1.0 must be between 0 and 1"),
    (["eval", "--data", "x.csv", "--batch-size", "0"], "argument --batch-size: 0 must be at least 1")])
def test_a_bad_number_or_label_is_refused_before_any_work_naming_the_flag(model_folder, capsys, command, said):
    # --top 0 printed an empty line per image; --probe-c -1 ran the whole zero-shot, then printed sklearn's message
    images = ["--images", str(model_folder / "red.png")] if command[0] == "zeroshot" else []
    assert main([*command, *images, "--model", str(model_folder / "clip")]) == 2
    error = capsys.readouterr().err
    assert said in error and "Traceback" not in error


def test_embed_writes_unit_vectors(model_folder, tmp_path, capsys):
    out = tmp_path / "emb.npz"
    code = main(["embed", "--model", str(model_folder / "clip"), "--images", str(model_folder / "red.png"),
                 "--texts", "a red circle", "a blue square", "--out", str(out)])
    assert code == 0
    with np.load(out) as saved:
        assert saved["image_emb"].shape == (1, 8) and saved["text_emb"].shape == (2, 8)
        np.testing.assert_allclose(np.linalg.norm(saved["text_emb"], axis=1), 1.0, rtol=1e-5)


def test_zeroshot_names_a_bad_image_and_a_missing_tokenizer(model_folder, tmp_path, capsys):
    bad = str(model_folder / "broken.png")
    assert main(["zeroshot", "--model", str(model_folder / "clip"), "--images", bad, "--labels", "cat"]) == 2
    assert bad in capsys.readouterr().err
    assert main(["embed", "--model", str(model_folder / "clip"), "--texts", "a cat", "--out",
                 str(tmp_path / "x.npz"), "--bpe", str(tmp_path / "nope.json")]) == 2
    assert "nope.json" in capsys.readouterr().err
    assert main(["embed", "--model", str(model_folder / "clip"), "--out", str(tmp_path / "x.npz")]) == 2
    assert "give --images and/or --texts" in capsys.readouterr().err
    for command in (["zeroshot", "--images", bad, "--labels", "cat"], ["embed", "--texts", "a", "--out", "x.npz"],
                    ["eval"], ["export", "--out", str(tmp_path / "hf")]):
        assert main([*command, "--model", str(tmp_path / "ViT-B-32")]) == 2
        assert f"--model {tmp_path / 'ViT-B-32'}: no such model folder" in capsys.readouterr().err
    out = tmp_path / "no-such-folder" / "x.npz"                 # named as given, not as the staged file
    assert main(["embed", "--model", str(model_folder / "clip"), "--texts", "a cat", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert f"No such file or directory: '{out}'" in error and ".partial-" not in error


# ---------------------------------------------------------------------------------
# tinyclip train: flags made from TrainConfig, what the help shows, what is refused before anything starts
# ---------------------------------------------------------------------------------

def train_help(capsys):
    assert main(["train", "--help"]) == 0
    return " ".join(capsys.readouterr().out.split())          # argparse's line breaks undone


def test_every_train_flag_is_a_config_field_with_its_comment_and_default(capsys):
    import dataclasses
    from tinyclip.cli import field_comments
    from tinyclip.train import TrainConfig
    comments = field_comments(TrainConfig)
    text = train_help(capsys)
    fields = [field for field in dataclasses.fields(TrainConfig) if field.name != "model_overrides"]
    assert set(comments) == {field.name for field in dataclasses.fields(TrainConfig)}
    assert comments["steps"].startswith("optimiser steps in the whole run")
    for field in fields:
        flag = "--" + field.name.replace("_", "-")
        assert flag in text and " ".join(comments[field.name].replace("(None: ", "(default: ").split()) in text
    assert "--steps STEPS optimiser steps in the whole run" in text and "(default: 700)" in text
    assert "--plots, --no-plots" in text and "(default: on)" in text
    assert "to validate on" in text and "runs." not in text     # no module name left in the words by a move
    assert "or tar shards" in text and "(CSV/TSV, folder or shards)" in text   # --data and --val-data take shards


def test_train_help_lists_the_presets_and_the_dtypes(capsys):
    from tinyclip.models import PRESETS
    text = train_help(capsys)
    assert "--preset {" + ",".join(PRESETS) + "}" in text
    assert "--dtype {float32,float64}" in text and "float16 and bfloat16 training is refused" in text


@pytest.mark.parametrize("dtype, reason", [("bfloat16", "NumPy has no bfloat16 arithmetic"),
                                           ("float16", "needs loss scaling and float32 master weights"),
                                           ("float8", "choose from float32, float64")])
def test_a_dtype_training_cannot_use_is_refused_with_the_reason(tmp_path, capsys, dtype, reason):
    assert main(["train", "--dtype", dtype, "--out", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err
    assert reason in error and "Traceback" not in error and not (tmp_path / "run").exists()
    if dtype != "float8":
        assert "train in float32" in error


def test_every_preset_in_the_help_passes_the_start_checks_or_is_refused_with_the_reason(tmp_path, capsys):
    from tinyclip import train
    from tinyclip.models import PRESETS
    refused = {}
    for name in PRESETS:
        try:
            config = train.TrainConfig(preset=name, out=str(tmp_path / name))
        except ValueError as error:
            refused[name] = str(error)
            continue
        train.prepare_start(config, None)              # everything a run checks before it makes its folder
    assert refused == {"tiny": "TrainConfig: preset tiny has 16-pixel images and the built-in shapes need at "
                               "least 32: add --image-size 32 (model_overrides={'image_size': 32})"}
    assert main(["train", "--preset", "tiny", "--out", str(tmp_path / "run")]) == 2
    assert "add --image-size 32" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_the_first_progress_line_comes_at_the_first_step(tmp_path, capsys):
    assert main(["train", "--preset", "tiny", "--image-size", "32", "--steps", "3", "--batch-size", "4",
                 "--warmup-steps", "1", "--log-every", "20", "--eval-every", "0", "--eval-per-class", "1",
                 "--eval-pairs", "8", "--tokenizer-captions", "100", "--no-plots", "--out", str(tmp_path)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["1/3", "3/3"]


# issue 12: SigLIP's tokenizer, batches with progress, upright photos, column flags
# ---------------------------------------------------------------------------------

HF_SIGLIP = REPO_ROOT / "tests" / "fixtures" / "hf-siglip"     # a small Hugging Face SigLIP folder (no tokenizer)


def test_a_hugging_face_siglip_folder_without_its_tokenizer_asks_for_spiece_model(model_folder, tmp_path, capsys):
    image = str(model_folder / "red.png")
    for extra in ([], ["--bpe", str(model_folder / "clip" / "tokenizer.tinyclip.json")]):
        assert main(["zeroshot", "--model", str(HF_SIGLIP), "--images", image, "--labels", "cat", *extra]) == 2
        err = capsys.readouterr().err
        assert "Hugging Face SigLIP model" in err and "SentencePiece" in err and "spiece.model" in err
        assert "bpe_simple_vocab" not in err
    assert main(["embed", "--model", str(HF_SIGLIP), "--texts", "a cat", "--out", str(tmp_path / "t.npz")]) == 2
    assert "SentencePiece" in capsys.readouterr().err
    # its images need no tokenizer
    assert main(["embed", "--model", str(HF_SIGLIP), "--images", image, "--out", str(tmp_path / "i.npz")]) == 0
    with np.load(tmp_path / "i.npz") as saved:
        assert saved["image_emb"].shape == (1, 16) and list(saved) == ["image_emb"]


@pytest.fixture
def many_images(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    paths = []
    for index in range(11):
        path = tmp_path / f"image{index:02d}.png"
        Image.fromarray(rng.integers(0, 256, (20 + index, 30, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def test_zeroshot_and_embed_work_in_bounded_batches_with_progress(model_folder, many_images, tmp_path, capsys,
                                                                   monkeypatch):
    import tinyclip.data
    from tinyclip import cli
    sizes = []
    original = tinyclip.data.preprocess_batch

    def counted(images, *args, **kwargs):
        sizes.append(len(images))
        return original(images, *args, **kwargs)

    model = str(model_folder / "clip")
    labels = ["cat", "dog", "bird"]
    assert main(["zeroshot", "--model", model, "--images", *many_images, "--labels", *labels]) == 0
    whole = capsys.readouterr()
    assert main(["embed", "--model", model, "--images", *many_images, "--out", str(tmp_path / "whole.npz")]) == 0
    capsys.readouterr()

    monkeypatch.setattr(cli, "IMAGE_BATCH", 4)
    monkeypatch.setattr(tinyclip.data, "preprocess_batch", counted)
    assert main(["zeroshot", "--model", model, "--images", *many_images, "--labels", *labels]) == 0
    batched = capsys.readouterr()
    assert sizes == [4, 4, 3]                                  # never more than one batch of pixels at a time
    assert printed_scores(batched.out) == printed_scores(whole.out)
    assert [line.split(":")[0] for line in batched.out.splitlines()] == many_images      # in the order given
    progress = [line for line in batched.err.splitlines() if not line.startswith("scores:")]
    assert progress == ["images 4/11", "images 8/11", "images 11/11"]
    assert whole.err == "scores: softmax over the labels (clip)\n"     # one batch: no progress lines
    sizes.clear()
    assert main(["embed", "--model", model, "--images", *many_images, "--out", str(tmp_path / "batched.npz")]) == 0
    assert sizes == [4, 4, 3]
    with np.load(tmp_path / "whole.npz") as expected, np.load(tmp_path / "batched.npz") as got:
        assert got["image_emb"].shape == (11, 8)
        np.testing.assert_allclose(got["image_emb"], expected["image_emb"], rtol=1e-5, atol=1e-6)


def test_zeroshot_and_embed_see_a_turned_photo_upright(model_folder, tmp_path, capsys):
    from PIL import Image
    stored = np.random.default_rng(1).integers(0, 256, (40, 80, 3), dtype=np.uint8)   # 80 wide, 40 high
    photo = Image.fromarray(stored)
    exif = photo.getexif()
    exif[0x0112] = 6                                            # the camera was turned: rotate clockwise to view
    photo.save(tmp_path / "turned.jpg", "JPEG", quality=95, exif=exif.tobytes())
    with Image.open(tmp_path / "turned.jpg") as decoded:         # the stored pixels as decoded, then turned by hand
        upright = np.rot90(np.asarray(decoded.convert("RGB")), -1)
    Image.fromarray(np.ascontiguousarray(upright)).save(tmp_path / "upright.png")        # 40 wide, 80 high
    images = [str(tmp_path / "turned.jpg"), str(tmp_path / "upright.png")]
    model = str(model_folder / "clip")
    assert main(["embed", "--model", model, "--images", *images, "--out", str(tmp_path / "e.npz")]) == 0
    with np.load(tmp_path / "e.npz") as saved:
        np.testing.assert_allclose(saved["image_emb"][0], saved["image_emb"][1], rtol=1e-5, atol=1e-6)
    capsys.readouterr()
    assert main(["zeroshot", "--model", model, "--images", *images, "--labels", "cat", "dog", "bird"]) == 0
    scores = printed_scores(capsys.readouterr().out)
    assert scores[images[0]] == pytest.approx(scores[images[1]], abs=1.5e-3)   # printed to three decimals


def test_a_wrong_column_name_is_reported_with_the_flags(tmp_path, capsys):
    (tmp_path / "pairs.csv").write_text("path,caption\na.png,a cat\n", encoding="utf-8")
    assert main(["train", "--data", str(tmp_path / "pairs.csv"), "--steps", "2", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "no column 'filepath', 'title'" in err and "--image-column" in err and "--caption-column" in err


def test_export_never_replaces_a_file_or_a_folder_that_is_not_a_model(model_folder, tmp_path, capsys):
    # the staged write replaces its target whole: over a data file or a folder of photos that would delete them
    table, photos = tmp_path / "pairs.csv", tmp_path / "photos"
    table.write_text("filepath,title\n")
    photos.mkdir()
    (photos / "cat.jpg").write_bytes(b"a photo")
    for out in (table, photos):
        assert main(["export", "--model", str(model_folder / "clip"), "--format", "hf", "--out", str(out)]) == 2
        error = capsys.readouterr().err
        assert f"{out} exists and is not a model folder" in error and "Traceback" not in error
    assert table.read_text() == "filepath,title\n" and os.listdir(photos) == ["cat.jpg"]
    for _ in range(2):                                        # a new folder, then the earlier export replaced
        assert main(["export", "--model", str(model_folder / "clip"), "--format", "hf",
                     "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()


def test_a_warning_is_one_line_naming_the_command(model_folder, tmp_path, capsys):
    import shutil
    for name in ("red", "blue"):
        shutil.copy(model_folder / f"{name}.png", tmp_path / f"{name}.png")
    (tmp_path / "red.txt").write_text("a red picture")           # blue.png has no caption: skipped, with a warning
    assert main(["eval", "--model", str(model_folder / "clip"), "--data", str(tmp_path)]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "caption" in line]
    assert len(warned) == 1 and warned[0].startswith("tinyclip eval: warning: "), warned
