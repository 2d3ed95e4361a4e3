"""A run's features: the fused train/test matrices the runner trains on, and the same rebuilt later.

The runner aligns every backbone of the experiment once (:func:`catsdogs.features.fusion.align`)
and fuses each run's combination with :func:`run_features`. Readers of a finished run (the
neither-cat-nor-dog score of an export, predictions from a run directory) rebuild exactly those
rows with :func:`rebuild_run_features`: the cached feature files are found by the keys stored in
the run's record, aligned on the same backbones and exclusions, and fused the same way.

Flip test-time augmentation (``tta``) is one average, :func:`tta_average`, whoever predicts: the
runner (:func:`predict_tta` on fused columns, or block by block), grouped runs
(:func:`catsdogs.runs.multifit.fit_grid`) and refits. The exported graph computes the same with a
Keras ``Average`` layer (:mod:`catsdogs.app.export`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

import numpy as np

from catsdogs.components import trains_on_maps
from catsdogs.errors import DataError
from catsdogs.features.fusion import Aligned, Fused, align, fuse, maps_key

if TYPE_CHECKING:  # pragma: no cover
    from catsdogs.features.extraction import FeatureSet
    from catsdogs.runs.record import RunRecord


@dataclass
class RunFeatures:
    """One run's fused features: ``train`` what its heads are trained on; ``test`` is None when
    the data has no test images; ``tta`` whether flipped features are used (the experiment asked
    for TTA and every backbone has them); ``predicted_train`` the training rows as their held-out
    predictions read them when a backbone of the run is predicted from other features
    (:attr:`held_out`, as :attr:`Aligned.held_out`)."""

    train: Fused
    test: Fused | None
    tta: bool
    predicted_train: Fused | None = None

    @property
    def held_out(self) -> Fused:
        """The training rows as held-out predictions read them: ``predicted_train``, else ``train``."""
        return self.train if self.predicted_train is None else self.predicted_train


def run_features(aligned: Aligned, combination: Sequence[str], *, tta: bool,
                 columns: bool = True, maps_blocks: int | None = None) -> RunFeatures:
    """Fuse ``combination`` from the experiment's aligned features, as the runner trains it.
    ``columns=False``: rows only (labels, ids, files, blocks), ``X`` with no columns and no
    ``X_flip``, for a run whose predictions were computed block by block. ``maps_blocks``: the
    run's head is trained on maps (``input = "maps"``): ``X`` is the single backbone's flattened
    maps entering its last ``maps_blocks`` block(s) (:attr:`AlignedSplit.maps`), without TTA."""
    if maps_blocks is not None:
        return _maps_features(aligned, combination, maps_blocks)
    tta = tta and aligned.has_flip(combination)
    apart = columns and any(aligned.held_out.X[b] is not aligned.train.X[b] for b in combination)
    train = fuse(aligned.train, combination, flip=tta and not apart, columns=columns)
    predicted = fuse(aligned.held_out, combination, flip=tta, columns=columns) if apart else None
    test = fuse(aligned.test, combination, flip=tta, columns=columns) if len(aligned.test) else None
    return RunFeatures(train, test, tta, predicted)


def maps_blocks(head_cls, params: dict[str, Any]) -> int | None:
    """How many top blocks' maps a head trained on maps takes (its ``top_blocks``, default 1);
    None for a head trained on features."""
    if not trains_on_maps(head_cls):
        return None
    return int(params.get("top_blocks", getattr(head_cls(), "top_blocks", 1)))


def _maps_features(aligned: Aligned, combination: Sequence[str], blocks: int) -> RunFeatures:
    (name,) = combination
    key = maps_key(name, blocks)
    if key not in aligned.train.maps:
        raise DataError(f"the maps of {name!r} entering its last {blocks} block(s) were not "
                        "cached for this experiment; run it with `catsdogs run`")

    def split(part) -> Fused:
        X = part.maps[key]
        return Fused((name,), [(name, int(X.shape[1]))], X, None, part.y, part.ids, part.files)

    return RunFeatures(split(aligned.train), split(aligned.test) if len(aligned.test) else None,
                       False)


@overload
def tta_average(plain: np.ndarray, flipped: np.ndarray | None) -> np.ndarray: ...
@overload
def tta_average(plain: None, flipped: np.ndarray | None) -> None: ...
def tta_average(plain, flipped):
    """P(dog) with flip test-time augmentation: the mean of the original and the horizontally
    flipped views' predictions, as float64; ``plain`` itself when there is no flipped prediction
    (``flipped`` None: the run does not use TTA) and None when there is no plain one."""
    if plain is None or flipped is None:
        return plain
    return (np.asarray(plain, dtype=np.float64) + np.asarray(flipped, dtype=np.float64)) / 2


def predict_tta(head: Any, X: np.ndarray, X_flip: np.ndarray | None = None) -> np.ndarray:
    """``head.predict_proba`` of the fused rows ``X`` as float64, averaged with its prediction
    of their flipped features ``X_flip`` (:func:`tta_average`) when given."""
    p = np.asarray(head.predict_proba(X), dtype=np.float64)
    return tta_average(p, None if X_flip is None else head.predict_proba(X_flip))


def locate_features(cache_root: Path, config_key: str, fingerprint: str | None
                    ) -> tuple[Path, dict[str, Any]]:
    """The finished feature file with this configuration key (and data fingerprint, when given)
    and its metadata, read from the HDF5 attributes only (its rows are neither read nor
    verified: :func:`find_features` does that)."""
    from catsdogs.features.cache import read_feature_meta

    unreadable: list[DataError] = []
    for path in sorted((cache_root / "features").glob(f"*/*-{config_key[:10]}.h5")):
        try:
            meta = read_feature_meta(path)
        except DataError as exc:
            unreadable.append(exc)
            continue
        if meta.get("config_key") == config_key and \
                (fingerprint is None or meta.get("dataset_fingerprint") == fingerprint):
            return path, meta
    if unreadable:  # the file named like the run's features is there but cannot be read
        raise unreadable[0]
    raise DataError(f"the run's cached features (key {config_key[:10]}) are not in {cache_root}; "
                    "run `catsdogs run` on this machine first (or pass the cache directory)")


def find_features(cache_root: Path, config_key: str, fingerprint: str | None) -> FeatureSet:
    """The cached feature set with this configuration key (and data fingerprint, when given),
    its checksums verified."""
    from catsdogs.features.extraction import load_features

    return load_features(locate_features(cache_root, config_key, fingerprint)[0])


def rebuild_run_features(record: RunRecord, experiment: Mapping[str, Any], *,
                         cache_dir: str | os.PathLike | None = None, tta: bool = False) -> RunFeatures:
    """The features ``record``'s run was trained on (``train``) and predicts from (``held_out``,
    ``test``: other ones for a backbone with ``predict_precision``), from the feature cache.

    ``experiment`` is the experiment's ``experiment.json`` (its ``cache_dir`` and ``exclude``);
    ``cache_dir`` overrides its cache. Rows are aligned on every backbone the runner aligned on
    (records written before that was stored: the run's own combination).
    """
    from catsdogs.features.extraction import default_cache_dir

    root = Path(cache_dir or experiment.get("cache_dir") or default_cache_dir()).expanduser()
    keys = dict(record.aligned_on or record.feature_keys)
    for name in record.combination:
        if name not in keys:
            raise DataError(f"run {record.run_id!r} records no feature key for {name!r}")

    def found(keys: Mapping[str, Mapping[str, str]]) -> dict[str, FeatureSet]:
        return {name: find_features(root, k["config_key"], k.get("dataset_fingerprint"))
                for name, k in keys.items()}

    # records without ``aligned_on`` were written before ``predict_precision`` existed
    aligned = align(found(keys), experiment.get("exclude") or [], found(record.predicted_on or {}))
    return run_features(aligned, record.combination, tta=tta and record.tta)
