"""The "neither cat nor dog" signal: how far a photo's features are from the training photos.

A two-class head calls every photo a cat or a dog, a rocket included. The signal here is the
**cosine distance of the photo's fused GAP features to the nearest of K k-means centroids of the
training features** (all vectors L2-normalised): ``score = 1 - max_k cos(x, c_k)``. Cats and dogs
lie close to some centroid of the training photos; other pictures do not.

* Fitted per run on its own cached features (:func:`fit_neither`): the centroids on the run's
  training rows, the **threshold** on its held-out validation rows (the rows of
  ``val_predictions.csv``; for k-fold runs, whose validation rows are all rows, a stratified 20 %
  split with the experiment's seed) as their ``quantile`` (99th percentile): about 1 % of real
  cats and dogs are flagged by construction.
* Works for every backbone and fusion (no ImageNet classifier needed) and exports as built-in
  layers (``Rescaling`` -> ``UnitNormalization`` -> ``Dense(K)`` -> max -> ``1 - x``) into Keras,
  TFLite and Core ML as the output ``neither_score``; the threshold goes into the manifest and the
  Core ML metadata. Stored data: K x d floats (``neither.npz``, 64 x 1280 floats = 320 KiB for one
  EfficientNet-Lite0).

Why this signal (EfficientNet-Lite0 ImageNet features of the mini data, 30 non-pet pictures of
``bench/neither_rate.py``, thresholds at the 99th percentile of validation photos): Mahalanobis
distance in the top 8-64 PCA components flagged 0 of 30 non-pets (they fall in low-variance
directions), the PCA residual 22-24 of 30, the Lite0 ImageNet classifier's probability mass on
cat and dog classes 28 of 30 (1.7 % of test photos flagged), the nearest-centroid cosine distance
29 of 30 (0-1.3 % of test photos flagged; the one miss is a black-and-white horse silhouette).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from catsdogs.runs.record import RunRecord

METHOD = "cosine distance to the nearest k-means centroid of the L2-normalised training features"
DEFAULT_CENTROIDS = 64
DEFAULT_QUANTILE = 0.99
#: k-means is fitted on at most this many training rows (a seeded sample)
MAX_FIT_ROWS = 5000


def _normalise(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


@dataclass
class NeitherStats:
    centroids: np.ndarray  # (K, d) unit rows, float32
    threshold: float
    quantile: float
    n_fit: int
    n_calibration: int
    calibration_flagged: float  # share of calibration rows above the threshold
    #: features are multiplied by this (1 / median training norm) before the in-graph L2
    #: normalisation: the cosine does not change, and Core ML's float16 sum of squares of
    #: thousands of unbounded ReLU features cannot overflow
    scale: float = 1.0

    def score(self, X: np.ndarray) -> np.ndarray:
        """``1 - max cos`` of each row of ``X`` (n, d) to the centroids, float64 (n,)."""
        return 1.0 - (_normalise(X) @ self.centroids.T.astype(np.float64)).max(axis=1)

    def score_layer(self, features):
        """Append the score to a Keras tensor ``features`` (batch, d): output ``neither_score``."""
        import keras

        k, d = self.centroids.shape
        x = keras.layers.Rescaling(self.scale, name="neither_rescale")(features)
        x = keras.layers.UnitNormalization(axis=-1, name="neither_unit")(x)
        sims = keras.layers.Dense(k, use_bias=False, trainable=False, name="neither_similarity")
        s = sims(x)
        s = keras.layers.Reshape((k, 1), name="neither_reshape")(s)
        s = keras.layers.GlobalMaxPooling1D(name="neither_max")(s)
        out = keras.layers.Dense(1, trainable=False, name="neither_score")
        score = out(s)
        sims.set_weights([self.centroids.T.astype(np.float32)])
        out.set_weights([np.array([[-1.0]], np.float32), np.array([1.0], np.float32)])
        return score

    def describe(self) -> dict[str, Any]:
        return {"method": METHOD, "centroids": int(self.centroids.shape[0]),
                "feature_dim": int(self.centroids.shape[1]), "threshold": float(self.threshold),
                "quantile": self.quantile, "n_fit": self.n_fit, "n_calibration": self.n_calibration,
                "calibration_flagged": self.calibration_flagged, "scale": self.scale}

    def save(self, path: str | os.PathLike) -> None:
        from catsdogs.util.fileio import atomic_write

        atomic_write(Path(path), self._savez)

    def _savez(self, fh) -> None:
        np.savez(fh, centroids=self.centroids, threshold=self.threshold, quantile=self.quantile,
                 n_fit=self.n_fit, n_calibration=self.n_calibration,
                 calibration_flagged=self.calibration_flagged, scale=self.scale)

    @classmethod
    def load(cls, path: str | os.PathLike) -> NeitherStats:
        with np.load(path) as z:
            return cls(z["centroids"].astype(np.float32), float(z["threshold"]), float(z["quantile"]),
                       int(z["n_fit"]), int(z["n_calibration"]), float(z["calibration_flagged"]),
                       float(z["scale"]) if "scale" in z else 1.0)


def fit_stats(X_fit: np.ndarray, X_cal: np.ndarray, *, centroids: int = DEFAULT_CENTROIDS,
              quantile: float = DEFAULT_QUANTILE, seed: int = 2019) -> NeitherStats:
    """Centroids from ``X_fit``, threshold = ``quantile`` of the scores of ``X_cal``."""
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(seed)
    norms = np.linalg.norm(np.asarray(X_fit, np.float64), axis=1)
    scale = 1.0 / float(np.median(norms)) if np.median(norms) > 0 else 1.0
    A = _normalise(X_fit)
    if len(A) > MAX_FIT_ROWS:
        A = A[np.sort(rng.choice(len(A), MAX_FIT_ROWS, replace=False))]
    k = int(max(1, min(centroids, len(A) // 4 or 1)))
    km = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(A)
    C = _normalise(km.cluster_centers_).astype(np.float32)
    stats = NeitherStats(C, 0.0, quantile, len(A), len(X_cal), 0.0, scale)
    scores = stats.score(X_cal)
    stats.threshold = float(np.quantile(scores, quantile))
    stats.calibration_flagged = float(np.mean(scores > stats.threshold))
    return stats


# ------------------------------------------------------------------------------------ a run's score
def fit_neither(record: RunRecord, experiment: Mapping[str, Any], run_dir: str | os.PathLike, *,
                cache_dir: str | os.PathLike | None = None, **kwargs) -> NeitherStats:
    """Fit the neither statistics of a run from its cached features (see the module docstring).

    ``experiment`` is the run's ``experiment.json``; ``cache_dir`` overrides its feature cache.
    """
    import pandas as pd

    from catsdogs.runs.features import rebuild_run_features

    # the training rows as the run predicts from them: what the exported graph computes
    train = rebuild_run_features(record, experiment, cache_dir=cache_dir).held_out
    X, y, files = train.X, train.y, train.files
    seed = int(experiment.get("seed", 2019))
    val_path = Path(run_dir) / "val_predictions.csv"
    val = set(pd.read_csv(val_path)["file"]) if val_path.is_file() else set()
    is_val = np.array([f in val for f in files])
    if is_val.all() or not is_val.any():
        from sklearn.model_selection import train_test_split

        idx = np.arange(len(files))
        strat = y if np.bincount(y).min() >= 2 else None
        _, va = train_test_split(idx, test_size=0.2, stratify=strat, random_state=seed)
        is_val = np.isin(idx, va)
    return fit_stats(X[~is_val], X[is_val], seed=seed, **kwargs)
