"""The experiment runner end to end: real features, real Keras heads, real CLI subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import make_kaggle, run_cli

from catsdogs.experiment.spec import load_experiment
from catsdogs.runs.runner import load_record, plan_runs, run_experiment

BASE = {
    "weights": "none",
    "backbones": [{"name": "resnet50", "image_size": 32}, {"name": "xception", "image_size": 71}],
    "combinations": "all",
    "heads": ["dropout_sigmoid"],
    "optimizers": [{"name": "adam", "learning_rate": 0.01}, "adadelta"],
    "epochs": 3,
    "batch_size": 16,
    "seed": 7,
    "validation": {"holdout": 0.25},
}


def _write(tmp_path, name="exp", **changes):
    doc = {**BASE, "data": str(tmp_path / "data"), "output": str(tmp_path / f"out-{name}"),
           "cache_dir": str(tmp_path / "cache"), **changes}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture
def data(tmp_path):
    return make_kaggle(tmp_path / "data", n_per_class=16, n_test=6)


def _metrics(out):
    board = pd.read_csv(out / "leaderboard.csv")
    return dict(zip(board["run_id"], board["val_logloss"]))


def test_cli_run_end_to_end(tmp_path, data):
    truth = np.array([0, 1, 0, 1, 1, 0])
    pd.DataFrame({"id": range(1, 7), "label": truth}).to_csv(data / "test_labels.csv", index=False)
    exp = _write(tmp_path, clip=[0.005, 0.995])  # an explicit clip is exactly that clip
    proc = run_cli("run", str(exp), "--no-progress", timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out-exp"
    board = pd.read_csv(out / "leaderboard.csv")
    # 3 combinations (2 singles + 1 pair) x 1 head x 2 optimizers
    assert len(board) == 6 and board["rank"].tolist() == list(range(1, 7))
    assert set(board["combination"]) == {"resnet50", "xception", "resnet50+xception"}
    assert (np.diff(board["val_logloss_clipped"]) >= 0).all()  # ranked
    assert board["under_target"].dtype == bool
    assert "target 0.06127" in proc.stdout and board["run_id"][0] in proc.stdout
    for run_id in board["run_id"]:
        run_dir = out / "runs" / run_id
        rec = load_record(run_dir)
        assert rec.metrics.n == rec.n_val == 8 and rec.n_train == 24
        assert len(rec.history[0]["loss"]) == 3 and "val_loss" in rec.history[0]
        for name in ("val_predictions.csv", "test_predictions.csv", "curves.png", "head.keras"):
            assert (run_dir / name).is_file(), name
        val = pd.read_csv(run_dir / "val_predictions.csv")
        # the recorded metric is the log loss of the recorded predictions
        p = np.clip(val["p_dog"], 1e-15, 1 - 1e-15)
        ll = -np.mean(val["label"] * np.log(p) + (1 - val["label"]) * np.log(1 - p))
        assert abs(ll - rec.metrics.logloss) < 1e-9
    for name in ("summary.md", "leaderboard.png", "experiment.json"):
        assert (out / name).is_file()
    assert "![validation log loss per run](leaderboard.png)" in (out / "summary.md").read_text()
    sub = pd.read_csv(out / "submission.csv")
    assert list(sub.columns) == ["id", "label"] and sub["id"].tolist() == [1, 2, 3, 4, 5, 6]
    assert sub["label"].between(0.005, 0.995).all()
    winner = pd.read_csv(out / "runs" / board["run_id"][0] / "test_predictions.csv")
    np.testing.assert_allclose(sub["label"], np.clip(winner["p_dog"], 0.005, 0.995), atol=1e-6)
    # with test labels next to the data, every run's submitted predictions are scored (not ranked)
    p = np.clip(winner["p_dog"].to_numpy(), 0.005, 0.995)
    expected = -np.mean(truth * np.log(p) + (1 - truth) * np.log(1 - p))
    assert abs(board["test_logloss"][0] - expected) < 1e-9
    assert "test logloss" in proc.stdout and "never used for ranking" in proc.stdout


def test_reproducible_and_resumable_in_process(tmp_path, data):
    a = run_experiment(load_experiment(_write(tmp_path, "a")), progress=False)
    assert (a.computed, a.reused) == (6, 0)
    b = run_experiment(load_experiment(_write(tmp_path, "b")), progress=False)
    ma, mb = _metrics(a.out_dir), _metrics(b.out_dir)
    assert ma.keys() == mb.keys()
    for k in ma:
        assert abs(ma[k] - mb[k]) < 1e-6, k
    again = run_experiment(load_experiment(_write(tmp_path, "a")), progress=False)
    assert (again.computed, again.reused) == (0, 6)
    changed = run_experiment(load_experiment(_write(tmp_path, "a", epochs=2)), progress=False)
    assert changed.computed == 6  # a changed setting is never silently reused


#: a test optimizer plugin that gates the grid DURING training: ``adam`` whose ``build()`` (called
#: as a group's runs are compiled, before the group trains) blocks for ever, once a run directory
#: is written, when ``CATSDOGS_TEST_GATE`` names a folder (it writes ``blocked`` there first)
GATED_OPTIMIZER = '''
import os
import time
from pathlib import Path

from catsdogs.builtin.optimizers import AdamOptimizer
from catsdogs.hookspecs import hookimpl


class GatedAdam(AdamOptimizer):
    name = "gated_adam"

    def build(self):
        gate = os.environ.get("CATSDOGS_TEST_GATE")
        if gate and any(Path(gate, "runs").glob("*/record.json")):
            Path(gate, "blocked").write_text(str(os.getpid()))
            while True:  # until the test kills this process
                time.sleep(3600)
        return super().build()


@hookimpl
def register_optimizers(register):
    register(GatedAdam)
'''


@pytest.mark.slow
def test_kill_9_keeps_finished_runs(tmp_path, data, monkeypatch):
    """kill -9 while the grid trains (its second group, gated by the optimizer plugin above, not by
    time) keeps the first group's runs: groups of at most CATSDOGS_GROUP_RUNS runs are written
    before the next trains. Before, the whole grid trained as one group before any run directory
    was written, so a kill during training lost everything (here the gate never closes then and
    the run finishes)."""
    from conftest import install_fake_dist, kill_cli_at

    from catsdogs.plugins import Registry

    site = install_fake_dist(tmp_path / "site", "catsdogs-gate", "1.0",
                             {"catsdogs_gate": GATED_OPTIMIZER}, {"gate": "catsdogs_gate"})
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("CATSDOGS_GROUP_RUNS", "2")  # 3 combinations x 2 optimizers: 3 groups of 2
    registry = Registry().load(strict=True)
    optimizers = [{"name": "gated_adam", "learning_rate": 0.01}, "adadelta"]
    exp = _write(tmp_path, "k", epochs=12, optimizers=optimizers)
    out = tmp_path / "out-k"
    runs = out / "runs"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get(
        "PYTHONPATH")])), "CATSDOGS_TEST_GATE": str(out), "CATSDOGS_STRICT_PLUGINS": "1"}
    kill_cli_at(out / "blocked", "run", str(exp), "--no-progress", env=env)  # its second group
    finished = {p.parent.name for p in runs.glob("*/record.json")}
    assert len(finished) == 2, finished  # exactly the first group, nothing of the second
    result = run_experiment(load_experiment(exp, registry=registry), registry=registry,
                            progress=False)
    assert result.reused == 2 and result.computed == 4
    assert not list(runs.glob(".*tmp*")), "temporary run directories are cleaned up"
    clean = run_experiment(load_experiment(_write(tmp_path, "clean", epochs=12,
                                                  optimizers=optimizers), registry=registry),
                           registry=registry, progress=False)
    resumed, fresh = _metrics(result.out_dir), _metrics(clean.out_dir)
    assert resumed.keys() == fresh.keys()
    for k in fresh:
        assert abs(resumed[k] - fresh[k]) < 1e-6, k


def test_plan_groups_bounds_groups_and_keeps_combinations_together(monkeypatch):
    from catsdogs.errors import ConfigError
    from catsdogs.runs.multifit import GROUP_RUNS, plan_groups

    runs = [(c, o) for c in ("a", "b", "ab", "c", "abc") for o in ("adam", "adadelta", "sgd")]
    groups = plan_groups(runs, lambda r: r[0], max_runs=7)
    assert [len(g) for g in groups] == [6, 6, 3]  # whole combinations, at most 7 runs
    assert [r for g in groups for r in g] == runs  # plan order, every run once
    assert all(len({r[0] for r in g}) == len(g) // 3 for g in groups)
    split = plan_groups(runs, lambda r: r[0], max_runs=2)  # a combination larger than the bound
    assert max(map(len, split)) == 2 and [r for g in split for r in g] == runs
    assert [len(g) for g in plan_groups(runs, lambda r: r[0], parallel=True)] == [3] * 5
    assert len(plan_groups(runs * 2, lambda r: r[0])[0]) <= GROUP_RUNS
    alone = plan_groups(runs, lambda r: r[0], max_runs=7, alone=lambda r: r[1] == "sgd")
    assert [len(g) for g in alone] == [6, 4] + [1] * 5  # each long run written on its own
    assert [g[0][1] for g in alone[2:]] == ["sgd"] * 5
    assert sorted(r for g in alone for r in g) == sorted(runs)
    monkeypatch.setenv("CATSDOGS_GROUP_RUNS", "4")
    assert max(map(len, plan_groups(runs, lambda r: r[0]))) == 3
    monkeypatch.setenv("CATSDOGS_GROUP_RUNS", "zero")
    with pytest.raises(ConfigError, match="CATSDOGS_GROUP_RUNS must be a positive integer"):
        plan_groups(runs, lambda r: r[0])


def test_kfold_tta_and_more_heads(tmp_path, data):
    exp = _write(tmp_path, "kf", validation={"kfold": 3}, tta=True,
                 combinations=[["resnet50", "xception"]], optimizers=["adam"],
                 heads=["dropout_sigmoid", "softmax_cam", "lightgbm_stacking"])
    result = run_experiment(load_experiment(exp), progress=False)
    assert len(result.records) == 3
    for rec in result.records:
        assert rec.n_val == 32 and rec.tta is True  # out-of-fold: every training row
        assert len(rec.history) == 3
    stack = next(r for r in result.records if r.head.name == "lightgbm_stacking")
    assert not (result.out_dir / "runs" / stack.run_id / "head.keras").exists()


def test_tuning_budget_recorded(tmp_path, data):
    exp = _write(tmp_path, "tune", combinations=[["resnet50"]], optimizers=["adam"], epochs=2,
                 tuning={"budget": 2, "params": ["dropout", "learning_rate"]})
    (rec,) = run_experiment(load_experiment(exp), progress=False).records
    assert len(rec.tuning["trials"]) == 2
    assert rec.params["dropout"] == rec.tuning["best_params"]["dropout"]
    assert rec.learning_rate == rec.tuning["best_learning_rate"]


def test_plan_is_the_full_grid():
    exp = load_experiment(os.path.join(os.path.dirname(__file__), "..", "experiments", "seed.yaml"),
                          data=os.path.dirname(__file__))
    plan = plan_runs(exp)
    assert len(plan) == 15 * 4 and len({r.run_id for r in plan}) == 60


def test_predict_test_and_score_cli(tmp_path, data):
    result = run_experiment(load_experiment(_write(tmp_path, "p", combinations=[["resnet50"]],
                                                   optimizers=["adam"])), progress=False)
    run_dir = result.out_dir / "runs" / result.winner.run_id
    sub = tmp_path / "named.csv"
    proc = run_cli("predict-test", str(run_dir), "--out", str(sub), "--clip", "0.02", "0.98", check=True)
    assert str(sub) in proc.stdout
    df = pd.read_csv(sub)
    assert df["label"].between(0.02, 0.98).all() and len(df) == 6
    labels = tmp_path / "labels.csv"
    truth = np.array([1, 0, 1, 0, 1, 0])
    pd.DataFrame({"id": range(1, 7), "label": truth}).to_csv(labels, index=False)
    proc = run_cli("score", str(sub), "--labels", str(labels), "--json", check=True)
    scored = json.loads(proc.stdout)
    p = df["label"].to_numpy()
    expected = -np.mean(truth * np.log(p) + (1 - truth) * np.log(1 - p))
    assert abs(scored["logloss"] - expected) < 1e-6
    bad = run_cli("predict-test", str(tmp_path))
    assert bad.returncode == 1 and "not a finished run directory" in bad.stderr and "Traceback" not in bad.stderr


def test_unreadable_test_image_gets_a_neutral_prediction(tmp_path, data):
    (data / "test" / "7.jpg").write_bytes(b"")
    result = run_experiment(load_experiment(_write(tmp_path, "u", combinations=[["resnet50"]],
                                                   optimizers=["adam"])), progress=False)
    sub = pd.read_csv(result.submission)
    assert sub["id"].tolist() == list(range(1, 8))
    assert sub.loc[sub["id"] == 7, "label"].item() == 0.5


@pytest.mark.slow
def test_mini_data_through_the_cli(mini, tmp_path):
    exp = tmp_path / "mini.yaml"
    exp.write_text(yaml.safe_dump({
        "data": str(mini), "weights": "none", "output": str(tmp_path / "out"),
        "cache_dir": str(tmp_path / "cache"),
        "backbones": [{"name": "resnet50", "image_size": 32}, {"name": "inception_v3", "image_size": 75}],
        "combinations": "all", "heads": ["dropout_sigmoid"], "optimizers": ["adam"], "epochs": 2,
    }))
    proc = run_cli("run", str(exp), "--no-progress", timeout=900)
    assert proc.returncode == 0, proc.stderr
    board = pd.read_csv(tmp_path / "out" / "leaderboard.csv")
    assert len(board) == 3
    sub = tmp_path / "out" / "submission.csv"
    scored = json.loads(run_cli("score", str(sub), "--labels", str(mini / "test_labels.csv"), "--json",
                                check=True).stdout)
    assert scored["n"] == 300 and 0 < scored["logloss"] < 5


# ------------------------------------------------------------------------------------ hardening
# Issue 9 items 4 (stale "under target" in summary.md) and 16 (two runs on one --out at once).

def _summary_under(out) -> tuple[int, int]:
    """(runs the summary says are under the target, ✓ marks in its table)."""
    import re

    text = (out / "summary.md").read_text()
    said = int(re.search(r"(\d+) runs under it", text).group(1))
    ticks = sum(1 for line in text.splitlines() if line.startswith("| ") and "| ✓ |" in line)
    return said, ticks


def test_summary_follows_the_current_target_for_reused_runs(tmp_path, data):
    """Issue 9 item 4: reused records kept the old target's "under target" in summary.md."""
    exp = _write(tmp_path, "t", combinations=[["resnet50"]], optimizers=["adam"], epochs=1,
                 target=10.0)
    first = run_experiment(load_experiment(exp), progress=False, submit=False)
    assert first.computed == 1 and _summary_under(first.out_dir) == (1, 1)
    exp = _write(tmp_path, "t", combinations=[["resnet50"]], optimizers=["adam"], epochs=1,
                 target=1e-9)
    again = run_experiment(load_experiment(exp), progress=False, submit=False)
    assert again.reused == 1 and again.computed == 0
    board = pd.read_csv(again.out_dir / "leaderboard.csv")
    assert board["under_target"].tolist() == [False]
    assert _summary_under(again.out_dir) == (0, 0)  # was (1, 1): the earlier call's target
    assert again.winner.under_target is False and again.winner.target == 1e-9


