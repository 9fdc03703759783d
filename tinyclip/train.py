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

A run writes into one folder (``TrainConfig.out``)::

    train_config.json        the TrainConfig
    metrics.jsonl            one JSON line per logged step and per evaluation
    checkpoint/              the last checkpoint: model/, optimizer.safetensors, state.json
    model/                   the final model (tinyclip.checkpoint format) with its tokenizer
    summary.json             final metrics, loss, steps and seconds
    loss.png, similarity.png pictures of the run (when matplotlib is installed)

Checkpoints hold everything a step depends on: weights, AdamW moments,
the schedule, the data position (``Loader.state()``) and the tokenizer.
Nothing else in a step is random (the shapes data draws example i from i
itself; augmentation is seeded per example and epoch by the loader), so a
run resumed from step k on the same machine gives the losses of an
uninterrupted run bit for bit. The checkpoint folder is built beside its
target and swapped in whole, so an interrupted write leaves the previous one.

Stopping: a non-finite loss (or gradient) ends the run with
``NonFiniteLoss`` before the weights are touched, and the last good
checkpoint stays as it was. Ctrl-C (SIGINT) lets the current step finish,
saves a checkpoint and returns; under MPI the ranks agree on stopping
through the same all-reduce that sums the loss, so none is left waiting.
"""

import contextlib
import dataclasses
import datetime
import functools
import json
import math
import os
import signal
import sys
import time

import numpy

from . import backend, checkpoint, distributed, evaluate, nn, optim, plots
from .data import captions as caption_sets
from .data import shapes
from .data.loader import Loader
from .data.transforms import normalize, random_resized_crop
from .models import CLIP, preset
from .models.config import VISION_FIELDS
from .tokenizer import Tokenizer

TOKENIZER_FILE = "tokenizer.tinyclip.json"     # the name tinyclip.cli looks for in a model folder
CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
MIN_VOCAB_SIZE = 514
SUMMARY_KEYS = ("zeroshot_top1", "retrieval_i2t_r1", "retrieval_t2i_r1", "relation_acc", "control_acc",
                "final_loss", "steps", "seconds")


@dataclasses.dataclass
class TrainConfig:
    # --- model and loss ----------------------------------------------------------------------------
    preset: str = "shapes"           # a tinyclip.models preset; vocab_size / eos_id follow the tokenizer
    model_overrides: dict = dataclasses.field(default_factory=dict)   # CLIPConfig fields to replace
    loss: str = "siglip"             # "siglip" (sigmoid, with bias) or "clip" (softmax)
    clip_method: str = "ring"        # distributed CLIP loss: "ring" or "gather" (same numbers)
    dtype: str = "float32"           # parameter dtype
    image_tower: str | None = None   # a model folder (tinyclip's or Hugging Face's) whose image tower to start from
    lock_image: bool = False         # LiT (Zhai et al. 2022): keep that image tower fixed, train the text tower
    seed: int = 0                    # model initialisation and data order
    # --- data ------------------------------------------------------------------------------------
    data: str | None = None          # None: the built-in shapes; else a CSV/TSV file or an image folder
    image_column: str = "filepath"   # CSV/TSV column with image paths
    caption_column: str = "title"    # CSV/TSV column with captions
    strict: bool = False             # a missing or unreadable image is an error instead of a warning
    examples: int | None = None      # use only the first N examples (None: all; shapes are unlimited)
    tokenizer_captions: int = 4000   # captions the BPE tokenizer is trained on
    # --- optimisation ----------------------------------------------------------------------------
    steps: int = 700                 # optimiser steps in the whole run (~6 min on 2 CPU cores at the defaults)
    batch_size: int = 128            # global batch over all ranks
    lr: float = 2e-3                 # peak learning rate
    min_lr: float = 1e-5             # learning rate at the end of the cosine
    warmup_steps: int | None = None  # linear warm-up from 0 to lr (None: an eighth of the run, at most 50)
    weight_decay: float = 0.1        # decoupled, on weight matrices only (optim.param_groups_for_decay)
    beta1: float = 0.9               # AdamW β₁
    beta2: float = 0.98              # AdamW β₂ (CLIP: 0.98 for stability at large batch)
    eps: float = 1e-6                # AdamW ε (CLIP: 1e-6)
    grad_clip: float = 1.0           # global gradient-norm cap (0: no clipping)
    max_scale: float = 100.0         # CLIP loss: cap on exp(log_scale) after each step
    # --- output ----------------------------------------------------------------------------------
    out: str | None = None           # run folder (None: runs/<timestamp>)
    log_every: int = 20              # steps between progress lines and metrics.jsonl records
    eval_every: int = 100            # steps between evaluations (0: only at the end)
    checkpoint_every: int = 100      # steps between checkpoints (0: only at the end and on Ctrl-C)
    eval_per_class: int = 5          # zero-shot images per colour × shape class
    eval_pairs: int = 300            # held-out retrieval pairs and relation-probe images
    plots: bool = True               # write loss.png and similarity.png

    def __post_init__(self):
        problems = []
        if self.loss not in ("siglip", "clip"):
            problems.append(f"loss must be 'siglip' or 'clip', got {self.loss!r}")
        if self.clip_method not in ("ring", "gather"):
            problems.append(f"clip_method must be 'ring' or 'gather', got {self.clip_method!r}")
        for name in ("steps", "batch_size", "log_every", "eval_per_class", "eval_pairs", "tokenizer_captions"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                problems.append(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.warmup_steps is not None and (not isinstance(self.warmup_steps, int) or self.warmup_steps < 0):
            problems.append(f"warmup_steps must be None or a non-negative int, got {self.warmup_steps!r}")
        for name in ("eval_every", "checkpoint_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                problems.append(f"{name} must be a non-negative int, got {getattr(self, name)!r}")
        if isinstance(self.steps, int) and isinstance(self.warmup_steps, int) and self.warmup_steps >= self.steps:
            problems.append(f"warmup_steps ({self.warmup_steps}) must be below steps ({self.steps})")
        if not self.lr > 0 or not 0 <= self.min_lr <= self.lr:
            problems.append(f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if self.lock_image and not self.image_tower:
            problems.append("lock_image needs image_tower: a locked image tower must come from a trained model")
        if self.grad_clip < 0 or self.max_scale <= 0:
            problems.append(f"need grad_clip >= 0 and max_scale > 0, got {self.grad_clip}, {self.max_scale}")
        if problems:
            raise ValueError("TrainConfig: " + "; ".join(problems))

    @property
    def warmup(self):
        """The warm-up length in steps: ``warmup_steps``, or when that is None an eighth of the run, at most 50."""
        return min(50, self.steps // 8) if self.warmup_steps is None else self.warmup_steps

    def identity(self):
        """The fields a resumed run must share with the run it continues (all that change what a step computes),
        as JSON gives them back (tuples as lists), so that a saved configuration compares equal to its source."""
        how_often = {"out", "log_every", "eval_every", "checkpoint_every", "eval_per_class", "eval_pairs", "plots"}
        return json.loads(json.dumps({key: value for key, value in dataclasses.asdict(self).items()
                                      if key not in how_often}))


class NonFiniteLoss(RuntimeError):
    """The loss or the gradient became inf or NaN; the run stopped before updating the weights."""


@dataclasses.dataclass
class TrainResult:
    """What ``train`` returns."""

    out: str                 # the run folder
    losses: list             # the global loss of every step this call ran, in order
    steps: int               # steps completed in the whole run (resumed ones included)
    interrupted: bool        # stopped early by Ctrl-C (a checkpoint was saved)
    summary: dict            # what summary.json holds (empty when interrupted)


# ---------------------------------------------------------------------------------
# Data, tokenizer and model
# ---------------------------------------------------------------------------------

def family_of(config):
    return "siglip" if config.loss == "siglip" else "clip"


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
        overrides.update(init_log_scale=math.log(10.0), init_bias=-10.0)       # SigLIP's initialisation
    if config.loss == "clip" and base.init_bias is not None:
        overrides.update(init_log_scale=math.log(1 / 0.07), init_bias=None)    # CLIP's initialisation
    overrides.update(config.model_overrides)
    return preset(config.preset, **overrides)


def caption_set(config):
    """The image–caption pairs of --data: a folder of images with .txt captions, or a CSV/TSV file."""
    if os.path.isdir(config.data):
        return caption_sets.FolderCaptions(config.data, strict=config.strict)
    return caption_sets.CSVCaptions(config.data, image_column=config.image_column,
                                    caption_column=config.caption_column, strict=config.strict)


def dataset_of(config, image_size):
    """(data set, transform) for the Loader: the shapes, or a caption set with a random resized crop."""
    if config.data is None:
        return shapes.ShapesDataset(seed=config.seed, image_size=image_size), None
    return caption_set(config), functools.partial(random_resized_crop, image_size=image_size,
                                                  family=family_of(config))


def training_captions(config, count):
    """The first ``count`` training captions (no images are decoded), to train the tokenizer on."""
    if config.data is None:
        return shapes.ShapesDataset(seed=config.seed).captions(range(count))
    pairs = caption_set(config)
    return [pairs.caption(index) for index in range(min(count, len(pairs)))]


def load_image_tower(config):
    """The model of ``config.image_tower`` (its image tower is what is used), or a clear error before training."""
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
    """This rank's share of the global loss on its (images, tokens); the shares sum to the global loss."""
    image_emb, text_emb, log_scale, bias = model(images, tokens)                  # (b, D), (b, D), (), ()
    if config.loss == "siglip":
        return distributed.siglip_loss(image_emb, text_emb, log_scale, bias, comm)
    return distributed.clip_loss(image_emb, text_emb, log_scale, comm, method=config.clip_method)


