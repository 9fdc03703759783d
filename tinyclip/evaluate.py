"""Evaluation: zero-shot classification, image–text retrieval and a relation probe.

Zero-shot classification is the CLIP paper's (Radford et al. 2021, section
3.1): each class name is written into prompt templates ("a photo of a {}."),
and an image gets the class whose text embedding is most similar to its own.
Several templates are ensembled in embedding space (section 3.1.4): every
prompt embedding is L2-normalised, the class embedding is their mean,
normalised again, as open_clip's ``build_zero_shot_classifier`` does.

Retrieval recall@k is the zero-shot retrieval metric of the CLIP paper (and
of ``clip_benchmark``): image→text asks whether a caption of the image is
among the k captions most similar to it, text→image whether a caption's
image is among the k images most similar to it. An image may have several
captions (Flickr30k and MSCOCO have five): it counts as found when its
best-ranked caption is within the first k.

The relation probe follows ARO's Visual Genome Relation test (Yuksekgonul et
al. 2023, "When and why vision-language models behave like bags-of-words"):
the model must prefer "a circle left of a square" to "a square left of a
circle" for the same image. A control pair ("a circle and a square" versus
"a circle and a triangle") tells whether it sees the objects at all.

Scores are cosine similarities: every metric L2-normalises the embeddings it
is given, so features straight from ``encode_image(normalize=False)`` give
the same numbers as unit vectors. Ties are counted against the model
throughout (a wrong candidate that scores exactly as high as the right one
ranks before it), so a model whose embeddings have collapsed to one point
scores 0 at recall@1, not whatever some sort order happens to give.
Similarities are computed a block of ``chunk_size`` query rows at a time, so
memory grows as chunk_size × candidates, never candidates².

The metric functions take NumPy or CuPy arrays (or Tensors) and return
Python floats; ``encode_images``, ``encode_texts`` and ``evaluate`` run a
model over evaluation sets under ``no_grad`` in batches.
"""

import contextlib
import dataclasses
import string
import warnings

import numpy

from . import autograd, backend, losses
from .data import shapes, transforms
from .tokenizer import checked_texts

DEFAULT_TEMPLATES = ("a photo of a {}.",)   # the CLIP paper's default prompt
# the CLIP paper's 80 ImageNet prompts (its notebook "Prompt_Engineering_for_ImageNet", open_clip's
# OPENAI_IMAGENET_TEMPLATES), in their order
IMAGENET_TEMPLATES = (
    'a bad photo of a {}.', 'a photo of many {}.', 'a sculpture of a {}.', 'a photo of the hard to see {}.',
    'a low resolution photo of the {}.', 'a rendering of a {}.', 'graffiti of a {}.', 'a bad photo of the {}.',
    'a cropped photo of the {}.', 'a tattoo of a {}.', 'the embroidered {}.', 'a photo of a hard to see {}.',
    'a bright photo of a {}.', 'a photo of a clean {}.', 'a photo of a dirty {}.', 'a dark photo of the {}.',
    'a drawing of a {}.', 'a photo of my {}.', 'the plastic {}.', 'a photo of the cool {}.',
    'a close-up photo of a {}.', 'a black and white photo of the {}.', 'a painting of the {}.',
    'a painting of a {}.', 'a pixelated photo of the {}.', 'a sculpture of the {}.', 'a bright photo of the {}.',
    'a cropped photo of a {}.', 'a plastic {}.', 'a photo of the dirty {}.', 'a jpeg corrupted photo of a {}.',
    'a blurry photo of the {}.', 'a photo of the {}.', 'a good photo of the {}.', 'a rendering of the {}.',
    'a {} in a video game.', 'a photo of one {}.', 'a doodle of a {}.', 'a close-up photo of the {}.',
    'a photo of a {}.', 'the origami {}.', 'the {} in a video game.', 'a sketch of a {}.', 'a doodle of the {}.',
    'a origami {}.', 'a low resolution photo of a {}.', 'the toy {}.', 'a rendition of the {}.',
    'a photo of the clean {}.', 'a photo of a large {}.', 'a rendition of a {}.', 'a photo of a nice {}.',
    'a photo of a weird {}.', 'a blurry photo of a {}.', 'a cartoon {}.', 'art of a {}.', 'a sketch of the {}.',
    'a embroidered {}.', 'a pixelated photo of a {}.', 'itap of the {}.', 'a jpeg corrupted photo of the {}.',
    'a good photo of a {}.', 'a plushie {}.', 'a photo of the nice {}.', 'a photo of the small {}.',
    'a photo of the weird {}.', 'the cartoon {}.', 'art of the {}.', 'a drawing of the {}.',
    'a photo of the large {}.', 'a black and white photo of a {}.', 'the plushie {}.', 'a dark photo of a {}.',
    'itap of a {}.', 'graffiti of the {}.', 'a toy {}.', 'itap of my {}.', 'a photo of a cool {}.',
    'a photo of a small {}.', 'a tattoo of the {}.',
)
TEMPLATE_SETS = {"imagenet": IMAGENET_TEMPLATES}
RETRIEVAL_KS = (1, 5, 10)
# every metric name that evaluate() returns starts with one of these (plots.py picks them out of a metrics log)
METRIC_PREFIXES = ("zeroshot_", "retrieval_", "relation_", "control_", "val_")


