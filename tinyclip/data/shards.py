"""webdataset tar shards of image–caption pairs, as img2dataset and open_clip write them.

A shard is a plain tar file whose members are grouped into examples by key
(the webdataset convention): ``000123.jpg`` and ``000123.txt`` are the image
and caption of example ``000123``, the key being the member path up to the
first dot of its file name. The image is the first of ``.jpg``, ``.jpeg``,
``.png``, ``.webp`` an example has; the caption its ``.txt``, else the
``caption`` field of its ``.json`` (img2dataset writes both). Examples
without an image or a caption are skipped, counted in ``incomplete`` and
warned about once.

``ShardCaptions('shards/train-{000000..000099}.tar')`` expands the braces
(the ``braceexpand`` package, as webdataset does; ``::`` also separates
patterns, as in open_clip's ``--train-data``) and reads each shard's tar
headers once with the standard library's ``tarfile``, keeping for every
example where its image bytes lie and its caption, never the pixels.
``load(i)`` then reads one image's bytes with a seek and a read. The data
set looks like any other caption set (``len``, ``load``, ``caption``), and
its ``shard_sizes`` tell ``tinyclip.data.loader`` to stream it: each rank
reads whole shards of its own, one after the other (see ``BatchOrder``).
"""

import io
import json
import os
import tarfile

import numpy
from braceexpand import braceexpand
from PIL import Image

from . import captions
from .captions import CaptionSet, warn_skipped
from .transforms import to_rgb

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")


def expand_shards(pattern):
    """The shard paths of ``pattern``: brace ranges and lists expanded, ``::``-separated parts concatenated.

    Raises ValueError when the pattern names no file or a file that does not exist.
    """
    paths = [path for part in str(pattern).split("::") if part for path in braceexpand(part)]
    if not paths:
        raise ValueError(f"{pattern!r}: names no shard")
    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        raise ValueError(f"{pattern!r}: {len(missing)} of {len(paths)} shards do not exist, the first {missing[0]!r}")
    return paths


def is_shard_pattern(path):
    """Whether ``path`` names tar shards (a .tar file, or a pattern of them) rather than a CSV or a folder."""
    return any(part.rstrip("}").endswith(".tar") for part in str(path).split("::") if part)


def read_pairs(path, image_column="filepath", caption_column="title", strict=False):
    """The image–caption pairs at ``path``, whatever their layout: tar shards (``is_shard_pattern``), a folder
    of images with .txt captions, or a CSV/TSV table (its columns named by ``image_column``, ``caption_column``).

    Raises what the chosen reader raises (FileNotFoundError, ValueError naming the file).
    """
    if is_shard_pattern(path):
        return ShardCaptions(path, strict=strict)
    if os.path.isdir(path):
        return captions.FolderCaptions(path, strict=strict)
    return captions.CSVCaptions(path, image_column=image_column, caption_column=caption_column, strict=strict)


def _split_key(name):
    """(key, suffix) of a member name: "dir/000123.jpg" -> ("dir/000123", "jpg")."""
    folder, _, base = name.rpartition("/")
    stem, dot, suffix = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), suffix.lower() if dot else ""


def _caption_of(shard, key, texts):
    """The caption of one example from its .txt or .json member's bytes; "" when it has none."""
    if "txt" in texts:
        raw, what = texts["txt"], "txt"
    elif "json" in texts:
        raw, what = texts["json"], "json"
    else:
        return ""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{shard}: {key}.{what} is not UTF-8 text ({error})") from None
    if what == "txt":
        return text.strip()
    try:
        caption = json.loads(text).get("caption")
    except (json.JSONDecodeError, AttributeError) as error:
        raise ValueError(f"{shard}: {key}.json is not a JSON object ({error})") from None
    return caption.strip() if isinstance(caption, str) else ""


class ShardCaptions(CaptionSet):
    """Image–caption pairs in webdataset tar shards; see the module docstring.

    ``shards``: the shard paths in pattern order; ``shard_sizes``: (shards,)
    examples per shard; examples are numbered shard after shard, in tar
    order within a shard. ``path(i)`` is ``SHARD/KEY.jpg``, for messages.
    Raises ValueError naming the shard for a file that is not a plain tar
    (img2dataset writes uncompressed ones) or holds no complete example.
    """

    def __init__(self, pattern, strict=False):
        self.pattern = str(pattern)
        self.shards = expand_shards(pattern)
        paths, captions, shard_index, offsets, sizes, shard_sizes = [], [], [], [], [], []
        self.incomplete = 0
        for number, shard in enumerate(self.shards):
            examples = self._index(shard)
            if not examples:
                raise ValueError(f"{shard}: no example with an image ({', '.join(IMAGE_SUFFIXES)}) and a caption")
            for name, caption, offset, size in examples:
                paths.append(f"{shard}/{name}")
                captions.append(caption)
                shard_index.append(number)
                offsets.append(offset)
                sizes.append(size)
            shard_sizes.append(len(examples))
        warn_skipped(self.pattern, self.incomplete, "examples with no image or no caption")
        self.shard_sizes = numpy.asarray(shard_sizes, dtype=numpy.int64)             # (shards,)
        self._shard_index = numpy.asarray(shard_index, dtype=numpy.int32)            # (examples,)
        self._offsets = numpy.asarray(offsets, dtype=numpy.int64)                    # image bytes start
        self._sizes = numpy.asarray(sizes, dtype=numpy.int64)                        # image bytes length
        super().__init__(self.pattern, paths, captions, strict)

    def _index(self, shard):
        """[(image member name, caption, data offset, size)] of one shard's complete examples, in tar order."""
        images, texts, order = {}, {}, []
        try:
            with tarfile.open(shard, mode="r:") as tar:     # "r:": plain tar only, read header by header
                for member in tar:
                    if not member.isfile():
                        continue
                    key, suffix = _split_key(member.name)
                    if key not in images and key not in texts:
                        order.append(key)
                    if suffix in IMAGE_SUFFIXES:
                        images.setdefault(key, {})[suffix] = (member.name, member.offset_data, member.size)
                    elif suffix in ("txt", "json"):
                        texts.setdefault(key, {})[suffix] = tar.extractfile(member).read()
        except tarfile.TarError as error:
            raise ValueError(f"{shard}: not a readable uncompressed tar file ({error})") from None
        examples = []
        for key in order:
            found = images.get(key, {})
            image = next((found[suffix] for suffix in IMAGE_SUFFIXES if suffix in found), None)
            caption = _caption_of(shard, key, texts.get(key, {}))
            if image is None or not caption:
                self.incomplete += 1
                continue
            name, offset, size = image
            examples.append((name, caption, offset, size))
        return examples

    def __repr__(self):
        return f"ShardCaptions({self.pattern!r}, {len(self.shards)} shards, {len(self)} pairs)"

    def read_image(self, index):
        """The image of example ``index`` decoded from its bytes in the shard; a ValueError naming it."""
        shard = self.shards[self._shard_index[index]]
        with open(shard, "rb") as file:
            file.seek(int(self._offsets[index]))
            data = file.read(int(self._sizes[index]))
        if len(data) != self._sizes[index]:
            raise ValueError(f"cannot read image {self.paths[index]!r}: the shard ends early (truncated?)")
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                return to_rgb(image)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            raise ValueError(f"cannot decode image {self.paths[index]!r}: {error}") from None
