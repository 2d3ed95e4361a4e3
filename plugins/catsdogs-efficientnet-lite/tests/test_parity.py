"""Parity with the PyTorch reference (efficientnet-lite-pytorch) on real photos, same weights."""

from __future__ import annotations

import numpy as np
import pytest

from catsdogs_efficientnet_lite import get_backbone
from catsdogs_efficientnet_lite.weights import checkpoint_path

from conftest import REPORT, VARIANT_NAMES

TOLERANCE = 1e-3
N_PER_CLASS = 12


@pytest.fixture(scope="module")
def reference():
    torch = pytest.importorskip("torch", exc_type=ImportError)
    pytest.importorskip("efficientnet_lite_pytorch", exc_type=ImportError)
    from efficientnet_lite_pytorch import EfficientNet

    torch.set_num_threads(2)

    def run(name: str, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        backbone = get_backbone(name)
        model = EfficientNet.from_pretrained(backbone.variant.reference_name,
                                             weights_path=str(checkpoint_path(name))).eval()
        assert model.input_image_size == backbone.input_size  # its static padding is for this size
        x = torch.from_numpy(np.ascontiguousarray(((pixels - 127.0) / 128.0).transpose(0, 3, 1, 2)))
        with torch.no_grad():
            logits = model(x).numpy()
            features = model.extract_features(x).mean(dim=(2, 3)).numpy()
        return logits, features

    return run


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_imagenet_logits_match_the_pytorch_reference(name, reference, imagenet_classifier, mini_images):
    size = get_backbone(name).input_size
    pixels = np.concatenate([mini_images(size, "cat", N_PER_CLASS), mini_images(size, "dog", N_PER_CLASS)])
    ref_logits, ref_features = reference(name, pixels)
    out = imagenet_classifier(name).predict(pixels, batch_size=8, verbose=0)
    logit_diff = float(np.abs(out["logits"] - ref_logits).max())
    feature_diff = float(np.abs(out["features"] - ref_features).max())
    REPORT.append(("parity", f"{name} ({size} px, {len(pixels)} photos): max |logit diff| "
                             f"{logit_diff:.2e}, max |feature diff| {feature_diff:.2e}, "
                             f"logit range {np.abs(ref_logits).max():.1f}"))
    print(REPORT[-1][1])
    assert logit_diff <= TOLERANCE
    assert feature_diff <= TOLERANCE
    assert (out["logits"].argmax(1) == ref_logits.argmax(1)).all()
