"""Exporting runs end to end: real tiny networks, real Core ML / TFLite files, the CLI in subprocesses."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import run_cli
from export_fixtures import session_runs

from catsdogs.app.export import load_head, load_run, softmax_dense
from catsdogs.app.models import KerasModel, TFLiteModel
from catsdogs.dataset.images import load_image


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    return session_runs(tmp_path_factory)


def _images(runs, size, n=6):
    """Prepared test photos of the run's data (the reader's decode + squash resize)."""
    files = sorted((runs["data"] / "test").glob("*.jpg"))[:n]
    return files, [load_image(f, size) for f in files]


@pytest.mark.slow  # uses the session's exported runs (about a minute to build)
def test_manifest_and_files(runs):
    manifest = json.loads((runs["cam_export"] / "export.json").read_text())
    assert manifest["input"] == {**manifest["input"], "name": "image", "shape": [1, 64, 64, 3],
                                 "color_layout": "RGB", "scale": 1.0, "resize": "squash"}
    assert manifest["class_labels"] == ["cat", "dog"]
    assert manifest["parity_with_run"] is True and manifest["notes"] == []
    assert all(entry["reproduces_run"] for entry in manifest["models"]["classifier"].values())
    assert manifest["cam"]["shape"] == [1, 2, 2, 2]
    for kind in ("classifier", "cam"):
        for fmt, entry in manifest["models"][kind].items():
            path = runs["cam_export"] / entry["file"]
            assert path.exists(), (kind, fmt)
            assert entry["bytes"] > 100_000
    neither = manifest["neither"]
    assert neither["threshold"] > 0 and neither["centroids"] >= 1
    assert (runs["cam_export"] / "neither.npz").is_file()
    mixed = json.loads((runs["mixed_export"] / "export.json").read_text())
    assert mixed["input"]["size"] == 71  # one input per backbone size, each prepared by the reader
    assert [(i["name"], i["size"], i["backbones"]) for i in mixed["inputs"]] == [
        ("image", 71, ["xception"]), ("image_64", 64, ["resnet50"])]
    assert mixed["parity_with_run"] is True and mixed["notes"] == []
    assert set(mixed["models"]["classifier"]) == {"keras"} and mixed["cam"] is None
    record = load_run(runs["mixed"]).record
    assert mixed["ranking_logloss"] == pytest.approx(record.ranking_logloss)
    assert mixed["postprocess"]["kind"] == record.postprocess["transform"]["kind"]


@pytest.mark.slow  # uses the session's exported runs (about a minute to build)
def test_coreml_spec(runs):
    ct = pytest.importorskip("coremltools")
    for stem, outputs in (("model", {"prediction": [1, 1], "neither_score": [1, 1]}),
                          ("cam", {"cam": [1, 2, 2, 2], "probabilities": [1, 2]})):
        model = ct.models.MLModel(str(runs["cam_export"] / f"{stem}.mlpackage"), skip_model_load=True)
        spec = model.get_spec()
        assert spec.WhichOneof("Type") == "mlProgram"
        (inp,) = spec.description.input
        assert inp.name == "image" and inp.type.WhichOneof("Type") == "imageType"
        image_type = inp.type.imageType
        assert (image_type.width, image_type.height) == (64, 64)
        assert image_type.colorSpace == ct.proto.FeatureTypes_pb2.ImageFeatureType.RGB
        got = {o.name: list(o.type.multiArrayType.shape) for o in spec.description.output}
        assert got == outputs
        for o in spec.description.output:
            assert o.type.multiArrayType.dataType == ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32
            assert o.shortDescription
        assert inp.shortDescription.startswith("RGB photo resized to 64x64")
        meta = spec.description.metadata
        assert meta.shortDescription and meta.author.startswith("catsdogs") and meta.license == "MIT"
        assert meta.versionString
        user = dict(meta.userDefined)
        assert json.loads(user["classes"]) == ["cat", "dog"]
        assert user["input_size"] == "64" and float(user["neither_threshold"]) > 0


@pytest.mark.slow  # uses the session's exported runs (about a minute to build)
def test_tflite_matches_keras_and_the_run(runs):
    """TFLite == Keras (<= 1e-4) on real photos; Keras end to end == the cached-feature pipeline."""
    exp = runs["cam_export"]
    keras_clf, tfl_clf = KerasModel.load(exp / "model.keras"), TFLiteModel(exp / "model.tflite")
    keras_cam, tfl_cam = KerasModel.load(exp / "cam.keras"), TFLiteModel(exp / "cam.tflite")
    files, images = _images(runs, 64)
    preds = pd.read_csv(runs["cam"] / "test_predictions.csv").set_index("file")
    info = load_run(runs["cam"])
    bias = softmax_dense(load_head(info))[1]
    worst = {}
    for f, img in zip(files, images):
        k, t = keras_clf(img), tfl_clf(img)
        kc, tc = keras_cam(img), tfl_cam(img)
        for name, a, b in (("prediction", k["prediction"], t["prediction"]),
                           ("neither_score", k["neither_score"], t["neither_score"]),
                           ("cam", kc["cam"], tc["cam"]),
                           ("probabilities", kc["probabilities"], tc["probabilities"]),
                           # the classifier gives the run's post-processed P(dog) ...
                           ("run", k["prediction"][0], info.transform.apply(
                               preds.loc[f"test/{f.name}", "p_dog"])),
                           # ... the CAM model the head's own (no post-processing)
                           ("cam_vs_run", kc["probabilities"][1], preds.loc[f"test/{f.name}", "p_dog"])):
            worst[name] = max(worst.get(name, 0.0), float(np.max(np.abs(np.asarray(a) - b))))
        # the maps, averaged over space, plus the head's bias are the softmax logits
        logits = kc["cam"].mean(axis=(0, 1)) + bias
        softmax = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        assert np.allclose(softmax, kc["probabilities"], atol=1e-5)
    print("max abs diff:", {k: f"{v:.2e}" for k, v in worst.items()})
    assert max(worst.values()) <= 1e-4, worst


@pytest.mark.slow  # uses the session's exported runs (about a minute to build)
def test_mixed_sizes_each_backbone_sees_its_own_pixels(runs):
    """Mixed sizes: each backbone gets the photo resized by the reader to its own size (one model
    input per size), so both feature blocks equal the cached features and P(dog) the run's."""
    import keras

    from catsdogs.app import graph  # noqa: F401  (the export's layers)
    from catsdogs.runs.features import find_features

    info = load_run(runs["mixed"])
    model = keras.saving.load_model(runs["mixed_export"] / "model.keras", compile=False)
    features = KerasModel(keras.Model(model.inputs, {"f": model.get_layer("features_0_orig").output}))
    whole = KerasModel(model)
    cached = {b: find_features(runs["data"].parent / "cache", k["config_key"], None).test
              for b, k in info.record.feature_keys.items()}
    files = sorted((runs["data"] / "test").glob("*.jpg"))[:6]
    preds = pd.read_csv(runs["mixed"] / "test_predictions.csv").set_index("file")
    rel = {"resnet50": [], "xception": []}
    p_diff = []
    for f in files:
        inputs = {"image": load_image(f, 71), "image_64": load_image(f, 64)}
        got = features(inputs)["f"]
        start = 0
        for b in info.record.combination:
            ref = cached[b].X[cached[b].files.index(f"test/{f.name}")]
            block = got[start:start + len(ref)]
            start += len(ref)
            rel[b].append(float(np.abs(block - ref).max() / np.abs(ref).max()))
        expected = info.transform.apply(preds.loc[f"test/{f.name}", "p_dog"])
        p_diff.append(abs(float(whole(inputs)["prediction"][0]) - float(expected)))
    assert max(rel["xception"]) <= 1e-4 and max(rel["resnet50"]) <= 1e-4, rel
    assert max(p_diff) <= 1e-4, p_diff


