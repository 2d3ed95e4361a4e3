"""Keras layers that put what a run does after its head into the exported graph.

The runner turns a head's P(dog) into the submitted number with NumPy: flip test-time
augmentation (the mean of the original and the horizontally flipped image's P(dog)), the mean of
the K fold heads (k-fold), an ensemble's blend (:class:`catsdogs.runs.ensemble.Blend`) and the
post-processing transform (:class:`catsdogs.runs.postprocess.Transform`). These layers compute the
same in the graph, in float32, so an exported model gives the submitted P(dog):

* :class:`HorizontalFlip` -- ``x[:, :, ::-1, :]`` of the prepared image, as extraction flips it;
* :class:`~catsdogs.features.views.CropView` -- a crop view (``views: [center, ...]``): the layer
  extraction itself computes the crops with (defined in :mod:`catsdogs.features.views`, which
  extraction may import; imported here so that loading an exported model registers it);
* :class:`BlendProbabilities` -- ``mean`` (weighted sum) or ``stack``
  (``sigmoid(bias + sum_k w_k logit(p_k))``);
* :class:`PostProcess` -- ``none``, ``clip`` or ``temperature`` (``sigmoid(logit(p) / T)``),
  then kept in ``[bound, 1 - bound]`` (:data:`catsdogs.evaluation.metrics.PROB_EPS`, 2^-24, which
  float32 holds exactly on both sides, so the graph's bounded numbers equal the runner's).

``logit`` follows :func:`catsdogs.evaluation.metrics.logit`: probabilities are clipped to
``[LOGIT_EPS, 1 - LOGIT_EPS]`` first (the same constant, 1e-12). In float32 ``1 - 1e-12`` is 1,
so ``p == 1`` (a saturated sigmoid) takes NumPy's float64 value of ``logit(1.0)`` explicitly. Only TFLite builtin ops are used
(REVERSE_V2, LOG, MAXIMUM, SELECT, LOGISTIC, ...), and the layers are registered for ``.keras``
loading in safe mode (package ``catsdogs``).
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import ops

from catsdogs.evaluation import metrics
from catsdogs.features.views import CropView

__all__ = ["BlendProbabilities", "CropView", "HorizontalFlip", "PostProcess", "logit"]

#: the float64 logit of a saturated P(dog) of 1.0 (clipped to 1 - LOGIT_EPS), as NumPy computes it
_LOGIT_MAX = float(metrics.logit(1.0))


def logit(p):
    """Clipped logit of float32 probabilities, as NumPy's float64 version computes it."""
    lo = ops.maximum(p, metrics.LOGIT_EPS)
    z = ops.log(lo) - ops.log(1.0 - lo)
    return ops.where(p >= 1.0, ops.full_like(p, _LOGIT_MAX), z)


@keras.saving.register_keras_serializable(package="catsdogs")
class HorizontalFlip(keras.layers.Layer):
    """Mirror NHWC images left to right (the ``flip`` view of feature extraction)."""

    def call(self, inputs):
        return ops.flip(inputs, axis=2)

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package="catsdogs")
class PostProcess(keras.layers.Layer):
    """A :class:`catsdogs.runs.postprocess.Transform` on P(dog): none, clip or temperature, then
    kept in ``[bound, 1 - bound]`` (``bound`` 0, the default of models exported before it existed:
    no bound)."""

    def __init__(self, kind: str = "none", lo: float = 0.0, hi: float = 1.0,
                 temperature: float = 1.0, bound: float = 0.0, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if kind not in ("none", "clip", "temperature"):
            raise ValueError(f"unknown post-processing {kind!r}")
        self.kind, self.lo, self.hi = kind, float(lo), float(hi)
        self.temperature = float(temperature)
        self.bound = float(bound)
        if not 0.0 <= self.bound < 0.5:
            raise ValueError(f"post-processing bound must lie in [0, 0.5), got {bound!r}")

    def call(self, p):
        if self.kind == "clip":
            p = ops.minimum(ops.maximum(p, self.lo), self.hi)
        elif self.kind == "temperature":
            p = ops.sigmoid(logit(p) * (1.0 / self.temperature))
        if self.bound > 0.0:
            p = ops.minimum(ops.maximum(p, self.bound), 1.0 - self.bound)
        return p

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "kind": self.kind, "lo": self.lo, "hi": self.hi,
                "temperature": self.temperature, "bound": self.bound}


@keras.saving.register_keras_serializable(package="catsdogs")
class BlendProbabilities(keras.layers.Layer):
    """An ensemble's blend of its members' P(dog) (a list of ``(batch, 1)`` tensors)."""

    def __init__(self, method: str = "mean", weights: Sequence[float] = (), bias: float = 0.0,
                 **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if method not in ("mean", "stack"):
            raise ValueError(f"unknown blend {method!r}")
        self.method, self.blend_weights, self.bias = method, [float(w) for w in weights], float(bias)

    def call(self, inputs):
        if len(inputs) != len(self.blend_weights):
            raise ValueError(f"blend of {len(self.blend_weights)} members got {len(inputs)} inputs")
        if self.method == "mean":
            terms = [p * w for p, w in zip(inputs, self.blend_weights)]
        else:
            terms = [logit(p) * w for p, w in zip(inputs, self.blend_weights)]
        total = terms[0]
        for t in terms[1:]:
            total = total + t
        return total if self.method == "mean" else ops.sigmoid(total + self.bias)

    def compute_output_shape(self, input_shape):
        return input_shape[0]

    def get_config(self):
        return {**super().get_config(), "method": self.method, "weights": self.blend_weights,
                "bias": self.bias}
