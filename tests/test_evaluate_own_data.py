"""Tests for evaluating on your own data: retrieval on captions, zero-shot on class folders, the linear probe,
the confusion matrix, and ``tinyclip eval --data/--classes``.

Each test writes its own small data (PNG/JPEG files by PIL, a CSV, class
folders) and checks every number against a brute-force computation: full
sorts of similarity rows computed image by image from the model, and a
logistic regression's gradient computed term by term.
"""

import importlib.util
import json
import os

import numpy
import pytest
from PIL import Image

import tinyclip as tc
from tinyclip import backend, checkpoint, evaluate, models, plots
from tinyclip.cli import main
from tinyclip.data.captions import CSVCaptions
from tinyclip.data.classes import ImageClasses
from tinyclip.data.transforms import preprocess
from tinyclip.tokenizer import Tokenizer

WORDS = ["cat", "dog", "bird", "red", "blue", "a", "photo", "of"]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    tokenizer = Tokenizer.train([f"a photo of a {w} {v}." for w in WORDS for v in WORDS], vocab_size=560)
    config = models.preset("tiny", vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eot_id)
    checkpoint.save(models.CLIP(config, seed=0), str(folder / "model"))
    tokenizer.save(str(folder / "model" / "tokenizer.tinyclip.json"))
    return folder / "model"


def write_image(path, seed, size=(40, 30)):
    pixels = numpy.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=numpy.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def captions_csv(tmp_path_factory):
    """7 images, image i with 1 + i % 3 captions; rows of one image are not adjacent (grouping is by path)."""
    folder = tmp_path_factory.mktemp("pairs")
    rows = []
    for i in range(7):
        write_image(folder / f"{i}.png", seed=i)
        rows += [(j, f"{i}.png", f"a photo of a {WORDS[(i + 2 * j) % 8]} {WORDS[(i * j) % 8]}")
                 for j in range(1 + i % 3)]
    rows.sort()                                        # caption 0 of every image, then caption 1, ...
    (folder / "pairs.csv").write_text("filepath,title\n" + "".join(f"{p},{c}\n" for _, p, c in rows))
    return folder / "pairs.csv"


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("classes")
    for c, name in enumerate(["n02", "n01", "n03"]):
        os.makedirs(folder / name)
        for i in range(3 + c):
            write_image(folder / name / f"{i}.jpg", seed=100 + 10 * c + i)
    (folder / "classnames.txt").write_text("cat\ndog\nred bird\n")   # for n01, n02, n03 (sorted)
    return folder


def unit(rows):
    rows = numpy.asarray(rows, dtype=numpy.float64)
    return rows / numpy.linalg.norm(rows, axis=1, keepdims=True)


def image_embeddings_by_hand(model, paths):
    """One image at a time, straight through the model."""
    with tc.no_grad():
        return unit(numpy.concatenate([
            model.encode_image(preprocess(path, model.config.image_size, model.config.image_normalization)[None]).data
            for path in paths]))


def text_embeddings_by_hand(model, tokenizer, texts):
    with tc.no_grad():
        length = model.config.context_length
        return unit(numpy.concatenate([model.encode_text(tokenizer([text], context_length=length)).data
                                       for text in texts]))


# ---- retrieval on captions ----------------------------------------------------------------------------------

def test_captions_group_by_image_path_in_order_of_first_appearance(captions_csv):
    pairs = CSVCaptions(captions_csv)
    paths, text_to_image = pairs.grouped_by_image()
    assert len(paths) == 7 and len(set(paths)) == 7 and len(text_to_image) == len(pairs) == 1 + 2 + 3 + 1 + 2 + 3 + 1
    for caption_index, image_index in enumerate(text_to_image):
        assert paths[image_index] == pairs.path(caption_index)
    assert [paths.index(pairs.path(i)) for i in range(len(pairs))] == text_to_image.tolist()


