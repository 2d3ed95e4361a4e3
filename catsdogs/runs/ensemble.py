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

**Only weighted members are kept.** The stack's weights are bounded at zero, so members the blend
on all validation rows does not use get a weight of exactly 0. They are dropped from ``members``
(listed under ``unused``): the test predictions are the same without them, and the refit, the
export and ``serve`` then carry only the members the submission depends on (a stack of every run
used 8 of its 31 members on the benchmark; the refit had refitted all 31).

Members are ranked by their raw validation log loss on the rows at hand (inside each fold: the
other folds' rows), so the selection is part of what is cross-fitted.

**k-fold members.** A k-fold run's validation row comes from one fold head, and its test
prediction averages K fold heads. The blend (and the ensemble's post-processing) is fitted on the
former, so it is applied the same way: to the members' fold-k test predictions for each fold k
(``p_dog_foldK`` columns), then averaged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from catsdogs.errors import ConfigError, DataError
from catsdogs.evaluation.metrics import (
    cross_entropy,
    log_loss,
    logit,
    logit_cross_entropy,
    sigmoid,
    summarize,
)
from catsdogs.runs.postprocess import FOLD_PREFIX

if TYPE_CHECKING:  # pragma: no cover
    from catsdogs.experiment.spec import Experiment
    from catsdogs.runs.record import RunRecord

logger = logging.getLogger("catsdogs")

__all__ = ["L2", "METHODS", "Blend", "EnsembleFit", "ensemble_id", "ensemble_record", "fit_blend",
           "fit_ensemble"]

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
        loss = logit_cross_entropy(y, s)
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
    unused: list[str] = field(default_factory=list)  # chosen, but weight 0 in ``blend``: dropped

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "top": self.top, "members": self.members,
                "blend": self.blend.to_dict(), "logloss": self.logloss,
                "logloss_insample": self.logloss_insample,
                "best_member_logloss": self.best_member_logloss, "folds": self.folds,
                "fold_members": self.fold_members, "unused": self.unused}


def _losses(y: np.ndarray, P: np.ndarray) -> np.ndarray:
    """Each member's (column's) mean log loss."""
    return cross_entropy(y[:, None], P).mean(axis=0)


def _select(y: np.ndarray, P: np.ndarray, top: int) -> np.ndarray:
    """Column indices of the ``top`` lowest-loss members (ties: the earlier column)."""
    return np.argsort(_losses(y, P), kind="stable")[:top]


def _weighted(cols: np.ndarray, blend: Blend) -> tuple[np.ndarray, Blend, np.ndarray]:
    """``(kept columns, their blend, dropped columns)``: the members of ``blend`` with a weight
    above zero (all of them for ``mean``; at least the first, should a stack weight none)."""
    w = np.asarray(blend.weights)
    keep = np.flatnonzero(w > 0) if blend.method == "stack" else np.arange(len(w))
    if len(keep) == 0:
        keep = np.arange(1)
    drop = np.setdiff1d(np.arange(len(w)), keep)
    return cols[keep], Blend(blend.method, tuple(float(v) for v in w[keep]), blend.bias), cols[drop]


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
    cols, blend, unused = _weighted(cols, fit_blend(method, y, P_val[:, cols]))
    test = None if P_test is None else blend.predict(np.asarray(P_test, dtype=np.float64)[:, cols])
    return EnsembleFit(
        method=method, top=top, members=[run_ids[c] for c in cols], blend=blend, val=val, test=test,
        logloss=log_loss(y, val), logloss_insample=log_loss(y, blend.predict(P_val[:, cols])),
        best_member_logloss=float(_losses(y, P_val).min()), folds=k, fold_members=fold_members,
        unused=[run_ids[c] for c in unused],
    )


# ------------------------------------------------------------------------------------ runs
def ensemble_id(top: int, method: str) -> str:
    return f"ensemble-top{top}-{method}"


def _read_predictions(out: Path, runs: list[RunRecord]):
    """Validation and test predictions of ``runs`` as aligned matrices (rows: files / test ids)."""
    import pandas as pd

    vals = [pd.read_csv(out / "runs" / r.run_id / "val_predictions.csv") for r in runs]
    base = vals[0][["file", "id", "label"]]
    for r, v in zip(runs, vals):
        if list(v["file"]) != list(base["file"]):
            raise DataError(f"ensemble: run {r.run_id!r} predicted other validation rows than "
                            f"{runs[0].run_id!r}; rerun the experiment so all runs share one split")
    P_val = np.stack([v["p_dog"].to_numpy(dtype=np.float64) for v in vals], axis=1)
    tests = [out / "runs" / r.run_id / "test_predictions.csv" for r in runs]
    if not all(t.is_file() for t in tests):
        return base, P_val, None, None
    from catsdogs.runs.postprocess import fold_columns

    tables = [pd.read_csv(t).set_index("id") for t in tests]
    test_ids = tables[0].index
    P_test = np.stack([t["p_dog"].reindex(test_ids).to_numpy(dtype=np.float64) for t in tables], axis=1)
    folds = [fold_columns(t) for t in tables]
    if folds[0] and all(f == folds[0] for f in folds):  # k-fold members: (folds, test rows, members)
        P_test = np.stack([np.stack([t[c].reindex(test_ids).to_numpy(dtype=np.float64) for t in tables],
                                    axis=1) for c in folds[0]])
    return base, P_val, test_ids, P_test


def ensemble_record(records: list[RunRecord], out: Path, experiment: Experiment) -> RunRecord | None:
    """Fit ``experiment.ensemble`` over the single runs ``records`` and write it as a run directory
    ``<out>/runs/ensemble-topK-METHOD`` (record, cross-fitted validation predictions, test
    predictions), so it is ranked, scored, submitted and read like any run. None (with a
    warning) when there are fewer than two runs."""
    import pandas as pd

    from catsdogs._version import __version__
    from catsdogs.runs.record import HeadRef, Metrics, RunRecord
    from catsdogs.util.fileio import atomic_path

    cfg = experiment.ensemble
    runs = sorted(records, key=lambda r: r.run_id)
    if cfg is None or len(runs) < 2:
        logger.warning("ensemble: needs at least 2 runs, the experiment has %d", len(runs))
        return None
    t0 = time.perf_counter()
    top = min(cfg.top, len(runs))
    base, P_val, test_ids, P_test = _read_predictions(out, runs)
    y = base["label"].to_numpy(dtype=np.float64)
    per_fold = P_test is not None and P_test.ndim == 3
    fit = fit_ensemble(y, P_val, [r.run_id for r in runs], method=cfg.method, top=top,
                       P_test=P_test.mean(axis=0) if per_fold else P_test, seed=experiment.seed)
    test_columns: dict[str, np.ndarray] = {}
    if fit.test is not None:
        test_columns["p_dog"] = fit.test
    if per_fold:  # the blend applied to each fold's heads, as it was fitted, then averaged
        cols = [[r.run_id for r in runs].index(m) for m in fit.members]
        fold_preds = [fit.blend.predict(P[:, cols]) for P in P_test]
        test_columns = {"p_dog": np.mean(fold_preds, axis=0),
                        **{f"{FOLD_PREFIX}{k}": p for k, p in enumerate(fold_preds)}}
    members = [next(r for r in runs if r.run_id == m) for m in fit.members]
    run_id = ensemble_id(top, cfg.method)
    settings = {"ensemble": {"top": top, "method": cfg.method}, "members": fit.members}
    record = RunRecord(
        run_id=run_id,
        combination=sorted({b for m in members for b in m.combination}),
        head=HeadRef(f"ensemble_{cfg.method}", {}),
        optimizer=None,
        params={"members": fit.members, "blend": fit.blend.to_dict()},
        learning_rate=None,
        settings=settings,
        settings_hash=hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16],
        metrics=Metrics.from_dict(summarize(y, fit.val, experiment.clip), "metrics"),
        tta=any(m.tta for m in members),
        tuning=None,
        n_train=members[0].n_train,
        n_val=len(y),
        n_test=0 if P_test is None else len(test_ids),
        validation=members[0].validation,
        clip=list(experiment.clip),
        target=experiment.target,
        seconds=time.perf_counter() - t0,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        catsdogs_version=__version__,
        ensemble=fit.to_dict(),
    )
    (out / "runs").mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "runs" / run_id) as tmp:  # the run folder appears whole or not at all
        tmp.mkdir()
        pd.DataFrame({**{c: base[c] for c in base.columns}, "p_dog": fit.val}).to_csv(
            tmp / "val_predictions.csv", index=False)
        if test_columns:
            pd.DataFrame({"id": test_ids, **test_columns}).to_csv(tmp / "test_predictions.csv",
                                                                  index=False)
        record.save(tmp)
    return record