# ---- checking and normalising inputs --------------------------------------------------------------------

def _unwrap(value):
    return value.data if getattr(value, "is_tensor", False) else value


def _unit_rows(xp, value, name):
    """A (rows, dim) array of real numbers, each row scaled to unit length; ValueErrors that name ``name``."""
    array = xp.asarray(_unwrap(value))
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (rows, embed_dim), got shape {tuple(array.shape)}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(array.shape)})")
    if array.dtype.kind not in "iuf":
        raise ValueError(f"{name} must hold real numbers, got dtype {array.dtype}")
    # float16 dot products would round many near scores to the same value, and ties count as misses
    array = array.astype(numpy.result_type(array.dtype, numpy.float32), copy=False)
    if not bool(xp.isfinite(array).all()):
        raise ValueError(f"{name} holds NaN or infinite values")
    norms = xp.linalg.norm(array, axis=1, keepdims=True)                       # (rows, 1)
    if not bool((norms > 0).all()):
        row = int(xp.argmin(norms[:, 0]))
        raise ValueError(f"{name}: row {row} is all zeros, so its cosine similarity is undefined")
    return array / norms


def _same_width(first, first_name, second, second_name):
    if first.shape[1] != second.shape[1]:
        raise ValueError(f"{first_name} and {second_name} must have the same embedding width, "
                         f"got {first.shape[1]} and {second.shape[1]}")


def _indices(xp, value, name, count, upper, upper_what):
    """A 1-D integer array of ``count`` entries in [0, upper)."""
    array = xp.asarray(_unwrap(value))
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of {count} integers, got shape {tuple(array.shape)}")
    if array.shape[0] != count:
        raise ValueError(f"{name} has {array.shape[0]} entries, expected {count}")
    if array.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integers, got dtype {array.dtype}")
    low, high = int(array.min()), int(array.max())
    if low < 0 or high >= upper:
        raise ValueError(f"{name}: index {low if low < 0 else high} is outside [0, {upper}) ({upper} {upper_what})")
    return array


def _cutoffs(ks, name):
    """A tuple of positive ints from an int or a sequence of them."""
    if isinstance(ks, (int, numpy.integer)) and not isinstance(ks, bool):
        ks = (ks,)
    elif isinstance(ks, (list, tuple)):
        ks = tuple(ks)
    else:
        raise ValueError(f"{name} must be a positive int or a non-empty sequence of them, got {ks!r}")
    if not ks or any(isinstance(k, bool) or not isinstance(k, (int, numpy.integer)) or k < 1 for k in ks):
        raise ValueError(f"{name} must be a positive int or a non-empty sequence of them, got {ks!r}")
    return tuple(int(k) for k in ks)


def _check_positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, numpy.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


# ---- ranks ------------------------------------------------------------------------------------------------

def _rank_of_positive(queries, candidates, positive, chunk_size):
    """For each query row, how many other candidates score at least as high as its one positive: (queries,) int."""
    xp = backend.get_array_module(queries)
    ranks = []
    for start in range(0, queries.shape[0], chunk_size):
        scores = queries[start:start + chunk_size] @ candidates.T                # (chunk, candidates)
        # the positive's score is read from the same product, not recomputed: a separate dot product
        # may round differently and turn a tie into a win or a loss
        positive_scores = scores[xp.arange(scores.shape[0]), positive[start:start + chunk_size]]   # (chunk,)
        # ">=" counts ties against the positive, and the positive itself once, hence the -1
        ranks.append((scores >= positive_scores[:, None]).sum(axis=1) - 1)
    return xp.concatenate(ranks)


def _rank_of_best_positive(queries, candidates, candidate_owner, chunk_size):
    """For each query row, how many negatives score at least as high as its best positive: (queries,) int.

    Candidate j is a positive of query ``candidate_owner[j]`` and a negative
    of every other query; every query has at least one positive.
    """
    xp = backend.get_array_module(queries)
    ranks = []
    for start in range(0, queries.shape[0], chunk_size):
        scores = queries[start:start + chunk_size] @ candidates.T                # (chunk, candidates)
        query_index = xp.arange(start, start + scores.shape[0])
        is_positive = candidate_owner[None, :] == query_index[:, None]           # (chunk, candidates)
        best_positive = xp.where(is_positive, scores, -xp.inf).max(axis=1)       # (chunk,)
        # other positives never count against the best one: any of them within the first k is a hit
        ranks.append(((scores >= best_positive[:, None]) & ~is_positive).sum(axis=1))
    return xp.concatenate(ranks)


def _recall(ranks, k):
    """The fraction of ranks below k (rank 0 is the top), as an exact Python float."""
    return int((ranks < k).sum()) / ranks.shape[0]


