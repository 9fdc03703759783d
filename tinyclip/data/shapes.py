"""Synthetic shapes: an unlimited, deterministic image–caption set for training and probing CLIP / SigLIP.

Each image is a plain grey square with one or two filled shapes on it; each
caption says truthfully what is drawn ("a red circle", "a small blue square
on the left", "a yellow triangle to the left of a green star", "a purple
cross and an orange diamond"). The vocabulary is small and regular, so a
small model can learn it and its failures can be read off:

* zero-shot classification over every colour × shape class, with prompt
  templates as in CLIP (Radford et al. 2021, §3.1.4 prompt ensembling);
* image ↔ text retrieval on held-out pairs;
* the spatial-relation probe of ReCLIP (Subramanian et al. 2022, the
  controlled experiment on synthetic CLEVR scenes): does the model prefer
  "a red circle to the left of a blue square" over the same words with the
  objects swapped, and, as a control that needs no spatial reasoning, "a red
  circle and a blue square" over a caption naming an object that is absent?

API::

    SHAPES, COLOURS, SIZES, BACKGROUND, ZEROSHOT_TEMPLATES
    ShapeObject(shape, colour, size, centre, radius)   .label, .bbox
    Scene(objects, caption, relation, position, image_size)
    scene(index, seed=0, split="train", image_size=64) -> Scene
    render(scene) -> uint8 (H, W, 3)
    ShapesDataset(seed=0, image_size=64, cache_size=4096)
        [index] -> (uint8 (H, W, 3), caption); .batch(indices) -> (uint8 (n, H, W, 3), captions)
        .scene(index) -> Scene; .captions(indices) -> captions (no rendering)
    class_names() -> ["red circle", ...]
    zeroshot_set(per_class=10, seed=0, image_size=64) -> (images, labels int64, class names)
    retrieval_set(n, seed=0, image_size=64) -> (images, captions)
    relation_probe(n, seed=0, image_size=64) -> RelationProbe

Determinism. Item ``index`` of a split draws from its own generator,
``default_rng(SeedSequence([seed, split code, index]))``, so it is the same
on every machine and in every process whatever else was drawn before, and
any non-negative index is valid (the set has no length).

Held-out evaluation. Evaluation splits use their own split codes, so their
random streams are unrelated to training's; but the space of single-object
images is finite (179,520 at 64 px, 46,080 at 32 px), so unrelated streams
would still repeat training images by chance. The layout itself therefore
decides: a scene whose layout (each object's shape, colour, radius and
centre) hashes into bucket 0 of ``HELD_OUT_BUCKETS`` belongs to evaluation,
any other to training, and each split redraws (from the same item's
generator, so still deterministically) until it lands on its own side. No
evaluation image is ever a training image of the same image size.

Geometry. Sizes and margins are fractions of the image side rounded to
whole pixels, and every object is painted inside the square box
``centre ± radius``. Two objects' boxes are at least ``_GAP`` apart along
the axis of their relation, and that axis is the dominant one
(|dx| > |dy| for left/right), so a relation is never ambiguous. Shapes are
filled and convex around their centre, so the centre pixel always carries
the object's colour; there is no anti-aliasing, so every pixel is either
the background or one of ``COLOURS``.

Speed. Each (shape, radius) is drawn once with Pillow into a boolean mask,
and rendering pastes masks into a NumPy array. ``ShapesDataset`` keeps the
last ``cache_size`` rendered items, so epochs over a fixed range of indices
render each item once. On a 2-core AMD EPYC (Python 3.11, NumPy 2.4,
Pillow 13), 1,000 new 64 px items take 76 ms, 58 ms of which is sampling
the scenes (creating each item's generator is most of it), and 4 ms once
cached::

    python -m timeit -s "from tinyclip.data.shapes import ShapesDataset; d = ShapesDataset(cache_size=0)" \
        "d.batch(range(1000))"
"""

import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache

import numpy
from PIL import Image, ImageDraw

