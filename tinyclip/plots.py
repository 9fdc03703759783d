"""Pictures of a training run: loss and evaluation curves, the image–text similarity matrix, and the
confusion matrix of a zero-shot classification.

``plot_training`` draws what a run's metrics.jsonl holds: the training loss
over steps, and beside it every evaluation metric of ``tinyclip.evaluate``
over the steps where it was measured. ``plot_similarity`` draws the figure
of OpenAI's "Interacting with CLIP" notebook that shows what contrastive
training aims at (Radford et al. 2021): the cosine similarity of every image
with every caption, where a trained model lights up the diagonal.

matplotlib is optional (``pip install 'tinyclip[plot]'``) and imported only
when a picture is drawn; ``available()`` says whether it can be. Figures are
built on matplotlib's object API with the Agg canvas instead of pyplot, so
drawing one neither switches the backend of a program that has its own
windows open nor leaves figures behind in pyplot's global list. Files are
written atomically: a temporary PNG beside the target, then renamed over it,
so a reader never sees half a picture.
"""

import math
import numbers
import os
import tempfile

import numpy

from . import backend
from .evaluate import METRIC_PREFIXES

MISSING_MATPLOTLIB = "drawing pictures needs matplotlib: pip install 'tinyclip[plot]'"
MAX_SIMILARITY_PAIRS = 12    # beyond a dozen the captions and the numbers in the cells become unreadable


