"""Logging a finished grid to MLflow through its tracking API (see :mod:`catsdogs.tracking`).

Layout in MLflow: experiment ``<experiment name>`` -> one parent run per output directory (tag
``catsdogs.output``) -> one child run per grid run (tags ``catsdogs.run_id``,
``catsdogs.settings_hash``). Child runs carry params (combination, head, optimizer, learning
rate, the head's hyper-parameters ``head.*`` and tuned values ``tuned.*``, settings hash, data
fingerprint, epochs, batch size, seed, validation, clip, TTA, chosen post-processing), metrics
(per-epoch curves with ``step`` = epoch, fold ``k > 0`` as ``fold<k>_<name>``; final
``val_logloss``, ``val_logloss_clipped``, ``val_accuracy``, ``val_logloss_post``, ``test_logloss``,
``test_accuracy``) and artifacts (``record.json``, ``curves.png``, ``head.keras``). The parent run
holds ``leaderboard.csv``, ``leaderboard.png``, ``summary.md``, ``submission.csv`` and
``experiment.json``, the winner as tags and its scores as metrics.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from catsdogs._version import __version__
from catsdogs.tracking.store import ARTIFACTS_DIR, check_writable, sqlite_path, store_lock

if TYPE_CHECKING:  # pragma: no cover
    from catsdogs.experiment.spec import Experiment
    from catsdogs.runs.record import RunRecord
    from catsdogs.runs.result import ExperimentResult

TAG_KIND = "catsdogs.kind"
TAG_OUTPUT = "catsdogs.output"
TAG_OUTPUT_ID = "catsdogs.output_id"
TAG_RUN_ID = "catsdogs.run_id"
TAG_HASH = "catsdogs.settings_hash"
TAG_DIGEST = "catsdogs.logged_digest"
RUN_FILES = ("record.json", "curves.png", "head.keras")
PARENT_FILES = ("leaderboard.csv", "leaderboard.png", "summary.md", "submission.csv", "experiment.json")
#: MLflow's limits: param value length, entries per log_batch call
MAX_PARAM = 6000
MAX_BATCH_METRICS = 1000
MAX_BATCH_PARAMS = 100
HEALTH_TIMEOUT_S = 5.0

logger = logging.getLogger("catsdogs")


def check_server(uri: str, timeout: float = HEALTH_TIMEOUT_S) -> None:
    """Fail fast (``ConnectionError``) when no MLflow server answers ``/health`` at ``uri``: the
    client itself would retry a dead address for minutes."""
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - http(s) only
            if response.status != 200:
                raise ConnectionError(f"{url} answered HTTP {response.status}")
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConnectionError(f"no MLflow server answers at {uri} ({reason})") from None


def _output_id(out: Path) -> str:
    return hashlib.sha256(str(Path(out).resolve()).encode()).hexdigest()[:16]


def _param_key(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", name)[:250]


def _now_ms() -> int:
    return int(time.time() * 1000)


class MlflowTracker:
    """An MLflow experiment, connected (see :meth:`connect`), that grids are logged to."""

    def __init__(self, client, uri: str, experiment_id: str, experiment_name: str):
        self.client = client
        self.uri = uri
        self.experiment_id = experiment_id
        self.experiment_name = experiment_name
        self.db = sqlite_path(uri)  # a local SQLite store: written under its lock file

    @classmethod
    def connect(cls, uri: str, experiment: Experiment, out: Path) -> MlflowTracker:
        """Check the server or store and get (or create) the MLflow experiment. A SQLite store is
        checked writable first and created under its lock file (two grids creating it at once
        both ran its migrations: ``duplicate column name``)."""
        if uri.startswith(("http://", "https://")):
            check_server(uri)
        artifact_location = None
        db = sqlite_path(uri)
        if db is not None:
            check_writable(db)
            artifact_location = (db.parent / ARTIFACTS_DIR / experiment.name).resolve().as_uri()
        with store_lock(db):
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=uri)
            found = client.get_experiment_by_name(experiment.name)
            if found is None:
                experiment_id = client.create_experiment(
                    experiment.name, artifact_location=artifact_location,
                    tags={"catsdogs.version": __version__})
            else:
                experiment_id = found.experiment_id
                if found.lifecycle_stage == "deleted":
                    client.restore_experiment(experiment_id)
        return cls(client, uri, experiment_id, experiment.name)

    # -------------------------------------------------------------------------------- queries
    def _search(self, filter_string: str) -> Iterator[Any]:
        token = None
        while True:
            page = self.client.search_runs([self.experiment_id], filter_string=filter_string,
                                           max_results=1000, page_token=token)
            yield from page
            token = page.token
            if not token:
                return

    def _parent(self, result: ExperimentResult) -> str:
        """The parent run of this output directory (created on the first call)."""
        out_id = _output_id(result.out_dir)
        for run in self._search(f"tags.`{TAG_OUTPUT_ID}` = '{out_id}'"):
            return run.info.run_id
        run = self.client.create_run(self.experiment_id, run_name=f"{result.experiment.name} grid", tags={
            TAG_KIND: "experiment", TAG_OUTPUT_ID: out_id, TAG_OUTPUT: str(result.out_dir.resolve())})
        return run.info.run_id

    # -------------------------------------------------------------------------------- logging
    def log_result(self, result: ExperimentResult) -> tuple[int, int]:
        """Log every run of ``result`` not logged yet with the same numbers, and the grid's
        files; ``(logged, skipped)``. A child run counts as there when it is FINISHED with the
        run's settings hash and the digest of what would be logged now (:func:`logged_digest`:
        params and metrics, post-processing and test scores included); a run whose numbers
        changed is logged again and its old child run deleted. Child runs an interrupted call
        left RUNNING (or FAILED) are deleted first."""
        with store_lock(self.db):
            parent = self._parent(result)
            logged_before: dict[str, list[Any]] = {}
            cleaned = 0
            for run in self._search(f"tags.`mlflow.parentRunId` = '{parent}'"):
                if run.info.status != "FINISHED":
                    self.client.delete_run(run.info.run_id)
                    cleaned += 1
                else:
                    logged_before.setdefault(run.data.tags.get(TAG_RUN_ID), []).append(run)
            if cleaned:
                logger.info("MLflow: %d child runs an interrupted call left unfinished were deleted",
                            cleaned)
            logged = skipped = 0
            for record in result.records:
                digest = logged_digest(record)
                old = logged_before.get(record.run_id, [])
                if any(r.data.tags.get(TAG_HASH) == record.settings_hash
                       and r.data.tags.get(TAG_DIGEST) == digest for r in old):
                    skipped += 1
                    continue
                self.log_run(record, result.out_dir / "runs" / record.run_id, parent, digest)
                for r in old:  # superseded: one child run per grid run
                    self.client.delete_run(r.info.run_id)
                logged += 1
            self._log_parent(parent, result)
        return logged, skipped

    def log_run(self, record: RunRecord, run_dir: Path, parent: str, digest: str | None = None) -> str:
        """One grid run as a finished child run of ``parent``; returns its MLflow run id."""
        run = self.client.create_run(self.experiment_id, run_name=record.run_id, tags={
            "mlflow.parentRunId": parent, TAG_KIND: "run", TAG_RUN_ID: record.run_id,
            TAG_HASH: record.settings_hash, TAG_DIGEST: digest or logged_digest(record)})
        run_id = run.info.run_id
        try:
            self._log_batches(run_id, run_params(record), run_metrics(record))
            for name in RUN_FILES:
                if (run_dir / name).is_file():
                    self.client.log_artifact(run_id, str(run_dir / name))
        except BaseException:
            self.client.set_terminated(run_id, "FAILED")  # not counted as logged: retried next time
            raise
        self.client.set_terminated(run_id, "FINISHED")
        return run_id

    def _log_parent(self, parent: str, result: ExperimentResult) -> None:
        from mlflow.entities import Metric, RunTag

        winner, now = result.winner, _now_ms()
        target = result.experiment.target
        self.client.log_batch(parent, metrics=[
            # the winner's ranking number (RunRecord.ranking_logloss), as on the leaderboard
            Metric("winner_val_logloss", winner.ranking_logloss, now, 0),
            Metric("winner_val_logloss_raw", winner.metrics.logloss, now, 0),
            Metric("runs", len(result.records), now, 0),
            Metric("runs_under_target", sum(r.under_target for r in result.records), now, 0),
        ], tags=[RunTag("catsdogs.winner", winner.run_id), RunTag("catsdogs.target", str(target)),
                 RunTag("catsdogs.data", str(result.experiment.data))])
        for name in PARENT_FILES:
            path = result.out_dir / name
            if path.is_file():
                self.client.log_artifact(parent, str(path))
        self.client.set_terminated(parent, "FINISHED")

    def _log_batches(self, run_id: str, params: dict[str, Any], metrics: list[tuple[str, float, int]]):
        from mlflow.entities import Metric, Param

        items = [Param(_param_key(k), str(v)[:MAX_PARAM]) for k, v in params.items()]
        for i in range(0, len(items), MAX_BATCH_PARAMS):
            self.client.log_batch(run_id, params=items[i:i + MAX_BATCH_PARAMS])
        now = _now_ms()
        values = [Metric(_param_key(k), float(v), now, step) for k, v, step in metrics]
        for i in range(0, len(values), MAX_BATCH_METRICS):
            self.client.log_batch(run_id, metrics=values[i:i + MAX_BATCH_METRICS])


# ------------------------------------------------------------------------------------ what is logged
def logged_digest(record: RunRecord) -> str:
    """A digest of the params and metrics :meth:`MlflowTracker.log_run` logs for ``record``
    (the per-epoch curves, post-processing and test scores included; not the time of logging)."""
    params = {_param_key(k): str(v)[:MAX_PARAM] for k, v in run_params(record).items()}
    metrics = [(_param_key(k), repr(float(v)), step) for k, v, step in run_metrics(record)]
    text = json.dumps({"params": params, "metrics": metrics}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_params(record: RunRecord) -> dict[str, Any]:
    """The params of one grid run (see the module docstring)."""
    settings = record.settings
    fingerprints = sorted({k.get("dataset_fingerprint", "") for k in record.feature_keys.values()})
    v = record.validation
    params: dict[str, Any] = {
        "run_id": record.run_id,
        "combination": "+".join(record.combination),
        "n_backbones": len(record.combination),
        "head": record.head.name,
        "optimizer": record.optimizer.name if record.optimizer else "none",
        "learning_rate": record.learning_rate,
        "settings_hash": record.settings_hash,
        "data_fingerprint": ",".join(fingerprints),
        "epochs": settings.get("epochs"),
        "batch_size": settings.get("batch_size"),
        "seed": settings.get("seed"),
        "validation": f"{v.kind} {v.holdout if v.kind == 'holdout' else v.folds}",
        "clip": list(record.clip),
        "tta": record.tta,
    }
    params.update({f"head.{k}": val for k, val in record.params.items()})
    if record.tuning:
        params.update({f"tuned.{k}": val for k, val in (record.tuning.get("best_params") or {}).items()})
        if record.tuning.get("best_learning_rate") is not None:
            params["tuned.learning_rate"] = record.tuning["best_learning_rate"]
    if record.postprocess:
        params["postprocess"] = record.postprocess.get("describe") or record.postprocess.get("method")
    if record.ensemble:
        params["ensemble"] = {k: val for k, val in record.ensemble.items() if not isinstance(val, (list, dict))}
    return params


def run_metrics(record: RunRecord) -> list[tuple[str, float, int]]:
    """``(name, value, step)``: per-epoch curves (step = epoch, from 1) and the final scores."""
    out: list[tuple[str, float, int]] = []
    for fold, history in enumerate(record.history):
        for key, values in history.items():
            name = key if fold == 0 else f"fold{fold}_{key}"
            out += [(name, float(value), epoch) for epoch, value in enumerate(values, 1)]
    m = record.metrics
    final = {"val_logloss": m.logloss, "val_logloss_clipped": m.logloss_clipped,
             "val_accuracy": m.accuracy, "val_best_clip_logloss": m.best_clip_logloss,
             "seconds": record.seconds}
    if record.test_metrics is not None:
        final.update(test_logloss=record.test_metrics.logloss, test_accuracy=record.test_metrics.accuracy)
    if record.postprocess and record.postprocess.get("logloss_post") is not None:
        final["val_logloss_post"] = record.postprocess["logloss_post"]
    return out + [(name, float(value), 0) for name, value in final.items()]
