"""Learned post-processing of P(dog) predictions: none, a learned symmetric clip, or temperature.

A run's validation (held-out or out-of-fold) predictions decide how its test predictions are
post-processed before they are scored or submitted. The candidates:

``none``
    the head's probabilities as they are.
``clip``
    ``clip(p, eps, 1 - eps)`` with ``eps`` learned on the validation predictions
    (:func:`catsdogs.evaluation.metrics.best_clip`); or, when the experiment gives ``clip: [lo, hi]``
    explicitly, exactly those bounds (nothing learned).
``temperature``
    ``sigmoid(logit(p) / T)`` with one scalar ``T`` fitted by minimising the validation log loss;
    ``T > 1`` softens an over-confident head, ``T < 1`` sharpens an under-confident one.

**Every transform keeps its output in** ``[PROB_EPS, 1 - PROB_EPS]`` (``none`` too;
:data:`catsdogs.evaluation.metrics.PROB_EPS` = 2^-24, float32's resolution next to 1): a head's
float32 sigmoid saturates at exactly 1.0, which a log loss clipped at 1e-15 scores at 34.5 nats on
a photo of a cat, against at most the logit on a photo of a dog. The bound is applied after the
transform, so the ranking number, the leaderboard's test loss, ``submission.csv`` and the exported
graph (:class:`catsdogs.app.graph.PostProcess`, where the bound is exact in float32) all see the
same numbers. A transform recorded before the bound existed (its ``to_dict`` has no ``bound``)
keeps applying none, so an old run's export still gives its old submission; rerunning the
experiment re-chooses every run's post-processing from its stored validation predictions (no
head is retrained) and so bounds it.

``auto`` (the default) chooses among the three **on the real log loss of held-out predictions**
(cross-fitted over K folds of the validation predictions): each candidate is fitted on K-1 folds
and applied to the held-out fold, so every validation row gets a prediction from a transform that
never saw its label, and those predictions are scored against the real labels. A learned
transform replaces ``none`` only if its mean paired gain per row (real log loss of ``none`` minus
its own, row by row) is positive and exceeds :data:`MIN_Z` standard errors of that gain (a
one-standard-error rule): a gain that a few noisy rows could produce keeps ``none``. So the
ranking number is never worse than doing nothing when ``none`` is better on held-out rows.

**Smoothing regularises the fit, never the choice.** A few hundred validation images cannot show
how often a *confidently* wrong prediction happens, so the learned transforms are *fitted*
against Platt's (1999) smoothed targets ``(N+ + 1) / (N+ + 2)`` for dogs and ``1 / (N- + 2)``
for cats instead of 1 and 0 (one unseen mistake of each kind), which keeps a fitted clip or
temperature from trusting extremes the data cannot vouch for. Whether that smoothed fit is used
at all is decided by its cross-fitted loss against the REAL labels. (Until 0.x the choice was
measured against the smoothed targets too, which made ``auto`` pick a clip near ``1/N`` for
almost every run even when it raised the held-out log loss: issue 20 item 6.)

**k-fold runs.** A k-fold run's validation predictions are out-of-fold predictions of single
fold heads, while its test prediction averages K heads (less confident). The transform is chosen
on the former, so it is applied the same way: to each fold head's test predictions, then
averaged (:func:`apply_to_test`; ``test_predictions.csv`` has one ``p_dog_foldK`` column per
fold, ``p_dog`` is their raw mean).

:func:`choose` returns a :class:`Choice` with the transform refitted on all validation rows (to
apply to the test predictions), the raw and post-processed validation log loss, the cross-fitted
predictions of the chosen transform and the cross-validated loss of every candidate.
``logloss_post`` -- the number runs are ranked by (:attr:`catsdogs.runs.record.RunRecord.ranking_logloss`) --
is the cross-fitted (honest) loss of the chosen transform, never the loss of a transform fitted
on the very rows it is scored on; for ``none`` and a fixed clip it is simply their loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from catsdogs.errors import ConfigError
from catsdogs.evaluation.metrics import (
    DEFAULT_CLIP_GRID,
    PROB_EPS,
    bound_probabilities,
    check_clip_bounds,
    cross_entropy,
    log_loss,
    logit,
    logit_cross_entropy,
    sigmoid,
)

__all__ = ["METHODS", "MIN_Z", "POST_COLUMN", "Choice", "Transform", "apply_to_test", "choose",
           "fit", "fold_columns", "platt_targets", "postprocess_record", "ranking_loss",
           "transform_of"]

#: the values of the experiment's ``postprocess`` field
METHODS = ("auto", "none", "clip", "temperature")
#: a learned transform must beat ``none`` by this many standard errors of the paired gain
MIN_Z = 1.0
#: folds of the cross-validated choice (fewer when a class has fewer validation rows)
FOLDS = 5
#: column of ``val_predictions.csv`` holding the cross-fitted post-processed predictions (the
#: rows behind the ranking number: their mean log loss is ``logloss_post``)
POST_COLUMN = "p_dog_post"
#: prefix of the per-fold raw test prediction columns of a k-fold run's ``test_predictions.csv``
FOLD_PREFIX = "p_dog_fold"
#: bounds of log(T) searched by the temperature fit
_LOG_T_BOUNDS = (-4.0, 4.0)


@dataclass(frozen=True)
class Transform:
    """One post-processing transform; ``apply`` maps probabilities to probabilities."""

    kind: str  # none | clip | temperature
    lo: float = 0.0  # clip bounds (kind == "clip")
    hi: float = 1.0
    temperature: float = 1.0  # kind == "temperature"
    learned: bool = False  # fitted on validation predictions (False: fixed by the experiment)
    #: the output is kept in ``[bound, 1 - bound]`` (0: a transform recorded before the bound)
    bound: float = PROB_EPS

    def apply(self, p) -> np.ndarray:
        p = np.asarray(p, dtype=np.float64)
        if self.kind == "clip":
            p = np.clip(p, self.lo, self.hi)
        elif self.kind == "temperature":
            p = sigmoid(logit(p) / self.temperature)
        return bound_probabilities(p, self.bound)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "learned": self.learned, "bound": self.bound}
        if self.kind == "clip":
            out["clip"] = [self.lo, self.hi]
        if self.kind == "temperature":
            out["temperature"] = self.temperature
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Transform:
        kind = d.get("kind", "none")
        bound = float(d.get("bound", 0.0))  # recorded before the bound existed: none
        if not 0.0 <= bound < 0.5:
            raise ConfigError(f"post-processing bound must lie in [0, 0.5), got {bound!r}")
        if kind == "clip":
            lo, hi = d["clip"]
            return cls("clip", lo=float(lo), hi=float(hi), learned=bool(d.get("learned")),
                       bound=bound)
        if kind == "temperature":
            return cls("temperature", temperature=float(d["temperature"]), learned=True,
                       bound=bound)
        if kind != "none":
            raise ConfigError(f"unknown post-processing transform {kind!r}; "
                              f"expected one of none, clip, temperature")
        return cls("none", bound=bound)

    def describe(self) -> str:
        if self.kind == "clip":
            return f"clip [{self.lo:.4g}, {self.hi:.4g}]" + ("" if self.learned else " (fixed)")
        if self.kind == "temperature":
            return f"temperature {self.temperature:.3g}"
        return "none"


def platt_targets(y) -> np.ndarray:
    """Platt's smoothed targets: ``(N+ + 1)/(N+ + 2)`` for label 1, ``1/(N- + 2)`` for label 0."""
    y = np.asarray(y, dtype=np.float64).ravel()
    n_pos = float(y.sum())
    n_neg = float(y.size - n_pos)
    return np.where(y == 1.0, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))


