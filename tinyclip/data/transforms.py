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

Every image is used upright (``upright``): a photo whose EXIF Orientation
says the camera was turned is rotated / flipped as a photo viewer and
transformers' ``load_image`` show it (``PIL.ImageOps.exif_transpose``);
``load_image`` is the one place tinyclip opens an image file, and a PIL
image given directly is made upright too. Every PIL mode becomes 8-bit RGB
(``to_rgb``). Transparent images are
composited on white: OpenAI's ``.convert("RGB")`` drops the alpha channel
and shows whatever colour the encoder left under transparent pixels (often
black), which carries no meaning; white is what a viewer shows. 16-bit
images are scaled to 8 bits (PIL's own conversion clips them at 255).

For training, ``random_resized_crop`` is the augmentation open_clip uses
(torchvision's ``RandomResizedCrop`` with scale (0.9, 1.0), bicubic, after
Szegedy et al. 2015, "Going deeper with convolutions", section 6): a random
box of 90-100 % of the area and aspect ratio within [3/4, 4/3], resized to
the square input. ``normalize`` turns uint8 pixels, one image or a batch,
NumPy or CuPy, into the normalised floats the model takes.
"""

import math
import os

import numpy
from PIL import Image, ImageOps

from .. import backend, parallel

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
FAMILIES = ("clip", "siglip")


EXIF_ORIENTATION = 0x0112   # the EXIF tag: 1 upright, 2-8 the flips and quarter turns that make it upright


def load_image(path):
    """The image at ``path`` as an upright RGB PIL image (EXIF orientation applied).

    Raises FileNotFoundError when there is no file at ``path`` and a
    ValueError naming the file when it cannot be decoded.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no image file at {path!r}")
    try:
        with Image.open(path) as image:
            image.load()                       # decode now, so a truncated file fails here
            return to_rgb(upright(image))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"cannot decode image {path!r}: {error}") from None


def upright(image):
    """A PIL image as it is meant to be seen: transposed by its EXIF Orientation tag (2-8), else itself.

    An 80 × 40 JPEG with Orientation 6 (the camera turned a quarter) becomes
    40 × 80, as ``PIL.ImageOps.exif_transpose``, photo viewers and
    transformers' ``load_image`` show it. The result carries no Orientation
    tag, so making an image upright twice changes nothing.
    """
    if image.getexif().get(EXIF_ORIENTATION, 1) in (1, None):
        return image
    return ImageOps.exif_transpose(image)


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


def _check_family(family, caller):
    if family not in FAMILIES:
        raise ValueError(f"{caller}: family must be one of {FAMILIES}, got {family!r}")


def _checked_rgb_image(image, image_size, family, caller):
    """Validate the arguments shared by ``preprocess`` and ``random_resized_crop``; the image as RGB PIL.

    ``family`` None (only ``random_resized_crop`` allows it) means: no normalisation.
    """
    if family is not None or caller != "random_resized_crop":
        _check_family(family, caller)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"{caller}: image_size must be a positive int, got {image_size!r}")
    if isinstance(image, (str, os.PathLike)):
        image = load_image(image)
    elif not isinstance(image, Image.Image):
        raise TypeError(f"{caller}: expected a PIL image or a path, got {type(image).__name__}")
    else:
        image = to_rgb(upright(image))
    if min(image.size) == 0:
        raise ValueError(f"{caller}: the image is empty (size {image.size})")
    return image


def preprocess(image, image_size, family="clip"):
    """A PIL image (or a path) → (image_size, image_size, 3) float32, normalised for ``family``."""
    image = _checked_rgb_image(image, image_size, family, "preprocess")
    if family == "clip":
        image = _centre_crop(_resize_shortest_side(image, image_size), image_size)
    else:
        image = image.resize((image_size, image_size), Image.BICUBIC)
    return normalize(numpy.asarray(image), family)


def normalize(pixels, family="clip"):
    """uint8 RGB pixels (..., H, W, 3), NumPy or CuPy → float32 of the same shape, normalised for ``family``.

    ``(pixels / 255 - mean) / std`` per channel, on the array's own device,
    so a batch of uint8 images can cross to the GPU at a quarter of the
    float32 size and be normalised there.
    """
    _check_family(family, "normalize")
    dtype = getattr(pixels, "dtype", None)
    if dtype != numpy.uint8:
        raise TypeError(f"normalize: expected uint8 pixels, got {type(pixels).__name__} of dtype {dtype}")
    if pixels.ndim < 3 or pixels.shape[-1] != 3:
        raise ValueError(f"normalize: expected pixels of shape (..., H, W, 3), got {pixels.shape}")
    xp = backend.get_array_module(pixels)
    mean, std = (CLIP_MEAN, CLIP_STD) if family == "clip" else (SIGLIP_MEAN, SIGLIP_STD)
    out = xp.empty(pixels.shape, xp.float32)
    # one image is cut into blocks of its rows, a batch (..., H, W, 3) into blocks of images; the image count
    # is spelled out because reshape cannot infer a -1 beside a zero height or width
    blocks = pixels.shape if pixels.ndim == 3 else (math.prod(pixels.shape[:-3]), *pixels.shape[-3:])
    parallel.map_rows(_normalize_rows, out.reshape(blocks), pixels.reshape(blocks),
                      xp.asarray(mean, xp.float32).reshape(1, 3), xp.asarray(std, xp.float32).reshape(1, 3))
    return out


