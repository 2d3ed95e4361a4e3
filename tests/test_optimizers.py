import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import inspect  # noqa: E402
import math  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from catsdogs.builtin.optimizers import (  # noqa: E402
    AdadeltaOptimizer,
    AdamOptimizer,
    RAdamOptimizer,
    SGDOptimizer,
    radam_class,
)
from catsdogs.errors import ConfigError  # noqa: E402
from catsdogs.plugins import get_registry  # noqa: E402

CASES = [(AdamOptimizer, "adam", keras.optimizers.Adam),
         (AdadeltaOptimizer, "adadelta", keras.optimizers.Adadelta)]


def lr_of(opt) -> float:
    return float(keras.ops.convert_to_numpy(opt.learning_rate))


@pytest.mark.parametrize("cls, name, keras_cls", CASES)
def test_registered_under_its_name(cls, name, keras_cls):
    assert cls.name == name
    assert get_registry().optimizer(name) is cls


@pytest.mark.parametrize("cls, name, keras_cls", CASES)
def test_default_learning_rate_is_the_keras_default(cls, name, keras_cls):
    keras_default = inspect.signature(keras_cls.__init__).parameters["learning_rate"].default
    assert cls.default_learning_rate == keras_default == 0.001
    built = cls().build()
    assert type(built) is keras_cls
    assert math.isclose(lr_of(built), keras_default, rel_tol=1e-6)


@pytest.mark.parametrize("cls, name, keras_cls", CASES)
def test_learning_rate_is_configurable(cls, name, keras_cls):
    opt = cls(learning_rate=0.25)
    assert opt.effective_learning_rate == 0.25
    assert math.isclose(lr_of(opt.build()), 0.25, rel_tol=1e-6)
    opt.set_params(learning_rate=None)
    assert math.isclose(lr_of(opt.build()), 0.001, rel_tol=1e-6)


@pytest.mark.parametrize("cls, name, keras_cls", CASES)
def test_build_returns_a_fresh_optimizer_every_time(cls, name, keras_cls):
    opt = cls()
    a, b = opt.build(), opt.build()
    assert a is not b
    assert isinstance(a, keras.optimizers.Optimizer)


@pytest.mark.parametrize("cls, name, keras_cls", CASES)
def test_params_are_sklearn_style(cls, name, keras_cls):
    opt = cls(learning_rate=0.01)
    assert opt.get_params() == {"learning_rate": 0.01}
    clone = opt.clone()
    assert clone is not opt and clone.get_params() == opt.get_params()
    assert repr(opt) == f"{cls.__name__}(learning_rate=0.01)"
    with pytest.raises(ConfigError, match="no parameter 'beta'"):
        opt.set_params(beta=0.5)


@pytest.mark.parametrize("bad", [0, -0.1, float("nan"), float("inf"), "fast", True])
def test_invalid_learning_rate_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="learning_rate must be a positive number"):
        AdamOptimizer(learning_rate=bad).build()


def test_numpy_learning_rate_is_accepted():
    assert math.isclose(lr_of(AdadeltaOptimizer(learning_rate=np.float32(0.5)).build()), 0.5)


@pytest.mark.parametrize("cls, name, keras_cls", CASES)
def test_a_training_step_moves_the_weights(cls, name, keras_cls):
    keras.utils.set_random_seed(1)
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    model.compile(optimizer=cls(learning_rate=0.1).build(), loss="mse", run_eagerly=True)
    before = model.get_weights()
    x = np.ones((4, 3), np.float32)
    model.train_on_batch(x, np.full((4, 1), 10.0, np.float32))
    after = model.get_weights()
    assert not np.array_equal(before[0], after[0])