# No hexagon: at the small size (radius 5 px at 64 px) a hexagon and a circle differ in 16 of their ~90
# pixels, and a trained model told them apart no better than a coin (README, "Training")
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
# RGB values at least 100 apart (Euclidean) from each other and from the background
COLOURS = {
    "red": (220, 20, 20),
    "orange": (255, 130, 0),
    "yellow": (255, 235, 0),
    "green": (0, 170, 0),
    "cyan": (0, 220, 230),
    "blue": (20, 40, 230),
    "purple": (140, 0, 200),
    "pink": (255, 130, 210),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
SIZES = ("small", "large")
BACKGROUND = (128, 128, 128)              # mid grey: far from white and black as well as from the hues
POSITIONS = ("on the left", "on the right", "at the top", "at the bottom", "in the centre")
RELATIONS = ("to the left of", "to the right of", "above", "below", "and")
SPLITS = ("train", "zeroshot", "retrieval", "relation")
# The training captions "a small red circle" / "a large red circle" with the size
# marginalised by the ensemble; no "a {}" because the article depends on the class
# ("an orange circle"), and no full stop because training captions have none.
ZEROSHOT_TEMPLATES = ("a small {}", "a large {}")
MIN_IMAGE_SIZE = 32                       # below this a small star is a blob of a few pixels
HELD_OUT_BUCKETS = 8                      # 1 in 8 layouts is kept for evaluation

_SPLIT_CODES = {split: code for code, split in enumerate(SPLITS)}
_COLOUR_NAMES = tuple(COLOURS)
_CLASSES = tuple((colour, shape) for colour in _COLOUR_NAMES for shape in SHAPES)   # zero-shot label -> class
_RADIUS_FRACTION = {"small": 0.08, "large": 0.16}   # of the image side: 5 and 10 px at 64 px
_MARGIN_FRACTION = 0.03                   # free border between an object's box and the image edge
_GAP_FRACTION = 0.08                      # free space between two objects' boxes along their relation
_ROW_JITTER_FRACTION = 0.1                # how far two objects side by side may stray from a common row
_MAX_ATTEMPTS = 1000                      # redraws before giving up on landing on a split's side


@dataclass(frozen=True)
class ShapeObject:
    """One filled shape: what it is and the pixels it occupies."""
    shape: str                  # one of SHAPES
    colour: str                 # a key of COLOURS
    size: str                   # "small" or "large"
    centre: tuple               # (x, y): pixel column and row of the centre, always painted in `colour`
    radius: int                 # the shape lies inside the box centre ± radius (inclusive), in pixels

    @property
    def label(self):
        """The class name, "red circle": the zero-shot label of a one-object image."""
        return f"{self.colour} {self.shape}"

    @property
    def bbox(self):
        """(x0, y0, x1, y1), inclusive: the square box the shape is drawn in."""
        x, y = self.centre
        return (x - self.radius, y - self.radius, x + self.radius, y + self.radius)


@dataclass(frozen=True)
class Scene:
    """What one image shows and the caption that describes it."""
    objects: tuple              # one or two ShapeObjects, in the order the caption names them
    caption: str                # lowercase words only; true of the image
    relation: str | None        # two objects: one of RELATIONS, read objects[0] <relation> objects[1]; one: None
    position: str | None        # one object: the region of POSITIONS it lies in (the caption may omit it); two: None
    image_size: int             # side of the square image the pixel coordinates refer to


@dataclass(frozen=True)
class RelationProbe:
    """Two-object images with a left/right relation and four captions each (see ``relation_probe``)."""
    images: numpy.ndarray       # (n, H, W, 3) uint8
    true_captions: list         # "a red circle to the left of a blue square"
    swapped_captions: list      # "a blue square to the left of a red circle": the same words, objects exchanged
    control_true: list          # "a red circle and a blue square"
    control_false: list         # "a red circle and a blue star": one colour or shape replaced by one not in the image
    scenes: tuple               # the Scene of each image; scenes[k].caption == true_captions[k]


class _Draws:
    """Uniform draws from one item's generator, fetched 32 at a time.

    NumPy spends about 1.5 µs per call on overhead, and a scene takes a dozen
    draws; one vectorised call per 32 draws makes sampling a scene cheaper
    than creating its generator.
    """

    def __init__(self, rng):
        self._rng = rng
        self._pool = []

    def uniform(self):
        """A float in [0, 1)."""
        if not self._pool:
            self._pool = self._rng.random(32).tolist()
        return self._pool.pop()

    def integer(self, low, high):
        """An int in [low, high], both included."""
        # uniform() < 1 - 2**-53, so uniform() * count stays below count in floating point
        return low + int(self.uniform() * (high - low + 1))

    def choice(self, options):
        return options[int(self.uniform() * len(options))]

    def coin(self, probability=0.5):
        return self.uniform() < probability


def _check_int(value, name, minimum, where):
    if isinstance(value, (bool, numpy.bool_)) or not isinstance(value, (int, numpy.integer)) or value < minimum:
        raise ValueError(f"{where}: {name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_image_size(image_size, where):
    return _check_int(image_size, "image_size", MIN_IMAGE_SIZE, where)


def _check_split(split, where):
    if split not in _SPLIT_CODES:
        raise ValueError(f"{where}: split must be one of {SPLITS}, got {split!r}")
    return split


def _article(word):
    return "an" if word[0] in "aeiou" else "a"


def _phrase(obj, with_size):
    """"a small red circle" / "an orange star"."""
    words = f"{obj.size} {obj.label}" if with_size else obj.label
    return f"{_article(words)} {words}"


def _pixels(fraction, image_size, minimum):
    return max(minimum, round(fraction * image_size))


def _radius(size, image_size):
    return _pixels(_RADIUS_FRACTION[size], image_size, 2)


def _region_ranges(position, radius, image_size):
    """The inclusive (x, y) ranges of centres that lie in ``position``: one third of the side, middle third across."""
    third = image_size // 3
    near = (radius + _pixels(_MARGIN_FRACTION, image_size, 1), third - 1)           # first third
    far = (image_size - third, image_size - 1 - near[0])                             # last third
    middle = (third, image_size - 1 - third)
    return {"on the left": (near, middle), "on the right": (far, middle),
            "at the top": (middle, near), "at the bottom": (middle, far),
            "in the centre": (middle, middle)}[position]


def _one_object_scene(draws, image_size, shape, colour):
    size = draws.choice(SIZES)
    radius = _radius(size, image_size)
    position = draws.choice(POSITIONS)
    (x_low, x_high), (y_low, y_high) = _region_ranges(position, radius, image_size)
    obj = ShapeObject(shape, colour, size, (draws.integer(x_low, x_high), draws.integer(y_low, y_high)), radius)
    caption = _phrase(obj, with_size=draws.coin())
    if draws.coin():
        caption = f"{caption} {position}"
    return Scene((obj,), caption, None, position, image_size)


def _two_classes(draws):
    """Two different (colour, shape) classes, so that swapping the objects changes the caption."""
    first = (draws.choice(_COLOUR_NAMES), draws.choice(SHAPES))
    second = first
    while second == first:
        second = (draws.choice(_COLOUR_NAMES), draws.choice(SHAPES))
    return first, second


def _side_by_side(draws, image_size, classes, sizes):
    """Two objects in a row, boxes ``_GAP`` apart, the first on the left: (left, right) ShapeObjects.

    Their rows differ by at most ``2 · jitter < r_left + r_right + gap <= dx``, so
    left/right is the dominant axis and "above" could never be read instead.
    """
    margin = _pixels(_MARGIN_FRACTION, image_size, 1)
    gap = _pixels(_GAP_FRACTION, image_size, 2)
    left_radius, right_radius = (_radius(size, image_size) for size in sizes)
    left_x = draws.integer(left_radius + margin, image_size - 1 - margin - gap - left_radius - 2 * right_radius)
    right_x = draws.integer(left_x + left_radius + right_radius + gap, image_size - 1 - margin - right_radius)
    widest = max(left_radius, right_radius)
    row = draws.integer(widest + margin, image_size - 1 - margin - widest)
    jitter = min(_pixels(_ROW_JITTER_FRACTION, image_size, 0), (left_radius + right_radius + gap - 1) // 2)
    left_y, right_y = (row + draws.integer(-jitter, jitter) for _ in range(2))
    left_y = min(max(left_y, left_radius + margin), image_size - 1 - margin - left_radius)
    right_y = min(max(right_y, right_radius + margin), image_size - 1 - margin - right_radius)
    (left_colour, left_shape), (right_colour, right_shape) = classes
    return (ShapeObject(left_shape, left_colour, sizes[0], (left_x, left_y), left_radius),
            ShapeObject(right_shape, right_colour, sizes[1], (right_x, right_y), right_radius))


def _transposed(obj):
    """The object mirrored across the main diagonal: a left/right layout becomes a top/bottom one."""
    return ShapeObject(obj.shape, obj.colour, obj.size, obj.centre[::-1], obj.radius)


def _two_object_scene(draws, image_size, vertical, relation, with_size):
    """Two objects in a row (or, ``vertical``, a column), named in caption order with ``relation``."""
    sizes = (draws.choice(SIZES), draws.choice(SIZES))
    first, second = _side_by_side(draws, image_size, _two_classes(draws), sizes)     # first is left / top
    if vertical:
        first, second = _transposed(first), _transposed(second)
    if relation in ("to the right of", "below") or (relation == "and" and draws.coin()):
        first, second = second, first
    caption = f"{_phrase(first, with_size)} {relation} {_phrase(second, with_size)}"
    return Scene((first, second), caption, relation, None, image_size)


def _training_scene(draws, image_size):
    """The mixture training and retrieval share: half one object, half two (two thirds of those with a relation)."""
    if draws.coin():
        return _one_object_scene(draws, image_size, draws.choice(SHAPES), draws.choice(_COLOUR_NAMES))
    vertical = draws.coin()
    if draws.coin(2 / 3):
        relation = draws.choice(RELATIONS[2:4] if vertical else RELATIONS[0:2])
    else:
        relation = "and"
    return _two_object_scene(draws, image_size, vertical, relation, with_size=draws.coin())


def _is_held_out(objects):
    """Whether a layout belongs to evaluation: a hash of what decides the pixels, independent of object order."""
    layout = sorted((SHAPES.index(obj.shape), _COLOUR_NAMES.index(obj.colour), obj.radius, *obj.centre)
                    for obj in objects)
    return zlib.crc32(numpy.asarray(layout, "<i4").tobytes()) % HELD_OUT_BUCKETS == 0


def _control_captions(draws, left, right):
    """("a A and a B", the same with one colour or shape of A or B replaced by one absent from the image)."""
    replaced = draws.choice((0, 1))
    objects = [left, right]
    target = objects[replaced]
    if draws.coin():
        absent = [colour for colour in _COLOUR_NAMES if colour not in (left.colour, right.colour)]
        objects[replaced] = ShapeObject(target.shape, draws.choice(absent), target.size, target.centre, target.radius)
    else:
        absent = [shape for shape in SHAPES if shape not in (left.shape, right.shape)]
        objects[replaced] = ShapeObject(draws.choice(absent), target.colour, target.size, target.centre, target.radius)
    return (f"{_phrase(left, False)} and {_phrase(right, False)}",
            f"{_phrase(objects[0], False)} and {_phrase(objects[1], False)}")


def _sample(index, seed, split, image_size):
    """(Scene, extra captions) of item ``index``; the extras are the relation probe's, empty elsewhere."""
    draws = _Draws(numpy.random.default_rng(numpy.random.SeedSequence([seed, _SPLIT_CODES[split], index])))
    for _ in range(_MAX_ATTEMPTS):
        if split == "train" or split == "retrieval":
            drawn = _training_scene(draws, image_size)
        elif split == "zeroshot":
            colour, shape = _CLASSES[index % len(_CLASSES)]
            drawn = _one_object_scene(draws, image_size, shape, colour)
        else:
            relation = draws.choice(RELATIONS[0:2])
            drawn = _two_object_scene(draws, image_size, vertical=False, relation=relation, with_size=False)
        if _is_held_out(drawn.objects) == (split != "train"):
            break
    else:                                 # a safeguard only: 1000 misses in a row have probability (7/8)**1000
        raise RuntimeError(f"no {split} layout found for item {index} at image_size {image_size}")
    if split != "relation":
        return drawn, ()
    first, second = drawn.objects
    swapped = f"{_phrase(second, False)} {drawn.relation} {_phrase(first, False)}"
    left, right = (first, second) if drawn.relation == "to the left of" else (second, first)
    return drawn, (swapped, *_control_captions(draws, left, right))


def scene(index, seed=0, split="train", image_size=64):
    """The Scene of item ``index`` of ``split``: the same for the same arguments on any machine."""
    index = _check_int(index, "index", 0, "scene")
    seed = _check_int(seed, "seed", 0, "scene")
    return _sample(index, seed, _check_split(split, "scene"), _check_image_size(image_size, "scene"))[0]


@lru_cache(maxsize=None)
def _mask(shape, radius):
    """(2r+1, 2r+1) bool: the pixels ``shape`` covers in its box, drawn once with Pillow and then reused."""
    side = 2 * radius + 1
    canvas = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(canvas)
    r = radius
    if shape == "circle":
        draw.ellipse((0, 0, 2 * r, 2 * r), fill=255)
    elif shape == "square":
        half = round(0.8 * r)             # a full box would outweigh the circle; 0.8 keeps their areas close
        draw.rectangle((r - half, r - half, r + half, r + half), fill=255)
    elif shape == "triangle":
        draw.polygon([(r, 0), (2 * r, 2 * r), (0, 2 * r)], fill=255)      # half as wide as the box at the centre row
    elif shape == "diamond":
        draw.polygon([(r, 0), (2 * r, r), (r, 2 * r), (0, r)], fill=255)
    elif shape == "star":
        angles = numpy.deg2rad(numpy.arange(-90, 270, 36))               # five points, the first at the top
        lengths = numpy.where(numpy.arange(10) % 2 == 0, r, 0.45 * r)    # inner corners at 0.45 r: centre filled
        draw.polygon(list(zip(r + lengths * numpy.cos(angles), r + lengths * numpy.sin(angles))), fill=255)
    elif shape == "cross":
        arm = max(1, round(r / 3))        # half-width of each bar
        draw.rectangle((r - arm, 0, r + arm, 2 * r), fill=255)
        draw.rectangle((0, r - arm, 2 * r, r + arm), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    mask = numpy.asarray(canvas) > 0      # (2r+1, 2r+1)
    mask.flags.writeable = False
    return mask


@lru_cache(maxsize=None)
def _blank(image_size):
    """(S, S, 3) uint8 background to copy from: broadcasting 3 values over S² pixels is ~50× slower."""
    blank = numpy.empty((image_size, image_size, 3), numpy.uint8)
    blank[...] = BACKGROUND
    blank.flags.writeable = False
    return blank


_COLOUR_VALUES = {name: numpy.asarray(rgb, numpy.uint8) for name, rgb in COLOURS.items()}


def _paint(image, drawn):
    """Fill ``image`` (H, W, 3) uint8 with the background and ``drawn``'s objects."""
    numpy.copyto(image, _blank(drawn.image_size))
    for obj in drawn.objects:
        x0, y0, x1, y1 = obj.bbox
        mask = _mask(obj.shape, obj.radius)[..., None]                  # (2r+1, 2r+1, 1)
        numpy.copyto(image[y0:y1 + 1, x0:x1 + 1], _COLOUR_VALUES[obj.colour], where=mask)


def render(scene):
    """The image of a Scene: (image_size, image_size, 3) uint8."""
    if not isinstance(scene, Scene):
        raise ValueError(f"render: scene must be a Scene, got {type(scene).__name__}")
    image = numpy.empty((scene.image_size, scene.image_size, 3), numpy.uint8)
    _paint(image, scene)
    return image


def _render_all(scenes, image_size):
    images = numpy.empty((len(scenes), image_size, image_size, 3), numpy.uint8)     # (n, H, W, 3)
    for image, drawn in zip(images, scenes):
        _paint(image, drawn)
    return images


class ShapesDataset:
    """The training split: item ``index`` is (image (H, W, 3) uint8, caption) for any index >= 0.

    There is no ``len``: the set is unlimited, and a loader chooses which
    indices make an epoch. The last ``cache_size`` rendered items are kept
    (about ``cache_size · 3 · image_size²`` bytes: 48 MiB for 4096 items at
    64 px), so a loop over a fixed range renders each item once. Items come
    back read-only; ``batch`` returns a fresh array. Safe to share between
    threads (a prefetching loader and the training loop).
    """

    def __init__(self, seed=0, image_size=64, cache_size=4096):
        self.seed = _check_int(seed, "seed", 0, "ShapesDataset")
        self.image_size = _check_image_size(image_size, "ShapesDataset")
        self.cache_size = _check_int(cache_size, "cache_size", 0, "ShapesDataset")
        self._cache = OrderedDict()       # index -> (read-only image, caption), least recently used first
        self._lock = threading.Lock()

    def scene(self, index):
        """The Scene of item ``index``."""
        return _sample(_check_int(index, "index", 0, "ShapesDataset"), self.seed, "train", self.image_size)[0]

    def captions(self, indices):
        """The captions of ``indices`` without rendering (to train a tokenizer, say)."""
        return [self.scene(index).caption for index in indices]

    def _cached(self, index):
        with self._lock:
            item = self._cache.get(index)
            if item is not None:
                self._cache.move_to_end(index)
            return item

    def _remember(self, index, image, caption):
        """Cache an image that nobody else holds a writeable reference to."""
        image.flags.writeable = False
        with self._lock:
            self._cache[index] = (image, caption)
            self._cache.move_to_end(index)
            while len(self._cache) > self.cache_size:          # with cache_size 0, nothing stays
                self._cache.popitem(last=False)

    def __getitem__(self, index):
        index = _check_int(index, "index", 0, "ShapesDataset")
        item = self._cached(index)
        if item is None:
            drawn = self.scene(index)
            item = (render(drawn), drawn.caption)
            self._remember(index, *item)
        return item

    def batch(self, indices):
        """(images (n, H, W, 3) uint8, captions) of ``indices``, rendering only what the cache lacks."""
        indices = [_check_int(index, "index", 0, "ShapesDataset.batch") for index in indices]
        if not indices:
            raise ValueError("ShapesDataset.batch: indices is empty")
        images = numpy.empty((len(indices), self.image_size, self.image_size, 3), numpy.uint8)   # (n, H, W, 3)
        captions = []
        for image, index in zip(images, indices):
            item = self._cached(index)
            if item is None:
                drawn = self.scene(index)
                _paint(image, drawn)
                if self.cache_size:       # a copy: a view would keep the whole batch alive and writeable
                    self._remember(index, image.copy(), drawn.caption)
                captions.append(drawn.caption)
            else:
                image[...] = item[0]
                captions.append(item[1])
        return images, captions


def class_names():
    """Every colour × shape class, "red circle" first; a zero-shot label indexes this list."""
    return [f"{colour} {shape}" for colour, shape in _CLASSES]


def zeroshot_set(per_class=10, seed=0, image_size=64):
    """One-object held-out images, ``per_class`` of every class.

    Returns (images (n, H, W, 3) uint8, labels (n,) int64, class names). Item k
    shows class k mod len(class_names()), so a larger ``per_class`` extends a smaller one.
    """
    per_class = _check_int(per_class, "per_class", 1, "zeroshot_set")
    seed = _check_int(seed, "seed", 0, "zeroshot_set")
    image_size = _check_image_size(image_size, "zeroshot_set")
    count = per_class * len(_CLASSES)
    scenes = [_sample(index, seed, "zeroshot", image_size)[0] for index in range(count)]
    labels = numpy.arange(count, dtype=numpy.int64) % len(_CLASSES)
    return _render_all(scenes, image_size), labels, class_names()


def retrieval_set(n, seed=0, image_size=64):
    """``n`` held-out (image, caption) pairs drawn like training ones: (images (n, H, W, 3) uint8, captions)."""
    n = _check_int(n, "n", 1, "retrieval_set")
    seed = _check_int(seed, "seed", 0, "retrieval_set")
    image_size = _check_image_size(image_size, "retrieval_set")
    scenes = [_sample(index, seed, "retrieval", image_size)[0] for index in range(n)]
    return _render_all(scenes, image_size), [drawn.caption for drawn in scenes]


def relation_probe(n, seed=0, image_size=64):
    """``n`` held-out images of two objects side by side, each with a true, a swapped and two control captions.

    A model that sees the relation scores the true caption above the swapped
    one (chance: 50%); one that sees the objects scores ``control_true`` above
    ``control_false``. Good control accuracy with chance relation accuracy
    is what ReCLIP found for CLIP on synthetic CLEVR scenes.
    """
    n = _check_int(n, "n", 1, "relation_probe")
    seed = _check_int(seed, "seed", 0, "relation_probe")
    image_size = _check_image_size(image_size, "relation_probe")
    items = [_sample(index, seed, "relation", image_size) for index in range(n)]
    scenes = tuple(drawn for drawn, _ in items)
    return RelationProbe(images=_render_all(scenes, image_size),
                         true_captions=[drawn.caption for drawn in scenes],
                         swapped_captions=[extra[0] for _, extra in items],
                         control_true=[extra[1] for _, extra in items],
                         control_false=[extra[2] for _, extra in items],
                         scenes=scenes)
