import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from catsdogs.builtin.heads import (  # noqa: E402
    DropoutSigmoidHead,
    NotFittedError,
    SoftmaxCamHead,
)
from catsdogs.builtin.linear import LogisticHead  # noqa: E402
from catsdogs.builtin.optimizers import AdadeltaOptimizer, AdamOptimizer  # noqa: E402
from catsdogs.errors import CatsdogsError, ConfigError  # noqa: E402
from catsdogs.plugins import get_registry  # noqa: E402
from catsdogs.testing import make_separable_features  # noqa: E402

HEADS = [DropoutSigmoidHead, SoftmaxCamHead]
EPOCHS = 30


@pytest.fixture(scope="module")
def data():
    X, y = make_separable_features(n=240, d=16, seed=3)
    return X[:200], y[:200], X[200:], y[200:]


@pytest.fixture(scope="module")
def fitted(data):
    """Each head fitted once with validation data, shared by the read-only tests."""
    X, y, X_val, y_val = data
    return {
        cls: cls().fit(X, y, validation=(X_val, y_val), optimizer=AdamOptimizer(0.01),
                       epochs=EPOCHS, seed=11)
        for cls in HEADS
    }


def test_registered():
    registry = get_registry()
    assert registry.head("dropout_sigmoid") is DropoutSigmoidHead
    assert registry.head("softmax_cam") is SoftmaxCamHead
    assert SoftmaxCamHead.cam_capable and not DropoutSigmoidHead.cam_capable
    assert DropoutSigmoidHead.uses_optimizer and SoftmaxCamHead.uses_optimizer


def test_hyper_parameters_are_stored_only():
    assert DropoutSigmoidHead().get_params() == {"dropout": 0.5}
    assert SoftmaxCamHead().get_params() == {"dropout": 0.5, "l2": 1e-4}
    head = SoftmaxCamHead(dropout=0.2, l2=0.0)
    assert head.clone().get_params() == {"dropout": 0.2, "l2": 0.0}
    # out-of-range values are accepted by __init__ and rejected by fit (scikit-learn style)
    assert DropoutSigmoidHead(dropout=7).dropout == 7


@pytest.mark.parametrize("cls", HEADS)
def test_learns_separable_data(cls, data, fitted):
    X, y, X_val, y_val = data
    head = fitted[cls]
    p = head.predict_proba(X)
    assert p.shape == (len(X),) and p.dtype == np.float64
    assert np.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()
    assert ((p > 0.5) == y).mean() > 0.95
    assert ((head.predict_proba(X_val) > 0.5) == y_val).mean() > 0.9
    assert head.n_features_in_ == X.shape[1]


@pytest.mark.parametrize("cls", HEADS)
def test_history_with_validation(cls, fitted):
    history = fitted[cls].history_
    assert set(history) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    for values in history.values():
        assert len(values) == EPOCHS
        assert all(type(v) is float for v in values)
    assert history["loss"][-1] < history["loss"][0]


@pytest.mark.parametrize("cls", HEADS)
def test_reproducible_and_seed_dependent(cls, data):
    X, y, _, _ = data
    kwargs = dict(optimizer=AdadeltaOptimizer(learning_rate=1.0), epochs=3, batch_size=32)
    a = cls().fit(X, y, seed=5, **kwargs)
    b = cls().fit(X, y, seed=5, **kwargs)
    c = cls().fit(X, y, seed=6, **kwargs)
    assert set(a.history_) == {"loss", "accuracy"}  # no validation, no val_ metrics
    np.testing.assert_allclose(a.predict_proba(X), b.predict_proba(X), atol=1e-6)
    assert a.history_ == b.history_
    assert not np.allclose(a.predict_proba(X), c.predict_proba(X), atol=1e-4)


def test_default_optimizer_is_adam(data):
    X, y, _, _ = data
    head = DropoutSigmoidHead().fit(X, y, epochs=1)
    assert isinstance(head.model_.optimizer, keras.optimizers.Adam)
    assert len(head.history_["loss"]) == 1


@pytest.mark.parametrize("cls", HEADS)
def test_keras_model_outputs_p_dog(cls, data, fitted, tmp_path):
    X, _, _, _ = data
    head = fitted[cls]
    model = head.keras_model()
    assert model.inputs[0].name == "features"
    assert tuple(model.inputs[0].shape) == (None, X.shape[1])
    assert model.output_names == ["prediction"]
    assert tuple(model.outputs[0].shape) == (None, 1)
    p = head.predict_proba(X)
    np.testing.assert_allclose(np.asarray(model(X, training=False))[:, 0], p, atol=1e-6)
    # the export uses built-in layers only: it saves and loads without custom objects
    path = tmp_path / "head.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(np.asarray(loaded(X, training=False))[:, 0], p, atol=1e-6)


