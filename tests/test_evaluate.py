"""Tests for tinyclip.evaluate: zero-shot accuracy, retrieval recall, the relation probe, and running a model.

The metrics are checked on hand-made embeddings whose answers are worked
out in the comments, ties included (they count against the model), and
against a naive full-sort reference on random embeddings; chunking and the
scale of the inputs must not change any number. The model-level helpers run
the ``tiny`` preset with a tokenizer trained on the captions and must give
exactly what the metric functions give on embeddings computed by hand, for
any batch size.
"""

import re
import warnings

import numpy
import pytest
from PIL import Image

import tinyclip as tc
from tinyclip import backend
from tinyclip.data import preprocess_batch
from tinyclip.evaluate import (RelationSet, RetrievalSet, ZeroShotSet, encode_classes, encode_images, encode_texts,
                               evaluate, relation_accuracy, retrieval_recall, zeroshot_accuracy, zeroshot_classifier)
from tinyclip.models import CLIP, preset
from tinyclip.tokenizer import Tokenizer

# ---- zero-shot --------------------------------------------------------------------------------------------


def test_zeroshot_accuracy_counts_the_rank_of_the_true_class(xp):
    class_emb = xp.eye(4)
    image_emb = xp.asarray([[4.0, 3.0, 2.0, 1.0]] * 4)     # every image ranks the classes 0, 1, 2, 3
    labels = xp.asarray([0, 1, 2, 3])                         # so the true class is at rank 0, 1, 2, 3
    accuracy = zeroshot_accuracy(image_emb, class_emb, labels, k=(1, 2, 3, 4))
    assert accuracy == {"top1": 0.25, "top2": 0.5, "top3": 0.75, "top4": 1.0}


def test_zeroshot_ties_count_as_wrong(xp):
    class_emb = xp.eye(3)
    image_emb = xp.asarray([[1.0, 1.0, 0.0],                  # classes 0 and 1 tie: rank 1 whichever is true
                            [0.0, 1.0, 1.0],
                            [0.0, 0.0, 1.0]])                 # class 2 alone: rank 0
    accuracy = zeroshot_accuracy(image_emb, class_emb, [0, 1, 2], k=(1, 2))
    assert accuracy == {"top1": 1 / 3, "top2": 1.0}


def test_zeroshot_k_beyond_the_number_of_classes_is_always_right():
    class_emb = numpy.eye(3)
    image_emb = -numpy.eye(3)                                  # the true class is always the worst
    assert zeroshot_accuracy(image_emb, class_emb, [0, 1, 2]) == {"top1": 0.0, "top5": 1.0}
    assert zeroshot_accuracy(image_emb, class_emb, [0, 1, 2], k=10) == {"top10": 1.0}


def test_zeroshot_accuracy_ignores_scale_and_chunking():
    rng = numpy.random.default_rng(0)
    image_emb, class_emb = rng.normal(size=(23, 6)), rng.normal(size=(5, 6))
    labels = rng.integers(0, 5, 23)
    expected = zeroshot_accuracy(image_emb, class_emb, labels, k=(1, 2, 3))
    scaled = image_emb * rng.uniform(0.1, 10, (23, 1))
    for chunk_size in (1, 4, 23, 1000):
        assert zeroshot_accuracy(scaled, class_emb * 3, labels, k=(1, 2, 3), chunk_size=chunk_size) == expected


def test_zeroshot_classifier_normalises_each_prompt_before_averaging(xp):
    prompt_emb = xp.asarray([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]],    # class 0: two templates, different lengths
                             [[0.0, 0.0, 5.0], [0.0, 0.0, 1.0]]])   # class 1: both point the same way
    classifier = backend.to_numpy(zeroshot_classifier(prompt_emb))
    half = 0.5 ** 0.5      # the mean of two orthogonal unit vectors, renormalised: not (2, 1, 0) / sqrt(5)
    numpy.testing.assert_allclose(classifier, [[half, half, 0.0], [0.0, 0.0, 1.0]], atol=1e-15)


