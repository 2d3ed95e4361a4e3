"""Built-in optimizers for Keras heads: ``adam`` and ``adadelta`` (built-in plugin).

Each class is a small factory: ``__init__`` stores ``learning_rate`` (``None`` = the Keras default)
and :meth:`build` returns a new ``keras.optimizers.Optimizer`` for every training run, so one
instance can be shared by many runs without leaking optimizer state between them.

The defaults are Keras 3's: ``learning_rate=0.001`` for both. (Keras 2 used ``1.0`` for Adadelta;
results reproduced from older write-ups need ``learning_rate=1.0`` given explicitly.)
"""

from __future__ import annotations

from typing import ClassVar

from catsdogs.components import Optimizer
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


OPTIMIZERS = (AdamOptimizer, AdadeltaOptimizer)


@hookimpl
def register_optimizers(register):
    for optimizer_cls in OPTIMIZERS:
        register(optimizer_cls)
