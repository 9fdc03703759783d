"""What every experiment shares: a small model, a training loop you can see into, and the JSON + plot output.

The experiments train the ``shapes`` preset made smaller (32 px images, a
narrower CNN, one text layer), so that one run of a few hundred steps takes
seconds to a minute on a laptop CPU. ``Toy`` is the training loop of
``tinyclip.train`` taken apart — the same model, tokenizer, AdamW with
warm-up + cosine and, by default, the same step (``tinyclip.train.train_step``)
— so that an experiment can change the data a step sees, the loss it takes,
or look at the embeddings between steps.
"""

import argparse
import functools
import json
import math
import os
import platform
import sys
import time

# One BLAS thread unless told otherwise, set before NumPy loads BLAS: these models are small, and on a 2-core
# machine shared with other work, two OpenBLAS threads spinning against the other processes made a step of
# batch 64 13x slower (2.86 s against 0.22 s, measured with the load average at 6).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy                                   # noqa: E402  (after the BLAS setting)

from tinyclip import evaluate, optim          # noqa: E402
from tinyclip.data import shapes
from tinyclip.data.transforms import model_input
from tinyclip.distributed import SingleProcess
from tinyclip.models import CLIP
from tinyclip.train import TrainConfig, build_optimizer, model_config, prepare_tokenizer, train_step

# the shapes preset, smaller: 4x fewer pixels, half the channels, one text layer
SMALL = {"image_size": 32, "conv_channels": (16, 32, 64, 128), "text_layers": 1, "embed_dim": 64}
EVAL_PER_CLASS = 3            # zero-shot images per colour x shape class (60 classes -> 180 images)
EVAL_PAIRS = 200              # held-out retrieval pairs and relation-probe images


def arguments(doc, **defaults):
    """The command line every experiment takes: --quick, --seeds, --out."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps of everything: checks the script runs")
    parser.add_argument("--seeds", type=int, default=defaults.get("seeds", 1), help="seeds per setting")
    parser.add_argument("--out", default="docs/experiments", help="folder for the JSON and the plot")
    return parser


def config(quick=False, **fields):
    """A TrainConfig for the small model: nothing written to disk, no evaluation while training."""
    small = SMALL if fields.get("preset", "shapes") == "shapes" else {  # a ViT tower has no conv_channels
        key: value for key, value in SMALL.items() if key != "conv_channels"}
    overrides = dict(small, **fields.pop("model_overrides", {}))
    base = dict(preset="shapes", model_overrides=overrides, plots=False, eval_every=0, checkpoint_every=0,
                tokenizer_captions=400 if quick else 2000, eval_per_class=EVAL_PER_CLASS, eval_pairs=EVAL_PAIRS)
    base.update(fields)
    return TrainConfig(**base)


@functools.lru_cache(maxsize=None)
def _tokenizer(seed, count):
    return prepare_tokenizer(TrainConfig(seed=seed, tokenizer_captions=count))


@functools.lru_cache(maxsize=None)
def eval_sets(quick, image_size=SMALL["image_size"]):
    """The held-out shapes sets (zero-shot, retrieval, relation probe) at the small model's image size."""
    return evaluate.shapes_sets(1 if quick else EVAL_PER_CLASS, 40 if quick else EVAL_PAIRS, image_size)


