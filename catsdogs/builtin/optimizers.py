"""Built-in optimizers for Keras heads: ``adam`` and ``adadelta`` (built-in plugin).

Each class is a small factory: ``__init__`` stores ``learning_rate`` (``None`` = the Keras default)
and :meth:`build` returns a new ``keras.optimizers.Optimizer`` for every training run, so one
instance can be shared by many runs without leaking optimizer state between them.

The defaults are Keras 3's: ``learning_rate=0.001`` for both. (Keras 2 used ``1.0`` for Adadelta;
results reproduced from older write-ups need ``learning_rate=1.0`` given explicitly.)
"""

from __future__ import annotations

import math
from numbers import Real
from typing import ClassVar

from catsdogs.components import Optimizer
from catsdogs.errors import ConfigError
from catsdogs.hookspecs import hookimpl


class KerasOptimizer(Optimizer):
    """Common code: validates the learning rate and instantiates ``keras.optimizers.<keras_class>``."""

    #: class name in ``keras.optimizers``
    keras_class: ClassVar[str]

    def _checked_learning_rate(self) -> float:
        lr = self.learning_rate
        if lr is None:
            return float(self.default_learning_rate)
        if isinstance(lr, bool) or not isinstance(lr, Real) or not math.isfinite(lr) or lr <= 0:
            raise ConfigError(
                f"optimizer {self.name!r}: learning_rate must be a positive number, got {lr!r}"
            )
        return float(lr)

    def build(self):
        import keras

        return getattr(keras.optimizers, self.keras_class)(learning_rate=self._checked_learning_rate())


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


OPTIMIZERS = (AdamOptimizer, AdadeltaOptimizer)


@hookimpl
def register_optimizers(register):
    for optimizer_cls in OPTIMIZERS:
        register(optimizer_cls)
