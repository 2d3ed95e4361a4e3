"""The compiled training loop of the Keras heads (``training_loop = "compiled"``, the default) is
``model.fit``'s maths: same model, loss (with the L2 terms), optimizer, mini-batches and history."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from catsdogs.builtin.heads import DropoutSigmoidHead, KerasHead, SoftmaxCamHead  # noqa: E402
from catsdogs.builtin.optimizers import AdadeltaOptimizer, AdamOptimizer  # noqa: E402
from catsdogs.errors import ConfigError  # noqa: E402
from catsdogs.testing import make_separable_features  # noqa: E402

HEADS = [DropoutSigmoidHead, SoftmaxCamHead]
OPTIMIZERS = [AdamOptimizer(learning_rate=0.01), AdadeltaOptimizer(learning_rate=1.0)]
KERAS_KEYS = ["accuracy", "loss", "val_accuracy", "val_loss"]  # model.fit's History, in its order


@pytest.fixture(scope="module")
def data():
    X, y = make_separable_features(n=330, d=12, seed=21, margin=0.5)
    return X[:257], y[:257], X[257:], y[257:]  # 257 = 2 * 128 + 1: the last batch has one row


def fit(cls, loop, X, y, validation=None, **kwargs):
    kwargs.setdefault("seed", 4)
    params = kwargs.pop("params", {})
    head = cls(**params)
    head.training_loop = loop
    return head.fit(X, y, validation=validation, **kwargs)


def assert_same_fit(a: KerasHead, b: KerasHead, X: np.ndarray, atol: float = 1e-5) -> None:
    assert list(a.history_) == list(b.history_)
    for key in a.history_:
        assert len(a.history_[key]) == len(b.history_[key])
        np.testing.assert_allclose(a.history_[key], b.history_[key], atol=atol, rtol=0, err_msg=key)
    for wa, wb in zip(a.model_.get_weights(), b.model_.get_weights(), strict=True):
        np.testing.assert_allclose(wa, wb, atol=atol, rtol=0)
    np.testing.assert_allclose(a.predict_proba(X), b.predict_proba(X), atol=atol, rtol=0)
    assert int(a.model_.optimizer.iterations) == int(b.model_.optimizer.iterations)


# -- the switch ----------------------------------------------------------------------------------------
def test_training_loop_is_a_class_setting_not_a_hyper_parameter(data):
    X, y, _, _ = data
    assert KerasHead.training_loop == "compiled"
    head = SoftmaxCamHead(dropout=0.2)
    head.training_loop = "keras"
    assert head.get_params() == {"dropout": 0.2, "l2": 1e-4}
    assert head.clone().training_loop == "compiled"  # clone() copies hyper-parameters only
    assert SoftmaxCamHead.training_loop == "compiled"
    head.training_loop = "fast"
    with pytest.raises(ConfigError, match="training_loop must be one of compiled, keras, got 'fast'"):
        head.fit(X, y, epochs=1)


# -- same maths ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=lambda o: o.name)
@pytest.mark.parametrize("cls", HEADS)
def test_full_batch_equals_model_fit(cls, optimizer, data):
    """Full batch and no dropout: shuffling and random masks cannot matter, so every weight, history
    value and prediction must agree with model.fit to float32 round-off."""
    X, y, X_val, y_val = data
    kwargs = dict(validation=(X_val, y_val), optimizer=optimizer, epochs=4, batch_size=len(X),
                  params={"dropout": 0.0})
    compiled = fit(cls, "compiled", X, y, **kwargs)
    reference = fit(cls, "keras", X, y, **kwargs)
    assert list(compiled.history_) == KERAS_KEYS
    assert_same_fit(compiled, reference, X_val)
    assert int(compiled.model_.optimizer.iterations) == 4
    assert type(compiled.model_.optimizer) is type(reference.model_.optimizer)
    # the weights moved: the comparison is not between two untrained models
    assert compiled.history_["loss"][-1] < compiled.history_["loss"][0]


def replay_with_train_on_batch(cls, X, y, *, optimizer, epochs, batch_size, seed, params):
    """Keras' own train step (``train_on_batch``) on the mini-batches the compiled loop uses:
    ``np.random.default_rng(seed).permutation(n)`` per epoch, consecutive slices of it."""
    head = cls(**params)
    keras.utils.set_random_seed(seed)
    model = head._build_model(X.shape[1])
    model.compile(optimizer=optimizer.build(), loss=head.loss, metrics=["accuracy"])
    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(epochs):
        permutation = rng.permutation(len(X))
        total = 0.0
        for start in range(0, len(X), batch_size):
            rows = permutation[start:start + batch_size]
            logs = model.train_on_batch(X[rows], head._targets(y[rows]), return_dict=True)
            total += logs["loss"] * len(rows)
        losses.append(total / len(X))
    return model, losses


@pytest.mark.parametrize("dropout", [0.0, 0.5])
@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=lambda o: o.name)
@pytest.mark.parametrize("cls", HEADS)
def test_mini_batches_equal_keras_train_step(cls, optimizer, dropout, data):
    """With mini-batches (the last one a single row), the compiled loop gives the weights and
    per-epoch losses of Keras' train_on_batch applied to the same batches in the same order.
    The Dropout layer draws its masks from its own seed generator in both, so they agree with
    dropout too."""
    X, y, _, _ = data
    batch_size, epochs, seed = 128, 3, 9
    head = fit(cls, "compiled", X, y, optimizer=optimizer, epochs=epochs, batch_size=batch_size,
               seed=seed, params={"dropout": dropout})
    model, losses = replay_with_train_on_batch(cls, X, y, optimizer=optimizer, epochs=epochs,
                                               batch_size=batch_size, seed=seed,
                                               params={"dropout": dropout})
    assert int(head.model_.optimizer.iterations) == epochs * 3 == int(model.optimizer.iterations)
    for wa, wb in zip(head.model_.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_allclose(wa, wb, atol=1e-5, rtol=0)
    np.testing.assert_allclose(head.history_["loss"], losses, atol=1e-5, rtol=0)


def test_last_partial_batch_is_used(data):
    """n = 2 * batch_size + 1: three updates per epoch, and the single last row moves the weights."""
    X, y, _, _ = data
    assert len(X) == 2 * 128 + 1
    kwargs = dict(optimizer=AdamOptimizer(0.01), epochs=1, batch_size=128, seed=3,
                  params={"dropout": 0.0})
    head = fit(DropoutSigmoidHead, "compiled", X, y, **kwargs)
    assert int(head.model_.optimizer.iterations) == 3
    # accuracy is counted over all 257 rows
    correct = head.history_["accuracy"][0] * len(X)
    assert abs(correct - round(correct)) < 1e-3
    # the permutation's last row is the last batch; changing only that row changes the result
    last = np.random.default_rng(3).permutation(len(X))[-1]
    X2 = X.copy()
    X2[last] *= -3.0
    other = fit(DropoutSigmoidHead, "compiled", X2, y, **kwargs)
    assert not np.allclose(head.model_.get_weights()[0], other.model_.get_weights()[0], atol=1e-7)


@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=lambda o: o.name)
def test_l2_is_part_of_loss_and_val_loss(optimizer, data):
    """softmax_cam's L2 terms (model.losses) are in the loss that is minimised and reported."""
    X, y, X_val, y_val = data
    l2 = 0.05
    kwargs = dict(validation=(X_val, y_val), optimizer=optimizer, epochs=3, batch_size=len(X),
                  seed=5)
    with_l2 = fit(SoftmaxCamHead, "compiled", X, y, params={"dropout": 0.0, "l2": l2}, **kwargs)
    without = fit(SoftmaxCamHead, "compiled", X, y, params={"dropout": 0.0, "l2": 0.0}, **kwargs)
    # epoch 1's full batch sees the initial weights, equal for both (same seed)
    keras.utils.set_random_seed(5)
    kernel0, bias0 = SoftmaxCamHead(dropout=0.0, l2=l2)._build_model(X.shape[1]).get_weights()
    penalty0 = l2 * (np.sum(kernel0.astype(np.float64) ** 2) + np.sum(bias0.astype(np.float64) ** 2))
    assert penalty0 > 1e-3
    np.testing.assert_allclose(with_l2.history_["loss"][0] - without.history_["loss"][0], penalty0,
                               rtol=1e-4)
    # val_loss = cross-entropy of the trained model + the L2 penalty of its weights
    kernel, bias = with_l2.dense_weights()
    p = np.clip(with_l2.predict_proba(X_val), 1e-7, 1 - 1e-7)
    cross_entropy = -np.mean(np.where(y_val == 1, np.log(p), np.log(1 - p)))
    penalty = l2 * (np.sum(kernel.astype(np.float64) ** 2) + np.sum(bias.astype(np.float64) ** 2))
    np.testing.assert_allclose(with_l2.history_["val_loss"][-1], cross_entropy + penalty, rtol=1e-4)
    # and model.fit agrees, penalty included
    reference = fit(SoftmaxCamHead, "keras", X, y, params={"dropout": 0.0, "l2": l2}, **kwargs)
    assert_same_fit(with_l2, reference, X_val)


