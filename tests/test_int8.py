"""int8 extraction (OpenVINO + NNCF) and the full-integer TFLite export: real quantised models.

A tiny real backbone (two convolutions + GAP, seeded random weights) is installed as a plugin
distribution so that in-process calls and CLI subprocesses see the same network; calibration,
quantisation, the OpenVINO runtime and the TFLite converter are the real ones.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from conftest import copy_int8_models, install_fake_dist, make_kaggle, run_cli, write_jpeg

import catsdogs
from catsdogs.features import int8

pytestmark = [pytest.mark.int8]

TINY_PLUGIN = '''
from catsdogs.components import Backbone
from catsdogs.hookspecs import hookimpl


class TinyInt8(Backbone):
    name = "tiny_int8"
    input_size = 32
    min_input_size = 16
    feature_dim = 16
    preprocessing = "tf: x / 127.5 - 1"
    weights_options = ("none",)

    def build_model(self, weights, image_size):
        import keras

        from catsdogs.layers import PixelNormalization

        image = keras.Input((image_size, image_size, 3), name="image", dtype="float32")
        x = PixelNormalization(name="preprocess", mean=127.5, std=127.5, bgr=False)(image)
        x = keras.layers.Conv2D(16, 3, strides=2, activation="relu", name="conv1")(x)
        x = keras.layers.Conv2D(16, 3, activation="relu", name="conv2")(x)
        features = keras.layers.GlobalAveragePooling2D(name="gap", dtype="float32")(x)
        return keras.Model(image, features, name=self.name)


@hookimpl
def register_backbones(register):
    register(TinyInt8())
'''
TINY = {"weights": "none", "batch_size": 8, "progress": False}

# run in a subprocess: the engine's packages cannot be imported, then the CLI's extract
BLOCK_IMPORTS = '''
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("openvino", "nncf"):
            raise ImportError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
'''
BLOCK_ENGINE = BLOCK_IMPORTS + '''
from catsdogs.cli import main
sys.argv = ["catsdogs", *sys.argv[1:]]
main()
'''


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    """The tiny backbone's distribution, on sys.path here and on PYTHONPATH for subprocesses."""
    from catsdogs.plugins import reset_registry

    site = install_fake_dist(tmp_path_factory.mktemp("site"), "catsdogs-tiny-int8", "1.0",
                             {"catsdogs_tiny_int8": TINY_PLUGIN},
                             {"tiny_int8": "catsdogs_tiny_int8"})
    sys.path.insert(0, str(site))
    reset_registry()
    yield site
    sys.path.remove(str(site))
    reset_registry()


def _env(site) -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}


def _engine():
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


# --- without the extra -------------------------------------------------------------------------

@pytest.mark.parametrize("option, says", [(["--precision", "int8"], "--precision int8"),
                                          (["--runtime", "openvino"], "runtime: openvino")])
def test_missing_engine_is_one_clear_error(kaggle_dir, tmp_path, option, says):
    """Runs in every env: with openvino/nncf unimportable, --precision int8 and --runtime openvino
    (float32 on OpenVINO) say how to install it, in one line, before anything is written."""
    cache = tmp_path / "cache"
    args = ["extract", str(kaggle_dir), "-b", "resnet50", "--weights", "none", "--image-size", "32",
            *option, "--cache-dir", str(cache), "--no-progress"]
    proc = subprocess.run([sys.executable, "-c", BLOCK_ENGINE, *args], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, proc.stderr
    assert "pip install 'catsdogs[int8]'" in errors[0] and "OpenVINO" in errors[0]
    assert says in errors[0]
    assert "Traceback" not in proc.stderr
    assert not cache.exists(), "nothing is computed or written before the check"


def test_bad_calibration_size_is_rejected(kaggle_dir, tmp_path):
    with pytest.raises(catsdogs.errors.ConfigError, match="calibration size"):
        catsdogs.extract(kaggle_dir, "resnet50", precision="int8", calibration_size=0,
                         cache_dir=tmp_path, **TINY)


# --- the calibration sample and the model's slot --------------------------------------------------

def test_calibration_sample_is_fixed_by_content_and_the_slot_by_configuration(kaggle_dir):
    from catsdogs.dataset.layout import digest_all, open_dataset

    ds = open_dataset(kaggle_dir)
    digests = digest_all(ds.records)
    sample = int8.calibration_sample(ds.records, digests, 5)
    assert len(sample) == 5 and all(rec.split == "train" for rec, _ in sample)
    # the listing order does not matter, only the content
    again = int8.calibration_sample(ds.records[::-1], digests[::-1], 5)
    assert [d for _, d in again] == [d for _, d in sample]
    # more images requested than exist: all of them (12 training images)
    assert len(int8.calibration_sample(ds.records, digests, 100)) == 12
    assert [d for _, d in int8.calibration_sample(ds.records, digests, 5, seed=1)] != \
        [d for _, d in sample]
    # one slot of calibrations per backbone configuration (and seed, engine versions); the
    # sample is not part of it: adding images changes nothing there
    config = {"backbone": "b", "weights": "none", "weights_id": "none", "image_size": 32,
              "resize": "squash", "preprocessing": "x", "feature_dim": 16}
    slots = {int8.slot_key(config), int8.slot_key({**config, "image_size": 40}),
             int8.slot_key({**config, "resize": "crop"}), int8.slot_key(config, seed=1)}
    assert len(slots) == 4 and int8.slot_key(dict(config)) == int8.slot_key(config)


# --- real quantised models -----------------------------------------------------------------------

def test_int8_features_from_a_real_quantised_model(plugin_site, kaggle_dir, tmp_path, caplog):
    _engine()
    import openvino as ov

    cache = tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger="catsdogs"):
        (res,) = catsdogs.extract(kaggle_dir, "tiny_int8", precision="int8", calibration_size=8,
                                  cache_dir=cache, **TINY)
    assert "calibrating int8 tiny_int8 on 8 training images" in caplog.text
    assert res.computed == 16 and "-int8-" in res.path.name
    fs = catsdogs.load_features(res.path)
    assert fs.meta["precision"] == "int8" and res.config.calibration.startswith("ir-")
    assert fs.meta["versions"]["openvino"] and fs.meta["versions"]["nncf"]

    # the features are keyed by the quantised model's own content hash
    ir = int8.ir_dir(res.path)
    assert fs.meta["calibration"] == res.config.calibration == f"ir-{int8.content_digest(ir)[:16]}"
    # the cached model really is quantised: int8 weights behind FakeQuantize / dequantisation
    model = ov.Core().read_model(str(ir / "model.xml"))
    types = {op.get_type_name() for op in model.get_ops()}
    assert "FakeQuantize" in types
    consts = [op for op in model.get_ops() if op.get_type_name() == "Constant"]
    assert any(str(op.get_element_type()) == "<Type: 'int8_t'>" for op in consts)

    (flt,) = catsdogs.extract(kaggle_dir, "tiny_int8", cache_dir=cache, **TINY)
    a, b = fs.train.X, catsdogs.load_features(flt.path).train.X
    assert fs.train.files == catsdogs.load_features(flt.path).train.files
    assert not np.array_equal(a, b), "int8 features are not the float ones"
    assert _cosine(a, b).min() > 0.98

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="catsdogs"):
        (again,) = catsdogs.extract(kaggle_dir, "tiny_int8", precision="int8", calibration_size=8,
                                    cache_dir=cache, **TINY)
    assert again.computed == 0 and again.path == res.path and "calibrating" not in caplog.text

    # another calibration size is another configuration: its own file, its own model
    (other,) = catsdogs.extract(kaggle_dir, "tiny_int8", precision="int8", calibration_size=4,
                                cache_dir=cache, **TINY)
    assert other.path != res.path and other.computed == 16
    assert int8.ir_dir(other.path).is_dir()


