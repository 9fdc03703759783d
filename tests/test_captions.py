"""Tests for tinyclip.data.captions: CSV/TSV tables and folders of images with .txt captions.

Every data set here is a few 4×4 PNGs in pytest's tmp_path. Checked: paths
relative to the table's folder, the separator taken from the suffix, errors
that name the file and the columns it has, empty rows and uncaptioned images
skipped with one warning, and broken images skipped and counted by default
or raising with the file's name under strict.
"""

import os
import warnings

import numpy
import pytest
from PIL import Image

from tinyclip.data.captions import CSVCaptions, FolderCaptions


def write_png(path, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(numpy.full((4, 4, 3), value, numpy.uint8)).save(path)
    return path


def write_table(path, rows, separator=","):
    path.write_text("\n".join(separator.join(row) for row in rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def three_pairs(tmp_path):
    """A CSV in data/ naming images by relative paths (one in a subfolder) and by an absolute path."""
    write_png(tmp_path / "data" / "red.png", 10)
    write_png(tmp_path / "data" / "sub" / "green.png", 20)
    elsewhere = write_png(tmp_path / "elsewhere" / "blue.png", 30)
    return write_table(tmp_path / "data" / "pairs.csv", [
        ("filepath", "title"), ("red.png", "a red square"), ("sub/green.png", "a green square"),
        (str(elsewhere), "a blue square")])


def test_csv_paths_are_relative_to_the_table(three_pairs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                     # not the table's folder
    pairs = CSVCaptions(three_pairs)
    assert len(pairs) == 3
    assert pairs.path(0) == str(tmp_path / "data" / "red.png")
    assert pairs.path(1) == str(tmp_path / "data" / "sub" / "green.png")
    assert pairs.path(2) == str(tmp_path / "elsewhere" / "blue.png")
    assert [pairs.caption(i) for i in range(3)] == ["a red square", "a green square", "a blue square"]
    image = pairs.load(1)
    assert image.mode == "RGB" and image.size == (4, 4) and image.getpixel((0, 0)) == (20, 20, 20)


def test_tsv_separator_comes_from_the_suffix_and_columns_can_be_named(tmp_path):
    write_png(tmp_path / "a.png")
    table = write_table(tmp_path / "pairs.tsv", [("image", "text"), ("a.png", "one, two, three")], "\t")
    pairs = CSVCaptions(table, image_column="image", caption_column="text")
    assert pairs.caption(0) == "one, two, three"
    renamed = write_table(tmp_path / "pairs.txt", [("image", "text"), ("a.png", "semi")], ";")
    with pytest.raises(ValueError, match="separator"):
        CSVCaptions(renamed, "image", "text")
    assert CSVCaptions(renamed, "image", "text", separator=";").caption(0) == "semi"


def test_missing_columns_are_named_with_the_columns_found(tmp_path):
    table = write_table(tmp_path / "pairs.csv", [("image", "caption"), ("a.png", "x")])
    with pytest.raises(ValueError, match="pairs.csv") as error:
        CSVCaptions(table)
    message = str(error.value)
    assert "'filepath'" in message and "'title'" in message and "['image', 'caption']" in message
    with pytest.raises(ValueError, match="no column 'title'") as error:
        CSVCaptions(table, image_column="image")
    assert "--image-column and --caption-column" in str(error.value)    # the flags a command-line user types


def test_a_missing_table_or_folder_is_named_as_missing(tmp_path):
    # a missing folder given to the table reader has no suffix: "no such file", not a question about separators
    for name in ("nowhere.csv", "nowhere"):
        with pytest.raises(ValueError, match=f"{tmp_path / name}: no such file or folder"):
            CSVCaptions(tmp_path / name)


def test_empty_tables_fail_at_construction(tmp_path):
    header_only = write_table(tmp_path / "header.csv", [("filepath", "title")])
    with pytest.raises(ValueError, match="header.csv.*empty"):
        CSVCaptions(header_only)
    nothing = tmp_path / "nothing.csv"
    nothing.write_text("")
    with pytest.raises(ValueError, match=r"nothing.csv.*columns are \[\]"):
        CSVCaptions(nothing)


def test_rows_with_an_empty_path_or_caption_are_skipped_and_counted(tmp_path):
    write_png(tmp_path / "a.png")
    table = write_table(tmp_path / "pairs.csv", [
        ("filepath", "title"), ("a.png", "kept"), ("", "no image"), ("a.png", "   "), ("a.png",)])
    with pytest.warns(UserWarning, match="skipped 3 rows"):
        pairs = CSVCaptions(table)
    assert len(pairs) == 1 and pairs.empty_rows == 3 and pairs.caption(0) == "kept"


def test_a_byte_order_mark_does_not_hide_the_first_column(tmp_path):
    write_png(tmp_path / "a.png")
    table = tmp_path / "pairs.csv"
    table.write_bytes("filepath,title\na.png,with bom\n".encode("utf-8-sig"))
    assert CSVCaptions(table).caption(0) == "with bom"


@pytest.fixture
def broken_pairs(tmp_path):
    """Four pairs: a good image, a missing one, one that is not an image, a good one."""
    write_png(tmp_path / "good.png")
    (tmp_path / "junk.png").write_bytes(b"not a picture")
    write_png(tmp_path / "also-good.png")
    return write_table(tmp_path / "pairs.csv", [
        ("filepath", "title"), ("good.png", "g"), ("gone.png", "m"), ("junk.png", "j"), ("also-good.png", "a")])


def test_unreadable_images_are_skipped_counted_and_warned_about_once(broken_pairs):
    pairs = CSVCaptions(broken_pairs)
    with pytest.warns(UserWarning, match="gone.png") as caught:
        images = [pairs.load(i) for i in range(4)]
        images += [pairs.load(i) for i in range(4)]          # a second epoch: no new warning, same count
    assert len(caught) == 1 and "unreadable" in str(caught[0].message)
    assert [image is None for image in images] == [False, True, True, False] * 2
    assert pairs.unreadable == 2


def test_strict_raises_naming_the_file(broken_pairs):
    pairs = CSVCaptions(broken_pairs, strict=True)
    assert pairs.load(0) is not None
    with pytest.raises(FileNotFoundError, match="gone.png"):
        pairs.load(1)
    with pytest.raises(ValueError, match="junk.png"):
        pairs.load(2)


def test_folder_pairs_images_with_their_captions_in_sorted_order(tmp_path):
    for relative, caption in [("b/two.png", "two"), ("a/one.JPG", "one\n"), ("a/deeper/three.png", "three"),
                              ("zero.webp", "zero")]:
        image = tmp_path / relative
        image.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(image, format="WEBP" if relative.endswith("webp") else "PNG")
        image.with_suffix(".txt").write_text(caption, encoding="utf-8")
    (tmp_path / "notes.md").write_text("not an image")
    pairs = FolderCaptions(tmp_path)
    relative_paths = [os.path.relpath(pairs.path(i), tmp_path) for i in range(len(pairs))]
    assert relative_paths == ["a/deeper/three.png", "a/one.JPG", "b/two.png", "zero.webp"]
    assert [pairs.caption(i) for i in range(len(pairs))] == ["three", "one", "two", "zero"]
    assert pairs.load(3).size == (4, 4) and pairs.uncaptioned == 0


def test_folder_images_without_a_caption_are_skipped_with_one_warning(tmp_path):
    write_png(tmp_path / "captioned.png")
    (tmp_path / "captioned.txt").write_text("a caption")
    write_png(tmp_path / "silent.png")
    write_png(tmp_path / "blank.png")
    (tmp_path / "blank.txt").write_text("  \n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pairs = FolderCaptions(tmp_path)
    assert len(caught) == 1 and "skipped 2 images with no caption" in str(caught[0].message)
    assert len(pairs) == 1 and pairs.uncaptioned == 2


def test_empty_or_missing_folders_fail_at_construction(tmp_path):
    write_png(tmp_path / "uncaptioned.png")
    with pytest.raises(ValueError, match="empty"), pytest.warns(UserWarning):
        FolderCaptions(tmp_path)
    with pytest.raises(ValueError, match="nowhere.*not a folder"):
        FolderCaptions(tmp_path / "nowhere")
    (tmp_path / "uncaptioned.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(ValueError, match="uncaptioned.txt.*UTF-8"):
        FolderCaptions(tmp_path)


# ---- a held-out split by image ------------------------------------------------------------------------------

def several_captions_csv(tmp_path, rows):
    for index in range(10):
        write_png(tmp_path / f"{index}.png")
    (tmp_path / "pairs.csv").write_text("filepath,title\n" + "".join(f"{p}.png,{c}\n" for p, c in rows))
    return CSVCaptions(tmp_path / "pairs.csv")


def test_split_by_image_keeps_every_caption_of_an_image_on_one_side(tmp_path):
    rows = [(image, f"caption {image}.{k}") for image in range(10) for k in range(image % 3 + 1)]
    pairs = several_captions_csv(tmp_path, rows)
    kept, held = pairs.split_by_image(0.3, seed=1)
    assert len({*held.paths}) == 3 and len({*kept.paths}) == 7 and not {*held.paths} & {*kept.paths}
    both = sorted(zip(kept.paths + held.paths, kept.captions + held.captions))
    assert both == sorted(zip(pairs.paths, pairs.captions))
    again = pairs.split_by_image(0.3, seed=1)[1]
    assert again.paths == held.paths and again.captions == held.captions
    # which images are held out does not depend on the order of the rows
    shuffled = several_captions_csv(tmp_path, rows[::-1])
    assert {*shuffled.split_by_image(0.3, seed=1)[1].paths} == {*held.paths}


def test_split_by_image_refuses_fractions_that_leave_a_side_empty(tmp_path):
    pairs = several_captions_csv(tmp_path, [(0, "a"), (1, "b")])
    for fraction in (0, 1, 1.5, True):
        with pytest.raises(ValueError, match="fraction must be in"):
            pairs.split_by_image(fraction)
    with pytest.raises(ValueError, match="leaves none to train on"):
        pairs.split_by_image(0.9)
    kept, held = pairs.split_by_image(0.01)
    assert len(held) == 1 and len(kept) == 1              # at least one image is held out


def test_training_pairs_from_a_table_or_a_folder_are_upright(tmp_path):
    """A photo taken with the camera turned (EXIF Orientation 6, stored 80 × 40) is trained on as 40 × 80."""
    image = Image.fromarray(numpy.random.default_rng(0).integers(0, 256, (40, 80, 3), dtype=numpy.uint8))
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(tmp_path / "turned.jpg", "JPEG", exif=exif.tobytes())
    (tmp_path / "turned.txt").write_text("a turned photo", encoding="utf-8")
    (tmp_path / "pairs.csv").write_text("filepath,title\nturned.jpg,a turned photo\n", encoding="utf-8")
    for pairs in (CSVCaptions(tmp_path / "pairs.csv"), FolderCaptions(tmp_path)):
        assert pairs.load(0).size == (40, 80), pairs