# ---- metrics on embeddings -------------------------------------------------------------------------------

def zeroshot_classifier(prompt_emb):
    """The class embeddings of a zero-shot classifier from its prompt embeddings: (classes, embed_dim).

    ``prompt_emb`` is (classes, templates, embed_dim), the embedding of each
    class name written into each template; (classes, embed_dim) means one
    template. Each prompt embedding is normalised, the templates averaged
    and the mean normalised again (the CLIP paper's ensembling, section 3.1.4).
    """
    xp = backend.get_array_module(prompt_emb)
    prompt_emb = xp.asarray(_unwrap(prompt_emb))
    if prompt_emb.ndim == 2:
        prompt_emb = prompt_emb[:, None, :]
    if prompt_emb.ndim != 3:
        raise ValueError(f"prompt_emb must be (classes, templates, embed_dim) or (classes, embed_dim), "
                         f"got shape {tuple(prompt_emb.shape)}")
    classes, templates, width = prompt_emb.shape
    unit_prompts = _unit_rows(xp, prompt_emb.reshape(classes * templates, width), "prompt_emb")
    mean = unit_prompts.reshape(classes, templates, width).mean(axis=1)         # (classes, embed_dim)
    return _unit_rows(xp, mean, "the template mean of prompt_emb")


def zeroshot_accuracy(image_emb, class_emb, labels, k=(1, 5), chunk_size=512):
    """Top-k accuracy of zero-shot classification: {"top1": ..., "top5": ...} for k = (1, 5).

    image_emb (N, D), class_emb (C, D) (see ``zeroshot_classifier``),
    labels (N,) ints in [0, C). An image is right at k when fewer than k
    other classes score at least as high as its true class (ties count as
    wrong). A k of C or more gives 1.0; the key still says the k asked for.
    """
    xp = backend.get_array_module(image_emb, class_emb, labels)
    image_emb = _unit_rows(xp, image_emb, "image_emb")
    class_emb = _unit_rows(xp, class_emb, "class_emb")
    _same_width(image_emb, "image_emb", class_emb, "class_emb")
    labels = _indices(xp, labels, "labels", image_emb.shape[0], class_emb.shape[0], "classes in class_emb")
    ks = _cutoffs(k, "k")
    _check_positive_int(chunk_size, "chunk_size")
    ranks = _rank_of_positive(image_emb, class_emb, labels, chunk_size)
    return {f"top{cutoff}": _recall(ranks, cutoff) for cutoff in ks}


def retrieval_recall(image_emb, text_emb, ks=(1, 5, 10), text_to_image=None, chunk_size=512):
    """Recall@k both ways: {"i2t_r1": ..., "i2t_r5": ..., "t2i_r1": ..., ...}.

    image_emb (N, D); text_emb (M, D). Without ``text_to_image``, text i is
    the caption of image i (M = N). With it, an (M,) int array, text j is a
    caption of image ``text_to_image[j]``; every image needs at least one.
    Image→text: an image is found at k when fewer than k captions of other
    images score at least as high as its best caption. Text→image: a caption
    is found at k when fewer than k other images score at least as high as
    its own. Ties count as misses.
    """
    xp = backend.get_array_module(image_emb, text_emb, text_to_image)
    image_emb = _unit_rows(xp, image_emb, "image_emb")
    text_emb = _unit_rows(xp, text_emb, "text_emb")
    _same_width(image_emb, "image_emb", text_emb, "text_emb")
    images, texts = image_emb.shape[0], text_emb.shape[0]
    if text_to_image is None:
        if texts != images:
            raise ValueError(f"image_emb has {images} rows and text_emb {texts}: paired rows need as many of each "
                             f"(or give text_to_image for several captions per image)")
        text_to_image = xp.arange(texts)
    else:
        text_to_image = _indices(xp, text_to_image, "text_to_image", texts, images, "images in image_emb")
        captions_per_image = xp.bincount(text_to_image, minlength=images)
        if not bool((captions_per_image > 0).all()):
            raise ValueError(f"text_to_image gives image {int(xp.argmin(captions_per_image))} no caption; "
                             f"every image needs at least one")
    ks = _cutoffs(ks, "ks")
    _check_positive_int(chunk_size, "chunk_size")
    image_ranks = _rank_of_best_positive(image_emb, text_emb, text_to_image, chunk_size)   # (N,)
    text_ranks = _rank_of_positive(text_emb, image_emb, text_to_image, chunk_size)         # (M,)
    recalls = {f"i2t_r{k}": _recall(image_ranks, k) for k in ks}
    recalls.update({f"t2i_r{k}": _recall(text_ranks, k) for k in ks})
    return recalls