def test_new_images_reuse_the_cached_quantised_model(plugin_site, kaggle_dir, tmp_path, caplog):
    """Issue 21 item 2: added *training* images (which change the calibration sample) are one
    forward pass each: same quantised model, same cache file, nothing recomputed."""
    _engine()
    cache = tmp_path / "cache"
    (first,) = catsdogs.extract(kaggle_dir, "tiny_int8", precision="int8", calibration_size=8,
                                cache_dir=cache, **TINY)
    ir = int8.ir_dir(first.path) / "model.bin"
    stamp = ir.stat().st_mtime_ns
    before = catsdogs.load_features(first.path)
    write_jpeg(kaggle_dir / "test" / "99.jpg", seed=4242)
    for i in range(3):  # new training photos: among the first 8 in hash order or not, no matter
        write_jpeg(kaggle_dir / "train" / f"{('cat', 'dog')[i % 2]}.{70 + i}.jpg", seed=5000 + i,
                   label=i % 2)
    with caplog.at_level(logging.INFO, logger="catsdogs"):
        (second,) = catsdogs.extract(kaggle_dir, "tiny_int8", precision="int8", calibration_size=8,
                                     cache_dir=cache, **TINY)
    assert second.path == first.path and second.computed == 4 and second.reused == 16
    assert "calibrating" not in caplog.text and ir.stat().st_mtime_ns == stamp
    after = catsdogs.load_features(second.path)
    assert after.test.X.shape[0] == 5 and after.train.X.shape[0] == 15
    rows = [after.train.files.index(f) for f in before.train.files]
    np.testing.assert_array_equal(after.train.X[rows], before.train.X)

    # --recalibrate: a new calibration on today's sample (its own model and file, unless the
    # quantised model came out byte-identical), the old one left as it was
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="catsdogs"):
        (third,) = catsdogs.extract(kaggle_dir, "tiny_int8", precision="int8", calibration_size=8,
                                    cache_dir=cache, recalibrate=True, **TINY)
    assert "calibrating int8 tiny_int8 on 8 training images" in caplog.text
    assert third.config.calibration == f"ir-{int8.content_digest(int8.ir_dir(third.path))[:16]}"
    assert (third.path == first.path) == (third.config.calibration == first.config.calibration)
    assert ir.stat().st_mtime_ns == stamp
    # the next plain call uses the newest calibration of that size
    (fourth,) = catsdogs.extract(kaggle_dir, "tiny_int8", precision="int8", calibration_size=8,
                                 cache_dir=cache, **TINY)
    assert fourth.path == third.path and fourth.computed == 0


def test_calibration_size_above_the_training_set_is_said_once(plugin_site, kaggle_dir, tmp_path,
                                                             caplog):
    """A size larger than the training set calibrates on all of it, says so once, and every such
    size then uses that one model and one cache file; the model is found read-only."""
    _engine()
    cache = tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger="catsdogs"):
        (big,) = catsdogs.extract(kaggle_dir, "tiny_int8", precision="int8", calibration_size=100,
                                  cache_dir=cache, **TINY)
    assert caplog.text.count("calibration size 100 is more than the 12 training images") == 1
    assert "calibrating int8 tiny_int8 on 12 training images" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="catsdogs"):
        (bigger,) = catsdogs.extract(kaggle_dir, "tiny_int8", precision="int8",
                                     calibration_size=1000, cache_dir=cache, **TINY)
        (exact,) = catsdogs.extract(kaggle_dir, "tiny_int8", precision="int8", calibration_size=12,
                                    cache_dir=cache, **TINY)
    assert bigger.path == exact.path == big.path and bigger.computed == exact.computed == 0
    assert "calibrat" not in caplog.text, "said once, when calibrating"
    assert len(list(cache.rglob("*.openvino"))) == 1
    # a smaller size is another calibration
    (small,) = catsdogs.extract(kaggle_dir, "tiny_int8", precision="int8", calibration_size=6,
                                cache_dir=cache, **TINY)
    assert small.path != big.path and len(list(cache.rglob("*.openvino"))) == 2


