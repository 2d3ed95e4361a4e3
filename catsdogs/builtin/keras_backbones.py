"""The write-up's four Keras Applications backbones (built-in plugin)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TypedDict

from catsdogs.components import WEIGHTS_NONE, Backbone, FeatureLayer
from catsdogs.errors import CatsdogsError
from catsdogs.hookspecs import hookimpl

CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


class _NormalizationArgs(TypedDict):
    """Keyword arguments of :class:`catsdogs.layers.PixelNormalization`."""

    mean: Sequence[float] | float
    std: Sequence[float] | float
    bgr: bool


class KerasApplicationBackbone(Backbone):
    """``keras.applications.<application>(include_top=False)`` + global average pooling.

    The model is one flat functional graph: ``image`` (raw RGB 0-255) -> pixel normalisation ->
    the application's conv base -> ``gap`` (GlobalAveragePooling2D, float32 output). The conv base's
    last feature map (the input of ``gap``) is what class activation maps are computed from.
    """

    def __init__(self, name: str, application: str, input_size: int, min_input_size: int,
                 feature_dim: int, mode: str, layers: Mapping[str, FeatureLayer] | None = None):
        self.name = name
        self._layers = dict(layers or {})
        self.application = application
        self.input_size = input_size
        self.min_input_size = min_input_size
        self.feature_dim = feature_dim
        self.mode = mode
        if mode == "caffe":
            self.preprocessing = (
                "caffe: RGB->BGR, subtract ImageNet mean (B,G,R)=(103.939, 116.779, 123.68), no scaling"
            )
        else:
            self.preprocessing = "tf: x / 127.5 - 1 (scaled to [-1, 1])"

    def feature_layers(self) -> Mapping[str, FeatureLayer]:
        """Stage outputs of the conv base (``layers:``): ResNet50's ``conv2``-``conv4``,
        InceptionV3's ``mixed0``-``mixed9``."""
        return self._layers

    def _normalization_args(self) -> _NormalizationArgs:
        if self.mode == "caffe":
            # PixelNormalization flips to BGR first, so mean is given in BGR order
            return {"mean": CAFFE_MEAN_BGR, "std": 1.0, "bgr": True}
        return {"mean": 127.5, "std": 127.5, "bgr": False}

    def build_model(self, weights: str, image_size: int):
        import keras

        from catsdogs.layers import PixelNormalization

        image = keras.Input((image_size, image_size, 3), name="image", dtype="float32")
        x = PixelNormalization(name="preprocess", **self._normalization_args())(image)
        app = getattr(keras.applications, self.application)
        try:
            base = app(
                include_top=False,
                weights=None if weights == WEIGHTS_NONE else weights,
                input_tensor=x,
            )
        except Exception as exc:
            if weights == WEIGHTS_NONE:
                raise
            raise CatsdogsError(
                f"could not load {weights!r} weights for backbone {self.name!r} "
                f"({type(exc).__name__}: {exc}). Keras downloads them on first use, which needs "
                "internet access; offline, copy the weights file into ~/.keras/models/ "
                "or use --weights none"
            ) from exc
        features = keras.layers.GlobalAveragePooling2D(name="gap", dtype="float32")(base.output)
        return keras.Model(image, features, name=self.name)


BACKBONES = (
    KerasApplicationBackbone("resnet50", "ResNet50", 224, 32, 2048, "caffe", {
        f"conv{stage}": FeatureLayer(f"conv{stage}_block{blocks}_out", channels)
        for stage, blocks, channels in ((2, 3, 256), (3, 4, 512), (4, 6, 1024))}),
    KerasApplicationBackbone("inception_v3", "InceptionV3", 299, 75, 2048, "tf", {
        f"mixed{i}": FeatureLayer(f"mixed{i}", channels) for i, channels in enumerate(
            (256, 288, 288, 768, 768, 768, 768, 768, 1280, 2048))}),
    KerasApplicationBackbone("xception", "Xception", 299, 71, 2048, "tf"),
    KerasApplicationBackbone("inception_resnet_v2", "InceptionResNetV2", 299, 75, 1536, "tf"),
)


@hookimpl
def register_backbones(register):
    for backbone in BACKBONES:
        register(backbone)
