"""``lightgbm_stacking``: a two-level stacking head over the fused backbones (built-in plugin).

What is stacked, exactly:

* **Level 1 (one model per backbone).** The fused feature matrix ``X`` is cut into its blocks
  (``blocks=[(backbone, width), ...]`` from :meth:`~catsdogs.components.Head.fit`; the whole of
  ``X`` is one block when ``blocks`` is None). For every block a first-level head
  (``base_head``, any registered head, default ``dropout_sigmoid``, with ``base_params``) is
  trained with the caller's optimizer, epochs, batch size and seed.
* **Out-of-fold level-2 inputs.** The training rows are split by ``StratifiedKFold(folds,
  shuffle=True, random_state=seed)``; for each fold a fresh first-level head is trained on the
  other folds and predicts the held-out fold. Every sample's level-2 training input therefore
  comes from a model that never saw that sample (no target leakage through level 1). Afterwards
  each block's first-level head is refitted on all training rows; only these refitted heads are
  used for new data (validation rows and :meth:`~LightGBMStackingHead.predict_proba`).
* **Level 2.** A small, regularised ``lightgbm.LGBMClassifier`` is trained on one column per
  block: the first-level prediction as a **logit**, ``log(p / (1 - p))`` with ``p`` clipped to
  ``[1e-7, 1 - 1e-7]``. Trees only use the order of a feature's values, so logits and
  probabilities give the same splits; logits are kept because they do not saturate in float32
  and are easier to read in :attr:`~LightGBMStackingHead.oof_logits_`.
* **Early stopping on its own rows.** With ``early_stopping_rounds`` set, the number of trees is
  chosen on an inner, stratified :data:`INNER_HOLDOUT` split of the head's OWN training rows (their
  out-of-fold level-2 inputs, seeded): LightGBM is trained on the rest and stopped when the inner
  split's log loss has not improved for ``early_stopping_rounds`` rounds; then level 2 is refitted
  on all training rows with exactly that many trees (:attr:`~LightGBMStackingHead.best_iteration_`).
  The caller's ``validation`` rows -- the rows the run is ranked on -- never choose anything: they
  only get a ``val_loss`` curve in ``history_``. :meth:`~LightGBMStackingHead.refit_params` gives
  ``{"n_estimators": best_iteration_, "early_stopping_rounds": None}``, so a refit on more rows
  (``refit: true``) trains the tree count that was ranked instead of all ``n_estimators``.

The result is not a Keras graph, so :meth:`~LightGBMStackingHead.keras_model` returns None and the
head cannot be exported as an end-to-end network.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from catsdogs.components import Head, Optimizer
from catsdogs.errors import ConfigError
from catsdogs.evaluation.metrics import log_loss, logit
from catsdogs.hookspecs import hookimpl
from catsdogs.util.extras import require
from catsdogs.validation import (
    SEED_MAX,
    NotFittedError,
    check_features,
    check_int,
    check_labels,
    check_positive_int,
    check_real,
    check_validation,
)

logger = logging.getLogger("catsdogs")

#: first-level probabilities are clipped to [EPS, 1 - EPS] before taking logits
EPS = 1e-7
#: fraction of the training rows held out (stratified, seeded) to choose the number of trees
INNER_HOLDOUT = 0.2
#: block name used when ``fit`` gets no ``blocks``
WHOLE_BLOCK = "features"


def check_blocks(blocks: Any, n_features: int) -> list[tuple[str, int]]:
    """``blocks`` as a list of ``(name, width)`` whose widths add up to ``n_features``.

    ``None`` means one block covering all columns. Raises :class:`ConfigError` otherwise.
    """
    if blocks is None:
        return [(WHOLE_BLOCK, int(n_features))]
    if isinstance(blocks, (str, bytes)) or not isinstance(blocks, Sequence) or not blocks:
        raise ConfigError(
            f"blocks must be a non-empty list of (backbone name, width) pairs, got {blocks!r}"
        )
    out: list[tuple[str, int]] = []
    for i, block in enumerate(blocks):
        if isinstance(block, (str, bytes)) or not isinstance(block, Sequence) or len(block) != 2:
            raise ConfigError(f"blocks[{i}] must be a (backbone name, width) pair, got {block!r}")
        name, width = block
        if not isinstance(name, str) or not name:
            raise ConfigError(f"blocks[{i}]: the backbone name must be a non-empty string, got {name!r}")
        check_positive_int(width, f"blocks[{i}] ({name!r}): width")
        out.append((name, int(width)))
    total = sum(w for _, w in out)
    if total != n_features:
        layout = " + ".join(f"{n}:{w}" for n, w in out)
        raise ConfigError(
            f"blocks {layout} add up to {total} columns, but X has {n_features} feature columns"
        )
    return out


def _slices(blocks: Sequence[tuple[str, int]]) -> list[slice]:
    bounds = np.cumsum([0] + [w for _, w in blocks])
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]



class _TrainLossRecorder:
    """LightGBM callback: the training set's binary log loss after every boosting iteration.

    (``Booster.eval_train``; keeps the training set out of the evaluation sets, so early stopping
    only ever watches the validation set.)
    """

    order = 20

    def __init__(self, out: list[float]):
        self.out = out

    def __call__(self, env: Any) -> None:
        for _, metric, value, _ in env.model.eval_train():
            if metric == "binary_logloss":
                self.out.append(float(value))


def _eval_kwargs(model: Any, Z: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """``fit`` keywords that evaluate ``model`` on ``(Z, y)`` under the name ``val``."""
    # newer LightGBM (4.7 here) takes eval_X/eval_y and deprecates eval_set; older 4.x not
    if "eval_X" in inspect.signature(model.fit).parameters:
        return {"eval_X": Z, "eval_y": y, "eval_names": ["val"]}
    return {"eval_set": [(Z, y)], "eval_names": ["val"]}  # pragma: no cover - lightgbm < 4.6


class LightGBMStackingHead(Head):
    """Per-backbone first-level heads (out-of-fold) stacked by a small LightGBM classifier.

    See the module docstring (or :meth:`describe`) for exactly what is stacked.

    Hyper-parameters (stored by ``__init__`` only, validated by :meth:`fit`):

    * ``base_head`` – registered name of the first-level head, trained once per backbone block;
    * ``base_params`` – hyper-parameters for it (dict, None = its defaults);
    * ``folds`` – K of the stratified K-fold that produces the out-of-fold level-2 inputs;
    * ``n_estimators``, ``gbm_learning_rate``, ``num_leaves``, ``min_child_samples``,
      ``subsample``, ``reg_lambda`` – the LightGBM level 2 (``gbm_learning_rate`` is LightGBM's
      shrinkage; the Keras optimizer's learning rate only reaches level 1);
    * ``early_stopping_rounds`` – patience of early stopping on an inner split of the training
      rows (None = off: exactly ``n_estimators`` trees);
    * ``n_jobs`` – LightGBM threads. The level-2 table is tiny (rows x backbones), so one thread
      is as fast; with more, LightGBM's OpenMP spin-waits fight TensorFlow's thread pools and other
      processes for the CPUs (measured: 0.02 s -> 20 s for 400 x 2 rows on a loaded 2-CPU box).

    Fitted attributes: ``base_heads_`` (block name -> refitted first-level head), ``blocks_``,
    ``oof_logits_`` (the level-2 training matrix, one column per block), ``oof_log_loss_``
    (block name -> out-of-fold log loss of level 1), ``model_`` (the ``LGBMClassifier``, refitted
    on all rows with ``best_iteration_`` trees), ``best_iteration_`` (trees chosen on the inner
    split, or ``n_estimators``), ``history_`` (``loss``; ``inner_val_loss`` when early stopping ran;
    ``val_loss`` on ``validation``, recorded only), ``n_features_in_``.
    """

    name = "lightgbm_stacking"
    requires = ("lightgbm",)  # catsdogs[stacking]
    #: the optimizer trains the first-level Keras heads
    uses_optimizer = True

    def __init__(
        self,
        base_head: str = "dropout_sigmoid",
        base_params: dict[str, Any] | None = None,
        folds: int = 5,
        n_estimators: int = 200,
        gbm_learning_rate: float = 0.05,
        num_leaves: int = 7,
        min_child_samples: int = 20,
        subsample: float = 0.8,
        reg_lambda: float = 1.0,
        early_stopping_rounds: int | None = 30,
        n_jobs: int = 1,
    ):
        self.base_head = base_head
        self.base_params = base_params
        self.folds = folds
        self.n_estimators = n_estimators
        self.gbm_learning_rate = gbm_learning_rate
        self.num_leaves = num_leaves
        self.min_child_samples = min_child_samples
        self.subsample = subsample
        self.reg_lambda = reg_lambda
        self.early_stopping_rounds = early_stopping_rounds
        self.n_jobs = n_jobs

    # -- parameters ---------------------------------------------------------------------------------
    def validate_params(self) -> None:
        p = self.name
        if not isinstance(self.base_head, str) or not self.base_head:
            raise ConfigError(f"{p}: base_head must be the name of a registered head, got {self.base_head!r}")
        if self.base_head == self.name:
            raise ConfigError(f"{p}: base_head cannot be {self.name!r} itself")
        if self.base_params is not None and not isinstance(self.base_params, dict):
            raise ConfigError(f"{p}: base_params must be a dict or None, got {self.base_params!r}")
        check_int(self.folds, f"{p}: folds", minimum=2, maximum=100)
        check_int(self.n_estimators, f"{p}: n_estimators", maximum=100_000)
        check_real(self.gbm_learning_rate, f"{p}: gbm_learning_rate", 0.0)
        if self.gbm_learning_rate <= 0:
            raise ConfigError(f"{p}: gbm_learning_rate must be > 0, got {self.gbm_learning_rate!r}")
        check_int(self.num_leaves, f"{p}: num_leaves", minimum=2, maximum=131_072)  # LightGBM's cap
        check_int(self.min_child_samples, f"{p}: min_child_samples", maximum=1_000_000)
        check_real(self.subsample, f"{p}: subsample", 0.0, 1.0, high_inclusive=True)
        if self.subsample <= 0:
            raise ConfigError(f"{p}: subsample must be > 0, got {self.subsample!r}")
        check_real(self.reg_lambda, f"{p}: reg_lambda", 0.0)
        if self.early_stopping_rounds is not None:
            check_int(self.early_stopping_rounds, f"{p}: early_stopping_rounds", maximum=100_000)
        check_int(self.n_jobs, f"{p}: n_jobs", maximum=1024)

    @classmethod
    def search_space(cls, hp: Any) -> None:
        """The LightGBM level 2 is tuned (level 1 through the optimizer's ``learning_rate``)."""
        hp.Int("num_leaves", 2, 31)
        hp.Float("gbm_learning_rate", 0.01, 0.3, sampling="log")
        hp.Float("reg_lambda", 1e-3, 10.0, sampling="log")
        hp.Int("min_child_samples", 5, 50)

    def _base_class(self) -> type[Head]:
        from catsdogs.plugins import get_registry

        return get_registry().head(self.base_head)

    def _new_base(self, base_cls: type[Head]) -> Head:
        try:
            return base_cls(**(self.base_params or {}))
        except TypeError as exc:
            raise ConfigError(f"{self.name}: bad base_params for {self.base_head!r}: {exc}") from None

    def describe(self) -> dict[str, Any]:
        """What is stacked: the level-1 model per block, how its level-2 inputs are made, level 2."""
        blocks = getattr(self, "blocks_", None)
        return {
            "head": self.name,
            "level1": {
                "head": self.base_head,
                "params": dict(self.base_params or {}),
                "one_per_block": [n for n, _ in blocks] if blocks else "one per backbone block",
                "training_inputs": f"out-of-fold predictions, StratifiedKFold({self.folds}, "
                                   "shuffle=True, random_state=seed)",
                "prediction_inputs": "heads refitted on all training rows",
                "representation": f"logit of P(dog) clipped to [{EPS}, 1 - {EPS}]",
            },
            "level2": {
                "model": "lightgbm.LGBMClassifier",
                **self._lgbm_params(seed=None),
                "early_stopping_rounds": self.early_stopping_rounds,
                "early_stopping_on": f"a stratified {INNER_HOLDOUT:g} inner split of the training "
                                    "rows, then refitted on all of them with the chosen tree count",
            },
        }

    def _lgbm_params(self, seed: int | None) -> dict[str, Any]:
        params: dict[str, Any] = {
            "objective": "binary",
            "n_estimators": int(self.n_estimators),
            "learning_rate": float(self.gbm_learning_rate),
            "num_leaves": int(self.num_leaves),
            "min_child_samples": int(self.min_child_samples),
            "subsample": float(self.subsample),
            "subsample_freq": 1 if self.subsample < 1 else 0,
            "colsample_bytree": 1.0,  # one column per backbone: never drop a whole backbone
            "reg_lambda": float(self.reg_lambda),
        }
        if seed is not None:
            params.update(random_state=seed, n_jobs=int(self.n_jobs), verbose=-1,
                          deterministic=True, force_row_wise=True)
        return params

    # -- level 1 -----------------------------------------------------------------------------------
    def _fit_base(self, base_cls: type[Head], X: np.ndarray, y: np.ndarray,
                  fit_kwargs: dict[str, Any]) -> Head:
        head = self._new_base(base_cls)
        head.fit(X, y, **fit_kwargs)
        return head

    def _level1_training_inputs(self, base_cls: type[Head], Xb: np.ndarray, y: np.ndarray,
                                fit_kwargs: dict[str, Any], seed: int) -> np.ndarray:
        """Out-of-fold P(dog) for every training row of one block: row i is predicted by a
        first-level head trained on the folds that do not contain row i."""
        from sklearn.model_selection import StratifiedKFold

        oof = np.full(len(y), np.nan)
        splitter = StratifiedKFold(n_splits=int(self.folds), shuffle=True, random_state=seed)
        for train_idx, held_idx in splitter.split(Xb, y):
            head = self._fit_base(base_cls, Xb[train_idx], y[train_idx], fit_kwargs)
            oof[held_idx] = head.predict_proba(Xb[held_idx])
        return oof

    # -- Head API ---------------------------------------------------------------------------------
    def fit(
        self,
        X: np.ndarray,
        y: np.ndarray,
        *,
        validation: tuple[np.ndarray, np.ndarray] | None = None,
        optimizer: Optimizer | None = None,
        epochs: int = 8,
        batch_size: int = 128,
        seed: int = 2019,
        verbose: int = 0,
        blocks: Sequence[tuple[str, int]] | None = None,
    ) -> LightGBMStackingHead:
        """Fit level 1 per block (out-of-fold, then refitted on all rows) and LightGBM on top."""
        X = check_features(X, "X")
        y = check_labels(y, X.shape[0], "y")
        val = check_validation(validation, X.shape[1])
        seed = check_int(seed, "seed", minimum=0, maximum=SEED_MAX)
        check_int(epochs, "epochs")
        check_int(batch_size, "batch_size")
        self.validate_params()
        block_list = check_blocks(blocks, X.shape[1])
        counts = np.bincount(y, minlength=2)
        if counts.min() < self.folds:
            raise ConfigError(
                f"{self.name}: {self.folds}-fold stacking needs at least {self.folds} samples of "
                f"each class, got {int(counts[0])} cats and {int(counts[1])} dogs"
            )
        base_cls = self._base_class()
        fit_kwargs = dict(optimizer=optimizer if base_cls.uses_optimizer else None,
                          epochs=epochs, batch_size=batch_size, seed=seed, verbose=verbose)

        lightgbm = require("lightgbm", feature=f"head {self.name!r}")  # catsdogs[stacking]

        slices = _slices(block_list)
        oof_cols, val_cols, base_heads, oof_losses = [], [], {}, {}
        for (block_name, _), sl in zip(block_list, slices):
            oof = self._level1_training_inputs(base_cls, X[:, sl], y, fit_kwargs, seed)
            oof_losses[block_name] = log_loss(y, oof, eps=EPS)
            oof_cols.append(logit(oof, EPS))
            head = self._fit_base(base_cls, X[:, sl], y, fit_kwargs)
            base_heads[block_name] = head
            if val is not None:
                val_cols.append(logit(head.predict_proba(val[0][:, sl]), EPS))
            if verbose:
                logger.info("%s: block %r out-of-fold log loss %.4f",
                            self.name, block_name, oof_losses[block_name])
        Z = np.column_stack(oof_cols)

        best_iteration, inner_val = self._choose_trees(lightgbm, Z, y, seed)
        model = lightgbm.LGBMClassifier(**{**self._lgbm_params(seed), "n_estimators": best_iteration})
        train_loss: list[float] = []
        record: dict[str, dict[str, list[float]]] = {}
        callbacks: list[Any] = [_TrainLossRecorder(train_loss)]
        lgbm_kwargs: dict[str, Any] = {"eval_metric": "binary_logloss"}
        if val is not None:  # recorded for the curves only: nothing is chosen on these rows
            lgbm_kwargs.update(_eval_kwargs(model, np.column_stack(val_cols), val[1]))
            callbacks.append(lightgbm.record_evaluation(record))
        model.fit(Z, y, callbacks=callbacks, **lgbm_kwargs)

        self.blocks_ = block_list
        self.base_heads_ = base_heads
        self.oof_logits_ = Z
        self.oof_log_loss_ = oof_losses
        self.model_ = model
        self.best_iteration_ = int(best_iteration)
        self.history_ = {"loss": train_loss}
        if inner_val is not None:
            self.history_["inner_val_loss"] = inner_val
        if val is not None:
            self.history_["val_loss"] = [float(v) for v in record["val"]["binary_logloss"]]
        self.n_features_in_ = int(X.shape[1])
        return self

    def _choose_trees(self, lightgbm, Z: np.ndarray, y: np.ndarray,
                      seed: int) -> tuple[int, list[float] | None]:
        """The number of trees: early-stopped on a stratified inner split of the training rows'
        level-2 inputs (their curve is returned), or ``n_estimators`` when early stopping is off
        or a class has too few rows to split."""
        from sklearn.model_selection import train_test_split

        if self.early_stopping_rounds is None or np.bincount(y, minlength=2).min() < 2:
            return int(self.n_estimators), None
        fit_rows, stop_rows = train_test_split(np.arange(len(y)), test_size=INNER_HOLDOUT,
                                               stratify=y, random_state=seed)
        model = lightgbm.LGBMClassifier(**self._lgbm_params(seed))
        record: dict[str, dict[str, list[float]]] = {}
        model.fit(Z[fit_rows], y[fit_rows], eval_metric="binary_logloss",
                  **_eval_kwargs(model, Z[stop_rows], y[stop_rows]),
                  callbacks=[lightgbm.record_evaluation(record),
                             lightgbm.early_stopping(int(self.early_stopping_rounds),
                                                     first_metric_only=True, verbose=False)])
        best = getattr(model, "best_iteration_", None)
        curve = [float(v) for v in record["val"]["binary_logloss"]]
        return (int(best) if best else int(self.n_estimators)), curve

    def refit_params(self) -> dict[str, Any]:
        """Parameters that make a fit on more rows (``refit: true``) train what was ranked: the
        tree count chosen by early stopping, fixed (early stopping off)."""
        if getattr(self, "model_", None) is None:
            raise NotFittedError(f"{self.name}: head not fitted; call fit() first")
        return {"n_estimators": int(self.best_iteration_), "early_stopping_rounds": None}

    def level1_logits(self, X: np.ndarray) -> np.ndarray:
        """The level-2 inputs of new rows: logits of the refitted first-level heads, (n, blocks)."""
        if getattr(self, "model_", None) is None:
            raise NotFittedError(f"{self.name}: head not fitted; call fit() first")
        X = check_features(X, "X", n_features=self.n_features_in_, allow_empty=True)
        cols = [
            logit(self.base_heads_[name].predict_proba(X[:, sl]), EPS) if len(X) else np.zeros(0)
            for (name, _), sl in zip(self.blocks_, _slices(self.blocks_))
        ]
        return np.column_stack(cols) if cols else np.zeros((len(X), 0))

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """P(dog) for each row of ``X``: refitted level-1 heads -> logits -> LightGBM; (n,) float64."""
        Z = self.level1_logits(X)
        if len(Z) == 0:
            return np.zeros(0, dtype=np.float64)
        # lightgbm types predict_proba as ndarray | sparse | list (pred_contrib); here an ndarray
        return np.asarray(np.asarray(self.model_.predict_proba(Z))[:, 1], dtype=np.float64)

    def keras_model(self) -> None:
        """None: the LightGBM level 2 is not a Keras graph, so this head cannot be exported."""
        return None


@hookimpl
def register_heads(register):
    register(LightGBMStackingHead)