# -- normal settings -----------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", HEADS)
def test_normal_settings_reach_the_same_quality(cls):
    """Dropout 0.5, mini-batches, shuffling: different random streams, same quality."""
    X, y = make_separable_features(n=900, d=20, seed=8, margin=0.3)
    X_tr, y_tr, X_val, y_val = X[:700], y[:700], X[700:], y[700:]
    kwargs = dict(validation=(X_val, y_val), optimizer=AdamOptimizer(0.01), epochs=12,
                  batch_size=32, seed=2)
    compiled = fit(cls, "compiled", X_tr, y_tr, **kwargs)
    reference = fit(cls, "keras", X_tr, y_tr, **kwargs)
    assert list(compiled.history_) == list(reference.history_) == KERAS_KEYS
    assert all(len(v) == 12 for h in (compiled, reference) for v in h.history_.values())
    a, b = compiled.history_["val_loss"][-1], reference.history_["val_loss"][-1]
    assert a < 0.25 and b < 0.25
    assert abs(a - b) < 0.05
    assert compiled.history_["val_accuracy"][-1] > 0.9
    # the reported val_loss is the validation log loss of the returned model
    p = np.clip(compiled.predict_proba(X_val), 1e-7, 1 - 1e-7)
    log_loss = -np.mean(np.where(y_val == 1, np.log(p), np.log(1 - p)))
    penalty = sum(float(np.sum(w.astype(np.float64) ** 2)) for w in compiled.model_.get_weights())
    penalty *= getattr(compiled, "l2", 0.0)
    np.testing.assert_allclose(a, log_loss + penalty, rtol=1e-4)