def _normalize_rows(out, pixels, mean, std):
    """out = (pixels / 255 - mean) / std in float32 on a block of rows (``normalize``); mean and std (1, 3)."""
    xp = backend.get_array_module(pixels)
    xp.divide(pixels, xp.float32(255.0), out=out, dtype=xp.float32)   # (..., 3) in [0, 1]
    out -= mean
    out /= std


def model_input(images, family, device, dtype):
    """A batch (n, H, W, 3) as a model takes it: on ``device`` ('numpy' or 'cupy'), in ``dtype``.

    uint8 pixels cross to the device first, at a quarter of float32's bytes,
    and are normalised there for ``family`` (``normalize``); floating-point
    images are taken as already preprocessed and only moved and cast.
    Raises TypeError for any other dtype.
    """
    batch = backend.asarray(images, device)                                            # (n, H, W, 3)
    if batch.dtype == numpy.uint8:
        batch = normalize(batch, family)
    elif batch.dtype.kind != "f":
        raise TypeError(f"model_input: images must be uint8 pixels or preprocessed floats, got {batch.dtype}")
    return batch.astype(dtype, copy=False)


def random_crop_box(width, height, rng, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3)):
    """A random crop (left, top, crop_width, crop_height) inside a width × height image, as torchvision draws it.

    Up to ten tries: an area fraction uniform in ``scale``, an aspect ratio
    (width / height) log-uniform in ``ratio``, sides rounded; the first box
    that fits is placed uniformly at random. When none fits (a very thin
    image), the centre box of the whole image with its ratio clamped to
    ``ratio``, as torchvision's ``RandomResizedCrop.get_params`` falls back.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        crop_width = round(math.sqrt(target_area * aspect_ratio))
        crop_height = round(math.sqrt(target_area / aspect_ratio))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = int(rng.integers(0, height - crop_height + 1))
            left = int(rng.integers(0, width - crop_width + 1))
            return left, top, crop_width, crop_height
    image_ratio = width / height
    if image_ratio < min(ratio):                # taller than allowed: full width, the tallest allowed height
        crop_width, crop_height = width, round(width / min(ratio))
    elif image_ratio > max(ratio):              # wider than allowed: full height, the widest allowed width
        crop_width, crop_height = round(height * max(ratio)), height
    else:
        crop_width, crop_height = width, height
    return (width - crop_width) // 2, (height - crop_height) // 2, crop_width, crop_height


def random_resized_crop(image, image_size, rng, family="clip", scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3)):
    """A PIL image (or a path) → a random crop resized to (image_size, image_size, 3) float32, normalised.

    The training augmentation of open_clip (``RandomResizedCrop`` with
    bicubic resizing); the box comes from ``random_crop_box`` with the
    NumPy Generator ``rng``, so one seed gives one crop. With ``family``
    None the crop comes back as its uint8 pixels, unnormalised: the trainer
    normalises whole batches later (``model_input``, the same arithmetic),
    so loader workers send a quarter of the bytes. Raises ValueError for a
    bad size, scale, ratio or family, TypeError for something not an image.
    """
    image = _checked_rgb_image(image, image_size, family, "random_resized_crop")
    for name, (low, high) in (("scale", scale), ("ratio", ratio)):
        if not 0 < low <= high:
            raise ValueError(f"random_resized_crop: {name} must be (low, high) with 0 < low <= high, got {(low, high)}")
    width, height = image.size
    left, top, crop_width, crop_height = random_crop_box(width, height, rng, scale, ratio)
    # crop first, then resize, as torchvision's resized_crop: the filter sees no pixels outside the box
    crop = image.crop((left, top, left + crop_width, top + crop_height))
    pixels = numpy.asarray(crop.resize((image_size, image_size), Image.BICUBIC))           # (S, S, 3) uint8
    return pixels if family is None else normalize(pixels, family)


def preprocess_batch(images, image_size, family="clip"):
    """A sequence of PIL images or paths → (B, image_size, image_size, 3) float32."""
    images = list(images)
    if not images:
        raise ValueError("preprocess_batch: no images given")
    return numpy.stack([preprocess(image, image_size, family) for image in images])
