"""Small webdataset shards for the tests, written with the standard library's tarfile and PIL.

``write_shards(folder, sizes)`` writes ``train-000000.tar, ...``: shard s
holds ``sizes[s]`` examples keyed ``SSSIII`` (shard, index), each a 24×20
PNG whose pixels are a function of its key and the caption "example SSSIII",
so a batch's captions say which examples it holds.
"""

import io
import tarfile

import numpy
from PIL import Image


def example_pixels(shard, index):
    rng = numpy.random.default_rng([shard, index])
    return rng.integers(0, 256, (20, 24, 3), dtype=numpy.uint8)


def png_bytes(pixels):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def add_member(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder, sizes, caption_suffix="txt"):
    """Shards ``folder/train-{000000..}.tar``; returns the brace pattern that names them all."""
    for shard, size in enumerate(sizes):
        with tarfile.open(folder / f"train-{shard:06d}.tar", "w") as tar:
            for index in range(size):
                key = f"{shard:03d}{index:03d}"
                add_member(tar, f"{key}.png", png_bytes(example_pixels(shard, index)))
                caption = f"example {key}"
                if caption_suffix == "json":
                    add_member(tar, f"{key}.json", ('{"caption": "%s", "width": 24}' % caption).encode())
                else:
                    add_member(tar, f"{key}.txt", caption.encode())
    return str(folder / f"train-{{000000..{len(sizes) - 1:06d}}}.tar")


def example_number(caption):
    """The (shard, index) an "example SSSIII" caption names."""
    key = caption.split()[1]
    return int(key[:3]), int(key[3:])
