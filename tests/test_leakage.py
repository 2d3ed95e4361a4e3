"""The leakage canary (issue 20, "What users get"): on photos whose labels are pure noise, no row of
the leaderboard may score better than chance beyond its own noise.

The photos are generated JPEGs whose file names (cat.N / dog.N, hence the labels) are an
independent fair coin: nothing in the pixels says anything about the label, and the classes are
balanced. So no model, selection or post-processing can beat the constant 0.5 (log loss
``ln 2 = 0.693``) on photos it did not use -- in expectation. Each row's ranking number is a mean
over its validation photos, so it scatters around its expectation; the tolerance is that row's own
noise: ``val_logloss >= ln 2 - K * val_logloss_se``, with the leaderboard's seeded bootstrap
standard error (item 8) and ``K = 3`` (a one-sided 3-SE band: about 1 chance in 700 for an honest
row; the photos are seeded, so the outcome is fixed, not flaky). A prediction near 0.5 has a tiny
SE, and so a tiny tolerance: the band follows each row's own spread.

Every kind of row is covered: the three built-in heads (``dropout_sigmoid``, ``softmax_cam``,
``lightgbm_stacking``), tuned runs, a stacked and a mean ensemble, ``postprocess: auto``, holdout
and k-fold. A planted leak -- a head plugin that remembers the labels of the validation rows it is
handed (the ranking rows) -- must trip the canary; it does, by a wide margin.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import install_fake_dist, write_jpeg

from catsdogs.experiment.spec import load_experiment
from catsdogs.plugins import Registry
from catsdogs.runs.runner import run_experiment

#: one-sided tolerance, in each row's own bootstrap standard errors
K = 3.0
CHANCE = math.log(2.0)

BASE = {
    "weights": "none",
    "backbones": [{"name": "resnet50", "image_size": 32}],
    "combinations": "all",
    "heads": ["dropout_sigmoid", "softmax_cam",
              {"name": "lightgbm_stacking", "params": {"folds": 2, "n_estimators": 60}}],
    "optimizers": [{"name": "adam", "learning_rate": 0.01}],
    "epochs": 3,
    "batch_size": 16,
    "seed": 11,
    "postprocess": "auto",
}

#: a head plugin with a planted leak: it remembers the labels of the validation rows ``fit`` is
#: handed -- the rows the run is ranked on -- and "predicts" them (a stand-in for early stopping,
#: model selection or training on the ranking rows, made large enough to matter)
LEAKY = '''
import numpy as np

from catsdogs.builtin.heads import DropoutSigmoidHead
from catsdogs.hookspecs import hookimpl


class LeakyHead(DropoutSigmoidHead):
    name = "leaky"

    def fit(self, X, y, *, validation=None, **kwargs):
        super().fit(X, y, validation=validation, **kwargs)
        self.seen_ = {} if validation is None else {
            row.tobytes(): float(label) for row, label in zip(np.asarray(validation[0]), validation[1])}
        return self

    def predict_proba(self, X):
        p = super().predict_proba(X)
        known = [self.seen_.get(row.tobytes()) for row in np.asarray(X)]
        return np.array([q if k is None else 0.1 + 0.8 * k for q, k in zip(p, known)])


@hookimpl
def register_heads(register):
    register(LeakyHead)
'''


@pytest.fixture(scope="module")
def noise(tmp_path_factory):
    """100 training photos (50 named cat, 50 dog, by a coin independent of the pixels), 6 test
    photos, and a shared feature cache."""
    root = tmp_path_factory.mktemp("noise")
    rng = np.random.default_rng(20)
    names = rng.permutation(["cat"] * 50 + ["dog"] * 50)
    counts = {"cat": 0, "dog": 0}
    for i, name in enumerate(names):
        counts[name] += 1
        write_jpeg(root / "data" / "train" / f"{name}.{counts[name]}.jpg", 7000 + i,
                   label=int(rng.integers(2)))  # the picture's own "class" is another coin
    for i in range(1, 7):
        write_jpeg(root / "data" / "test" / f"{i}.jpg", 9000 + i, label=i % 2)
    return root


def _run(root, name, registry=None, **changes):
    doc = {**BASE, "data": str(root / "data"), "output": str(root / f"out-{name}"),
           "cache_dir": str(root / "cache"), **changes}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    result = run_experiment(load_experiment(path, registry=registry), registry=registry,
                            progress=False, submit=False)
    return result, pd.read_csv(result.out_dir / "leaderboard.csv")


def better_than_chance(board: pd.DataFrame) -> list[str]:
    """The rows whose ranking number beats chance by more than K of their own standard errors."""
    flagged = board["val_logloss"] < CHANCE - K * board["val_logloss_se"]
    return board["run_id"][flagged].tolist()


def _kinds(result) -> set[str]:
    kinds = set()
    for r in result.records:
        kinds.add(r.head.name)
        if r.tuning:
            kinds.add("tuned")
        if r.ensemble:
            kinds.add(f"ensemble-{r.ensemble['method']}")
        if r.postprocess and r.postprocess["method"] == "auto":
            kinds.add("postprocess-auto")
    return kinds


def test_no_row_beats_chance_on_noise_labels(noise):
    holdout, board_h = _run(noise, "holdout", validation={"holdout": 0.3},
                            tuning={"budget": 2, "params": ["dropout"]},
                            ensemble={"top": 3, "method": "stack"})
    kfold, board_k = _run(noise, "kfold", validation={"kfold": 3}, ensemble={"top": 3, "method": "mean"})
    assert _kinds(holdout) >= {"dropout_sigmoid", "softmax_cam", "lightgbm_stacking", "tuned",
                               "ensemble_stack", "ensemble-stack", "postprocess-auto"}
    assert _kinds(kfold) >= {"dropout_sigmoid", "softmax_cam", "lightgbm_stacking",
                             "ensemble-mean", "postprocess-auto"}
    for board in (board_h, board_k):
        assert len(board) == 4 and board["val_logloss_se"].gt(0).all()
        assert better_than_chance(board) == [], board[["run_id", "val_logloss", "val_logloss_se"]]
    # the stacker's tree count was chosen on its own rows and is what a refit trains (item 2)
    stack = next(r for r in holdout.records if r.head.name == "lightgbm_stacking")
    assert stack.refit_params == {"n_estimators": len(stack.history[0]["loss"]),
                                  "early_stopping_rounds": None}


def test_a_planted_leak_trips_the_canary(noise, tmp_path):
    site = install_fake_dist(tmp_path / "site", "catsdogs-leaky", "0.1", {"leaky_plugin": LEAKY},
                             {"leaky": "leaky_plugin"})
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(site))
        registry = Registry().load()
        assert "leaky" in registry.names("heads"), registry.failures
        for kind, validation in (("holdout", {"holdout": 0.3}), ("kfold", {"kfold": 3})):
            _, board = _run(noise, f"leak-{kind}", registry, validation=validation,
                            heads=["dropout_sigmoid", "leaky"])
            assert better_than_chance(board) == ["resnet50__leaky__adam"], board
            leaky = board.set_index("run_id").loc["resnet50__leaky__adam"]
            assert leaky["val_logloss"] < CHANCE - 10 * leaky["val_logloss_se"]  # far beyond noise