def relation_accuracy(image_emb, true_text_emb, swapped_text_emb):
    """The fraction of images more similar to their true caption than to the swapped one.

    Row i of each array belongs to image i. Only a strictly greater
    similarity counts: a tie is wrong, since a model that cannot tell the
    captions apart has not read the relation. Chance is 0.5.
    """
    xp = backend.get_array_module(image_emb, true_text_emb, swapped_text_emb)
    image_emb = _unit_rows(xp, image_emb, "image_emb")
    true_text_emb = _unit_rows(xp, true_text_emb, "true_text_emb")
    swapped_text_emb = _unit_rows(xp, swapped_text_emb, "swapped_text_emb")
    for text_emb, name in ((true_text_emb, "true_text_emb"), (swapped_text_emb, "swapped_text_emb")):
        _same_width(image_emb, "image_emb", text_emb, name)
        if text_emb.shape[0] != image_emb.shape[0]:
            raise ValueError(f"{name} has {text_emb.shape[0]} rows, image_emb {image_emb.shape[0]}: "
                             f"one caption per image is needed")
    true_scores = (image_emb * true_text_emb).sum(axis=1)                        # (N,) cosines, row by row
    swapped_scores = (image_emb * swapped_text_emb).sum(axis=1)
    return int((true_scores > swapped_scores).sum()) / image_emb.shape[0]


# ---- running a model ------------------------------------------------------------------------------------

@contextlib.contextmanager
def _inference(model):
    """No graph and eval mode inside the block; afterwards every module's own mode again (a locked tower stays in
    eval mode while the rest trains)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with autograd.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


def _model_placement(model):
    """(backend name, dtype) of the model's parameters: inputs are moved there before encoding."""
    return backend.backend_of(model.log_scale.data), model.log_scale.data.dtype


def encode_images(model, images, batch_size=256):
    """Unit-length image embeddings (n, embed_dim), on the model's backend.

    ``images`` is (n, H, W, 3): uint8 pixels are normalised with the mean and
    standard deviation of the model's family (CLIP or SigLIP), floats are
    taken as already preprocessed. Runs under ``no_grad`` in eval mode,
    ``batch_size`` images at a time.
    """
    images = _unwrap(images)
    if not hasattr(images, "shape") or len(images.shape) != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be an array (n, height, width, 3), got "
                         f"{tuple(images.shape) if hasattr(images, 'shape') else type(images).__name__}")
    if images.shape[0] == 0:
        raise ValueError("images is empty: nothing to encode")
    if images.dtype != numpy.uint8 and images.dtype.kind != "f":
        raise ValueError(f"images must be uint8 pixels or preprocessed floats, got dtype {images.dtype}")
    _check_positive_int(batch_size, "batch_size")
    backend_name, dtype = _model_placement(model)
    embeddings = []
    with _inference(model):
        for start in range(0, images.shape[0], batch_size):
            # uint8 crosses to the GPU at a quarter of the size of float32 and is normalised there
            batch = transforms.model_input(images[start:start + batch_size], model.config.image_normalization,
                                           backend_name, dtype)                           # (b, H, W, 3)
            embeddings.append(model.encode_image(batch).data)
    return backend.backend_module(backend_name).concatenate(embeddings)


def encode_texts(model, tokenizer, texts, batch_size=256, context_length=None):
    """Unit-length text embeddings (n, embed_dim), on the model's backend.

    Texts are tokenised ``batch_size`` at a time to ``context_length`` tokens
    (default: the model's) and encoded under ``no_grad`` in eval mode.
    """
    texts = checked_texts(texts)
    if not texts:
        raise ValueError("texts is empty: nothing to encode")
    _check_positive_int(batch_size, "batch_size")
    context_length = model.config.context_length if context_length is None else context_length
    backend_name, _ = _model_placement(model)
    embeddings = []
    with _inference(model):
        for start in range(0, len(texts), batch_size):
            tokens = backend.asarray(tokenizer(texts[start:start + batch_size], context_length=context_length),
                                     backend_name)                                 # (b, context_length)
            embeddings.append(model.encode_text(tokens).data)
    return backend.backend_module(backend_name).concatenate(embeddings)


def check_template(template):
    """``template`` itself if it is a str with exactly one replacement field, an empty ``{}``; else a ValueError.

    "a photo of a {}." passes; "a {} and {}", "a {name}" and an unmatched brace
    do not (literal braces are written ``{{`` and ``}}``, as in str.format).
    """
    if not isinstance(template, str):
        raise ValueError(f"a prompt template must be a str, got {type(template).__name__}")
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)
                  if name is not None]
    except ValueError:                  # an unmatched { or }
        fields = None
    if fields != [("", "", None)]:
        raise ValueError(f"prompt template {template!r} must contain exactly one {{}} for the class name "
                         f"(write {{{{ and }}}} for literal braces)")
    return template


def _checked_templates(templates):
    templates = (templates,) if isinstance(templates, str) else tuple(templates)
    if not templates:
        raise ValueError("templates is empty: give at least one prompt template with a {} for the class name")
    return tuple(check_template(template) for template in templates)


