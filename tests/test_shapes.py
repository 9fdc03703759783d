"""Tests for tinyclip.data.shapes: determinism, variety, truthful captions, held-out splits, the probe, the cache.

Captions are checked against the pixels, not against the code that wrote
them: an independent parser reads each caption back into objects, sizes,
positions and relations, and the rendered image must agree (the centre
pixel of each object has its colour, every painted pixel lies in an
object's box, "to the left of" matches the x-centres). Evaluation splits
are compared image by image with thousands of training items.
"""

import os
import re
import subprocess
import sys
import zlib

import numpy
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinyclip.data import shapes
from tinyclip.data.shapes import (BACKGROUND, COLOURS, SHAPES, SIZES, ShapesDataset, class_names, relation_probe,
                                  render, retrieval_set, scene, zeroshot_set)

OBJECT = r"(?P<article{k}>an?) (?:(?P<size{k}>small|large) )?(?P<colour{k}>[a-z]+) (?P<shape{k}>[a-z]+)"
ONE_OBJECT = re.compile("^" + OBJECT.format(k=0) + r"(?: (?P<position>on the left|on the right|at the top"
                        r"|at the bottom|in the centre))?$")
TWO_OBJECTS = re.compile("^" + OBJECT.format(k=0) + r" (?P<relation>to the left of|to the right of|above|below|and) "
                         + OBJECT.format(k=1) + "$")


def parse(caption):
    """(objects [(size or None, colour, shape)], position or None, relation or None) read from a caption."""
    match = ONE_OBJECT.match(caption) or TWO_OBJECTS.match(caption)
    assert match, f"caption {caption!r} has an unexpected form"
    groups = match.groupdict()
    objects = []
    for k in (0, 1):
        if groups.get(f"shape{k}") is None:
            continue
        colour, shape = groups[f"colour{k}"], groups[f"shape{k}"]
        assert colour in COLOURS and shape in SHAPES, caption
        first_word = groups[f"size{k}"] or colour
        assert groups[f"article{k}"] == ("an" if first_word[0] in "aeiou" else "a"), caption
        objects.append((groups[f"size{k}"], colour, shape))
    return objects, groups.get("position"), groups.get("relation")


def check_caption_matches_layout(drawn):
    """The caption names the scene's objects in order, and its sizes, position and relation are true of their boxes."""
    named, position, relation = parse(drawn.caption)
    assert [(colour, shape) for _, colour, shape in named] == [(o.colour, o.shape) for o in drawn.objects]
    for (size, _, _), obj in zip(named, drawn.objects):
        assert size in (None, obj.size)
    side, third = drawn.image_size, drawn.image_size // 3
    if position is not None:
        x, y = drawn.objects[0].centre
        assert position == drawn.position
        assert {"on the left": x < third, "on the right": x >= side - third,
                "at the top": y < third, "at the bottom": y >= side - third,
                "in the centre": third <= x < side - third and third <= y < side - third}[position]
    if relation is None:
        return
    first, second = drawn.objects
    assert relation == drawn.relation
    dx = second.centre[0] - first.centre[0]
    dy = second.centre[1] - first.centre[1]
    gap_x = max(first.bbox[0], second.bbox[0]) - min(first.bbox[2], second.bbox[2]) - 1     # free columns between boxes
    gap_y = max(first.bbox[1], second.bbox[1]) - min(first.bbox[3], second.bbox[3]) - 1
    assert max(gap_x, gap_y) >= 2, "the two boxes touch or overlap"
    if relation in ("to the left of", "to the right of"):
        assert gap_x >= 2 and abs(dx) > abs(dy)
        assert (dx > 0) == (relation == "to the left of")
    elif relation in ("above", "below"):
        assert gap_y >= 2 and abs(dy) > abs(dx)
        assert (dy > 0) == (relation == "above")


