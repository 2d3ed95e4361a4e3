"""What :func:`catsdogs.runs.runner.run_experiment` returns: the ranked records of a finished grid.

A module of its own, below both the runner and :mod:`catsdogs.tracking` (which logs it), so
neither imports the other's module for the type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from catsdogs.evaluation.metrics import PairedStats
from catsdogs.runs.record import RunRecord

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from catsdogs.experiment.spec import Experiment


@dataclass
class ExperimentResult:
    experiment: Experiment
    out_dir: Path
    records: list[RunRecord]  # ranked, best first
    computed: int  # runs trained in this call
    reused: int  # runs taken from earlier calls
    submission: Path | None = None
    #: backbone -> the feature file its heads were trained on
    feature_files: dict[str, str] = field(default_factory=dict)
    #: backbone -> the feature file its held-out and test rows were predicted from, for the
    #: backbones with a ``predict_precision`` of their own (the others: ``feature_files``)
    predicting_files: dict[str, str] = field(default_factory=dict)
    #: run id -> standard error and paired difference to the leader
    #: (:func:`catsdogs.runs.runner.rank_stats`)
    stats: dict[str, PairedStats] = field(default_factory=dict)

    @property
    def winner(self) -> RunRecord:
        return self.records[0]

    def leaderboard(self) -> pd.DataFrame:
        """``leaderboard.csv`` as a table (:func:`catsdogs.runs.report.leaderboard_frame`)."""
        from catsdogs.runs.report import leaderboard_frame

        return leaderboard_frame(self.records, self.stats)


__all__ = ["ExperimentResult"]