def train_step(model, optimizer, schedule, config, comm, images, tokens, stop_requested):
    """One optimiser step; returns (global loss, gradient norm, whether any rank asked to stop).

    The loss is checked before anything is updated, so a NonFiniteLoss
    leaves the weights as the previous step left them.
    """
    optimizer.zero_grad()
    share = batch_loss(model, config, images, tokens, comm)
    # one all-reduce gives every rank the global loss and whether any rank saw Ctrl-C
    totals = comm.all_reduce(numpy.array([share.item(), float(stop_requested)], dtype=numpy.float64))
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
    return loss, grad_norm, bool(totals[1])


# ---------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------

def save_model(model, tokenizer, path):
    """The model in tinyclip's checkpoint format with its tokenizer beside the weights (cli-loadable)."""
    checkpoint.save(model, path)
    tokenizer.save(os.path.join(path, TOKENIZER_FILE))


def save_checkpoint(path, model, tokenizer, optimizer, schedule, loader, config, step, seconds):
    """Everything a step depends on, written into a folder beside ``path`` and swapped in whole."""
    with checkpoint.staged_folder(path) as staging:
        save_model(model, tokenizer, os.path.join(staging, "model"))
        optimizer_state = optimizer.state_dict()
        arrays, numbers = {}, {}
        for index, entry in optimizer_state["state"].items():
            for key, value in entry.items():
                if hasattr(value, "shape"):
                    arrays[f"{index}.{key}"] = value
                else:
                    numbers[f"{index}.{key}"] = value
        checkpoint.write_safetensors(os.path.join(staging, OPTIMIZER_FILE), arrays)
        checkpoint.write_json(os.path.join(staging, STATE_FILE), {
            "step": step, "seconds": seconds, "train_config": dataclasses.asdict(config), "loader": loader.state(),
            "schedule": schedule.state_dict(), "optimizer_groups": optimizer_state["param_groups"],
            "optimizer_numbers": numbers, "saved_at": datetime.datetime.now().isoformat(timespec="seconds")})


