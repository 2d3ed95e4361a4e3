"""The ``lightgbm_stacking`` head: conformance, it learns, it does not leak, blocks, reproducibility."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


import numpy as np  # noqa: E402
import pytest  # noqa: E402
from sklearn.metrics import log_loss, roc_auc_score  # noqa: E402

from catsdogs.builtin.heads import DropoutSigmoidHead, NotFittedError  # noqa: E402
from catsdogs.builtin.optimizers import AdamOptimizer  # noqa: E402
from catsdogs.builtin.stacking import EPS, LightGBMStackingHead, check_blocks  # noqa: E402
from catsdogs.errors import ConfigError  # noqa: E402
from catsdogs.evaluation.metrics import logit  # noqa: E402
from catsdogs.plugins import DEFAULT_PLUGINS, get_registry  # noqa: E402
from catsdogs.testing import check_head  # noqa: E402

BLOCKS = [("resnet50", 12), ("xception", 12)]


def two_blocks(n, width=12, signal=0.45, seed=0, shuffle_labels=False):
    """Two feature blocks, each weakly informative on its own (independent noise per block)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    parts = []
    for _ in range(2):
        direction = rng.normal(size=width)
        direction /= np.linalg.norm(direction)
        parts.append(rng.normal(size=(n, width)) + signal * np.outer(2 * y - 1, direction))
    X = np.hstack(parts).astype(np.float32)
    if shuffle_labels:  # the label-shuffled control: X says nothing about y
        y = rng.permutation(y)
    return X, y.astype(np.int64)


# -- contract -----------------------------------------------------------------------------------------
def test_registered_and_builtin():
    assert "catsdogs.builtin.stacking" in DEFAULT_PLUGINS
    registry = get_registry()
    assert registry.head("lightgbm_stacking") is LightGBMStackingHead
    assert LightGBMStackingHead.uses_optimizer and not LightGBMStackingHead.cam_capable


def test_conforms():
    # 200 rows, one block, 5 folds: 12 small Keras fits (the check fits twice)
    check_head(LightGBMStackingHead, optimizer=AdamOptimizer(0.05), epochs=10)


def test_params_stored_only_and_describe():
    head = LightGBMStackingHead(base_head="softmax_cam", base_params={"l2": 0.0}, folds=3)
    assert head.get_params()["base_params"] == {"l2": 0.0}
    assert not [k for k in vars(head) if k.endswith("_")]
    info = head.describe()
    assert info["level1"]["head"] == "softmax_cam"
    assert "out-of-fold" in info["level1"]["training_inputs"]
    assert "logit" in info["level1"]["representation"]
    assert info["level2"]["model"] == "lightgbm.LGBMClassifier"
    assert info["level2"]["learning_rate"] == 0.05 and info["level2"]["num_leaves"] == 7
    # plugin contract 2: the Head base class refuses both before fit, whatever the head returns
    with pytest.raises(NotFittedError):
        head.keras_model()
    with pytest.raises(NotFittedError):
        head.predict_proba(np.zeros((2, 4), np.float32))


# -- it learns ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def informative():
    X, y = two_blocks(700, seed=1)
    train, val, test = slice(0, 400), slice(400, 500), slice(500, 700)
    head = LightGBMStackingHead(folds=3).fit(
        X[train], y[train], validation=(X[val], y[val]), optimizer=AdamOptimizer(0.02),
        epochs=15, batch_size=64, seed=3, blocks=BLOCKS,
    )
    return head, X[test], y[test]


def test_weak_blocks_stack_better_than_chance(informative):
    head, X_test, y_test = informative
    p = head.predict_proba(X_test)
    assert p.shape == (len(X_test),) and p.dtype == np.float64
    assert roc_auc_score(y_test, p) > 0.75
    assert log_loss(y_test, p) < 0.62  # chance is ln 2 = 0.693
    # each block is weak on its own; level 2 combines them
    singles = [roc_auc_score(y_test, z) for z in head.level1_logits(X_test).T]
    assert all(0.6 < s < 0.85 for s in singles), singles
    assert roc_auc_score(y_test, p) > max(singles) - 0.02