def fit(kind: str, y, p, clip_bounds: tuple[float, float] | None = None) -> Transform:
    """Fit one transform of ``kind`` on validation labels ``y`` and predictions ``p`` (against
    Platt's targets, see the module docstring).

    ``clip`` with ``clip_bounds`` is the fixed clip (nothing is fitted).
    """
    if kind == "none":
        return Transform("none")
    if kind == "clip":
        if clip_bounds is not None:
            lo, hi = check_clip_bounds(*clip_bounds)
            return Transform("clip", lo=lo, hi=hi)
        t, p = platt_targets(y), np.asarray(p, dtype=np.float64).ravel()
        eps = min(np.unique(np.concatenate([[0.0], DEFAULT_CLIP_GRID])),
                  key=lambda e: float(cross_entropy(t, np.clip(p, e, 1.0 - e)).mean()))
        return Transform("clip", lo=float(eps), hi=1.0 - float(eps), learned=True)
    if kind == "temperature":
        return Transform("temperature", temperature=_fit_temperature(y, p), learned=True)
    raise ConfigError(f"unknown post-processing {kind!r}; expected one of {', '.join(METHODS)}")


def _fit_temperature(y, p) -> float:
    from scipy.optimize import minimize_scalar

    y = platt_targets(y)
    z = logit(p).ravel()

    def loss(log_t: float) -> float:
        return float(np.mean(logit_cross_entropy(y, z / np.exp(log_t))))

    res = minimize_scalar(loss, bounds=_LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-6})
    return float(np.exp(res.x))