def test_zeroshot_classifier_with_one_template_is_the_unit_prompts():
    prompt_emb = numpy.asarray([[3.0, 4.0], [0.0, -2.0]])
    numpy.testing.assert_allclose(zeroshot_classifier(prompt_emb), [[0.6, 0.8], [0.0, -1.0]], atol=1e-15)


def test_zeroshot_classifier_errors_name_the_problem():
    with pytest.raises(ValueError, match="prompt_emb must be"):
        zeroshot_classifier(numpy.ones((2, 2, 2, 2)))
    with pytest.raises(ValueError, match="template mean"):
        zeroshot_classifier(numpy.asarray([[[1.0, 0.0], [-1.0, 0.0]]]))   # two templates that cancel out


@pytest.mark.parametrize("labels, message", [
    (numpy.asarray([[0], [1], [2]]), "labels must be a 1-D array"),
    (numpy.asarray([0, 1]), "labels has 2 entries, expected 3"),
    (numpy.asarray([0.0, 1.0, 2.0]), "labels must hold integers"),
    (numpy.asarray([True, False, True]), "labels must hold integers"),
    (numpy.asarray([0, 1, 3]), r"labels: index 3 is outside \[0, 3\)"),
    (numpy.asarray([0, -1, 2]), r"labels: index -1 is outside"),
])
def test_zeroshot_bad_labels_are_named(labels, message):
    with pytest.raises(ValueError, match=message):
        zeroshot_accuracy(numpy.eye(3), numpy.eye(3), labels)


@pytest.mark.parametrize("image_emb, class_emb, message", [
    (numpy.ones(3), numpy.eye(3), "image_emb must be a 2-D array"),
    (numpy.ones((0, 3)), numpy.eye(3), "image_emb is empty"),
    (numpy.eye(3), numpy.ones((3, 4)), "same embedding width"),
    (numpy.eye(3), numpy.asarray([[1.0, 0, 0], [0, 0, 0], [0, 0, 1]]), "class_emb: row 1 is all zeros"),
    (numpy.asarray([[1.0, numpy.nan, 0]] * 3), numpy.eye(3), "image_emb holds NaN"),
    (numpy.asarray([["a", "b", "c"]] * 3), numpy.eye(3), "image_emb must hold real numbers"),
])
def test_zeroshot_bad_embeddings_are_named(image_emb, class_emb, message):
    with pytest.raises(ValueError, match=message):
        zeroshot_accuracy(image_emb, class_emb, [0, 1, 2])


@pytest.mark.parametrize("k", [0, (), (1, 0), (1.5,), True, "15"])
def test_bad_cutoffs_are_named(k):
    with pytest.raises(ValueError, match="k must be"):
        zeroshot_accuracy(numpy.eye(3), numpy.eye(3), [0, 1, 2], k=k)


# ---- retrieval --------------------------------------------------------------------------------------------

# Images are the unit vectors e_0..e_3, so image i's similarity to text j is text j's entry i. Every text
# row is a permutation of (4, 3, 2, 1): all have length sqrt(30), which keeps equal entries exactly equal
# after normalising. Text j is the caption of image j.
PAIRED_TEXTS = [[4, 3, 2, 1],    # t0: image 0 scores highest               → t2i rank 0
                [3, 2, 4, 1],    # t1: own image 1 scores 2, below 3 and 4   → t2i rank 2
                [1, 2, 3, 4],    # t2: own image 2 scores 3, below 4         → t2i rank 1
                [2, 1, 3, 4]]    # t3: own image 3 scores 4                  → t2i rank 0