def test_fitted_state_and_history(informative):
    head, X_test, _ = informative
    assert [name for name, _ in head.blocks_] == ["resnet50", "xception"]
    assert head.keras_model() is None  # fitted, and still no Keras graph: not exportable
    assert set(head.base_heads_) == {"resnet50", "xception"}
    assert all(isinstance(h, DropoutSigmoidHead) for h in head.base_heads_.values())
    assert head.oof_logits_.shape == (400, 2) and np.isfinite(head.oof_logits_).all()
    assert set(head.oof_log_loss_) == {"resnet50", "xception"}
    assert set(head.history_) == {"loss", "val_loss", "inner_val_loss"}
    assert len(head.history_["loss"]) == len(head.history_["val_loss"]) == head.best_iteration_ >= 1
    assert len(head.history_["inner_val_loss"]) >= head.best_iteration_
    assert all(type(v) is float for v in head.history_["loss"])
    assert head.history_["loss"][-1] < head.history_["loss"][0]
    # early stopping: LightGBM predicts with the best iteration
    best = head.model_.predict_proba(head.level1_logits(X_test), num_iteration=head.best_iteration_)
    np.testing.assert_allclose(head.predict_proba(X_test), best[:, 1])
    assert head.predict_proba(X_test[:0]).shape == (0,)
    np.testing.assert_allclose(head.predict_proba(X_test[:7]), head.predict_proba(X_test)[:7])


# -- item 2 of issue 20: early stopping on its own rows, and refit reuses the chosen tree count ------
@pytest.fixture(scope="module")
def overfitting():
    """Fast-learning level 2 with many trees: early stopping has something to stop."""
    X, y = two_blocks(500, seed=5)
    params = dict(folds=3, n_estimators=300, gbm_learning_rate=0.3, early_stopping_rounds=10)
    kwargs = dict(optimizer=AdamOptimizer(0.02), epochs=6, batch_size=64, seed=3, blocks=BLOCKS)
    return X, y, params, kwargs


def test_the_ranking_rows_never_choose_the_tree_count(overfitting):
    """The runner's validation rows are the rows a run is ranked on. The stacker used to early-stop
    on them; now they change nothing: the fit is the same with them, with their labels shuffled,
    or without them."""
    X, y, params, kwargs = overfitting
    tr, va = slice(0, 350), slice(350, 500)
    plain = LightGBMStackingHead(**params).fit(X[tr], y[tr], **kwargs)
    watched = LightGBMStackingHead(**params).fit(X[tr], y[tr], validation=(X[va], y[va]), **kwargs)
    lied_to = LightGBMStackingHead(**params).fit(
        X[tr], y[tr], validation=(X[va], np.random.default_rng(0).permutation(y[va])), **kwargs)
    assert 1 <= plain.best_iteration_ < 300  # it did stop early, on its own rows
    assert watched.best_iteration_ == lied_to.best_iteration_ == plain.best_iteration_
    np.testing.assert_array_equal(watched.predict_proba(X[va]), plain.predict_proba(X[va]))
    np.testing.assert_array_equal(lied_to.predict_proba(X[va]), plain.predict_proba(X[va]))
    assert "val_loss" in watched.history_ and "val_loss" not in plain.history_  # a curve, nothing more


def test_refit_params_reproduce_the_chosen_tree_count(overfitting):
    X, y, params, kwargs = overfitting
    head = LightGBMStackingHead(**params).fit(X[:350], y[:350], **kwargs)
    fixed = head.refit_params()
    assert fixed == {"n_estimators": head.best_iteration_, "early_stopping_rounds": None}
    again = LightGBMStackingHead(**{**params, **fixed}).fit(X[:350], y[:350], **kwargs)
    assert again.best_iteration_ == head.best_iteration_ == again.model_.n_estimators
    np.testing.assert_array_equal(again.predict_proba(X[350:]), head.predict_proba(X[350:]))
    # on more rows (a refit on train + validation) the same number of trees is trained, not 300
    more = LightGBMStackingHead(**{**params, **fixed}).fit(X, y, **kwargs)
    assert more.model_.booster_.num_trees() == head.best_iteration_
    with pytest.raises(NotFittedError):
        LightGBMStackingHead().refit_params()


# -- leakage --------------------------------------------------------------------------------------------
class LeakyStacking(LightGBMStackingHead):
    """Deliberately wrong: level-2 training inputs are in-sample predictions of a head fitted on
    every training row (the model saw the sample it predicts)."""

    name = "leaky_stacking"

    def _level1_training_inputs(self, base_cls, Xb, y, fit_kwargs, seed):
        return self._fit_base(base_cls, Xb, y, fit_kwargs).predict_proba(Xb)


@pytest.fixture(scope="module")
def shuffled():
    """Label-shuffled control: wide blocks and few rows, so a first-level head can memorise noise."""
    X, y = two_blocks(360, width=120, seed=2, shuffle_labels=True)
    kwargs = dict(optimizer=AdamOptimizer(0.3), epochs=10, batch_size=160, seed=4,
                  blocks=[("a", 120), ("b", 120)])
    params = dict(folds=2, base_params={"dropout": 0.1})
    honest = LightGBMStackingHead(**params).fit(X[:160], y[:160], **kwargs)
    leaky = LeakyStacking(**params).fit(X[:160], y[:160], **kwargs)
    return honest, leaky, X[160:], y[160:], y[:160]


