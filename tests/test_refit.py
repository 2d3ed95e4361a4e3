"""Post-processing, ensembles and refit inside a real experiment run (tiny real Keras heads)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import make_kaggle, run_cli

from catsdogs.app.export import export_run
from catsdogs.errors import ConfigError
from catsdogs.experiment.spec import load_experiment
from catsdogs.features.extraction import load_features
from catsdogs.features.fusion import align
from catsdogs.plugins import get_registry
from catsdogs.runs.postprocess import transform_of
from catsdogs.runs.refit import refit_run
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
    with pytest.raises(ConfigError, match="ensemble of runs .*no single end-to-end model.*catsdogs export"):
        export_run(out / "runs" / "ensemble-top2-stack", out=tmp_path / "export")
    # refit: the winner (or its members) retrained on all 32 training rows
    info = json.loads((out / "refit.json").read_text())
    winner = result.winner
    assert info["refit"] and info["winner"] == winner.run_id and info["n_train"] == 32
    members = winner.ensemble["members"] if winner.ensemble else [winner.run_id]
    assert info["members"] == members
    for m in members:
        assert (out / "refit" / m / "test_predictions.csv").is_file()
    refit_single = pd.read_csv(out / "refit" / members[0] / "test_predictions.csv").set_index("id")
    if not winner.ensemble:  # the submission is the refitted predictions, post-processed
        expected = transform_of(winner).apply(refit_single["p_dog"].to_numpy())
        np.testing.assert_allclose(_submission(out).loc[refit_single.index], expected, atol=1e-6)
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
    holdout = pd.read_csv(result.out_dir / "runs" / record.run_id / "test_predictions.csv")
    assert not np.allclose(holdout.set_index("id").loc[ids1, "p_dog"], p1)  # more rows, other head


@pytest.mark.slow
def test_explicit_clip_is_exactly_that_clip_and_auto_never_submits_it_blindly(tmp_path, data):
    clipped = run_cli("run", str(_experiment(tmp_path, data, "clip", clip=[0.2, 0.8])), "--no-progress")
    assert clipped.returncode == 0, clipped.stderr
    sub = _submission(tmp_path / "clip")
    assert sub.min() >= 0.2 and sub.max() <= 0.8
    rec = load_record(tmp_path / "clip" / "runs" / pd.read_csv(tmp_path / "clip" / "leaderboard.csv")
                      ["run_id"][0])
    assert rec.postprocess["transform"] == {"kind": "clip", "learned": False, "clip": [0.2, 0.8]}
    run_experiment(load_experiment(_experiment(tmp_path, data, "none", postprocess="none")),
                   progress=False)
    winner = pd.read_csv(tmp_path / "none" / "leaderboard.csv")["run_id"][0]
    raw = pd.read_csv(tmp_path / "none" / "runs" / winner / "test_predictions.csv").set_index("id")
    np.testing.assert_allclose(_submission(tmp_path / "none").loc[raw.index], raw["p_dog"], atol=1e-6)
