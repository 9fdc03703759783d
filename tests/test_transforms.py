"""Tests for tinyclip.data.transforms: loading, mode conversion, CLIP and SigLIP preprocessing.

Sizes and crops are checked on odd aspect ratios, the centre-crop offsets
against torchvision's rounding, the normalisation against hand-computed
values, and every PIL mode converts to RGB; a file that is not an image
gets an error naming it. The training crop: its boxes stay inside the
image within the scale and ratio asked for, fall back as torchvision's do,
and one seed gives one crop; ``normalize`` agrees with ``preprocess``.
"""

import numpy
import pytest
from PIL import Image

from tinyclip.data import load_image, preprocess, preprocess_batch, to_rgb
from tinyclip.data import transforms
from tinyclip.data.transforms import CLIP_MEAN, CLIP_STD, normalize, random_crop_box, random_resized_crop

MODES = ("1", "L", "P", "RGB", "RGBA", "LA", "PA", "CMYK", "I;16", "I;16B", "I", "F", "YCbCr", "HSV", "LAB",
         "RGBX", "RGBa")


def clip_normalised(rgb):
    return (numpy.asarray(rgb, numpy.float32) / numpy.float32(255) - numpy.asarray(CLIP_MEAN, numpy.float32)) \
        / numpy.asarray(CLIP_STD, numpy.float32)


@pytest.mark.parametrize("family", ["clip", "siglip"])
@pytest.mark.parametrize("width, height", [(300, 100), (100, 300), (17, 5), (224, 224), (1, 50), (31, 32)])
def test_any_aspect_ratio_gives_a_square_float32_image(family, width, height):
    image = Image.fromarray(numpy.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=numpy.uint8))
    pixels = preprocess(image, 24, family)
    assert pixels.shape == (24, 24, 3) and pixels.dtype == numpy.float32
    assert numpy.isfinite(pixels).all()


def test_clip_crops_the_centre_of_a_wide_image():
    stripes = numpy.full((10, 30, 3), 255, numpy.uint8)       # white | black | white, 10 columns each
    stripes[:, 10:20] = 0
    pixels = preprocess(Image.fromarray(stripes), 10, "clip")   # the short side is already 10: crop only
    numpy.testing.assert_allclose(pixels, numpy.broadcast_to(clip_normalised([0, 0, 0]), (10, 10, 3)), atol=1e-6)


def test_centre_crop_offsets_round_like_torchvision():
    columns = numpy.arange(13, dtype=numpy.uint8) * 10          # 13 wide, 10 high: crop offset round(1.5) = 2
    image = numpy.repeat(numpy.repeat(columns[None, :, None], 10, axis=0), 3, axis=2)
    pixels = preprocess(Image.fromarray(image), 10, "clip")
    numpy.testing.assert_allclose(pixels[0, :, 0], clip_normalised(image[0, 2:12])[:, 0], atol=1e-6)