def encode_classes(model, tokenizer, class_names, templates=DEFAULT_TEMPLATES, batch_size=256):
    """The zero-shot class embeddings (classes, embed_dim): every class name in every template, ensembled."""
    class_names = checked_texts(class_names)
    if not class_names:
        raise ValueError("class_names is empty: a classifier needs at least one class")
    templates = _checked_templates(templates)
    prompts = [template.format(name) for name in class_names for template in templates]
    _warn_of_classes_cut_alike(tokenizer, prompts, class_names, len(templates), model.config.context_length)
    prompt_emb = encode_texts(model, tokenizer, prompts, batch_size)           # (classes · templates, D)
    return zeroshot_classifier(prompt_emb.reshape(len(class_names), len(templates), -1))


def _warn_of_classes_cut_alike(tokenizer, prompts, class_names, templates, context_length):
    """Warn when classes' prompts are the same tokens once cut to the context: their scores are then the same,
    whatever the image (a tiny model's 8 tokens hold "a photo of a" and nothing of the class name)."""
    tokens = tokenizer(prompts, context_length=context_length).reshape(len(class_names), -1)  # (classes, templates·T)
    _, first, inverse = numpy.unique(tokens, axis=0, return_index=True, return_inverse=True)
    alike = [(class_names[first[group]], name) for name, group in zip(class_names, inverse.reshape(-1))
             if class_names[first[group]] != name]
    if alike:
        pairs = ", ".join(f"{a!r} = {b!r}" for a, b in alike[:3]) + (" ..." if len(alike) > 3 else "")
        warnings.warn(f"{len(alike)} class name{'s' if len(alike) > 1 else ''} give the same prompt tokens as "
                      f"another ({pairs}) once cut to the model's {context_length}-token context, so they get the "
                      f"same scores (a shorter template, e.g. '{{}}', or a longer context_length keeps them apart)", stacklevel=3)


# ---- evaluation sets and the whole evaluation -------------------------------------------------------------

def _check_count(values, name, expected, expected_name):
    if len(values) != expected:
        raise ValueError(f"{name} has {len(values)} entries but {expected_name} has {expected}")


@dataclasses.dataclass
class ZeroShotSet:
    """Images with class labels, scored against prompts made from the class names."""

    images: object                          # (N, H, W, 3) uint8 pixels or preprocessed floats
    labels: object                          # (N,) int, an index into class_names
    class_names: list                       # the class names written into the templates
    templates: tuple = DEFAULT_TEMPLATES    # prompts with {} for the class name, ensembled

    def __post_init__(self):
        self.templates = _checked_templates(self.templates)
        _check_count(self.labels, "ZeroShotSet.labels", len(self.images), "images")


@dataclasses.dataclass
class RetrievalSet:
    """Images and their captions, retrieved from each other."""

    images: object                          # (N, H, W, 3) uint8 pixels or preprocessed floats
    captions: list                          # (M,) str
    text_to_image: object = None            # (M,) int: the image caption j describes; None: caption i ↔ image i

    def __post_init__(self):
        if self.text_to_image is None:
            _check_count(self.captions, "RetrievalSet.captions", len(self.images), "images")
        else:
            _check_count(self.text_to_image, "RetrievalSet.text_to_image", len(self.captions), "captions")


@dataclasses.dataclass
class RelationSet:
    """Images each with a true and a swapped caption of one relation, and optionally a control pair."""

    images: object                          # (N, H, W, 3) uint8 pixels or preprocessed floats
    true_captions: list                     # (N,) the relation as drawn: "a red circle left of a blue square"
    swapped_captions: list                  # (N,) its objects swapped: "a blue square left of a red circle"
    control_true: list = None               # (N,) optional: the objects only, "a red circle and a blue square"
    control_false: list = None              # (N,) with one object not in the image: "... and a green triangle"

    def __post_init__(self):
        if (self.control_true is None) != (self.control_false is None):
            raise ValueError("RelationSet: give both control_true and control_false, or neither")
        for name in ("true_captions", "swapped_captions", "control_true", "control_false"):
            if getattr(self, name) is not None:
                _check_count(getattr(self, name), f"RelationSet.{name}", len(self.images), "images")