@pytest.mark.slow  # uses the session's exported runs (about a minute to build)
def test_cli_export_and_errors(runs, tmp_path):
    out = tmp_path / "k"
    proc = run_cli("export", str(runs["cam"]), "--format", "keras", "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads(proc.stdout)
    assert set(manifest["models"]["classifier"]) == {"keras"} and (out / "cam.keras").is_file()
    assert json.loads((out / "export.json").read_text())["run_id"] == manifest["run_id"]
    # what the TFLite converter prints (a listing of every captured tensor) is not the user's
    lite = run_cli("export", str(runs["cam"]), "--format", "tflite", "--out", str(tmp_path / "t"),
                   "--json")
    assert lite.returncode == 0 and json.loads(lite.stdout)["models"]["classifier"]["tflite"]
    assert "TensorSpec" not in lite.stderr + lite.stdout
    assert "Saved artifact" not in lite.stderr + lite.stdout

    stack = run_cli("export", str(runs["stack"]), "--out", str(tmp_path / "x"))
    assert stack.returncode == 1 and "Traceback" not in stack.stderr
    assert "Error:" in stack.stderr and "lightgbm_stacking" in stack.stderr
    assert "feature models" in stack.stderr and "cannot" in stack.stderr

    bad = run_cli("export", str(tmp_path), "--format", "tflite")
    assert bad.returncode == 1 and "not a finished run directory" in bad.stderr
    fmt = run_cli("export", str(runs["cam"]), "--format", "onnx")
    assert fmt.returncode == 1 and "unknown export format 'onnx'" in fmt.stderr
    assert "Traceback" not in bad.stderr + fmt.stderr


KEPT_LOGGING = """
import json, logging, os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = sys.argv[1]
logging.getLogger("tensorflow").setLevel(logging.WARNING)
import keras
from catsdogs.app.export import save_coreml
inp = keras.Input((8, 8, 3), name="image")
out = keras.layers.Dense(1, activation="sigmoid")(keras.layers.GlobalAveragePooling2D()(inp))
path = save_coreml(keras.Model(inp, {"prediction": out}), __import__("pathlib").Path(sys.argv[2]),
                   size=8, precision="float32", description="tiny", output_descriptions={},
                   metadata={})
print(json.dumps({"variable": os.environ.get("TF_CPP_MIN_LOG_LEVEL"),
                  "level": logging.getLogger("tensorflow").level, "written": path.exists()}))
"""


def test_a_core_ml_export_leaves_tensorflows_logging_as_it_was(tmp_path):
    """Importing coremltools' TensorFlow frontend sets TF_CPP_MIN_LOG_LEVEL to 3 and TensorFlow's
    logger to FATAL for the whole process (and the variable for every process it starts):
    save_coreml puts both back."""
    pytest.importorskip("coremltools")
    import logging
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    proc = subprocess.run([sys.executable, "-c", KEPT_LOGGING, "1", str(tmp_path / "m.mlpackage")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {"variable": "1", "level": logging.WARNING, "written": True}, proc.stderr[-2000:]
