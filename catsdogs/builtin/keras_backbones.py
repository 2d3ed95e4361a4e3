"""The write-up's four Keras Applications backbones (built-in plugin)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TypedDict

from catsdogs.components import (
    WEIGHTS_IMAGENET,
    WEIGHTS_NONE,
    Backbone,
    FeatureLayer,
)
from catsdogs.errors import CatsdogsError
from catsdogs.hookspecs import hookimpl

CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


def keras_models_dir() -> str:
    """The folder ``keras.utils.get_file`` keeps the applications' weights in, by Keras's own
    rule: ``$KERAS_HOME`` (else ``~/.keras``, or ``/tmp/.keras`` when the home folder is not
    writable), replaced by ``/tmp/.keras`` when it is not writable, then ``models/``."""
    if "KERAS_HOME" in os.environ:
        home = os.environ["KERAS_HOME"]
    else:
        user = os.path.expanduser("~")
        home = os.path.join(user if os.access(user, os.W_OK) else "/tmp", ".keras")
    base = os.path.expanduser(home)
    if not os.access(base, os.W_OK):
        base = os.path.join("/tmp", ".keras")
    return os.path.join(base, "models")


class _NormalizationArgs(TypedDict):
    """Keyword arguments of :class:`catsdogs.layers.PixelNormalization`."""

    mean: Sequence[float] | float
    std: Sequence[float] | float
    bgr: bool


class KerasApplicationBackbone(Backbone):
    """``keras.applications.<application>(include_top=False)`` + global average pooling, and the
    application's own ImageNet classifier (:meth:`build_classifier`).

    The model is one flat functional graph: ``image`` (raw RGB 0-255) -> pixel normalisation ->
    the application's conv base -> ``gap`` (GlobalAveragePooling2D, float32 output). The conv base's
    last feature map (the input of ``gap``) is what class activation maps are computed from.
    """

    #: each application ends in GAP -> Dense(1000): :meth:`build_classifier` builds it
    has_classifier = True

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

        image, app = self._application(weights, image_size, include_top=False)
        features = keras.layers.GlobalAveragePooling2D(name="gap", dtype="float32")(app.output)
        return keras.Model(image, features, name=self.name)

    def build_classifier(self, weights: str = WEIGHTS_IMAGENET, image_size: int | None = None,
                         with_features: bool = False):
        """The application's ImageNet classifier (the :class:`~catsdogs.components.ImageNetClassifier`
        capability): ``image`` -> its conv base -> ``avg_pool`` (GAP) -> ``predictions``, a
        Dense to the 1000 logits (``classifier_activation=None``).

        With ``with_features=True`` the model's output is a dict ``{"features": (batch,
        feature_dim), "logits": (batch, 1000)}`` from one forward pass. The conv base and its
        features are :meth:`build`'s (``weights="none"``: the same seeded network, the Dense
        created after it). ImageNet weights come from the application's full weights file (with
        the classifier), not the ``_notop`` file the feature model reads; Keras downloads it on
        first use (:meth:`weights_at_hand` says whether it is there)."""
        import keras

        size = self.checked_size(weights, image_size)
        with self.seeded_for(weights):
            image, app = self._application(weights, size, include_top=True)
        logits = app.output
        if not with_features:
            return keras.Model(image, logits, name=f"{self.name}_classifier")
        features = app.get_layer("avg_pool").output
        return keras.Model(image, {"features": features, "logits": logits},
                           name=f"{self.name}_classifier")

    def weights_file(self, classifier: bool = False) -> str:
        """The name of the file Keras keeps this application's ImageNet weights in, under
        ``$KERAS_HOME/models/`` (default ``~/.keras/models/``): the full file (with the
        classifier) or the ``_notop`` file the feature model reads."""
        return f"{self.name}_weights_tf_dim_ordering_tf_kernels{'' if classifier else '_notop'}.h5"

    def weights_at_hand(self, weights: str, classifier: bool = False) -> bool:
        """``imagenet``: True when Keras's weights file is already where Keras looks for it, so
        that building needs no download (:func:`keras_models_dir`)."""
        if weights != WEIGHTS_IMAGENET:
            return super().weights_at_hand(weights, classifier)
        return os.path.isfile(os.path.join(keras_models_dir(), self.weights_file(classifier)))

    def _application(self, weights: str, image_size: int, include_top: bool):
        """``(image input, the Keras application on the normalised pixels)``; a weights file
        that cannot be had is one :class:`CatsdogsError` naming it and what to do."""
        import keras

        from catsdogs.layers import PixelNormalization

        image = keras.Input((image_size, image_size, 3), name="image", dtype="float32")
        x = PixelNormalization(name="preprocess", **self._normalization_args())(image)
        app = getattr(keras.applications, self.application)
        top = {"classifier_activation": None} if include_top else {}
        try:
            base = app(include_top=include_top, weights=None if weights == WEIGHTS_NONE else weights,
                       input_tensor=x, **top)
        except Exception as exc:
            if weights == WEIGHTS_NONE:
                raise
            raise CatsdogsError(
                f"could not load {weights!r} weights for backbone {self.name!r} "
                f"({type(exc).__name__}: {exc}). Keras downloads them on first use, which needs "
                f"internet access; offline, copy {self.weights_file(include_top)} into "
                f"{keras_models_dir()} (Keras's folder: $KERAS_HOME/models, else "
                "~/.keras/models) or use --weights none"
            ) from exc
        return image, base


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
