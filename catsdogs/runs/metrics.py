"""Moved to :mod:`catsdogs.evaluation.metrics` (a layer below the runs, the app and the audit).

This module re-exports its public names for code written against ``catsdogs.runs.metrics``
(notebooks, scripts); the package itself imports :mod:`catsdogs.evaluation.metrics`.
"""

from catsdogs.evaluation.metrics import (  # noqa: F401
    BOOTSTRAP,
    DEFAULT_CLIP_GRID,
    LOG_LOSS_EPS,
    LOGIT_EPS,
    PROB_EPS,
    TIE_SE,
    PairedStats,
    __all__,
    accuracy,
    best_clip,
    bound_probabilities,
    check_clip_bounds,
    clip,
    cross_entropy,
    log_loss,
    logit,
    logit_cross_entropy,
    paired_bootstrap,
    row_log_losses,
    sigmoid,
    summarize,
)
