"""Crop views of a prepared image (``views: [center, top_left, ...]``, issue 24 lever 1).

A crop view is the square crop :func:`catsdogs.components.crop_box` of the ``S x S`` image the
backbone's resize policy prepared (a side of ``crop_fraction * S``), resized back to ``S x S``
(bilinear, half-pixel centres: TensorFlow's ``resize`` and TFLite's ``RESIZE_BILINEAR``) and
rounded to whole 0-255 values, so that it is a prepared image like any other (uint8 for
extraction and for the int8 network). One Keras layer, :class:`CropView`, computes it: feature
extraction calls it on each decoded batch (:func:`crop_images`), and the export puts the same
layer in its graph (:mod:`catsdogs.app.export`), so the exported model computes the submitted
features. It is registered for ``.keras`` loading in safe mode (package ``catsdogs``).

The mirrored crop views (``flip_<region>``) are the crop, then mirrored left to right.
"""

from __future__ import annotations

import functools

import keras
import numpy as np
from keras import ops

from catsdogs.components import DEFAULT_CROP_FRACTION, crop_box

#: images cropped per call of the layer by :func:`crop_images` (bounds the float32 copies)
CROP_BATCH = 64


@keras.saving.register_keras_serializable(package="catsdogs")
class CropView(keras.layers.Layer):
    """NHWC ``(n, S, S, 3)`` 0-255 images -> their ``region`` crop (a side of ``fraction * S``)
    resized back to ``S x S`` (bilinear) and rounded, float32."""

    def __init__(self, region: str = "center", fraction: float = DEFAULT_CROP_FRACTION, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        crop_box(region, 8, fraction)  # checks both (ConfigError)
        self.region, self.fraction = region, float(fraction)

    def call(self, inputs):
        height, width = inputs.shape[1], inputs.shape[2]
        if height is None or height != width:
            raise ValueError(f"CropView needs square images of a known size, got {inputs.shape}")
        top, left, side = crop_box(self.region, int(height), self.fraction)
        x = ops.cast(inputs, "float32")[:, top:top + side, left:left + side, :]
        x = ops.image.resize(x, (int(height), int(width)), interpolation="bilinear",
                             antialias=False, data_format="channels_last")
        return ops.round(x)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "region": self.region, "fraction": self.fraction}


@functools.lru_cache(maxsize=32)
def _layer(region: str, fraction: float) -> CropView:
    return CropView(region, fraction)


def crop_images(images: np.ndarray, region: str, fraction: float = DEFAULT_CROP_FRACTION
                ) -> np.ndarray:
    """The crop view ``region`` of ``(n, S, S, 3)`` uint8 images, uint8: what :class:`CropView`
    computes in an exported graph."""
    layer = _layer(region, float(fraction))
    out = np.empty_like(images, dtype=np.uint8)
    for start in range(0, len(images), CROP_BATCH):
        part = np.asarray(images[start:start + CROP_BATCH], np.float32)
        out[start:start + len(part)] = np.clip(np.asarray(layer(part)), 0, 255).astype(np.uint8)
    return out