def check_image_matches_scene(image, drawn):
    """Each object's centre pixel has its colour; painted pixels lie inside the boxes, each box has its colour."""
    side = drawn.image_size
    assert image.shape == (side, side, 3) and image.dtype == numpy.uint8
    inside = numpy.zeros((side, side), bool)
    for obj in drawn.objects:
        x0, y0, x1, y1 = obj.bbox
        assert 0 < x0 and 0 < y0 and x1 < side - 1 and y1 < side - 1, "the box must not touch the image edge"
        x, y = obj.centre
        assert tuple(image[y, x]) == COLOURS[obj.colour]
        inside[y0:y1 + 1, x0:x1 + 1] = True
    painted = (image != numpy.asarray(BACKGROUND, numpy.uint8)).any(axis=-1)
    assert not (painted & ~inside).any()
    allowed = {BACKGROUND} | {COLOURS[obj.colour] for obj in drawn.objects}
    packed = numpy.unique(image.reshape(-1, 3).astype(numpy.int32) @ numpy.array([1 << 16, 1 << 8, 1]))   # (colours,)
    assert {(value >> 16, value >> 8 & 255, value & 255) for value in packed.tolist()} <= allowed


def layout(drawn):
    return tuple(sorted((obj.shape, obj.colour, obj.radius, obj.centre) for obj in drawn.objects))


def test_vocabulary_is_large_enough_and_colours_are_far_apart():
    assert len(SHAPES) >= 6 and len(COLOURS) >= 8 and SIZES == ("small", "large")
    values = numpy.asarray(list(COLOURS.values()) + [BACKGROUND], numpy.float64)      # (C + 1, 3)
    distances = numpy.linalg.norm(values[:, None] - values[None, :], axis=-1)
    assert distances[~numpy.eye(len(values), dtype=bool)].min() >= 100


def test_an_item_is_the_same_on_every_call_and_in_every_instance():
    indices = [0, 1, 7, 123456789, 2**40]
    first = ShapesDataset(seed=3, image_size=32, cache_size=0).batch(indices)
    second = ShapesDataset(seed=3, image_size=32).batch(indices)
    assert first[1] == second[1]
    numpy.testing.assert_array_equal(first[0], second[0])
    assert [scene(index, seed=3, image_size=32) for index in indices] == \
        [scene(index, seed=3, image_size=32) for index in indices]


def test_an_item_is_the_same_in_another_process():
    # A fresh interpreter with another string-hash seed: nothing may depend on hash() or on import order.
    program = ("import sys, zlib; from tinyclip.data.shapes import ShapesDataset; "
               "images, captions = ShapesDataset(seed=2, image_size=32).batch([0, 5, 99]); "
               "print(zlib.crc32(images.tobytes()), captions)")
    repository = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True,
                            cwd=repository, env={**os.environ, "PYTHONHASHSEED": "12345"})
    images, captions = ShapesDataset(seed=2, image_size=32).batch([0, 5, 99])
    assert result.stdout.strip() == f"{zlib.crc32(images.tobytes())} {captions}"


def test_the_first_captions_stay_as_they_were():
    # Changing the sampler changes every item; this makes that a visible decision rather than an accident.
    assert ShapesDataset(image_size=64).captions(range(6)) == [
        "a purple cross", "a black circle", "a large red circle and a small orange square",
        "a cyan triangle", "a large cyan square at the top", "a small pink square above a large purple square"]


def test_an_item_does_not_depend_on_what_was_drawn_before():
    dataset = ShapesDataset(image_size=32, cache_size=0)
    images, captions = dataset.batch([9, 4, 2])
    for image, caption, index in zip(images, captions, [9, 4, 2]):
        alone = ShapesDataset(image_size=32, cache_size=0)[index]
        numpy.testing.assert_array_equal(image, alone[0])
        assert caption == alone[1]


def test_seeds_and_splits_give_different_items():
    for split in shapes.SPLITS:
        seed_0, seed_1 = ([scene(index, seed, split, 32) for index in range(20)] for seed in (0, 1))
        assert seed_0 != seed_1
    training = [scene(index, 0, "train", 32) for index in range(20)]
    assert training != [scene(index, 0, "retrieval", 32) for index in range(20)]