def evaluate(model, tokenizer, zeroshot=None, retrieval=None, relation=None, batch_size=256):
    """Every metric of the sets given, in one flat dict of Python floats.

    Keys: ``zeroshot_top1``, ``zeroshot_top5`` (a ZeroShotSet);
    ``retrieval_i2t_r{1,5,10}``, ``retrieval_t2i_r{1,5,10}`` (a RetrievalSet);
    ``relation_acc`` and, when the set has control captions, ``control_acc``
    (a RelationSet).
    """
    for value, name, kind in ((zeroshot, "zeroshot", ZeroShotSet), (retrieval, "retrieval", RetrievalSet),
                              (relation, "relation", RelationSet)):
        if value is not None and not isinstance(value, kind):
            raise TypeError(f"evaluate: {name} must be a {kind.__name__} or None, got {type(value).__name__}")
    if zeroshot is None and retrieval is None and relation is None:
        raise ValueError("evaluate: give at least one of zeroshot, retrieval, relation")
    metrics = {}
    if zeroshot is not None:
        class_emb = encode_classes(model, tokenizer, zeroshot.class_names, zeroshot.templates, batch_size)
        image_emb = encode_images(model, zeroshot.images, batch_size)
        accuracy = zeroshot_accuracy(image_emb, class_emb, zeroshot.labels)
        metrics.update({f"zeroshot_{name}": value for name, value in accuracy.items()})
    if retrieval is not None:
        image_emb = encode_images(model, retrieval.images, batch_size)
        text_emb = encode_texts(model, tokenizer, retrieval.captions, batch_size)
        recall = retrieval_recall(image_emb, text_emb, text_to_image=retrieval.text_to_image)
        metrics.update({f"retrieval_{name}": value for name, value in recall.items()})
    if relation is not None:
        image_emb = encode_images(model, relation.images, batch_size)

        def texts(captions):
            return encode_texts(model, tokenizer, captions, batch_size)

        metrics["relation_acc"] = relation_accuracy(image_emb, texts(relation.true_captions),
                                                    texts(relation.swapped_captions))
        if relation.control_true is not None:
            metrics["control_acc"] = relation_accuracy(image_emb, texts(relation.control_true),
                                                       texts(relation.control_false))
    return metrics


# ---- your own data: image files, class folders, captions, a linear probe -------------------------------

def encode_image_files(model, images, batch_size=64, load=None):
    """Unit-length embeddings (n, embed_dim) of image files (or PIL images), on the model's backend.

    Each image is resized and centre-cropped to the model's image size and
    normalised for its family (``transforms.preprocess``, as CLIP evaluates),
    ``batch_size`` at a time, so memory holds one batch of pixels, never
    the whole set. With ``load``, ``images`` are keys that ``load(key)``
    turns into PIL images (a caption set's ``read_image`` and its indices).
    A file that cannot be read is a ValueError naming it.
    """
    images = list(images)
    if not images:
        raise ValueError("images is empty: nothing to encode")
    _check_positive_int(batch_size, "batch_size")
    size, family = model.config.image_size, model.config.image_normalization
    load = load or (lambda image: image)
    chunks = [encode_images(model, numpy.stack([transforms.preprocess(load(image), size, family)
                                                for image in images[start:start + batch_size]]), batch_size)
              for start in range(0, len(images), batch_size)]
    return backend.get_array_module(chunks[0]).concatenate(chunks)


def resolve_templates(templates=None, template_set=None):
    """The prompt templates of ``--template`` (a list) and ``--templates NAME`` (a key of TEMPLATE_SETS) together,
    in that order; DEFAULT_TEMPLATES when neither is given."""
    chosen = list(templates or ())
    if template_set is not None:
        if template_set not in TEMPLATE_SETS:
            raise ValueError(f"no template set {template_set!r}; the sets are {sorted(TEMPLATE_SETS)}")
        chosen += TEMPLATE_SETS[template_set]
    return _checked_templates(chosen or DEFAULT_TEMPLATES)


def zeroshot_report(image_emb, class_emb, labels, class_names, k=(1, 5), chunk_size=512):
    """Zero-shot accuracy in detail: {"top1", "top5", ..., "per_class", "confusion"}.

    Arguments as ``zeroshot_accuracy``, and ``class_names`` (C,). Adds
    ``per_class``: {class name: top-1 accuracy over its images} for every
    class that has images, and ``confusion``: (C, C) int64 NumPy counts,
    row = true class, column = predicted class. Ties count as wrong here too:
    an image whose true class only ties for the best score is put in the
    column of the other best class, so the diagonal sums to top1 · N.
    """
    xp = backend.get_array_module(image_emb, class_emb, labels)
    unit_images = _unit_rows(xp, image_emb, "image_emb")
    unit_classes = _unit_rows(xp, class_emb, "class_emb")
    if len(class_names) != unit_classes.shape[0]:
        raise ValueError(f"class_names has {len(class_names)} names but class_emb {unit_classes.shape[0]} rows")
    report = zeroshot_accuracy(unit_images, unit_classes, labels, k, chunk_size)
    labels = backend.to_numpy(xp.asarray(_unwrap(labels))).astype(numpy.int64)
    classes = unit_classes.shape[0]
    predicted = []
    for start in range(0, unit_images.shape[0], chunk_size):
        scores = backend.to_numpy(unit_images[start:start + chunk_size] @ unit_classes.T)   # (chunk, C)
        rows = numpy.arange(scores.shape[0])
        truth = labels[start:start + chunk_size]
        beaten = (scores >= scores[rows, truth][:, None]).sum(axis=1) > 1        # another class ties or wins
        others = scores.copy()
        others[rows, truth] = -numpy.inf
        predicted.append(numpy.where(beaten, others.argmax(axis=1), truth))
    predicted = numpy.concatenate(predicted)
    confusion = numpy.zeros((classes, classes), dtype=numpy.int64)
    numpy.add.at(confusion, (labels, predicted), 1)
    counts = confusion.sum(axis=1)
    report["per_class"] = {str(class_names[c]): int(confusion[c, c]) / int(counts[c])
                           for c in range(classes) if counts[c]}
    report["confusion"] = confusion
    return report