def checkpoint_folder(path):
    """The checkpoint in ``path``: a run folder (its checkpoint/) or a checkpoint folder itself."""
    for candidate in (os.path.join(path, CHECKPOINT_DIR), path):
        if os.path.isfile(os.path.join(candidate, STATE_FILE)):
            return candidate
    raise ValueError(f"--resume {path}: no training checkpoint there (looked for {CHECKPOINT_DIR}/{STATE_FILE} "
                     f"and {STATE_FILE})")


def read_checkpoint_state(path, config):
    """The state.json of the checkpoint at ``path``, after checking that it was made by the same configuration."""
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as file:
        state = json.load(file)
    saved = TrainConfig(**state["train_config"]).identity()
    wanted = config.identity()
    differences = [f"{key}: {saved[key]!r} in the checkpoint, {wanted[key]!r} now"
                   for key in wanted if saved.get(key) != wanted[key]]
    if differences:
        raise ValueError(f"--resume {path}: the checkpoint was made with a different configuration ("
                         + "; ".join(differences) + "); resume with the same settings")
    return state


def restore(path, state, model, optimizer, schedule):
    """Load weights, optimiser moments and schedule of the checkpoint at ``path`` into the live objects."""
    model.load_state_dict(checkpoint.read_safetensors(os.path.join(path, "model", checkpoint.WEIGHTS_FILE)))
    entries = {}
    for key, value in checkpoint.read_safetensors(os.path.join(path, OPTIMIZER_FILE)).items():
        index, name = key.split(".", 1)
        entries.setdefault(index, {})[name] = value
    for key, value in state["optimizer_numbers"].items():
        index, name = key.split(".", 1)
        entries.setdefault(index, {})[name] = value
    optimizer.load_state_dict({"state": entries, "param_groups": state["optimizer_groups"]})
    schedule.load_state_dict(state["schedule"])


