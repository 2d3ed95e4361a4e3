"""Fusion: aligning cached feature files row by row and concatenating backbone combinations.

All backbones of an experiment are aligned once, on the rows present in every feature file (an
image unreadable for one is dropped for all), so every combination is trained and validated on
exactly the same images and the leaderboard compares like with like.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from catsdogs.errors import DataError
from catsdogs.features.cache import FeatureSet, FeatureSplit

logger = logging.getLogger("catsdogs")


@dataclass
class AlignedSplit:
    files: list[str]
    ids: np.ndarray
    y: np.ndarray
    X: dict[str, np.ndarray]  # backbone -> (n, d)
    X_flip: dict[str, np.ndarray | None]
    #: flattened float16 feature maps on the same rows (:func:`maps_key` -> (n, h*w*c)), for
    #: heads trained on maps (:mod:`catsdogs.features.maps`); attached by the runner
    maps: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.files)


@dataclass
class Aligned:
    """Feature files of several backbones on common rows, in the first backbone's row order.

    ``train`` holds the features heads are trained on, ``test`` those the test rows are predicted
    from. A backbone predicted from other features than it is trained on (``predict_precision``)
    has those in ``test`` and, for the training rows, in ``predicted_train``; :attr:`held_out` is
    what every held-out (validation, out-of-fold) row is predicted from."""

    backbones: tuple[str, ...]
    train: AlignedSplit
    test: AlignedSplit
    #: the training rows with the predicting features (None: the same as ``train``'s)
    predicted_train: AlignedSplit | None = None

    @property
    def held_out(self) -> AlignedSplit:
        """The training rows as their held-out predictions read them (the ranking number's rows)."""
        return self.train if self.predicted_train is None else self.predicted_train

    def has_flip(self, combination: Sequence[str]) -> bool:
        return all(self.held_out.X_flip[b] is not None for b in combination)


def maps_key(backbone: str, blocks: int) -> str:
    """The key of ``backbone``'s maps entering its last ``blocks`` block(s) in :attr:`AlignedSplit.maps`."""
    return f"{backbone}/maps{int(blocks)}"


@dataclass
class Fused:
    """One combination's features: ``X`` is the column concatenation in combination order."""

    combination: tuple[str, ...]
    blocks: list[tuple[str, int]]
    X: np.ndarray
    X_flip: np.ndarray | None
    y: np.ndarray
    ids: np.ndarray
    files: list[str]


def _align_split(name: str, splits: Mapping[str, FeatureSplit], exclude: set[str]) -> AlignedSplit:
    backbones = list(splits)
    first = splits[backbones[0]]
    common = set(first.files)
    for b in backbones[1:]:
        common &= set(splits[b].files)
    dropped = {b: len(s.files) - len(common) for b, s in splits.items() if len(s.files) != len(common)}
    if dropped:
        logger.warning("%s rows not present for every backbone were dropped: %s", name,
                       ", ".join(f"{b}: {n}" for b, n in dropped.items()))
    files = [f for f in first.files if f in common and f not in exclude]
    out_X, out_flip = {}, {}
    for b, split in splits.items():
        index = {f: i for i, f in enumerate(split.files)}
        rows = np.fromiter((index[f] for f in files), dtype=np.int64, count=len(files))
        out_X[b] = split.X[rows]
        out_flip[b] = split.X_flip[rows] if split.X_flip is not None else None
        if b != backbones[0]:
            ref = {f: i for i, f in enumerate(first.files)}
            ref_rows = np.fromiter((ref[f] for f in files), dtype=np.int64, count=len(files))
            if not np.array_equal(split.y[rows], first.y[ref_rows]):
                raise DataError(f"labels of the {name} rows differ between feature files of "
                                f"{backbones[0]!r} and {b!r}; were they extracted from different data?")
    ref = {f: i for i, f in enumerate(first.files)}
    rows = np.fromiter((ref[f] for f in files), dtype=np.int64, count=len(files))
    return AlignedSplit(files=files, ids=first.ids[rows], y=first.y[rows], X=out_X, X_flip=out_flip)


def align(feature_sets: Mapping[str, FeatureSet], exclude: Iterable[str] = (),
          predicting: Mapping[str, FeatureSet] | None = None) -> Aligned:
    """Align feature sets (backbone name -> :class:`FeatureSet`) on their common rows.

    ``exclude`` lists relative file paths (e.g. ``train/cat.12.jpg``) left out of training.
    ``predicting`` (backbone name -> :class:`FeatureSet`): the features some of the backbones'
    held-out and test rows are predicted from, aligned on the same rows (:class:`Aligned`).
    """
    if not feature_sets:
        raise DataError("no feature sets to align")
    predicting = dict(predicting or {})
    stray = sorted(set(predicting) - set(feature_sets))
    if stray:
        raise DataError(f"predicting features of {', '.join(map(repr, stray))} without the "
                        "features the heads are trained on")
    every = {**feature_sets, **{_predicting(b): fs for b, fs in predicting.items()}}
    excluded = set(exclude)
    train = _align_split("train", {b: fs.train for b, fs in every.items()}, excluded)
    test = _align_split("test", {b: fs.test for b, fs in every.items()}, set())
    if len(train) == 0:
        raise DataError("no training rows are left after aligning the backbones and exclusions")
    if len(set(train.y.tolist())) < 2:
        raise DataError("the training rows hold only one class; both cats and dogs are needed")
    names = tuple(feature_sets)
    return Aligned(names, _pick(train, names, ()), _pick(test, names, predicting),
                   _pick(train, names, predicting) if predicting else None)


def _predicting(backbone: str) -> str:
    """The name a backbone's predicting features are aligned under (next to its own)."""
    return f"{backbone} (predicting)"


def _pick(split: AlignedSplit, names: Sequence[str], predicting: Iterable[str]) -> AlignedSplit:
    """``split`` with each backbone's own features, or its predicting ones for those in
    ``predicting``."""
    apart = set(predicting)

    def key(b: str) -> str:
        return _predicting(b) if b in apart else b

    return AlignedSplit(split.files, split.ids, split.y, {b: split.X[key(b)] for b in names},
                        {b: split.X_flip[key(b)] for b in names}, dict(split.maps))


def fuse(split: AlignedSplit, combination: Sequence[str], *, flip: bool = False,
         columns: bool = True) -> Fused:
    """Concatenate the features of ``combination`` (in its order) for one aligned split
    (``columns=False``: the rows' labels, ids, files and blocks only; ``X`` has no columns)."""
    blocks = [(b, split.X[b].shape[1]) for b in combination]
    if not columns:
        return Fused(tuple(combination), blocks, np.zeros((len(split), 0), np.float32), None,
                     split.y, split.ids, split.files)
    X = np.concatenate([split.X[b] for b in combination], axis=1) if len(combination) > 1 \
        else split.X[combination[0]]
    X_flip = None
    if flip and all(split.X_flip[b] is not None for b in combination):
        X_flip = np.concatenate([split.X_flip[b] for b in combination], axis=1)
    return Fused(tuple(combination), blocks, np.ascontiguousarray(X, np.float32),
                 None if X_flip is None else np.ascontiguousarray(X_flip, np.float32),
                 split.y, split.ids, split.files)
