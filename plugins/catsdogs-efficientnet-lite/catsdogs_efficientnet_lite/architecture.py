"""EfficientNet-Lite as a Keras 3 functional model, built from standard layers only.

EfficientNet-Lite (TensorFlow's ``efficientnet/lite``) is EfficientNet without squeeze-and-excite,
with ReLU6 instead of swish, and with the stem (32 channels), the head (1280 channels) and the
repeats of the first and last block stage kept fixed while the rest is scaled. This module follows
the PyTorch port ``efficientnet-lite-pytorch`` (derived from lukemelas/EfficientNet-PyTorch), whose
``.pth`` files are the ImageNet weights this plugin loads:

* MBConv block arguments of EfficientNet-B0 (below); a block's expanded width is its (rounded)
  input width times the expansion ratio; the residual is added when stride is 1 and the input and
  output widths agree (drop-connect only acts in training, so it is left out);
* BatchNormalization with epsilon 1e-3 and Keras momentum 0.99 (PyTorch momentum 0.01);
* "same" padding everywhere. The reference's ``Conv2dStaticSamePadding`` pads
  ``pad = max((ceil(i / s) - 1) * s + k - i, 0)`` with ``pad // 2`` before and the rest after, which
  is TensorFlow's SAME rule, i.e. what ``padding="same"`` does in Keras (for stride-2 layers on an
  even input that is 0 before and 1 after). The reference computes it once for its native size;
  Keras computes it for the size it is built at, which is identical at the native size and what
  the original TensorFlow model does at any other size;
* the classifier head is global average pooling, dropout, Dense(1000) (logits).

Layer names follow the PyTorch state-dict (see :func:`weight_plan`): ``stem_conv``/``stem_bn``,
``block{NN}_expand_conv``/``_expand_bn``/``_dwconv``/``_dw_bn``/``_project_conv``/``_project_bn``
for ``_blocks.NN``, ``head_conv``/``head_bn``, then ``gap`` and, for the classifier, ``top_dropout``
and ``logits``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["BASE_BLOCKS", "VARIANTS", "BlockSpec", "Variant", "block_specs", "build_network", "build_split",
           "round_filters", "round_repeats", "weight_plan"]

STEM_FILTERS = 32
HEAD_FILTERS = 1280
NUM_CLASSES = 1000
DEPTH_DIVISOR = 8
BN_MOMENTUM = 0.99  # PyTorch momentum 1 - 0.99
BN_EPSILON = 1e-3
MEAN_RGB = 127.0
STDDEV_RGB = 128.0

#: EfficientNet-B0's MBConv stages: (repeats, kernel, stride, expand ratio, input filters, output filters)
BASE_BLOCKS: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


@dataclass(frozen=True)
class Variant:
    name: str
    #: the reference's model name (``efficientnet-lite0``)
    reference_name: str
    width: float
    depth: float
    resolution: int
    dropout: float


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("efficientnet_lite0", "efficientnet-lite0", 1.0, 1.0, 224, 0.2),
        Variant("efficientnet_lite1", "efficientnet-lite1", 1.0, 1.1, 240, 0.2),
        Variant("efficientnet_lite2", "efficientnet-lite2", 1.1, 1.2, 260, 0.3),
    )
}


def round_filters(filters: int, width: float, divisor: int = DEPTH_DIVISOR) -> int:
    """Scale a channel count by ``width`` and round to a multiple of ``divisor`` (never down >10%)."""
    scaled = filters * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if new < 0.9 * scaled:
        new += divisor
    return int(new)


def round_repeats(repeats: int, depth: float) -> int:
    return int(math.ceil(depth * repeats))


@dataclass(frozen=True)
class BlockSpec:
    index: int
    kernel: int
    stride: int
    expand: int
    in_filters: int
    out_filters: int

    @property
    def expanded(self) -> int:
        return self.in_filters * self.expand

    @property
    def residual(self) -> bool:
        return self.stride == 1 and self.in_filters == self.out_filters


def block_specs(variant: Variant) -> list[BlockSpec]:
    """Every MBConv block in order (index = position in the reference's ``_blocks``)."""
    specs: list[BlockSpec] = []
    last = len(BASE_BLOCKS) - 1
    for stage, (repeats, kernel, stride, expand, fin, fout) in enumerate(BASE_BLOCKS):
        fin, fout = round_filters(fin, variant.width), round_filters(fout, variant.width)
        if stage in (0, last):  # fixed head and stem: first and last stage keep their repeats
            n = repeats
            if stage == 0:
                fin = STEM_FILTERS
        else:
            n = round_repeats(repeats, variant.depth)
        for j in range(n):
            specs.append(BlockSpec(len(specs), kernel, stride if j == 0 else 1, expand,
                                   fin if j == 0 else fout, fout))
    return specs


def stage_outputs(variant: Variant) -> dict[str, tuple[str, int]]:
    """``stage1``..``stage7`` (the MBConv stages of :data:`BASE_BLOCKS`): the Keras layer whose
    output ends each stage (its last block's residual ``Add``, else its projection's batch norm)
    and its channels, in network order."""
    out: dict[str, tuple[str, int]] = {}
    blocks = block_specs(variant)
    start = 0  # a stage's first block: the repeats of the stages before it (as block_specs counts)
    for stage, (repeats, *_rest) in enumerate(BASE_BLOCKS):
        n = repeats if stage in (0, len(BASE_BLOCKS) - 1) else round_repeats(repeats, variant.depth)
        last = blocks[start + n - 1]
        layer = f"block{last.index:02d}_add" if last.residual else f"block{last.index:02d}_project_bn"
        out[f"stage{stage + 1}"] = (layer, last.out_filters)
        start += n
    return out


def weight_plan(variant: Variant, classifier: bool = True) -> list[tuple[str, str, str]]:
    """``(keras layer name, kind, torch state-dict prefix)`` for every layer with weights.

    ``kind`` is ``conv``, ``dwconv``, ``bn`` or ``dense``.
    """
    plan = [("stem_conv", "conv", "_conv_stem"), ("stem_bn", "bn", "_bn0")]
    for b in block_specs(variant):
        name, prefix = f"block{b.index:02d}", f"_blocks.{b.index}"
        if b.expand != 1:
            plan += [(f"{name}_expand_conv", "conv", f"{prefix}._expand_conv"),
                     (f"{name}_expand_bn", "bn", f"{prefix}._bn0")]
        plan += [(f"{name}_dwconv", "dwconv", f"{prefix}._depthwise_conv"),
                 (f"{name}_dw_bn", "bn", f"{prefix}._bn1"),
                 (f"{name}_project_conv", "conv", f"{prefix}._project_conv"),
                 (f"{name}_project_bn", "bn", f"{prefix}._bn2")]
    plan += [("head_conv", "conv", "_conv_head"), ("head_bn", "bn", "_bn1")]
    if classifier:
        plan.append(("logits", "dense", "_fc"))
    return plan


def _layer_makers():
    import keras

    layers = keras.layers

    def bn(name):
        return layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=name)

    def relu6(name):
        return layers.ReLU(max_value=6.0, name=name)

    return layers, bn, relu6


