"""Data: image loading and preprocessing (transforms.py), the built-in synthetic shapes (shapes.py),
image–caption files and folders (captions.py) and the training batches (loader.py)."""

from . import captions, loader, shapes, transforms
from .captions import CSVCaptions, FolderCaptions
from .loader import Loader
from .shapes import ShapesDataset
from .transforms import load_image, normalize, preprocess, preprocess_batch, random_resized_crop, to_rgb

__all__ = ["CSVCaptions", "FolderCaptions", "Loader", "ShapesDataset", "captions", "load_image", "loader",
           "normalize", "preprocess", "preprocess_batch", "random_resized_crop", "shapes", "to_rgb",
           "transforms"]