@pytest.mark.parametrize("cls", HEADS)
def test_compiled_loop_is_deterministic_with_dropout(cls, data):
    X, y, X_val, y_val = data
    kwargs = dict(validation=(X_val, y_val), optimizer=AdamOptimizer(0.01), epochs=3, batch_size=32)
    a = fit(cls, "compiled", X, y, seed=7, **kwargs)
    b = fit(cls, "compiled", X, y, seed=7, **kwargs)
    c = fit(cls, "compiled", X, y, seed=8, **kwargs)
    assert a.history_ == b.history_
    for wa, wb in zip(a.model_.get_weights(), b.model_.get_weights(), strict=True):
        np.testing.assert_array_equal(wa, wb)
    assert not np.allclose(a.predict_proba(X_val), c.predict_proba(X_val), atol=1e-4)


@pytest.mark.parametrize("loop", ["compiled", "keras"])
def test_history_without_validation(loop, data):
    X, y, _, _ = data
    head = fit(DropoutSigmoidHead, loop, X, y, epochs=2, batch_size=64)
    assert list(head.history_) == ["accuracy", "loss"]
    assert all(len(v) == 2 and all(type(x) is float for x in v) for v in head.history_.values())


def test_accuracy_is_the_metric_compile_picks(data):
    X, y, _, _ = data
    for cls, expected in ((DropoutSigmoidHead, keras.metrics.binary_accuracy),
                          (SoftmaxCamHead, keras.metrics.sparse_categorical_accuracy)):
        head = fit(cls, "compiled", X, y, epochs=1)
        assert head._accuracy_function(head.model_, head._targets(y)) is expected
