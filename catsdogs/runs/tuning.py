"""Optional hyper-parameter tuning of a head with keras-tuner (random search).

:func:`tune_head` searches ``dropout``, the optimizer's ``learning_rate`` and ``l2`` (those the
head has) with ``keras_tuner.oracles.RandomSearchOracle``. Every trial fits the head on an inner,
stratified split of the rows it is given and scores the inner hold-out by log loss. **Pass only
the training part of the data**: the outer validation set then never influences the choice and
stays an honest estimate of the tuned head.

keras-tuner is imported inside :func:`tune_head`, so importing this module is cheap.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from numbers import Real
from typing import Any

import numpy as np

from catsdogs.components import Head, Optimizer
from catsdogs.errors import ConfigError
from catsdogs.runs import metrics

#: the search space: name -> (low, high, sampling); ``learning_rate`` is the optimizer's
SEARCH_SPACE: dict[str, tuple[float, float, str]] = {
    "dropout": (0.1, 0.7, "linear"),
    "learning_rate": (1e-4, 1e-1, "log"),
    "l2": (1e-6, 1e-2, "log"),
}
#: objective keras-tuner minimises
OBJECTIVE = "val_log_loss"
#: probabilities are clipped to [EPS, 1 - EPS] for the log loss
EPS = 1e-7


@dataclass
class TuningResult:
    """Outcome of :func:`tune_head`.

    ``best_params`` are the head's hyper-parameters (the fixed ``params`` plus the tuned values),
    ``best_learning_rate`` the optimizer learning rate to train with (None for heads without an
    optimizer), ``best_score`` the inner-holdout log loss of the best trial, ``trials`` one dict per
    trial in order: ``{"trial_id", "params", "learning_rate", "score"}``.
    """

    best_params: dict[str, Any]
    best_learning_rate: float | None
    best_score: float
    trials: list[dict[str, Any]] = field(default_factory=list)
    tuned: tuple[str, ...] = ()


def log_loss(y: np.ndarray, p: np.ndarray) -> float:
    """Mean binary cross-entropy of P(dog) ``p`` against 0/1 labels ``y`` (inf when ``p`` has NaN)."""
    p = np.asarray(p, dtype=np.float64)
    if not np.isfinite(p).all():  # a diverged trial scores worst instead of stopping the search
        return math.inf
    return metrics.log_loss(y, p, eps=EPS)


def tunable_names(head_cls: type[Head], params_to_tune: Sequence[str]) -> tuple[str, ...]:
    """The names of ``params_to_tune`` that apply to ``head_cls``.

    Unknown names raise :class:`ConfigError`. ``learning_rate`` applies to heads that train with
    an optimizer (``uses_optimizer``); the others apply when they are parameters of the head
    (``dropout_sigmoid`` has no ``l2``, so it is skipped there).
    """
    if isinstance(params_to_tune, str):
        params_to_tune = (params_to_tune,)
    unknown = [n for n in params_to_tune if n not in SEARCH_SPACE]
    if unknown:
        raise ConfigError(
            f"cannot tune {', '.join(repr(n) for n in unknown)}; "
            f"tunable: {', '.join(SEARCH_SPACE)}"
        )
    head_params = set(head_cls._param_names())
    names = []
    for name in dict.fromkeys(params_to_tune):  # unique, in order
        if name == "learning_rate":
            if head_cls.uses_optimizer:
                names.append(name)
        elif name in head_params:
            names.append(name)
    return tuple(names)


def _check_int(value: Any, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def tune_head(
    head_cls: type[Head],
    params: dict[str, Any] | None,
    X: np.ndarray,
    y: np.ndarray,
    *,
    optimizer_cls: type[Optimizer] | None,
    learning_rate: float | None = None,
    params_to_tune: Sequence[str] = ("dropout", "learning_rate", "l2"),
    budget: int = 10,
    epochs: int = 8,
    batch_size: int = 128,
    seed: int = 2019,
    inner_holdout: float = 0.2,
    directory: str | None = None,
    blocks: Sequence[tuple[str, int]] | None = None,
) -> TuningResult:
    """Random-search ``head_cls``'s hyper-parameters on the TRAINING rows ``X``, ``y``.

    * ``params`` – fixed hyper-parameters of the head; tuned names override them;
    * ``optimizer_cls`` – the optimizer the head trains with (None: the registered ``adam``);
      ``learning_rate`` is its rate when ``learning_rate`` is not tuned (None: its default);
    * ``params_to_tune`` – subset of ``dropout`` (0.1-0.7), ``learning_rate`` (1e-4-1e-1, log),
      ``l2`` (1e-6-1e-2, log); names the head does not have are skipped, unknown names are a
      :class:`ConfigError`;
    * ``budget`` – number of trials (``RandomSearchOracle(max_trials=budget, seed=seed)``);
    * every trial fits on the same stratified ``1 - inner_holdout`` part of the rows with
      ``epochs``, ``batch_size``, ``seed`` (and ``blocks``) and is scored by the log loss on the
      ``inner_holdout`` rest;
    * ``directory`` keeps keras-tuner's files (overwritten; a temporary directory when None).

    The result is deterministic for the same data and ``seed``.
    """
    from catsdogs.builtin.heads import check_features, check_labels

    if not (isinstance(head_cls, type) and issubclass(head_cls, Head)):
        raise ConfigError(f"head_cls must be a Head subclass, got {head_cls!r}")
    params = dict(params or {})
    valid = head_cls._param_names()
    bad = [k for k in params if k not in valid]
    if bad:
        raise ConfigError(
            f"head {head_cls.name!r} has no parameter {', '.join(repr(k) for k in bad)}; "
            f"valid: {', '.join(valid) or '(none)'}"
        )
    names = tunable_names(head_cls, params_to_tune)
    if not names:
        raise ConfigError(
            f"nothing to tune for head {head_cls.name!r}: none of {list(params_to_tune)} applies "
            f"(its parameters: {', '.join(valid) or '(none)'}; "
            f"uses an optimizer: {head_cls.uses_optimizer})"
        )
    budget = _check_int(budget, "budget", 1)
    epochs = _check_int(epochs, "epochs", 1)
    batch_size = _check_int(batch_size, "batch_size", 1)
    seed = _check_int(seed, "seed", 0)
    if seed > 2**32 - 1:
        raise ConfigError(f"seed must be <= {2**32 - 1}, got {seed}")
    if (isinstance(inner_holdout, bool) or not isinstance(inner_holdout, Real)
            or not 0 < inner_holdout < 1):
        raise ConfigError(f"inner_holdout must be a fraction in (0, 1), got {inner_holdout!r}")

    optimizer = None
    if head_cls.uses_optimizer:
        if optimizer_cls is None:
            from catsdogs.plugins import get_registry

            optimizer_cls = get_registry().optimizer("adam")
        base_lr = optimizer_cls(learning_rate=learning_rate).effective_learning_rate
        optimizer = optimizer_cls(learning_rate=base_lr)
    else:
        base_lr = None

    X = check_features(X, "X")
    y = check_labels(y, X.shape[0], "y")
    from sklearn.model_selection import train_test_split

    try:
        X_fit, X_hold, y_fit, y_hold = train_test_split(
            X, y, test_size=float(inner_holdout), stratify=y, random_state=seed
        )
    except ValueError as exc:
        raise ConfigError(f"cannot make a stratified inner hold-out of {inner_holdout}: {exc}") from None

    trials: list[dict[str, Any]] = []

    def run(values: dict[str, float], trial_id: str) -> float:
        head_params = {**params, **{k: v for k, v in values.items() if k != "learning_rate"}}
        lr = values.get("learning_rate", base_lr)
        opt = optimizer_cls(learning_rate=lr) if optimizer is not None else None
        head = head_cls(**head_params)
        head.fit(X_fit, y_fit, optimizer=opt, epochs=epochs, batch_size=batch_size,
                 seed=seed, verbose=0, blocks=blocks)
        score = log_loss(y_hold, head.predict_proba(X_hold))
        trials.append({"trial_id": trial_id, "params": head_params,
                       "learning_rate": None if lr is None else float(lr), "score": score})
        return score

    if directory is None:
        with tempfile.TemporaryDirectory(prefix="catsdogs-tune-") as tmp:
            _search(head_cls.name, names, run, budget, seed, tmp)
    else:
        _search(head_cls.name, names, run, budget, seed, str(directory))

    if not trials:  # pragma: no cover - the oracle always runs at least one trial
        raise ConfigError("keras-tuner ran no trial")
    best = min(trials, key=lambda t: t["score"])
    return TuningResult(
        best_params=dict(best["params"]),
        best_learning_rate=best["learning_rate"],
        best_score=best["score"],
        trials=trials,
        tuned=names,
    )


def _search(head_name: str, names: Sequence[str], run: Callable[[dict[str, float], str], float],
            budget: int, seed: int, directory: str) -> None:
    """Run keras-tuner's random search, calling ``run(values, trial_id)`` once per trial."""
    import keras_tuner

    class HeadTuner(keras_tuner.Tuner):
        """Each trial fits a catsdogs head (not a Keras HyperModel) and reports its log loss."""

        error: BaseException | None = None

        def run_trial(self, trial, *args, **kwargs):
            hp = trial.hyperparameters
            values = {}
            for name in names:
                low, high, sampling = SEARCH_SPACE[name]
                values[name] = float(hp.Float(name, low, high, sampling=sampling))
            try:
                score = run(values, trial.trial_id)
            except Exception as exc:
                # keras-tuner records ordinary exceptions as failed trials and carries on;
                # a bad configuration or a bug must stop the search instead
                self.error = exc
                raise keras_tuner.errors.FatalError(f"{type(exc).__name__}: {exc}") from exc
            return {OBJECTIVE: score}

    hp = keras_tuner.HyperParameters()
    for name in names:
        low, high, sampling = SEARCH_SPACE[name]
        hp.Float(name, low, high, sampling=sampling)
    oracle = keras_tuner.oracles.RandomSearchOracle(
        objective=keras_tuner.Objective(OBJECTIVE, "min"),
        max_trials=budget,
        # keras-tuner treats seed 0 as "no seed" (random); map it to another fixed value
        seed=seed if seed else 2**31 - 1,
        hyperparameters=hp,
        allow_new_entries=False,
        tune_new_entries=False,
    )
    tuner = HeadTuner(oracle=oracle, directory=directory, project_name=f"tune_{head_name}",
                      overwrite=True)
    try:
        tuner.search(verbose=0)
    except keras_tuner.errors.FatalError:
        if tuner.error is not None:
            raise tuner.error from None
        raise
