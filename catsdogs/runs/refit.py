"""Refit for the submission (``refit: true``): retrain the chosen run on every training row.

A holdout run trains on 80% of the training images and keeps 20% to be ranked on. Once the
ranking is done, those 20% are no longer needed for choosing, so :func:`refit_submission`
retrains the winner with **the same settings** -- head, its (tuned) parameters, optimizer and
learning rate, epochs, batch size, seed, TTA -- on train + validation rows, predicts the test
images, applies the winner's post-processing (chosen on its validation predictions) and writes
the submission from those predictions. Training is seeded, so a refit is deterministic.

* **Ensemble winner**: each member run is refitted the same way and the refitted members' test
  predictions are combined with the ensemble's blend (weights fitted on validation predictions).
* **k-fold validation**: nothing is refitted. A k-fold run's test predictions already average
  ``k`` heads, each trained on ``(k-1)/k`` of the rows, and its post-processing was chosen on the
  out-of-fold predictions of exactly those heads; that average is submitted (a bagged ensemble is
  at least as good as one head on all rows in expectation, and its calibration was measured).

Outputs: ``<out>/refit/<run id>/test_predictions.csv`` per refitted run and ``<out>/refit.json``
(what was refitted and submitted).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from catsdogs.errors import DataError
from catsdogs.util.fileio import write_json

if TYPE_CHECKING:  # pragma: no cover
    from catsdogs.experiment.spec import Experiment
    from catsdogs.features.fusion import Aligned
    from catsdogs.runs.record import RunRecord

logger = logging.getLogger("catsdogs")

__all__ = ["refit_run", "refit_submission"]


def refit_run(record: RunRecord, experiment: Experiment, aligned: Aligned,
              registry) -> tuple[list[int], np.ndarray]:
    """Retrain ``record``'s run on all training rows of ``aligned``: test ids and P(dog) (TTA as
    the run had it)."""
    from catsdogs.runs.features import run_features

    features = run_features(aligned, record.combination, tta=record.tta)
    train, test = features.train, features.test
    if test is None:
        raise DataError("refit: the data has no test images to predict")
    head = registry.head(record.head.name)(**{**record.params, **(record.refit_params or {})})  # as ranked
    optimizer = None
    if record.optimizer is not None:
        optimizer = registry.optimizer(record.optimizer.name)(learning_rate=record.learning_rate)
    head.fit(train.X, train.y, validation=None, optimizer=optimizer, epochs=experiment.epochs,
             batch_size=experiment.batch_size, seed=experiment.seed, blocks=train.blocks)
    p = np.asarray(head.predict_proba(test.X), dtype=np.float64)
    if test.X_flip is not None:
        p = (p + np.asarray(head.predict_proba(test.X_flip), dtype=np.float64)) / 2
    return [int(i) for i in test.ids], p


def refit_submission(winner: RunRecord, records: list[RunRecord], experiment: Experiment,
                     aligned: Aligned, registry, out: Path, expected_ids: list[int]) -> Path | None:
    """Refit ``winner`` (or its ensemble members) and write ``<out>/submission.csv`` from it.

    Returns None (nothing written) for k-fold validation: the caller submits the fold average.
    """
    import pandas as pd

    from catsdogs.runs.ensemble import Blend
    from catsdogs.runs.postprocess import transform_of
    from catsdogs.runs.submission import write_submission

    if experiment.validation.kind == "kfold":
        logger.info("refit: k-fold validation, submitting the average of the fold heads instead")
        write_json(out / "refit.json", {"refit": False, "reason": "k-fold: the fold heads' average "
                                        "is submitted", "winner": winner.run_id})
        return None
    t0 = time.perf_counter()
    by_id = {r.run_id: r for r in records}
    members = winner.ensemble["members"] if winner.ensemble else [winner.run_id]
    test_ids = None
    preds: list[np.ndarray] = []
    for run_id in members:
        member = by_id[run_id]
        test_ids, p = refit_run(member, experiment, aligned, registry)
        run_dir = out / "refit" / run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"id": test_ids, "p_dog": p}).to_csv(run_dir / "test_predictions.csv", index=False)
        preds.append(p)
    if winner.ensemble:
        b = winner.ensemble["blend"]
        p_test = Blend(b["method"], tuple(b["weights"]), b["bias"]).predict(np.stack(preds, axis=1))
    else:
        p_test = preds[0]
    transform = transform_of(winner)
    probs = dict(zip(test_ids or [], transform.apply(p_test).tolist()))
    ids = list(expected_ids)
    info: dict[str, Any] = {"refit": True, "winner": winner.run_id, "members": members,
                            "postprocess": transform.to_dict(), "seconds": time.perf_counter() - t0,
                            "n_train": int(len(aligned.train.y))}
    write_json(out / "refit.json", info)
    return write_submission(out / "submission.csv", ids, [probs.get(i, 0.5) for i in ids],
                            clip_bounds=None, expected_ids=ids)
