"""Models: the CLIPConfig, its presets, and the two-tower CLIP / SigLIP model."""

from .config import CLIPConfig, PRESETS, preset
from .clip import CLIP
from .text import TextTower
from .vision import ConvTower, VisionTower

__all__ = ["CLIPConfig", "PRESETS", "preset", "CLIP", "TextTower", "VisionTower", "ConvTower"]