def test_siglip_squashes_instead_of_cropping():
    halves = numpy.zeros((10, 40, 3), numpy.uint8)
    halves[:, :20] = 255                                        # white left half, black right half
    pixels = preprocess(Image.fromarray(halves), 10, "siglip")
    numpy.testing.assert_allclose(pixels[:, :4], 1.0, atol=1e-6)     # white -> (1 - 0.5) / 0.5
    numpy.testing.assert_allclose(pixels[:, 6:], -1.0, atol=1e-6)    # black -> -1


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_known_pixel_values_normalise_as_expected(family):
    colour = (255, 0, 128)
    pixels = preprocess(Image.new("RGB", (37, 23), colour), 16, family)
    if family == "clip":
        expected = [(c / 255 - m) / s for c, m, s in zip(colour, CLIP_MEAN, CLIP_STD)]
    else:
        expected = [(c / 255 - 0.5) / 0.5 for c in colour]
    numpy.testing.assert_allclose(pixels, numpy.broadcast_to(expected, pixels.shape), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_every_pil_mode_converts_to_rgb(mode):
    rgb = to_rgb(Image.new(mode, (5, 4)))
    assert rgb.mode == "RGB" and rgb.size == (5, 4)
    assert preprocess(Image.new(mode, (5, 4)), 8).shape == (8, 8, 3)


def test_transparency_is_composited_on_white():
    rgba = numpy.zeros((2, 2, 4), numpy.uint8)
    rgba[0, 0] = (0, 0, 0, 0)          # transparent black -> white
    rgba[0, 1] = (0, 0, 0, 255)        # opaque black stays black
    rgba[1, :] = (255, 0, 0, 128)      # half-transparent red -> pink
    rgb = numpy.asarray(to_rgb(Image.fromarray(rgba, "RGBA")))
    assert tuple(rgb[0, 0]) == (255, 255, 255) and tuple(rgb[0, 1]) == (0, 0, 0)
    assert rgb[1, 0, 0] == 255 and 125 <= rgb[1, 0, 1] <= 129
    palette = Image.new("P", (2, 2), 0)
    palette.info["transparency"] = 0
    assert tuple(numpy.asarray(to_rgb(palette))[0, 0]) == (255, 255, 255)


def test_sixteen_bit_grey_is_scaled_not_clipped():
    grey = numpy.array([[0, 32896, 65535]], numpy.uint16)
    image = Image.new("I;16", (3, 1))
    image.frombytes(grey.astype("<u2").tobytes())
    assert image.getpixel((2, 0)) == 65535
    rgb = numpy.asarray(to_rgb(image))
    numpy.testing.assert_array_equal(rgb[0, :, 0], [0, 128, 255])
    numpy.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])


@pytest.mark.parametrize("mode, suffix", [("L", "png"), ("P", "gif"), ("LA", "png"), ("CMYK", "jpg"),
                                          ("I;16", "png"), ("RGBA", "png"), ("RGB", "jpg")])
def test_load_image_reads_files_of_every_kind(tmp_path, mode, suffix):
    path = tmp_path / f"picture.{suffix}"
    Image.new(mode, (6, 3)).save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (6, 3)
    assert preprocess(path, 8).shape == (8, 8, 3)


def test_an_undecodable_file_is_named(tmp_path):
    junk = tmp_path / "not-a-picture.png"
    junk.write_bytes(b"this is not an image")
    with pytest.raises(ValueError, match="not-a-picture.png"):
        load_image(junk)
    whole = tmp_path / "whole.png"
    Image.fromarray(numpy.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=numpy.uint8)).save(whole)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(whole.read_bytes()[:200])
    with pytest.raises(ValueError, match="truncated.png"):
        load_image(truncated)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")


def test_batches_and_bad_arguments():
    images = [Image.new("RGB", (30, 20)), Image.new("L", (20, 30))]
    batch = preprocess_batch(images, 16, "siglip")
    assert batch.shape == (2, 16, 16, 3) and batch.dtype == numpy.float32
    numpy.testing.assert_array_equal(batch[1], preprocess(images[1], 16, "siglip"))
    with pytest.raises(ValueError, match="no images"):
        preprocess_batch([], 16)
    with pytest.raises(ValueError, match="family must be one of"):
        preprocess(images[0], 16, "dino")
    with pytest.raises(ValueError, match="image_size must be a positive int"):
        preprocess(images[0], 0)
    with pytest.raises(TypeError, match="PIL image or a path"):
        preprocess(numpy.zeros((4, 4, 3)), 16)


@pytest.mark.parametrize("width, height", [(40, 30), (30, 40), (7, 7), (1000, 10), (10, 1000), (1, 1)])
def test_crop_boxes_stay_inside_the_image(width, height):
    for seed in range(200):
        left, top, crop_width, crop_height = random_crop_box(width, height, numpy.random.default_rng(seed))
        assert 0 <= left and left + crop_width <= width and 0 < crop_width
        assert 0 <= top and top + crop_height <= height and 0 < crop_height


def test_crop_boxes_keep_scale_and_ratio_within_their_ranges():
    for seed in range(200):
        _, _, crop_width, crop_height = random_crop_box(200, 150, numpy.random.default_rng(seed), (0.5, 0.8))
        assert 0.5 * 0.98 <= crop_width * crop_height / (200 * 150) <= 0.8 * 1.02      # sides are rounded
        assert 3 / 4 * 0.98 <= crop_width / crop_height <= 4 / 3 * 1.02


