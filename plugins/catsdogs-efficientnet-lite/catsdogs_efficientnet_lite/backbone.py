"""The catsdogs backbones ``efficientnet_lite0/1/2``."""

from __future__ import annotations

from catsdogs.components import (
    WEIGHTS_IMAGENET,
    WEIGHTS_NONE,
    Backbone,
    FeatureLayer,
)

from .architecture import MEAN_RGB, NUM_CLASSES, STDDEV_RGB, VARIANTS, Variant


class EfficientNetLite(Backbone):
    """EfficientNet-Lite feature extractor (1280-d GAP features) with an ImageNet classifier.

    ``build(weights, image_size)`` gives the catsdogs feature model; :meth:`build_classifier`
    gives ImageNet logits, or features and logits from one forward pass.
    """

    min_input_size = 32
    feature_dim = 1280
    weights_options = (WEIGHTS_IMAGENET, WEIGHTS_NONE)
    preprocessing = (f"(x - {MEAN_RGB:g}) / {STDDEV_RGB:g} on RGB "
                     "(EfficientNet-Lite's MEAN_RGB/STDDEV_RGB, inside the graph)")
    #: this backbone can also build its ImageNet classifier (:meth:`build_classifier`)
    has_classifier = True
    #: and cut its feature model before its last MBConv blocks (:meth:`split_top`)
    has_top_split = True
    num_classes = NUM_CLASSES

    def __init__(self, variant: Variant):
        self.variant = variant
        self.name = variant.name
        self.input_size = variant.resolution

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    def feature_layers(self) -> dict[str, FeatureLayer]:
        """``stage1``..``stage7``: the output of each MBConv stage (``layers: [stage6, stage7]``
        adds their pooled features to the 1280 of the head)."""
        from .architecture import stage_outputs

        return {name: FeatureLayer(layer, channels)
                for name, (layer, channels) in stage_outputs(self.variant).items()}

    def weights_id(self, weights: str) -> str:
        self.check_weights(weights)
        if weights == WEIGHTS_IMAGENET:
            from .weights import CONVERSION_VERSION, checkpoint_path, file_sha256

            sha = file_sha256(checkpoint_path(self.name))
            return f"imagenet-pth{sha[:12]}-k{CONVERSION_VERSION}"
        return super().weights_id(weights)

    def weights_at_hand(self, weights: str, classifier: bool = False) -> bool:
        """``imagenet``: True when the weights package with the ``.pth`` file is installed (the
        feature model and the classifier read the same file)."""
        if weights != WEIGHTS_IMAGENET:
            return weights in self.weights_options
        from catsdogs.errors import CatsdogsError

        from .weights import checkpoint_path

        try:
            checkpoint_path(self.name)
        except CatsdogsError:
            return False
        return True

    def build_model(self, weights: str, image_size: int):
        return self._build(weights, image_size, "features")

    def build_classifier(self, weights: str = WEIGHTS_IMAGENET, image_size: int | None = None,
                         with_features: bool = False):
        """The ImageNet classifier: ``image`` -> 1000 logits (dropout + Dense after ``gap``).

        With ``with_features=True`` the model has two outputs from one forward pass, a dict
        ``{"features": (batch, 1280), "logits": (batch, 1000)}``. ``weights="none"`` gives the
        seeded random network whose convolutional part equals :meth:`build`'s.
        """
        size = self.checked_size(weights, image_size)
        with self.seeded_for(weights):
            return self._build(weights, size, "both" if with_features else "logits")

    def split_top(self, weights: str = WEIGHTS_IMAGENET, image_size: int | None = None,
                  blocks: int = 1):
        """``(bottom, top)``: the feature model of :meth:`build` cut before its last ``blocks``
        MBConv blocks (the :class:`~catsdogs.components.TopSplit` capability). ``bottom``:
        ``image`` -> the maps entering those blocks; ``top``: ``maps`` -> the blocks, the head
        conv (1280) and ``gap``. Both carry :meth:`build`'s weights (``weights="none"``: the same
        seeded network), copied by layer name, so ``top(bottom(x)) == build()(x)``."""
        from catsdogs.components import copy_weights_by_name
        from catsdogs.errors import ConfigError

        from .architecture import block_specs, build_split

        n = len(block_specs(self.variant))
        if isinstance(blocks, bool) or not isinstance(blocks, int) or not 1 <= blocks <= n:
            raise ConfigError(f"backbone {self.name!r}: blocks to fine-tune must be an int in "
                              f"1..{n}, got {blocks!r}")
        size = self.checked_size(weights, image_size)
        full = self.build(weights, size)
        bottom, top = build_split(self.variant, size, blocks)
        copy_weights_by_name(full, (bottom, top))
        return bottom, top

    def _build(self, weights: str, image_size: int, outputs: str):
        from .architecture import build_network

        model = build_network(self.variant, image_size, outputs)
        if weights == WEIGHTS_IMAGENET:
            from .weights import assign, keras_weights

            assign(model, keras_weights(self.variant))
        return model


BACKBONES = tuple(EfficientNetLite(v) for v in VARIANTS.values())