def _stem(image):
    """``image`` (raw RGB 0-255) -> the maps entering block 0."""
    from catsdogs.layers import PixelNormalization

    layers, bn, relu6 = _layer_makers()
    x = PixelNormalization(mean=MEAN_RGB, std=STDDEV_RGB, name="preprocess")(image)
    x = layers.Conv2D(STEM_FILTERS, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(x)
    return relu6("stem_relu")(bn("stem_bn")(x))


def _block(x, b: BlockSpec):
    """One MBConv block (``_blocks.NN`` of the reference)."""
    layers, bn, relu6 = _layer_makers()
    name = f"block{b.index:02d}"
    inputs = x
    if b.expand != 1:
        x = layers.Conv2D(b.expanded, 1, padding="same", use_bias=False, name=f"{name}_expand_conv")(x)
        x = relu6(f"{name}_expand_relu")(bn(f"{name}_expand_bn")(x))
    x = layers.DepthwiseConv2D(b.kernel, strides=b.stride, padding="same", use_bias=False,
                               name=f"{name}_dwconv")(x)
    x = relu6(f"{name}_dw_relu")(bn(f"{name}_dw_bn")(x))
    x = layers.Conv2D(b.out_filters, 1, padding="same", use_bias=False, name=f"{name}_project_conv")(x)
    x = bn(f"{name}_project_bn")(x)
    if b.residual:
        x = layers.Add(name=f"{name}_add")([x, inputs])
    return x


def _head(x):
    """The last block's output -> head conv 1x1 (1280) -> ReLU6 -> ``gap`` (the features)."""
    layers, bn, relu6 = _layer_makers()
    x = layers.Conv2D(HEAD_FILTERS, 1, padding="same", use_bias=False, name="head_conv")(x)
    x = relu6("head_relu")(bn("head_bn")(x))
    return layers.GlobalAveragePooling2D(name="gap", dtype="float32")(x)


def build_network(variant: Variant, image_size: int, outputs: str = "features"):
    """The functional model: ``image`` (raw RGB 0-255) -> ``(x - 127) / 128`` -> ... -> ``gap``.

    ``outputs``: ``"features"`` (the 1280-d GAP vector), ``"logits"`` (1000 ImageNet logits) or
    ``"both"`` (a dict ``{"features": ..., "logits": ...}`` from one forward pass).
    """
    import keras

    if outputs not in ("features", "logits", "both"):
        raise ValueError(f"outputs must be 'features', 'logits' or 'both', got {outputs!r}")
    layers = keras.layers

    image = keras.Input((image_size, image_size, 3), name="image", dtype="float32")
    x = _stem(image)
    for b in block_specs(variant):
        x = _block(x, b)
    features = _head(x)
    if outputs == "features":
        return keras.Model(image, features, name=variant.name)
    y = layers.Dropout(variant.dropout, name="top_dropout")(features)
    logits = layers.Dense(NUM_CLASSES, name="logits", dtype="float32")(y)
    if outputs == "logits":
        return keras.Model(image, logits, name=f"{variant.name}_classifier")
    return keras.Model(image, {"features": features, "logits": logits}, name=f"{variant.name}_classifier")


def build_split(variant: Variant, image_size: int, blocks: int = 1):
    """:func:`build_network`'s feature model cut before its last ``blocks`` MBConv blocks:
    ``(bottom, top)`` with ``bottom``: ``image`` -> the maps entering those blocks (input
    ``image``, output ``(batch, h, w, c)``) and ``top``: those maps (input ``maps``) -> the blocks,
    the head conv and ``gap``. ``top(bottom(x))`` is the feature model's computation, layer for
    layer, under the same layer names (so weights are copied by name). Weights are left as built.
    """
    import keras

    specs = block_specs(variant)
    if not (isinstance(blocks, int) and not isinstance(blocks, bool) and 1 <= blocks <= len(specs)):
        raise ValueError(f"blocks must be an int in 1..{len(specs)}, got {blocks!r}")
    cut = len(specs) - blocks
    image = keras.Input((image_size, image_size, 3), name="image", dtype="float32")
    x = _stem(image)
    for b in specs[:cut]:
        x = _block(x, b)
    bottom = keras.Model(image, x, name=f"{variant.name}_bottom{blocks}")
    maps = keras.Input(tuple(bottom.output.shape[1:]), name="maps", dtype="float32")
    x = maps
    for b in specs[cut:]:
        x = _block(x, b)
    top = keras.Model(maps, _head(x), name=f"{variant.name}_top{blocks}")
    return bottom, top
