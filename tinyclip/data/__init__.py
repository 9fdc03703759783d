"""Data: image loading and preprocessing (transforms.py), the built-in synthetic shapes (shapes.py),
image–caption files and folders (captions.py), webdataset tar shards (shards.py), labelled class folders
(classes.py) and the training batches (loader.py)."""

from . import captions, classes, loader, shapes, shards, transforms
from .captions import CSVCaptions, FolderCaptions
from .classes import ImageClasses
from .loader import Loader
from .shapes import ShapesDataset
from .shards import ShardCaptions
from .transforms import load_image, normalize, preprocess, preprocess_batch, random_resized_crop, to_rgb

__all__ = ["CSVCaptions", "FolderCaptions", "ImageClasses", "Loader", "ShapesDataset", "ShardCaptions", "captions",
           "classes", "load_image", "loader", "normalize", "preprocess", "preprocess_batch", "random_resized_crop",
           "shapes", "shards", "to_rgb", "transforms"]
