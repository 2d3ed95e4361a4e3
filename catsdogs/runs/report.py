"""How a ranked grid is shown: the leaderboard rows (``leaderboard.csv``), the console
leaderboard and ``summary.md``. Every view shows each run's ranking number
(:attr:`~catsdogs.runs.record.RunRecord.ranking_logloss`), its bootstrap standard error and its
paired difference to the leader (:class:`~catsdogs.evaluation.metrics.PairedStats`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from catsdogs.evaluation.metrics import BOOTSTRAP, TIE_SE, PairedStats
from catsdogs.runs.postprocess import transform_of
from catsdogs.runs.record import RunRecord
from catsdogs.util.fileio import atomic_write

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from catsdogs.experiment.spec import Experiment

#: how ties with the winner are decided, in words (console, summary.md)
TIE_RULE = (f"bootstrap over the validation photos ({BOOTSTRAP} resamples, seeded); a run is "
            f"statistically tied with the winner when its paired difference is below {TIE_SE:g} "
            "standard errors of that difference")


def leaderboard_row(rank: int, record: RunRecord, stat: PairedStats | None) -> dict[str, Any]:
    """One leaderboard row. ``val_logloss`` is THE number (:attr:`RunRecord.ranking_logloss`);
    ``val_logloss_raw`` / ``val_logloss_clipped`` (the experiment's fixed clip) are for reference,
    ``val_logloss_post`` is the same number as ``val_logloss`` under its older name."""
    m, t = record.metrics, record.test_metrics
    return {
        "rank": rank,
        "run_id": record.run_id,
        "combination": "+".join(record.combination),
        "n_backbones": len(record.combination),
        "head": record.head.name,
        "optimizer": record.optimizer.name if record.optimizer else "",
        "learning_rate": record.learning_rate,
        "val_logloss": record.ranking_logloss,
        "val_logloss_se": None if stat is None else stat.se,
        "diff_to_leader": None if stat is None else stat.diff,
        "diff_to_leader_se": None if stat is None else stat.diff_se,
        "tied_with_leader": None if stat is None else stat.tied,
        "postprocess": transform_of(record).describe(),
        "val_accuracy": m.accuracy,
        "under_target": record.under_target,
        "val_logloss_raw": m.logloss,
        "val_logloss_clipped": m.logloss_clipped,
        "val_logloss_post": record.ranking_logloss,
        **({"test_logloss": t.logloss, "test_logloss_raw": t.extra.get("logloss_raw"),
            "test_accuracy": t.accuracy} if t else {}),
        "seconds": round(record.seconds, 2),
    }


def leaderboard_frame(records: list[RunRecord], stats: dict[str, PairedStats] | None = None
                      ) -> pd.DataFrame:
    """The leaderboard of ``records`` (ranked, best first) as a table, one :func:`leaderboard_row`
    per run (``leaderboard.csv``)."""
    import pandas as pd

    stats = stats or {}
    return pd.DataFrame([leaderboard_row(i + 1, r, stats.get(r.run_id))
                         for i, r in enumerate(records)])


def format_leaderboard(records: list[RunRecord], target: float, limit: int | None = None,
                       stats: dict[str, PairedStats] | None = None) -> str:
    """The console leaderboard: each run's ranking number, its standard error and paired
    difference to the leader (``stats``: :func:`catsdogs.runs.runner.rank_stats`; ``=`` marks a
    statistical tie)."""
    rows = records if limit is None else records[:limit]
    width = max([len(r.run_id) for r in rows] + [3])
    has_test = any(r.test_metrics for r in rows)
    test_head = f"  {'test logloss':>12}  {'test acc':>8}" if has_test else ""
    stats = stats or {}
    lines = [f"{'#':>3}  {'run':<{width}}  {'val logloss':>11}  {'± se':>7}  {'Δ leader':>16}  "
             f"{'acc':>6}{test_head}  target",
             "-" * (width + 66 + (24 if has_test else 0))]
    for i, r in enumerate(rows, 1):
        m, t, s = r.metrics, r.test_metrics, stats.get(r.run_id)
        mark = "  ✓" if r.under_target else ""
        test_cols = (f"  {t.logloss:>12.5f}  {t.accuracy:>8.3f}" if t else f"  {'':>12}  {'':>8}") \
            if has_test else ""
        se = f"{s.se:>7.5f}" if s else f"{'':>7}"
        diff = _diff_text(s, i == 1)
        lines.append(f"{i:>3}  {r.run_id:<{width}}  {r.ranking_logloss:>11.5f}  {se}  {diff:>16}  "
                     f"{m.accuracy:>6.3f}{test_cols}{mark}")
    under = sum(r.under_target for r in records)
    lines.append(f"{under} of {len(records)} runs under the target {target:g} (✓, by validation log loss)")
    if has_test:
        lines.append("test columns: the submitted (post-processed) test predictions scored against the "
                     "data's test_labels.csv; never used for ranking")
    lines.append("val logloss: each run's ranking number (post-processed, cross-fitted); "
                 "± se and Δ leader: " + TIE_RULE)
    tied = [r.run_id for r in records[1:] if (s := stats.get(r.run_id)) is not None and s.tied]
    if stats:
        lines.append(f"tied with the winner: {', '.join(tied) if tied else 'none'}")
    best = _lowest(records)
    if best is not records[0]:
        lines.append(f"winner: {records[0].run_id}, submitted whatever its rank (ensemble: "
                     f"{{submit: always}}); the lowest validation log loss is {best.run_id}'s")
    return "\n".join(lines)


def _lowest(records: list[RunRecord]) -> RunRecord:
    """The run with the lowest ranking number (:func:`catsdogs.runs.runner.rank_records`' order);
    the winner unless ``ensemble: {submit: always}`` put the ensemble first."""
    return min(records, key=lambda r: r.rank_key)


def _diff_text(stat: PairedStats | None, leader: bool) -> str:
    if stat is None:
        return ""
    if leader:
        return "leader"
    return f"{stat.diff:+.5f}±{stat.diff_se:.5f}" + (" =" if stat.tied else "")


def write_summary(out: Path, experiment: Experiment, records: list[RunRecord],
                  submission: Path | None, stats: dict[str, PairedStats] | None = None) -> None:
    """``<out>/summary.md``: the experiment's settings, the winner, its ties and the leaderboard."""
    target = experiment.target
    stats = stats or {}
    lines = [
        f"# Experiment `{experiment.name}`",
        "",
        f"- data: `{experiment.data}`",
        f"- runs: {len(records)} (combinations × heads × optimizers); validation: "
        f"{experiment.validation.kind} "
        f"{experiment.validation.holdout if experiment.validation.kind == 'holdout' else experiment.validation.folds}"
        f"; seed {experiment.seed}; {experiment.epochs} epochs, batch {experiment.batch_size}; "
        f"clip {list(experiment.clip)}; TTA {'on' if experiment.tta else 'off'}",
        f"- target: **{target:g}** (Kaggle public LB top 10%); "
        f"{sum(r.under_target for r in records)} runs under it",
        f"- winner: **{records[0].run_id}** — validation log loss "
        f"{records[0].ranking_logloss:.5f}"
        + (f" ± {stats[records[0].run_id].se:.5f}" if records[0].run_id in stats else "")
        + f" (post-processed: {transform_of(records[0]).describe()}), "
        f"accuracy {records[0].metrics.accuracy:.4f}",
    ]
    best = _lowest(records)
    if best is not records[0]:  # ensemble: {submit: always}
        lines.append(f"- submitted whatever its rank (`ensemble: {{submit: always}}`); the lowest "
                     f"validation log loss is **{best.run_id}**'s, {best.ranking_logloss:.5f}")
    if stats:
        tied = [r.run_id for r in records[1:] if r.run_id in stats and stats[r.run_id].tied]
        lines.append(f"- statistically tied with the winner: "
                     f"{', '.join(f'`{t}`' for t in tied) if tied else 'none'} ({TIE_RULE}; "
                     "a tie means the validation photos cannot tell these runs apart)")
    if submission is not None:
        refit = (out / "refit.json").is_file() and json.loads((out / "refit.json").read_text()).get("refit")
        lines.append(f"- submission: `{submission.name}` (the winner's "
                     f"{'refitted (all training rows) ' if refit else ''}test predictions, post-processed)")
    lines += ["", "![validation log loss per run](leaderboard.png)", "",
              "| # | run | val log loss | ± se | Δ to winner (± se) | tied | post-processing | accuracy | "
              "under target | raw val log loss | test log loss | test accuracy |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(records, 1):
        m, t, s = r.metrics, r.test_metrics, stats.get(r.run_id)
        test_cols = f"{t.logloss:.5f} | {t.accuracy:.4f}" if t else " | "
        se = f"{s.se:.5f}" if s else ""
        diff = "winner" if i == 1 else (f"{s.diff:+.5f} (± {s.diff_se:.5f})" if s else "")
        tie = "=" if s and s.tied and i > 1 else ""
        lines.append(f"| {i} | `{r.run_id}` | {r.ranking_logloss:.5f} | {se} | {diff} | {tie} | "
                     f"{transform_of(r).describe()} | {m.accuracy:.4f} | "
                     f"{'✓' if r.under_target else ''} | {m.logloss:.5f} | {test_cols} |")
    lines += ["", "val log loss: the number each run is ranked by, everywhere (its validation "
                  "predictions post-processed, cross-fitted: no photo is scored by a transform "
                  "fitted on it). raw val log loss: before post-processing, for reference."]
    if any(r.test_metrics for r in records):
        lines += ["", "Test columns: each run's submitted (post-processed) test predictions scored against "
                      "`test_labels.csv` of the data directory. They are never used for ranking."]
    lines += ["", "Training curves per run: `runs/<run id>/curves.png`.", ""]
    atomic_write(out / "summary.md", lambda fh: fh.write("\n".join(lines).encode()))


__all__ = ["TIE_RULE", "format_leaderboard", "leaderboard_frame", "leaderboard_row", "write_summary"]
