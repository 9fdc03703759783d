"""Data: image loading and the CLIP / SigLIP preprocessing (transforms.py)."""

from . import transforms
from .transforms import load_image, preprocess, preprocess_batch, to_rgb

__all__ = ["load_image", "preprocess", "preprocess_batch", "to_rgb", "transforms"]