# image→text reads the columns: image 0 (4, 3, 1, 2): t0 first → rank 0; image 1 (3, 2, 2, 1): t1's 2 is
# beaten by t0's 3 and tied by t2's 2 → rank 2; image 2 (2, 4, 3, 3): t2's 3 beaten by 4, tied by t3 → rank 2;
# image 3 (1, 1, 4, 4): t3's 4 tied by t2 → rank 1. Ranks (0, 2, 2, 1); ties counted as losses.
PAIRED_RECALL = {"i2t_r1": 0.25, "i2t_r2": 0.5, "i2t_r3": 1.0, "t2i_r1": 0.5, "t2i_r2": 0.75, "t2i_r3": 1.0}


def test_paired_retrieval_recall_on_known_ranks(xp):
    recall = retrieval_recall(xp.eye(4), xp.asarray(PAIRED_TEXTS, dtype=xp.float64), ks=(1, 2, 3))
    assert recall == PAIRED_RECALL


def test_retrieval_of_identical_embeddings_is_perfect_and_of_collapsed_ones_is_zero():
    assert retrieval_recall(numpy.eye(5), numpy.eye(5), ks=(1,)) == {"i2t_r1": 1.0, "t2i_r1": 1.0}
    collapsed = numpy.ones((5, 3))                # every score ties: no pair is ever ranked first
    assert retrieval_recall(collapsed, collapsed, ks=(1, 5)) == {"i2t_r1": 0.0, "i2t_r5": 1.0,
                                                                 "t2i_r1": 0.0, "t2i_r5": 1.0}


def test_retrieval_with_several_captions_per_image(xp):
    # images e_0, e_1, e_2; texts are permutations of (3, 2, 1), all of length sqrt(14)
    texts = xp.asarray([[3, 2, 1],     # t0 of image 0: image 0 scores 3 → t2i rank 0
                        [1, 3, 2],     # t1 of image 0: image 0 scores 1 → t2i rank 2
                        [2, 1, 3],     # t2 of image 1: image 1 scores 1 → t2i rank 2
                        [1, 2, 3],     # t3 of image 2: image 2 scores 3 → t2i rank 0
                        [3, 1, 2]],    # t4 of image 2: image 2 scores 2, below 3 → t2i rank 1
                       dtype=xp.float64)
    text_to_image = xp.asarray([0, 0, 1, 2, 2])
    # image→text, the best caption against the other images' captions only:
    # image 0 sees (3, 1 | 2, 1, 3): best own 3, tied by t4 → rank 1
    # image 1 sees (2 | 3, 1 | 2, 1): own 1, beaten or tied by all four others → rank 4
    # image 2 sees (3, 2 | 1, 3, 2): best own 3, tied by t0 (t4's 2 is its own and never counts) → rank 1
    recall = retrieval_recall(xp.eye(3), texts, ks=(1, 2, 5), text_to_image=text_to_image)
    assert recall == {"i2t_r1": 0.0, "i2t_r2": 2 / 3, "i2t_r5": 1.0,
                      "t2i_r1": 2 / 5, "t2i_r2": 3 / 5, "t2i_r5": 1.0}


def naive_recall(image_emb, text_emb, text_to_image, ks):
    """Recall@k by sorting every row in full (no ties: random embeddings)."""
    image_unit = image_emb / numpy.linalg.norm(image_emb, axis=1, keepdims=True)
    text_unit = text_emb / numpy.linalg.norm(text_emb, axis=1, keepdims=True)
    scores = image_unit @ text_unit.T                                                # (images, texts)
    image_ranks = [numpy.flatnonzero(text_to_image[numpy.argsort(-row)] == i)[0] for i, row in enumerate(scores)]
    text_ranks = [numpy.flatnonzero(numpy.argsort(-column) == text_to_image[j])[0]
                  for j, column in enumerate(scores.T)]
    recall = {f"i2t_r{k}": numpy.mean(numpy.asarray(image_ranks) < k) for k in ks}
    recall.update({f"t2i_r{k}": numpy.mean(numpy.asarray(text_ranks) < k) for k in ks})
    return recall