def test_softmax_cam_dense_weights(data, fitted):
    X, _, _, _ = data
    head = fitted[SoftmaxCamHead]
    kernel, bias = head.dense_weights()
    assert kernel.shape == (X.shape[1], 2) and bias.shape == (2,)
    assert kernel.dtype == np.float32
    # the weights are the whole model at inference time: softmax(X @ kernel + bias)[:, 1]
    logits = X.astype(np.float64) @ kernel + bias
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(probs[:, 1], head.predict_proba(X), atol=1e-5)
    dense = head.model_.get_layer("prediction")
    assert dense.units == 2 and dense.kernel_regularizer is not None
    assert head.keras_model().get_layer("softmax_cam").get_layer("prediction") is dense


def test_softmax_cam_without_l2_has_no_regularizer(data):
    X, y, _, _ = data
    head = SoftmaxCamHead(l2=0).fit(X, y, epochs=1)
    assert head.model_.get_layer("prediction").kernel_regularizer is None


@pytest.mark.parametrize("cls", HEADS)
def test_not_fitted(cls, data):
    X, _, _, _ = data
    head = cls()
    for call in (lambda: head.predict_proba(X), head.keras_model):
        with pytest.raises(NotFittedError, match="head not fitted; call fit\\(\\) first"):
            call()
    assert issubclass(NotFittedError, CatsdogsError) and issubclass(NotFittedError, RuntimeError)
    if cls is SoftmaxCamHead:
        with pytest.raises(NotFittedError):
            head.dense_weights()


def test_predict_proba_in_batches_and_empty(data, fitted, monkeypatch):
    import catsdogs.builtin.heads as heads_module

    X, _, _, _ = data
    head = fitted[SoftmaxCamHead]
    whole = head.predict_proba(X)
    monkeypatch.setattr(heads_module, "PREDICT_BATCH_SIZE", 7)
    np.testing.assert_allclose(head.predict_proba(X), whole, atol=1e-6)
    assert head.predict_proba(np.zeros((0, X.shape[1]), np.float32)).shape == (0,)
    # float64 and integer features are converted
    np.testing.assert_allclose(head.predict_proba(X.astype(np.float64)), whole, atol=1e-6)


X0, Y0 = make_separable_features(n=20, d=4, seed=0)