def test_caption_retrieval_equals_a_full_sort_of_every_row(model_folder, captions_csv):
    model = checkpoint.from_pretrained(str(model_folder))
    tokenizer = Tokenizer.load(str(model_folder / "tokenizer.tinyclip.json"))
    pairs = CSVCaptions(captions_csv)
    metrics, _ = evaluate.caption_retrieval(model, tokenizer, pairs, batch_size=3)
    paths = list(dict.fromkeys(pairs.paths))
    owner = numpy.array([paths.index(path) for path in pairs.paths])
    image_emb = image_embeddings_by_hand(model, paths)
    text_emb = text_embeddings_by_hand(model, tokenizer, pairs.captions)
    similarity = image_emb @ text_emb.T                                    # (images, captions)
    assert metrics["images"] == 7 and metrics["captions"] == len(pairs)
    for k in (1, 5, 10):
        # image -> text: the best position, in the sorted row, of any of its captions
        found = [min(list(numpy.argsort(-similarity[i], kind="stable")).index(j) for j in numpy.flatnonzero(owner == i))
                 < k for i in range(7)]
        assert metrics[f"image_to_text_recall@{k}"] == pytest.approx(numpy.mean(found), abs=1e-12)
        found = [list(numpy.argsort(-similarity[:, j], kind="stable")).index(owner[j]) < k for j in range(len(pairs))]
        assert metrics[f"text_to_image_recall@{k}"] == pytest.approx(numpy.mean(found), abs=1e-12)
    assert metrics["image_to_text_recall@10"] == 1.0 and metrics["text_to_image_recall@10"] == 1.0


# ---- zero-shot on class folders -----------------------------------------------------------------------------

def test_image_classes_read_names_from_classnames_txt_in_sorted_folder_order(class_folder, tmp_path):
    classes = ImageClasses(class_folder)
    assert classes.folders == ["n01", "n02", "n03"] and classes.class_names == ["cat", "dog", "red bird"]
    assert classes.labels.tolist() == [0] * 4 + [1] * 3 + [2] * 5
    assert all(os.path.basename(os.path.dirname(p)) == classes.folders[label]
               for p, label in zip(classes.paths, classes.labels))
    os.makedirs(tmp_path / "golden_retriever")
    write_image(tmp_path / "golden_retriever" / "a.png", 0)
    assert ImageClasses(tmp_path).class_names == ["golden retriever"]
    (tmp_path / "classnames.txt").write_text("one\ntwo\n")
    with pytest.raises(ValueError, match="2 class names for 1 class folders"):
        ImageClasses(tmp_path)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match="'empty' has no image"):
        ImageClasses(tmp_path)


def test_two_classes_of_one_name_are_refused(class_folder, tmp_path):
    # they would share a prompt, and per_class (keyed by name) would report one of them
    import shutil
    shutil.copytree(class_folder, tmp_path / "named")                  # the fixture is shared: a copy to change
    (tmp_path / "named" / "classnames.txt").write_text("cat\ndog\ndog\n")
    with pytest.raises(ValueError, match=r"classnames.txt: the class name 'dog' names two classes"):
        ImageClasses(tmp_path / "named")
    for name in ("red_bird", "red bird"):
        os.makedirs(tmp_path / "folders" / name)
        write_image(tmp_path / "folders" / name / "a.png", 0)
    with pytest.raises(ValueError, match=f"{tmp_path / 'folders'}: the class name 'red bird' names two classes"):
        ImageClasses(tmp_path / "folders")


def test_the_probe_split_holds_out_part_of_every_class_the_same_way_each_time(class_folder):
    classes = ImageClasses(class_folder)
    train, test = classes.split(0.5)
    assert sorted(train.tolist() + test.tolist()) == list(range(len(classes)))
    for label in range(3):
        assert (classes.labels[train] == label).any() and (classes.labels[test] == label).any()
    again = classes.split(0.5)
    assert train.tolist() == again[0].tolist() and test.tolist() == again[1].tolist()
    with pytest.raises(ValueError, match="test_fraction"):
        classes.split(1.0)


def test_zeroshot_report_matches_argsort_per_image_with_ties_against_the_model():
    rng = numpy.random.default_rng(1)
    image_emb, class_emb = rng.normal(size=(40, 5)), rng.normal(size=(4, 5))
    image_emb[:3] = class_emb[[0, 1, 1]]
    class_emb[3] = class_emb[1]                       # class 3 ties with class 1 for every image
    labels = rng.integers(0, 4, 40)
    labels[:3] = [0, 1, 3]
    report = evaluate.zeroshot_report(image_emb, class_emb, labels, ["a", "b", "c", "d"], k=(1, 2))
    scores = unit(image_emb) @ unit(class_emb).T
    right = numpy.array([(scores[i] >= scores[i, labels[i]]).sum() == 1 for i in range(40)])
    assert not right[1] and not right[2] and right[0]            # the tie loses for both classes 1 and 3
    assert report["top1"] == pytest.approx(right.mean(), abs=1e-12)
    confusion = report["confusion"]
    assert confusion.sum() == 40 and numpy.trace(confusion) == right.sum()
    for c, name in enumerate("abcd"):
        members = labels == c
        if members.any():
            assert report["per_class"][name] == pytest.approx(right[members].mean(), abs=1e-12)
            assert confusion[c].sum() == members.sum()
    for i in numpy.flatnonzero(~right):     # a wrong image is in the column of the best other class
        others = numpy.where(numpy.arange(4) == labels[i], -numpy.inf, scores[i])
        assert confusion[labels[i], int(numpy.argmax(others))] >= 1