@pytest.mark.parametrize("several_captions", [False, True])
def test_retrieval_matches_a_full_sort_for_any_chunk_size(several_captions):
    rng = numpy.random.default_rng(1)
    image_emb = rng.normal(size=(37, 4))
    if several_captions:
        text_to_image = numpy.concatenate([numpy.arange(37), rng.integers(0, 37, 30)])
    else:
        text_to_image = numpy.arange(37)
    text_emb = image_emb[text_to_image] + rng.normal(size=(len(text_to_image), 4))
    expected = naive_recall(image_emb, text_emb, text_to_image, (1, 5, 10))
    for chunk_size in (1, 5, 37, 512):
        recall = retrieval_recall(image_emb, text_emb, text_to_image=text_to_image if several_captions else None,
                                  chunk_size=chunk_size)
        assert recall.keys() == expected.keys()
        for name, value in recall.items():
            assert value == pytest.approx(expected[name], abs=1e-12), name
    assert 0 < expected["i2t_r1"] < 1 and 0 < expected["t2i_r1"] < 1     # the check is not trivial


def test_explicit_one_to_one_text_to_image_equals_the_default():
    rng = numpy.random.default_rng(2)
    image_emb, text_emb = rng.normal(size=(9, 3)), rng.normal(size=(9, 3))
    assert retrieval_recall(image_emb, text_emb, text_to_image=numpy.arange(9)) == \
        retrieval_recall(image_emb, text_emb)


@pytest.mark.parametrize("text_emb, text_to_image, message", [
    (numpy.eye(3)[:2], None, "image_emb has 3 rows and text_emb 2"),
    (numpy.eye(3), numpy.asarray([0, 0, 2]), "gives image 1 no caption"),
    (numpy.eye(3), numpy.asarray([0, 1]), "text_to_image has 2 entries, expected 3"),
    (numpy.eye(3), numpy.asarray([0, 1, 3]), r"text_to_image: index 3 is outside \[0, 3\)"),
    (numpy.ones((3, 2)), None, "same embedding width"),
    (numpy.ones(3), None, "text_emb must be a 2-D array"),
])
def test_retrieval_bad_inputs_are_named(text_emb, text_to_image, message):
    with pytest.raises(ValueError, match=message):
        retrieval_recall(numpy.eye(3), text_emb, text_to_image=text_to_image)


def test_retrieval_bad_ks_and_chunk_size_are_named():
    with pytest.raises(ValueError, match="ks must be"):
        retrieval_recall(numpy.eye(3), numpy.eye(3), ks=[])
    with pytest.raises(ValueError, match="chunk_size must be"):
        retrieval_recall(numpy.eye(3), numpy.eye(3), chunk_size=0)


# ---- relation probe ----------------------------------------------------------------------------------------

def test_relation_accuracy_needs_a_strictly_higher_true_caption(xp):
    image_emb = xp.eye(4)
    true_text_emb = xp.asarray([[1.0, 0, 0, 0],      # image 0: true 1 > swapped 0      → right
                                [0, 1.0, 0, 0],      # image 1: both captions identical → tie, wrong
                                [1.0, 0, 0, 0],      # image 2: true 0 < swapped 1      → wrong
                                [0, 0, 0, 2.0]])     # image 3: true 1 > swapped 0 (length does not matter)
    swapped_text_emb = xp.asarray([[0, 1.0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 1.0, 0]])
    assert relation_accuracy(image_emb, true_text_emb, swapped_text_emb) == 0.5
    assert relation_accuracy(image_emb, swapped_text_emb, true_text_emb) == 0.25   # only image 2 prefers it


def test_relation_accuracy_bad_inputs_are_named():
    with pytest.raises(ValueError, match="swapped_text_emb has 3 rows, image_emb 4"):
        relation_accuracy(numpy.eye(4), numpy.eye(4), numpy.eye(4)[:3])
    with pytest.raises(ValueError, match="true_text_emb.*same embedding width"):
        relation_accuracy(numpy.eye(4), numpy.ones((4, 3)), numpy.eye(4))
    with pytest.raises(ValueError, match="image_emb is empty"):
        relation_accuracy(numpy.ones((0, 4)), numpy.ones((0, 4)), numpy.ones((0, 4)))


