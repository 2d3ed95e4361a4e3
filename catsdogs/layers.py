"""Keras layers that ship inside catsdogs models (registered for ``.keras`` save/load)."""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="catsdogs")
class PixelNormalization(keras.layers.Layer):
    """Per-channel ``(x[..., order] - mean) / std`` on raw 0-255 RGB pixels.

    ``bgr=True`` reverses the channel order first (Caffe-style models such as ResNet50).
    Runs in float32 even under a mixed-precision policy, so pixel values keep their precision.
    """

    def __init__(self, mean: Sequence[float] | float = 0.0, std: Sequence[float] | float = 1.0,
                 bgr: bool = False, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.mean = [float(m) for m in mean] if isinstance(mean, Sequence) else [float(mean)] * 3
        self.std = [float(s) for s in std] if isinstance(std, Sequence) else [float(std)] * 3
        self.bgr = bool(bgr)

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype)
        if self.bgr:
            x = ops.flip(x, axis=-1)
        scale = ops.convert_to_tensor([1.0 / s for s in self.std], dtype=self.compute_dtype)
        offset = ops.convert_to_tensor([-m / s for m, s in zip(self.mean, self.std)], dtype=self.compute_dtype)
        return x * scale + offset

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mean": self.mean, "std": self.std, "bgr": self.bgr}


@keras.saving.register_keras_serializable(package="catsdogs")
class SpeciesLogOdds(keras.layers.Layer):
    """A backbone's own ImageNet classifier read as a dog-vs-cat prior: on the columns
    ``[start, stop)`` of the features (one backbone's GAP features in a fused row), the logits of
    its frozen classifier for the ``n_dog`` dog classes and the ``n_cat`` cat classes (``kernel``
    ``(stop - start, n_dog + n_cat)``, dog columns first, and ``bias``), and out
    ``logsumexp(dog logits) - logsumexp(cat logits)``, shape ``(batch, 1)``: the log of the
    classifier's probability mass on dogs over its mass on cats (the softmax's normaliser
    cancels). Its weights are not trained (``trainable=False``); they are set after the layer is
    built (``set_weights``) and saved with the model."""

    def __init__(self, start: int, stop: int, n_dog: int, n_cat: int, **kwargs):
        kwargs.setdefault("dtype", "float32")
        kwargs.setdefault("trainable", False)
        super().__init__(**kwargs)
        self.start, self.stop, self.n_dog, self.n_cat = int(start), int(stop), int(n_dog), int(n_cat)

    def build(self, input_shape):
        units = self.n_dog + self.n_cat
        self.kernel = self.add_weight(shape=(self.stop - self.start, units), initializer="zeros",
                                      trainable=False, name="kernel")
        self.bias = self.add_weight(shape=(units,), initializer="zeros", trainable=False, name="bias")

    def call(self, inputs):
        return self.on_block(inputs[:, self.start:self.stop])

    def on_block(self, block):
        """The log-odds of the backbone's own feature columns ``block`` (``(batch, stop -
        start)``): what :meth:`call` computes on a fused row (grouped training and prediction
        compute it once per backbone, :mod:`catsdogs.runs.multifit`)."""
        z = ops.matmul(block, self.kernel) + self.bias
        dog = ops.logsumexp(z[:, :self.n_dog], axis=-1, keepdims=True)
        cat = ops.logsumexp(z[:, self.n_dog:], axis=-1, keepdims=True)
        return dog - cat

    def compute_output_shape(self, input_shape):
        return (input_shape[0], 1)

    def get_config(self):
        return {**super().get_config(), "start": self.start, "stop": self.stop,
                "n_dog": self.n_dog, "n_cat": self.n_cat}
