"""Ensembles of runs: the mean or a stacked blend of the best runs' predictions, honestly scored.

Every run of an experiment predicts the same validation rows (the split is drawn once), so their
validation (held-out or out-of-fold) predictions line up row by row. An ensemble of the ``top``
runs combines them:

``mean``
    the mean of the members' probabilities.
``stack``
    a logistic blend ``sigmoid(b + sum_k w_k logit(p_k))`` with **non-negative** weights ``w_k``
    (a member can be ignored, never used backwards), fitted by penalised maximum likelihood
    (:data:`L2`) on the validation predictions only; it also learns the overall temperature.

**Honest scoring.** The members are chosen by validation log loss, and ``stack`` is fitted on the
validation labels, so scoring the ensemble on those same rows would flatter it. Instead the
validation rows are split into folds (stratified, seeded); for each fold the members are chosen
and the blend fitted on the *other* folds' rows only, then that fold is predicted. The ensemble's
validation predictions -- and so its leaderboard row -- therefore never come from a selection or
a fit that saw their labels. The test predictions use the members chosen and the blend fitted on
all validation rows.

Members are ranked by their raw validation log loss on the rows at hand (inside each fold: the
other folds' rows), so the selection is part of what is cross-fitted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from catsdogs.errors import ConfigError, DataError
from catsdogs.runs.metrics import log_loss
from catsdogs.runs.postprocess import logit, sigmoid

__all__ = ["L2", "METHODS", "Blend", "EnsembleFit", "fit_blend", "fit_ensemble"]

METHODS = ("mean", "stack")
#: L2 penalty of the stacker's weights, per validation row (keeps the blend stable on few rows)
L2 = 1e-3
#: folds of the cross-fitted validation score
FOLDS = 5


@dataclass(frozen=True)
class Blend:
    """A fitted combination of members' probabilities (columns of ``P``)."""

    method: str
    weights: tuple[float, ...]  # mean: 1/K each; stack: the non-negative logit weights
    bias: float = 0.0

    def predict(self, P: np.ndarray) -> np.ndarray:
        P = np.asarray(P, dtype=np.float64)
        if self.method == "mean":
            return P @ np.asarray(self.weights)
        return sigmoid(self.bias + logit(P) @ np.asarray(self.weights))

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "weights": list(self.weights), "bias": self.bias}


def fit_blend(method: str, y: np.ndarray, P: np.ndarray) -> Blend:
    """Fit ``method`` on labels ``y`` and members' probabilities ``P`` (rows x members)."""
    k = P.shape[1]
    if method == "mean":
        return Blend("mean", tuple([1.0 / k] * k))
    if method != "stack":
        raise ConfigError(f"unknown ensemble method {method!r}; expected one of {', '.join(METHODS)}")
    from scipy.optimize import minimize

    Z = logit(P)
    y = np.asarray(y, dtype=np.float64)

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[:k], theta[k]
        s = b + Z @ w
        loss = np.logaddexp(0.0, -s) * y + np.logaddexp(0.0, s) * (1.0 - y)
        r = sigmoid(s) - y  # d loss / d s
        grad = np.concatenate([Z.T @ r / len(y) + 2 * L2 * w, [r.mean()]])
        return float(loss.mean() + L2 * w @ w), grad

    start = np.concatenate([np.full(k, 1.0 / k), [0.0]])
    res = minimize(objective, start, jac=True, method="L-BFGS-B",
                   bounds=[(0.0, None)] * k + [(None, None)])
    return Blend("stack", tuple(float(v) for v in res.x[:k]), float(res.x[k]))


@dataclass
class EnsembleFit:
    """An ensemble: its members, blend, cross-fitted validation and test predictions."""

    method: str
    top: int
    members: list[str]  # run ids chosen on all validation rows (the test predictions' members)
    blend: Blend  # fitted on all validation rows
    val: np.ndarray  # cross-fitted validation predictions (the honest ones)
    test: np.ndarray | None  # test predictions of ``blend`` over ``members``
    logloss: float  # log loss of ``val``
    logloss_insample: float  # log loss of ``blend`` on the rows it was fitted on (optimistic)
    best_member_logloss: float
    folds: int
    fold_members: list[list[str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "top": self.top, "members": self.members,
                "blend": self.blend.to_dict(), "logloss": self.logloss,
                "logloss_insample": self.logloss_insample,
                "best_member_logloss": self.best_member_logloss, "folds": self.folds,
                "fold_members": self.fold_members}


def _losses(y: np.ndarray, P: np.ndarray) -> np.ndarray:
    Pc = np.clip(P, 1e-15, 1 - 1e-15)
    return -(y[:, None] * np.log(Pc) + (1 - y[:, None]) * np.log1p(-Pc)).mean(axis=0)


def _select(y: np.ndarray, P: np.ndarray, top: int) -> np.ndarray:
    """Column indices of the ``top`` lowest-loss members (ties: the earlier column)."""
    return np.argsort(_losses(y, P), kind="stable")[:top]


def fit_ensemble(y, P_val, run_ids: list[str], *, method: str = "mean", top: int = 3,
                 P_test=None, folds: int = FOLDS, seed: int = 0) -> EnsembleFit:
    """Choose the ``top`` runs among the columns of ``P_val`` and combine them (module docstring).

    ``y``: validation labels; ``P_val``: (rows x runs) validation probabilities, one column per
    entry of ``run_ids``; ``P_test``: (test rows x runs) or None. ``seed`` fixes the folds.
    """
    y = np.asarray(y, dtype=np.float64).ravel()
    P_val = np.asarray(P_val, dtype=np.float64)
    if P_val.ndim != 2 or P_val.shape != (len(y), len(run_ids)):
        raise DataError(f"ensemble: expected validation predictions of shape {(len(y), len(run_ids))}, "
                        f"got {P_val.shape}")
    if top < 2 or top > len(run_ids):
        raise ConfigError(f"ensemble.top must lie in [2, {len(run_ids)}] (the number of runs), got {top}")
    if method not in METHODS:
        raise ConfigError(f"unknown ensemble method {method!r}; expected one of {', '.join(METHODS)}")
    from sklearn.model_selection import StratifiedKFold

    k = int(min(folds, np.bincount(y.astype(int), minlength=2).min()))
    if k < 2:
        raise DataError("ensemble: the validation rows need at least 2 images of each class")
    val = np.empty(len(y))
    fold_members = []
    skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    for fit_rows, held in skf.split(np.zeros(len(y)), y.astype(int)):
        cols = _select(y[fit_rows], P_val[fit_rows], top)
        blend = fit_blend(method, y[fit_rows], P_val[np.ix_(fit_rows, cols)])
        val[held] = blend.predict(P_val[np.ix_(held, cols)])
        fold_members.append([run_ids[c] for c in cols])
    cols = _select(y, P_val, top)
    blend = fit_blend(method, y, P_val[:, cols])
    test = None if P_test is None else blend.predict(np.asarray(P_test, dtype=np.float64)[:, cols])
    return EnsembleFit(
        method=method, top=top, members=[run_ids[c] for c in cols], blend=blend, val=val, test=test,
        logloss=log_loss(y, val), logloss_insample=log_loss(y, blend.predict(P_val[:, cols])),
        best_member_logloss=float(_losses(y, P_val).min()), folds=k, fold_members=fold_members,
    )