def test_metrics_accept_tensors_and_return_python_floats():
    recall = retrieval_recall(tc.tensor(numpy.eye(3)), tc.tensor(numpy.eye(3)), ks=1)
    accuracy = relation_accuracy(tc.tensor(numpy.eye(2)), numpy.eye(2), numpy.eye(2)[::-1])
    assert recall == {"i2t_r1": 1.0, "t2i_r1": 1.0} and type(recall["i2t_r1"]) is float
    assert accuracy == 1.0 and type(accuracy) is float


# ---- running a model ---------------------------------------------------------------------------------------

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue")
TEMPLATES = ("a {}", "a picture of a {}")
CAPTIONS = [f"a {colour} {shape} left of a {other_colour} {other}" for colour in COLOURS for shape in SHAPES
            for other_colour in COLOURS for other in SHAPES if shape != other]


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(CAPTIONS + [f"a picture of a {shape}" for shape in SHAPES], vocab_size=540)


def tiny_model(tokenizer, xp, **overrides):
    # the tiny preset's 64 ids are too few for a BPE (512 byte symbols + 2 special); CLIP pools the text at
    # argmax(ids), which is the end-of-text token when it is the largest id. Its 8 tokens would cut the
    # captions short, and cut pairs that differ only at the end would tie (ties flip with batch rounding)
    config = preset("tiny", vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eot_id, context_length=16,
                    **overrides)
    return CLIP(config, dtype="float32", backend="numpy" if xp is numpy else "cupy", seed=3)


def random_pixels(count, seed=0, size=16):
    return numpy.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=numpy.uint8)


def by_hand(model, tokenizer, pixels_float, texts):
    """Unit embeddings straight from the model, in one batch each."""
    with tc.no_grad():
        image_emb = model.encode_image(backend.asarray(pixels_float, model.log_scale.backend)).data
        tokens = backend.asarray(tokenizer(texts, context_length=model.config.context_length),
                                 model.log_scale.backend)
        text_emb = model.encode_text(tokens).data
    return image_emb, text_emb


@pytest.mark.parametrize("family_overrides", [{}, {"init_bias": -10.0}], ids=["clip", "siglip"])
def test_uint8_images_are_normalised_like_preprocess(tokenizer, family_overrides):
    model = tiny_model(tokenizer, numpy, **family_overrides)
    pixels = random_pixels(5)
    preprocessed = preprocess_batch([Image.fromarray(image) for image in pixels], 16, model.config.family)
    expected, _ = by_hand(model, tokenizer, preprocessed, ["a"])
    numpy.testing.assert_allclose(encode_images(model, pixels), expected, rtol=0, atol=1e-6)


def test_float_images_are_taken_as_preprocessed_and_batching_does_not_matter(tokenizer):
    model = tiny_model(tokenizer, numpy)
    pixels = numpy.random.default_rng(1).normal(size=(7, 16, 16, 3)).astype(numpy.float32)
    expected, _ = by_hand(model, tokenizer, pixels, ["a"])
    for batch_size in (1, 3, 7, 256):
        numpy.testing.assert_allclose(encode_images(model, pixels, batch_size), expected, rtol=0, atol=1e-6)


def test_encode_texts_matches_the_model_and_batching_does_not_matter(tokenizer):
    model = tiny_model(tokenizer, numpy)
    _, expected = by_hand(model, tokenizer, random_pixels(1).astype(numpy.float32), CAPTIONS[:9])
    for batch_size in (2, 9, 256):
        numpy.testing.assert_allclose(encode_texts(model, tokenizer, CAPTIONS[:9], batch_size), expected,
                                      rtol=0, atol=1e-6)
    numpy.testing.assert_allclose(numpy.linalg.norm(expected, axis=1), 1.0, atol=1e-5)