@pytest.mark.parametrize(
    "X, y, kwargs, message",
    [
        (X0[:, 0], Y0, {}, "X must be 2-D"),
        (X0.astype(str), Y0, {}, "real numbers"),
        (np.where(X0 > 1, np.nan, X0), Y0, {}, "NaN or infinite"),
        (X0[:0], Y0[:0], {}, "X has no rows"),
        (X0, Y0[:-1], {}, "y has 19 labels but the features have 20 rows"),
        (X0, Y0 + 1, {}, "only 0 \\(cat\\) and 1 \\(dog\\); found 2"),
        (X0, Y0 * 0.5, {}, "found 0.5"),
        (X0, Y0[:, None], {}, "y must be 1-D"),
        (X0, Y0, {"validation": (X0[:, :3], Y0)}, "validation X has 3 features"),
        (X0, Y0, {"validation": (X0, Y0[:5])}, "validation y has 5 labels"),
        (X0, Y0, {"validation": X0}, "validation must be a pair"),
        (X0, Y0, {"epochs": 0}, "epochs must be an integer >= 1"),
        (X0, Y0, {"batch_size": 2.5}, "batch_size must be an integer"),
        (X0, Y0, {"seed": -1}, "seed must be an integer >= 0 and <= 4294967295"),
        (X0, Y0, {"optimizer": "adam"}, "optimizer must be a catsdogs Optimizer"),
    ],
)
@pytest.mark.parametrize("cls", HEADS)
def test_bad_input_is_a_config_error(cls, X, y, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        cls().fit(X, y, **{"epochs": 1, **kwargs})


@pytest.mark.parametrize(
    "head, message",
    [
        (DropoutSigmoidHead(dropout=1.0), "dropout_sigmoid: dropout must be a number >= 0.0 and < 1.0"),
        (DropoutSigmoidHead(dropout="half"), "dropout must be a number"),
        (SoftmaxCamHead(l2=-1e-3), "softmax_cam: l2 must be a number >= 0.0"),
    ],
)
def test_bad_hyper_parameters_are_rejected_by_fit(head, message):
    with pytest.raises(ConfigError, match=message):
        head.fit(X0, Y0, epochs=1)


def test_bool_labels_and_wrong_feature_count_at_predict(data, fitted):
    X, _, _, _ = data
    head = fitted[DropoutSigmoidHead]
    with pytest.raises(ConfigError, match="X has 4 features per row, but the head was fitted on 16"):
        head.predict_proba(X0)
    fitted_bool = DropoutSigmoidHead().fit(X0, Y0.astype(bool), epochs=1)
    assert fitted_bool.predict_proba(X0).shape == (20,)


# -- logistic: the linear probe ----------------------------------------------------------------------
def test_logistic_registered_and_takes_no_optimizer():
    assert get_registry().head("logistic") is LogisticHead
    assert not LogisticHead.uses_optimizer and not LogisticHead.cam_capable
    head = LogisticHead()
    assert head.get_params() == {"c_values": None, "folds": 5, "max_iter": 1000, "tol": 1e-4}
    assert LogisticHead.tuning_space().entries == {}  # its own inner CV chooses the strength


def _inner_cv_by_hand(X, y, grid, folds, seed):
    """Mean held-out log loss per C: standardise, then one scikit-learn fit per fold and C."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    Z = (X - X.mean(axis=0, dtype=np.float64)) / X.std(axis=0, dtype=np.float64)
    out = []
    for c in grid:
        losses = []
        for tr, va in StratifiedKFold(folds, shuffle=True, random_state=seed).split(Z, y):
            model = LogisticRegression(C=c, max_iter=5000, tol=1e-10).fit(Z[tr], y[tr])
            p = np.clip(model.predict_proba(Z[va])[:, 1], 1e-15, 1 - 1e-15)
            losses.append(-np.mean(y[va] * np.log(p) + (1 - y[va]) * np.log1p(-p)))
        out.append(np.mean(losses))
    return np.array(out)


def test_logistic_strength_is_chosen_by_inner_cv_on_the_training_rows_only(data):
    """The chosen C minimises the inner cross-validated log loss, computed on the training rows
    (checked against a fit per fold by hand); the validation rows change nothing but the
    recorded val_loss (labels flipped: same weights)."""
    X, y, X_val, y_val = data
    grid = [1e-3, 1e-2, 1e-1, 1.0]
    head = LogisticHead(c_values=grid, folds=4, tol=1e-10).fit(X, y, validation=(X_val, y_val),
                                                               seed=3)
    by_hand = _inner_cv_by_hand(X, y, grid, 4, 3)
    np.testing.assert_allclose(head.cv_logloss_, by_hand, rtol=2e-3)
    assert head.C_ == grid[int(np.argmin(by_hand))]
    assert head.history_["inner_cv_logloss"] == head.cv_logloss_
    flipped = LogisticHead(c_values=grid, folds=4, tol=1e-10).fit(
        X, y, validation=(X_val, 1 - y_val), seed=3)
    assert flipped.C_ == head.C_
    np.testing.assert_array_equal(flipped.coef_, head.coef_)
    assert flipped.history_["val_loss"][0] > head.history_["val_loss"][0]


def test_logistic_regularises_noise_and_not_signal():
    """Labels that are pure noise: the strongest regularisation of the grid wins (P(dog) near the
    base rate); labels that are a linear function of the features: the weakest."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, 40)).astype(np.float32)
    noise = rng.integers(0, 2, 300)
    signal = (X[:, :5].sum(axis=1) > 0).astype(int)
    grid = [1e-4, 1e-2, 1.0]
    noisy = LogisticHead(c_values=grid).fit(X, noise)
    clean = LogisticHead(c_values=grid).fit(X, signal)
    assert noisy.C_ == 1e-4 and clean.C_ == 1.0
    assert np.ptp(noisy.predict_proba(X)) < 0.05
    assert ((clean.predict_proba(X) > 0.5) == signal).mean() > 0.95


def test_logistic_keras_model_folds_the_standardisation(data, tmp_path):
    """Features with offsets and scales far from standardised: the exported Normalization + Dense
    gives predict_proba's P(dog), also after a save/load round trip."""
    X, y, X_val, _ = data
    offsets, scales = np.linspace(-5, 10, X.shape[1]), np.logspace(-1, 1, X.shape[1])
    X2 = (X * scales + offsets).astype(np.float32)
    Xv2 = (X_val * scales + offsets).astype(np.float32)
    head = LogisticHead().fit(X2, y)
    model = head.keras_model()
    assert model.inputs[0].name == "features" and model.output_names == ["prediction"]
    assert [type(layer).__name__ for layer in model.layers] == ["InputLayer", "Normalization",
                                                                 "Dense"]
    p = head.predict_proba(Xv2)
    assert p.min() < 0.1 and p.max() > 0.9
    np.testing.assert_allclose(np.asarray(model(Xv2, training=False))[:, 0], p, atol=1e-5)
    model.save(tmp_path / "head.keras")
    loaded = keras.models.load_model(tmp_path / "head.keras", safe_mode=True)
    np.testing.assert_allclose(np.asarray(loaded(Xv2, training=False))[:, 0], p, atol=1e-5)


def test_logistic_constant_column_and_not_fitted(data):
    X, y, _, _ = data
    X = np.concatenate([X, np.full((len(X), 1), 3.0, np.float32)], axis=1)
    head = LogisticHead()
    with pytest.raises(NotFittedError):
        head.predict_proba(X)
    with pytest.raises(NotFittedError):
        head.keras_model()
    head.fit(X, y)
    assert np.isfinite(head.coef_).all() and head.scale_[-1] == 1.0 and head.coef_[-1] == 0.0
    np.testing.assert_allclose(np.asarray(head.keras_model()(X))[:, 0], head.predict_proba(X),
                               atol=1e-5)


@pytest.mark.parametrize("params, message", [
    ({"c_values": []}, "logistic: c_values must be a non-empty list"),
    ({"c_values": "1e-3"}, "logistic: c_values must be a non-empty list"),
    ({"c_values": [1.0, 0.0]}, "logistic: c_values\\[1\\] must be a number > 0"),
    ({"c_values": [float("nan")]}, "logistic: c_values\\[0\\] must be a number"),
    ({"folds": 1}, "logistic: folds must be an integer >= 2"),
    ({"max_iter": 0}, "logistic: max_iter must be a positive integer"),
    ({"tol": -1.0}, "logistic: tol must be a number"),
])
def test_logistic_bad_hyper_parameters(params, message):
    with pytest.raises(ConfigError, match=message):
        LogisticHead(**params).validate_params()
    with pytest.raises(ConfigError, match=message):
        LogisticHead(**params).fit(X0, Y0)


def test_logistic_needs_two_of_each_class():
    X = np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32)
    with pytest.raises(ConfigError, match="at least 2 of each class \\(cats 1, dogs 5\\)"):
        LogisticHead().fit(X, np.array([0, 1, 1, 1, 1, 1]))


