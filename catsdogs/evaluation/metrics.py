"""Binary metrics for P(dog) predictions: log loss, accuracy, clipping and choosing clip bounds,
and the one logit / sigmoid of the package.

The competition metric is the mean binary log loss of the submitted probabilities::

    logloss = -mean(y * ln(p) + (1 - y) * ln(1 - p))

A single confident mistake (p = 0.001 for a dog) costs ln(1000) = 6.9 on its own, so submissions
are usually clipped to ``[eps, 1 - eps]``. :func:`best_clip` picks ``eps`` from *validation*
predictions; it must never be tuned on the test labels.

Every log loss of the package is computed here: :func:`log_loss` and :func:`row_log_losses` (checked
inputs, the numbers reported), :func:`cross_entropy` (unchecked, soft targets, any shape: the inner
loop of post-processing and ensemble selection) and :func:`logit_cross_entropy` (the same on
logits, for fits). :func:`logit` (probabilities clipped to ``[eps, 1 - eps]``, :data:`LOGIT_EPS`
by default; the exported graph's logit uses the same constant) and :func:`sigmoid` are
``scipy.special``'s ``logit`` / ``expit``. (``sklearn.metrics.log_loss`` is not used: it clips at
the dtype's epsilon, not Kaggle's 1e-15, and validates its input on every call.)

Inputs of the checked functions are array-likes of labels in ``{0, 1}`` and probabilities in
``[0, 1]``; bad inputs raise :class:`~catsdogs.errors.DataError` (data) or
:class:`~catsdogs.errors.ConfigError` (parameters).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from catsdogs.errors import ConfigError, DataError

__all__ = ["BOOTSTRAP", "DEFAULT_CLIP_GRID", "LOGIT_EPS", "LOG_LOSS_EPS", "PROB_EPS", "TIE_SE",
           "PairedStats", "accuracy", "best_clip", "bound_probabilities", "check_clip_bounds",
           "clip", "cross_entropy", "log_loss", "logit", "logit_cross_entropy", "paired_bootstrap",
           "row_log_losses", "sigmoid", "summarize"]

#: bootstrap resamples of the validation photos behind the leaderboard's standard errors
BOOTSTRAP = 1000
#: a run is statistically tied with the leader when its paired difference is below this many
#: bootstrap standard errors of that difference
TIE_SE = 2.0
#: ``0`` (no clipping) plus 60 log-spaced values from 1e-5 to 0.1
DEFAULT_CLIP_GRID: np.ndarray = np.concatenate([[0.0], np.logspace(-5, -1, 60)])
#: a log loss keeps probabilities this far from 0 and 1 (only so that ``log(0)`` never occurs;
#: Kaggle clips submissions the same)
LOG_LOSS_EPS = 1e-15
#: :func:`logit` keeps probabilities this far from 0 and 1 (post-processing, ensembles and the
#: exported graph's logit, :func:`catsdogs.app.graph.logit`)
LOGIT_EPS = 1e-12
#: every P(dog) the package submits, ranks a run by or exports lies in ``[PROB_EPS, 1 - PROB_EPS]``
#: (:func:`bound_probabilities`, applied by every post-processing transform, ``none`` included, and
#: by the exported graph). 2^-24 is float32's resolution next to 1: the largest float32 below 1 is
#: ``1 - 2^-24``, and a head's float32 sigmoid is exactly 1.0 above a logit of about 17, which a log
#: loss clipped at 1e-15 scores at 34.5 nats on a photo of a cat, while the same head's P(dog) for
#: a dog can go down to 1e-38 and cost the logit itself. The bound makes the two sides symmetric
#: (at most ``24 ln 2`` = 16.6 nats per photo) and is exact in float32, so the exported graph
#: computes the same numbers.
PROB_EPS = 2.0 ** -24


def _labels(y) -> np.ndarray:
    y = np.asarray(y, dtype=float).ravel()
    if y.size == 0:
        raise DataError("no labels: cannot compute a metric on an empty set")
    bad = ~np.isin(y, (0.0, 1.0))
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(f"labels must be 0 or 1; {int(bad.sum())} are not "
                        f"(e.g. position {i}: {float(y[i])!r})")
    return y


def _probabilities(p, n: int | None = None) -> np.ndarray:
    p = np.asarray(p, dtype=float).ravel()
    if n is not None and p.size != n:
        raise DataError(f"{n} labels but {p.size} probabilities")
    if p.size == 0:
        raise DataError("no probabilities: cannot compute a metric on an empty set")
    bad = ~np.isfinite(p)
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(f"probabilities must be finite; {int(bad.sum())} are not "
                        f"(e.g. position {i}: {float(p[i])!r})")
    bad = (p < 0.0) | (p > 1.0)
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(f"probabilities must lie in [0, 1]; {int(bad.sum())} do not "
                        f"(e.g. position {i}: {float(p[i])!r})")
    return p


def check_clip_bounds(lo: float, hi: float) -> tuple[float, float]:
    """``(lo, hi)`` as floats; :class:`ConfigError` unless ``0 <= lo < hi <= 1``."""
    lo, hi = float(lo), float(hi)
    if not (0.0 <= lo < hi <= 1.0):
        raise ConfigError(f"clip bounds must satisfy 0 <= lo < hi <= 1, got ({lo!r}, {hi!r})")
    return lo, hi


def bound_probabilities(p, eps: float = PROB_EPS) -> np.ndarray:
    """``p`` as float64 clipped to ``[eps, 1 - eps]`` (:data:`PROB_EPS`: what float32 resolves next
    to 1); ``eps = 0`` returns ``p`` unchanged."""
    p = np.asarray(p, dtype=np.float64)
    return np.clip(p, eps, 1.0 - eps) if eps > 0 else p


def logit(p, eps: float = LOGIT_EPS) -> np.ndarray:
    """``log(p / (1 - p))`` of ``p`` clipped to ``[eps, 1 - eps]``, as float64."""
    from scipy.special import logit as _logit

    return _logit(np.clip(np.asarray(p, dtype=np.float64), eps, 1.0 - eps))


def sigmoid(z) -> np.ndarray:
    """``1 / (1 + exp(-z))`` as float64 (``scipy.special.expit``: no overflow warnings)."""
    from scipy.special import expit

    return expit(np.asarray(z, dtype=np.float64))


def cross_entropy(t, p, eps: float = LOG_LOSS_EPS) -> np.ndarray:
    """Element-wise binary cross-entropy ``-(t ln p + (1 - t) ln(1 - p))`` of probabilities ``p``
    clipped to ``[eps, 1 - eps]`` against targets ``t`` in ``[0, 1]`` (soft targets allowed;
    broadcast; ``0 * ln 0 = 0``). Unchecked: validate with :func:`row_log_losses`."""
    from scipy.special import xlog1py, xlogy

    t = np.asarray(t, dtype=np.float64)
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1.0 - eps)
    return -(xlogy(t, p) + xlog1py(1.0 - t, -p))


def logit_cross_entropy(t, z) -> np.ndarray:
    """Element-wise :func:`cross_entropy` of ``sigmoid(z)`` against targets ``t``, computed on the
    logits ``z`` without rounding ``sigmoid(z)`` to 0 or 1 (what fits minimise)."""
    z = np.asarray(z, dtype=np.float64)
    return np.logaddexp(0.0, -z) * t + np.logaddexp(0.0, z) * (1.0 - np.asarray(t, dtype=np.float64))


def row_log_losses(y, p, eps: float = LOG_LOSS_EPS) -> np.ndarray:
    """Per-row binary log loss of probabilities ``p`` of class 1 against labels ``y`` (0/1), ``p``
    clipped to ``[eps, 1 - eps]`` (their mean is :func:`log_loss`)."""
    if not (0.0 <= eps < 0.5):
        raise ConfigError(f"eps must lie in [0, 0.5), got {eps!r}")
    y = _labels(y)
    return cross_entropy(y, _probabilities(p, y.size), eps)


def log_loss(y, p, eps: float = LOG_LOSS_EPS) -> float:
    """Mean binary log loss of probabilities ``p`` of class 1 against labels ``y`` (0/1).

    ``p`` is clipped to ``[eps, 1 - eps]`` only so that ``log(0)`` never occurs (Kaggle does the
    same at 1e-15); for probabilities inside that range the result equals
    ``sklearn.metrics.log_loss(y, p)``.
    """
    return float(np.mean(row_log_losses(y, p, eps)))


def accuracy(y, p, threshold: float = 0.5) -> float:
    """Fraction of correct predictions, predicting class 1 when ``p > threshold`` (strictly)."""
    y = _labels(y)
    p = _probabilities(p, y.size)
    return float(np.mean((p > threshold) == (y == 1.0)))


def clip(p, lo: float, hi: float) -> np.ndarray:
    """``p`` as a float array clipped to ``[lo, hi]``; requires ``0 <= lo < hi <= 1``."""
    lo, hi = check_clip_bounds(lo, hi)
    return np.clip(np.asarray(p, dtype=float), lo, hi)


def best_clip(y, p, grid: Sequence[float] | np.ndarray | None = None) -> tuple[float, float, float]:
    """The symmetric clip bounds ``(eps, 1 - eps)`` minimising the log loss of ``clip(p, ...)``.

    Choose them on **validation data only** (held-out or out-of-fold predictions with known
    labels), then apply them unchanged to the test predictions. Tuning the bounds on the test
    labels leaks them into the submission and makes the reported score optimistic.

    ``grid`` lists candidate values of ``eps`` in ``[0, 0.5)``; the default is
    :data:`DEFAULT_CLIP_GRID` (0 plus 60 log-spaced values from 1e-5 to 0.1). ``0`` (no clipping)
    is always tried too, so the result is never worse than not clipping; ties go to the smallest
    ``eps``. Returns ``(lo, hi, loss)``.
    """
    y = _labels(y)
    p = _probabilities(p, y.size)
    eps_values = DEFAULT_CLIP_GRID if grid is None else np.asarray(grid, dtype=float).ravel()
    if eps_values.size and not (np.all(np.isfinite(eps_values)) and eps_values.min() >= 0.0
                                and eps_values.max() < 0.5):
        raise ConfigError("clip grid values must lie in [0, 0.5)")
    eps_values = np.unique(np.concatenate([[0.0], eps_values]))  # sorted ascending
    best_eps, best_loss = 0.0, np.inf
    for eps in eps_values:
        loss = log_loss(y, np.clip(p, eps, 1.0 - eps))
        if loss < best_loss:
            best_eps, best_loss = float(eps), loss
    return best_eps, 1.0 - best_eps, float(best_loss)


def summarize(y, p, clip_bounds: tuple[float, float] | None) -> dict:
    """Metrics of predictions ``p`` against labels ``y`` as a JSON-friendly dict.

    Keys: ``logloss`` (raw ``p``), ``logloss_clipped`` (``p`` clipped to ``clip_bounds``; equal to
    ``logloss`` when ``clip_bounds`` is None), ``accuracy``, ``best_clip_lo``, ``best_clip_hi``,
    ``best_clip_logloss`` (from :func:`best_clip` on these same labels: IN-SAMPLE, the clip chosen
    and scored on the same rows, so optimistic; never a ranking or reported number) and ``n``.
    """
    y = _labels(y)
    p = _probabilities(p, y.size)
    raw = log_loss(y, p)
    clipped = raw if clip_bounds is None else log_loss(y, clip(p, *clip_bounds))
    lo, hi, best = best_clip(y, p)
    return {
        "logloss": raw,
        "logloss_clipped": clipped,
        "accuracy": accuracy(y, p),
        "best_clip_lo": lo,
        "best_clip_hi": hi,
        "best_clip_logloss": best,
        "n": int(y.size),
    }


@dataclass(frozen=True)
class PairedStats:
    """One run's ranking loss against the leader's, over the same validation photos.

    ``se``: bootstrap standard error of the run's mean loss; ``diff``: its mean loss minus the
    leader's (>= 0 for a ranked list); ``diff_se``: bootstrap standard error of that paired
    difference (the same resampled photos for both runs); ``tied``: ``diff < TIE_SE * diff_se``
    (the leader itself is tied with itself)."""

    loss: float
    se: float
    diff: float
    diff_se: float
    tied: bool


def paired_bootstrap(losses, leader: int = 0, *, n_boot: int = BOOTSTRAP, seed: int = 0,
                     tie_se: float = TIE_SE) -> list[PairedStats]:
    """Standard errors and paired differences to ``leader`` of the mean per-row losses
    ``losses`` (runs x photos), by a seeded bootstrap over the photos: every resample draws the
    same photos for every run, so differences are paired. Deterministic for a given ``seed``.
    A run is tied with the leader when its difference, either way, is below ``tie_se`` of its
    standard errors (the leader is not always the lowest: ``ensemble: {submit: always}``)."""
    L = np.asarray(losses, dtype=np.float64)
    if L.ndim != 2 or L.shape[1] == 0 or not np.isfinite(L).all():
        raise DataError(f"paired_bootstrap: expected finite per-row losses (runs x photos), got shape {L.shape}")
    n = L.shape[1]
    rng = np.random.default_rng(seed)
    means = np.empty((L.shape[0], n_boot))  # runs x n_boot
    for start in range(0, n_boot, 100):  # as resample weights, 100 resamples at a time
        stop = min(start + 100, n_boot)
        counts = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(start, stop)])
        means[:, start:stop] = L @ counts.T / n
    mean = L.mean(axis=1)
    se = means.std(axis=1, ddof=1)
    diffs = means - means[leader]
    diff_se = diffs.std(axis=1, ddof=1)
    out = []
    for i in range(L.shape[0]):
        d = float(mean[i] - mean[leader])
        out.append(PairedStats(float(mean[i]), float(se[i]), d, float(diff_se[i]),
                               bool(i == leader or d == 0 or abs(d) < tie_se * diff_se[i])))
    return out