def test_encoders_run_without_a_graph_in_eval_mode_and_restore_the_mode(tokenizer):
    model = tiny_model(tokenizer, numpy)
    model.train()
    image_emb = encode_images(model, random_pixels(2))
    assert not isinstance(image_emb, tc.Tensor) and model.training
    model.eval()
    encode_texts(model, tokenizer, ["a red circle"])
    assert not model.training


def test_classes_whose_prompts_are_cut_alike_are_warned_of(tokenizer):
    # the tiny preset's 8 tokens hold "a photo of a" and none of the class name: every class scored the same
    model = CLIP(preset("tiny", vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eot_id), seed=3)
    long = ("a picture of a picture of a picture of a {}",)
    with pytest.warns(UserWarning, match=r"2 class names give the same prompt tokens as another \('circle' = "
                                         r"'square', 'circle' = 'triangle'\) once cut to the model's 8-token"):
        classes = encode_classes(model, tokenizer, ["circle", "square", "triangle"], long)
    numpy.testing.assert_allclose(classes[0], classes[1], rtol=1e-5, atol=1e-6)   # up to the rounding of a batch
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encode_classes(model, tokenizer, ["circle", "square", "triangle"], ("{}", *long))   # one template keeps them


def test_encoder_bad_inputs_are_named(tokenizer):
    model = tiny_model(tokenizer, numpy)
    with pytest.raises(ValueError, match="images must be an array"):
        encode_images(model, numpy.zeros((16, 16, 3), numpy.uint8))
    with pytest.raises(ValueError, match="images is empty"):
        encode_images(model, numpy.zeros((0, 16, 16, 3), numpy.uint8))
    with pytest.raises(ValueError, match="images must be uint8 pixels or preprocessed floats"):
        encode_images(model, numpy.zeros((2, 16, 16, 3), numpy.int16))
    with pytest.raises(ValueError, match="batch_size must be"):
        encode_images(model, random_pixels(2), batch_size=0)
    with pytest.raises(ValueError, match="texts is empty"):
        encode_texts(model, tokenizer, [])
    with pytest.raises(ValueError, match="class_names is empty"):
        encode_classes(model, tokenizer, [])
    for bad in ("no placeholder", "a {} and a {}", "a {name}", "a {"):
        with pytest.raises(ValueError, match=f"prompt template {re.escape(repr(bad))} must contain exactly one"):
            encode_classes(model, tokenizer, ["circle"], templates=("a {}", bad))
    with pytest.raises(ValueError, match="templates is empty"):
        encode_classes(model, tokenizer, ["circle"], templates=())


def relation_captions(count):
    """Caption pairs in a fixed pattern, one per image: true/swapped relation, control true/false."""
    picks = [(COLOURS[i % 3], SHAPES[i % 3], COLOURS[(i + 1) % 3], SHAPES[(i + 1) % 3]) for i in range(count)]
    return ([f"a {c} {s} left of a {d} {t}" for c, s, d, t in picks],
            [f"a {d} {t} left of a {c} {s}" for c, s, d, t in picks],
            [f"a {c} {s} and a {d} {t}" for c, s, d, t in picks],
            [f"a {c} {s} and a {d} {SHAPES[(SHAPES.index(t) + 1) % 3]}" for c, s, d, t in picks])


