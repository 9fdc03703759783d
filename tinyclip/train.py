"""The training loop: CLIP or SigLIP on one process or data-parallel under MPI, resumable bit for bit.

One step (the recipe of the CLIP paper, §2.5, and of SigLIP, Zhai et al.
2023, §3): encode this rank's share of the global batch, take the
distributed loss (``tinyclip.distributed``: the SigLIP chunked ring, or
CLIP's ring/gather softmax; with one process they are ``tinyclip.losses``),
back-propagate, sum the gradients over the ranks, clip their global norm,
step AdamW (no weight decay on gains, biases, embeddings and the
temperature), advance the warm-up + cosine schedule, and for the CLIP loss
cap the scale at 100 (t' ≤ log 100, as the CLIP paper does "to prevent
training instability").

A run writes into one folder (``TrainConfig.out``; ``tinyclip.runs`` makes, locks and logs into it)::

    train_config.json        the TrainConfig
    metrics.jsonl            one JSON line per logged step and per evaluation
    checkpoint/              step-NNNNNNNN/ folders (the newest ``keep_checkpoints``) and ``latest``
                             (tinyclip.checkpoint.save_training_checkpoint)
    model/                   the final model (tinyclip.checkpoint format) with its tokenizer
    summary.json             final metrics, loss, steps, seconds and skipped examples; written last, it
                             marks the run finished
    loss.png, similarity.png pictures of the run (when matplotlib is installed)
    .lock                    the PID of the process training into the folder (locked while it runs)

Checkpoints hold everything a step depends on: weights, AdamW moments,
the schedule, the data position (``Loader.state()``) and the tokenizer.
Nothing else in a step is random (the shapes data draws example i from i
itself; augmentation is seeded per example and epoch by the loader), so a
run resumed from step k on the same machine gives the losses of an
uninterrupted run bit for bit. Every file and folder appears whole or not
at all (tinyclip.checkpoint's staged writes), so a kill at any instant
leaves the last complete checkpoint for ``--resume``.

Faults (docs/faults.md): everything is checked before the run folder is
created; a non-finite loss, gradient or embedding ends the run with
``NonFiniteLoss`` before the weights are touched, the last good checkpoint
kept. SIGINT (Ctrl-C) and SIGTERM (what schedulers send before they kill)
let the current step finish, save a checkpoint and return with
``interrupted``; under MPI the ranks agree on stopping through the same
all-reduce that sums the loss, so none is left waiting. A second signal
stops at once.
"""

import dataclasses
import datetime
import functools
import json
import math
import os
import sys
import time

import numpy

from . import backend, checkpoint, distributed, evaluate, hub, losses, nn, optim, runs
from .data import shapes
from .data import shards
from .data.loader import BatchOrder, Loader
from .data.transforms import model_input, random_resized_crop
from .models import CLIP, PRESETS, preset
from .models.config import CLIP_INIT_LOG_SCALE, SIGLIP_INIT_BIAS, SIGLIP_INIT_LOG_SCALE, VISION_FIELDS
from .tokenizer import TOKENIZER_FILES, Tokenizer, find_tokenizer


MIN_VOCAB_SIZE = 514
SUMMARY_KEYS = ("zeroshot_top1", "retrieval_i2t_r1", "retrieval_t2i_r1", "relation_acc", "control_acc",
                "final_loss", "steps", "examples_seen", "seconds", "skipped_examples")
VAL_SEED = 0    # which images --val-fraction holds out: fixed, so that every run on the same data holds out the same
NAMED_SKIPS = 5                    # skipped examples named in messages and metrics

# the choices of the configuration's string fields (the command line lists them)
CHOICES = {"preset": tuple(PRESETS), "loss": ("siglip", "clip"), "clip_method": ("ring", "gather"),
           "dtype": ("float32", "float64"), "negatives": losses.NEGATIVE_CHOICES}
# dtypes asked for that training cannot use yet, and what to do instead
REFUSED_DTYPES = {
    "float16": "float16 training needs loss scaling and float32 master weights, which tinyclip does not have "
               "yet (without them the gradients underflow: in 5 steps every image embedding became the same); "
               "train in float32",
    "bfloat16": "NumPy has no bfloat16 arithmetic (tinyclip reads bfloat16 checkpoints as float32); train in "
                "float32",
}
# fields a resumed run may change: how often it logs, evaluates and saves, and where, not what a step computes
CHANGEABLE_ON_RESUME = ("out", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "eval_per_class",
                        "eval_pairs", "plots", "workers")