def test_a_few_hundred_items_show_every_shape_colour_size_position_and_relation():
    seen = [parse(caption) for caption in ShapesDataset(image_size=32).captions(range(400))]
    objects = [obj for named, _, _ in seen for obj in named]
    assert {shape for _, _, shape in objects} == set(SHAPES)
    assert {colour for _, colour, _ in objects} == set(COLOURS)
    assert {size for size, _, _ in objects} == {None, *SIZES}
    assert {len(named) for named, _, _ in seen} == {1, 2}
    assert {position for _, position, _ in seen} == {None, *shapes.POSITIONS}
    assert {relation for _, _, relation in seen} == {None, *shapes.RELATIONS}


@pytest.mark.parametrize("image_size", [32, 64])
def test_training_captions_describe_what_is_drawn(image_size):
    dataset = ShapesDataset(image_size=image_size, cache_size=0)
    images, captions = dataset.batch(range(300))
    for index, (image, caption) in enumerate(zip(images, captions)):
        drawn = dataset.scene(index)
        assert drawn.caption == caption
        check_caption_matches_layout(drawn)
        check_image_matches_scene(image, drawn)


@given(image_size=st.integers(shapes.MIN_IMAGE_SIZE, 256), index=st.integers(0, 2**48),
       split=st.sampled_from(shapes.SPLITS))
def test_layouts_hold_at_every_image_size(image_size, index, split):
    drawn = scene(index, seed=0, split=split, image_size=image_size)
    check_caption_matches_layout(drawn)
    check_image_matches_scene(render(drawn), drawn)


@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_fills_its_centre_and_stays_in_its_box(shape):
    for radius in range(2, 41):
        mask = shapes._mask(shape, radius)
        assert mask.shape == (2 * radius + 1, 2 * radius + 1)
        assert mask[radius, radius], f"{shape} of radius {radius} leaves its centre empty"


@pytest.mark.parametrize("image_size", [32, 64])
def test_shapes_are_told_apart_by_their_pixels(image_size):
    for size in SIZES:
        radius = shapes._radius(size, image_size)
        masks = {shape: shapes._mask(shape, radius).tobytes() for shape in SHAPES}
        assert len(set(masks.values())) == len(SHAPES), f"two shapes look the same at radius {radius}"
    assert shapes._radius("large", image_size) >= shapes._radius("small", image_size) + 2


def test_evaluation_images_are_never_training_images():
    # Key spaces: train, zeroshot, retrieval and relation items draw from SeedSequence([seed, split code,
    # index]) with four different codes, and a layout's hash puts it on one side only (HELD_OUT_BUCKETS).
    image_size = 32
    training = [scene(index, 0, "train", image_size) for index in range(6000)]
    train_bytes = [render(drawn).tobytes() for drawn in training]
    assert len(set(train_bytes)) < len(train_bytes), "chance repeats exist, so the comparison below means something"
    evaluation = [zeroshot_set(per_class=3, image_size=image_size)[0],
                  retrieval_set(300, image_size=image_size)[0],
                  relation_probe(300, image_size=image_size).images]
    evaluation_bytes = {image.tobytes() for images in evaluation for image in images}
    assert not evaluation_bytes & set(train_bytes)
    train_layouts = {layout(drawn) for drawn in training}
    for split, count in (("zeroshot", 210), ("retrieval", 300), ("relation", 300)):
        assert not {layout(scene(index, 0, split, image_size)) for index in range(count)} & train_layouts


def test_zeroshot_set_covers_every_class_with_correct_labels():
    names = class_names()
    assert len(names) == len(SHAPES) * len(COLOURS) == len(set(names))
    images, labels, returned_names = zeroshot_set(per_class=2, seed=5, image_size=32)
    assert returned_names == names
    assert images.shape == (2 * len(names), 32, 32, 3) and images.dtype == numpy.uint8
    assert labels.dtype == numpy.int64
    assert numpy.bincount(labels, minlength=len(names)).tolist() == [2] * len(names)
    for index, (image, label) in enumerate(zip(images, labels)):
        drawn = scene(index, seed=5, split="zeroshot", image_size=32)
        assert len(drawn.objects) == 1 and drawn.objects[0].label == names[label]
        check_image_matches_scene(image, drawn)
    smaller = zeroshot_set(per_class=1, seed=5, image_size=32)
    numpy.testing.assert_array_equal(smaller[0], images[:len(names)])