@pytest.mark.slow
def test_logistic_run_is_exported_with_its_p_dog(tmp_path):
    """A grid with the logistic head on real JPEGs and a real (tiny, seeded) backbone: the run
    saves head.keras, and the exported end-to-end Keras model predicts the run's own test
    P(dog) photo by photo."""
    import pandas as pd
    import yaml
    from conftest import make_kaggle

    from catsdogs.app.export import export_run
    from catsdogs.app.predict import open_predictor, predict_files
    from catsdogs.experiment.spec import load_experiment
    from catsdogs.runs.runner import run_experiment

    data = make_kaggle(tmp_path / "data", n_per_class=14, n_test=6)
    doc = {"data": str(data), "output": str(tmp_path / "out"), "cache_dir": str(tmp_path / "cache"),
           "weights": "none", "backbones": [{"name": "resnet50", "image_size": 32}],
           "heads": ["logistic"], "optimizers": ["adam"], "seed": 4, "postprocess": "none"}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(doc))
    result = run_experiment(load_experiment(tmp_path / "exp.yaml"), progress=False)
    (record,) = result.records
    assert record.head.name == "logistic" and record.optimizer is None
    run_dir = result.out_dir / "runs" / record.run_id
    assert (run_dir / "head.keras").is_file()
    export_run(run_dir, ["keras"], tmp_path / "export", neither=False)
    photos = sorted((data / "test").glob("*.jpg"))
    preds = predict_files(open_predictor(tmp_path / "export", "keras"), photos)
    got = pd.Series({int(p.file.rsplit("/", 1)[-1].split(".")[0]): p.p_dog for p in preds})
    want = pd.read_csv(run_dir / "test_predictions.csv").set_index("id")["p_dog"]
    assert sorted(got.index) == sorted(want.index)
    np.testing.assert_allclose(got.sort_index(), want.sort_index(), atol=1e-3)
