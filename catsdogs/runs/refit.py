"""Refit for the submission (``refit: true``): retrain the chosen run on every training row.

A holdout run trains on 80% of the training images and keeps 20% to be ranked on. Once the
ranking is done, those 20% are no longer needed for choosing, so :func:`refit_submission`
retrains the winner with **the same settings** -- head, its (tuned) parameters, optimizer and
learning rate, epochs, seed, TTA, and the same number of optimizer steps (the batch grows with
the rows: :func:`refit_batch_size`) -- on train + validation rows, predicts the test images,
applies the winner's post-processing (chosen on its validation predictions) and writes the
submission from those predictions. Training is seeded, so a refit is deterministic.

Whether it pays is measured, not assumed (``bench/refit_seeds.py``, README): with the ranked
fit's batch size, 25 % more rows meant 25 % more steps and more confident predictions, whose
post-processing had been chosen on the ranked head; keeping the steps removes that bias, but on
the mini data a refit is no better than the ranked head on average, so ``refit`` stays off by
default.

* **Ensemble winner**: each member run is refitted the same way and the refitted members' test
  predictions are combined with the ensemble's blend (weights fitted on validation predictions).
* **k-fold validation**: nothing is refitted. A k-fold run's test predictions already average
  ``k`` heads, each trained on ``(k-1)/k`` of the rows, and its post-processing was chosen on the
  out-of-fold predictions of exactly those heads; that average is submitted (a bagged ensemble is
  at least as good as one head on all rows in expectation, and its calibration was measured).

Outputs: ``<out>/refit/<run id>/`` per refitted run (``test_predictions.csv`` and the refitted
``head.keras``, written as a folder beside and renamed into place, :mod:`catsdogs.util.fileio`) and
``<out>/refit.json`` (what was refitted and submitted; ``heads``: where each refitted Keras head
is, with the settings hash of its run). ``catsdogs export`` of the submitted run uses those
heads, so the exported model is the submitted one.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from catsdogs.compute import LOCAL, Engine
from catsdogs.errors import DataError
from catsdogs.util.fileio import write_json

if TYPE_CHECKING:  # pragma: no cover
    from catsdogs.experiment.spec import Experiment
    from catsdogs.features.fusion import Aligned
    from catsdogs.runs.record import RunRecord

logger = logging.getLogger("catsdogs")

__all__ = ["refit_batch_size", "refit_head", "refit_run", "refit_submission"]


def refit_batch_size(batch_size: int, n_ranked: int, n_all: int) -> int:
    """The batch size that gives a fit on ``n_all`` rows the optimizer steps per epoch of the
    ranked fit on ``n_ranked`` rows at ``batch_size`` (``ceil(n_ranked / batch_size)``)."""
    steps = max(1, math.ceil(n_ranked / batch_size))
    return max(1, math.ceil(n_all / steps))


def refit_head(record: RunRecord, experiment: Experiment, aligned: Aligned, registry, *,
               batch_size: int | None = None):
    """Retrain ``record``'s run on all training rows of ``aligned``: ``(head, test ids, P(dog))``
    (the fitted head; test P(dog) with TTA as the run had it).

    The ranked fit's epochs and optimizer steps are kept: the batch grows with the rows
    (:func:`refit_batch_size`), so each row is seen ``epochs`` times and the weights take as many
    steps as in the fit that was ranked and post-processed. (The same batch size on 25 % more
    rows meant 25 % more steps, more confident predictions and a worse test log loss; README.)
    ``batch_size`` overrides it (for measurements)."""
    from catsdogs.runs.features import maps_blocks, predict_tta, run_features

    head_cls = registry.head(record.head.name)
    features = run_features(aligned, record.combination, tta=record.tta,
                            maps_blocks=maps_blocks(head_cls, record.params))
    train, test = features.train, features.test
    if test is None:
        raise DataError("refit: the data has no test images to predict")
    head = head_cls(**{**record.params, **(record.refit_params or {})})  # as ranked
    optimizer = None
    if record.optimizer is not None:
        optimizer = registry.optimizer(record.optimizer.name)(learning_rate=record.learning_rate)
    if batch_size is None:
        batch_size = refit_batch_size(experiment.batch_size, record.n_train, len(train.y))
    head.fit(train.X, train.y, validation=None, optimizer=optimizer, epochs=experiment.epochs,
             batch_size=batch_size, seed=experiment.seed, blocks=train.blocks)
    return head, [int(i) for i in test.ids], predict_tta(head, test.X, test.X_flip)


def refit_run(record: RunRecord, experiment: Experiment, aligned: Aligned,
              registry) -> tuple[list[int], np.ndarray]:
    """Retrain ``record``'s run on all training rows of ``aligned``: test ids and P(dog) (TTA as
    the run had it)."""
    _, ids, p = refit_head(record, experiment, aligned, registry)
    return ids, p


def _refit_member(run_id: str, shared: tuple) -> tuple[list[int], np.ndarray, bytes | None]:
    """One member's refit, where the engine runs it (this process or a Ray task): test ids,
    P(dog) and the refitted ``head.keras`` as bytes (None: not a Keras graph).
    ``shared`` is ``(experiment, aligned, registry, records by run id)``."""
    import tempfile

    from catsdogs.util.progress import step

    experiment, aligned, registry, by_id = shared
    step(f"{run_id}: training on every row")
    head, ids, p = refit_head(by_id[run_id], experiment, aligned, registry)
    model = head.keras_model()
    if model is None:
        return ids, p, None
    with tempfile.TemporaryDirectory(prefix="catsdogs-refit-") as scratch:
        model.save(Path(scratch) / "head.keras")
        return ids, p, (Path(scratch) / "head.keras").read_bytes()


#: bumped when the refit procedure changes, so refits written before are recomputed
REFIT_VERSION = 1
#: what ``<out>/refit/<run id>/`` records of its refit (reused when it equals :func:`_refit_key`)
REFIT_KEY = "refit_key.json"


def _refit_key(record: RunRecord, experiment: Experiment, n_all: int) -> dict[str, Any]:
    """What a member's refit depends on beyond its code: the run's settings (features, data
    fingerprint, split, head, optimizer, epochs, seed, TTA: its settings hash), its kept epochs,
    the rows it is refitted on and their batch size."""
    return {"refit_version": REFIT_VERSION, "settings_hash": record.settings_hash,
            "refit_params": record.refit_params or {}, "n_train": n_all,
            "batch_size": refit_batch_size(experiment.batch_size, record.n_train, n_all)}


def _write_refit_dir(directory: Path, model: bytes | None, test_ids: list[int], p: np.ndarray,
                     key: dict[str, Any]) -> bool:
    """``<out>/refit/<run id>/`` written whole beside and renamed into place: the refitted
    ``head.keras`` (``model``, when the head is a Keras graph), ``test_predictions.csv`` and
    :data:`REFIT_KEY` (``key``). Returns whether a head was saved."""
    import pandas as pd

    from catsdogs.util.fileio import atomic_path, atomic_write

    directory.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory) as tmp:
        tmp.mkdir()
        if model is not None:
            atomic_write(tmp / "head.keras", lambda fh: fh.write(model))
        csv = pd.DataFrame({"id": test_ids, "p_dog": p}).to_csv(index=False).encode()
        atomic_write(tmp / "test_predictions.csv", lambda fh: fh.write(csv))
        write_json(tmp / REFIT_KEY, {**key, "head": model is not None})
    return model is not None


def _reusable_refit(directory: Path, key: dict[str, Any]) -> tuple[list[int], np.ndarray, bool] | None:
    """A member's refit written before with the same :func:`_refit_key`: ``(test ids, P(dog),
    whether its head was saved)``; None when there is none (or it is damaged: recomputed)."""
    import json

    import pandas as pd

    try:
        written = json.loads((directory / REFIT_KEY).read_text())
        has_head = bool(written.pop("head"))
        if written != key or (has_head and not (directory / "head.keras").is_file()):
            return None
        table = pd.read_csv(directory / "test_predictions.csv")
        return ([int(i) for i in table["id"]], table["p_dog"].to_numpy(dtype=np.float64), has_head)
    except (OSError, ValueError, KeyError) as exc:
        if (directory / REFIT_KEY).exists():
            logger.warning("refit: recomputing %s (%s)", directory.name, exc)
        return None


def refit_submission(winner: RunRecord, records: list[RunRecord], experiment: Experiment,
                     aligned: Aligned, registry, out: Path, expected_ids: list[int],
                     engine: Engine = LOCAL, progress: bool = False,
                     before_refit: Callable[[list[RunRecord]], None] | None = None) -> Path | None:
    """Refit ``winner`` (or its ensemble members) on ``engine`` (:meth:`~catsdogs.compute.Engine.
    map_runs`: one call per member; default this process) and write ``<out>/submission.csv`` from
    it (every file written here). Each member's refit is written as soon as it is done and reused
    by a later call with the same :func:`_refit_key` (``<out>/refit/<run id>/``), so a refit
    stopped half way resumes; ``progress``: a bar on stderr. ``before_refit``: called with the
    members about to be refitted (none reused), before any is (the runner attaches their maps).

    Returns None (nothing written) for k-fold validation: the caller submits the fold average.
    """
    from catsdogs.runs.ensemble import Blend
    from catsdogs.runs.postprocess import transform_of
    from catsdogs.runs.submission import write_submission

    if experiment.validation.kind == "kfold":
        logger.info("refit: k-fold validation, submitting the average of the fold heads instead")
        write_json(out / "refit.json", {"refit": False, "reason": "k-fold: the fold heads' average "
                                        "is submitted", "winner": winner.run_id})
        return None
    from catsdogs.util.progress import advance, progress_bar, steps_on

    t0 = time.perf_counter()
    by_id = {r.run_id: r for r in records}
    members = winner.ensemble["members"] if winner.ensemble else [winner.run_id]
    n_all = int(len(aligned.train.y))
    keys = {m: _refit_key(by_id[m], experiment, n_all) for m in members}
    # each member is written as soon as it is refitted, and one refitted before with the same
    # key is reused: a refit stopped half way keeps what it had computed
    done = {m: _reusable_refit(out / "refit" / m, keys[m]) for m in members}
    todo = [m for m in members if done[m] is None]
    if len(todo) < len(members):
        logger.info("refit: %d of %d member(s) reused from %s", len(members) - len(todo),
                    len(members), out / "refit")
    if todo and before_refit is not None:
        before_refit([by_id[m] for m in todo])
    bar = progress_bar(total=len(todo), desc="refit", unit="run", enabled=progress and bool(todo))
    with steps_on(bar):  # which member is training, when it trains in this process
        for run_id, (ids, p, model), _node in engine.map_runs(
                _refit_member, todo, (experiment, aligned, registry, by_id)):
            done[run_id] = (ids, p, _write_refit_dir(out / "refit" / run_id, model, ids, p,
                                                     keys[run_id]))
            advance(bar)
    bar.close()
    test_ids: list[int] | None = None
    preds: list[np.ndarray] = []
    heads: dict[str, dict[str, Any]] = {}
    for run_id in members:
        refitted = done[run_id]
        assert refitted is not None  # every member is reused or refitted above
        ids, p, has_head = refitted
        if test_ids is not None and ids != test_ids:
            raise DataError(f"refit: member {run_id!r} predicted other test images than "
                            f"{members[0]!r}; delete {out / 'refit'} and rerun")
        test_ids = ids
        if has_head:
            heads[run_id] = {"dir": f"refit/{run_id}", "settings_hash": by_id[run_id].settings_hash}
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
                            "heads": heads, "postprocess": transform.to_dict(),
                            "batch_size": {m: keys[m]["batch_size"] for m in members},
                            "reused": [m for m in members if m not in todo],
                            "seconds": time.perf_counter() - t0,
                            "n_train": n_all}
    write_json(out / "refit.json", info)
    return write_submission(out / "submission.csv", ids, [probs.get(i, 0.5) for i in ids],
                            clip_bounds=None, expected_ids=ids)