class Toy:
    """One training run, a step at a time: ``toy.step()`` trains on the next batch, ``toy.evaluate()`` scores.

    ``corrupt(indices, images, captions) -> (images, captions)`` changes a batch
    before the model sees it (noisy pairs); ``loss_fn(toy, indices, images, captions)``
    replaces the standard step's loss (it returns a scalar Tensor).
    """

    def __init__(self, cfg, corrupt=None, loss_fn=None):
        self.cfg, self.corrupt, self.loss_fn = cfg, corrupt, loss_fn
        self.tokenizer = _tokenizer(cfg.seed, cfg.tokenizer_captions)
        self.model = CLIP(model_config(cfg, self.tokenizer), dtype=cfg.dtype, seed=cfg.seed)
        self.model.train()
        self.optimizer, self.schedule = build_optimizer(self.model, cfg)
        self.data = shapes.ShapesDataset(seed=cfg.seed, image_size=self.model.config.image_size, cache_size=0)
        self.comm = SingleProcess()
        self.steps_done = 0

    def tokens(self, captions):
        return self.tokenizer(captions, context_length=self.model.config.context_length)

    def pixels(self, images):
        return model_input(images, self.model.config.image_normalization, "numpy", self.cfg.dtype)

    def batch(self):
        """The next training batch: (item indices, uint8 images (B, H, W, 3), captions), corrupted if asked."""
        start = self.steps_done * self.cfg.batch_size
        indices = list(range(start, start + self.cfg.batch_size))      # fresh items: no example is seen twice
        images, captions = self.data.batch(indices)
        if self.corrupt is not None:
            images, captions = self.corrupt(indices, images, captions)
        return indices, images, captions

    def step(self):
        """One optimiser step; returns the loss."""
        indices, images, captions = self.batch()
        if self.loss_fn is None:
            loss = train_step(self.model, self.optimizer, self.schedule, self.cfg, self.comm, self.pixels(images),
                              self.tokens(captions), False)[0]
        else:
            loss = self.custom_step(indices, images, captions)
        self.steps_done += 1
        return loss

    def custom_step(self, indices, images, captions):
        """train_step with ``loss_fn`` for the loss: backward, clip, AdamW, schedule, CLIP's cap on the scale."""
        self.optimizer.zero_grad()
        loss = self.loss_fn(self, indices, images, captions)
        loss.backward()
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        optim.clip_grad_norm(parameters, self.cfg.grad_clip)
        self.optimizer.step()
        self.schedule.step()
        if self.cfg.loss == "clip":
            self.model.log_scale.data[...] = numpy.minimum(self.model.log_scale.data, math.log(self.cfg.max_scale))
        return float(loss.item())

    def run(self, every=None, callback=None):
        """All ``cfg.steps`` steps; ``callback(toy)`` after every ``every``-th. Returns the losses."""
        losses = []
        while self.steps_done < self.cfg.steps:
            losses.append(self.step())
            if callback is not None and every and self.steps_done % every == 0:
                callback(self)
        return losses

    def evaluate(self, quick=False):
        """Held-out zero-shot top-1, retrieval R@1 both ways, relation and control accuracy."""
        self.model.eval()
        try:
            metrics = evaluate.evaluate(self.model, self.tokenizer, **eval_sets(quick, self.model.config.image_size))
        finally:
            self.model.train()
        keep = ("zeroshot_top1", "retrieval_i2t_r1", "retrieval_t2i_r1", "relation_acc", "control_acc")
        return {key: round(float(metrics[key]), 4) for key in keep}


def machine():
    """Where the figures were measured: CPU, cores, load, Python and NumPy."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            model = next(line.split(":", 1)[1].strip() for line in file if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": model, "cores": os.cpu_count(), "load_average": [round(x, 2) for x in load] if load else None,
            "python": platform.python_version(), "numpy": numpy.__version__}


def mean_spread(values):
    """{"mean", "std", "values"} of a list of per-seed figures (std 0 for one seed)."""
    values = [float(v) for v in values]
    return {"mean": round(float(numpy.mean(values)), 4), "std": round(float(numpy.std(values)), 4),
            "values": [round(v, 4) for v in values]}


def write(out, name, results, started, figure=None):
    """Write ``out/name.json`` (results + command + machine + seconds) and ``out/name.png`` (``figure``)."""
    os.makedirs(out, exist_ok=True)
    record = {"experiment": name, "command": "python " + " ".join(sys.argv), "machine": machine(),
              "seconds": round(time.perf_counter() - started, 1), **results}
    path = os.path.join(out, f"{name}.json")
    with open(path + ".tmp", "w", encoding="utf-8") as file:
        json.dump(record, file, indent=1)
    os.replace(path + ".tmp", path)
    if figure is not None:
        figure.savefig(os.path.join(out, f"{name}.png"), dpi=110, bbox_inches="tight")
    print(f"wrote {path} in {record['seconds']} s")
    return record


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt
