"""Optional hyper-parameter tuning of a head with keras-tuner (random search).

:func:`tune_head` searches what the head declares in
:meth:`~catsdogs.components.Head.search_space` (``dropout`` and ``l2`` for the Keras heads, the
LightGBM level 2 for ``lightgbm_stacking``, anything for a plugin head) plus the optimizer's
``learning_rate`` (:meth:`~catsdogs.components.Head.tuning_space`) with
``keras_tuner.oracles.RandomSearchOracle``. Every trial fits the head on an inner,
stratified split of the rows it is given and scores the inner hold-out by log loss. **Pass only
the training part of the data**: the outer validation set then never influences the choice and
stays an honest estimate of the tuned head.

keras-tuner is imported inside :func:`tune_head`, so importing this module is cheap.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from numbers import Real
from typing import Any

import numpy as np

from catsdogs.components import DEFAULT_SEARCH_SPACE, Head, Optimizer, SearchSpace
from catsdogs.errors import ConfigError
from catsdogs.evaluation.metrics import log_loss
from catsdogs.util.extras import require
from catsdogs.validation import SEED_MAX, check_features, check_int, check_labels

#: the default ranges of ``dropout``, ``l2`` and the optimizer's ``learning_rate``
SEARCH_SPACE = DEFAULT_SEARCH_SPACE
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


def known_tunable_names(head_classes: Iterable[type[Head]] | None = None) -> tuple[str, ...]:
    """Every name some head can tune: ``dropout``, ``learning_rate``, ``l2``, then the names the
    ``head_classes`` (default: every registered head) declare, in order."""
    if head_classes is None:
        from catsdogs.plugins import get_registry

        registry = get_registry()
        head_classes = [registry.head(n) for n in registry.names("heads")]
    names = dict.fromkeys(DEFAULT_SEARCH_SPACE)
    for head_cls in head_classes:
        names.update(dict.fromkeys(head_cls.tuning_space().entries))
    return tuple(names)


def tunable_names(head_cls: type[Head], params_to_tune: Sequence[str],
                  known: Sequence[str] | None = None) -> tuple[str, ...]:
    """The names of ``params_to_tune`` that ``head_cls`` can tune (:meth:`Head.tuning_space`).

    Names no head can tune (not in ``known``, default :func:`known_tunable_names`) raise
    :class:`ConfigError`; names other heads tune are skipped (``dropout_sigmoid`` has no ``l2``;
    ``learning_rate`` applies to heads with ``uses_optimizer``).
    """
    if isinstance(params_to_tune, str):
        params_to_tune = (params_to_tune,)
    own = head_cls.tuning_space().entries
    if any(n not in own for n in params_to_tune):
        known = known_tunable_names() if known is None else known
        unknown = [n for n in params_to_tune if n not in own and n not in known]
        if unknown:
            raise ConfigError(
                f"cannot tune {', '.join(repr(n) for n in unknown)}; "
                f"tunable: {', '.join(known)}"
            )
    return tuple(n for n in dict.fromkeys(params_to_tune) if n in own)


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
    * ``params_to_tune`` – names from the head's :meth:`~Head.tuning_space`, e.g. ``dropout``
      (0.1-0.7), ``learning_rate`` (1e-4-1e-1, log), ``l2`` (1e-6-1e-2, log); names only other
      heads tune are skipped, names no head tunes are a :class:`ConfigError`;
    * ``budget`` – number of trials (``RandomSearchOracle(max_trials=budget, seed=seed)``);
    * every trial fits on the same stratified ``1 - inner_holdout`` part of the rows with
      ``epochs``, ``batch_size``, ``seed`` (and ``blocks``) and is scored by the log loss on the
      ``inner_holdout`` rest;
    * ``directory`` keeps keras-tuner's files (overwritten; a temporary directory when None).

    The result is deterministic for the same data and ``seed``.
    """
    if not (isinstance(head_cls, type) and issubclass(head_cls, Head)):
        raise ConfigError(f"head_cls must be a Head subclass, got {head_cls!r}")
    params = dict(params or {})
    valid = head_cls.param_names()
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
    budget = check_int(budget, "budget", 1)
    epochs = check_int(epochs, "epochs", 1)
    batch_size = check_int(batch_size, "batch_size", 1)
    seed = check_int(seed, "seed", 0, SEED_MAX)
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

    def run(values: dict[str, Any], trial_id: str) -> float:
        head = head_cls.from_hp(values, params)
        head_params = {**params, **{k: v for k, v in values.items() if k != "learning_rate"}}
        lr = values.get("learning_rate", base_lr)
        opt = optimizer_cls(learning_rate=lr) if optimizer is not None else None
        head.fit(X_fit, y_fit, optimizer=opt, epochs=epochs, batch_size=batch_size,
                 seed=seed, verbose=0, blocks=blocks)
        p = np.asarray(head.predict_proba(X_hold), dtype=np.float64)
        # a diverged trial scores worst instead of stopping the search
        score = log_loss(y_hold, p, eps=EPS) if np.isfinite(p).all() else math.inf
        trials.append({"trial_id": trial_id, "params": head_params,
                       "learning_rate": None if lr is None else float(lr), "score": score})
        return score

    space = head_cls.tuning_space()
    if directory is None:
        with tempfile.TemporaryDirectory(prefix="catsdogs-tune-") as tmp:
            _search(head_cls.name, space, names, run, budget, seed, tmp)
    else:
        _search(head_cls.name, space, names, run, budget, seed, str(directory))

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


def _plain(value: Any) -> Any:
    """A trial value as a plain Python number (keras-tuner may hand out NumPy scalars)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    return value


def _search(head_name: str, space: SearchSpace, names: Sequence[str],
            run: Callable[[dict[str, Any], str], float], budget: int, seed: int,
            directory: str) -> None:
    """Run keras-tuner's random search, calling ``run(values, trial_id)`` once per trial."""
    keras_tuner: Any = require("keras_tuner", feature="tuning (the experiment's `tuning:`)")

    class HeadTuner(keras_tuner.Tuner):
        """Each trial fits a catsdogs head (not a Keras HyperModel) and reports its log loss."""

        error: BaseException | None = None

        def run_trial(self, trial, *args, **kwargs):
            values = {name: _plain(trial.hyperparameters.get(name)) for name in names}
            try:
                score = run(values, trial.trial_id)
            except Exception as exc:
                # keras-tuner records ordinary exceptions as failed trials and carries on;
                # a bad configuration or a bug must stop the search instead
                self.error = exc
                raise keras_tuner.errors.FatalError(f"{type(exc).__name__}: {exc}") from exc
            return {OBJECTIVE: score}

    hp = keras_tuner.HyperParameters()
    space.replay(hp, names)
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