def test_too_thin_an_image_falls_back_to_the_centre_like_torchvision():
    # no box of 90-100 % of a 1000 x 10 image has a ratio within [3/4, 4/3]: full height, width round(10 * 4/3)
    assert random_crop_box(1000, 10, numpy.random.default_rng(0)) == ((1000 - 13) // 2, 0, 13, 10)
    assert random_crop_box(10, 1000, numpy.random.default_rng(0)) == (0, (1000 - 13) // 2, 10, 13)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_random_resized_crop_is_one_crop_per_seed(family):
    image = Image.fromarray(numpy.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=numpy.uint8))
    first = random_resized_crop(image, 16, numpy.random.default_rng(1), family)
    assert first.shape == (16, 16, 3) and first.dtype == numpy.float32
    numpy.testing.assert_array_equal(first, random_resized_crop(image, 16, numpy.random.default_rng(1), family))
    assert not numpy.array_equal(first, random_resized_crop(image, 16, numpy.random.default_rng(2), family))


def test_the_whole_image_as_the_crop_is_siglip_preprocessing():
    image = Image.fromarray(numpy.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=numpy.uint8))
    whole = random_resized_crop(image, 12, numpy.random.default_rng(0), "siglip", scale=(1, 1), ratio=(1.5, 1.5))
    numpy.testing.assert_array_equal(whole, preprocess(image, 12, "siglip"))


def test_a_crop_of_one_colour_normalises_to_that_colour():
    pixels = random_resized_crop(Image.new("RGB", (50, 40), (255, 0, 128)), 8, numpy.random.default_rng(0))
    numpy.testing.assert_allclose(pixels, numpy.broadcast_to(clip_normalised([255, 0, 128]), (8, 8, 3)), atol=1e-5)


def test_random_resized_crop_rejects_bad_arguments():
    image, rng = Image.new("RGB", (8, 8)), numpy.random.default_rng(0)
    with pytest.raises(ValueError, match="random_resized_crop: family"):
        random_resized_crop(image, 8, rng, "dino")
    with pytest.raises(ValueError, match="scale must be"):
        random_resized_crop(image, 8, rng, scale=(1.0, 0.5))
    with pytest.raises(ValueError, match="ratio must be"):
        random_resized_crop(image, 8, rng, ratio=(0, 1))
    with pytest.raises(TypeError, match="PIL image or a path"):
        random_resized_crop(numpy.zeros((8, 8, 3)), 8, rng)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_normalize_matches_preprocess_on_a_batch(family):
    images = numpy.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=numpy.uint8)
    batch = normalize(images, family)
    assert batch.shape == (3, 8, 8, 3) and batch.dtype == numpy.float32
    for image, normalised in zip(images, batch):
        numpy.testing.assert_array_equal(normalised, preprocess(Image.fromarray(image), 8, family))


def test_normalize_keeps_empty_shapes():
    """A batch with no pixels (no images, or images of zero height or width) gives float32 of its shape, as a
    single empty image does: reshape(-1, 0, W, 3) cannot infer the image count, so it must not be asked to."""
    for shape in ((0, 4, 4, 3), (2, 0, 4, 3), (2, 4, 0, 3), (1, 2, 0, 4, 3), (0, 4, 3)):
        out = normalize(numpy.zeros(shape, numpy.uint8))
        assert out.shape == shape and out.dtype == numpy.float32


def test_normalize_takes_only_uint8_rgb():
    with pytest.raises(TypeError, match="uint8"):
        normalize(numpy.zeros((2, 4, 4, 3), numpy.float32))
    with pytest.raises(ValueError, match=r"\(..., H, W, 3\)"):
        normalize(numpy.zeros((4, 4, 4), numpy.uint8))
    with pytest.raises(ValueError, match="normalize: family"):
        normalize(numpy.zeros((4, 4, 3), numpy.uint8), "dino")


# ---- EXIF orientation (issue 12): every path that opens an image uses it upright --------------------------------