def class_folder_zeroshot(model, tokenizer, classes, templates=DEFAULT_TEMPLATES, batch_size=64):
    """Zero-shot on an ``ImageClasses`` folder: (``zeroshot_report`` with "images" and "classes" counts, image_emb).

    The image embeddings come back (NumPy) so that a linear probe can reuse them.
    """
    class_emb = encode_classes(model, tokenizer, classes.class_names, templates, batch_size)
    image_emb = backend.to_numpy(encode_image_files(model, classes.paths, batch_size))
    report = zeroshot_report(image_emb, backend.to_numpy(class_emb), classes.labels, classes.class_names)
    return {"images": len(classes), "classes": len(classes.class_names), **report}, image_emb


def caption_retrieval(model, tokenizer, pairs, ks=RETRIEVAL_KS, batch_size=64):
    """Recall@k both ways on a caption set (``tinyclip.data.captions``), captions grouped by image path.

    Returns {"images", "captions", "image_to_text_recall@1", ...,
    "text_to_image_recall@1", ...} and the embeddings
    (image_emb (images, D), text_emb (captions, D), text_to_image (captions,))
    on the model's backend. Rows naming the same image file are one image
    with several captions, found by image→text at k when any of them ranks
    within the first k (``retrieval_recall``).
    """
    paths, text_to_image = pairs.grouped_by_image()
    first_caption = numpy.unique(text_to_image, return_index=True)[1]            # (images,): a pair of each image
    # read_image, not the path: the images of tar shards are no files of their own
    image_emb = encode_image_files(model, first_caption.tolist(), batch_size, load=pairs.read_image)
    text_emb = encode_texts(model, tokenizer, [pairs.caption(i) for i in range(len(pairs))], batch_size)
    xp = backend.get_array_module(image_emb)
    recall = retrieval_recall(image_emb, text_emb, ks, text_to_image=xp.asarray(text_to_image))
    metrics = {"images": len(paths), "captions": len(pairs)}
    metrics.update({f"image_to_text_recall@{k}": recall[f"i2t_r{k}"] for k in _cutoffs(ks, "ks")})
    metrics.update({f"text_to_image_recall@{k}": recall[f"t2i_r{k}"] for k in _cutoffs(ks, "ks")})
    return metrics, (image_emb, text_emb, text_to_image)


def fit_logistic_regression(features, labels, classes, regularization=1.0, tolerance=1e-6, max_iterations=20000):
    """Multinomial logistic regression by accelerated gradient descent: (weights (D, C), bias (C,)), NumPy float64.

    Minimises scikit-learn's objective ``C · Σ_i cross_entropy_i + ½‖W‖²``
    (divided by C·n: the mean cross-entropy + ‖W‖² / (2·C·n)), the bias not
    penalised, with ``regularization`` as C. The objective is smooth with
    gradient Lipschitz constant at most ½·σ_max([X 1])²/n + 1/(C·n) (the
    softmax cross-entropy's Hessian in the logits is at most ½·I), so
    Nesterov's method with step 1/L converges; it restarts whenever the
    objective rises, and stops when the gradient's largest entry is below
    ``tolerance``. Raises ValueError for labels outside [0, classes).
    """
    features = numpy.asarray(features, dtype=numpy.float64)
    labels = numpy.asarray(labels)
    count, width = features.shape
    if labels.shape != (count,) or labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() >= classes:
        raise ValueError(f"labels must be ({count},) ints in [0, {classes}), got {labels.dtype} {labels.shape}")
    design = numpy.hstack([features, numpy.ones((count, 1))])                  # (n, D + 1): the bias column
    onehot = numpy.eye(classes)[labels]                                        # (n, C)
    penalty = numpy.ones((width + 1, 1))
    penalty[-1] = 0                                                            # the bias is not penalised
    decay = 1.0 / (regularization * count)

    def objective_and_gradient(params):
        logits = design @ params                                               # (n, C)
        logits -= logits.max(axis=1, keepdims=True)
        log_probs = logits - numpy.log(numpy.exp(logits).sum(axis=1, keepdims=True))
        value = -(onehot * log_probs).sum() / count + 0.5 * decay * ((penalty * params) ** 2).sum()
        gradient = design.T @ (numpy.exp(log_probs) - onehot) / count + decay * penalty * params
        return value, gradient

    step = 1.0 / (0.5 * numpy.linalg.norm(design, 2) ** 2 / count + decay)
    params = numpy.zeros((width + 1, classes))
    lookahead, momentum_params, t = params, params, 1.0
    value, _ = objective_and_gradient(params)
    for _ in range(max_iterations):
        _, gradient = objective_and_gradient(lookahead)
        if numpy.abs(gradient).max() < tolerance:
            params = lookahead
            break
        new_params = lookahead - step * gradient
        new_value, _ = objective_and_gradient(new_params)
        if new_value > value:                  # restart the momentum (O'Donoghue & Candès 2015)
            lookahead, t = params, 1.0
            continue
        new_t = (1 + (1 + 4 * t * t) ** 0.5) / 2
        lookahead = new_params + (t - 1) / new_t * (new_params - params)
        params, value, t = new_params, new_value, new_t
    return params[:-1], params[-1]