# ---------------------------------------------------------------------------------
# Output: progress, metrics, evaluation, pictures
# ---------------------------------------------------------------------------------

class Progress:
    """Plain progress lines (or one line rewritten with \\r on a terminal), from rank 0 only."""

    def __init__(self, total_steps, enabled, stream=None):
        self.total_steps, self.enabled = total_steps, enabled
        self.stream = sys.stdout if stream is None else stream
        self.rewrite = enabled and self.stream.isatty()

    def step(self, step, loss, lr, seconds_per_step):
        if not self.enabled:
            return
        left = (self.total_steps - step) * seconds_per_step
        line = (f"step {step:>6}/{self.total_steps}  loss {loss:.4f}  lr {lr:.2e}  "
                f"{seconds_per_step:.2f} s/step  ~{left / 60:.1f} min left")
        self.stream.write(f"\r{line}" if self.rewrite else f"{line}\n")
        self.stream.flush()

    def say(self, message):
        if self.enabled:
            self.stream.write(f"\n{message}\n" if self.rewrite else f"{message}\n")
            self.stream.flush()


class MetricsLog:
    """metrics.jsonl, appended to by rank 0; a resumed run first drops records past its checkpoint."""

    def __init__(self, path, enabled, resume_step=None):
        self.path, self.enabled = path, enabled
        self.records = []
        if enabled and resume_step is not None and os.path.isfile(path):
            with open(path, encoding="utf-8") as file:
                self.records = [record for record in map(json.loads, filter(str.strip, file))
                                if record.get("step", 0) <= resume_step]
            with open(path, "w", encoding="utf-8") as file:
                file.writelines(json.dumps(record) + "\n" for record in self.records)
        elif enabled:
            open(path, "w").close()

    def write(self, record):
        if self.enabled:
            self.records.append(record)
            with open(self.path, "a", encoding="utf-8") as file:
                file.write(json.dumps(record) + "\n")


def evaluation_sets(config, image_size):
    """The held-out shapes sets: zero-shot over every colour × shape, retrieval, and the relation probe."""
    images, labels, names = shapes.zeroshot_set(config.eval_per_class, seed=0, image_size=image_size)
    zeroshot = evaluate.ZeroShotSet(images, labels, names, templates=shapes.ZEROSHOT_TEMPLATES)
    retrieval = evaluate.RetrievalSet(*shapes.retrieval_set(config.eval_pairs, seed=0, image_size=image_size))
    probe = shapes.relation_probe(config.eval_pairs, seed=0, image_size=image_size)
    relation = evaluate.RelationSet(probe.images, probe.true_captions, probe.swapped_captions,
                                    probe.control_true, probe.control_false)
    return {"zeroshot": zeroshot, "retrieval": retrieval, "relation": relation}


def draw_pictures(out, records, model, tokenizer, retrieval):
    """loss.png and similarity.png (the first retrieval pairs); one warning without matplotlib."""
    if not plots.available():
        print(f"warning: no pictures: {plots.MISSING_MATPLOTLIB}", file=sys.stderr)
        return
    plots.plot_training(records, os.path.join(out, "loss.png"))
    if retrieval is not None:
        count = plots.MAX_SIMILARITY_PAIRS
        images, captions = retrieval.images[:count], retrieval.captions[:count]
        plots.plot_similarity(evaluate.encode_images(model, images),
                              evaluate.encode_texts(model, tokenizer, captions),
                              images, captions, os.path.join(out, "similarity.png"))