def test_class_folder_zeroshot_against_prompts_encoded_one_by_one(model_folder, class_folder):
    model = checkpoint.from_pretrained(str(model_folder))
    tokenizer = Tokenizer.load(str(model_folder / "tokenizer.tinyclip.json"))
    classes = ImageClasses(class_folder)
    templates = evaluate.resolve_templates(["a photo of a {}.", "a {} thing"])
    report, image_emb = evaluate.class_folder_zeroshot(model, tokenizer, classes, templates, batch_size=5)
    by_hand = image_embeddings_by_hand(model, classes.paths)
    numpy.testing.assert_allclose(unit(image_emb), by_hand, atol=1e-5)
    class_emb = unit(numpy.stack([unit(text_embeddings_by_hand(model, tokenizer, [t.format(n) for t in templates]))
                                  .mean(axis=0) for n in classes.class_names]))
    predicted = (by_hand @ class_emb.T).argmax(axis=1)
    assert report["images"] == 12 and report["classes"] == 3
    assert report["top1"] == pytest.approx((predicted == classes.labels).mean(), abs=1e-12)
    for c, name in enumerate(classes.class_names):
        assert report["per_class"][name] == pytest.approx((predicted[classes.labels == c] == c).mean(), abs=1e-12)


def test_the_imagenet_templates_are_the_clip_papers_80():
    assert len(evaluate.IMAGENET_TEMPLATES) == 80 == len(set(evaluate.IMAGENET_TEMPLATES))
    assert all(evaluate.check_template(t) for t in evaluate.IMAGENET_TEMPLATES)
    assert evaluate.resolve_templates(None, "imagenet") == evaluate.IMAGENET_TEMPLATES
    assert evaluate.resolve_templates(["x {}"], "imagenet") == ("x {}",) + evaluate.IMAGENET_TEMPLATES
    assert evaluate.resolve_templates() == evaluate.DEFAULT_TEMPLATES
    with pytest.raises(ValueError, match="no template set 'cifar'"):
        evaluate.resolve_templates(None, "cifar")
    # open_clip's own list, read from its file without importing open_clip (whose __init__ imports torch)
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        pytest.skip("open_clip is not installed")
    path = os.path.join(os.path.dirname(spec.origin), "zero_shot_metadata.py")
    metadata = importlib.util.module_from_spec(importlib.util.spec_from_file_location("zero_shot_metadata", path))
    metadata.__loader__.exec_module(metadata)
    assert evaluate.IMAGENET_TEMPLATES == tuple(t("{}") for t in metadata.OPENAI_IMAGENET_TEMPLATES)


# ---- linear probe ---------------------------------------------------------------------------------------------

def probe_data(seed=0):
    rng = numpy.random.default_rng(seed)
    centres = rng.normal(size=(3, 6))
    labels = rng.integers(0, 3, 90)
    features = centres[labels] + 0.8 * rng.normal(size=(90, 6))
    return unit(features), labels


def test_the_own_logistic_regression_reaches_the_optimum_of_its_objective():
    features, labels = probe_data()
    weights, bias = evaluate.fit_logistic_regression(features, labels, 3, regularization=2.0, tolerance=1e-9)
    # the gradient of mean cross-entropy + |W|^2 / (2 C n), summed example by example
    count = len(labels)
    gradient_w, gradient_b = weights / (2.0 * count), numpy.zeros(3)
    for x, y in zip(features, labels):
        logits = x @ weights + bias
        probs = numpy.exp(logits - logits.max())
        probs /= probs.sum()
        probs[y] -= 1
        gradient_w += numpy.outer(x, probs) / count
        gradient_b += probs / count
    assert numpy.abs(gradient_w).max() < 1e-8 and numpy.abs(gradient_b).max() < 1e-8
    sklearn = pytest.importorskip("sklearn.linear_model")
    fitted = sklearn.LogisticRegression(C=2.0, tol=1e-12, max_iter=10000).fit(features, labels)
    numpy.testing.assert_allclose(weights, fitted.coef_.T, atol=1e-5)


