"""Experiment tracking: a finished grid logged to MLflow (``tracking: mlflow`` or ``run --track``).

The experiment becomes an MLflow experiment of the same name; each call of ``catsdogs run`` on an
output directory one **parent run** (tagged with the output directory, reused by later calls)
holding the leaderboard, summary, plots and submission; every grid run a **child run** with its
parameters, per-epoch curves, final metrics and files (:mod:`catsdogs.tracking.mlflow_tracker`).

* **Where**: the experiment's ``tracking.uri`` or ``--track URI``; by default a SQLite store next
  to the output directory (``<out>/../mlflow.db``, artifacts in ``<out>/../mlartifacts``), shown by
  the printed ``mlflow ui --backend-store-uri sqlite:///...`` command.
* **Idempotent**: child runs are tagged with the record's settings hash and a digest of what is
  logged (params and metrics, post-processing and test scores included); a run already logged
  under this output directory's parent run with the same numbers (a reused run of a resumed grid)
  is not logged again, one whose numbers changed is logged again (its old child run deleted), and
  child runs an interrupted call left RUNNING are deleted.
* **SQLite store**: checked writable at once (a read-only folder is one line, not minutes of
  MLflow's retries); created and written under a lock file beside it (``mlflow.db.lock``), so two
  grids sharing a new store do not both create its tables.
* **Never at the expense of the results**: tracking starts with a connection check and logs after
  every local file is written. An unreachable or failing tracker is a warning and the grid runs
  untracked, or, with ``required`` (``--track-required``), a :class:`TrackingError` — before any
  training when the check fails, after the local records are complete when logging fails.

MLflow is imported only when tracking is on (``pip install 'catsdogs[tracking]'``). Keras autolog
is not used (documented for Keras <= 3.13 only): everything goes through the tracking API.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from catsdogs.errors import CatsdogsError
from catsdogs.tracking.store import ARTIFACTS_DIR, STORE_FILE  # noqa: F401  (public here)
from catsdogs.util.extras import MissingExtraError, require

if TYPE_CHECKING:  # pragma: no cover
    from catsdogs.experiment.spec import Experiment, Tracking
    from catsdogs.runs.result import ExperimentResult
    from catsdogs.tracking.mlflow_tracker import MlflowTracker

logger = logging.getLogger("catsdogs")


class TrackingError(CatsdogsError):
    """The tracking server or store could not be used and tracking was required."""


def default_uri(out: str | Path) -> str:
    """The local SQLite store next to the output directory ``out``."""
    return f"sqlite:///{(Path(out).resolve().parent / STORE_FILE)}"


def ui_command(uri: str) -> str:
    """The command that shows the store in MLflow's web UI (for a server: its address)."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri}"


def open_tracker(tracking: Tracking | None, experiment: Experiment, out: Path,
                 echo: Callable[[str], None]) -> MlflowTracker | None:
    """A connected tracker for ``experiment`` writing to ``out``, or None when tracking is off or
    unavailable (warned) and not required. :class:`TrackingError` when required and unavailable."""
    if tracking is None:
        return None
    uri = tracking.uri or default_uri(out)
    try:
        require("mlflow", feature="tracking")
    except MissingExtraError as exc:
        _unavailable(tracking, str(exc))
        return None
    try:
        from catsdogs.tracking.mlflow_tracker import MlflowTracker

        return MlflowTracker.connect(uri, experiment, out)
    except Exception as exc:  # noqa: BLE001 - any failure of the tracker must not stop the grid
        _unavailable(tracking, f"cannot track in MLflow at {uri}: {_reason(exc)}")
        return None


def log_result(tracker: MlflowTracker | None, tracking: Tracking | None, result: ExperimentResult,
               echo: Callable[[str], None]) -> None:
    """Log a finished grid (already complete on disk) with ``tracker``; see the module docstring."""
    if tracker is None or tracking is None:
        return
    try:
        logged, skipped = tracker.log_result(result)
    except Exception as exc:  # noqa: BLE001
        _unavailable(tracking, f"MLflow logging at {tracker.uri} failed: {_reason(exc)}; the local "
                               f"records in {result.out_dir} are complete")
        return
    echo(f"MLflow: {logged} runs logged, {skipped} already there, in experiment "
         f"{tracker.experiment_name!r} at {tracker.uri}")
    echo(f"view: {ui_command(tracker.uri)}")


def _unavailable(tracking: Tracking, message: str) -> None:
    """Raise :class:`TrackingError` when tracking is required, else warn."""
    if tracking.required:
        raise TrackingError(message)
    logger.warning("%s; continuing without tracking", message)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def with_tracking(experiment: Experiment, uri: str | None, required: bool) -> Experiment:
    """``experiment`` with ``run --track [URI]`` (``uri``; ``""``: the default store) and
    ``--track-required`` applied over its ``tracking:`` setting."""
    from catsdogs.experiment.spec import Tracking

    if uri is None and not required:
        return experiment
    base = experiment.tracking or Tracking()
    return experiment.model_copy(update={"tracking": base.model_copy(update={
        "uri": uri or base.uri, "required": required or base.required})})