# -- radam and sgd ---------------------------------------------------------------------------------
def radam_reference(gradients, w0, lr, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
    """RAdam written out in float64 (Liu et al. 2019, Algorithm 2; torch.optim.RAdam's threshold
    rho_t > 5 and eps added to sqrt(v))."""
    w = np.array(w0, dtype=np.float64)
    m, v = np.zeros_like(w), np.zeros_like(w)
    rho_inf = 2 / (1 - beta_2) - 1
    for t, g in enumerate(gradients, start=1):
        m = beta_1 * m + (1 - beta_1) * g
        v = beta_2 * v + (1 - beta_2) * g * g
        m_hat = m / (1 - beta_1 ** t)
        rho_t = rho_inf - 2 * t * beta_2 ** t / (1 - beta_2 ** t)
        if rho_t > 5:
            r = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
            w = w - lr * r * m_hat * math.sqrt(1 - beta_2 ** t) / (np.sqrt(v) + epsilon)
        else:
            w = w - lr * m_hat
    return w


def apply_steps(optimizer, gradients, w0):
    var = keras.Variable(np.asarray(w0, np.float32))
    for g in gradients:
        optimizer.apply_gradients([(keras.ops.convert_to_tensor(g.astype(np.float32)), var)])
    return np.asarray(keras.ops.convert_to_numpy(var), dtype=np.float64)


@pytest.mark.parametrize("name, cls", [("radam", RAdamOptimizer), ("sgd", SGDOptimizer)])
def test_radam_and_sgd_are_registered(name, cls):
    assert get_registry().optimizer(name) is cls and cls.name == name


def test_radam_equals_the_written_out_algorithm():
    """12 steps on varied gradients cover both regimes: momentum SGD while rho_t <= 5 (steps 1-5
    at beta_2 = 0.999), then the rectified adaptive step; float32 vs the float64 reference."""
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal(6)
    gradients = [rng.standard_normal(6) * (1 + i) for i in range(12)]
    for steps in (3, 12):  # before and after the switch
        got = apply_steps(RAdamOptimizer(learning_rate=0.05).build(), gradients[:steps], w0)
        want = radam_reference(gradients[:steps], w0, 0.05)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # the two regimes differ: the rectified step is not the plain momentum step
    plain = w0.copy()
    m = np.zeros(6)
    for t, g in enumerate(gradients, start=1):
        m = 0.9 * m + 0.1 * g
        plain = plain - 0.05 * m / (1 - 0.9 ** t)
    assert np.abs(plain - radam_reference(gradients, w0, 0.05)).max() > 1e-3


def test_radam_default_learning_rate_and_serialisation(tmp_path):
    built = RAdamOptimizer().build()
    assert type(built) is radam_class() and math.isclose(lr_of(built), 0.001, rel_tol=1e-6)
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    model.compile(optimizer=RAdamOptimizer(learning_rate=0.01).build(), loss="mse")
    model.train_on_batch(np.ones((4, 3), np.float32), np.ones((4, 1), np.float32))
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    assert type(loaded.optimizer) is radam_class()
    assert math.isclose(lr_of(loaded.optimizer), 0.01, rel_tol=1e-6)


def test_sgd_is_keras_sgd_with_nesterov_momentum():
    opt = SGDOptimizer()
    assert opt.get_params() == {"learning_rate": None, "momentum": 0.9, "nesterov": True}
    built = opt.build()
    assert type(built) is keras.optimizers.SGD
    assert math.isclose(lr_of(built), 0.01, rel_tol=1e-6)  # Keras' default
    assert built.momentum == 0.9 and built.nesterov is True
    plain = SGDOptimizer(learning_rate=0.1, momentum=0.0, nesterov=False).build()
    w = apply_steps(plain, [np.array([1.0, -2.0])] * 2, np.zeros(2))
    np.testing.assert_allclose(w, [-0.2, 0.4], rtol=1e-6)
    # Nesterov: v = m v - lr g; w += m v - lr g  (two steps of g = 1, lr 0.1, m 0.9)
    w = apply_steps(SGDOptimizer(learning_rate=0.1).build(), [np.array([1.0])] * 2, np.zeros(1))
    v1 = -0.1
    w1 = 0.9 * v1 - 0.1
    v2 = 0.9 * v1 - 0.1
    np.testing.assert_allclose(w, [w1 + 0.9 * v2 - 0.1], rtol=1e-6)


@pytest.mark.parametrize("params, message", [
    ({"momentum": 1.0}, "momentum must be a number in \\[0, 1\\)"),
    ({"momentum": -0.1}, "momentum must be a number in \\[0, 1\\)"),
    ({"momentum": True}, "momentum must be a number"),
    ({"nesterov": "yes"}, "nesterov must be true or false"),
    ({"learning_rate": 0}, "learning_rate must be a positive number"),
])
def test_sgd_bad_parameters_are_config_errors(params, message):
    with pytest.raises(ConfigError, match=message):
        SGDOptimizer(**params).build()
