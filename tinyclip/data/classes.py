"""A labelled image folder: one sub-folder of images per class, as torchvision's ``ImageFolder`` and
CLIP_benchmark read it, for zero-shot classification and linear probes on your own classes.

``DIR/cat/1.jpg, DIR/cat/2.jpg, DIR/dog/1.jpg, ...``: the classes are the
sub-folders in sorted order, the class name the folder name with ``_``
read as a space ("golden_retriever" → "golden retriever"). A
``DIR/classnames.txt`` with one name per line instead gives the names in
the same sorted folder order (CLIP_benchmark's ``classnames.txt``), for
folders named by an id such as ``n01440764``.
"""

import os

import numpy

from .captions import IMAGE_EXTENSIONS

CLASSNAMES_FILE = "classnames.txt"


class ImageClasses:
    """Image paths with integer labels from the class sub-folders of ``folder``.

    Attributes: ``paths`` (n absolute image paths, sorted by class and then
    by path below the class folder), ``labels`` (n,) int64 class indices,
    ``class_names`` (one per class), ``folders`` (the sub-folder names).
    Raises ValueError, naming the folder, when it has no class sub-folder,
    when a class has no image, or when classnames.txt has a different
    number of lines than there are classes.
    """

    def __init__(self, folder, extensions=IMAGE_EXTENSIONS):
        folder = os.path.abspath(os.fspath(folder))
        if not os.path.isdir(folder):
            raise ValueError(f"{folder}: not a folder")
        extensions = tuple(extension.lower() for extension in extensions)
        self.source = folder
        self.folders = sorted(name for name in os.listdir(folder) if os.path.isdir(os.path.join(folder, name)))
        if not self.folders:
            raise ValueError(f"{folder}: no class sub-folders (expected one folder of images per class)")
        self.class_names = self._class_names(folder)
        paths, labels = [], []
        for label, name in enumerate(self.folders):
            root = os.path.join(folder, name)
            images = sorted((os.path.relpath(os.path.join(parent, file), root).replace(os.sep, "/")
                             for parent, _, files in os.walk(root) for file in files
                             if os.path.splitext(file)[1].lower() in extensions))
            if not images:
                raise ValueError(f"{root}: class {name!r} has no image ({', '.join(extensions)})")
            paths += [os.path.join(root, image) for image in images]
            labels += [label] * len(images)
        self.paths = paths
        self.labels = numpy.asarray(labels, dtype=numpy.int64)            # (n,)

    def _class_names(self, folder):
        path = os.path.join(folder, CLASSNAMES_FILE)
        if not os.path.isfile(path):
            names, where = [name.replace("_", " ") for name in self.folders], folder
        else:
            with open(path, encoding="utf-8") as file:
                names, where = [line.strip() for line in file if line.strip()], path
            if len(names) != len(self.folders):
                raise ValueError(f"{path}: {len(names)} class names for {len(self.folders)} class folders; give "
                                 f"one line per folder, in sorted folder order")
        # two classes of one name would share a prompt and a row of the report (per_class is keyed by name)
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"{where}: the class name{'s' if len(repeated) > 1 else ''} "
                             f"{', '.join(map(repr, repeated))} name{'' if len(repeated) > 1 else 's'} two classes")
        return names

    def __len__(self):
        return len(self.paths)

    def __repr__(self):
        return f"ImageClasses({self.source!r}, {len(self.class_names)} classes, {len(self)} images)"

    def split(self, test_fraction, seed=0):
        """(train indices, test indices): in each class a seeded ``test_fraction`` of its images (at least one)
        is held out for testing, at least one kept for training; raises ValueError for a class of one image."""
        if not 0 < test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
        train, test = [], []
        for label, name in enumerate(self.folders):
            members = numpy.flatnonzero(self.labels == label)
            if len(members) < 2:
                raise ValueError(f"{self.source}: class {name!r} has one image; a train/test split needs two")
            order = numpy.random.default_rng(numpy.random.SeedSequence([seed, label])).permutation(members)
            held = min(max(1, round(test_fraction * len(members))), len(members) - 1)
            test += order[:held].tolist()
            train += order[held:].tolist()
        return numpy.sort(train), numpy.sort(test)