def linear_probe(train_emb, train_labels, test_emb, test_labels, classes, regularization=1.0, use_sklearn=None):
    """Test accuracy of a logistic regression fit on frozen embeddings (the CLIP paper's linear probe, §3.2).

    Embeddings are L2-normalised first. ``use_sklearn`` None: scikit-learn's
    ``LogisticRegression`` (L-BFGS, C = ``regularization``) when it is
    installed (``pip install 'tinyclip[probe]'``), else
    ``fit_logistic_regression``, which minimises the same objective; True or
    False forces one. Returns (accuracy, "scikit-learn" or "tinyclip").
    """
    train_x = backend.to_numpy(_unit_rows(numpy, backend.to_numpy(_unwrap(train_emb)), "train_emb"))
    test_x = backend.to_numpy(_unit_rows(numpy, backend.to_numpy(_unwrap(test_emb)), "test_emb"))
    _same_width(train_x, "train_emb", test_x, "test_emb")
    train_y = _indices(numpy, numpy.asarray(train_labels), "train_labels", train_x.shape[0], classes, "classes")
    test_y = _indices(numpy, numpy.asarray(test_labels), "test_labels", test_x.shape[0], classes, "classes")
    if use_sklearn is None:
        try:
            import sklearn.linear_model  # noqa: F401
            use_sklearn = True
        except ImportError:
            use_sklearn = False
    if use_sklearn:
        from sklearn.linear_model import LogisticRegression
        fitted = LogisticRegression(C=regularization, max_iter=5000, tol=1e-8).fit(train_x, train_y)
        predicted = fitted.predict(test_x)
        return int((predicted == test_y).sum()) / len(test_y), "scikit-learn"
    weights, bias = fit_logistic_regression(train_x, train_y, classes, regularization)
    predicted = (test_x @ weights + bias).argmax(axis=1)
    return int((predicted == test_y).sum()) / len(test_y), "tinyclip"


def caption_validation(model, tokenizer, pairs, loss="siglip", batch_size=128, ks=RETRIEVAL_KS, encode_batch=64):
    """Validation on held-out pairs: {"val_loss", "val_images", "val_captions", "val_image_to_text_recall@1", ...}.

    Recall as ``caption_retrieval``. ``val_loss`` is the training loss
    (``loss``: "siglip" or "clip", with the model's log_scale and bias) on
    batches of ``batch_size`` images in first-appearance order, each with
    its first caption (two captions of one image in a batch would be
    scored as a negative pair), averaged over the batches; a last, smaller
    batch is dropped when there is a full one, as in training, so that
    every batch has the loss's scale.
    """
    if loss not in ("siglip", "clip"):
        raise ValueError(f"loss must be 'siglip' or 'clip', got {loss!r}")
    _check_positive_int(batch_size, "batch_size")
    metrics, (image_emb, text_emb, text_to_image) = caption_retrieval(model, tokenizer, pairs, ks, encode_batch)
    first_caption = numpy.unique(text_to_image, return_index=True)[1]            # (images,) in image order
    images = image_emb.shape[0]
    starts = range(0, max(images - batch_size, 0) + 1, batch_size)
    batch_losses = []
    with autograd.no_grad():
        for start in starts:
            image_batch = image_emb[start:start + batch_size]
            text_batch = text_emb[backend.get_array_module(text_emb).asarray(first_caption[start:start + batch_size])]
            if loss == "siglip":
                value = losses.siglip_loss(image_batch, text_batch, model.log_scale, model.bias)
            else:
                value = losses.clip_loss(image_batch, text_batch, model.log_scale)
            batch_losses.append(float(value.item()))
    return {"val_loss": sum(batch_losses) / len(batch_losses),
            **{f"val_{key}": value for key, value in metrics.items()}}


def shapes_sets(per_class, pairs, image_size):
    """The held-out shapes sets as ``evaluate`` takes them: zero-shot over every colour × shape class
    (``per_class`` images each), retrieval over ``pairs`` pairs, and the relation probe on ``pairs`` images."""
    images, labels, names = shapes.zeroshot_set(per_class, seed=0, image_size=image_size)
    probe = shapes.relation_probe(pairs, seed=0, image_size=image_size)
    return {"zeroshot": ZeroShotSet(images, labels, names, templates=shapes.ZEROSHOT_TEMPLATES),
            "retrieval": RetrievalSet(*shapes.retrieval_set(pairs, seed=0, image_size=image_size)),
            "relation": RelationSet(probe.images, probe.true_captions, probe.swapped_captions,
                                    probe.control_true, probe.control_false)}
