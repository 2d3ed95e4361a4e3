"""keras-tuner random search of head hyper-parameters (catsdogs.runs.tuning)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from catsdogs.builtin.heads import DropoutSigmoidHead, SoftmaxCamHead  # noqa: E402
from catsdogs.builtin.optimizers import AdamOptimizer  # noqa: E402
from catsdogs.components import Head  # noqa: E402
from catsdogs.errors import ConfigError  # noqa: E402
from catsdogs.runs.tuning import SEARCH_SPACE, tunable_names, tune_head  # noqa: E402
from catsdogs.testing import make_separable_features  # noqa: E402

FAST = dict(optimizer_cls=AdamOptimizer, budget=3, epochs=3, batch_size=64)


@pytest.fixture(scope="module")
def data():
    return make_separable_features(n=160, d=8, seed=1, margin=0.3)


def in_range(name, value):
    low, high, _ = SEARCH_SPACE[name]
    return low <= value <= high


def test_tunes_within_ranges_and_reports_the_best(data, tmp_path):
    X, y = data
    result = tune_head(SoftmaxCamHead, {}, X, y, seed=3, directory=tmp_path, **FAST)
    assert result.tuned == ("dropout", "learning_rate", "l2")
    assert len(result.trials) == 3
    for trial in result.trials:
        assert set(trial["params"]) == {"dropout", "l2"}
        assert in_range("dropout", trial["params"]["dropout"])
        assert in_range("l2", trial["params"]["l2"])
        assert in_range("learning_rate", trial["learning_rate"])
        assert np.isfinite(trial["score"]) and trial["score"] > 0
    scores = [t["score"] for t in result.trials]
    assert result.best_score == min(scores)
    best = result.trials[scores.index(min(scores))]
    assert result.best_params == best["params"]
    assert result.best_learning_rate == best["learning_rate"]
    # random search: the trials differ; keras-tuner's files stay in `directory`
    assert len({t["params"]["dropout"] for t in result.trials}) == 3
    assert (tmp_path / "tune_softmax_cam" / "oracle.json").is_file()
    # the best parameters build a working head
    SoftmaxCamHead(**result.best_params).fit(
        X, y, optimizer=AdamOptimizer(result.best_learning_rate), epochs=1)


def test_deterministic_with_the_same_seed(data):
    X, y = data
    a = tune_head(DropoutSigmoidHead, {}, X, y, seed=7, **FAST)
    b = tune_head(DropoutSigmoidHead, {}, X, y, seed=7, **FAST)
    assert a.trials == b.trials
    assert (a.best_params, a.best_learning_rate, a.best_score) == \
        (b.best_params, b.best_learning_rate, b.best_score)
    c = tune_head(DropoutSigmoidHead, {}, X, y, seed=8, **FAST)
    assert [t["params"] for t in c.trials] != [t["params"] for t in a.trials]


def test_only_parameters_the_head_has_are_tuned(data):
    X, y = data
    # dropout_sigmoid has no l2: it is skipped; the fixed learning rate is kept
    result = tune_head(DropoutSigmoidHead, {"dropout": 0.3}, X, y, learning_rate=0.02,
                       params_to_tune=("dropout", "l2"), seed=1, **FAST)
    assert result.tuned == ("dropout",)
    for trial in result.trials:
        assert set(trial["params"]) == {"dropout"} and trial["params"]["dropout"] != 0.3
        assert trial["learning_rate"] == 0.02
    assert result.best_learning_rate == 0.02
    # fixed parameters that are not tuned pass through unchanged
    result = tune_head(SoftmaxCamHead, {"dropout": 0.3}, X, y, params_to_tune=("learning_rate",),
                       seed=1, **{**FAST, "budget": 2})
    assert result.tuned == ("learning_rate",)
    assert all(t["params"] == {"dropout": 0.3} for t in result.trials)
    assert len({t["learning_rate"] for t in result.trials}) == 2


@pytest.mark.parametrize(
    "head_cls, params, kwargs, message",
    [
        (DropoutSigmoidHead, {}, {"params_to_tune": ("dropout", "momentum")}, "cannot tune 'momentum'"),
        (DropoutSigmoidHead, {"l2": 1e-3}, {}, "has no parameter 'l2'"),
        (DropoutSigmoidHead, {}, {"params_to_tune": ("l2",)}, "nothing to tune"),
        (DropoutSigmoidHead, {}, {"budget": 0}, "budget must be an integer >= 1"),
        (DropoutSigmoidHead, {}, {"inner_holdout": 1.0}, "inner_holdout must be a fraction"),
        # errors inside a trial stop the search instead of becoming failed trials
        (SoftmaxCamHead, {"l2": -1.0}, {"params_to_tune": ("dropout",)}, "l2 must be a number"),
    ],
)
def test_bad_arguments_are_config_errors(data, head_cls, params, kwargs, message):
    X, y = data
    with pytest.raises(ConfigError, match=message):
        tune_head(head_cls, params, X, y, **{**FAST, **kwargs})


# -- heads declare their own search space (Head.search_space / Head.from_hp) -----------------------
class ShrunkMeanHead(Head):
    """A plugin-style head without Keras: P(dog) from a shrunk class-mean direction."""

    name = "shrunk_mean"
    uses_optimizer = False

    def __init__(self, shrink: float = 0.5, scale: int = 1):
        self.shrink = shrink
        self.scale = scale

    @classmethod
    def search_space(cls, hp):
        hp.Float("shrink", 0.0, 1.0)
        hp.Int("scale", 1, 8)

    def fit(self, X, y, **kwargs):
        X = np.asarray(X, dtype=np.float64)
        self.w_ = (1 - self.shrink) * (X[y == 1].mean(0) - X[y == 0].mean(0))
        self.history_ = {}
        return self

    def predict_proba(self, X):
        return 1 / (1 + np.exp(-self.scale * (np.asarray(X, dtype=np.float64) @ self.w_)))


def test_a_plugin_head_is_tuned_over_its_own_search_space(data):
    X, y = data
    result = tune_head(ShrunkMeanHead, {}, X, y, optimizer_cls=None, budget=4,
                       params_to_tune=("shrink", "scale"), seed=2)
    assert result.tuned == ("shrink", "scale")
    assert len({(t["params"]["shrink"], t["params"]["scale"]) for t in result.trials}) == 4
    for trial in result.trials:
        assert 0 <= trial["params"]["shrink"] <= 1 and type(trial["params"]["scale"]) is int
        assert 1 <= trial["params"]["scale"] <= 8 and trial["learning_rate"] is None
    assert result.best_score == min(t["score"] for t in result.trials)


def test_search_space_names_must_be_head_parameters():
    class Sloppy(ShrunkMeanHead):
        name = "sloppy"

        @classmethod
        def search_space(cls, hp):
            hp.Float("shrinkage", 0.0, 1.0)

    with pytest.raises(ConfigError, match="'shrinkage', which is not one of its parameters"):
        tunable_names(Sloppy, ("shrinkage",))


def test_builtin_search_spaces():
    from catsdogs.builtin.stacking import LightGBMStackingHead

    assert list(DropoutSigmoidHead.tuning_space().entries) == ["dropout", "learning_rate"]
    assert list(SoftmaxCamHead.tuning_space().entries) == ["dropout", "l2", "learning_rate"]
    assert list(LightGBMStackingHead.tuning_space().entries) == [
        "num_leaves", "gbm_learning_rate", "reg_lambda", "min_child_samples", "learning_rate"]
    # names only other heads tune are skipped; names no head tunes are errors
    assert tunable_names(DropoutSigmoidHead, ("num_leaves", "dropout")) == ("dropout",)
    with pytest.raises(ConfigError, match="cannot tune 'leaves'"):
        tunable_names(LightGBMStackingHead, ("leaves",))


@pytest.mark.slow
def test_lightgbm_stacking_is_tuned(data):
    from catsdogs.builtin.stacking import LightGBMStackingHead

    X, y = data
    result = tune_head(LightGBMStackingHead, {"folds": 2, "n_estimators": 20}, X, y,
                       optimizer_cls=AdamOptimizer, budget=2, epochs=1, batch_size=64, seed=4,
                       params_to_tune=("num_leaves", "gbm_learning_rate"),
                       blocks=[("a", 4), ("b", 4)])
    assert result.tuned == ("num_leaves", "gbm_learning_rate")
    assert len({t["params"]["num_leaves"] for t in result.trials} |
               {t["params"]["gbm_learning_rate"] for t in result.trials}) > 2
    assert all(t["params"]["folds"] == 2 for t in result.trials)