@pytest.mark.parametrize("use_sklearn", [False, True], ids=["tinyclip", "scikit-learn"])
def test_linear_probe_accuracy_is_the_fraction_of_test_rows_predicted_right(use_sklearn):
    if use_sklearn:
        pytest.importorskip("sklearn")
    features, labels = probe_data()
    accuracy, fit = evaluate.linear_probe(3 * features[:60], labels[:60], features[60:], labels[60:], 3,
                                          use_sklearn=use_sklearn)
    assert fit == ("scikit-learn" if use_sklearn else "tinyclip")
    weights, bias = evaluate.fit_logistic_regression(features[:60], labels[:60], 3)
    predicted = (features[60:] @ weights + bias).argmax(axis=1)
    assert accuracy == pytest.approx((predicted == labels[60:]).mean(), abs=1e-12)
    assert accuracy > 0.6                                # three well separated clusters


def test_linear_probe_names_bad_labels():
    features, labels = probe_data()
    with pytest.raises(ValueError, match="train_labels: index 3"):
        evaluate.linear_probe(features, labels + 1, features, labels, 3)


# ---- the confusion picture and the command line -----------------------------------------------------------------

def test_plot_confusion_writes_a_png_and_names_bad_input(tmp_path):
    pytest.importorskip("matplotlib")
    plots.plot_confusion(numpy.array([[3, 1], [0, 0]]), ["a", "b"], tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="square"):
        plots.plot_confusion(numpy.zeros((2, 3)), ["a", "b"], tmp_path / "d.png")
    with pytest.raises(ValueError, match="2 names"):
        plots.plot_confusion(numpy.zeros((2, 2)), ["a"], tmp_path / "d.png")


def test_eval_command_on_captions_and_classes(model_folder, captions_csv, class_folder, tmp_path, capsys):
    model = checkpoint.from_pretrained(str(model_folder))
    tokenizer = Tokenizer.load(str(model_folder / "tokenizer.tinyclip.json"))
    confusion = tmp_path / "confusion.png"
    assert main(["eval", "--model", str(model_folder), "--data", str(captions_csv), "--classes", str(class_folder),
                 "--templates", "imagenet", "--linear-probe", "--confusion", str(confusion), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    expected, _ = evaluate.caption_retrieval(model, tokenizer, CSVCaptions(captions_csv))
    assert {key: results["retrieval"][key] for key in expected} == expected
    zeroshot = results["zeroshot"]
    assert zeroshot["templates"] == 80 and set(zeroshot["per_class"]) == {"cat", "dog", "red bird"}
    report, _ = evaluate.class_folder_zeroshot(model, tokenizer, ImageClasses(class_folder),
                                               evaluate.IMAGENET_TEMPLATES)
    assert zeroshot["top1"] == report["top1"] and zeroshot["per_class"] == report["per_class"]
    assert results["linear_probe"]["train_images"] + results["linear_probe"]["test_images"] == 12
    assert 0 <= results["linear_probe"]["accuracy"] <= 1
    if plots.available():
        assert zeroshot["confusion_picture"] == str(confusion) and confusion.is_file()

    assert main(["eval", "--model", str(model_folder), "--data", str(captions_csv)]) == 0
    table = capsys.readouterr().out
    assert "7 images, 13 captions" in table and "recall@10" in table
    assert f"{expected['text_to_image_recall@5']:.4f}" in table.splitlines()[3]


def test_eval_command_errors_name_the_input(model_folder, tmp_path, capsys):
    assert main(["eval", "--model", str(model_folder), "--linear-probe"]) == 2
    assert "--linear-probe needs --classes" in capsys.readouterr().err
    assert main(["eval", "--model", str(model_folder), "--classes", str(tmp_path)]) == 2
    assert "no class sub-folders" in capsys.readouterr().err
    (tmp_path / "pairs.csv").write_text("filepath,title\nmissing.png,a cat\n")
    assert main(["eval", "--model", str(model_folder), "--data", str(tmp_path / "pairs.csv")]) == 2
    assert "missing.png" in capsys.readouterr().err