def test_evaluate_gives_the_metrics_of_embeddings_computed_by_hand(tokenizer, xp):
    model = tiny_model(tokenizer, xp)
    pixels = random_pixels(10, seed=4)
    pixels_float = preprocess_batch([Image.fromarray(image) for image in pixels], 16, model.config.family)
    labels = numpy.arange(10) % 3
    captions = CAPTIONS[:10]
    true, swapped, control_true, control_false = relation_captions(10)
    zeroshot = ZeroShotSet(pixels, labels, list(SHAPES), TEMPLATES)
    retrieval = RetrievalSet(pixels, captions)
    relation = RelationSet(pixels, true, swapped, control_true, control_false)

    prompts = [template.format(shape) for shape in SHAPES for template in TEMPLATES]
    image_emb, prompt_emb = by_hand(model, tokenizer, pixels_float, prompts)
    prompt_emb = backend.to_numpy(prompt_emb).reshape(3, 2, -1)
    class_emb = prompt_emb.mean(axis=1)          # the prompts are unit vectors already
    class_emb /= numpy.linalg.norm(class_emb, axis=1, keepdims=True)
    _, caption_emb = by_hand(model, tokenizer, pixels_float, captions)
    _, relation_emb = by_hand(model, tokenizer, pixels_float, true + swapped + control_true + control_false)
    true_emb, swapped_emb, control_true_emb, control_false_emb = relation_emb.reshape(4, 10, -1)
    expected = {f"zeroshot_{name}": value for name, value in zeroshot_accuracy(image_emb, class_emb, labels).items()}
    expected.update({f"retrieval_{name}": value for name, value in retrieval_recall(image_emb, caption_emb).items()})
    expected["relation_acc"] = relation_accuracy(image_emb, true_emb, swapped_emb)
    expected["control_acc"] = relation_accuracy(image_emb, control_true_emb, control_false_emb)

    assert list(expected) == ["zeroshot_top1", "zeroshot_top5", "retrieval_i2t_r1", "retrieval_i2t_r5",
                              "retrieval_i2t_r10", "retrieval_t2i_r1", "retrieval_t2i_r5", "retrieval_t2i_r10",
                              "relation_acc", "control_acc"]
    for batch_size in (3, 256):
        metrics = evaluate(model, tokenizer, zeroshot=zeroshot, retrieval=retrieval, relation=relation,
                           batch_size=batch_size)
        assert metrics == expected
    numpy.testing.assert_allclose(backend.to_numpy(encode_classes(model, tokenizer, SHAPES, TEMPLATES)), class_emb,
                                  rtol=0, atol=1e-6)


def test_evaluate_returns_only_the_sets_given(tokenizer):
    model = tiny_model(tokenizer, numpy)
    true, swapped, _, _ = relation_captions(4)
    metrics = evaluate(model, tokenizer, relation=RelationSet(random_pixels(4), true, swapped))
    assert list(metrics) == ["relation_acc"]


def test_evaluate_and_sets_reject_bad_inputs(tokenizer):
    model = tiny_model(tokenizer, numpy)
    pixels = random_pixels(3)
    with pytest.raises(ValueError, match="at least one of"):
        evaluate(model, tokenizer)
    with pytest.raises(TypeError, match="retrieval must be a RetrievalSet"):
        evaluate(model, tokenizer, retrieval=(pixels, ["a", "b", "c"]))
    with pytest.raises(ValueError, match="ZeroShotSet.labels has 2 entries but images has 3"):
        ZeroShotSet(pixels, [0, 1], ["circle", "square"])
    with pytest.raises(ValueError, match="must contain exactly one"):
        ZeroShotSet(pixels, [0, 1, 0], ["circle", "square"], templates=("a circle",))
    with pytest.raises(ValueError, match="RetrievalSet.captions has 2 entries but images has 3"):
        RetrievalSet(pixels, ["a", "b"])
    with pytest.raises(ValueError, match="RelationSet.swapped_captions has 2 entries"):
        RelationSet(pixels, ["a", "b", "c"], ["a", "b"])
    with pytest.raises(ValueError, match="both control_true and control_false"):
        RelationSet(pixels, ["a", "b", "c"], ["a", "b", "c"], control_true=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"labels: index 2 is outside \[0, 2\)"):
        evaluate(model, tokenizer, zeroshot=ZeroShotSet(pixels, [0, 1, 2], ["circle", "square"]))
