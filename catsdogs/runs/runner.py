"""The experiment runner: every (combination × head × optimizer) run over cached features, ranked.

``run_experiment(experiment)``:

1. extracts or reuses the features of every backbone of the experiment (:mod:`catsdogs.features.extraction`);
2. aligns them on common rows (:mod:`catsdogs.features.fusion`) and splits train/validation once, with the
   experiment's seed (stratified holdout, or stratified k-fold), so every run sees the same rows;
3. trains each run's head on its fused features (optionally tuned first with keras-tuner on an
   inner split of the training part only), predicts validation and test rows (averaging
   original and flipped features with ``tta``), scores log loss raw and clipped, accuracy, and
   the validation-optimal clip bounds;
4. writes one record directory per run — atomically, so after a crash or ``kill -9`` a rerun keeps
   every finished run and computes only the rest (a k-fold run trained fold by fold keeps its
   finished folds in ``<out>/folds`` until it is written, :mod:`catsdogs.runs.folds`, and resumes
   at the fold it was in) — then ``leaderboard.csv``, ``summary.md``, ``leaderboard.png`` and, for
   the winner, ``submission.csv``.

Output layout::

    <out>/experiment.json  leaderboard.csv  leaderboard.png  summary.md  submission.csv
    <out>/runs/<run id>/record.json  val_predictions.csv  test_predictions.csv  curves.png  [head.keras]
                        [head-fold1.keras ... : the other folds' heads of a k-fold run]
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from catsdogs._version import __version__
from catsdogs.components import trains_on_maps, uses_classifier, weights_at_hand
from catsdogs.compute import LOCAL_NODE
from catsdogs.errors import DataError
from catsdogs.evaluation.metrics import PairedStats
from catsdogs.experiment.spec import Experiment, HeadSpec, OptimizerSpec
from catsdogs.features.fusion import Aligned, align
from catsdogs.runs.ensemble import ensemble_record
from catsdogs.runs.features import maps_blocks, predict_tta, run_features, tta_average
from catsdogs.runs.postprocess import (
    FOLD_PREFIX,
    POST_COLUMN,
    apply_to_test,
    postprocess_record,
    transform_of,
)
from catsdogs.runs.record import (
    RECORD,
    RECORD_VERSION,
    HeadRef,
    Metrics,
    OptimizerRef,
    RunRecord,
    TestMetrics,
    ValidationRef,
    fold_head_file,
    load_record,
)
from catsdogs.runs.report import format_leaderboard, write_summary
from catsdogs.runs.result import ExperimentResult
from catsdogs.runs.submission import write_run_submission
from catsdogs.tracking import log_result, open_tracker
from catsdogs.util.fileio import (
    atomic_path,
    atomic_write,
    locked_dir,
    remove_stale_temporaries,
    write_json,
)

logger = logging.getLogger("catsdogs")


# ------------------------------------------------------------------------------------ planning
@dataclass(frozen=True)
class RunSpec:
    run_id: str
    combination: tuple[str, ...]
    head: HeadSpec
    optimizer: OptimizerSpec | None

    def describe(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "combination": list(self.combination),
            "head": {"name": self.head.name, "params": dict(self.head.params)},
            "optimizer": None if self.optimizer is None else
            {"name": self.optimizer.name, "learning_rate": self.optimizer.learning_rate},
        }


def _short_hash(obj: Any, n: int = 6) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def plan_runs(experiment: Experiment, registry=None) -> list[RunSpec]:
    """Every (combination × head × optimizer) run, in a fixed order, with unique readable ids.

    Heads that do not use an optimizer run once per combination. A head trained on maps
    (``input = "maps"``, e.g. ``finetune``) runs on the single-backbone combinations whose backbone
    offers ``split_top`` (and only its ``backbone`` parameter's, when given; the experiment's
    validation made sure it gets one); a head that reads the backbones' ImageNet classifiers
    (``uses_classifier``, e.g. ``imagenet_prior``) on the combinations whose every backbone has
    one (:func:`catsdogs.experiment.schema.head_runs_on`).
    """
    from catsdogs.experiment.schema import head_runs_on
    from catsdogs.plugins import get_registry

    registry = registry or get_registry()
    backbones = {b.name: b for b in experiment.backbones}
    runs: list[RunSpec] = []
    for combination in experiment.combinations:
        for head in experiment.heads:
            head_cls = registry.head(head.name)
            if not head_runs_on(head, combination, backbones, registry):
                continue
            optimizers = experiment.optimizers if head_cls.uses_optimizer else [None]
            for opt in optimizers:
                parts = ["+".join(combination), head.name] + ([opt.name] if opt else [])
                runs.append(RunSpec("__".join(parts), tuple(combination), head, opt))
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.run_id] = counts.get(r.run_id, 0) + 1
    return [
        RunSpec(f"{r.run_id}-{_short_hash(r.describe())}", r.combination, r.head, r.optimizer)
        if counts[r.run_id] > 1 else r
        for r in runs
    ]


def run_head_params(spec: RunSpec, experiment: Experiment, registry) -> dict[str, Any]:
    """The head's parameters for ``spec``: the experiment's, and for a head trained on maps the
    run's backbone, its weights and image size
    (:data:`catsdogs.experiment.schema.MAPS_HEAD_INJECTED`); for a head that reads the backbones'
    ImageNet classifiers, their ``weights`` (one name, or ``{backbone: weights}`` when they
    differ)."""
    params = dict(spec.head.params)
    head_cls = registry.head(spec.head.name)
    if uses_classifier(head_cls):
        weights = {name: experiment.backbone(name).weights for name in spec.combination}
        params["weights"] = next(iter(weights.values())) if len(set(weights.values())) == 1 \
            else weights
    if trains_on_maps(head_cls):
        (name,) = spec.combination
        backbone = experiment.backbone(name)
        params.update(backbone=name, weights=backbone.weights,
                      image_size=int(backbone.image_size or registry.backbone(name).input_size))
    return params


def fetch_classifiers(specs, experiment: Experiment, registry,
                      finished: Sequence[str | os.PathLike] = ()) -> list[str]:
    """Build now each ImageNet classifier that a run of ``specs`` will read (a head with
    ``uses_classifier``) and whose weights are not at hand (``weights_at_hand(weights,
    classifier=True)``: a Keras application's full weights file, which the feature model does not
    read, is downloaded on first use). A download that cannot be made then fails in seconds,
    naming the file, rather than after the features are extracted; one that succeeds is not
    made again. Classifiers at hand are left to the runs. Returns the backbones built.

    A run with a finished record in one of the output folders ``finished`` (this experiment's,
    those it may copy runs from) is left out: resumed, it reads no classifier, so a finished
    experiment reruns where the download cannot be made. (Its settings may have changed since:
    then it trains, and builds its classifier itself, after extraction.)"""
    needed = sorted({(name, experiment.backbone(name).weights) for spec in specs
                     if uses_classifier(registry.head(spec.head.name))
                     and not any((Path(folder) / "runs" / spec.run_id / RECORD).is_file()
                                 for folder in finished)
                     for name in spec.combination})
    built = []
    for name, weights in needed:
        backbone = registry.backbone(name)
        if not weights_at_hand(backbone, weights, classifier=True):
            logger.info("fetching the ImageNet classifier of %s (%s weights) before extraction",
                        name, weights)
            backbone.build_classifier(weights)
            built.append(name)
    return built


def wanted_maps(specs, registry) -> dict[str, tuple[str, int]]:
    """Each maps key (:func:`catsdogs.features.fusion.maps_key`) that a run of ``specs`` (run specs
    or records) whose head is trained on maps needs -> (its backbone, the number of top blocks)."""
    from catsdogs.features.fusion import maps_key

    wanted: dict[str, tuple[str, int]] = {}
    for spec in specs:
        head, params = (spec.head.name, dict(spec.head.params)) if isinstance(spec, RunSpec) \
            else (spec.head.name, dict(spec.params))
        blocks = maps_blocks(registry.head(head), params)
        if blocks is not None:
            wanted[maps_key(spec.combination[0], blocks)] = (spec.combination[0], blocks)
    return wanted


def maps_settings(experiment: Experiment, wanted: dict[str, tuple[str, int]], registry) -> dict[str, str]:
    """Each wanted maps key's configuration key (part of its runs' settings), from the backbones
    alone: nothing is read from the maps cache, so a resumed experiment whose maps runs are all
    finished never loads their maps. Maps computed by OpenVINO (``maps_runtime: openvino``) need
    it importable: one :class:`~catsdogs.util.extras.MissingExtraError` here otherwise
    (:func:`~catsdogs.features.maps.maps_config` checks it)."""
    from catsdogs.features.maps import maps_config

    keys = {}
    for key, (name, blocks) in wanted.items():
        backbone, bb = experiment.backbone(name), registry.backbone(name)
        bb.check_weights(backbone.weights)
        keys[key] = maps_config(bb, backbone.weights, backbone.image_size, blocks, backbone.resize,
                                backbone.maps_runtime).key
    return keys


def attach_maps(experiment: Experiment, wanted: dict[str, tuple[str, int]], aligned: Aligned,
                registry, dataset, digests, engine, progress: bool) -> None:
    """Cache the ``wanted`` maps (:func:`wanted_maps`; :func:`catsdogs.features.maps.cache_maps`,
    content-addressed like the features) and attach them to ``aligned`` on its rows
    (:attr:`~catsdogs.features.fusion.AlignedSplit.maps`); those attached before are kept. Called
    only for the runs that are trained or refitted in this call."""
    from catsdogs.features.maps import cache_maps

    for key, (name, blocks) in wanted.items():
        if key in aligned.train.maps:
            continue
        backbone = experiment.backbone(name)
        maps = cache_maps(experiment.data, name, weights=backbone.weights,
                          image_size=backbone.image_size, blocks=blocks, resize=backbone.resize,
                          cache_dir=experiment.cache_dir, registry=registry, dataset=dataset,
                          digests=digests, engine=engine, progress=progress,
                          order={"train": aligned.train.files, "test": aligned.test.files},
                          runtime=backbone.maps_runtime)
        for part, rows in ((aligned.train, maps.train), (aligned.test, maps.test)):
            if rows.files != part.files:
                have = set(rows.files)
                missing = [f for f in part.files if f not in have]
                reasons = [f"{f} ({maps.skipped.get(f, 'no maps')})" for f in missing[:5]]
                raise DataError(f"{len(missing)} photo(s) have features but no maps of {name!r}: "
                                f"{', '.join(reasons)}; remove or exclude them (exclude:)")
            part.maps[key] = rows.X  # already in the features' row order: no second copy


# ------------------------------------------------------------------------------------ ranking
def rank_records(records: list[RunRecord], first: str | None = None) -> list[RunRecord]:
    """Best first, by :attr:`RunRecord.ranking_logloss` (the cross-fitted post-processed loss);
    ``first``: the run submitted whatever its rank (``ensemble: {submit: always}``), put before
    the others, which keep their order."""
    ranked = sorted(records, key=lambda r: r.rank_key)
    if first is not None:
        ranked.sort(key=lambda r: r.run_id != first)  # stable: the rest stay in ranking order
    return ranked


def rank_stats(ranked: list[RunRecord], out: Path, seed: int) -> dict[str, PairedStats]:
    """Each ranked run's bootstrap standard error and paired difference to the leader
    (:func:`catsdogs.evaluation.metrics.paired_bootstrap`, seeded with the experiment's seed)
    over the per-photo losses behind its ranking number (the ``p_dog_post`` column of its
    ``val_predictions.csv``; every run predicts the same validation photos)."""
    import pandas as pd

    from catsdogs.evaluation.metrics import paired_bootstrap, row_log_losses

    frames = [pd.read_csv(out / "runs" / r.run_id / "val_predictions.csv").set_index("file")
              for r in ranked]
    files = frames[0].index
    losses = []
    for r, f in zip(ranked, frames):
        if set(f.index) != set(files):
            raise DataError(f"run {r.run_id!r} predicted other validation photos than "
                            f"{ranked[0].run_id!r}; rerun the experiment so all runs share one split")
        f = f.loc[files]
        losses.append(row_log_losses(f["label"].to_numpy(), f[POST_COLUMN].to_numpy()))
    stats = paired_bootstrap(np.stack(losses), 0, seed=seed)
    return {r.run_id: s for r, s in zip(ranked, stats)}


# ------------------------------------------------------------------------------------ helpers

def _splits(y: np.ndarray, experiment: Experiment) -> list[tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import StratifiedKFold, train_test_split

    idx = np.arange(len(y))
    v = experiment.validation
    if v.kind == "kfold":
        if np.bincount(y).min() < v.folds:
            raise DataError(f"kfold: {v.folds} folds need at least {v.folds} images of each class")
        skf = StratifiedKFold(n_splits=v.folds, shuffle=True, random_state=experiment.seed)
        return [(tr, va) for tr, va in skf.split(idx, y)]
    tr, va = train_test_split(idx, test_size=v.holdout, stratify=y, random_state=experiment.seed)
    return [(np.sort(tr), np.sort(va))]


def _predict_run(head, combination, split, rows, tta: bool, otherwise) -> np.ndarray:
    """P(dog) of a fitted head on ``rows`` of an aligned split: block by block
    (:func:`catsdogs.runs.multifit.predict_group`, the way grouped runs are predicted, so a run
    scores the same grouped, alone or on another engine) when the head allows it, else
    ``otherwise()`` (``predict_proba`` on the fused columns)."""
    from catsdogs.runs.multifit import predict_group

    if head.can_fit_grouped():
        (p,) = predict_group([head], [combination], split.X, rows)
        if p is not None:
            if tta:
                (q,) = predict_group([head], [combination], split.X_flip, rows)
                p = tta_average(p, q) if q is not None else None
            if p is not None:
                return p
    return otherwise()


# ------------------------------------------------------------------------------------ one run
def _execute_run(spec: RunSpec, experiment: Experiment, aligned: Aligned, splits, registry,
                 settings: dict[str, Any], run_dir: Path, fitted: list | None = None,
                 checkpoints=None, saved: dict | None = None) -> RunRecord:
    """One run: tune, fit per fold (or take ``fitted``, its heads per fold already trained by
    :func:`catsdogs.runs.multifit.fit_grid`, or a fold that grid kept from an earlier try of the
    group), predict, score and write its files to ``run_dir``.

    ``checkpoints`` (a :class:`catsdogs.runs.folds.FoldStore`, or what the engine gives a task to
    reach it): a k-fold run trained fold by fold keeps each finished fold there, and takes a fold
    kept by a killed try of the same run (same settings hash) instead of training it. ``saved``
    (fold -> :class:`~catsdogs.runs.folds.FoldCheckpoint`): folds of ``fitted`` that the group
    already checkpointed as it trained them (:class:`_GroupFolds`); their model files are written
    from those bytes, not serialised a second time."""
    import pandas as pd

    from catsdogs.evaluation.metrics import summarize
    from catsdogs.evaluation.plots import plot_history
    from catsdogs.runs.folds import FoldCheckpoint
    from catsdogs.util.progress import fold_step

    t0 = time.perf_counter()
    # grouped runs come with their predictions (or their folds kept by an earlier try of the
    # group): no need to fuse (copy) the combination's columns
    predicted = bool(fitted) and all(isinstance(f, FoldCheckpoint) or f.val is not None
                                     for f in fitted)  # type: ignore[union-attr]
    head_cls = registry.head(spec.head.name)
    params = run_head_params(spec, experiment, registry)
    features = run_features(aligned, spec.combination, tta=experiment.tta, columns=not predicted,
                            maps_blocks=maps_blocks(head_cls, params))
    train, test, tta = features.train, features.test, features.tta
    held = features.held_out  # the rows as held-out predictions read them (predict_precision)
    opt_cls = registry.optimizer(spec.optimizer.name) if spec.optimizer else None
    learning_rate = spec.optimizer.learning_rate if spec.optimizer else None
    fold_tuning: list[dict[str, Any]] = []

    from catsdogs.runs.tuning import tunable_names

    tuned = experiment.tuning is not None and bool(tunable_names(head_cls, experiment.tuning.params))
    oof = np.full(len(train.y), np.nan)
    test_preds, histories = [], []
    run_params, run_lr, refit_params = params, learning_rate, None
    settings_hash = _short_hash(settings, 16)
    resumed, kept_seconds = [], 0.0
    for fold, (tr, va) in enumerate(splits):
        group = fitted[fold] if fitted else None
        kept = checkpoints is not None and group is None and len(splits) > 1
        done: FoldCheckpoint | None
        fresh = False  # trained by this try's group, and checkpointed as it was
        if isinstance(group, FoldCheckpoint):  # the group's fold, kept by an earlier try
            done = group
        elif saved and fold in saved:
            done, fresh = saved[fold], True
        else:
            done = checkpoints.get((spec.run_id, settings_hash, fold)) if kept else None
        if done is None:
            if group is None:
                fold_step(spec.run_id, fold, len(splits))
            done = _fit_fold(fold, tr, va, group, head_cls, params, learning_rate, opt_cls, tuned,
                             train, test, held, tta, predicted, spec, experiment, aligned, run_dir,
                             keep=kept)
            if kept:
                checkpoints.put((spec.run_id, settings_hash, fold), done)
        else:
            if not fresh:
                resumed.append(fold + 1)
                kept_seconds += float(done.state.get("seconds", 0.0))  # its try's time
            for name, data in done.files.items():
                (run_dir / name).write_bytes(data)
        state = done.state
        oof[va] = done.arrays["val"]
        if "test" in done.arrays:
            test_preds.append(done.arrays["test"])
        histories.append(state["history"])
        if state.get("tuning") is not None:
            fold_tuning.append(state["tuning"])
        if fold == 0:
            run_params, run_lr = state["params"], state["learning_rate"]
            refit_params = state["refit_params"]
    if resumed:
        logger.info("run %s: fold(s) %s kept from a try that was stopped, not trained again",
                    spec.run_id, ", ".join(map(str, resumed)))

    val_rows = np.where(~np.isnan(oof))[0]
    y_val, p_val = train.y[val_rows], oof[val_rows]
    metrics = summarize(y_val, p_val, experiment.clip)
    pd.DataFrame({"file": [train.files[i] for i in val_rows], "id": train.ids[val_rows],
                  "label": y_val, "p_dog": p_val}).to_csv(run_dir / "val_predictions.csv", index=False)
    if test is not None:
        p_test = np.mean(test_preds, axis=0)
        # k-fold: each fold head's predictions too, so post-processing chosen on single fold heads'
        # out-of-fold predictions is applied to single fold heads before averaging (apply_to_test)
        folds = {f"{FOLD_PREFIX}{k}": p for k, p in enumerate(test_preds)} if len(test_preds) > 1 else {}
        pd.DataFrame({"id": test.ids, "file": test.files, "p_dog": p_test, **folds}).to_csv(
            run_dir / "test_predictions.csv", index=False)
    # no loss in the title: the run's number is known once its post-processing is chosen
    plot_history(histories[0], run_dir / "curves.png", f"{spec.run_id}: training curves (fold 1)")
    return RunRecord(
        run_id=spec.run_id,
        combination=list(spec.combination),
        head=HeadRef(spec.head.name, dict(spec.head.params)),
        optimizer=None if spec.optimizer is None else
        OptimizerRef(spec.optimizer.name, spec.optimizer.learning_rate),
        params=run_params,
        learning_rate=run_lr if opt_cls else None,
        settings=settings,
        settings_hash=settings_hash,
        metrics=Metrics.from_dict(metrics, "metrics"),
        tta=tta,
        tuning=_tuning_record(fold_tuning),
        refit_params=refit_params or None,
        history=histories,
        n_train=int(len(splits[0][0])),
        n_val=int(len(val_rows)),
        n_test=0 if test is None else int(len(test.ids)),
        validation=ValidationRef(experiment.validation.kind, experiment.validation.holdout,
                                 experiment.validation.folds),
        clip=list(experiment.clip),
        target=experiment.target,
        seconds=time.perf_counter() - t0 + kept_seconds,  # a resumed run's whole training time
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        catsdogs_version=__version__,
    )


def _fit_fold(fold: int, tr, va, group, head_cls, params, learning_rate, opt_cls, tuned: bool,
              train, test, held, tta: bool, predicted: bool, spec: RunSpec, experiment: Experiment,
              aligned: Aligned, run_dir: Path, keep: bool = False):
    """One fold of a run (:func:`_execute_run`): tune and fit its head on the fold's training rows
    (or take ``group``, trained by the grid), predict its held-out rows and the test rows, and save
    its model to ``run_dir``; what the run keeps of it, as a
    :class:`~catsdogs.runs.folds.FoldCheckpoint` (with the model file's bytes when ``keep``: the
    fold is kept in a fold store)."""
    t0 = time.perf_counter()
    fold_params, fold_lr, info = params, learning_rate, None
    if tuned and group is None:
        # inside the fold, on its training rows only: never on rows another fold validates on
        fold_params, fold_lr, info = _tune_fold(head_cls, params, learning_rate, opt_cls,
                                                train, tr, experiment)
    head = group.head if group is not None else head_cls(**fold_params)
    if group is None:
        optimizer = opt_cls(learning_rate=fold_lr) if opt_cls else None
        head.fit(train.X[tr], train.y[tr], validation=(train.X[va], train.y[va]),
                 optimizer=optimizer, epochs=experiment.epochs,
                 batch_size=experiment.batch_size, seed=experiment.seed, blocks=train.blocks)
    arrays = {}
    if predicted:
        assert group is not None and group.val is not None
        arrays["val"] = np.asarray(group.val)
        if test is not None:
            arrays["test"] = np.asarray(group.test)
    else:
        flip_va = held.X_flip[va] if held.X_flip is not None else None
        arrays["val"] = _predict_run(head, spec.combination, aligned.held_out, va, tta,
                                     lambda: predict_tta(head, held.X[va], flip_va))
        if test is not None:
            arrays["test"] = _predict_run(head, spec.combination, aligned.test, None, tta,
                                          lambda: predict_tta(head, test.X, test.X_flip))
    return _fold_checkpoint(fold, head, arrays, fold_params, fold_lr, info, t0, run_dir, keep)


def _fold_checkpoint(fold: int, head, arrays: dict[str, np.ndarray], params: dict[str, Any],
                     learning_rate: float | None, tuning: dict[str, Any] | None, t0: float,
                     run_dir: Path, keep: bool):
    """What a run keeps of a fitted fold head (:func:`_fit_fold`, and a group's fold as soon as
    the group has trained it, :class:`_GroupFolds`): its model saved to ``run_dir`` (and its bytes
    when ``keep``), its state and ``arrays`` (``val``, ``test``)."""
    from catsdogs.runs.folds import FoldCheckpoint, fold_state

    # what a refit on all rows must fix to reproduce this fit (e.g. the stacker's early-stopped
    # tree count); a head without it refits with its params alone
    refit_params = getattr(head, "refit_params", lambda: None)() if fold == 0 else None
    files = {}
    model = head.keras_model()
    if model is not None:  # every fold's head: a k-fold run's test predictions average them
        name = fold_head_file(fold)
        model.save(run_dir / name)
        if keep:
            files[name] = (run_dir / name).read_bytes()
    state = fold_state(time.perf_counter() - t0, history=dict(getattr(head, "history_", {}) or {}),
                       tuning=tuning, params=params, learning_rate=learning_rate,
                       refit_params=refit_params)
    return FoldCheckpoint(state, arrays, files)


class _GroupFolds:
    """Fold checkpoints of the runs of one group (:func:`run_group`), for
    :func:`~catsdogs.runs.multifit.fit_grid`: each trained fold is put into ``checkpoints`` per
    run as soon as the group has predicted it, and a fold kept for every run of the group is
    given back instead of being trained again (:mod:`catsdogs.runs.folds`). ``saved``: run id ->
    fold -> the checkpoint made of it in this try, which the run then writes its files from."""

    def __init__(self, group: list[tuple[RunSpec, dict[str, Any]]], shared: tuple, checkpoints):
        experiment, _, _, registry = shared
        # run id -> its settings hash (the fold store's key), head parameters and learning rate
        self.runs = {spec.run_id: (_short_hash(settings, 16),
                                   run_head_params(spec, experiment, registry),
                                   spec.optimizer.learning_rate if spec.optimizer else None)
                     for spec, settings in group}
        self.checkpoints = checkpoints
        self.saved: dict[str, dict[int, Any]] = {run_id: {} for run_id in self.runs}

    def resume(self, fold: int, run_ids: list[str]) -> dict[str, Any] | None:
        kept = {run_id: self.checkpoints.get((run_id, self.runs[run_id][0], fold))
                for run_id in run_ids}
        return kept if all(v is not None for v in kept.values()) else None

    def keep(self, fold: int, trained: dict[str, Any]) -> None:
        import tempfile

        for run_id, group_fit in trained.items():
            settings_hash, params, learning_rate = self.runs[run_id]
            t0 = time.perf_counter()
            arrays = {"val": np.asarray(group_fit.val)}
            if group_fit.test is not None:
                arrays["test"] = np.asarray(group_fit.test)
            with tempfile.TemporaryDirectory(prefix="catsdogs-fold-") as scratch:
                done = _fold_checkpoint(fold, group_fit.head, arrays, params, learning_rate, None,
                                        t0, Path(scratch), keep=True)
            self.checkpoints.put((run_id, settings_hash, fold), done)
            self.saved[run_id][fold] = done


def _tune_fold(head_cls, params: dict[str, Any], learning_rate: float | None, opt_cls, train,
               rows: np.ndarray, experiment: Experiment) -> tuple[dict[str, Any], float | None, dict[str, Any]]:
    """Tune a run's head on one fold's training ``rows`` (keras-tuner on an inner split of them):
    the fold's parameters, learning rate and what to record."""
    from catsdogs.runs.tuning import tune_head

    assert experiment.tuning is not None
    result = tune_head(
        head_cls, params, train.X[rows], train.y[rows], optimizer_cls=opt_cls,
        learning_rate=learning_rate, params_to_tune=experiment.tuning.params,
        budget=experiment.tuning.budget, epochs=experiment.epochs,
        batch_size=experiment.batch_size, seed=experiment.seed, blocks=train.blocks,
    )
    fold_params = {**params, **result.best_params}
    fold_lr = learning_rate
    if opt_cls is not None and result.best_learning_rate is not None:
        fold_lr = result.best_learning_rate
    info = {"best_params": result.best_params, "best_learning_rate": result.best_learning_rate,
            "best_inner_val_logloss": result.best_score, "trials": result.trials,
            "n_rows": int(len(rows))}
    return fold_params, fold_lr, info


def _tuning_record(folds: list[dict[str, Any]]) -> dict[str, Any] | None:
    """``record.tuning``: the first fold's result at the top (the run's ``params``; the only fold
    of a holdout run) and, for k-fold, every fold's in ``folds`` (each fold is tuned on its own
    training rows)."""
    if not folds:
        return None
    return {**folds[0], **({"folds": folds} if len(folds) > 1 else {})}


# ------------------------------------------------------------------------------------ experiment
def _extract_all(experiment: Experiment, dataset, progress: bool, engine):
    from catsdogs.dataset.layout import digest_all
    from catsdogs.features.extraction import extract, load_features

    for relpath, reason in dataset.ignored:
        logger.warning("ignored %s: %s", relpath, reason)
    digests = digest_all(dataset.records, engine=engine)  # once for every backbone
    feature_sets, keys, predicting, predicting_keys = {}, {}, {}, {}

    def one(spec, precision: str, flip: bool):
        (res,) = extract(
            experiment.data, [spec.name], weights=spec.weights, image_size=spec.image_size,
            precision=precision, runtime=spec.runtime_for(precision), resize=spec.resize, flip=flip,
            cache_dir=experiment.cache_dir, progress=progress, dataset=dataset, digests=digests,
            engine=engine,
            calibration_size=spec.calibration_size,
            layers=spec.layers, views=spec.views, merge=spec.merge,
            crop_fraction=spec.crop_fraction,
        )
        fs = load_features(res.path)
        return fs, {"file": str(res.path), "config_key": fs.meta["config_key"],
                    "dataset_fingerprint": fs.meta["dataset_fingerprint"]}

    for spec in experiment.backbones:
        # a backbone predicted from other features needs flipped views only of those (TTA)
        feature_sets[spec.name], keys[spec.name] = one(spec, spec.precision,
                                                       experiment.tta and not spec.predicts_apart)
        if spec.predicts_apart:
            predicting[spec.name], predicting_keys[spec.name] = one(spec, spec.predicts_in,
                                                                    experiment.tta)
    return feature_sets, keys, predicting, predicting_keys, digests


def _run_maps(spec: RunSpec, maps: dict[str, str], registry) -> dict[str, str] | None:
    """The maps a run's head is trained on (maps key -> configuration key), None for features."""
    return {key: maps[key] for key in wanted_maps([spec], registry)} or None


def _key_fields(keys: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    """Backbone -> the fields of its feature key that identify the cached file."""
    return {b: {k: key[k] for k in ("config_key", "dataset_fingerprint")} for b, key in keys.items()}


def _settings(spec: RunSpec, experiment: Experiment, keys: dict, split_hash: str,
              maps: dict[str, str] | None = None, predicting: dict | None = None) -> dict[str, Any]:
    apart = _key_fields({b: k for b, k in (predicting or {}).items() if b in spec.combination})
    return {
        **spec.describe(),
        "features": _key_fields({b: keys[b] for b in spec.combination}),
        # the features its held-out and test rows are predicted from, where they differ
        **({"predicting": apart} if apart else {}),
        **({"maps": maps} if maps else {}),
        "epochs": experiment.epochs,
        "batch_size": experiment.batch_size,
        "seed": experiment.seed,
        "validation": split_hash,
        "tta": experiment.tta,
        "tuning": None if experiment.tuning is None else
        {"budget": experiment.tuning.budget, "params": list(experiment.tuning.params)},
        "clip": list(experiment.clip),
        "record_version": RECORD_VERSION,
    }


def _output_locked(run: Callable[..., ExperimentResult]) -> Callable[..., ExperimentResult]:
    """Hold the experiment's output directory for the whole call: a second caller on the same
    ``--out`` fails at once naming the first one's pid (instead of both doing all the work and
    racing on the run-directory renames)."""
    @functools.wraps(run)
    def locked(experiment: Experiment, **kwargs) -> ExperimentResult:
        assert experiment.output is not None  # Experiment.__post_init__ sets it (runs/<name>)
        out = Path(experiment.output)
        (out / "runs").mkdir(parents=True, exist_ok=True)
        with locked_dir(out, "`catsdogs run`"):
            return run(experiment, **kwargs)
    return locked


def _engine_opened(run: Callable[..., ExperimentResult]) -> Callable[..., ExperimentResult]:
    """Open the call's engine (``engine``: an :class:`~catsdogs.engine.EngineSpec`, default the
    experiment's) for the whole call -- extraction, the grid and the refit -- and close it after;
    an engine passed already open is used as it is."""
    @functools.wraps(run)
    def opened(experiment: Experiment, **kwargs) -> ExperimentResult:
        from catsdogs.engine import EngineSpec, open_engine

        spec = kwargs.get("engine") or EngineSpec(experiment.engine, experiment.ray_address)
        if not isinstance(spec, EngineSpec):
            return run(experiment, **kwargs)
        with open_engine(spec) as engine:
            return run(experiment, **{**kwargs, "engine": engine})
    return opened


@_output_locked
@_engine_opened
def run_experiment(experiment: Experiment, *, registry=None, progress: bool = True, submit: bool = True,
                   echo: Callable[[str], None] | None = None, engine=None,
                   reuse_from: Sequence[str | os.PathLike] = ()) -> ExperimentResult:
    """Run (or resume) every run of ``experiment``; see the module docstring.

    ``engine`` (a :class:`catsdogs.engine.EngineSpec`, opened and closed here, or an engine already
    open, a :class:`catsdogs.compute.Engine`; default: the experiment's ``engine`` and
    ``ray_address``) says where features and runs are computed; files are written here either way.
    ``reuse_from``: other experiments' output folders; a planned run that this output lacks is
    copied from the first of them that has it finished with the same settings hash (the hash
    covers everything the run's result depends on), instead of being trained.
    """
    from catsdogs.dataset.layout import open_dataset
    from catsdogs.engine import EngineSpec, open_engine
    from catsdogs.evaluation.plots import plot_leaderboard
    from catsdogs.plugins import get_registry

    registry = registry or get_registry()
    echo = echo or (lambda s: None)
    plan = plan_runs(experiment, registry)
    assert experiment.output is not None  # Experiment.__post_init__ sets it (runs/<name>)
    out = Path(experiment.output)
    tracker = open_tracker(experiment.tracking, experiment, out, echo)  # before any training
    (out / "runs").mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out / "runs")  # half-written runs of a killed process
    write_json(out / "experiment.json", experiment.to_dict())

    dataset = open_dataset(experiment.data)
    # a download that fails, fails before extraction; finished runs need none
    fetch_classifiers(plan, experiment, registry, finished=[out, *reuse_from])
    # the maps' keys (and OpenVINO, for maps_runtime: openvino) are checked before extraction
    maps = maps_settings(experiment, wanted_maps(plan, registry), registry)
    engine = engine or EngineSpec(experiment.engine, experiment.ray_address)
    with (open_engine(engine) if isinstance(engine, EngineSpec) else contextlib.nullcontext(engine)
          ) as compute_engine:
        feature_sets, keys, predicting, predicting_keys, digests = _extract_all(
            experiment, dataset, progress, compute_engine)
        aligned = align(feature_sets, experiment.exclude, predicting)
        if experiment.exclude:  # report entries that match no training image; record the matched
            train_files = next(iter(feature_sets.values())).train.files
            matched, unmatched = experiment.match_exclude(train_files)
            if unmatched:
                shown = ", ".join(unmatched[:10]) + (" ..." if len(unmatched) > 10 else "")
                logger.warning("exclude: %d of %d entries match no training image (check the "
                               "paths; they are relative to the data directory): %s",
                               len(unmatched), len(experiment.exclude), shown)
            write_json(out / "experiment.json", {**experiment.to_dict(), "exclude_matched": matched})
        aligned_on = _key_fields(keys)
        splits = _splits(aligned.train.y, experiment)
        split_hash = _short_hash([[aligned.train.files[i] for i in va] for _, va in splits], 16)
        expected_test_ids = [r.id for r in dataset.test]
        write_json(out / "test_ids.json", expected_test_ids)

        records, pending = [], []
        adopted: Counter[str] = Counter()  # source folder -> runs copied from it
        for spec in plan:
            settings = _settings(spec, experiment, keys, split_hash,
                                 _run_maps(spec, maps, registry), predicting_keys)
            old = _reusable(out / "runs" / spec.run_id, _short_hash(settings, 16))
            if old is None and reuse_from:
                found = _adopt(spec.run_id, _short_hash(settings, 16), reuse_from, out)
                if found is not None:
                    old, source = found
                    adopted[str(source)] += 1
            if old is None:
                pending.append((spec, settings))
            else:
                old.target = experiment.target  # the current target, not the one of the earlier call
                records.append(old)
        reused = len(records)
        if adopted:  # the folders the runs came from, not every folder offered
            sources = (next(iter(adopted)) if len(adopted) == 1 else
                       ", ".join(f"{source} ({n})" for source, n in adopted.items()))
            echo(f"{adopted.total()} finished runs copied from {sources}")
        # the maps are read only for the maps runs trained now (a resumed run needs none)
        attach_maps(experiment, wanted_maps([spec for spec, _ in pending], registry), aligned,
                    registry, dataset, digests, compute_engine, progress)
        records += _train_runs(pending, experiment, aligned, splits, registry, out,
                               (aligned_on, _key_fields(predicting_keys) or None),
                               progress, compute_engine)
        computed = len(records) - reused

    for record in records:  # learned on validation predictions; finished runs are not retrained
        postprocess_record(record, out / "runs" / record.run_id, experiment)
    submit_first = None  # the ensemble, when the file says to submit it whatever its rank
    if experiment.ensemble is not None:
        ensemble = ensemble_record(records, out, experiment)
        if ensemble is not None:
            postprocess_record(ensemble, out / "runs" / ensemble.run_id, experiment)
            records.append(ensemble)
            if experiment.ensemble.submit == "always":
                submit_first = ensemble.run_id

    labels_file = Path(experiment.data) / "test_labels.csv"
    if labels_file.is_file():
        _attach_test_metrics(records, out, labels_file, expected_test_ids)
    ranked = rank_records(records, first=submit_first)
    result = ExperimentResult(experiment, out, ranked, computed, reused,
                              feature_files={b: k["file"] for b, k in keys.items()},
                              predicting_files={b: k["file"] for b, k in predicting_keys.items()},
                              stats=rank_stats(ranked, out, experiment.seed))
    board = result.leaderboard()
    atomic_write(out / "leaderboard.csv", lambda fh: fh.write(board.to_csv(index=False).encode()))
    plot_leaderboard([r.run_id for r in ranked], [r.ranking_logloss for r in ranked],
                     experiment.target, out / "leaderboard.png", title=f"{experiment.name}: validation log loss",
                     errors=[result.stats[r.run_id].se for r in ranked])
    (out / "refit.json").unlink(missing_ok=True)
    if submit and ranked[0].n_test > 0 and experiment.refit:
        from catsdogs.runs.refit import refit_submission

        def before_refit(members: list[RunRecord]) -> None:  # the maps of the members refitted now
            attach_maps(experiment, wanted_maps(members, registry), aligned, registry, dataset,
                        digests, compute_engine, progress)

        result.submission = refit_submission(ranked[0], records, experiment, aligned, registry, out,
                                             expected_test_ids, engine=compute_engine,
                                             progress=progress, before_refit=before_refit)
    if submit and ranked[0].n_test > 0 and result.submission is None:
        result.submission = write_run_submission(out / "runs" / ranked[0].run_id, out / "submission.csv",
                                                 expected_ids=expected_test_ids)
    write_summary(out, experiment, ranked, result.submission, result.stats)
    echo(format_leaderboard(ranked, experiment.target, stats=result.stats))
    log_result(tracker, experiment.tracking, result, echo)  # after every local file is written
    return result


def _train_runs(pending: list[tuple[RunSpec, dict[str, Any]]], experiment: Experiment, aligned: Aligned,
                splits, registry, out: Path, row_keys: tuple[dict, dict | None], progress: bool,
                engine) -> list[RunRecord]:
    """Train the pending runs on ``engine`` (:meth:`~catsdogs.compute.Engine.map_runs`, a group
    of runs per call, :func:`_run_groups`) and write each run directory atomically here as soon
    as its group finishes; ``row_keys`` (the feature keys the rows were aligned on, those of the
    predicting features or None) go into every record (``aligned_on``, ``predicted_on``)."""
    from catsdogs.runs.folds import FOLDS_DIR, FoldStore
    from catsdogs.util.progress import advance, progress_bar, steps_on

    records: list[RunRecord] = []
    # k-fold: the folds of runs trained fold by fold are kept until their run is written (an
    # engine whose map_runs takes no checkpoints, written before they existed, keeps none)
    store = FoldStore(out / FOLDS_DIR, {spec.run_id: _short_hash(settings, 16)
                                        for spec, settings in pending}) \
        if len(splits) > 1 and _takes_checkpoints(engine) else None
    bar = progress_bar(total=len(pending), desc="runs", unit="run", enabled=progress)
    done = ((spec, record, files, node)
            for group, results, node in engine.map_runs(
                run_group, _run_groups(pending, engine, registry),
                (experiment, aligned, splits, registry),
                **({} if store is None else {"checkpoints": store}))
            for (spec, _), (record, files) in zip(group, results, strict=True))
    with steps_on(bar):  # a long run's folds, trained in this process, show on the bar
        for spec, record, files, node in done:
            with atomic_path(out / "runs" / spec.run_id) as tmp:
                tmp.mkdir()
                for name, data in files.items():  # computed in a scratch folder, maybe elsewhere
                    (tmp / name).write_bytes(data)
                if node != LOCAL_NODE:
                    record.engine = {"name": engine.name, "node_id": node}
                record.aligned_on, record.predicted_on = row_keys
                record.save(tmp)
            if store is not None:
                store.drop(spec.run_id)
            records.append(record)
            advance(bar)
            if progress:
                bar.write(f"{spec.run_id}: val log loss {record.metrics.logloss:.5f} "
                          f"(clipped {record.metrics.logloss_clipped:.5f}), "
                          f"accuracy {record.metrics.accuracy:.4f}")
    bar.close()
    if store is not None:
        store.close()
    return records


def _takes_checkpoints(engine) -> bool:
    """Whether ``engine.map_runs`` takes ``checkpoints`` (:class:`catsdogs.compute.Engine`)."""
    import inspect

    try:
        return "checkpoints" in inspect.signature(engine.map_runs).parameters
    except (TypeError, ValueError):
        return False


def _run_groups(pending: list[tuple[RunSpec, dict[str, Any]]], engine, registry) -> list[list]:
    """The runs trained together by one call of the engine (:func:`run_group`): bounded groups
    (:func:`catsdogs.runs.multifit.plan_groups`). One process packs whole combinations into groups
    of at most ``CATSDOGS_GROUP_RUNS`` (16) runs, written before the next group trains, so a kill
    loses at most one group's training (with k-fold validation, its fold in training: each run of
    the group keeps each fold, :class:`_GroupFolds`); an engine that runs calls at once (Ray) gets one group per
    combination, so the groups spread over its CPUs while the runs of a group still share the
    fused columns and dropout masks. A run whose head is trained on maps (``finetune``) is a
    group of its own: it shares nothing with the others and trains for long, so it is written
    as soon as it is trained."""
    from catsdogs.runs.multifit import plan_groups

    def on_maps(item) -> bool:
        return trains_on_maps(registry.head(item[0].head.name))

    return plan_groups(pending, lambda item: item[0].combination, parallel=engine.parallel,
                       alone=on_maps)


def run_group(group: list[tuple[RunSpec, dict[str, Any]]], shared: tuple, checkpoints=None
              ) -> list[tuple[RunRecord, dict[str, bytes]]]:
    """A group of runs (one engine call, in this process or a Ray task on any node): the runs
    that can share passes over the features are trained together
    (:func:`catsdogs.runs.multifit.fit_grid`), the others alone; each run's record and its files'
    bytes, computed in a scratch directory. ``shared`` is ``(experiment, aligned, splits,
    registry)``, put into the object store once on Ray; ``checkpoints``: the fold store the runs
    trained fold by fold keep their folds in (:mod:`catsdogs.runs.folds`)."""
    from catsdogs.runs.multifit import fit_grid

    experiment, aligned, splits, registry = shared
    folds = _GroupFolds(group, shared, checkpoints) \
        if checkpoints is not None and len(splits) > 1 else None
    fitted = fit_grid([spec for spec, _ in group], experiment, aligned, splits, registry,
                      params=lambda spec: run_head_params(spec, experiment, registry),
                      resume=None if folds is None else folds.resume,
                      on_fold=None if folds is None else folds.keep)
    return [run_detached(item, shared, fitted.get(item[0].run_id), checkpoints,
                         None if folds is None else folds.saved[item[0].run_id]) for item in group]


def run_detached(item: tuple[RunSpec, dict[str, Any]], shared: tuple, fitted: list | None = None,
                 checkpoints=None, saved: dict | None = None) -> tuple[RunRecord, dict[str, bytes]]:
    """One run in a scratch directory: its record and its files' bytes (``fitted``: its heads
    trained in a group; ``checkpoints``, ``saved``: see :func:`_execute_run`). ``shared`` is
    ``(experiment, aligned, splits, registry)``."""
    import tempfile

    spec, settings = item
    experiment, aligned, splits, registry = shared
    with tempfile.TemporaryDirectory(prefix="catsdogs-run-") as scratch:
        record = _execute_run(spec, experiment, aligned, splits, registry, settings, Path(scratch),
                              fitted, checkpoints, saved)
        files = {p.name: p.read_bytes() for p in Path(scratch).iterdir() if p.is_file()}
    return record, files


def _reusable(run_dir: Path, settings_hash: str) -> RunRecord | None:
    """The finished record in ``run_dir`` when it was computed with these settings."""
    if not (run_dir / RECORD).is_file():
        return None
    try:
        old = load_record(run_dir)
    except DataError as exc:
        logger.warning("recomputing run %s: %s", run_dir.name, exc)
        return None
    return old if old.settings_hash == settings_hash else None


def _adopt(run_id: str, settings_hash: str, sources: Sequence[str | os.PathLike],
           out: Path) -> tuple[RunRecord, str | os.PathLike] | None:
    """Copy ``run_id``'s folder from the first output folder in ``sources`` where it is finished
    with ``settings_hash`` into ``out/runs`` (atomically); its record and that folder, or None."""
    for source in sources:
        run_dir = Path(source) / "runs" / run_id
        if run_dir.resolve() == (out / "runs" / run_id).resolve():
            continue
        record = _reusable(run_dir, settings_hash)
        if record is None:
            continue
        with atomic_path(out / "runs" / run_id) as tmp:
            shutil.copytree(run_dir, tmp)
        return record, source
    return None


def _attach_test_metrics(records: list[RunRecord], out: Path, labels_file: Path,
                         expected_ids: list[int]) -> None:
    """Score every run's test predictions, as they would be submitted, against known labels."""
    import pandas as pd

    from catsdogs.evaluation.metrics import accuracy, log_loss
    from catsdogs.runs.submission import read_labels

    labels = read_labels(labels_file)
    for record in records:
        preds_path = out / "runs" / record.run_id / "test_predictions.csv"
        if not preds_path.is_file():
            continue
        preds = pd.read_csv(preds_path)
        probs = dict(zip(preds["id"].astype(int), preds["p_dog"].astype(float)))
        post = dict(zip(preds["id"].astype(int), apply_to_test(transform_of(record), preds)))
        ids = [i for i in expected_ids if i in labels.index]
        if not ids:
            continue
        raw = np.array([probs.get(i, 0.5) for i in ids])
        p = np.array([post.get(i, 0.5) for i in ids])  # as submitted (k-fold: per fold, then averaged)
        y = labels.loc[ids].to_numpy()
        record.test_metrics = TestMetrics(log_loss(y, p), accuracy(y, p), len(ids),
                                          extra={"logloss_raw": log_loss(y, raw)})
