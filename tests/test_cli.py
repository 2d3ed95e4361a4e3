"""The CLI in a real subprocess: output, exit codes, one-line errors without tracebacks."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

import catsdogs


def _assert_clean_error(proc, *fragments, code=None):
    assert proc.returncode != 0
    if code is not None:
        assert proc.returncode == code
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr


def test_version_and_help():
    assert run_cli("--version", check=True).stdout.strip() == f"catsdogs, version {catsdogs.__version__}"
    out = run_cli("extract", "--help", check=True).stdout
    for option in ("--backbone", "--weights", "--image-size", "--batch-size", "--cache-dir", "--flip",
                   "--precision"):
        assert option in out


def test_extract_then_cached(kaggle_dir, cache_dir):
    args = ("extract", str(kaggle_dir), "-b", "resnet50", "--weights", "none", "--image-size", "32",
            "--batch-size", "8", "--no-progress")
    first = run_cli(*args, "--json", env={"TF_CPP_MIN_LOG_LEVEL": "2"}, check=True)
    # TensorFlow's absl start-up lines (oneDNN, CUDA probe) are held to the level (tf_log.py)
    assert "absl::InitializeLog" not in first.stderr and "port.cc" not in first.stderr, first.stderr
    (res,) = json.loads(first.stdout)
    assert res["computed"] == 16 and res["path"].startswith(str(cache_dir))  # $CATSDOGS_CACHE_DIR
    assert res["config"]["image_size"] == 32
    again = run_cli(*args, check=True)
    assert "0 computed, 16 cached" in again.stdout and res["path"] in again.stdout


def test_extract_two_backbones_and_flip(kaggle_dir, cache_dir):
    proc = run_cli("extract", str(kaggle_dir), "-b", "resnet50", "-b", "xception", "--weights", "none",
                   "--image-size", "71", "--flip", "--json", "--no-progress", check=True)
    results = json.loads(proc.stdout)
    assert [r["backbone"] for r in results] == ["resnet50", "xception"]
    for r in results:
        fs = catsdogs.load_features(r["path"])
        assert fs.train.X_flip is not None and fs.train.X.shape[1] == fs.meta["feature_dim"]


@pytest.mark.parametrize("args, fragments", [
    (["extract", "/definitely/not/here", "-b", "resnet50"], ["does not exist", "/definitely/not/here"]),
    (["extract", "{data}", "-b", "resnet5O"], ["unknown backbone 'resnet5O'", "resnet50"]),
    (["extract", "{data}", "-b", "resnet50", "--weights", "imagenette"], ["does not offer weights 'imagenette'"]),
    (["extract", "{data}", "-b", "inception_v3", "--weights", "none", "--image-size", "64"],
     ["too small for backbone 'inception_v3'", "minimum 75"]),
    (["extract", "{empty}", "-b", "resnet50"], ["no training images found"]),
])
def test_bad_input_gives_one_clear_line(args, fragments, kaggle_dir, tmp_path, cache_dir):
    (tmp_path / "empty").mkdir()
    args = [a.format(data=kaggle_dir, empty=tmp_path / "empty") for a in args]
    proc = run_cli(*args)
    _assert_clean_error(proc, "Error:", *fragments, code=1)
    assert len([line for line in proc.stderr.splitlines() if line.startswith("Error:")]) == 1


@pytest.mark.parametrize("args, fragment", [
    (["extract", "{data}", "-b", "resnet50", "--precision", "float16"], "Invalid value for '--precision'"),
    (["extract", "{data}", "-b", "resnet50", "--batch-size", "0"], "Invalid value for '--batch-size'"),
    (["extract", "{data}"], "Missing option '--backbone'"),
    (["frobnicate"], "No such command"),
])
def test_usage_errors(args, fragment, kaggle_dir):
    proc = run_cli(*[a.format(data=kaggle_dir) for a in args])
    _assert_clean_error(proc, fragment, code=2)


def test_imagenet_weights_offline_message(kaggle_dir, cache_dir, tmp_path):
    """Without internet the Keras download fails: the user is told what to do, not shown a trace."""
    env = {"HOME": str(tmp_path / "home"), "KERAS_HOME": str(tmp_path / "keras"),
           "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",
           "https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}
    proc = run_cli("extract", str(kaggle_dir), "-b", "resnet50", "--image-size", "32", "--no-progress",
                   env=env, timeout=120)
    # the folder named is the one Keras reads ($KERAS_HOME/models, which Keras's import creates)
    _assert_clean_error(proc, "could not load 'imagenet' weights for backbone 'resnet50'", "--weights none",
                        "copy resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5 into "
                        f"{tmp_path / 'keras' / 'models'} ")
    # the classifier (audit, imagenet_prior) reads the full weights file, with the Dense(1000)
    proc = run_cli("audit", str(kaggle_dir), "--classifier", "resnet50", "--image-size", "32",
                   "--out", str(tmp_path / "audit"), "--no-progress", env=env, timeout=120)
    _assert_clean_error(proc, "could not load 'imagenet' weights for backbone 'resnet50'",
                        "copy resnet50_weights_tf_dim_ordering_tf_kernels.h5 into")