@dataclasses.dataclass
class TrainConfig:
    # --- model and loss ----------------------------------------------------------------------------
    preset: str = "shapes"           # model preset (tinyclip.models.PRESETS); vocab_size / eos_id follow the tokenizer
    model_overrides: dict = dataclasses.field(default_factory=dict)   # CLIPConfig fields to replace
    loss: str | None = None          # sigmoid loss with a bias (SigLIP) or softmax loss (CLIP) (None: the --init model's family, else siglip)
    clip_method: str = "ring"        # how the CLIP loss runs over MPI ranks (same numbers either way)
    keep_negatives: float = 1.0      # SigLIP loss, one process: the fraction of each row's negatives kept (1: all)
    negatives: str = "random"        # which negatives keep_negatives keeps: random, hard (highest logits) or easy
    dtype: str = "float32"           # parameter dtype (float64 for exact checks)
    image_tower: str | None = None   # a model folder (tinyclip's or Hugging Face's) whose image tower to start from
    lock_image: bool = False         # LiT (Zhai et al. 2022): keep that image tower fixed, train the text tower
    init: str | None = None          # fine-tune this whole model (tinyclip/Hugging Face/open_clip folder) + tokenizer
    lock_text: bool = False          # keep the text tower fixed, its projection included (with init)
    seed: int = 0                    # model initialisation and data order
    # --- data ------------------------------------------------------------------------------------
    data: str | None = None          # a CSV/TSV of images and captions, a folder of images + .txt, or tar shards ('shards/s-{0..9}.tar') (None: shapes)
    image_column: str = "filepath"   # CSV/TSV column with image paths
    caption_column: str = "title"    # CSV/TSV column with captions
    strict: bool = False             # a missing or unreadable image is an error instead of a warning
    examples: int | None = None      # use only the first N examples (None: all; shapes are unlimited)
    tokenizer_captions: int = 4000   # captions the BPE tokenizer is trained on
    # --- validation and loading ------------------------------------------------------------------
    val_data: str | None = None      # held-out pairs (CSV/TSV, folder or shards) evaluated every eval_every steps
    val_fraction: float = 0.0        # hold out this fraction of --data's images (always the same ones) to validate on
    workers: int = 1                 # loader processes decoding images (1: the loader's own thread)
    # --- optimisation ----------------------------------------------------------------------------
    steps: int = 700                 # optimiser steps in the whole run (~6 min on 2 CPU cores at the defaults)
    batch_size: int = 128            # global batch over all ranks
    lr: float = 2e-3                 # peak learning rate
    min_lr: float = 1e-5             # learning rate at the end of the cosine
    warmup_steps: int | None = None  # linear warm-up steps (None: an eighth of the run, at most 50)
    weight_decay: float = 0.1        # AdamW weight decay, decoupled, on weight matrices only
    beta1: float = 0.9               # AdamW β₁
    beta2: float = 0.98              # AdamW β₂ (CLIP: 0.98 for stability at large batch)
    eps: float = 1e-6                # AdamW ε (CLIP: 1e-6)
    grad_clip: float = 1.0           # global gradient-norm cap (0: no clipping)
    max_scale: float = 100.0         # CLIP loss: cap on exp(log_scale) after each step
    # --- output ----------------------------------------------------------------------------------
    out: str | None = None           # run folder (None: runs/<timestamp>, or the folder of --resume)
    log_every: int = 20              # steps between progress lines and metrics.jsonl records (and step 1)
    eval_every: int = 100            # steps between evaluations (0: only at the end)
    checkpoint_every: int = 100      # steps between checkpoints (0: only at the end and when stopped)
    keep_checkpoints: int = 2        # checkpoints kept in the run folder, the newest
    eval_per_class: int = 5          # zero-shot images per colour × shape class
    eval_pairs: int = 300            # held-out retrieval pairs and relation-probe images
    plots: bool = True               # write loss.png and similarity.png

    def __post_init__(self):
        problems = []
        for name in PATH_FIELDS:            # saved absolute, so that --resume from another directory finds them
            if isinstance(getattr(self, name), str) and getattr(self, name):
                setattr(self, name, "::".join(os.path.abspath(part) for part in getattr(self, name).split("::")))
        if self.loss is None:
            self.loss = default_loss(self.init)
        for name, allowed in CHOICES.items():
            value = getattr(self, name)
            if name == "dtype" and value in REFUSED_DTYPES:
                problems.append(f"dtype {value}: {REFUSED_DTYPES[value]}")
            elif value not in allowed:
                either = (" or ".join(map(repr, allowed)) if len(allowed) == 2
                          else "one of " + ", ".join(map(repr, allowed)))
                problems.append(f"{name} must be {either}, got {value!r}")
        for name in ("steps", "batch_size", "log_every", "eval_per_class", "eval_pairs", "tokenizer_captions",
                     "keep_checkpoints"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                problems.append(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.warmup_steps is not None and (not _is_int(self.warmup_steps) or self.warmup_steps < 0):
            problems.append(f"warmup_steps must be None or a non-negative int, got {self.warmup_steps!r}")
        for name in ("eval_every", "checkpoint_every", "seed"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                problems.append(f"{name} must be a non-negative int, got {getattr(self, name)!r}")
        if self.examples is not None and (not _is_int(self.examples) or self.examples < 1):
            problems.append(f"examples must be None or a positive int, got {self.examples!r}")
        if _is_int(self.steps) and _is_int(self.warmup_steps) and self.warmup_steps >= self.steps:
            problems.append(f"warmup_steps ({self.warmup_steps}) must be below steps ({self.steps})")
        if not self.lr > 0 or not 0 <= self.min_lr <= self.lr:
            problems.append(f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if self.lock_image and not (self.image_tower or self.init):
            problems.append("lock_image needs image_tower or init: a locked image tower must come from a trained "
                            "model")
        problems += init_problems(self)
        problems += validation_problems(self)
        if isinstance(self.keep_negatives, bool) or not isinstance(self.keep_negatives, (int, float)) \
                or not 0 <= self.keep_negatives <= 1:
            problems.append(f"keep_negatives must be in [0, 1], got {self.keep_negatives!r}")
        elif self.keep_negatives < 1 and self.loss != "siglip":
            problems.append("keep_negatives < 1 drops negatives of the SigLIP loss; the CLIP loss has none to drop")
        if self.grad_clip < 0 or self.max_scale <= 0:
            problems.append(f"need grad_clip >= 0 and max_scale > 0, got {self.grad_clip}, {self.max_scale}")
        if not isinstance(self.model_overrides, dict):
            problems.append(f"model_overrides must be a dict of CLIPConfig fields, got {self.model_overrides!r}")
        elif self.preset in PRESETS and not problems:
            problems += self._model_problems()
        if problems:
            raise ValueError("TrainConfig: " + "; ".join(problems))

    def _model_problems(self):
        """What makes the preset with its overrides untrainable here, said before anything starts."""
        if self.init:
            return []                 # the init model's own settings, checked by check_init before the run starts
        try:
            model = preset(self.preset, **self.model_overrides)
        except (TypeError, ValueError) as error:
            return [f"model_overrides: {error}"]
        if self.data is None and not (self.image_tower or self.init) and model.image_size < shapes.MIN_IMAGE_SIZE:
            return [f"preset {self.preset} has {model.image_size}-pixel images and the built-in shapes need at "
                    f"least {shapes.MIN_IMAGE_SIZE}: add --image-size {shapes.MIN_IMAGE_SIZE} "
                    f"(model_overrides={{'image_size': {shapes.MIN_IMAGE_SIZE}}})"]
        return []

    @property
    def warmup(self):
        """The warm-up length in steps: ``warmup_steps``, or when that is None an eighth of the run, at most 50."""
        return min(50, self.steps // 8) if self.warmup_steps is None else self.warmup_steps

    def identity(self):
        """The fields a resumed run must share with the run it continues (all that change what a step computes),
        as JSON gives them back (tuples as lists), so that a saved configuration compares equal to its source."""
        return json.loads(json.dumps({key: value for key, value in dataclasses.asdict(self).items()
                                      if key not in CHANGEABLE_ON_RESUME}))


PATH_FIELDS = ("data", "val_data", "image_tower", "init")      # files and folders (a shard pattern may join several)


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def validation_problems(config):
    """What is wrong with the validation and loading fields of a TrainConfig (a list of messages)."""
    problems = []
    fraction = config.val_fraction
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        problems.append(f"val_fraction must be in [0, 1), got {fraction!r}")
    elif fraction and config.val_data:
        problems.append("give val_data or val_fraction, not both")
    elif fraction and config.data is None:
        problems.append("val_fraction holds out part of --data; the built-in shapes have their own held-out sets")
    elif fraction and shards.is_shard_pattern(config.data):
        problems.append("val_fraction cannot split streamed shards; give --val-data (a CSV, a folder, or "
                        "other shards)")
    if isinstance(config.workers, bool) or not isinstance(config.workers, int) or config.workers < 1:
        problems.append(f"workers must be a positive int, got {config.workers!r}")
    return problems


class NonFiniteLoss(RuntimeError):
    """The loss, an embedding, the scale or a gradient became inf or NaN; the run stopped before updating the
    weights."""


class FailedElsewhere(RuntimeError):
    """Another rank could not start the run; that rank prints why (so the message appears once)."""


@dataclasses.dataclass
class TrainResult:
    """What ``train`` returns."""

    out: str                 # the run folder
    losses: list             # the global loss of every step this call ran, in order
    steps: int               # steps completed in the whole run (resumed ones included)
    interrupted: bool        # stopped early by SIGINT or SIGTERM (a checkpoint was saved)
    summary: dict            # what summary.json holds (empty when interrupted)
    already_finished: bool = False   # resumed a finished run: nothing was run or changed


# ---------------------------------------------------------------------------------
# Data, tokenizer and model
# ---------------------------------------------------------------------------------

def family_of(config):
    return "siglip" if config.loss == "siglip" else "clip"


# ---- fine-tuning a whole pretrained model (TrainConfig.init) ----

def default_loss(init):
    """The loss a run takes when none is given: the family of the ``init`` model, else SigLIP's."""
    if init is None:
        return "siglip"
    if not os.path.exists(init):
        raise ValueError(f"--init {init}: {hub.NO_SUCH_FOLDER}")
    try:
        return hub.model_family(init)
    except (OSError, ValueError) as error:
        raise ValueError(f"--init {init}: {error}") from None


def init_problems(config):
    """What cannot go with ``init``: the model's own shape comes with it (only image_size may change)."""
    if config.init is None:
        return ["lock_text needs init: a locked text tower must come from a trained model"] if config.lock_text \
            else []
    problems = []
    if config.image_tower:
        problems.append("give init or image_tower, not both (init already brings the image tower)")
    other = sorted(set(config.model_overrides) - {"image_size"})
    if other:
        problems.append(f"init brings the model's own settings; model_overrides {other} cannot change them "
                        f"(only image_size can: its position embeddings are resized)")
    if config.lock_image and config.lock_text:
        problems.append("lock_image and lock_text together leave only the scale and bias to train")
    return problems


def check_init(config):
    """ValueError naming --init when its model cannot start the run: its config, the --image-size it would be
    resized to, its tokenizer (no weights are read)."""
    try:
        init = hub.model_config(config.init)
        if config.model_overrides.get("image_size", init.image_size) != init.image_size:
            checkpoint.resized_config(init, config.model_overrides["image_size"])
        saved_tokenizer(config.init)
    except (OSError, ValueError) as error:
        raise ValueError(f"--init {config.init}: {error}") from None


def load_init_model(config):
    """The ``init`` model ready for ``config.loss``, and a sentence that says what happened to its bias.

    Both towers, the scale t' and the bias b come from the folder, at
    ``model_overrides["image_size"]`` when given. The SigLIP loss needs a bias:
    a CLIP model gets SigLIP's initial b = -10 (its scale is kept). The CLIP
    loss has none: a SigLIP model's bias is dropped from the model.
    """
    try:
        source = hub.load_model(config.init, dtype=config.dtype,
                                image_size=config.model_overrides.get("image_size"))
    except (OSError, ValueError) as error:
        raise ValueError(f"--init {config.init}: {error}") from None
    has_bias = source.bias is not None
    if config.loss == "siglip" and has_bias:
        return source, f"the SigLIP loss continues from the model's bias b = {float(source.bias.item()):.4g}"
    if config.loss == "clip" and not has_bias:
        return source, "the CLIP loss has no bias, nor has the model"
    init_bias = SIGLIP_INIT_BIAS if config.loss == "siglip" else None
    model = CLIP(dataclasses.replace(source.config, init_bias=init_bias), dtype=config.dtype, seed=config.seed)
    state = {name: array for name, array in source.state_dict().items() if name != "bias"}
    model.load_state_dict(state, strict=False)
    if config.loss == "siglip":
        return model, (f"the model has no bias: the SigLIP loss starts one at b = {SIGLIP_INIT_BIAS:g} "
                       f"(SigLIP's initialisation)")
    return model, (f"the CLIP loss has no bias: the model's b = {float(source.bias.item()):.4g} is dropped "
                   f"(the saved model has none)")


def lock_text_tower(model):
    """The text tower's parameters (embeddings, blocks, final norm, projection) take no gradient."""
    for parameter in model.text.parameters():
        parameter.requires_grad = False


def model_config(config, tokenizer, image_tower=None):
    """The CLIPConfig: the preset with the overrides, sized for the tokenizer, with a bias for SigLIP.

    With ``image_tower`` (the CLIPConfig of the model given as ``config.image_tower``)
    every field of the image tower, the embedding width and the pixel
    normalisation come from it, so that its weights fit and see the pixels they
    were trained on.
    """
    base = preset(config.preset)
    overrides = {"vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eot_id}
    if image_tower is not None:
        overrides.update({name: getattr(image_tower, name) for name in VISION_FIELDS},
                         pixel_norm=image_tower.image_normalization)
    if config.loss == "siglip" and base.init_bias is None:
        overrides.update(init_log_scale=SIGLIP_INIT_LOG_SCALE, init_bias=SIGLIP_INIT_BIAS)
    if config.loss == "clip" and base.init_bias is not None:
        overrides.update(init_log_scale=CLIP_INIT_LOG_SCALE, init_bias=None)
    overrides.update(config.model_overrides)
    return preset(config.preset, **overrides)


def read_pairs(config, path):
    """The image–caption pairs at ``path`` (shards, a caption folder or a CSV/TSV), read with --data's columns
    and --strict (``data.shards.read_pairs``)."""
    return shards.read_pairs(path, image_column=config.image_column, caption_column=config.caption_column,
                             strict=config.strict)


def caption_set(config):
    """The training pairs of --data: without the images --val-fraction holds out."""
    pairs = read_pairs(config, config.data)
    return pairs.split_by_image(config.val_fraction, VAL_SEED)[0] if config.val_fraction else pairs


def validation_set(config):
    """The held-out pairs to validate on (--val-data, or --val-fraction of --data), or None."""
    if config.val_data:
        return read_pairs(config, config.val_data)
    if config.val_fraction:
        return read_pairs(config, config.data).split_by_image(config.val_fraction, VAL_SEED)[1]
    return None


def dataset_of(config, image_size):
    """(data set, transform) for the Loader: the shapes (uint8), or a caption set with a random resized crop
    giving uint8 pixels; ``Run.next_batch`` normalises them for the model's family."""
    if config.data is None:
        return shapes.ShapesDataset(seed=config.seed, image_size=image_size), None
    # uint8 crops (family None): normalised a batch at a time by model_input in next_batch, bit for bit the same
    # numbers, while loader workers send and the prefetch queue holds a quarter of float32's bytes
    return caption_set(config), functools.partial(random_resized_crop, image_size=image_size, family=None)


def training_captions(config, count):
    """The first ``count`` training captions (no images are decoded), to train the tokenizer on."""
    if config.data is None:
        return shapes.ShapesDataset(seed=config.seed).captions(range(count))
    pairs = caption_set(config)
    return [pairs.caption(index) for index in range(min(count, len(pairs)))]


def load_image_tower(config):
    """The model of ``config.image_tower`` (its image tower is what is used), or a clear error before training."""
    if not os.path.exists(config.image_tower):
        raise ValueError(f"--image-tower {config.image_tower}: {hub.NO_SUCH_FOLDER}")
    try:
        return checkpoint.from_pretrained(config.image_tower)
    except (OSError, ValueError) as error:
        raise ValueError(f"--image-tower {config.image_tower}: {error}") from None


def lock_image_tower(model):
    """LiT: the image tower's parameters take no gradient and its batch norms keep their statistics."""
    for parameter in model.visual.parameters():
        parameter.requires_grad = False
    model.visual.eval()


def trainable(model):
    """(name, parameter) of every parameter the optimiser updates: all but a locked tower's."""
    return [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]


def build_optimizer(model, config):
    """AdamW with weight decay on weight matrices only, and its warm-up + cosine schedule."""
    groups = optim.param_groups_for_decay(trainable(model), config.weight_decay)
    optimizer = optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps)
    schedule = optim.WarmupCosine(optimizer, config.warmup, config.steps, min_lr=config.min_lr)
    return optimizer, schedule


# ---------------------------------------------------------------------------------
# One step
# ---------------------------------------------------------------------------------

def batch_loss(model, config, images, tokens, comm):
    """This rank's share of the global loss on its (images, tokens); the shares sum to the global loss.

    Raises NonFiniteLoss on every rank when any rank's embeddings, scale or
    bias hold inf or NaN (the ranks agree on it first, so that the loss's own
    input check, which would raise a ValueError, is never reached and the
    divergence is reported as every other one is).
    """
    image_emb, text_emb, log_scale, bias = model(images, tokens)                  # (b, D), (b, D), (), ()
    outputs = {"image embeddings": image_emb, "text embeddings": text_emb, "log_scale": log_scale, "bias": bias}
    bad = [name for name, tensor in outputs.items()
           if tensor is not None and not bool(backend.get_array_module(tensor.data).isfinite(tensor.data).all())]
    if comm.all_reduce(numpy.array([float(len(bad))]))[0]:
        raise NonFiniteLoss(f"the {' and '.join(bad)} hold inf or NaN" if bad
                            else "another rank's embeddings hold inf or NaN")
    if config.loss == "siglip" and config.keep_negatives < 1:       # one process (train() refuses more)
        return losses.siglip_loss(image_emb, text_emb, log_scale, bias, keep_negatives=config.keep_negatives,
                                  negatives=config.negatives, mask_seed=config.seed)
    if config.loss == "siglip":
        return distributed.siglip_loss(image_emb, text_emb, log_scale, bias, comm)
    return distributed.clip_loss(image_emb, text_emb, log_scale, comm, method=config.clip_method)


def train_step(model, optimizer, schedule, config, comm, images, tokens, stop_requested, skipped=0):
    """One optimiser step; returns (global loss, gradient norm, whether any rank asked to stop,
    examples skipped over all ranks). ``stop_requested``: a bool, or a function that tells whether this rank
    was asked to stop (called once, just before the ranks agree).

    Everything non-finite (embeddings, loss, gradient norm) is checked
    before anything is updated, so a NonFiniteLoss leaves the weights as the
    previous step left them.
    """
    optimizer.zero_grad()
    share = batch_loss(model, config, images, tokens, comm)
    if callable(stop_requested):             # asked as late as possible: a signal during this step stops after it
        stop_requested = stop_requested()
    # one all-reduce gives every rank the global loss, whether any rank was told to stop, and the skips
    totals = comm.all_reduce(numpy.array([share.item(), float(stop_requested), float(skipped)], dtype=numpy.float64))
    loss = float(totals[0])
    if not math.isfinite(loss):
        raise NonFiniteLoss(f"the loss is {loss}")
    share.backward()
    parameters = [parameter for _, parameter in trainable(model)]
    distributed.all_reduce_gradients(parameters, comm)
    max_norm = config.grad_clip or sys.float_info.max          # grad_clip 0: measure the norm, never scale
    try:
        grad_norm = optim.clip_grad_norm(parameters, max_norm)
    except FloatingPointError as error:
        raise NonFiniteLoss(str(error)) from None
    optimizer.step()
    schedule.step()
    if config.loss == "clip":
        xp = backend.get_array_module(model.log_scale.data)
        model.log_scale.data[...] = xp.minimum(model.log_scale.data, math.log(config.max_scale))
    return loss, grad_norm, bool(totals[1]), int(totals[2])


# ---------------------------------------------------------------------------------
# Output: progress, metrics, pictures, and naming what failed to be written
# ---------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------
# Starting: everything checked before the run folder is made, on every rank alike
# ---------------------------------------------------------------------------------


def saved_config(step_folder, state):
    """The TrainConfig a checkpoint was made with (its state.json's train_config), or an error naming the file.

    Its ``out`` is the run folder that holds the checkpoint now: the one saved may be relative to another
    working directory, or the folder the run was moved away from, and must not be written to.
    """
    where = os.path.join(step_folder, checkpoint.TRAINING_STATE_FILE)
    known = {field.name for field in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(state["train_config"]) - known)
    if unknown:
        raise ValueError(f"{where}: field 'train_config' has fields this tinyclip does not know: {unknown}")
    try:
        return TrainConfig(**{**state["train_config"], "out": runs.run_folder_of(step_folder)})
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: field 'train_config': {error}") from None


def resume_config(run, **changes):
    """The configuration to continue the run in ``run`` (a run folder or a checkpoint in it): the one its
    newest checkpoint was made with, with ``changes`` (TrainConfig fields). Raises ValueError when a change
    would alter what a step computes, listing each such field with both values."""
    folder = checkpoint.latest_training_checkpoint(run)
    saved = saved_config(folder, checkpoint.read_training_state(folder))
    merged = dataclasses.replace(saved, **changes)
    check_same_run(saved, merged, folder)
    return merged


def check_same_run(saved, config, step_folder):
    """ValueError listing every field (both values) in which ``config`` would compute other steps than ``saved``."""
    before, now = saved.identity(), config.identity()
    differences = [f"{key}: {before.get(key)!r} in the run, {now[key]!r} now" for key in now
                   if before.get(key) != now[key]]
    if differences:
        raise ValueError(f"cannot resume {runs.run_folder_of(step_folder)}: the run was made with other settings ("
                         + "; ".join(differences) + "). Resume with --resume alone, or change only "
                         + ", ".join(CHANGEABLE_ON_RESUME))


@dataclasses.dataclass
class Start:
    """What ``prepare_start`` found: the configuration, and for a resumed run its checkpoint."""

    config: TrainConfig
    step_folder: str | None = None      # the checkpoint resumed from
    state: dict | None = None           # its state.json
    image_tower: object = None          # the model given as config.image_tower (its image tower is used)
    finished: bool = False              # the resumed run has already finished
    tokenizer: object = None            # the resumed run's tokenizer (a new run trains its own)


def prepare_start(config, resume, comm=None):
    """Check everything a run needs before anything is written: the checkpoint and configuration to resume,
    the data (and that it holds a batch for every rank of ``comm``), the image tower, and that a new run does
    not go into another run's folder."""
    step_folder = state = None
    folder = resume if resume is not None else config.out
    holder = runs.RunLock.holder(folder) if folder is not None else None
    if holder is not None:
        raise ValueError(runs.busy(folder, holder))
    if resume is not None:
        step_folder = checkpoint.latest_training_checkpoint(resume)
        state = checkpoint.read_training_state(step_folder)
        saved = saved_config(step_folder, state)
        config = saved if config is None else config
        check_same_run(saved, config, step_folder)
        if state["step"] > config.steps:
            raise ValueError(f"{os.path.join(step_folder, checkpoint.TRAINING_STATE_FILE)}: field 'step' is "
                             f"{state['step']}, beyond the run's {config.steps} steps")
        home = runs.run_folder_of(step_folder)
        if config.out is None:
            config = dataclasses.replace(config, out=home)
        if state["step"] == config.steps and os.path.isfile(os.path.join(home, runs.SUMMARY_FILE)):
            return Start(dataclasses.replace(config, out=home), step_folder, state, finished=True)
        if os.path.abspath(config.out) != os.path.abspath(home) and runs.holds_a_run(config.out):
            raise ValueError(f"--out {config.out} already holds another run: continue {home} in a new folder, "
                             f"or without --out")
    elif config.out is None:
        config = dataclasses.replace(config, out=runs.default_out())
    elif runs.holds_a_run(config.out):
        raise ValueError(f"--out {config.out} already holds a run: continue it with --resume {config.out}, or "
                         f"choose another --out")
    if config.data is not None:
        pairs = caption_set(config)             # the file or folder exists, is readable, has the columns
        rank, size = (comm.rank, comm.size) if comm is not None else (0, 1)
        try:                                    # a batch for every rank (BatchOrder: no threads, nothing read)
            BatchOrder(pairs, config.batch_size, config.seed, rank, size, transform=random_resized_crop,
                       examples=config.examples)
        except ValueError as error:
            raise ValueError(f"--data {config.data}: {error} (--batch-size {config.batch_size})") from None
    if config.val_data is not None:
        validation_set(config)                  # and so does --val-data
    if config.init and state is None:
        check_init(config)
    tower = load_image_tower(config) if config.image_tower else None
    tokenizer = saved_tokenizer(os.path.join(step_folder, "model")) if step_folder else None
    return Start(config, step_folder, state, tower, tokenizer=tokenizer)


def agreed(comm, action):
    """``action()`` on every rank; when it raises ValueError or OSError on any rank, the lowest such rank
    raises its error and the others FailedElsewhere, so that no rank goes on alone and the message is
    printed once."""
    error = result = None
    try:
        result = action()
    except (ValueError, OSError) as caught:
        error = caught
    failed = numpy.flatnonzero(comm.all_gather_values([int(error is not None)], numpy.int64)[:, 0])
    if failed.size:
        if error is not None and comm.rank == failed[0]:
            raise error
        raise FailedElsewhere(f"rank {failed[0]} could not start the run (it says why)")
    return result


# ---------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------

def saved_tokenizer(folder):
    """The tokenizer saved in the model folder ``folder`` (tinyclip.tokenizer.TOKENIZER_FILES), or a ValueError."""
    tokenizer = find_tokenizer(folder)
    if tokenizer is None:
        raise ValueError(f"{folder} holds no tokenizer (looked for {', '.join(TOKENIZER_FILES)})")
    return tokenizer


def prepare_tokenizer(config):
    """The --init model's tokenizer, else one trained on the run's first training captions."""
    if config.init:
        return saved_tokenizer(config.init)
    # the model's vocabulary follows the tokenizer; 514 (bytes + 2 specials) is the least a BPE has
    vocab_size = max(preset(config.preset).vocab_size, MIN_VOCAB_SIZE)
    return Tokenizer.train(training_captions(config, config.tokenizer_captions), vocab_size)


class Run:
    """One training run on this rank: the model and everything around it, ready to take steps.

    Built from a Start: from scratch, or from a checkpoint (its tokenizer,
    weights, moments, schedule and data position).
    """

    def __init__(self, start, comm):
        config, state, self.step_folder = start.config, start.state, start.step_folder
        self.config, self.comm, self.lead = config, comm, comm.rank == 0
        self.tokenizer = start.tokenizer or prepare_tokenizer(config)
        source = start.image_tower
        self.init_note = None                # what an init run does with the bias (said at the start)
        if config.init:
            self.model, self.init_note = load_init_model(config)
        else:
            self.model = CLIP(model_config(config, self.tokenizer, source and source.config), dtype=config.dtype,
                              seed=config.seed)
        self.model.train()
        if source is not None:      # (a resumed run then loads its checkpoint's weights over these)
            self.model.visual.load_state_dict(source.visual.state_dict())
        if config.lock_image:
            lock_image_tower(self.model)
        if config.lock_text:
            lock_text_tower(self.model)
        if comm.size > 1:        # batch norm over the global batch, so that N ranks train exactly as one process
            nn.synchronise_batch_norm(self.model, comm)
        self.optimizer, self.schedule = build_optimizer(self.model, config)
        self.step = 0
        self.seconds_before = 0.0            # training time of the run before this process took over
        self.skipped = 0                     # examples skipped (unreadable images) in the whole run, all ranks
        if state is not None:
            checkpoint.restore_training(self.step_folder, state, self.model, self.optimizer, self.schedule)
            self.step, self.seconds_before = state["step"], state["seconds"]
            self.skipped = int(state.get("skipped_examples", 0))
        distributed.broadcast_parameters(self.model.parameters(), comm)
        self.device = backend.backend_of(self.model.log_scale.data)                # 'numpy' or 'cupy'
        image_size = self.model.config.image_size
        self.dataset, transform = dataset_of(config, image_size)
        try:
            # the captions are tokenized on the loading thread, overlapping the step's NumPy work
            tokenize = functools.partial(self.tokenizer, context_length=self.model.config.context_length)
            self.loader = Loader(self.dataset, config.batch_size, seed=config.seed, rank=comm.rank,
                                 world_size=comm.size, transform=transform, examples=config.examples,
                                 start=state["loader"] if state else None, workers=config.workers,
                                 caption_transform=tokenize)
        except ValueError as error:
            where = f"{self.step_folder}/{checkpoint.TRAINING_STATE_FILE}: field 'loader': " if state else ""
            raise ValueError(f"{where}{error}") from None
        self.epoch, self.epoch_skipped, self.named_skips = self.loader.epoch, 0, []
        self.eval_sets = (evaluate.shapes_sets(config.eval_per_class, config.eval_pairs, image_size)
                          if config.data is None and self.lead else None)
        self.val_pairs = validation_set(config) if self.lead else None
        self.data_speed = runs.DataSpeed()
        self.metrics = runs.MetricsLog(os.path.join(config.out, "metrics.jsonl"), self.lead,
                                  self.step if state else None, config.steps)
        self.progress = runs.Progress(config.steps, self.lead)
        self.checkpoint_root = os.path.join(config.out, checkpoint.TRAINING_CHECKPOINT_DIR)
        self.last_saved = self.step if state else None
        self.started = time.perf_counter()
        self.losses = []                     # the global loss of each step this process ran

    def seconds(self):
        return self.seconds_before + time.perf_counter() - self.started

    def next_batch(self):
        """This rank's (images (b, H, W, 3), tokens (b, T)) on the model's device, and the examples it skipped."""
        waiting_since = time.perf_counter()
        images, tokens = next(self.loader)               # the loader's thread tokenized the captions
        self.data_wait = time.perf_counter() - waiting_since
        skipped = self.loader.last_skipped
        for path in (self.dataset.path(index) for index in skipped):   # an image is skipped again every epoch
            if len(self.named_skips) < NAMED_SKIPS and path not in self.named_skips:
                self.named_skips.append(path)
        images = model_input(images, self.model.config.image_normalization, self.device, self.config.dtype)
        return images, backend.asarray(tokens, self.device), len(skipped)            # tokens (b, T)

    def take_step(self, stop_requested):
        """One training step, logged; returns whether any rank asked to stop."""
        step_started = time.perf_counter()
        epoch = self.loader.epoch
        images, tokens, skipped = self.next_batch()
        lr = self.optimizer.param_groups[0]["lr"]
        try:
            loss, grad_norm, stop, skipped = train_step(self.model, self.optimizer, self.schedule, self.config,
                                                        self.comm, images, tokens, stop_requested, skipped)
        except NonFiniteLoss as error:
            where = (f"the last good checkpoint is {self.latest_checkpoint()}" if self.last_saved is not None
                     else "no checkpoint was written yet")
            raise NonFiniteLoss(f"step {self.step + 1}: {error}; training stopped ({where}); "
                                f"try a lower --lr or a longer --warmup-steps") from None
        self.step += 1
        self.losses.append(loss)
        self.data_speed.add(self.config.batch_size, self.data_wait, time.perf_counter() - step_started)
        self.note_skips(epoch, skipped)
        if self.step % self.config.log_every == 0 or self.step in (1, self.config.steps):
            speed = self.data_speed.report()
            self.metrics.write({"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                                "scale": math.exp(float(self.model.log_scale.item())),
                                "skipped_examples": self.skipped, "seconds": round(self.seconds(), 3),
                                "examples_seen": self.examples_seen(), **speed})
            self.progress.step(self.step, loss, lr, (time.perf_counter() - self.started) / len(self.losses), speed)
        return stop

    def note_skips(self, epoch, skipped):
        """Count the step's skipped examples; at the end of an epoch that skipped some, say how many."""
        self.skipped += skipped
        if epoch != self.epoch and self.epoch_skipped:
            self.say_skips(f"epoch {self.epoch + 1}", self.epoch_skipped)
        if epoch != self.epoch:
            self.epoch, self.epoch_skipped = epoch, 0
        self.epoch_skipped += skipped

    def say_skips(self, when, count):
        first = f" (first on rank 0: {', '.join(self.named_skips)})" if self.named_skips else ""
        self.progress.say(f"{when}: skipped {count} example{'s' if count != 1 else ''} whose image could not "
                          f"be read{first}")

    def latest_checkpoint(self):
        return os.path.join(self.checkpoint_root, checkpoint.step_folder_name(self.last_saved))

    def save(self):
        """A checkpoint of the current step (once per step), written by rank 0 while the others wait."""
        if self.last_saved == self.step:
            return
        if self.lead:
            with runs.writing(f"the checkpoint of step {self.step}", self.checkpoint_root):
                checkpoint.save_training_checkpoint(
                    self.checkpoint_root, self.step, self.model, self.tokenizer, self.optimizer, self.schedule,
                    {"seconds": round(self.seconds(), 3), "train_config": dataclasses.asdict(self.config),
                     "loader": self.loader.state(), "skipped_examples": self.skipped,
                     "saved_at": datetime.datetime.now().isoformat(timespec="seconds")},
                    keep=self.config.keep_checkpoints)
        self.last_saved = self.step
        self.comm.barrier()

    def examples_seen(self):
        """Training examples consumed so far over all ranks (every step takes one global batch)."""
        return self.step * self.config.batch_size

    def evaluate(self):
        """The held-out shapes metrics (shapes data) and the validation metrics (--val-data / --val-fraction),
        on rank 0 (else {}), logged and printed."""
        if self.eval_sets is None and self.val_pairs is None:
            return {}
        results = evaluate.evaluate(self.model, self.tokenizer, **self.eval_sets) if self.eval_sets else {}
        if self.val_pairs is not None:
            results.update(runs.validate(self.model, self.tokenizer, self.val_pairs, self.config))
        self.metrics.write({"step": self.step, "examples_seen": self.examples_seen(), **results})
        self.progress.say(f"eval step {self.step}: "
                          + ", ".join(f"{key} {value:.3f}" if isinstance(value, float) else f"{key} {value}"
                                      for key, value in results.items()))
        return results

    def final_loss(self):
        """The last step's loss: this process's, or for a run resumed after its last step, metrics.jsonl's."""
        logged = [record["loss"] for record in self.metrics.records if "loss" in record]
        return self.losses[-1] if self.losses else logged[-1] if logged else None

    def finish(self):
        """The last evaluation, the final model, the pictures and, last, summary.json; returns the summary."""
        results = self.evaluate()
        # the shapes metrics for a run on the shapes; on your data, what validation measured (no empty keys)
        summary = {key: results.get(key) for key in SUMMARY_KEYS[:5] if self.eval_sets is not None or key in results}
        summary.update({key: value for key, value in results.items() if key.startswith("val_")})
        summary.update(final_loss=self.final_loss(), steps=self.step,
                       examples_seen=self.examples_seen(), seconds=round(self.seconds(), 1),
                       skipped_examples=self.skipped)
        if self.skipped:
            self.say_skips("the run", self.skipped)
        if self.lead:
            out = self.config.out
            path = os.path.join(out, "model")
            with runs.writing("the final model", path):
                checkpoint.save_model_with_tokenizer(self.model, self.tokenizer, path)
            if self.config.plots:
                if self.eval_sets:
                    pictured = self.eval_sets["retrieval"]
                elif self.val_pairs is not None:
                    pictured = runs.validation_pictures(self.val_pairs, self.model.config.image_size,
                                                   self.model.config.image_normalization)
                else:
                    pictured = None
                runs.draw_pictures(out, self.metrics.records, self.model, self.tokenizer, pictured)
            path = os.path.join(out, runs.SUMMARY_FILE)
            with runs.writing("the summary", path):
                checkpoint.write_json(path, summary)
            self.progress.say("summary: " + ", ".join(
                f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                for key, value in summary.items()))
        return summary


def banner(run, comm):
    """The first line of a run: what is trained, from what, on what, where."""
    config = run.config
    if config.init:
        locked = [name for name, on in (("image", config.lock_image), ("text", config.lock_text)) if on]
        towers = f"{config.init} (fine-tuned; {' and '.join(locked) + ' tower locked' if locked else 'both towers'})"
    elif config.image_tower:
        towers = (f"the text tower of {config.preset} from scratch against the image tower of {config.image_tower} "
                  + ("(locked)" if config.lock_image else "(trained too)"))
    else:
        towers = f"{config.preset} from scratch"
    data = config.data or "the built-in shapes"
    trained = sum(parameter.data.size for _, parameter in trainable(run.model))
    return (f"training {towers} with the {config.loss} loss on {data}, from step {run.step} to {config.steps}: "
            f"batch {config.batch_size} on {comm.size} process{'es' if comm.size > 1 else ''}, "
            f"{trained:,} trained parameters, writing to {config.out}")


def train(config=None, resume=None, comm=None):
    """Run ``config`` from its start, or continue the run in ``resume``; returns a TrainResult.

    ``resume`` is a run folder (or a checkpoint in it); ``config`` may then
    be None (the run's own configuration), or a configuration that differs
    from it only in CHANGEABLE_ON_RESUME. A finished run is left as it is
    (``already_finished``). Everything is checked before the run folder is
    made. Raises ValueError or OSError for what does not fit or cannot be
    written (naming it), FailedElsewhere on the ranks that did not fail when
    another could not start, and NonFiniteLoss when training diverges.
    """
    if config is None and resume is None:
        raise ValueError("train: give a TrainConfig, or resume= a run to continue")
    comm = distributed.world() if comm is None else comm
    backend.tune_malloc()                       # process-wide settings: asked for here, never at import
    distributed.install_abort_on_error(comm)    # an uncaught error on one rank ends the job instead of a hang
    with runs.stop_on_signals() as stop:
        start = agreed(comm, lambda: prepare_start(config, resume, comm))
        config = start.config
        if config.keep_negatives < 1 and comm.size > 1:      # every rank sees the same config: all raise alike
            raise ValueError("keep_negatives < 1 runs on one process only (the ring loss keeps every negative)")
        if start.finished:
            message = (f"{config.out} has finished (step {config.steps} of {config.steps}; {runs.SUMMARY_FILE} is "
                       f"written): nothing to do, nothing changed")
            runs.Progress(config.steps, comm.rank == 0).say(message)
            with open(os.path.join(config.out, runs.SUMMARY_FILE), encoding="utf-8") as file:
                summary = json.load(file)
            return TrainResult(config.out, [], config.steps, False, summary, already_finished=True)
        lock = agreed(comm, lambda: runs.open_run_folder(config, comm))
        try:
            return _run(start, comm, stop)
        finally:
            if lock is not None:
                lock.release()


def _run(start, comm, stop):
    config = start.config
    run = Run(start, comm)
    run.progress.say(banner(run, comm))
    if run.init_note:
        run.progress.say(f"fine-tuning {config.init}: {run.init_note}")
    interrupted = False
    try:
        while run.step < config.steps and not interrupted:
            interrupted = run.take_step(lambda: stop["signal"] is not None)
            if config.eval_every and run.step % config.eval_every == 0 and run.step < config.steps:
                run.evaluate()
            if config.checkpoint_every and run.step % config.checkpoint_every == 0:
                run.save()
        run.save()
    finally:
        run.loader.close()
    if interrupted:
        why = f" by {stop['signal']}" if stop["signal"] else " (another rank was told to stop)"
        run.progress.say(f"interrupted{why}: checkpoint of step {run.step} in {run.latest_checkpoint()}; "
                         f"continue with: tinyclip train --resume {config.out}")
        return TrainResult(config.out, run.losses, run.step, True, {})
    return TrainResult(config.out, run.losses, run.step, False, run.finish())