def test_no_leakage_on_shuffled_labels(shuffled):
    honest, _, X_test, y_test, y_train = shuffled
    # the level-2 training inputs are out-of-fold: no better than chance on noise (the AUC of 160
    # random scores has a standard deviation of about 0.046 around 0.5)
    aucs = [roc_auc_score(y_train, z) for z in honest.oof_logits_.T]
    assert max(aucs) < 0.65, aucs
    # and the held-out prediction is no better than chance either (ln 2 = 0.693)
    assert log_loss(y_test, honest.predict_proba(X_test)) >= 0.66


def test_leakage_would_be_detected(shuffled):
    honest, leaky, X_test, y_test, y_train = shuffled
    # in-sample level-1 predictions look informative on pure noise: the same AUC check that the
    # honest stacker passes above fails clearly for the leaky variant
    aucs = [roc_auc_score(y_train, z) for z in leaky.oof_logits_.T]
    assert min(aucs) > 0.85, aucs
    # level 2 trusts the leaked inputs: near-zero training loss, and worse than chance on new data
    assert leaky.history_["loss"][-1] < honest.history_["loss"][-1] - 0.2
    assert log_loss(y_test, leaky.predict_proba(X_test)) > 0.8


# -- blocks ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "blocks, message",
    [
        ([("a", 12), ("b", 11)], "add up to 23 columns, but X has 24"),
        ([("a", 12), ("b", 13)], "add up to 25 columns"),
        ([("a", 24), ("b", 0)], "width must be a positive integer"),
        ([("a", 12.0), ("b", 12)], "width must be a positive integer"),
        ([("a", 12, 1), ("b", 12)], "must be a \\(backbone name, width\\) pair"),
        ([(3, 12), ("b", 12)], "backbone name must be a non-empty string"),
        ([], "non-empty list"),
        ("a", "non-empty list"),
    ],
)
def test_bad_blocks_are_config_errors(blocks, message):
    X, y = two_blocks(40, seed=5)
    with pytest.raises(ConfigError, match=message):
        LightGBMStackingHead().fit(X, y, epochs=1, blocks=blocks)


def test_check_blocks_and_logits():
    assert check_blocks(None, 7) == [("features", 7)]
    assert check_blocks((("a", 3), ["b", np.int64(4)]), 7) == [("a", 3), ("b", 4)]
    np.testing.assert_allclose(logit(np.array([0.5, 0.0, 1.0]), EPS), [0.0, -16.118, 16.118], atol=1e-3)


@pytest.mark.parametrize(
    "params, kwargs, message",
    [
        ({"folds": 1}, {}, "folds must be an integer >= 2"),
        ({"folds": 30}, {}, "30-fold stacking needs at least 30 samples of each class"),
        ({"base_head": "nope"}, {}, "unknown head 'nope'"),
        ({"base_head": "lightgbm_stacking"}, {}, "cannot be 'lightgbm_stacking' itself"),
        ({"base_params": {"l2": 1.0}}, {}, "bad base_params for 'dropout_sigmoid'"),
        ({"gbm_learning_rate": 0}, {}, "gbm_learning_rate must be > 0"),
        ({"subsample": 1.5}, {}, "subsample must be a number"),
        ({}, {"validation": (np.zeros((3, 5)), np.zeros(3))}, "validation X has 5 features"),
    ],
)
def test_bad_parameters(params, kwargs, message):
    from catsdogs.errors import CatsdogsError

    X, y = two_blocks(40, seed=5)
    with pytest.raises(CatsdogsError, match=message):
        LightGBMStackingHead(**params).fit(X, y, epochs=1, blocks=BLOCKS, **kwargs)


# -- reproducibility -------------------------------------------------------------------------------------
def test_reproducible_with_the_same_seed():
    X, y = two_blocks(120, seed=6)
    kwargs = dict(optimizer=AdamOptimizer(0.05), epochs=3, seed=9, blocks=BLOCKS)
    a = LightGBMStackingHead(folds=2).fit(X[:80], y[:80], **kwargs)
    b = LightGBMStackingHead(folds=2).fit(X[:80], y[:80], **kwargs)
    np.testing.assert_allclose(a.oof_logits_, b.oof_logits_, atol=1e-6)
    np.testing.assert_allclose(a.predict_proba(X[80:]), b.predict_proba(X[80:]), atol=1e-6)
    assert a.history_ == b.history_