def available():
    """True when matplotlib can be imported, so the functions below can draw."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _new_figure(size):
    """A matplotlib Figure on the Agg canvas; an ImportError with the install command when there is no matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:     # missing, or present but broken (say why: a module shadowed by a local file)
        raise ImportError(f"{MISSING_MATPLOTLIB} (importing it failed: {error})") from None
    figure = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save_atomically(figure, path, dpi=100):
    """Write ``figure`` as a PNG at ``path`` through a temporary file in the same folder."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    descriptor, temporary = tempfile.mkstemp(dir=folder, prefix=".plot-", suffix=".png.tmp")
    try:
        with os.fdopen(descriptor, "wb") as stream:
            figure.savefig(stream, format="png", dpi=dpi)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


# ---- training curves --------------------------------------------------------------------------------------

def _finite_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _series(records, key):
    """(steps, values) of the records that have a finite number under ``key`` and an int step."""
    pairs = [(record["step"], record[key]) for record in records
             if isinstance(record.get("step"), numbers.Integral) and _finite_number(record.get(key))]
    return [step for step, _ in pairs], [value for _, value in pairs]


def plot_training(metrics_records, path):
    """Training loss (left) and evaluation metrics (right) over steps, written as a PNG at ``path``.

    ``metrics_records`` are dicts such as the lines of metrics.jsonl: each
    has "step", training records a "loss", evaluation records keys named as
    ``tinyclip.evaluate.evaluate`` returns them ("zeroshot_top1",
    "retrieval_i2t_r1", ...). Other keys are ignored. A "val_loss" (the
    loss on held-out pairs) is drawn beside the training loss. The loss axis
    is logarithmic when every loss is positive.
    """
    records = list(metrics_records)
    if not all(isinstance(record, dict) for record in records):
        raise ValueError("metrics_records must be dicts, such as the parsed lines of metrics.jsonl")
    loss_steps, losses = _series(records, "loss")
    if not losses:
        raise ValueError("metrics_records: no record has a \"step\" and a finite \"loss\"; nothing to plot")
    val_steps, val_losses = _series(records, "val_loss")
    metric_names = sorted({key for record in records for key in record
                           if key.startswith(METRIC_PREFIXES) and not key.endswith(("loss", "images", "captions"))})
    figure = _new_figure((12, 4.5))
    loss_axes, metric_axes = figure.subplots(1, 2)

    loss_axes.plot(loss_steps, losses, linewidth=1, label="training")
    if val_losses:
        loss_axes.plot(val_steps, val_losses, marker="o", markersize=3, label="validation")
        loss_axes.legend(fontsize="small")
    if min(losses + val_losses) > 0:
        loss_axes.set_yscale("log")
    loss_axes.set(title="training loss", xlabel="step", ylabel="loss")
    loss_axes.grid(True, which="both", alpha=0.3)

    for name in metric_names:
        steps, values = _series(records, name)
        metric_axes.plot(steps, values, marker="o", markersize=3, label=name)
    if metric_names:
        metric_axes.legend(fontsize="small", ncol=2)
    else:
        metric_axes.text(0.5, 0.5, "no evaluation yet", ha="center", va="center", transform=metric_axes.transAxes)
    metric_axes.set(title="evaluation", xlabel="step", ylabel="accuracy / recall", ylim=(-0.02, 1.02),
                    xlim=loss_axes.get_xlim())
    metric_axes.grid(True, alpha=0.3)
    _save_atomically(figure, path)


# ---- the similarity matrix ------------------------------------------------------------------------------

def _displayable(image):
    """An (H, W, 3) image as matplotlib shows it: uint8 as it is, floats stretched to [0, 1]."""
    if image.dtype == numpy.uint8:
        return image
    image = image.astype(numpy.float64)
    # preprocessed pixels are normalised per channel, so the original range is gone; stretching each image
    # to its own range shows its shapes and contrasts, if not its exact colours
    low, high = image.min(), image.max()
    return (image - low) / (high - low) if high > low else numpy.zeros_like(image)


def _unit_rows(rows, name):
    norms = numpy.linalg.norm(rows, axis=1, keepdims=True)
    if not (numpy.isfinite(norms).all() and (norms > 0).all()):
        raise ValueError(f"{name} has a zero or non-finite row: its cosine similarity is undefined")
    return rows / norms


def plot_similarity(image_emb, text_emb, images, captions, path):
    """The cosine similarity of the first (up to 12) images and captions, drawn as in CLIP's notebook.

    image_emb (N, D) and text_emb (N, D) are the embeddings of ``images``
    (N, H, W, 3; uint8, or floats that are shown stretched) and of
    ``captions`` (N str), where caption i describes image i. Rows are the
    captions, columns the images, shown as thumbnails above them; each cell
    holds its cosine similarity.
    """
    image_emb, text_emb, images = (backend.to_numpy(array.data if getattr(array, "is_tensor", False) else array)
                                   for array in (image_emb, text_emb, images))
    image_emb, text_emb = image_emb.astype(numpy.float64), text_emb.astype(numpy.float64)
    if isinstance(captions, str) or not all(isinstance(caption, str) for caption in captions):
        raise ValueError("captions must be a list of str")
    for array, name, ndim in ((image_emb, "image_emb", 2), (text_emb, "text_emb", 2), (images, "images", 4)):
        if array.ndim != ndim or array.shape[0] == 0:
            raise ValueError(f"{name} must be a non-empty {ndim}-D array, got shape {array.shape}")
    if images.shape[-1] != 3:
        raise ValueError(f"images must be (N, height, width, 3), got shape {images.shape}")
    counts = {"image_emb": len(image_emb), "text_emb": len(text_emb), "images": len(images), "captions": len(captions)}
    if len(set(counts.values())) != 1:
        raise ValueError(f"image_emb, text_emb, images and captions must have one entry per pair, got {counts}")
    if image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(f"image_emb and text_emb must have the same width, got {image_emb.shape[1]} and "
                         f"{text_emb.shape[1]}")

    pairs = min(len(captions), MAX_SIMILARITY_PAIRS)
    text_unit, image_unit = _unit_rows(text_emb[:pairs], "text_emb"), _unit_rows(image_emb[:pairs], "image_emb")
    similarity = text_unit @ image_unit.T                                       # (captions, images)

    figure = _new_figure((4 + 0.8 * pairs, 2 + 0.8 * pairs))   # inches: room for the captions on the left
    axes = figure.subplots()
    low, high = similarity.min(), similarity.max()
    picture = axes.imshow(similarity, cmap="viridis", vmin=low, vmax=high if high > low else low + 1e-6)
    middle = (low + high) / 2
    for row in range(pairs):
        for column in range(pairs):
            value = similarity[row, column]
            # dark text on the bright end of viridis, light text on the dark end
            axes.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=8,
                      color="black" if value > middle else "white")
    # the thumbnails sit in data coordinates in a band above row 0 (the y axis points down, as in an image)
    for column in range(pairs):
        axes.imshow(_displayable(images[column]), extent=(column - 0.5, column + 0.5, -0.6, -1.6))
    axes.set_xlim(-0.5, pairs - 0.5)
    axes.set_ylim(pairs - 0.5, -1.7)
    axes.set_xticks([])
    axes.set_yticks(range(pairs), captions[:pairs], fontsize=9)
    for side in ("left", "top", "right", "bottom"):
        axes.spines[side].set_visible(False)
    axes.set_title("cosine similarity")
    figure.colorbar(picture, ax=axes, shrink=0.6)
    _save_atomically(figure, path)


# ---- the confusion matrix -------------------------------------------------------------------------------

MAX_LABELLED_CLASSES = 40    # beyond this the class names on the axes overlap; the matrix is still drawn


def plot_confusion(confusion, class_names, path):
    """A zero-shot confusion matrix as a picture: row = true class, column = predicted, each row as fractions.

    ``confusion`` (C, C) non-negative counts (``evaluate.zeroshot_report``),
    ``class_names`` C str. Rows are divided by their totals, so a class with
    few images reads on the same scale as one with many; a row with no
    images stays 0. Class names label the axes up to 40 classes.
    """
    confusion = numpy.asarray(backend.to_numpy(confusion))
    if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1] or confusion.shape[0] == 0:
        raise ValueError(f"confusion must be a non-empty square (C, C) array, got shape {confusion.shape}")
    if not (numpy.isfinite(confusion).all() and (confusion >= 0).all()):
        raise ValueError("confusion must hold non-negative counts")
    classes = confusion.shape[0]
    if isinstance(class_names, str) or len(class_names) != classes:
        raise ValueError(f"class_names must be {classes} names, one per row of confusion")
    totals = confusion.sum(axis=1, keepdims=True)                               # (C, 1)
    fractions = numpy.divide(confusion, totals, out=numpy.zeros(confusion.shape), where=totals > 0)
    side = min(4 + 0.35 * classes, 30)
    figure = _new_figure((side + 1.5, side))
    axes = figure.subplots()
    picture = axes.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    if classes <= MAX_LABELLED_CLASSES:
        axes.set_xticks(range(classes), [str(name) for name in class_names], rotation=90, fontsize=8)
        axes.set_yticks(range(classes), [str(name) for name in class_names], fontsize=8)
    accuracy = numpy.trace(confusion) / max(confusion.sum(), 1)
    axes.set(xlabel="predicted class", ylabel="true class",
             title=f"zero-shot confusion (top-1 {accuracy:.3f}, {int(confusion.sum())} images)")
    figure.colorbar(picture, ax=axes, shrink=0.6, label="fraction of the true class")
    _save_atomically(figure, path)
