"""A full `tinyclip train` run of a ViT variant of `shapes-vit` (docs/vit.md, section 1b).

    PYTHONPATH=. python docs/vit/run.py MODEL_JSON TRAIN_JSON

MODEL_JSON replaces fields of the `shapes-vit` preset and TRAIN_JSON sets
TrainConfig fields. The two runs of section 1b, each with OPENBLAS_NUM_THREADS=1
TINYCLIP_THREADS=1:

    python docs/vit/run.py '{"vision_width": 64, "vision_layers": 3, "vision_heads": 4, "vision_pooling": "gap",
        "class_token": false, "position_embedding": "sincos"}' '{"steps": 2000, "eval_every": 250,
        "checkpoint_every": 0, "log_every": 50, "out": "runs/A", "plots": false}'
    (B: the same with "vision_attention_init": "mimetic" and "out": "runs/B")

The variant is registered as the preset "probe" for this process only.
"""
import dataclasses
import json
import sys

from tinyclip import train
from tinyclip.models import config

config.PRESETS["probe"] = dataclasses.replace(config.PRESETS["shapes-vit"], **json.loads(sys.argv[1]))
train.CHOICES["preset"] = tuple(config.PRESETS)
train.train(train.TrainConfig(preset="probe", **json.loads(sys.argv[2])))