def test_extract_int8_json_stdout_is_only_json(plugin_site, kaggle_dir, tmp_path):
    """Issue 21 item 4: NNCF's progress bar and log lines go to stderr (stdout parses as JSON),
    and --no-progress hides the bar."""
    _engine()
    args = ["extract", str(kaggle_dir), "-b", "tiny_int8", "--weights", "none", "--precision",
            "int8", "--calibration-size", "8", "--json"]
    quiet = run_cli(*args, "--no-progress", "--cache-dir", str(tmp_path / "a"),
                    env=_env(plugin_site), check=True)
    (doc,) = json.loads(quiet.stdout)
    assert doc["computed"] == 16 and doc["config"]["calibration"].startswith("ir-")
    assert "Statistics collection" not in quiet.stdout + quiet.stderr
    chatty = run_cli(*args, "--cache-dir", str(tmp_path / "b"), env={**_env(plugin_site),
                                                                    "COLUMNS": "100"}, check=True)
    assert json.loads(chatty.stdout)[0]["computed"] == 16
    assert "Statistics collection" in chatty.stderr


#: run in a subprocess: the CLI, with the int8 model's forward pass gated: once
#: ``CATSDOGS_TEST_CACHE`` holds 5 finished chunks, the next call writes ``CATSDOGS_TEST_GATE`` and
#: blocks until the test kills the process (an event, not a time)
GATED_INT8 = '''
import os
import sys
import time
from pathlib import Path

from catsdogs.features import int8

cache, gate = Path(os.environ["CATSDOGS_TEST_CACHE"]), Path(os.environ["CATSDOGS_TEST_GATE"])
forward = int8.Int8FeatureModel.__call__


def gated(self, images):
    if len(list(cache.rglob("chunk-*.json"))) >= 5:
        gate.write_text(str(os.getpid()))
        while True:
            time.sleep(3600)
    return forward(self, images)


int8.Int8FeatureModel.__call__ = gated
from catsdogs.cli import main
sys.argv = ["catsdogs", *sys.argv[1:]]
main()
'''


