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
