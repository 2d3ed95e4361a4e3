"""Built-in optimizers for Keras heads: ``adam``, ``adadelta``, ``radam`` and ``sgd`` (built-in
plugin).

Each class is a small factory: ``__init__`` stores ``learning_rate`` (``None`` = the default) and
:meth:`build` returns a new ``keras.optimizers.Optimizer`` for every training run, so one instance
can be shared by many runs without leaking optimizer state between them.

The defaults are Keras 3's: ``learning_rate=0.001`` for adam and adadelta. (Keras 2 used ``1.0``
for Adadelta; results reproduced from older write-ups need ``learning_rate=1.0`` given
explicitly.) ``sgd`` is ``keras.optimizers.SGD`` at Keras' default ``learning_rate=0.01`` with
Nesterov momentum 0.9 (``momentum`` and ``nesterov`` are parameters of the class; experiment
files set ``learning_rate``). Keras 3 has no RAdam, so ``radam`` builds :func:`radam_class`'s
optimizer, Rectified Adam (Liu et al. 2019, "On the Variance of the Adaptive Learning Rate and
Beyond") as PyTorch's ``torch.optim.RAdam`` computes it.
"""

from __future__ import annotations

import functools
import numbers
from typing import ClassVar

from catsdogs.components import Optimizer
from catsdogs.errors import ConfigError
from catsdogs.hookspecs import hookimpl


class KerasOptimizer(Optimizer):
    """Common code: instantiates ``keras.optimizers.<keras_class>`` with the checked
    :attr:`~catsdogs.components.Optimizer.effective_learning_rate`."""

    #: class name in ``keras.optimizers``
    keras_class: ClassVar[str]

    def build(self):
        import keras

        return getattr(keras.optimizers, self.keras_class)(learning_rate=self.effective_learning_rate)


class AdamOptimizer(KerasOptimizer):
    """``keras.optimizers.Adam`` with Keras' defaults (``learning_rate=0.001``)."""

    name = "adam"
    keras_class = "Adam"
    default_learning_rate = 0.001


class AdadeltaOptimizer(KerasOptimizer):
    """``keras.optimizers.Adadelta`` with Keras 3's defaults (``learning_rate=0.001``)."""

    name = "adadelta"
    keras_class = "Adadelta"
    default_learning_rate = 0.001


class SGDOptimizer(Optimizer):
    """``keras.optimizers.SGD``: mini-batch gradient descent, by default with Nesterov momentum
    0.9 at Keras' default ``learning_rate=0.01``. ``momentum=0`` is plain SGD (then ``nesterov``
    changes nothing)."""

    name = "sgd"
    default_learning_rate = 0.01

    def __init__(self, learning_rate: float | None = None, momentum: float = 0.9,
                 nesterov: bool = True):
        self.learning_rate = learning_rate
        self.momentum = momentum
        self.nesterov = nesterov

    def build(self):
        import keras

        m = self.momentum
        if isinstance(m, bool) or not isinstance(m, numbers.Real) or not (0.0 <= m < 1.0):
            raise ConfigError(f"optimizer {self.name!r}: momentum must be a number in [0, 1), got {m!r}")
        if not isinstance(self.nesterov, bool):
            raise ConfigError(f"optimizer {self.name!r}: nesterov must be true or false, "
                              f"got {self.nesterov!r}")
        return keras.optimizers.SGD(learning_rate=self.effective_learning_rate, momentum=float(m),
                                    nesterov=self.nesterov)