@pytest.mark.slow
def test_kill_9_then_resume(plugin_site, tmp_path):
    """kill -9 during int8 extraction, once 5 chunks are written (gated, see GATED_INT8), then a
    resume: the finished chunks and the calibrated model are reused, the features equal a clean
    run's."""
    _engine()
    root = make_kaggle(tmp_path / "d", n_per_class=20, n_test=20)  # 60 images
    cache, gate = tmp_path / "killed", tmp_path / "blocked"
    args = ["extract", str(root), "-b", "tiny_int8", "--weights", "none", "--precision", "int8",
            "--calibration-size", "16", "--batch-size", "1", "--chunk-size", "1", "--cache-dir",
            str(cache), "--no-progress"]
    log = tmp_path / "stderr.txt"
    with open(log, "wb") as stderr:  # a file, not a pipe: a full pipe would block before the gate
        proc = subprocess.Popen([sys.executable, "-c", GATED_INT8, *args], stdout=subprocess.DEVNULL,
                                stderr=stderr, env={**os.environ, **_env(plugin_site),
                                                    "CATSDOGS_TEST_CACHE": str(cache),
                                                    "CATSDOGS_TEST_GATE": str(gate)})
    try:
        while proc.poll() is None and not gate.exists():  # an event: the gate's file
            time.sleep(0.05)
        assert proc.poll() is None, f"the extraction ended before its gate: {log.read_text()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    done = len(list(cache.rglob("chunk-*.json")))
    assert 5 <= done < 60 and not list(cache.rglob("*.h5"))
    (ir,) = cache.rglob("*.openvino")
    stamp = (ir / "model.bin").stat().st_mtime_ns

    (resumed,) = catsdogs.extract(root, "tiny_int8", precision="int8", calibration_size=16,
                                  chunk_size=1, cache_dir=cache, **{**TINY, "batch_size": 1})
    assert resumed.reused >= done and resumed.computed <= 60 - done
    assert (ir / "model.bin").stat().st_mtime_ns == stamp, "the killed run's model is reused"
    assert not list(cache.rglob("chunk-*")) and not list(cache.rglob("*.tmp-*"))
    # a clean run with the same calibration (a fresh one may differ in round-off, so in its key)
    copy_int8_models(resumed.path.parent, tmp_path / "clean" / resumed.path.parent.relative_to(cache))
    (clean,) = catsdogs.extract(root, "tiny_int8", precision="int8", calibration_size=16,
                                cache_dir=tmp_path / "clean", **TINY)
    a, b = catsdogs.load_features(resumed.path), catsdogs.load_features(clean.path)
    assert a.meta["config_key"] == b.meta["config_key"] and a.train.files == b.train.files
    np.testing.assert_allclose(a.train.X, b.train.X, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(a.test.X, b.test.X, rtol=1e-4, atol=1e-5)


# --- full-integer TFLite export and predict ----------------------------------------------------

def _tiny_run(root, plugin_site):
    from catsdogs.experiment.spec import load_experiment
    from catsdogs.runs.runner import run_experiment

    make_kaggle(root / "data", n_per_class=16, n_test=6)
    doc = {"data": str(root / "data"), "output": str(root / "out"), "cache_dir": str(root / "cache"),
           "weights": "none", "backbones": [{"name": "tiny_int8", "precision": "int8",
                                             "calibration_size": 10}],
           "heads": ["dropout_sigmoid"], "optimizers": [{"name": "adam", "learning_rate": 0.01}],
           "epochs": 3, "batch_size": 16, "seed": 7, "validation": {"holdout": 0.25}}
    (root / "exp.yaml").write_text(yaml.safe_dump(doc))
    result = run_experiment(load_experiment(root / "exp.yaml"), progress=False, submit=False)
    (record,) = result.records
    run_id = record["run_id"] if isinstance(record, dict) else record.run_id
    return result.out_dir / "runs" / run_id


@pytest.mark.slow
def test_export_tflite_int8_and_predict(plugin_site, tmp_path):
    _engine()
    from catsdogs.app.export import build_app_model, load_run
    from catsdogs.app.predict import open_predictor, predict_files
    from catsdogs.dataset.images import load_image

    run_dir = _tiny_run(tmp_path, plugin_site)
    export = tmp_path / "export"
    proc = run_cli("export", str(run_dir), "--format", "tflite-int8", "--out", str(export),
                   "--json", env=_env(plugin_site), check=True)
    manifest = json.loads(proc.stdout)
    assert any("extracted in int8" in note for note in manifest["notes"])
    entry = manifest["models"]["classifier"]["tflite-int8"]
    assert entry["file"] == "model.int8.tflite" and (export / entry["file"]).is_file()
    vs = entry["vs_float_on_validation"]
    assert vs["n"] == 8  # the run's validation photos (25 % of 32)
    assert 0.0 <= vs["mean_abs_dp"] <= vs["max_abs_dp"] < 0.1 and vs["label_agreement"] >= 0.75

    # a full-integer model: uint8 input, int8 convolution weights
    import tensorflow as tf

    interp = tf.lite.Interpreter(model_path=str(export / entry["file"]))
    assert interp.get_input_details()[0]["dtype"] == np.uint8
    conv_weights = [t for t in interp.get_tensor_details() if "conv" in t["name"].lower()
                    and len(t["shape"]) == 4 and t["shape"][0] == 16]
    assert conv_weights and all(t["dtype"] == np.int8 for t in conv_weights)

    photos = sorted((tmp_path / "data" / "test").glob("*.jpg"))
    proc = run_cli("predict", *map(str, photos), "--model", str(export), "--json",
                   env=_env(plugin_site), check=True)
    preds = json.loads(proc.stdout)
    predictions = preds if isinstance(preds, list) else preds["predictions"]
    assert len(predictions) == 6 and all(0.0 <= p["p_dog"] <= 1.0 for p in predictions)

    # the int8 file against the float classifier, in process
    predictor = open_predictor(export, "tflite-int8")
    assert predictor.backend == "tflite-int8"
    got = [p.p_dog for p in predict_files(predictor, photos)]
    model = build_app_model(load_run(run_dir))
    want = [float(np.asarray(model(load_image(p, 32)[None].astype(np.float32))["prediction"])[0, 0])
            for p in photos]
    np.testing.assert_allclose(got, want, atol=0.1)


@pytest.fixture(scope="module")
def int8_run(plugin_site, tmp_path_factory):
    """A finished int8 run (k-fold 3, flip TTA, two views merged): ``{"run", "submitted", "photos"}``,
    ``submitted`` its ``submission.csv`` P(dog) by test id."""
    _engine()
    import pandas as pd

    from catsdogs.experiment.spec import load_experiment
    from catsdogs.runs.runner import run_experiment

    root = tmp_path_factory.mktemp("int8-run")
    make_kaggle(root / "data", n_per_class=16, n_test=6)
    doc = {"data": str(root / "data"), "output": str(root / "out"),
           "cache_dir": str(root / "cache"), "weights": "none",
           "backbones": [{"name": "tiny_int8", "precision": "int8", "calibration_size": 10,
                          "views": ["orig", "center"]}],
           "heads": ["dropout_sigmoid"], "optimizers": [{"name": "adam", "learning_rate": 0.01}],
           "epochs": 3, "batch_size": 16, "seed": 7, "tta": True, "validation": {"kfold": 3}}
    (root / "exp.yaml").write_text(yaml.safe_dump(doc))
    result = run_experiment(load_experiment(root / "exp.yaml"), progress=False)
    submitted = pd.read_csv(result.out_dir / "submission.csv").set_index("id")["label"].sort_index()
    return {"run": result.out_dir / "runs" / result.records[0].run_id, "submitted": submitted,
            "photos": sorted((root / "data" / "test").glob("*.jpg"))}


@pytest.mark.slow
def test_an_int8_run_predicts_and_exports_what_it_submitted(plugin_site, int8_run, tmp_path):
    """An int8 run's submission came from the quantised networks' features. Predicting the run
    directory and its default export (format ``openvino``: those networks + the heads graph)
    give the submission itself; the float32 graph (keras) computes other features."""
    import pandas as pd
    from export_fixtures import predict_photos

    from catsdogs.app.predict import open_predictor

    run_dir, submitted, photos = int8_run["run"], int8_run["submitted"], int8_run["photos"]
    # the run directory, unexported: its own quantised networks, by default or by name
    assert open_predictor(run_dir).backend == "openvino"
    assert open_predictor(run_dir, "openvino").backend == "openvino"
    np.testing.assert_allclose(predict_photos(run_dir, photos).sort_index(), submitted, atol=1e-5)

    # the openvino format, which the CLI predicts with by default
    export = tmp_path / "export"
    proc = run_cli("export", str(run_dir), "--format", "keras,openvino", "--out", str(export),
                   "--json", env=_env(plugin_site), check=True)
    manifest = json.loads(proc.stdout)
    models = manifest["models"]["classifier"]
    assert models["openvino"]["reproduces_run"] is True and models["keras"]["reproduces_run"] is False
    assert manifest["parity_with_run"] is True
    vs = manifest["float32_vs_run"]  # measured on the run's validation photos (k-fold: all 32)
    assert vs["n"] == 32 and 1e-4 < vs["max_abs_dp"] < 0.5 and 0 < vs["mean_abs_dp"] <= vs["max_abs_dp"]
    assert {"pipeline.json", "heads.keras", "heads.tflite", "ir"} <= {
        p.name for p in (export / "model.openvino").iterdir()}
    proc = run_cli("predict", *map(str, photos), "--model", str(export), "--json",
                   env=_env(plugin_site), check=True)
    preds = json.loads(proc.stdout)
    preds = preds if isinstance(preds, list) else preds["predictions"]
    got = pd.Series({int(p["file"].rsplit("/", 1)[-1].split(".")[0]): p["p_dog"] for p in preds})
    np.testing.assert_allclose(got.sort_index(), submitted, atol=1e-5)

    # the float32 graph of the same run is not the submission
    floats = predict_photos(export, photos, backend="keras").sort_index()
    assert np.abs(floats - submitted).max() > 1e-4


@pytest.mark.slow
def test_serving_an_int8_run_serves_what_it_submitted(plugin_site, int8_run, tmp_path, monkeypatch):
    """``catsdogs serve RUN`` of an unexported int8 run exports it (tflite and openvino) and
    serves the openvino model over real HTTP on 127.0.0.1: the submission, without TensorFlow."""
    for module in ("fastapi", "uvicorn", "python_multipart"):
        pytest.importorskip(module)
    httpx = pytest.importorskip("httpx")
    import shutil

    from serve_fixtures import Server

    out = tmp_path / "out"  # a copy of the run's output, unexported
    shutil.copytree(int8_run["run"].parent.parent, out, ignore=shutil.ignore_patterns("export"))
    run_dir = out / "runs" / int8_run["run"].name
    monkeypatch.setenv("PYTHONPATH", _env(plugin_site)["PYTHONPATH"])
    server = Server(run_dir, tmp_path / "server.log")
    try:
        health = httpx.get(server.url + "/healthz", timeout=10).json()
        assert health["backend"] == "openvino" and health["tensorflow_loaded"] is False
        assert health["model"] == str(run_dir / "export")
        files = [("file", (p.name, p.read_bytes(), "image/jpeg")) for p in int8_run["photos"]]
        rows = httpx.post(server.url + "/api/predict", files=files, timeout=60).json()
    finally:
        server.stop()
    got = {int(r["file"].split(".")[0]): r["p_dog"] for r in rows}
    np.testing.assert_allclose([got[i] for i in int8_run["submitted"].index],
                               int8_run["submitted"].values, atol=1e-5)


def test_only_an_int8_run_has_the_openvino_format(plugin_site, tmp_path):
    from catsdogs.app.export import export_run
    from catsdogs.errors import ConfigError
    from catsdogs.experiment.spec import load_experiment
    from catsdogs.runs.runner import run_experiment

    make_kaggle(tmp_path / "data", n_per_class=8, n_test=2)
    doc = {"data": str(tmp_path / "data"), "output": str(tmp_path / "out"),
           "cache_dir": str(tmp_path / "cache"), "weights": "none", "backbones": ["tiny_int8"],
           "heads": ["dropout_sigmoid"], "optimizers": ["adam"], "epochs": 1, "batch_size": 8}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(doc))
    result = run_experiment(load_experiment(tmp_path / "exp.yaml"), progress=False, submit=False)
    run_dir = result.out_dir / "runs" / result.records[0].run_id
    with pytest.raises(ConfigError, match="cannot be exported as openvino: its features were not "
                                          "extracted in int8"):
        export_run(run_dir, "openvino", tmp_path / "x")
    assert not (tmp_path / "x" / "model.openvino").exists()
    from catsdogs.app.predict import open_predictor

    with pytest.raises(ConfigError, match="was not extracted in int8, so it has no openvino model"):
        open_predictor(run_dir, "openvino")
    assert open_predictor(run_dir, "keras").backend == "keras"