@contextlib.contextmanager
def stop_on_sigint():
    """Inside the block the first Ctrl-C only sets ``flag["stop"]``; a second one interrupts as usual."""
    flag = {"stop": False}

    def request_stop(signum, frame):
        flag["stop"] = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    try:
        previous = signal.signal(signal.SIGINT, request_stop)
    except ValueError:              # not the main thread: no handler, Ctrl-C behaves as usual
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


# ---------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------

def default_out():
    return os.path.join("runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))


def prepare_tokenizer(config, resume_path):
    """The checkpoint's tokenizer when resuming, else one trained on the training captions."""
    if resume_path is not None:
        return Tokenizer.load(os.path.join(resume_path, "model", TOKENIZER_FILE))
    # the model's vocabulary follows the tokenizer; 514 (bytes + 2 specials) is the least a BPE has
    vocab_size = max(preset(config.preset).vocab_size, MIN_VOCAB_SIZE)
    return Tokenizer.train(training_captions(config, config.tokenizer_captions), vocab_size)


class Run:
    """One training run on this rank: the model and everything around it, ready to take steps.

    Built from a TrainConfig from scratch, or from a checkpoint state (the
    checkpoint's tokenizer, weights, moments, schedule and data position).
    """

    def __init__(self, config, comm, resume_path=None, state=None):
        self.config, self.comm, self.lead = config, comm, comm.rank == 0
        self.tokenizer = prepare_tokenizer(config, resume_path)
        source = load_image_tower(config) if config.image_tower else None
        self.model = CLIP(model_config(config, self.tokenizer, source and source.config), dtype=config.dtype,
                          seed=config.seed)
        self.model.train()
        if source is not None:      # (a resumed run then loads its checkpoint's weights over these)
            self.model.visual.load_state_dict(source.visual.state_dict())
        if config.lock_image:
            lock_image_tower(self.model)
        if comm.size > 1:        # batch norm over the global batch, so that N ranks train exactly as one process
            nn.synchronise_batch_norm(self.model, comm)
        self.optimizer, self.schedule = build_optimizer(self.model, config)
        self.step = 0
        self.seconds_before = 0.0            # training time of the run before this process took over
        if state is not None:
            restore(resume_path, state, self.model, self.optimizer, self.schedule)
            self.step, self.seconds_before = state["step"], state.get("seconds", 0.0)
        distributed.broadcast_parameters(self.model.parameters(), comm)
        self.device = backend.backend_of(self.model.log_scale.data)                # 'numpy' or 'cupy'
        image_size = self.model.config.image_size
        dataset, transform = dataset_of(config, image_size)
        self.loader = Loader(dataset, config.batch_size, seed=config.seed, rank=comm.rank, world_size=comm.size,
                             transform=transform, examples=config.examples,
                             start=state["loader"] if state else None)
        self.eval_sets = evaluation_sets(config, image_size) if config.data is None and self.lead else None
        self.metrics = MetricsLog(os.path.join(config.out, "metrics.jsonl"), self.lead,
                                  self.step if state else None)
        self.progress = Progress(config.steps, self.lead)
        self.checkpoint_path = os.path.join(config.out, CHECKPOINT_DIR)
        self.last_saved = self.step if state else None
        self.started = time.perf_counter()
        self.losses = []                     # the global loss of each step this process ran

    def seconds(self):
        return self.seconds_before + time.perf_counter() - self.started

    def next_batch(self):
        """This rank's (images (b, H, W, 3), tokens (b, T)) on the model's device."""
        images, captions = next(self.loader)
        images = backend.asarray(images, self.device)      # uint8 pixels cross to a GPU at a quarter of float32
        if images.dtype == numpy.uint8:
            images = normalize(images, self.model.config.image_normalization)                   # (b, H, W, 3) float32
        images = backend.asarray(images, self.device, dtype=self.config.dtype)
        tokens = self.tokenizer(captions, context_length=self.model.config.context_length)   # (b, T)
        return images, backend.asarray(tokens, self.device)

    def take_step(self, stop_requested):
        """One training step, logged; returns whether any rank asked to stop."""
        images, tokens = self.next_batch()
        lr = self.optimizer.param_groups[0]["lr"]
        try:
            loss, grad_norm, stop = train_step(self.model, self.optimizer, self.schedule, self.config, self.comm,
                                               images, tokens, stop_requested)
        except NonFiniteLoss as error:
            where = (f"the last good checkpoint is {self.checkpoint_path}" if self.last_saved is not None
                     else "no checkpoint was written yet")
            raise NonFiniteLoss(f"step {self.step + 1}: {error}; training stopped ({where}); "
                                f"try a lower --lr or a longer --warmup-steps") from None
        self.step += 1
        self.losses.append(loss)
        if self.step % self.config.log_every == 0 or self.step == self.config.steps:
            self.metrics.write({"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                                "scale": math.exp(float(self.model.log_scale.item())),
                                "seconds": round(self.seconds(), 3)})
            self.progress.step(self.step, loss, lr, (time.perf_counter() - self.started) / len(self.losses))
        return stop

    def save(self):
        """A checkpoint of the current step (once per step), written by rank 0 while the others wait."""
        if self.last_saved == self.step:
            return
        if self.lead:
            save_checkpoint(self.checkpoint_path, self.model, self.tokenizer, self.optimizer, self.schedule,
                            self.loader, self.config, self.step, round(self.seconds(), 3))
        self.last_saved = self.step
        self.comm.barrier()

    def evaluate(self):
        """The held-out shapes metrics (rank 0, shapes data only; else {}), logged and printed."""
        if self.eval_sets is None:
            return {}
        results = evaluate.evaluate(self.model, self.tokenizer, **self.eval_sets)
        self.metrics.write({"step": self.step, **results})
        self.progress.say(f"eval step {self.step}: "
                          + ", ".join(f"{key} {value:.3f}" for key, value in results.items()))
        return results

    def finish(self):
        """The last evaluation, the final model, summary.json and the pictures; returns the summary."""
        results = self.evaluate()
        summary = {key: results.get(key) for key in SUMMARY_KEYS[:5]}
        summary.update(final_loss=self.losses[-1] if self.losses else None, steps=self.step,
                       seconds=round(self.seconds(), 1))
        if self.lead:
            out = self.config.out
            save_model(self.model, self.tokenizer, os.path.join(out, "model"))
            with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as file:
                json.dump(summary, file, indent=2)
            if self.config.plots:
                draw_pictures(out, self.metrics.records, self.model, self.tokenizer,
                              self.eval_sets["retrieval"] if self.eval_sets else None)
            self.progress.say("summary: " + ", ".join(
                f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                for key, value in summary.items()))
        return summary


def train(config, resume=None, comm=None):
    """Run ``config`` (from its start, or from the checkpoint in ``resume``); returns a TrainResult.

    Raises ValueError for a configuration or checkpoint that does not fit
    (before any training), NonFiniteLoss when the loss diverges.
    """
    comm = distributed.world() if comm is None else comm
    backend.tune_malloc()                       # process-wide settings: asked for here, never at import
    distributed.install_abort_on_error(comm)    # an error on one rank ends the job instead of a hang
    resume_path = checkpoint_folder(resume) if resume is not None else None
    state = read_checkpoint_state(resume_path, config) if resume_path is not None else None
    if config.out is None:
        config = dataclasses.replace(config, out=os.path.dirname(resume_path) if resume_path else default_out())
    if comm.rank == 0:
        os.makedirs(config.out, exist_ok=True)
        with open(os.path.join(config.out, "train_config.json"), "w", encoding="utf-8") as file:
            json.dump(dataclasses.asdict(config), file, indent=2)
    run = Run(config, comm, resume_path, state)
    run.progress.say(f"training {config.preset} with the {config.loss} loss from step {run.step} to "
                     f"{config.steps}: batch {config.batch_size} on {comm.size} process"
                     f"{'es' if comm.size > 1 else ''}, {sum(p.data.size for p in run.model.parameters()):,} "
                     f"parameters, writing to {config.out}")
    interrupted = False
    try:
        with stop_on_sigint() as sigint:
            while run.step < config.steps and not interrupted:
                interrupted = run.take_step(sigint["stop"])
                if config.eval_every and run.step % config.eval_every == 0 and run.step < config.steps:
                    run.evaluate()
                if config.checkpoint_every and run.step % config.checkpoint_every == 0:
                    run.save()
            run.save()
    finally:
        run.loader.close()
    if interrupted:
        run.progress.say(f"interrupted: checkpoint of step {run.step} in {run.checkpoint_path}; "
                         f"continue with --resume {config.out}")
        return TrainResult(config.out, run.losses, run.step, True, {})
    return TrainResult(config.out, run.losses, run.step, False, run.finish())