# what each EXIF Orientation asks a viewer to do to the stored pixels, written with NumPy (not PIL) as the oracle
UPRIGHT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],                       # mirrored left-right
    3: lambda a: a[::-1, ::-1],                    # upside down
    4: lambda a: a[::-1],                          # mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),             # mirrored along the main diagonal
    6: lambda a: numpy.rot90(a, -1),               # the camera turned a quarter: rotate clockwise
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # mirrored along the other diagonal
    8: lambda a: numpy.rot90(a, 1),                # rotate anticlockwise
}


def write_oriented_jpeg(path, orientation, width=80, height=40):
    """An 80 × 40 JPEG whose EXIF says ``orientation``; its stored pixels, decoded, are returned."""
    blocks = numpy.random.default_rng(orientation).integers(0, 256, (height // 8, width // 8, 3), dtype=numpy.uint8)
    pixels = numpy.repeat(numpy.repeat(blocks, 8, axis=0), 8, axis=1)     # flat 8 × 8 blocks survive JPEG well
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(path, "JPEG", quality=95, exif=exif.tobytes())
    with Image.open(path) as stored:                                       # the pixels as stored, not turned
        return numpy.asarray(stored.convert("RGB"))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_load_image_turns_every_exif_orientation_upright(tmp_path, orientation):
    stored = write_oriented_jpeg(tmp_path / "photo.jpg", orientation)
    image = load_image(tmp_path / "photo.jpg")
    assert image.size == ((80, 40) if orientation < 5 else (40, 80))     # (width, height) as a viewer shows it
    numpy.testing.assert_array_equal(numpy.asarray(image), UPRIGHT[orientation](stored))


@pytest.mark.parametrize("family", ["clip", "siglip"])
@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_preprocess_of_a_path_or_an_opened_image_is_upright(tmp_path, orientation, family):
    stored = write_oriented_jpeg(tmp_path / "photo.jpg", orientation)
    expected = preprocess(Image.fromarray(numpy.ascontiguousarray(UPRIGHT[orientation](stored))), 24, family)
    numpy.testing.assert_array_equal(preprocess(tmp_path / "photo.jpg", 24, family), expected)
    with Image.open(tmp_path / "photo.jpg") as opened:                   # a PIL image straight from Image.open
        numpy.testing.assert_array_equal(preprocess(opened, 24, family), expected)
    numpy.testing.assert_array_equal(preprocess_batch([tmp_path / "photo.jpg"], 24, family)[0], expected)
    rng = numpy.random.default_rng(0)
    crop = random_resized_crop(tmp_path / "photo.jpg", 24, numpy.random.default_rng(0), family)
    assert crop.shape == (24, 24, 3)
    upright_crop = random_resized_crop(Image.fromarray(numpy.ascontiguousarray(UPRIGHT[orientation](stored))), 24,
                                       rng, family)
    numpy.testing.assert_array_equal(crop, upright_crop)


def test_upright_twice_is_upright_once(tmp_path):
    write_oriented_jpeg(tmp_path / "photo.jpg", 6)
    once = load_image(tmp_path / "photo.jpg")
    numpy.testing.assert_array_equal(numpy.asarray(transforms.upright(once)), numpy.asarray(once))
    assert transforms.upright(once).size == (40, 80)


def test_a_crop_without_a_family_is_the_uint8_pixels_the_normalised_crop_is_made_of():
    """The trainer's loader sends uint8 crops (a quarter of the bytes) and normalises batches later."""
    from tinyclip.data.transforms import normalize, random_resized_crop
    from PIL import Image
    image = Image.fromarray(numpy.random.default_rng(3).integers(0, 256, (37, 53, 3), dtype=numpy.uint8))
    for family in ("clip", "siglip"):
        pixels = random_resized_crop(image, 16, numpy.random.default_rng(7), family=None)
        normalised = random_resized_crop(image, 16, numpy.random.default_rng(7), family=family)
        assert pixels.dtype == numpy.uint8 and pixels.shape == (16, 16, 3)
        numpy.testing.assert_array_equal(normalize(pixels[None], family)[0], normalised)   # bit for bit