def test_second_run_on_the_same_out_fails_naming_the_first(tmp_path, data):
    """Issue 9 item 16: the output directory is locked; a second `catsdogs run` on it fails at
    once with one Error: line naming the first one's pid, and the lock dies with its holder."""
    from catsdogs.errors import DataError
    from catsdogs.util.fileio import locked_dir

    exp = _write(tmp_path, "lock", combinations=[["resnet50"]], optimizers=["adam"], epochs=1)
    out = tmp_path / "out-lock"
    first = subprocess.Popen([sys.executable, "-m", "catsdogs", "run", str(exp), "--no-progress"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and first.poll() is None and not (
                (out / ".lock.pid").is_file() and (out / ".lock.pid").read_text() == str(first.pid)):
            time.sleep(0.1)
        assert first.poll() is None, first.stderr.read()
        second = run_cli("run", str(exp), "--no-progress", timeout=120)
        assert second.returncode == 1
        assert f"in use by another `catsdogs run` (pid {first.pid})" in second.stderr
        assert second.stderr.strip().splitlines()[-1].startswith("Error: ")
        assert "Traceback" not in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(30)
        first.stderr.close()
    with locked_dir(out, "test"):  # kill -9 released it
        with pytest.raises(DataError, match=f"pid {os.getpid()}"):
            with locked_dir(out, "test"):  # the same process, another open file: refused too
                pass


def _run_without_mlflow(*args: str):
    """The real CLI in a subprocess where ``import mlflow`` fails as if it were not installed
    (``sys.modules["mlflow"] = None``), whatever this environment has."""
    code = ("import sys; sys.modules['mlflow'] = None; from catsdogs.cli import main; "
            "main(sys.argv[1:])")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=600)


def test_tracking_without_mlflow_warns_or_is_one_error(tmp_path, data):
    exp = _write(tmp_path, "t", backbones=[{"name": "resnet50", "image_size": 32}],
                 optimizers=["adam"], epochs=1)
    required = _run_without_mlflow("run", str(exp), "--no-progress", "--track",
                                   "--track-required")
    assert required.returncode == 1 and "Traceback" not in required.stderr, required.stderr
    errors = [line for line in required.stderr.splitlines() if line.startswith("Error:")]
    assert errors == ["Error: tracking needs mlflow, which is not installed: "
                      "pip install 'catsdogs[tracking]'"]  # util.extras.require's one line
    assert not (tmp_path / "out-t" / "leaderboard.csv").exists()  # failed before any training
    optional = _run_without_mlflow("run", str(exp), "--no-progress", "--track")
    assert optional.returncode == 0, optional.stderr
    assert optional.stderr.count("tracking needs mlflow") == 1, optional.stderr  # said once
    assert "continuing without tracking" in optional.stderr
    assert len(pd.read_csv(tmp_path / "out-t" / "leaderboard.csv")) == 1


# ------------------------------------------------------------------------------------ issue 20
# Items 3 (tuning inside each fold), 4 (k-fold post-processing applied as chosen), 5 (one number
# per run everywhere) and 8 (standard errors, paired differences, ties).

def test_one_ranking_number_everywhere_with_its_standard_error(tmp_path, data):
    """Item 5: the leaderboard, ✓, "N of M under the target", summary.md and the plot's numbers
    are each run's ranking number (RunRecord.ranking_logloss), not the raw or fixed-clip loss;
    item 8: each row has a seeded bootstrap SE and paired difference to the leader, and the
    summary names the runs tied with the winner."""
    import re

    from catsdogs.runs.metrics import TIE_SE, paired_bootstrap, row_log_losses

    changes = dict(combinations=[["resnet50"]], heads=["dropout_sigmoid", "softmax_cam"], epochs=2,
                   postprocess="auto")
    first = run_experiment(load_experiment(_write(tmp_path, "one", **changes)), progress=False,
                           submit=False)
    numbers = sorted(r.ranking_logloss for r in first.records)
    assert len(numbers) == 4
    target = (numbers[1] + numbers[2]) / 2  # two runs under it by the ranking number
    said: list[str] = []
    result = run_experiment(load_experiment(_write(tmp_path, "one", target=target, **changes)),
                            progress=False, submit=False, echo=said.append)
    assert result.reused == 4
    out = result.out_dir
    board = pd.read_csv(out / "leaderboard.csv")
    assert "best_clip_logloss" not in board.columns  # the in-sample number is not on the board
    losses = []
    records = {r.run_id: r for r in result.records}  # their target is this call's
    for row in board.itertuples():
        rec = records[row.run_id]
        assert row.val_logloss == pytest.approx(rec.ranking_logloss, abs=1e-12)
        assert row.val_logloss_raw == pytest.approx(rec.metrics.logloss, abs=1e-12)
        assert row.under_target == (rec.ranking_logloss < target) == rec.under_target
        val = pd.read_csv(out / "runs" / row.run_id / "val_predictions.csv")
        per_row = row_log_losses(val["label"], val["p_dog_post"])  # the rows behind the number
        assert per_row.mean() == pytest.approx(row.val_logloss, abs=1e-9)
        losses.append(per_row)
    assert (np.diff(board["val_logloss"]) >= 0).all()  # ranked by it
    assert board["under_target"].sum() == 2
    assert _summary_under(out) == (2, 2)
    assert "2 of 4 runs under the target" in said[-1]
    # item 8: seeded, paired bootstrap over the same validation photos
    again = paired_bootstrap(np.stack(losses), 0, seed=7)
    np.testing.assert_allclose(board["val_logloss_se"], [s.se for s in again], rtol=0, atol=1e-12)
    np.testing.assert_allclose(board["diff_to_leader_se"], [s.diff_se for s in again], rtol=0, atol=1e-12)
    assert board["val_logloss_se"].gt(0).all() and board["diff_to_leader"][0] == 0
    assert (board["diff_to_leader"] >= 0).all()
    tied = board["diff_to_leader"] < TIE_SE * board["diff_to_leader_se"]
    assert board["tied_with_leader"][1:].tolist() == tied[1:].tolist()
    text = (out / "summary.md").read_text()
    line = next(x for x in text.splitlines() if x.startswith("- statistically tied with the winner:"))
    named = re.findall(r"`([^`]+)`", line.split("(")[0])
    assert named == board["run_id"][1:][board["tied_with_leader"][1:]].tolist()
    assert "2 standard errors" in line


def test_kfold_post_processing_is_applied_per_fold_as_it_was_chosen(tmp_path, data):
    """Item 4: a k-fold run's transform is chosen on single fold heads' out-of-fold predictions,
    so it is applied to each fold head's test predictions and then averaged (not to the average,
    which is less confident); the submission and the test score use exactly that."""
    truth = np.array([0, 1, 0, 1, 1, 0])
    pd.DataFrame({"id": range(1, 7), "label": truth}).to_csv(data / "test_labels.csv", index=False)
    exp = _write(tmp_path, "kpp", validation={"kfold": 3}, combinations=[["resnet50"]],
                 optimizers=["adam"], epochs=2, postprocess="temperature")
    result = run_experiment(load_experiment(exp), progress=False)
    (rec,) = result.records
    from catsdogs.runs.metrics import log_loss
    from catsdogs.runs.postprocess import transform_of

    t = transform_of(rec)
    assert t.kind == "temperature" and abs(t.temperature - 1) > 1e-3
    preds = pd.read_csv(result.out_dir / "runs" / rec.run_id / "test_predictions.csv")
    folds = preds[["p_dog_fold0", "p_dog_fold1", "p_dog_fold2"]].to_numpy()
    np.testing.assert_allclose(preds["p_dog"], folds.mean(axis=1), rtol=0, atol=1e-12)
    per_fold = np.mean([t.apply(folds[:, k]) for k in range(3)], axis=0)
    submitted = pd.read_csv(result.submission).set_index("id").loc[preds["id"], "label"].to_numpy()
    np.testing.assert_allclose(submitted, per_fold, rtol=0, atol=1e-6)
    assert np.abs(per_fold - t.apply(preds["p_dog"])).max() > 1e-6  # it matters here
    ids = preds["id"].to_numpy()
    assert rec.test_metrics.logloss == pytest.approx(log_loss(truth[ids - 1], per_fold), abs=1e-9)


def test_tuning_happens_inside_each_fold_on_its_training_rows(tmp_path, data, monkeypatch):
    """Item 3: tune_head searched on fold 0's training rows, which are the validation rows of the
    other folds. Now every fold is tuned on its own training rows only."""
    import catsdogs.runs.runner as runner
    import catsdogs.runs.tuning as tuning

    seen: dict[str, list] = {"splits": [], "X": [], "tuned": []}
    real_splits, real_features, real_tune = runner._splits, runner.run_features, tuning.tune_head

    def splits(y, experiment):
        seen["splits"] = real_splits(y, experiment)
        return seen["splits"]

    def features(*args, **kwargs):
        f = real_features(*args, **kwargs)
        seen["X"].append(f.train.X)
        return f

    def tune(head_cls, params, X, y, **kwargs):
        seen["tuned"].append(np.array(X))
        return real_tune(head_cls, params, X, y, **kwargs)

    monkeypatch.setattr(runner, "_splits", splits)
    monkeypatch.setattr(runner, "run_features", features)
    monkeypatch.setattr(tuning, "tune_head", tune)
    exp = _write(tmp_path, "ktune", validation={"kfold": 3}, combinations=[["resnet50"]],
                 optimizers=["adam"], epochs=1, tuning={"budget": 1, "params": ["dropout"]})
    (rec,) = run_experiment(load_experiment(exp), progress=False, submit=False).records
    (X_all,) = seen["X"]
    assert len(seen["tuned"]) == 3  # once per fold
    for (tr, va), X in zip(seen["splits"], seen["tuned"]):
        np.testing.assert_array_equal(X, X_all[tr])  # that fold's training rows, none of its validation
        assert not np.isin(va, tr).any()
    assert [f["n_rows"] for f in rec.tuning["folds"]] == [len(tr) for tr, _ in seen["splits"]]
    assert rec.params["dropout"] == rec.tuning["folds"][0]["best_params"]["dropout"]