@dataclass
class Choice:
    """The chosen transform and the validation numbers behind the choice."""

    method: str  # what was asked for: auto | none | clip | temperature
    transform: Transform  # fitted on all validation rows; apply it to the test predictions
    logloss_raw: float  # validation log loss of the raw predictions
    logloss_post: float  # cross-fitted validation log loss of the chosen transform (ranking key)
    logloss_post_insample: float  # ... of ``transform`` on the rows it was fitted on (optimistic)
    #: candidate -> cross-fitted log loss, mean paired gain over none per row and its z (all
    #: against the real labels: what the choice is made on)
    cv: dict[str, dict[str, float]] = field(default_factory=dict)
    folds: int = 0
    #: the cross-fitted validation predictions of the chosen transform (not in ``to_dict``;
    #: written as :data:`POST_COLUMN` of ``val_predictions.csv``)
    val_post: np.ndarray | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "transform": self.transform.to_dict(),
                "describe": self.transform.describe(), "logloss_raw": self.logloss_raw,
                "logloss_post": self.logloss_post,
                "logloss_post_insample": self.logloss_post_insample, "cv": self.cv,
                "folds": self.folds, "min_z": MIN_Z, "criterion": "real log loss, cross-fitted"}


def _fold_ids(y: np.ndarray, folds: int, seed: int) -> np.ndarray:
    from sklearn.model_selection import StratifiedKFold

    ids = np.zeros(len(y), dtype=int)
    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (_, held) in enumerate(skf.split(np.zeros(len(y)), y)):
        ids[held] = k
    return ids


def cross_fitted(kind: str, y: np.ndarray, p: np.ndarray, fold_ids: np.ndarray,
                 clip_bounds: tuple[float, float] | None = None) -> np.ndarray:
    """Predictions of ``kind`` where each fold's rows come from a transform fitted on the others."""
    out = np.empty_like(p)
    for k in np.unique(fold_ids):
        held = fold_ids == k
        out[held] = fit(kind, y[~held], p[~held], clip_bounds).apply(p[held])
    return out