def test_zeroshot_templates_make_training_style_captions():
    for template in shapes.ZEROSHOT_TEMPLATES:
        for name in class_names():
            named, position, relation = parse(template.format(name))
            assert [f"{colour} {shape}" for _, colour, shape in named] == [name]
            assert position is None and relation is None


def test_retrieval_pairs_match_their_scenes():
    images, captions = retrieval_set(40, seed=2, image_size=32)
    assert images.shape == (40, 32, 32, 3) and len(captions) == 40
    for index, (image, caption) in enumerate(zip(images, captions)):
        drawn = scene(index, seed=2, split="retrieval", image_size=32)
        assert drawn.caption == caption
        numpy.testing.assert_array_equal(image, render(drawn))


def test_relation_probe_swaps_the_objects_and_controls_name_an_absent_object():
    probe = relation_probe(100, seed=1, image_size=32)
    assert probe.images.shape == (100, 32, 32, 3) and len(probe.scenes) == 100
    for k, drawn in enumerate(probe.scenes):
        check_caption_matches_layout(drawn)
        check_image_matches_scene(probe.images[k], drawn)
        true, true_position, relation = parse(probe.true_captions[k])
        swapped, _, swapped_relation = parse(probe.swapped_captions[k])
        assert relation in ("to the left of", "to the right of") and true_position is None
        assert probe.true_captions[k] == drawn.caption
        assert swapped_relation == relation and swapped == true[::-1] and swapped != true
        present = {(obj.colour, obj.shape) for obj in drawn.objects}
        control_true, _, conjunction = parse(probe.control_true[k])
        control_false, _, false_conjunction = parse(probe.control_false[k])
        assert conjunction == false_conjunction == "and"
        assert {(colour, shape) for _, colour, shape in control_true} == present
        changed = [(before, after) for before, after in zip(control_true, control_false) if before != after]
        assert len(changed) == 1, "exactly one object is replaced"
        (_, colour, shape), (_, new_colour, new_shape) = changed[0]
        assert (new_colour != colour) != (new_shape != shape), "by changing one word, its colour or its shape"
        if new_colour != colour:
            assert new_colour not in {obj.colour for obj in drawn.objects}
        else:
            assert new_shape not in {obj.shape for obj in drawn.objects}


def test_cache_is_bounded_and_its_items_cannot_be_changed():
    dataset = ShapesDataset(image_size=32, cache_size=3)
    fresh = ShapesDataset(image_size=32, cache_size=0)
    images, captions = dataset.batch(range(5))
    assert len(dataset._cache) == 3
    images[:] = 0                                             # the batch is the caller's; the cache is not touched
    for index in range(5):
        image, caption = dataset[index]
        assert not image.flags.writeable
        numpy.testing.assert_array_equal(image, fresh[index][0])
        assert caption == captions[index] == fresh[index][1]
    assert len(dataset._cache) == 3
    assert list(dataset._cache) == [2, 3, 4]                  # least recently used first


@pytest.mark.parametrize("call, name", [
    (lambda: scene(-1), "index"),
    (lambda: scene(True), "index"),
    (lambda: scene(1.5), "index"),
    (lambda: scene(0, seed=-2), "seed"),
    (lambda: scene(0, split="test"), "split"),
    (lambda: scene(0, image_size=16), "image_size"),
    (lambda: render("a red circle"), "scene"),
    (lambda: ShapesDataset(image_size=8), "image_size"),
    (lambda: ShapesDataset(cache_size=-1), "cache_size"),
    (lambda: ShapesDataset(seed="x"), "seed"),
    (lambda: ShapesDataset(image_size=32)[-1], "index"),
    (lambda: ShapesDataset(image_size=32).batch([]), "indices"),
    (lambda: ShapesDataset(image_size=32).batch([0, -5]), "index"),
    (lambda: zeroshot_set(per_class=0), "per_class"),
    (lambda: zeroshot_set(image_size=31), "image_size"),
    (lambda: retrieval_set(0), "n"),
    (lambda: relation_probe(-3), "n"),
    (lambda: relation_probe(4, seed=-1), "seed"),
])
def test_bad_arguments_raise_value_errors_that_name_them(call, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        call()
