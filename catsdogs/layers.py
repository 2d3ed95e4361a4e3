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