def test_an_int8_run_without_its_cached_networks_says_so(int8_run, tmp_path, caplog):
    """Where the run's feature cache (and so its quantised networks) is not at hand, predicting
    the run directory falls back to the float32 graph with one warning saying it is not the
    submission, and the default export writes the other formats and notes the missing one."""
    import shutil

    from catsdogs.app.predict import open_predictor

    out = tmp_path / "out"
    shutil.copytree(int8_run["run"].parent.parent, out, ignore=shutil.ignore_patterns("export"))
    experiment = json.loads((out / "experiment.json").read_text())
    experiment["cache_dir"] = str(tmp_path / "empty-cache")
    (out / "experiment.json").write_text(json.dumps(experiment))
    run_dir = out / "runs" / int8_run["run"].name
    with caplog.at_level(logging.WARNING, logger="catsdogs"):
        predictor = open_predictor(run_dir)
    assert predictor.backend == "keras"
    said = [r.getMessage() for r in caplog.records if "float32 graph" in r.getMessage()]
    assert len(said) == 1 and "does not compute what run" in said[0] and "empty-cache" in said[0]
    from catsdogs.errors import DataError

    with pytest.raises(DataError, match="empty-cache"):  # asked for by name: no fallback
        open_predictor(run_dir, "openvino")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="catsdogs"):  # the float32 graph, by name
        assert open_predictor(run_dir, "keras").backend == "keras"
    assert any("does not compute what the run submitted" in r.getMessage() for r in caplog.records)

    # export: asked for, the openvino format is an error; by default it is left out, said
    from catsdogs.app.export import export_run

    with pytest.raises(DataError, match="empty-cache"):
        export_run(run_dir, "openvino", tmp_path / "asked", neither=False)
    manifest = export_run(run_dir, out=tmp_path / "default", neither=False)
    assert "openvino" not in manifest["models"]["classifier"] and "keras" in manifest["models"]["classifier"]
    assert manifest["parity_with_run"] is False
    assert any("openvino format, the one that reproduces" in n for n in manifest["notes"])