@functools.cache
def radam_class() -> type:
    """The Keras optimizer class ``catsdogs>RAdam`` (made on first use, so importing this module
    does not import Keras; registered for ``.keras`` (de)serialisation).

    Per variable, at step ``t`` (1, 2, ...), with gradient ``g``: ``m = b1 m + (1 - b1) g``,
    ``v = b2 v + (1 - b2) g**2``, ``m_hat = m / (1 - b1**t)``; with ``rho_inf = 2 / (1 - b2) - 1``
    and ``rho_t = rho_inf - 2 t b2**t / (1 - b2**t)``: when ``rho_t > 5`` the variance of the
    adaptive rate is tractable and the step is ``lr * r_t * m_hat * sqrt(1 - b2**t) /
    (sqrt(v) + eps)`` with the rectifier ``r_t = sqrt((rho_t - 4)(rho_t - 2) rho_inf /
    ((rho_inf - 4)(rho_inf - 2) rho_t))``; before that (the first 5 steps at ``b2 = 0.999``) it is
    ``lr * m_hat`` (momentum SGD). This is ``torch.optim.RAdam``'s update (threshold 5, ``eps``
    added to ``sqrt(v)``); ``epsilon`` defaults to Keras' 1e-7.
    """
    import keras
    from keras import ops

    @keras.saving.register_keras_serializable(package="catsdogs", name="RAdam")
    class RAdam(keras.optimizers.Optimizer):
        def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7,
                     name="radam", **kwargs):
            super().__init__(learning_rate=learning_rate, name=name, **kwargs)
            self.beta_1 = beta_1
            self.beta_2 = beta_2
            self.epsilon = epsilon

        def build(self, var_list):
            if self.built:
                return
            super().build(var_list)
            self._momentums, self._velocities = self.add_optimizer_variables(
                var_list, ["momentum", "velocity"])

        def update_step(self, gradient, variable, learning_rate):
            dtype = variable.dtype
            lr = ops.cast(learning_rate, dtype)
            gradient = ops.cast(gradient, dtype)
            # the step's scalars in float64 (beta_2 too: 0.999 in float32 is 0.99900001): rho_t is
            # a difference of two numbers near rho_inf (1999 at beta_2 = 0.999), which float32
            # would round by a few per cent early on
            step = ops.cast(self.iterations + 1, "float64")
            b1_power = ops.power(ops.convert_to_tensor(float(self.beta_1), "float64"), step)
            b2_power = ops.power(ops.convert_to_tensor(float(self.beta_2), "float64"), step)
            rho_inf = 2.0 / (1.0 - float(self.beta_2)) - 1.0
            rho_t = rho_inf - 2.0 * step * b2_power / (1.0 - b2_power)
            safe = ops.maximum(rho_t, 5.0)  # the rectifier is only used (and real) above 5
            rect = ops.sqrt((safe - 4.0) * (safe - 2.0) * rho_inf
                            / ((rho_inf - 4.0) * (rho_inf - 2.0) * safe))
            rectify = ops.cast(rho_t > 5.0, dtype)
            index = self._get_variable_index(variable)
            m, v = self._momentums[index], self._velocities[index]
            self.assign_add(m, ops.multiply(ops.subtract(gradient, m), 1 - self.beta_1))
            self.assign_add(v, ops.multiply(ops.subtract(ops.square(gradient), v), 1 - self.beta_2))
            m_hat = ops.divide(m, ops.cast(1.0 - b1_power, dtype))
            adaptive = ops.divide(ops.cast(ops.sqrt(1.0 - b2_power) * rect, dtype),
                                  ops.add(ops.sqrt(v), self.epsilon))
            # rho_t > 5: lr * m_hat * adaptive; else lr * m_hat
            scale = ops.add(ops.multiply(rectify, adaptive), 1 - rectify)
            self.assign_sub(variable, ops.multiply(ops.multiply(m_hat, scale), lr))

        def get_config(self):
            config = super().get_config()
            config.update(beta_1=self.beta_1, beta_2=self.beta_2, epsilon=self.epsilon)
            return config

    return RAdam


class RAdamOptimizer(Optimizer):
    """Rectified Adam (:func:`radam_class`) with the paper's defaults (``learning_rate=0.001``,
    betas 0.9 / 0.999)."""

    name = "radam"
    default_learning_rate = 0.001

    def build(self):
        return radam_class()(learning_rate=self.effective_learning_rate)


OPTIMIZERS = (AdamOptimizer, AdadeltaOptimizer, RAdamOptimizer, SGDOptimizer)


@hookimpl
def register_optimizers(register):
    for optimizer_cls in OPTIMIZERS:
        register(optimizer_cls)
