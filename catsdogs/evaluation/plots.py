"""PNG plots: training curves per run and the leaderboard against the target, and the two helpers
every picture of the package uses (the runs' plots, the audit's, the CAM grid): :func:`pyplot`
(matplotlib on the ``Agg`` backend unless ``MPLBACKEND`` says otherwise) and :func:`save_png`
(atomic)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["plot_history", "plot_leaderboard", "pyplot", "save_png"]


def pyplot():
    """``matplotlib.pyplot``, on the non-interactive ``Agg`` backend unless ``MPLBACKEND`` is set."""
    import matplotlib

    if os.environ.get("MPLBACKEND") is None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path, dpi: int) -> None:
    """Write a figure as PNG atomically (never half a file) and close it."""
    import matplotlib.pyplot as plt

    from catsdogs.util.fileio import atomic_write

    try:
        atomic_write(Path(path), lambda fh: fig.savefig(fh, format="png", dpi=dpi))
    finally:
        plt.close(fig)


def plot_history(history: dict[str, list[float]], path: Path, title: str) -> Path | None:
    """Loss and accuracy per epoch (train and validation), as in the write-up. None if no history."""
    pairs = [(k, f"val_{k}") for k in ("loss", "accuracy") if history.get(k) or history.get(f"val_{k}")]
    if not pairs:
        return None
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(pairs), figsize=(5.5 * len(pairs), 3.8), squeeze=False)
    for ax, (train_key, val_key) in zip(axes[0], pairs):
        for key, style in ((train_key, "-o"), (val_key, "-s")):
            values = history.get(key) or []
            if values:
                ax.plot(range(1, len(values) + 1), values, style, ms=3, label=key)
        ax.set_xlabel("epoch" if "accuracy" in history or len(history.get("loss", [])) < 100 else "iteration")
        ax.set_ylabel(train_key)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_png(fig, path, dpi=90)
    return path


def plot_leaderboard(names: Sequence[str], losses: Sequence[float], target: float, path: Path,
                     title: str = "validation log loss per run",
                     errors: Sequence[float] | None = None) -> Path:
    """Horizontal bars of each run's ranking number (:attr:`RunRecord.ranking_logloss`), best at
    the top, green under the target, with the target as a line and ``errors`` (standard errors)
    as error bars."""
    plt = pyplot()
    order = sorted(range(len(names)), key=lambda i: losses[i])
    names = [names[i] for i in order]
    losses = [losses[i] for i in order]
    errs = None if errors is None else [errors[i] for i in order]
    height = max(2.5, 0.32 * len(names) + 1.2)
    fig, ax = plt.subplots(figsize=(10, height))
    colors = ["#2e7d32" if loss < target else "#9e9e9e" for loss in losses]
    ax.barh(range(len(names)), losses, color=colors, xerr=errs, ecolor="#424242", capsize=2)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(target, color="#c62828", ls="--", lw=1.5)
    for i, loss in enumerate(losses):
        ax.text(loss, i, f" {loss:.4f}", va="center", fontsize=7)
    ax.set_xlabel("validation log loss (post-processed, cross-fitted: the ranking)"
                  + (" ± standard error" if errs is not None else ""))
    ax.set_title(title, fontsize=10)
    right = max(v + e for v, e in zip(losses, errs or [0.0] * len(losses)))
    ax.set_xlim(0, max(right, target) * 1.15)
    ax.text(target, -0.9, f" target {target:g} (Kaggle top 10%)", color="#c62828", fontsize=8,
            va="bottom")
    fig.tight_layout()
    save_png(fig, path, dpi=90)
    return path
