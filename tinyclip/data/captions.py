"""Image–caption data sets on disk: a CSV/TSV table, or a folder of images with ``.txt`` captions.

``CSVCaptions`` reads open_clip's table format (``open_clip/training/data.py``,
``CsvDataset``): one row per pair, the image path in one column
(``filepath`` by default) and the caption in another (``title``). Unlike
open_clip, relative image paths are taken relative to the table's own
folder, not the working directory, so a data set can be moved as a whole.
``FolderCaptions`` reads the layout most scraped and hand-made sets use:
``cat.jpg`` beside ``cat.txt``, in any folder depth.

Both index their pairs once, at construction, so that a wrong column name
or an empty set fails before training starts, and keep everything in
memory except the pixels. An image is decoded only by ``load(i)``.

A broken image in a set of millions should not end a run, but should not
pass unnoticed either: by default ``load`` returns None for an image that
is missing or cannot be decoded, counts it in ``unreadable``, and warns
once per data set; with ``strict=True`` it raises an error naming the file.
``tinyclip.data.loader`` replaces a skipped pair with the next readable one,
so every batch keeps its size.
"""

import csv
import os
import warnings

import numpy

from .transforms import load_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
SEPARATORS = {".csv": ",", ".tsv": "\t"}


class CaptionSet:
    """Pairs (image path, caption), with lazy image loading; the base of ``CSVCaptions`` and ``FolderCaptions``.

    ``len(s)``, ``s.caption(i)``, ``s.path(i)``, and ``s.load(i)``: the RGB
    PIL image, or None when it cannot be read and ``strict`` is off.
    """

    def __init__(self, source, paths, captions, strict):
        if not paths:
            raise ValueError(f"{source}: the data set is empty (no image with a caption)")
        self.source = source              # the file or folder the pairs came from, for messages
        self.paths = paths                # absolute image paths
        self.captions = captions          # one caption per path, whitespace stripped
        self.strict = strict
        # indices already known unreadable: tried once, not decoded again every epoch
        self._unreadable = set()

    def __len__(self):
        return len(self.paths)

    def __repr__(self):
        return f"{type(self).__name__}({self.source!r}, {len(self)} pairs)"

    def caption(self, index):
        return self.captions[index]

    def path(self, index):
        return self.paths[index]

    @property
    def unreadable(self):
        """How many images so far were missing or could not be decoded (and were skipped)."""
        return len(self._unreadable)

    def load(self, index):
        """The image of pair ``index`` as RGB PIL; None when unreadable and not strict (errors name the file)."""
        if index in self._unreadable:
            return None
        try:
            return self.read_image(index)
        except (OSError, ValueError) as error:     # read_image's FileNotFoundError / ValueError name the file
            if self.strict:
                raise
            if not self._unreadable:
                warnings.warn(f"{self.source}: {error}; skipping it and any further unreadable image of this "
                              f"data set (counted in .unreadable)", stacklevel=2)
            self._unreadable.add(index)
            return None

    def read_image(self, index):
        """The image of pair ``index`` as RGB PIL, or an OSError / ValueError naming it; subclasses that keep
        images elsewhere than in files (tar shards) override this."""
        return load_image(self.paths[index])

    def grouped_by_image(self):
        """(image paths, text_to_image): each image once, in order of first appearance, and (len(self),) int64
        saying which of them caption i describes, for retrieval with several captions per image."""
        first_seen = {}
        text_to_image = numpy.array([first_seen.setdefault(path, len(first_seen)) for path in self.paths],
                                    dtype=numpy.int64)
        return list(first_seen), text_to_image

    def subset(self, indices, source):
        """The pairs at ``indices`` as a CaptionSet of their own, named ``source`` in messages."""
        return CaptionSet(source, [self.paths[i] for i in indices], [self.captions[i] for i in indices],
                          self.strict)

    def split_by_image(self, fraction, seed=0):
        """(training pairs, held-out pairs): a seeded ``fraction`` of the images (at least one), with all their
        captions, held out, so that no held-out image is ever trained on under another caption.

        Which images are held out depends only on the set of image paths and
        ``seed``, not on the order of the rows. Raises ValueError when
        ``fraction`` is not in (0, 1) or leaves either side empty.
        """
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
            raise ValueError(f"{self.source}: the held-out fraction must be in (0, 1), got {fraction!r}")
        images = sorted(set(self.paths))
        held_count = max(1, round(fraction * len(images)))
        if held_count >= len(images):
            raise ValueError(f"{self.source}: holding out {fraction} of {len(images)} images leaves none to train on")
        order = numpy.random.default_rng(numpy.random.SeedSequence([seed, len(images)])).permutation(len(images))
        held = {images[i] for i in order[:held_count]}
        kept = [i for i, path in enumerate(self.paths) if path not in held]
        held_out = [i for i, path in enumerate(self.paths) if path in held]
        return (self.subset(kept, f"{self.source} (training part)"),
                self.subset(held_out, f"{self.source} (held-out {fraction})"))