def _damage(path) -> None:
    """Flip one byte in the middle of ``path`` (same size: only a content hash tells)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_damaged_quantised_network_is_never_run(int8_run, tmp_path, caplog):
    """The quantised network an int8 run's features came from is checked against its content hash
    (the name of its cache folder; the ``digest`` an export records) before it computes anything:
    a damaged one gives the run's export one clear error, an exported one the predictor one, and
    predicting the run directory falls back to the float32 graph with a warning."""
    import shutil

    from catsdogs.app.export import export_run
    from catsdogs.app.predict import open_predictor
    from catsdogs.errors import DataError
    from catsdogs.features.int8 import content_digest

    out, cache = tmp_path / "out", tmp_path / "cache"
    shutil.copytree(int8_run["run"].parent.parent, out, ignore=shutil.ignore_patterns("export"))
    experiment = json.loads((out / "experiment.json").read_text())
    shutil.copytree(experiment["cache_dir"], cache)
    experiment["cache_dir"] = str(cache)
    (out / "experiment.json").write_text(json.dumps(experiment))
    run_dir = out / "runs" / int8_run["run"].name

    # intact: exported, the export records each network's hash, and its predictor runs it
    export = export_run(run_dir, "openvino", tmp_path / "export", neither=False)
    folder = tmp_path / "export" / "model.openvino"
    sources = json.loads((folder / "pipeline.json").read_text())["sources"]
    assert {n: s["digest"] for n, s in sources.items()} == {
        n: content_digest(folder / s["ir"]) for n, s in sources.items()}
    assert export["models"]["classifier"]["openvino"]["reproduces_run"] is True
    assert open_predictor(tmp_path / "export").backend == "openvino"

    # an export written before digests were recorded: loaded, with a warning that it is unchecked
    manifest = json.loads((folder / "pipeline.json").read_text())
    old = {**manifest, "sources": {n: {k: v for k, v in s.items() if k != "digest"}
                                   for n, s in manifest["sources"].items()}}
    (folder / "pipeline.json").write_text(json.dumps(old))
    with caplog.at_level(logging.WARNING, logger="catsdogs"):
        assert open_predictor(tmp_path / "export").backend == "openvino"
    assert any("does not record its network's content hash" in r.getMessage()
               for r in caplog.records)
    (folder / "pipeline.json").write_text(json.dumps(manifest))
    caplog.clear()

    # a damaged network in the export: one error naming it, nothing predicted with it
    _damage(folder / "ir" / "tiny_int8" / "model.bin")
    with pytest.raises(DataError, match=r"ir/tiny_int8: the quantised network is not the one .*"
                                        r"export the run again"):
        open_predictor(tmp_path / "export")

    # a damaged network in the feature cache
    (ir,) = cache.glob("features/*/tiny_int8-int8-*.openvino")
    _damage(ir / "model.bin")
    with pytest.raises(DataError, match="is not the one the features were computed with"):
        export_run(run_dir, "openvino", tmp_path / "again", neither=False)
    with caplog.at_level(logging.WARNING, logger="catsdogs"):
        assert open_predictor(run_dir).backend == "keras"
    assert any("is not the one the features were computed with" in r.getMessage()
               for r in caplog.records)


def test_a_server_says_once_that_its_model_is_not_the_submission(int8_run, tmp_path, caplog):
    """A float32 export of an int8 run served with several slots: one warning, not one a slot."""
    from catsdogs.app.export import export_run
    from catsdogs.app.serve import ModelPool

    export_run(int8_run["run"], "tflite", tmp_path / "export", neither=False)
    with caplog.at_level(logging.WARNING, logger="catsdogs"):
        pool = ModelPool(tmp_path / "export", 3)
    assert pool.backend == "tflite" and pool.size == 3
    said = [r for r in caplog.records if "does not compute what the run submitted" in r.getMessage()]
    assert len(said) == 1


@pytest.mark.slow
def test_an_int8_trained_run_predicted_from_float32_exports_what_it_submitted(plugin_site, tmp_path):
    """``precision: int8`` with ``predict_precision: float32`` (``experiments/best.yaml``): the
    heads are trained on the quantised network's features, the submission is predicted from the
    float32 network's, so the run is a float32 run for predict and export: its run directory and
    its default export (keras and tflite, no openvino) give the submission itself."""
    _engine()
    import pandas as pd
    from export_fixtures import predict_photos

    from catsdogs.app.predict import open_predictor
    from catsdogs.experiment.spec import load_experiment
    from catsdogs.runs.features import locate_features
    from catsdogs.runs.runner import run_experiment

    make_kaggle(tmp_path / "data", n_per_class=16, n_test=6)
    doc = {"data": str(tmp_path / "data"), "output": str(tmp_path / "out"),
           "cache_dir": str(tmp_path / "cache"), "weights": "none", "precision": "int8",
           "predict_precision": "float32",
           "backbones": [{"name": "tiny_int8", "calibration_size": 10}],
           "heads": ["dropout_sigmoid"], "optimizers": [{"name": "adam", "learning_rate": 0.01}],
           "epochs": 3, "batch_size": 16, "seed": 7, "tta": True, "validation": {"kfold": 3}}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(doc))
    result = run_experiment(load_experiment(tmp_path / "exp.yaml"), progress=False)
    (record,) = result.records
    trained = locate_features(tmp_path / "cache", **_key(record.feature_keys["tiny_int8"]))[1]
    predicted = locate_features(tmp_path / "cache", **_key(record.predicting_keys["tiny_int8"]))[1]
    assert (trained["precision"], predicted["precision"]) == ("int8", "float32")
    submitted = pd.read_csv(result.out_dir / "submission.csv").set_index("id")["label"].sort_index()
    photos = sorted((tmp_path / "data" / "test").glob("*.jpg"))
    run_dir = result.out_dir / "runs" / record.run_id

    assert open_predictor(run_dir).backend == "keras"
    np.testing.assert_allclose(predict_photos(run_dir, photos).sort_index(), submitted, atol=1e-5)
    export = tmp_path / "export"
    proc = run_cli("export", str(run_dir), "--out", str(export), "--json", env=_env(plugin_site),
                   check=True)
    manifest = json.loads(proc.stdout)
    assert "openvino" not in manifest["models"]["classifier"]
    assert manifest["models"]["classifier"]["tflite"]["reproduces_run"] is True
    assert manifest["parity_with_run"] is True and "float32_vs_run" not in manifest
    np.testing.assert_allclose(predict_photos(export, photos, "tflite").sort_index(), submitted,
                               atol=1e-5)


def _key(key: dict) -> dict:
    return {"config_key": key["config_key"], "fingerprint": key["dataset_fingerprint"]}


def test_float32_by_openvino_equals_tensorflow_and_is_keyed_apart(plugin_site, kaggle_dir,
                                                                  tmp_path):
    """``runtime: openvino``: the same network converted and run in float32 gives TensorFlow's
    features to float32 round-off, cached under its own key (TensorFlow's file is untouched);
    a second call, and the CLI's, compute nothing."""
    _engine()
    cache = tmp_path / "cache"
    (tf_res,) = catsdogs.extract(kaggle_dir, "tiny_int8", cache_dir=cache, **TINY)
    (ov_res,) = catsdogs.extract(kaggle_dir, "tiny_int8", runtime="openvino", cache_dir=cache, **TINY)
    assert ov_res.path != tf_res.path and ov_res.computed == 16
    assert (tf_res.config.runtime, ov_res.config.runtime) == ("tensorflow", "openvino")
    a, b = (catsdogs.load_features(r.path) for r in (tf_res, ov_res))
    assert b.meta["runtime"] == "openvino" and b.meta["precision"] == "float32"
    assert a.train.files == b.train.files
    np.testing.assert_allclose(b.train.X, a.train.X, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(b.test.X, a.test.X, rtol=1e-4, atol=1e-5)
    (again,) = catsdogs.extract(kaggle_dir, "tiny_int8", runtime="openvino", cache_dir=cache, **TINY)
    assert again.path == ov_res.path and again.computed == 0
    proc = run_cli("extract", str(kaggle_dir), "-b", "tiny_int8", "--weights", "none",
                   "--batch-size", "8", "--runtime", "openvino", "--cache-dir", str(cache),
                   "--no-progress", "--json", env=_env(plugin_site), check=True)
    (out,) = json.loads(proc.stdout)  # stdout is only the JSON
    assert out["path"] == str(ov_res.path) and out["computed"] == 0
    assert out["config"]["runtime"] == "openvino"


def test_a_run_predicted_from_openvino_float32_exports_its_submission(plugin_site, tmp_path):
    """``experiments/best.yaml`` with ``runtime: openvino``: heads trained on int8 features, every
    held-out and test row predicted from float32 features computed by OpenVINO. The run directory
    and its TFLite export (TensorFlow's float32 graph) give its submission."""
    _engine()
    import pandas as pd
    from export_fixtures import predict_photos

    from catsdogs.experiment.spec import load_experiment
    from catsdogs.runs.features import locate_features
    from catsdogs.runs.runner import run_experiment

    make_kaggle(tmp_path / "data", n_per_class=16, n_test=6)
    doc = {"data": str(tmp_path / "data"), "output": str(tmp_path / "out"),
           "cache_dir": str(tmp_path / "cache"), "weights": "none", "precision": "int8",
           "predict_precision": "float32", "runtime": "openvino",
           "backbones": [{"name": "tiny_int8", "calibration_size": 10}],
           "heads": ["dropout_sigmoid"], "optimizers": [{"name": "adam", "learning_rate": 0.01}],
           "epochs": 3, "batch_size": 16, "seed": 7, "validation": {"kfold": 3}}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(doc))
    result = run_experiment(load_experiment(tmp_path / "exp.yaml"), progress=False)
    (record,) = result.records
    predicted = locate_features(tmp_path / "cache", **_key(record.predicting_keys["tiny_int8"]))[1]
    assert (predicted["precision"], predicted["runtime"]) == ("float32", "openvino")
    submitted = pd.read_csv(result.out_dir / "submission.csv").set_index("id")["label"].sort_index()
    photos = sorted((tmp_path / "data" / "test").glob("*.jpg"))
    run_dir = result.out_dir / "runs" / record.run_id
    np.testing.assert_allclose(predict_photos(run_dir, photos).sort_index(), submitted, atol=1e-5)
    export = tmp_path / "export"
    proc = run_cli("export", str(run_dir), "--out", str(export), "--format", "tflite", "--json",
                   env=_env(plugin_site), check=True)
    assert json.loads(proc.stdout)["parity_with_run"] is True
    np.testing.assert_allclose(predict_photos(export, photos, "tflite").sort_index(), submitted,
                               atol=1e-5)


@pytest.fixture
def split_env(tmp_path_factory):
    """A generated data set with the tiny split-capable network registered (its maps feed the
    ``finetune`` head)."""
    from export_fixtures import tiny_env

    from catsdogs.testing import TinyTopSplit

    with tiny_env(tmp_path_factory, "maps-runtime", [TinyTopSplit()]) as env:
        yield env


def test_maps_by_openvino_are_tensorflows_to_float16_round_off_and_keyed_apart(split_env):
    """``maps_runtime: openvino``: the bottom converted and run by OpenVINO in float32 gives
    TensorFlow's float16 maps but for round-off, cached in their own folder under their own key;
    TensorFlow's key is the one it had before the choice existed (its caches stay valid), and a
    second call computes nothing."""
    _engine()
    import hashlib
    from dataclasses import asdict

    from catsdogs.features.maps import MAPS_FORMAT, cache_maps
    from catsdogs.testing import TinyTopSplit

    cache = split_env["root"] / "cache"
    common = {"weights": "none", "cache_dir": cache, "batch_size": 8}
    tf_maps = cache_maps(split_env["data"], TinyTopSplit.name, **common)
    ov_maps = cache_maps(split_env["data"], TinyTopSplit.name, runtime="openvino", **common)
    assert (tf_maps.config.runtime, ov_maps.config.runtime) == ("tensorflow", "openvino")
    assert ov_maps.path != tf_maps.path and "-maps1-openvino-" in ov_maps.path.name
    assert ov_maps.config.key != tf_maps.config.key and ov_maps.computed == tf_maps.computed == 40
    before = {k: v for k, v in asdict(tf_maps.config).items() if k != "runtime"}
    blob = json.dumps({**before, "kind": "maps", "dtype": "float16", "format": MAPS_FORMAT},
                      sort_keys=True)
    assert tf_maps.config.key == hashlib.sha256(blob.encode()).hexdigest()[:16]
    for a, b in ((tf_maps.train, ov_maps.train), (tf_maps.test, ov_maps.test)):
        assert a.files == b.files and b.X.dtype == np.float16 and b.X.shape == a.X.shape
        np.testing.assert_allclose(b.X.astype(np.float32), a.X.astype(np.float32), atol=2e-3)
        assert np.mean(a.X == b.X) > 0.9  # the same float16 values, but for round-off
    again = cache_maps(split_env["data"], TinyTopSplit.name, runtime="openvino", **common)
    assert again.path == ov_maps.path and again.computed == 0
    np.testing.assert_array_equal(again.train.X, ov_maps.train.X)


def test_a_finetune_run_on_openvino_maps_exports_its_submission(split_env):
    """A ``finetune`` run trained and predicted on maps computed by OpenVINO (``maps_runtime:
    openvino``) is a run of its own (its settings name the OpenVINO maps); its run directory and
    its Keras and TFLite exports (TensorFlow's bottom, then the fine-tuned top) predict its
    submission."""
    _engine()
    import pandas as pd
    from export_fixtures import predict_photos, tiny_experiment

    from catsdogs.app.export import export_run
    from catsdogs.features.maps import maps_config
    from catsdogs.runs.runner import run_experiment
    from catsdogs.testing import TinyTopSplit

    root, data = split_env["root"], split_env["data"]
    fields = {"backbones": [TinyTopSplit.name], "heads": ["finetune"], "validation": {"kfold": 3}}
    (tf_run,) = run_experiment(tiny_experiment(root, data, "tf", **fields), progress=False).records
    result = run_experiment(tiny_experiment(root, data, "ov", maps_runtime="openvino", **fields),
                            progress=False)
    (record,) = result.records
    ov_key = maps_config(TinyTopSplit(), "none", None, 1, "squash", "openvino").key
    assert record.settings["maps"] == {f"{TinyTopSplit.name}/maps1": ov_key}
    assert tf_run.settings["maps"] != record.settings["maps"]
    assert len(list((root / "cache").rglob("*-maps1-openvino-*/chunk-*.npz"))) >= 1
    submitted = pd.read_csv(result.out_dir / "submission.csv").set_index("id")["label"].sort_index()
    photos = sorted((data / "test").glob("*.jpg"))
    run_dir = result.out_dir / "runs" / record.run_id
    export_run(run_dir, ["keras", "tflite"], result.out_dir / "export", neither=False)
    for model, backend in ((run_dir, "auto"), (result.out_dir / "export", "keras"),
                           (result.out_dir / "export", "tflite")):
        got = predict_photos(model, photos, backend).sort_index()
        assert np.abs(got.to_numpy() - submitted.to_numpy()).max() <= 1e-3, (model, backend)


# the same block, then an experiment with the split-capable tiny network registered
BLOCK_ENGINE_RUN = BLOCK_IMPORTS + '''
from catsdogs.experiment.spec import load_experiment
from catsdogs.plugins import get_registry
from catsdogs.runs.runner import run_experiment
from catsdogs.testing import TinyTopSplit
with get_registry().temporarily("backbones", TinyTopSplit(), "tests"):
    run_experiment(load_experiment(sys.argv[1]), progress=False)
'''


def test_maps_by_openvino_without_it_is_one_clear_error_before_extraction(tmp_path):
    """Runs in every env: with OpenVINO unimportable, an experiment whose fine-tune maps are to be
    computed by it fails at once, naming the field and the extra, before any feature is
    extracted."""
    from catsdogs.testing import TinyTopSplit

    data = make_kaggle(tmp_path / "data", n_per_class=4, n_test=2)
    doc = {"data": str(data), "output": str(tmp_path / "out"), "cache_dir": str(tmp_path / "cache"),
           "weights": "none", "maps_runtime": "openvino", "backbones": [TinyTopSplit.name],
           "heads": ["finetune"], "optimizers": ["adam"], "epochs": 1}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(doc))
    proc = subprocess.run([sys.executable, "-c", BLOCK_ENGINE_RUN, str(tmp_path / "exp.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "MissingExtraError" in proc.stderr and "pip install 'catsdogs[int8]'" in proc.stderr
    assert f"maps_runtime: openvino ({TinyTopSplit.name}'s fine-tune maps" in proc.stderr
    assert not (tmp_path / "cache").exists(), "no feature is extracted before the check"
