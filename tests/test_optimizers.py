import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import inspect  # noqa: E402
import math  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from catsdogs.builtin.optimizers import AdadeltaOptimizer, AdamOptimizer  # noqa: E402
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
