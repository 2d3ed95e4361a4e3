"""``logistic``: the linear probe head (built-in, registered by :mod:`catsdogs.builtin.heads`).

The standard protocol for judging frozen features: L2-regularised logistic regression on
standardised features, its strength chosen by cross-validation inside the training rows.

* **Standardisation.** Each column is centred and scaled by its mean and standard deviation over
  the training rows (a constant column is left unscaled).
* **Choosing the strength.** For every ``C`` of ``c_values`` (scikit-learn's inverse strength:
  the objective is ``0.5 ||w||^2 + C * sum of the rows' log losses``) the head is fitted on
  ``folds - 1`` of ``folds`` stratified folds of the training rows (shuffled with ``seed``) and
  scored by the log loss of the held-out fold; the ``C`` with the lowest mean held-out log loss
  wins and the head is refitted with it on all training rows (scikit-learn's
  ``LogisticRegressionCV``: L-BFGS, warm-started along the ``C`` path). ``validation`` rows are
  never used for fitting or choosing; their log loss is recorded in ``history_`` only.
* **Export.** :meth:`LogisticHead.keras_model` is Keras' built-in ``Normalization`` layer (the
  training rows' mean and variance) followed by ``Dense(1, sigmoid, name="prediction")`` with the
  fitted coefficients, so exported models compute :meth:`LogisticHead.predict_proba`'s P(dog) to
  float32 round-off. (The standardisation could be folded into the Dense weights, ``coef /
  scale`` and ``intercept - sum(coef * mean / scale)``; kept apart, the centring happens per
  column before the sum, which is the more accurate order in float32.)

It trains no Keras model and takes no optimizer (``uses_optimizer = False``: the runner does not
cross it with the experiment's optimizers) and ignores ``epochs`` and ``batch_size``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from catsdogs.components import Head, Optimizer
from catsdogs.errors import ConfigError
from catsdogs.evaluation.metrics import log_loss, sigmoid
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

if TYPE_CHECKING:  # pragma: no cover
    import keras

#: columns whose standard deviation is below this are centred, not scaled (above Keras'
#: ``Normalization`` epsilon, 1e-7, so the exported layer divides by the same numbers)
MIN_SCALE = 1e-6
#: the default grid of inverse strengths ``C``: 1e-5 ... 1, half a decade apart
DEFAULT_C_VALUES = tuple(float(c) for c in np.logspace(-5, 0, 11))


def _positive(value: Any, what: str) -> float:
    """A finite number > 0 (not a bool), else :class:`ConfigError`."""
    if check_real(value, what, 0.0) <= 0.0:
        raise ConfigError(f"{what} must be a number > 0, got {value!r}")
    return float(value)


class LogisticHead(Head):
    """L2 logistic regression on standardised features, ``C`` chosen by inner K-fold CV.

    Hyper-parameters: ``c_values`` (the grid of inverse strengths; None = :data:`DEFAULT_C_VALUES`),
    ``folds`` (K of the inner stratified K-fold), ``max_iter`` and ``tol`` (L-BFGS).

    Fitted attributes: ``C_`` (the chosen strength), ``coef_`` / ``intercept_`` (on standardised
    features), ``mean_`` / ``scale_`` (the standardisation), ``cv_logloss_`` (mean inner held-out
    log loss per ``C``), ``history_`` (``inner_cv_logloss`` per ``C``; ``val_loss`` when
    ``validation`` was given), ``n_features_in_``.
    """

    name = "logistic"
    uses_optimizer = False

    def __init__(self, c_values: Sequence[float] | None = None, folds: int = 5,
                 max_iter: int = 1000, tol: float = 1e-4):
        self.c_values = c_values
        self.folds = folds
        self.max_iter = max_iter
        self.tol = tol

    # -- parameters ----------------------------------------------------------------------------
    def _grid(self) -> list[float]:
        values = DEFAULT_C_VALUES if self.c_values is None else self.c_values
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise ConfigError(f"{self.name}: c_values must be a non-empty list of positive numbers "
                              f"(or null for the default grid), got {values!r}")
        return [_positive(c, f"{self.name}: c_values[{i}]") for i, c in enumerate(values)]

    def validate_params(self) -> None:
        self._grid()
        check_int(self.folds, f"{self.name}: folds", 2, 100)
        check_positive_int(self.max_iter, f"{self.name}: max_iter")
        _positive(self.tol, f"{self.name}: tol")

    @classmethod
    def search_space(cls, hp: Any) -> None:
        """Nothing to tune: the strength is chosen by the head's own inner cross-validation."""

    # -- fit / predict -------------------------------------------------------------------------
    def fit(self, X: np.ndarray, y: np.ndarray, *,
            validation: tuple[np.ndarray, np.ndarray] | None = None,
            optimizer: Optimizer | None = None, epochs: int = 8, batch_size: int = 128,
            seed: int = 2019, verbose: int = 0,
            blocks: Sequence[tuple[str, int]] | None = None) -> LogisticHead:
        """Standardise, choose ``C`` by inner CV on ``X`` only, refit on all of ``X``; return
        ``self``. ``optimizer``, ``epochs``, ``batch_size`` and ``blocks`` are ignored."""
        from sklearn.linear_model import LogisticRegressionCV
        from sklearn.model_selection import StratifiedKFold

        self.validate_params()
        X = check_features(X, "X")
        y = check_labels(y, X.shape[0], "y").astype(np.int64)
        validation_data = check_validation(validation, X.shape[1])
        seed = check_int(seed, "seed", 0, SEED_MAX)
        counts = np.bincount(y, minlength=2)
        if counts.min() < 2:
            raise ConfigError(f"{self.name}: the training rows need at least 2 of each class "
                              f"(cats {counts[0]}, dogs {counts[1]})")
        folds = min(int(self.folds), int(counts.min()))
        grid = self._grid()

        mean = X.mean(axis=0, dtype=np.float64)
        scale = X.std(axis=0, dtype=np.float64)
        scale[scale < MIN_SCALE] = 1.0
        Z = (X - mean) / scale
        cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
        model = LogisticRegressionCV(Cs=grid, cv=cv, scoring="neg_log_loss", solver="lbfgs",
                                     max_iter=int(self.max_iter), tol=float(self.tol),
                                     refit=True, n_jobs=1)
        import warnings

        from sklearn.exceptions import ConvergenceWarning

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            warnings.simplefilter("ignore", FutureWarning)
            model.fit(Z, y)
        scores = np.asarray(model.scores_[1], dtype=np.float64)  # (folds, len(grid)), -log loss
        self.cv_logloss_ = [float(v) for v in -scores.mean(axis=0)]
        self.C_ = float(model.C_[0])
        self.coef_ = np.asarray(model.coef_[0], dtype=np.float64)
        self.intercept_ = float(model.intercept_[0])
        self.mean_, self.scale_ = mean, scale
        self.n_features_in_ = int(X.shape[1])
        self._export_model = None
        self.history_: dict[str, list[float]] = {"inner_cv_logloss": list(self.cv_logloss_)}
        if validation_data is not None:
            self.history_["val_loss"] = [log_loss(validation_data[1],
                                                  self.predict_proba(validation_data[0]))]
        return self

    def _fitted(self) -> None:
        if getattr(self, "coef_", None) is None:
            raise NotFittedError(f"{self.name}: head not fitted; call fit() first")

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """P(dog) for each row of ``X``: ``sigmoid(((X - mean) / scale) @ coef + intercept)``,
        float64 of shape ``(n,)``."""
        self._fitted()
        X = check_features(X, "X", n_features=self.n_features_in_, allow_empty=True)
        return sigmoid(((X - self.mean_) / self.scale_) @ self.coef_ + self.intercept_)

    def keras_model(self) -> keras.Model:
        """The fitted head as ``features (batch, d) -> Normalization -> Dense(1, sigmoid,
        name="prediction")`` (only built-in Keras layers)."""
        self._fitted()
        export = getattr(self, "_export_model", None)
        if export is None:
            import keras

            features = keras.Input((self.n_features_in_,), name="features", dtype="float32")
            norm = keras.layers.Normalization(mean=self.mean_.astype(np.float32),
                                              variance=(self.scale_ ** 2).astype(np.float32),
                                              name="standardise", dtype="float32")
            dense = keras.layers.Dense(1, activation="sigmoid", name="prediction", dtype="float32")
            export = keras.Model(features, dense(norm(features)), name=self.name)
            dense.set_weights([self.coef_.astype(np.float32).reshape(-1, 1),
                               np.array([self.intercept_], dtype=np.float32)])
            self._export_model = export
        return export
