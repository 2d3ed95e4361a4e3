"""Exporting runs end to end: real tiny networks, real Core ML / TFLite files, the CLI in subprocesses."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import run_cli
from export_fixtures import session_runs
from PIL import Image

from catsdogs.app.export import load_head, load_run, pillow_bilinear_matrix, softmax_dense
from catsdogs.app.models import KerasModel, TFLiteModel
from catsdogs.dataset.images import load_image


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    return session_runs(tmp_path_factory)


def _images(runs, size, n=6):
    """Prepared test photos of the run's data (the reader's decode + squash resize)."""
    files = sorted((runs["data"] / "test").glob("*.jpg"))[:n]
    return files, [load_image(f, size) for f in files]


def test_pillow_matrix_is_pillows_resize():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (71, 71, 3), dtype=np.uint8)
    for size in (64, 40, 71):
        a = pillow_bilinear_matrix(71, size)
        assert np.allclose(a.sum(axis=1), 1.0, atol=1e-6)
        ours = np.einsum("ij,jkc,lk->ilc", a, img.astype(np.float64), a)
        pil = np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR), np.float64)
        assert np.abs(ours - pil).max() <= 1.0  # Pillow rounds to uint8 after each pass


@pytest.mark.slow  # uses the session's exported runs (about a minute to build)
def test_manifest_and_files(runs):
    manifest = json.loads((runs["cam_export"] / "export.json").read_text())
    assert manifest["input"] == {**manifest["input"], "name": "image", "shape": [1, 64, 64, 3],
                                 "color_layout": "RGB", "scale": 1.0, "resize": "squash"}
    assert manifest["class_labels"] == ["cat", "dog"]
    assert manifest["parity_with_run"] is True and manifest["notes"] == []
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
    assert mixed["input"]["size"] == 71 and mixed["in_graph_resize"] == {"resnet50": [71, 64]}
    assert mixed["parity_with_run"] is False and "mixed input sizes" in mixed["notes"][0]
    assert set(mixed["models"]["classifier"]) == {"keras"} and mixed["cam"] is None


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
    bias = softmax_dense(load_head(load_run(runs["cam"])))[1]
    worst = {}
    for f, img in zip(files, images):
        k, t = keras_clf(img), tfl_clf(img)
        kc, tc = keras_cam(img), tfl_cam(img)
        for name, a, b in (("prediction", k["prediction"], t["prediction"]),
                           ("neither_score", k["neither_score"], t["neither_score"]),
                           ("cam", kc["cam"], tc["cam"]),
                           ("probabilities", kc["probabilities"], tc["probabilities"]),
                           ("run", k["prediction"][0], preds.loc[f"test/{f.name}", "p_dog"]),
                           ("cam_vs_classifier", kc["probabilities"][1], k["prediction"][0])):
            worst[name] = max(worst.get(name, 0.0), float(np.max(np.abs(np.asarray(a) - b))))
        # the maps, averaged over space, plus the head's bias are the softmax logits
        logits = kc["cam"].mean(axis=(0, 1)) + bias
        softmax = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        assert np.allclose(softmax, kc["probabilities"], atol=1e-5)
    print("max abs diff:", {k: f"{v:.2e}" for k, v in worst.items()})
    assert max(worst.values()) <= 1e-4, worst


def test_in_graph_resize_converts_to_tflite(tmp_path):
    import keras

    from catsdogs.app.export import resize_in_graph, save_tflite

    image = keras.Input((71, 71, 3), name="image")
    small = resize_in_graph(image, 71, 64, "resize")
    model = keras.Model(image, {"small": small})
    save_tflite(model, tmp_path / "resize.tflite")
    img = np.random.default_rng(1).integers(0, 256, (71, 71, 3)).astype(np.float32)
    k = KerasModel(model)(img)["small"]
    t = TFLiteModel(tmp_path / "resize.tflite")(img)["small"]
    pil = np.asarray(Image.fromarray(img.astype(np.uint8)).resize((64, 64), Image.BILINEAR), np.float32)
    assert k.shape == t.shape == (64, 64, 3)
    assert np.abs(k - t).max() <= 1e-3 and np.abs(k - pil).max() <= 1.0


@pytest.mark.slow  # uses the session's exported runs (about a minute to build)
def test_mixed_sizes_parity_measured(runs):
    """Mixed sizes: the equal-size block matches the cache; the resized block differs (measured)."""
    import keras

    from catsdogs.runs.features import find_features

    info = load_run(runs["mixed"])
    model = keras.saving.load_model(runs["mixed_export"] / "model.keras", compile=False)
    features = KerasModel(keras.Model(model.input, {"f": model.get_layer("features").output}))
    cached = {b: find_features(runs["data"].parent / "cache", k["config_key"], None).test
              for b, k in info.record.feature_keys.items()}
    files, images = _images(runs, 71)
    preds = pd.read_csv(runs["mixed"] / "test_predictions.csv").set_index("file")
    rel = {"resnet50": [], "xception": []}
    p_diff = []
    for f, img in zip(files, images):
        got = features(img)["f"]
        start = 0
        for b in info.combination:
            ref = cached[b].X[cached[b].files.index(f"test/{f.name}")]
            block = got[start:start + len(ref)]
            start += len(ref)
            rel[b].append(float(np.abs(block - ref).max() / np.abs(ref).max()))
        p_diff.append(abs(model(img[None])["prediction"].numpy()[0, 0] - preds.loc[f"test/{f.name}", "p_dog"]))
    print(f"mixed sizes (71 px input; resnet50 71->64 in the graph): max relative feature difference "
          f"resnet50 {max(rel['resnet50']):.2e}, xception {max(rel['xception']):.2e}; "
          f"P(dog) max difference {max(p_diff):.2e} (this tiny random run's P(dog) is saturated)")
    assert max(rel["xception"]) <= 1e-4  # same size: same pixels, same features
    assert 1e-4 < max(rel["resnet50"]) < 0.5  # photo -> 71 -> 64 is not photo -> 64


@pytest.mark.slow  # uses the session's exported runs (about a minute to build)
def test_cli_export_and_errors(runs, tmp_path):
    out = tmp_path / "k"
    proc = run_cli("export", str(runs["cam"]), "--format", "keras", "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads(proc.stdout)
    assert set(manifest["models"]["classifier"]) == {"keras"} and (out / "cam.keras").is_file()
    assert json.loads((out / "export.json").read_text())["run_id"] == manifest["run_id"]

    stack = run_cli("export", str(runs["stack"]), "--out", str(tmp_path / "x"))
    assert stack.returncode == 1 and "Traceback" not in stack.stderr
    assert "Error:" in stack.stderr and "lightgbm_stacking" in stack.stderr
    assert "feature models" in stack.stderr and "cannot" in stack.stderr

    bad = run_cli("export", str(tmp_path), "--format", "tflite")
    assert bad.returncode == 1 and "not a finished run directory" in bad.stderr
    fmt = run_cli("export", str(runs["cam"]), "--format", "onnx")
    assert fmt.returncode == 1 and "unknown export format 'onnx'" in fmt.stderr
    assert "Traceback" not in bad.stderr + fmt.stderr
