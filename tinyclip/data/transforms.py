"""Image loading and preprocessing as OpenAI CLIP and SigLIP do it.

CLIP (Radford et al. 2021, ``clip/clip.py``): resize the shortest side to
the model's image size with bicubic interpolation, crop the centre square,
scale to [0, 1] and normalise each channel with the mean and standard
deviation of CLIP's training images. SigLIP (Zhai et al. 2023, Hugging
Face ``SiglipImageProcessor``): resize the whole image to a square (no
crop, the aspect ratio is not kept), scale to [0, 1], normalise with mean =
std = 0.5, which maps pixels to [-1, 1].

Images come out as (H, W, 3) float32 NumPy arrays, the layout the vision
tower takes; ``preprocess_batch`` stacks them to (B, H, W, 3).

Every PIL mode becomes 8-bit RGB first (``to_rgb``). Transparent images are
composited on white: OpenAI's ``.convert("RGB")`` drops the alpha channel
and shows whatever colour the encoder left under transparent pixels (often
black), which carries no meaning; white is what a viewer shows. 16-bit
images are scaled to 8 bits (PIL's own conversion clips them at 255).
"""

import os

import numpy
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
FAMILIES = ("clip", "siglip")


def load_image(path):
    """The image at ``path`` as an RGB PIL image; a ValueError naming the file if it cannot be decoded."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no image file at {path!r}")
    try:
        with Image.open(path) as image:
            image.load()                       # decode now, so a truncated file fails here
            return to_rgb(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"cannot decode image {path!r}: {error}") from None


def to_rgb(image):
    """Any PIL image as 8-bit RGB: alpha composited on white, 16-bit scaled, palette / CMYK / grey converted."""
    if image.mode.startswith("I"):            # 16- or 32-bit integer grey ("I;16", "I;16B", "I"): 0..65535
        grey = numpy.asarray(image, dtype=numpy.float64)
        grey = numpy.clip(numpy.round(grey / 257.0), 0, 255).astype(numpy.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except ValueError as error:
        raise ValueError(f"cannot convert an image of PIL mode {image.mode!r} to RGB: {error}") from None


def _resize_shortest_side(image, size):
    """Scale so the shorter side is ``size``, the longer one int(size · long / short) as in torchvision."""
    width, height = image.size
    if width <= height:
        new_size = (size, int(size * height / width))
    else:
        new_size = (int(size * width / height), size)
    return image.resize(new_size, Image.BICUBIC) if new_size != image.size else image


def _centre_crop(image, size):
    """The centre size × size square; offsets round((side - size) / 2) as torchvision's CenterCrop."""
    width, height = image.size
    left = round((width - size) / 2.0)
    top = round((height - size) / 2.0)
    return image.crop((left, top, left + size, top + size))


def preprocess(image, image_size, family="clip"):
    """A PIL image (or a path) → (image_size, image_size, 3) float32, normalised for ``family``."""
    if family not in FAMILIES:
        raise ValueError(f"preprocess: family must be one of {FAMILIES}, got {family!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"preprocess: image_size must be a positive int, got {image_size!r}")
    if isinstance(image, (str, os.PathLike)):
        image = load_image(image)
    elif not isinstance(image, Image.Image):
        raise TypeError(f"preprocess: expected a PIL image or a path, got {type(image).__name__}")
    else:
        image = to_rgb(image)
    if min(image.size) == 0:
        raise ValueError(f"preprocess: the image is empty (size {image.size})")
    if family == "clip":
        image = _centre_crop(_resize_shortest_side(image, image_size), image_size)
        mean, std = CLIP_MEAN, CLIP_STD
    else:
        image = image.resize((image_size, image_size), Image.BICUBIC)
        mean, std = SIGLIP_MEAN, SIGLIP_STD
    pixels = numpy.asarray(image, dtype=numpy.float32) / numpy.float32(255.0)       # (H, W, 3) in [0, 1]
    return (pixels - numpy.asarray(mean, numpy.float32)) / numpy.asarray(std, numpy.float32)


def preprocess_batch(images, image_size, family="clip"):
    """A sequence of PIL images or paths → (B, image_size, image_size, 3) float32."""
    images = list(images)
    if not images:
        raise ValueError("preprocess_batch: no images given")
    return numpy.stack([preprocess(image, image_size, family) for image in images])
