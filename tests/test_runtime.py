"""``runtime:``: what computes a backbone's float32 features (TensorFlow, or OpenVINO with
``catsdogs[int8]``). The file's checks and the extraction API's, in every env; the features
OpenVINO computes, the CLI, a run predicted from them and the error without OpenVINO are in
``tests/test_int8.py``."""

from __future__ import annotations

import pytest
import yaml

import catsdogs
from catsdogs.errors import ConfigError


def _load(tmp_path, **fields):
    from catsdogs.experiment.spec import load_experiment

    path = tmp_path / "x.yaml"
    doc = {"data": str(tmp_path), "backbones": ["resnet50"], "heads": ["dropout_sigmoid"],
           "optimizers": ["adam"], **fields}
    path.write_text(yaml.safe_dump(doc))
    return load_experiment(path)


def test_the_runtime_is_inherited_and_applies_to_float32_features_only(tmp_path):
    """Top-level ``runtime`` is every backbone's default, a backbone may set its own; int8
    features always run on OpenVINO and bfloat16 ones on TensorFlow, whatever it says."""
    exp = _load(tmp_path, runtime="openvino", precision="int8", predict_precision="float32",
                backbones=["resnet50", {"name": "xception", "runtime": "tensorflow"},
                           {"name": "inception_v3", "precision": "bfloat16"}])
    specs = {b.name: b for b in exp.backbones}
    assert [b.runtime for b in exp.backbones] == ["openvino", "tensorflow", "openvino"]
    assert [specs["resnet50"].runtime_for(p) for p in ("int8", "float32")] == ["tensorflow",
                                                                              "openvino"]
    assert specs["xception"].runtime_for("float32") == "tensorflow"
    assert specs["inception_v3"].runtime_for("bfloat16") == "tensorflow"
    assert _load(tmp_path).backbones[0].runtime == "tensorflow"


@pytest.mark.parametrize("fields, at", [
    ({"backbones": [{"name": "resnet50", "precision": "bfloat16", "runtime": "openvino"}]},
     r"backbones\[0\]\.runtime"),
    ({"precision": "int8", "runtime": "openvino"}, r"runtime"),
    ({"runtime": "onnx"}, r"runtime"),
])
def test_a_runtime_that_computes_nothing_is_one_error_naming_the_field(tmp_path, fields, at):
    """OpenVINO where a backbone has no float32 features (it would change nothing, silently), or
    an unknown runtime: one error naming the file, the line and the field."""
    from catsdogs.experiment.spec import ExperimentError

    with pytest.raises(ExperimentError, match=rf"x\.yaml:\d+: {at}: .*(float32|tensorflow)") as info:
        _load(tmp_path, **fields)
    assert str(info.value).count("\n") == 0


def test_extract_checks_the_runtime_before_reading_anything(tmp_path):
    for runtime, precision, words in (("onnx", "float32", "unknown runtime 'onnx'"),
                                      ("openvino", "bfloat16", "not bfloat16")):
        with pytest.raises(ConfigError, match=words):
            catsdogs.extract(tmp_path / "no-such-dir", "resnet50", weights="none",
                             precision=precision, runtime=runtime, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_the_tensorflow_runtime_keeps_the_keys_of_before():
    """``runtime: tensorflow`` is left out of the key (caches and finished runs stay valid);
    OpenVINO's float32 features have a key of their own."""
    from dataclasses import replace

    from catsdogs.features.cache import FeatureConfig

    config = FeatureConfig(backbone="b", weights="none", weights_id="none", image_size=32,
                           resize="squash", precision="float32", preprocessing="p", feature_dim=4)
    assert "runtime" not in config.identity()
    ov = replace(config, runtime="openvino")
    assert ov.identity()["runtime"] == "openvino" and ov.key != config.key
