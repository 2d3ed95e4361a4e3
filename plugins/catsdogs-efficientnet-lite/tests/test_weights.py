"""ImageNet weights: located in the wheels, converted once, cached atomically, loaded into Keras."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from catsdogs.errors import CatsdogsError

from catsdogs_efficientnet_lite import get_backbone, weights
from catsdogs_efficientnet_lite.architecture import VARIANTS
from catsdogs_efficientnet_lite.torch_checkpoint import CheckpointFormatError

LITE0 = VARIANTS["efficientnet_lite0"]


def test_conversion_is_cached_under_the_catsdogs_cache(private_cache, monkeypatch):
    converted = weights.keras_weights(LITE0)
    sha = weights.file_sha256(weights.checkpoint_path(LITE0.name))
    path = weights.converted_path(LITE0)
    assert path.parent == private_cache / "weights" and path.is_file()
    assert sha[:16] in path.name
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]

    # the second call reads the cache, not the .pth
    def no_reading(_path):
        raise AssertionError("the .pth was read again")

    monkeypatch.setattr(weights, "read_state_dict", no_reading)
    again = weights.keras_weights(LITE0)
    assert again.keys() == converted.keys()
    for name in converted:
        for a, b in zip(converted[name], again[name]):
            np.testing.assert_array_equal(a, b)


def test_a_damaged_cache_file_is_rebuilt(private_cache):
    path = weights.converted_path(LITE0)
    weights.keras_weights(LITE0)
    path.write_bytes(b"not hdf5")
    converted = weights.keras_weights(LITE0)
    assert "head_conv" in converted and path.stat().st_size > 1_000_000


def test_layout_conversion():
    state = weights.read_state_dict(weights.checkpoint_path(LITE0.name))
    converted = weights.keras_weights(LITE0)
    np.testing.assert_array_equal(converted["stem_conv"][0], state["_conv_stem.weight"].transpose(2, 3, 1, 0))
    assert converted["block01_dwconv"][0].shape == (3, 3, 96, 1)
    np.testing.assert_array_equal(converted["block01_dwconv"][0][:, :, 5, 0],
                                  state["_blocks.1._depthwise_conv.weight"][5, 0])
    gamma, beta, mean, var = converted["head_bn"]
    np.testing.assert_array_equal(var, state["_bn1.running_var"])
    kernel, bias = converted["logits"]
    assert kernel.shape == (1280, 1000)
    np.testing.assert_array_equal(kernel, state["_fc.weight"].T)


def test_imagenet_models_carry_the_converted_weights():
    backbone = get_backbone("efficientnet_lite0")
    features = backbone.build("imagenet", 64)  # any size: the weights do not depend on it
    converted = weights.keras_weights(LITE0)
    np.testing.assert_array_equal(features.get_layer("block15_project_conv").get_weights()[0],
                                  converted["block15_project_conv"][0])
    both = backbone.build_classifier("imagenet", 64, with_features=True)
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(both(pixels)["features"]), np.asarray(features(pixels)),
                               rtol=0, atol=1e-5)


def test_unreadable_checkpoint_without_torch_says_what_to_install(tmp_path, monkeypatch):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x00" * 64)
    monkeypatch.setitem(sys.modules, "torch", None)  # "import torch" raises ImportError
    with pytest.raises(CatsdogsError, match=r"pip install .*catsdogs-efficientnet-lite\[reference\]"):
        weights.read_state_dict(bad)


def test_unreadable_checkpoint_falls_back_to_torch(monkeypatch):
    pytest.importorskip("torch", exc_type=ImportError)
    path = weights.checkpoint_path(LITE0.name)
    expected = weights.read_state_dict(path)

    def cannot(_path):
        raise CheckpointFormatError("pretend this is a format the reader does not know")

    monkeypatch.setattr(weights, "load_state_dict", cannot)
    got = weights.read_state_dict(path)
    assert got.keys() == expected.keys()
    np.testing.assert_array_equal(got["_fc.weight"], expected["_fc.weight"])


def test_missing_weights_package_is_a_clear_error(monkeypatch):
    lite0 = get_backbone("efficientnet_lite0")
    assert lite0.weights_at_hand("imagenet") and lite0.weights_at_hand("imagenet", classifier=True)
    monkeypatch.setitem(weights.WEIGHT_PACKAGES, "efficientnet_lite0",
                        ("no_such_weights_pkg_xyz", "no-such-weights-pkg-xyz"))
    # not at hand: the audit's default classifier passes it over (catsdogs' find_classifier)
    assert not lite0.weights_at_hand("imagenet", classifier=True) and lite0.weights_at_hand("none")
    with pytest.raises(CatsdogsError, match="pip install no-such-weights-pkg-xyz"):
        get_backbone("efficientnet_lite0").build("imagenet", 32)
    # weights "none" needs no weights package
    assert get_backbone("efficientnet_lite0").build("none", 32) is not None


def test_wrong_checkpoint_is_rejected():
    state = weights.read_state_dict(weights.checkpoint_path("efficientnet_lite1"))
    with pytest.raises(CatsdogsError, match="unexpected entries"):
        weights.convert_state_dict(LITE0, state)
