"""Post-processing, ensembles and refit inside a real experiment run (tiny real Keras heads)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import make_kaggle, run_cli

from catsdogs.app.export import load_run
from catsdogs.compute import LOCAL_NODE, LocalEngine
from catsdogs.experiment.spec import load_experiment
from catsdogs.features.extraction import load_features
from catsdogs.features.fusion import align
from catsdogs.plugins import get_registry
from catsdogs.runs.ensemble import Blend
from catsdogs.runs.features import run_features
from catsdogs.runs.postprocess import transform_of
from catsdogs.runs.refit import refit_batch_size, refit_run, refit_submission
from catsdogs.runs.runner import load_record, run_experiment, write_run_submission

BASE = {
    "weights": "none",
    "backbones": [{"name": "resnet50", "image_size": 32}],
    "heads": ["dropout_sigmoid"],
    "optimizers": [{"name": "adam", "learning_rate": 0.01}, {"name": "adadelta", "learning_rate": 1.0}],
    "epochs": 3,
    "batch_size": 16,
    "seed": 7,
    "validation": {"holdout": 0.25},
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = make_kaggle(tmp_path_factory.mktemp("refit") / "data", n_per_class=16, n_test=6)
    pd.DataFrame({"id": range(1, 7), "label": [0, 1, 0, 1, 1, 0]}).to_csv(root / "test_labels.csv",
                                                                        index=False)
    return root


def _experiment(tmp_path, data, name, **changes):
    doc = {**BASE, "data": str(data), "output": str(tmp_path / name),
           "cache_dir": str(data.parent / "cache"), **changes}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _submission(out):
    return pd.read_csv(out / "submission.csv").set_index("id")["label"]


@pytest.mark.slow
def test_postprocess_ensemble_and_refit_in_a_run(tmp_path, data):
    exp = load_experiment(_experiment(tmp_path, data, "full", ensemble={"top": 2, "method": "stack"},
                                      refit=True))
    result = run_experiment(exp, progress=False)
    out = result.out_dir
    board = pd.read_csv(out / "leaderboard.csv")
    assert len(board) == 3 and "ensemble-top2-stack" in set(board["run_id"])
    assert (np.diff(board["val_logloss_post"]) >= 0).all()  # ranked by the post-processed loss
    for run_id in board["run_id"]:
        rec = load_record(out / "runs" / run_id)
        pp = rec.postprocess
        assert pp["method"] == "auto" and pp["logloss_raw"] == pytest.approx(rec.metrics.logloss)
        assert pp["transform"]["kind"] in ("none", "clip", "temperature")
        assert rec.test_metrics is None  # not stored; attached per call
    ens = load_record(out / "runs" / "ensemble-top2-stack")
    assert ens.ensemble["method"] == "stack" and len(ens.ensemble["members"]) == 2
    assert ens.metrics.logloss == pytest.approx(ens.ensemble["logloss"])  # the cross-fitted score
    # an ensemble run directory is submitted like any run: its test predictions, post-processed
    ens_dir = out / "runs" / "ensemble-top2-stack"
    write_run_submission(ens_dir, tmp_path / "ens.csv")
    ens_test = pd.read_csv(ens_dir / "test_predictions.csv").set_index("id")["p_dog"]
    np.testing.assert_allclose(pd.read_csv(tmp_path / "ens.csv").set_index("id")["label"].loc[ens_test.index],
                               transform_of(ens).apply(ens_test.to_numpy()), atol=1e-6)
    # an ensemble exports as its members' heads and its blend (tests/test_export_submission.py)
    info = load_run(out / "runs" / "ensemble-top2-stack")
    assert [m.run_id for m in info.members] == ens.ensemble["members"]
    assert info.blend.to_dict() == ens.ensemble["blend"]
    # refit: the winner (or its members) retrained on all 32 training rows
    info = json.loads((out / "refit.json").read_text())
    winner = result.winner
    assert info["refit"] and info["winner"] == winner.run_id and info["n_train"] == 32
    members = winner.ensemble["members"] if winner.ensemble else [winner.run_id]
    assert info["members"] == members
    for m in members:
        assert (out / "refit" / m / "test_predictions.csv").is_file()
        assert (out / "refit" / m / "head.keras").is_file()  # saved for the export
        assert info["heads"][m]["settings_hash"] == load_record(out / "runs" / m).settings_hash
    # the submission is the refitted members' predictions, blended (an ensemble winner), then
    # post-processed: checked whichever kind of run won
    refits = [pd.read_csv(out / "refit" / m / "test_predictions.csv").set_index("id")["p_dog"]
              for m in members]
    ids = refits[0].index
    P = np.stack([r.loc[ids].to_numpy() for r in refits], axis=1)
    if winner.ensemble:
        b = winner.ensemble["blend"]
        p = Blend(b["method"], tuple(b["weights"]), b["bias"]).predict(P)
    else:
        p = P[:, 0]
    np.testing.assert_allclose(_submission(out).loc[ids], transform_of(winner).apply(p), atol=1e-6)
    # ... and not the ranked (80 %) heads' predictions
    ranked = [pd.read_csv(out / "runs" / m / "test_predictions.csv").set_index("id")["p_dog"]
              for m in members]
    assert not np.allclose(np.stack([r.loc[ids].to_numpy() for r in ranked], axis=1), P)
    # a second call reuses every run and writes the same submission (the refit is deterministic)
    first = _submission(out)
    again = run_experiment(exp, progress=False)
    assert again.computed == 0
    pd.testing.assert_series_equal(first, _submission(out))


@pytest.mark.slow
def test_refit_is_deterministic_and_uses_the_validation_rows(tmp_path, data):
    exp = load_experiment(_experiment(tmp_path, data, "plain"))
    result = run_experiment(exp, progress=False, submit=False)
    record = result.winner
    fs = load_features(result.feature_files["resnet50"])
    aligned = align({"resnet50": fs}, exp.exclude)
    reg = get_registry()
    ids1, p1 = refit_run(record, exp, aligned, reg)
    ids2, p2 = refit_run(record, exp, aligned, reg)
    assert ids1 == ids2 and np.array_equal(p1, p2)
    # the refit is the run's head trained on exactly every training row (its 24 training and
    # 8 validation rows), with the run's settings: the same head fitted here on all rows gives
    # the same predictions, one fitted on the training part only (the ranked fit) does not
    features = run_features(aligned, record.combination, tta=record.tta)
    assert len(features.train.y) == 32 and record.n_train == 24 and record.n_val == 8

    def fit_on(rows, batch_size):
        head = reg.head(record.head.name)(**record.params)
        head.fit(features.train.X[rows], features.train.y[rows], optimizer=reg.optimizer(
            record.optimizer.name)(learning_rate=record.learning_rate), epochs=exp.epochs,
            batch_size=batch_size, seed=exp.seed, blocks=features.train.blocks)
        return head.predict_proba(features.test.X)

    np.testing.assert_allclose(fit_on(np.arange(32), refit_batch_size(exp.batch_size, 24, 32)),
                               p1, rtol=0, atol=1e-6)
    val_files = set(pd.read_csv(result.out_dir / "runs" / record.run_id / "val_predictions.csv")["file"])
    train_rows = np.array([i for i, f in enumerate(features.train.files) if f not in val_files])
    assert len(train_rows) == 24
    assert np.abs(fit_on(train_rows, exp.batch_size) - p1).max() > 1e-3


def test_refit_keeps_the_ranked_fits_optimizer_steps():
    """Refit grows the batch with the rows, so it takes the ranked fit's steps per epoch (issue 20
    item 7: the same batch on 25 % more rows took 25 % more steps and was over-confident)."""
    import math

    for batch, n_ranked, n_all in ((32, 800, 1000), (128, 20000, 25000), (16, 24, 32), (8, 21, 28),
                                   (128, 100, 125), (5, 7, 9)):
        b = refit_batch_size(batch, n_ranked, n_all)
        assert math.ceil(n_all / b) == math.ceil(n_ranked / batch), (batch, n_ranked, n_all, b)
    assert refit_batch_size(32, 800, 1000) == 40


@pytest.mark.slow
def test_explicit_clip_is_exactly_that_clip_and_auto_never_submits_it_blindly(tmp_path, data):
    clipped = run_cli("run", str(_experiment(tmp_path, data, "clip", clip=[0.2, 0.8])), "--no-progress")
    assert clipped.returncode == 0, clipped.stderr
    sub = _submission(tmp_path / "clip")
    assert sub.min() >= 0.2 and sub.max() <= 0.8
    rec = load_record(tmp_path / "clip" / "runs" / pd.read_csv(tmp_path / "clip" / "leaderboard.csv")
                      ["run_id"][0])
    assert rec.postprocess["transform"] == {"kind": "clip", "learned": False, "clip": [0.2, 0.8],
                                            "bound": 2.0 ** -24}
    run_experiment(load_experiment(_experiment(tmp_path, data, "none", postprocess="none")),
                   progress=False)
    winner = pd.read_csv(tmp_path / "none" / "leaderboard.csv")["run_id"][0]
    raw = pd.read_csv(tmp_path / "none" / "runs" / winner / "test_predictions.csv").set_index("id")
    np.testing.assert_allclose(_submission(tmp_path / "none").loc[raw.index], raw["p_dog"], atol=1e-6)


class _Stopped(Exception):
    pass


class _Engine(LocalEngine):
    """This process, recording which runs each call refits; ``stop_at``: the call stops (as a
    kill would) before computing its item at that position."""

    def __init__(self, stop_at: int | None = None):
        self.stop_at, self.calls = stop_at, []

    def map_runs(self, fn, items, shared):
        items = list(items)
        self.calls.append(items)
        for position, item in enumerate(items):
            if position == self.stop_at:
                raise _Stopped(item)
            yield item, fn(item, shared), LOCAL_NODE


@pytest.mark.slow
def test_a_refit_stopped_half_way_resumes_where_it_stopped(tmp_path, data):
    """Each member's refit is written as soon as it is done and reused by the next call (a refit
    of a stack of every run took 1,750 CPU s on the benchmark; a kill used to lose all of it), and
    the submission it resumes to is the one an uninterrupted refit writes."""
    exp = load_experiment(_experiment(tmp_path, data, "resume", ensemble={"top": 2, "method": "mean"},
                                      refit=True))
    result = run_experiment(exp, progress=False, submit=False)
    (ens,) = [r for r in result.records if r.ensemble]
    first, second = ens.ensemble["members"]
    fs = load_features(result.feature_files["resnet50"])
    aligned = align({"resnet50": fs}, exp.exclude)
    out, reg, ids = result.out_dir, get_registry(), list(range(1, 7))

    stopped = _Engine(stop_at=1)
    with pytest.raises(_Stopped):
        refit_submission(ens, result.records, exp, aligned, reg, out, ids, engine=stopped)
    assert stopped.calls == [[first, second]]
    assert (out / "refit" / first / "head.keras").is_file()  # kept: written when it was done
    assert not (out / "refit" / second).exists() and not (out / "submission.csv").exists()

    resumed = _Engine()
    refit_submission(ens, result.records, exp, aligned, reg, out, ids, engine=resumed)
    assert resumed.calls == [[second]]  # the first member is not refitted again
    info = json.loads((out / "refit.json").read_text())
    assert info["reused"] == [first] and sorted(info["heads"]) == sorted([first, second])

    fresh = tmp_path / "fresh"  # the same refit, uninterrupted, in another folder
    (fresh / "runs").mkdir(parents=True)
    refit_submission(ens, result.records, exp, aligned, reg, fresh, ids, engine=_Engine())
    pd.testing.assert_series_equal(_submission(out), _submission(fresh))

    # a member refitted under other settings (here: another batch size) is refitted again
    key = out / "refit" / first / "refit_key.json"
    key.write_text(key.read_text().replace('"batch_size": ', '"batch_size": 1'))
    again = _Engine()
    refit_submission(ens, result.records, exp, aligned, reg, out, ids, engine=again)
    assert again.calls == [[first]]
    pd.testing.assert_series_equal(_submission(out), _submission(fresh))


@pytest.mark.slow
def test_submit_always_submits_the_ensemble_whatever_its_rank(tmp_path, data):
    """``ensemble: {submit: always}`` submits (refits, writes, reports) the ensemble even where a
    single run ranks above it; the others keep their ranking order and nothing is retrained."""
    grid = {"optimizers": [{"name": "adam", "learning_rate": 0.01},
                           {"name": "adadelta", "learning_rate": 1e-6}],  # learns ~nothing
            "ensemble": {"top": 2, "method": "mean"}}
    best = run_experiment(load_experiment(_experiment(tmp_path, data, "best", **grid)), progress=False)
    ids = [r.run_id for r in best.records]
    assert ids[0] != "ensemble-top2-mean" and "ensemble-top2-mean" in ids  # premise: it ranks lower
    assert (np.diff([r.ranking_logloss for r in best.records]) >= 0).all()

    lines: list[str] = []
    path = _experiment(tmp_path, data, "best", **{**grid, "ensemble": {**grid["ensemble"], "submit": "always"},
                                                   "refit": True})
    always = run_experiment(load_experiment(path), progress=False, echo=lines.append)
    assert always.computed == 0  # the same runs, reused: submit only changes what is submitted
    ens = always.winner
    assert ens.run_id == "ensemble-top2-mean"
    assert [r.run_id for r in always.records[1:]] == [i for i in ids if i != ens.run_id]
    out = always.out_dir
    board = pd.read_csv(out / "leaderboard.csv")
    assert board["run_id"].tolist() == [r.run_id for r in always.records] and board["rank"].tolist()[0] == 1
    lowest = board.iloc[1]  # the best single run, shown after the submitted one
    assert lowest["val_logloss"] < board.iloc[0]["val_logloss"] and lowest["diff_to_leader"] < 0
    assert "submitted whatever its rank" in (out / "summary.md").read_text()
    assert f"the lowest validation log loss is {lowest['run_id']}'s" in "\n".join(lines)
    # the refit and the submission are the ensemble's: each member refitted, blended, post-processed
    info = json.loads((out / "refit.json").read_text())
    assert info["winner"] == ens.run_id and info["members"] == ens.ensemble["members"]
    refits = [pd.read_csv(out / "refit" / m / "test_predictions.csv").set_index("id")["p_dog"]
              for m in ens.ensemble["members"]]
    b = ens.ensemble["blend"]
    p = Blend(b["method"], tuple(b["weights"]), b["bias"]).predict(
        np.stack([r.sort_index().to_numpy() for r in refits], axis=1))
    np.testing.assert_allclose(_submission(out).sort_index(), transform_of(ens).apply(p), atol=1e-6)
    # the choice is recorded with the experiment's settings
    assert json.loads((out / "experiment.json").read_text())["ensemble"]["submit"] == "always"


@pytest.mark.slow
def test_runs_finished_in_another_output_are_copied_not_trained(tmp_path, data):
    """``catsdogs run --reuse-from OTHER_OUT``: a planned run finished there with the same
    settings hash is copied (its files byte for byte) and not trained; one whose settings differ
    (here: more epochs) is trained; a run the other output lacks is trained."""
    first = run_experiment(load_experiment(_experiment(tmp_path, data, "first")), progress=False)
    assert first.computed == 2
    wider = {"optimizers": [*BASE["optimizers"], {"name": "radam", "learning_rate": 0.01}],
             "ensemble": {"top": 2, "method": "mean", "submit": "always"}}
    path = _experiment(tmp_path, data, "second", **wider)
    (tmp_path / "elsewhere" / "runs").mkdir(parents=True)  # offered first, holds nothing
    proc = run_cli("run", str(path), "--reuse-from", str(tmp_path / "elsewhere"), "--reuse-from",
                   str(first.out_dir), "--no-progress", check=True)
    # the message names the folder the runs came from, not every folder offered
    assert f"2 finished runs copied from {first.out_dir}\n" in proc.stdout
    assert "elsewhere" not in proc.stdout and "1 runs trained, 2 reused" in proc.stdout
    second = tmp_path / "second"
    for r in first.records:
        for name in ("record.json", "val_predictions.csv", "test_predictions.csv", "head.keras"):
            assert (second / "runs" / r.run_id / name).read_bytes() == \
                (first.out_dir / "runs" / r.run_id / name).read_bytes()
    assert len(pd.read_csv(second / "leaderboard.csv")) == 4  # 3 runs and the ensemble

    longer = load_experiment(_experiment(tmp_path, data, "third", epochs=BASE["epochs"] + 1))
    third = run_experiment(longer, progress=False, reuse_from=[first.out_dir])
    assert third.computed == 2 and third.reused == 0  # other settings: trained, not copied

    # runs found in two folders: each copied from the first that has it, counted per folder
    lines: list[str] = []
    fourth = run_experiment(load_experiment(_experiment(tmp_path, data, "fourth", **wider)),
                            progress=False, echo=lines.append,
                            reuse_from=[third.out_dir, first.out_dir, second])
    assert fourth.computed == 0
    assert f"3 finished runs copied from {first.out_dir} (2), {second} (1)" in lines
