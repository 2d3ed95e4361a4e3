"""Grouped training (catsdogs.runs.multifit): every run of a group ends exactly where training it
alone ends (weights, optimizer state, dropout seed state, history, predictions), and the runner's
leaderboard is the same with grouping on or off."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402
from conftest import make_kaggle  # noqa: E402

from catsdogs.builtin.heads import DropoutSigmoidHead, SoftmaxCamHead  # noqa: E402
from catsdogs.builtin.optimizers import (  # noqa: E402
    AdadeltaOptimizer,
    AdamOptimizer,
    RAdamOptimizer,
    SGDOptimizer,
)
from catsdogs.errors import ConfigError  # noqa: E402
from catsdogs.runs.multifit import (  # noqa: E402
    GROUPED_ENV,
    Member,
    fit_group,
    groupable,
    predict_group,
)

EPOCHS, BATCH, SEED = 3, 32, 11


@pytest.fixture(scope="module")
def blocks():
    """Three feature blocks with some class signal; 150 rows."""
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 150)
    sign = np.where(y == 1, 1.0, -1.0)[:, None]
    widths = {"a": 7, "b": 5, "c": 3}
    X = {name: (rng.standard_normal((150, w)) + 0.4 * sign * rng.choice([-1, 1], w))
         .astype(np.float32) for name, w in widths.items()}
    return X, y


def single(member: Member, X, y, tr, va):
    """The member trained alone, as the runner trains one run."""
    fused = np.concatenate([X[b] for b in member.combination], axis=1)
    head = type(member.head)(**member.head.get_params())
    optimizer = type(member.optimizer)(learning_rate=member.optimizer.learning_rate)
    return head.fit(fused[tr], y[tr], validation=(fused[va], y[va]), optimizer=optimizer,
                    epochs=EPOCHS, batch_size=BATCH, seed=SEED), fused


def assert_same(grouped, alone, fused, va, atol=1e-6):
    assert grouped.n_features_in_ == alone.n_features_in_
    assert list(grouped.history_) == list(alone.history_) == \
        ["accuracy", "loss", "val_accuracy", "val_loss"]
    for key in alone.history_:  # validation sums block by block: float32 round-off, relative
        np.testing.assert_allclose(grouped.history_[key], alone.history_[key], atol=atol,
                                   rtol=1e-6, err_msg=key)
    for wa, wb in zip(grouped.model_.get_weights(), alone.model_.get_weights(), strict=True):
        np.testing.assert_allclose(wa, wb, atol=atol, rtol=0)
    for va_, vb in zip(grouped.model_.optimizer.variables, alone.model_.optimizer.variables,
                       strict=True):
        np.testing.assert_allclose(np.asarray(va_), np.asarray(vb), atol=atol, rtol=0)
    np.testing.assert_allclose(grouped.predict_proba(fused[va]), alone.predict_proba(fused[va]),
                               atol=atol, rtol=0)
    dropout = alone.model_.get_layer("dropout")
    if dropout.rate > 0:  # the seed generator advanced one step per batch in both
        np.testing.assert_array_equal(
            np.asarray(grouped.model_.get_layer("dropout").seed_generator.state.value),
            np.asarray(dropout.seed_generator.state.value))


def grid(split: str) -> list[Member]:
    """Both built-in Keras heads, adam and adadelta (learning rate 1.0), combinations in and out of
    block order (two of one width), dropout rates 0.5, 0.3 and 0 (kfold: the first three)."""
    members = [
        Member(DropoutSigmoidHead(dropout=0.5), AdamOptimizer(0.01), ("a",)),
        Member(SoftmaxCamHead(dropout=0.3, l2=0.01), AdadeltaOptimizer(1.0), ("c", "a")),
        Member(DropoutSigmoidHead(dropout=0.5), AdadeltaOptimizer(1.0), ("a", "b", "c")),
        Member(SoftmaxCamHead(dropout=0.5), AdamOptimizer(0.01), ("b", "c")),
        Member(DropoutSigmoidHead(dropout=0.0), AdamOptimizer(0.01), ("b",)),
    ]
    return members if split == "holdout" else members[:3]


@pytest.mark.slow
@pytest.mark.parametrize("split", ["holdout", "kfold"])
def test_grouped_runs_equal_runs_alone(blocks, split):
    """Every member: the weights, optimizer slots, dropout seed state, history and validation
    predictions of its own fit. kfold: one group per fold, as the runner does it."""
    X, y = blocks
    rows = np.random.default_rng(5).permutation(150)
    if split == "holdout":  # 115 rows: the last batch is partial
        folds = [(np.sort(rows[:115]), np.sort(rows[115:]))]
    else:
        parts = np.array_split(rows, 2)
        folds = [(np.sort(parts[1]), np.sort(parts[0])), (np.sort(parts[0]), np.sort(parts[1]))]
    for tr, va in folds:
        members = grid(split)
        heads = fit_group(members, X, y, train_rows=tr, val_rows=va, epochs=EPOCHS,
                          batch_size=BATCH, seed=SEED)
        assert [type(h) for h in heads] == [type(m.head) for m in members]
        for member, head in zip(members, heads, strict=True):
            assert head is member.head
            alone, fused = single(member, X, y, tr, va)
            assert_same(head, alone, fused, va)
        # the weights moved: the comparison is not between two untrained models
        initial = DropoutSigmoidHead()._compiled_model(7, AdamOptimizer(0.01), SEED).get_weights()
        assert not np.allclose(heads[0].model_.get_weights()[0], initial[0], atol=1e-3)


@pytest.mark.slow
def test_grouped_radam_and_sgd_runs_equal_runs_alone(blocks):
    """radam (Keras has none: catsdogs' own optimizer class) and sgd (Nesterov momentum), mixed
    with adam in one group: every member ends with its single fit's weights, optimizer slots,
    dropout seed state, history and predictions."""
    X, y = blocks
    rows = np.random.default_rng(6).permutation(150)
    tr, va = np.sort(rows[:115]), np.sort(rows[115:])
    members = [
        Member(DropoutSigmoidHead(dropout=0.5), RAdamOptimizer(0.01), ("a", "b")),
        Member(SoftmaxCamHead(dropout=0.3, l2=0.01), SGDOptimizer(0.05), ("c", "a")),
        Member(DropoutSigmoidHead(dropout=0.5), SGDOptimizer(0.05), ("b",)),
        Member(SoftmaxCamHead(dropout=0.5), RAdamOptimizer(0.01), ("a", "b", "c")),
        Member(DropoutSigmoidHead(dropout=0.5), AdamOptimizer(0.01), ("a", "b")),
    ]
    heads = fit_group(members, X, y, train_rows=tr, val_rows=va, epochs=EPOCHS,
                      batch_size=BATCH, seed=SEED)
    for member, head in zip(members, heads, strict=True):
        alone, fused = single(member, X, y, tr, va)
        assert type(alone.model_.optimizer) is type(head.model_.optimizer)
        assert_same(head, alone, fused, va)
    # the optimizers act: radam's run and adam's run on the same columns end apart
    assert not np.allclose(heads[0].model_.get_weights()[0], heads[4].model_.get_weights()[0],
                           atol=1e-4)


class ShallowHead(DropoutSigmoidHead):
    """A plugin-style head whose model is not Input -> Dropout -> Dense."""

    name = "shallow_test"

    def _build_model(self, n_features):
        import keras

        features = keras.Input((n_features,), name="features")
        hidden = keras.layers.Dense(3, activation="relu")(features)
        out = keras.layers.Dense(1, activation="sigmoid", name="prediction")(hidden)
        return keras.Model(features, out)


@pytest.mark.slow
def test_predict_group_equals_predict_proba_on_the_fused_columns(blocks):
    """Block-wise prediction (no combination fused) gives each head's own P(dog), sigmoid and
    softmax heads, combinations in and out of block order, on chosen rows; heads that cannot be
    predicted that way (or that ``only`` leaves out) get None."""
    X, y = blocks
    tr, va = np.arange(100), np.arange(100, 150)
    members = grid("holdout")
    members.append(Member(ShallowHead(), AdamOptimizer(0.01), ("a", "b")))
    heads = fit_group(members, X, y, train_rows=tr, val_rows=va, epochs=2, batch_size=BATCH,
                      seed=SEED)
    combinations = [m.combination for m in members]
    for rows in (va, None):
        got = predict_group(heads, combinations, X, rows)
        for member, head, p in zip(members[:-1], heads, got, strict=False):
            fused = np.concatenate([X[b] for b in member.combination], axis=1)
            want = head.predict_proba(fused if rows is None else fused[rows])
            assert p is not None and p.dtype == np.float64 and p.shape == want.shape
            np.testing.assert_allclose(p, want, atol=1e-6, rtol=0)
        assert got[-1] is None  # the shallow head's model is not Input -> Dropout -> Dense
    only = [i % 2 == 0 for i in range(len(members))]
    some = predict_group(heads, combinations, X, va, only)
    assert [p is not None for p in some[:-1]] == only[:-1]
    assert not np.allclose(got[0], got[2])  # different runs really predict differently


@pytest.mark.slow
def test_members_that_cannot_join_are_fitted_alone(blocks):
    X, y = blocks
    tr, va = np.arange(100), np.arange(100, 150)
    keras_loop = DropoutSigmoidHead()
    keras_loop.training_loop = "keras"
    assert not groupable(keras_loop) and groupable(DropoutSigmoidHead())
    members = [Member(ShallowHead(), AdamOptimizer(0.01), ("a", "b")),
               Member(keras_loop, AdamOptimizer(0.01), ("c",)),
               Member(DropoutSigmoidHead(), AdamOptimizer(0.01), ("c",))]
    heads = fit_group(members, X, y, train_rows=tr, val_rows=va, epochs=2, batch_size=BATCH,
                      seed=SEED)
    for member, head in zip(members, heads, strict=True):
        fused = np.concatenate([X[b] for b in member.combination], axis=1)
        alone = type(member.head)()
        alone.training_loop = member.head.training_loop
        alone.fit(fused[tr], y[tr], validation=(fused[va], y[va]), optimizer=AdamOptimizer(0.01),
                  epochs=2, batch_size=BATCH, seed=SEED)
        for wa, wb in zip(head.model_.get_weights(), alone.model_.get_weights(), strict=True):
            np.testing.assert_allclose(wa, wb, atol=1e-6, rtol=0)
    assert len(heads[0].model_.get_weights()) == 4  # the shallow model really was trained


def test_bad_input_is_one_clear_error(blocks):
    X, y = blocks
    member = [Member(DropoutSigmoidHead(), AdamOptimizer(), ("a", "z"))]
    tr = np.arange(100)
    with pytest.raises(ConfigError, match="no feature block 'z'"):
        fit_group(member, X, y, train_rows=tr)
    bad = dict(X, a=X["a"].copy())
    bad["a"][7, 2] = np.nan
    with pytest.raises(ConfigError, match="block 'a' contains NaN"):
        fit_group([Member(DropoutSigmoidHead(), AdamOptimizer(), ("a",))], bad, y, train_rows=tr)
    # a NaN in a row that is not used does not matter, as in a fit on the rows alone
    fit_group([Member(DropoutSigmoidHead(), AdamOptimizer(), ("a",))], bad, y,
              train_rows=np.arange(8, 40), epochs=1)
    with pytest.raises(ConfigError, match="val_rows holds indices outside 0..149"):
        fit_group(member[:0], X, y, train_rows=tr, val_rows=np.array([150]))
    with pytest.raises(ConfigError, match="block 'b' must be a float32"):
        fit_group([Member(DropoutSigmoidHead(), AdamOptimizer(), ("b",))],
                  dict(X, b=X["b"].astype(np.float64)), y, train_rows=tr)


def test_tta_is_one_average_of_the_two_views():
    """runs.features.tta_average: what the runner, grouped runs and refits all average with."""
    from catsdogs.runs.features import predict_tta, tta_average

    plain, flipped = np.array([0.2, 0.9], np.float32), np.array([0.4, 0.5], np.float32)
    out = tta_average(plain, flipped)
    assert out.dtype == np.float64 and out.tolist() == pytest.approx([0.3, 0.7], rel=1e-7)
    assert tta_average(plain, None) is plain and tta_average(None, flipped) is None

    class Head:  # predicts its rows' first column
        def predict_proba(self, X):
            return X[:, 0]

    X = np.array([[0.2], [0.9]], np.float32)
    np.testing.assert_array_equal(predict_tta(Head(), X), X[:, 0].astype(np.float64))
    np.testing.assert_array_equal(predict_tta(Head(), X, X[::-1]), tta_average(X[:, 0], X[::-1, 0]))


# -- the runner ------------------------------------------------------------------------------------
def _experiment(tmp_path, name, **changes):
    from catsdogs.experiment.spec import load_experiment

    doc = {"data": str(tmp_path / "data"), "output": str(tmp_path / f"out-{name}"),
           "cache_dir": str(tmp_path / "cache"), "weights": "none",
           "backbones": [{"name": "resnet50", "image_size": 32},
                         {"name": "xception", "image_size": 71}],
           "combinations": "all", "heads": ["dropout_sigmoid", "softmax_cam"],
           "optimizers": [{"name": "adam", "learning_rate": 0.01},
                          {"name": "adadelta", "learning_rate": 1.0}],
           "epochs": 3, "batch_size": 8, "seed": 4, **changes}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return load_experiment(path)


@pytest.mark.slow
@pytest.mark.parametrize("changes", [{"validation": {"holdout": 0.25}},
                                     {"validation": {"kfold": 2}},
                                     {"validation": {"holdout": 0.25}, "tta": True}],
                         ids=["holdout", "kfold", "holdout-tta"])
def test_runner_leaderboard_is_the_same_grouped_or_not(tmp_path, monkeypatch, changes):
    from catsdogs.runs.runner import run_experiment

    make_kaggle(tmp_path / "data", n_per_class=14, n_test=4)
    monkeypatch.setenv(GROUPED_ENV, "0")
    alone = run_experiment(_experiment(tmp_path, "alone", **changes), progress=False)
    monkeypatch.delenv(GROUPED_ENV)
    grouped = run_experiment(_experiment(tmp_path, "grouped", **changes), progress=False)
    assert all(r.tta == bool(changes.get("tta")) for r in alone.records + grouped.records)
    a, g = (pd.read_csv(r.out_dir / "leaderboard.csv") for r in (alone, grouped))
    assert len(a) == 12 and a["run_id"].tolist() == g["run_id"].tolist()  # same ranking
    for column in ("val_logloss", "val_logloss_clipped", "val_accuracy"):
        np.testing.assert_allclose(g[column], a[column], atol=1e-6, rtol=0, err_msg=column)
    for rec_a in alone.records:
        rec_g = next(r for r in grouped.records if r.run_id == rec_a.run_id)
        for ha, hg in zip(rec_a.history, rec_g.history, strict=True):
            for key in ha:  # val_loss of large logits (random weights): float32 round-off
                np.testing.assert_allclose(hg[key], ha[key], atol=1e-6, rtol=1e-6)
        pa, pg = (pd.read_csv(r.out_dir / "runs" / rec_a.run_id / "test_predictions.csv")
                  for r in (alone, grouped))
        np.testing.assert_allclose(pg["p_dog"], pa["p_dog"], atol=1e-6, rtol=0)