def choose(y, p, method: str = "auto", *, clip_bounds: tuple[float, float] | None = None,
           folds: int = FOLDS, seed: int = 0, min_z: float = MIN_Z) -> Choice:
    """Choose and fit the post-processing of validation predictions ``p`` (labels ``y``).

    ``method`` is ``auto`` (cross-validated choice among none, learned clip and temperature; see
    the module docstring), or one transform to use as asked. ``clip_bounds`` makes ``clip`` the
    fixed clip. ``seed`` fixes the folds, so the choice is deterministic.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown postprocess {method!r}; expected one of {', '.join(METHODS)}")
    y = np.asarray(y, dtype=np.float64).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    raw = log_loss(y, p)
    k = int(min(folds, np.bincount(y.astype(int), minlength=2).min()))
    fold_ids = _fold_ids(y.astype(int), k, seed) if k >= 2 else None

    def cv_predictions(kind: str) -> np.ndarray:
        if kind == "none" or (kind == "clip" and clip_bounds is not None):
            return fit(kind, y, p, clip_bounds).apply(p)
        assert fold_ids is not None
        return cross_fitted(kind, y, p, fold_ids)

    if method == "auto":
        candidates = ["none"] + (["clip", "temperature"] if fold_ids is not None else [])
    else:
        candidates = [method]
    if fold_ids is None and method in ("clip", "temperature") and not (
            method == "clip" and clip_bounds is not None):
        candidates = ["none"]  # too few rows of a class to cross-fit: nothing learned
    base = cross_entropy(y, Transform("none").apply(p))  # the real per-row log loss of ``none``
    cv: dict[str, dict[str, float]] = {}
    preds: dict[str, np.ndarray] = {}
    best, best_gain = candidates[0], 0.0
    for kind in candidates:
        q = preds[kind] = cv_predictions(kind)
        gain = base - cross_entropy(y, q)  # > 0: the transform helps that held-out row (real labels)
        se = float(gain.std(ddof=1) / np.sqrt(len(gain))) if len(gain) > 1 else 0.0
        z = float(gain.mean() / se) if se > 0 else 0.0
        cv[kind] = {"logloss": log_loss(y, q), "gain": float(gain.mean()), "z": z}
        if method == "auto" and kind != "none" and z > min_z and gain.mean() > best_gain:
            best, best_gain = kind, float(gain.mean())
    chosen = fit(best, y, p, clip_bounds)
    return Choice(method=method, transform=chosen, logloss_raw=raw,
                  logloss_post=cv[best]["logloss"],
                  logloss_post_insample=log_loss(y, chosen.apply(p)), cv=cv,
                  folds=0 if fold_ids is None else k, val_post=preds[best])


# ------------------------------------------------------------------------------------ runs
def transform_of(record) -> Transform:
    """The transform a run's (or ensemble's) test predictions get: its recorded choice, or, for a
    record written before post-processing existed, its fixed clip."""
    chosen = getattr(record, "postprocess", None)
    if chosen:
        return Transform.from_dict(chosen["transform"])
    lo, hi = record.clip
    return Transform("clip", lo=float(lo), hi=float(hi), bound=0.0)


def ranking_loss(record) -> float:
    """The validation log loss runs are ranked by: :attr:`~catsdogs.runs.record.RunRecord.ranking_logloss`."""
    return float(record.ranking_logloss)


def fold_columns(frame) -> list[str]:
    """The per-fold raw test prediction columns of a ``test_predictions.csv`` frame, in fold order
    (empty for a holdout run or a file written before they existed)."""
    cols = [c for c in frame.columns if str(c).startswith(FOLD_PREFIX) and str(c)[len(FOLD_PREFIX):].isdigit()]
    return sorted(cols, key=lambda c: int(str(c)[len(FOLD_PREFIX):]))


def apply_to_test(transform: Transform, frame) -> np.ndarray:
    """The post-processed test P(dog) of a run's ``test_predictions.csv`` ``frame``: ``transform``
    applied to each fold head's predictions and then averaged when the frame has per-fold columns
    (k-fold: the transform was chosen on single fold heads' out-of-fold predictions), else applied
    to ``p_dog``."""
    cols = fold_columns(frame)
    if not cols:
        return transform.apply(frame["p_dog"].to_numpy(dtype=np.float64))
    return np.mean([transform.apply(frame[c].to_numpy(dtype=np.float64)) for c in cols], axis=0)


def postprocess_record(record, run_dir, experiment) -> Choice:
    """Choose ``record``'s post-processing from ``run_dir/val_predictions.csv`` as ``experiment``
    asks (``postprocess``; ``clip`` means the experiment's clip bounds), store it in the record
    and rewrite ``record.json`` when it changed (finished runs are not retrained for it). The
    cross-fitted predictions behind the ranking number go into ``val_predictions.csv`` as
    :data:`POST_COLUMN`."""
    import pandas as pd

    from catsdogs.util.fileio import atomic_write

    path = Path(run_dir) / "val_predictions.csv"
    val = pd.read_csv(path)
    bounds = tuple(experiment.clip) if experiment.postprocess == "clip" else None
    choice = choose(val["label"].to_numpy(), val["p_dog"].to_numpy(), experiment.postprocess,
                    clip_bounds=bounds, seed=experiment.seed)
    new = choice.to_dict()
    if getattr(record, "postprocess", None) != new:
        record.postprocess = new
        record.save(run_dir)
    assert choice.val_post is not None
    if POST_COLUMN not in val.columns or not np.allclose(
            val[POST_COLUMN].to_numpy(dtype=np.float64), choice.val_post, rtol=1e-12, atol=0.0):
        val[POST_COLUMN] = choice.val_post
        atomic_write(path, lambda fh: fh.write(val.to_csv(index=False).encode()))
    return choice