def warn_skipped(source, count, what):
    """Warn that ``count`` items of ``what`` in ``source`` (a file, folder or shard pattern) were skipped."""
    if count:
        warnings.warn(f"{source}: skipped {count} {what}", stacklevel=3)


class CSVCaptions(CaptionSet):
    """open_clip's CSV/TSV captions: a header row, then one (image path, caption) pair per row.

    ``separator`` None picks it from the suffix (``.tsv``: tab, ``.csv``:
    comma). Rows whose path or caption is empty are skipped, counted in
    ``empty_rows``, and warned about once.
    """

    def __init__(self, path, image_column="filepath", caption_column="title", separator=None, strict=False):
        path = os.path.abspath(os.fspath(path))
        if not os.path.exists(path):     # said before the suffix is looked at: a missing folder has none
            raise ValueError(f"{path}: no such file or folder")
        if separator is None:
            suffix = os.path.splitext(path)[1].lower()
            if suffix not in SEPARATORS:
                raise ValueError(f"{path}: cannot tell the separator from the suffix {suffix!r}; "
                                 f"pass separator=',' or separator='\\t'")
            separator = SEPARATORS[suffix]
        if not isinstance(separator, str) or len(separator) != 1:
            raise ValueError(f"{path}: separator must be one character, got {separator!r}")
        folder = os.path.dirname(path)
        paths, captions = [], []
        self.empty_rows = 0
        # utf-8-sig: spreadsheet programs often start the file with a byte-order mark, which would stick to
        # the first column's name
        try:
            self._read_rows(path, separator, image_column, caption_column, folder, paths, captions)
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}: not UTF-8 text ({error}); save the table as UTF-8") from None
        warn_skipped(path, self.empty_rows, "rows with an empty image path or caption")
        super().__init__(path, paths, captions, strict)

    def _read_rows(self, path, separator, image_column, caption_column, folder, paths, captions):
        with open(path, newline="", encoding="utf-8-sig") as table:
            rows = csv.DictReader(table, delimiter=separator)
            columns = rows.fieldnames or []
            missing = [name for name in (image_column, caption_column) if name not in columns]
            if missing:
                raise ValueError(f"{path}: no column {', '.join(map(repr, missing))}; the columns are "
                                 f"{columns} (choose with --image-column and --caption-column, or image_column= "
                                 f"and caption_column= in Python)")
            for row in rows:
                # a short row gives None for its missing fields
                image_path = (row[image_column] or "").strip()
                caption = (row[caption_column] or "").strip()
                if not image_path or not caption:
                    self.empty_rows += 1
                    continue
                paths.append(os.path.join(folder, image_path))     # an absolute image_path is kept as it is
                captions.append(caption)


class FolderCaptions(CaptionSet):
    """Images with same-name ``.txt`` captions (``a/cat.jpg`` + ``a/cat.txt``), found in all subfolders.

    Pairs are in sorted path order. Images with no caption file, or an empty
    one, are skipped, counted in ``uncaptioned``, and warned about once.
    """

    def __init__(self, folder, extensions=IMAGE_EXTENSIONS, strict=False):
        folder = os.path.abspath(os.fspath(folder))
        if not os.path.isdir(folder):
            raise ValueError(f"{folder}: not a folder")
        extensions = tuple(extension.lower() for extension in extensions)
        # os.walk does not follow links to folders, so a link cycle cannot make the walk endless
        images = [os.path.join(root, name) for root, _, files in os.walk(folder) for name in files
                  if os.path.splitext(name)[1].lower() in extensions]
        # sorted by the path below the folder, "/"-separated, so that the order (and so the shuffle) is the same
        # on every machine and file system
        images.sort(key=lambda image: os.path.relpath(image, folder).replace(os.sep, "/"))
        paths, captions = [], []
        self.uncaptioned = 0
        for image in images:
            caption = self._read_caption(os.path.splitext(image)[0] + ".txt")
            if not caption:
                self.uncaptioned += 1
                continue
            paths.append(image)
            captions.append(caption)
        warn_skipped(folder, self.uncaptioned, "images with no caption (.txt file missing or empty)")
        super().__init__(folder, paths, captions, strict)

    @staticmethod
    def _read_caption(path):
        """The stripped text of a caption file; empty when there is none."""
        try:
            with open(path, encoding="utf-8") as text:
                return text.read().strip()
        except FileNotFoundError:
            return ""
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}: caption is not UTF-8 text ({error})") from None
