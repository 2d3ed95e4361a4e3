"""Feature extraction and the cache: correctness, reuse, invalidation, durability (kill -9)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from conftest import TINY, assert_same_features, make_kaggle, run_cli, write_jpeg

import catsdogs
from catsdogs.dataset.images import load_image
from catsdogs.errors import ConfigError, PluginError
from catsdogs.features import cache as cache_mod
from catsdogs.features import extraction as features_mod
from catsdogs.plugins import get_registry


def _extract(root, cache, **kw):
    opts = {**TINY, "cache_dir": cache, "progress": False, **kw}
    return catsdogs.extract(root, opts.pop("backbones"), **opts)


@pytest.fixture(scope="module")
def tiny_model():
    return get_registry().backbone("resnet50").build("none", 32)


def test_extract_writes_complete_feature_file(kaggle_dir, tmp_path, tiny_model):
    (res,) = _extract(kaggle_dir, tmp_path / "c")
    assert (res.n_train, res.n_test, res.computed, res.reused) == (12, 4, 16, 0)
    fs = catsdogs.load_features(res.path)
    assert fs.train.X.shape == (12, 2048) and fs.test.X.shape == (4, 2048)
    assert fs.train.X.dtype == np.float32 and fs.train.X_flip is None
    assert fs.train.y.tolist() == [0] * 6 + [1] * 6
    assert fs.train.ids.tolist() == list(range(1, 7)) * 2 and fs.test.ids.tolist() == [1, 2, 3, 4]
    assert fs.train.files[0] == "train/cat.1.jpg" and fs.test.files[-1] == "test/4.jpg"
    meta = fs.meta
    for key in ("backbone", "weights", "weights_id", "image_size", "preprocessing", "precision",
                "resize", "dataset_fingerprint", "dataset_root", "versions", "views", "created"):
        assert key in meta, key
    assert meta["backbone"] == "resnet50" and meta["image_size"] == 32 and meta["weights"] == "none"
    assert meta["weights_id"].startswith("random-seed") and "caffe" in meta["preprocessing"]
    assert {"tensorflow", "keras", "numpy", "h5py", "catsdogs"} <= set(meta["versions"])
    # the stored features are exactly the backbone applied to the decoded, resized image
    for i in (0, 7):
        img = load_image(kaggle_dir / fs.train.files[i], 32).astype(np.float32)[None]
        np.testing.assert_allclose(fs.train.X[i], np.asarray(tiny_model(img))[0], rtol=1e-4, atol=1e-4)


def test_second_identical_call_does_no_forward_pass(kaggle_dir, tmp_path, monkeypatch):
    (first,) = _extract(kaggle_dir, tmp_path / "c")
    mtime = first.path.stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("a model was built for a cached call")

    monkeypatch.setattr(features_mod, "FeatureModel", boom)
    (again,) = _extract(kaggle_dir, tmp_path / "c")
    assert (again.computed, again.reused) == (0, 16)
    assert again.path == first.path and again.path.stat().st_mtime_ns == mtime


def test_changes_in_the_data_are_detected(kaggle_dir, tmp_path, tiny_model):
    cache = tmp_path / "c"
    (base,) = _extract(kaggle_dir, cache)
    before = catsdogs.load_features(base.path)

    write_jpeg(kaggle_dir / "train" / "dog.7.jpg", 4242, label=1)  # added
    (res,) = _extract(kaggle_dir, cache)
    assert (res.computed, res.n_train) == (1, 13)

    write_jpeg(kaggle_dir / "train" / "cat.2.jpg", 777)  # changed content, same name
    (res,) = _extract(kaggle_dir, cache)
    assert res.computed == 1
    after = catsdogs.load_features(res.path)
    row = after.train.files.index("train/cat.2.jpg")
    assert not np.allclose(after.train.X[row], before.train.X[1])
    img = load_image(kaggle_dir / "train" / "cat.2.jpg", 32).astype(np.float32)[None]
    np.testing.assert_allclose(after.train.X[row], np.asarray(tiny_model(img))[0], rtol=1e-4, atol=1e-4)

    (kaggle_dir / "test" / "3.jpg").unlink()  # removed
    (res,) = _extract(kaggle_dir, cache)
    assert res.computed == 0 and res.n_test == 3
    assert catsdogs.load_features(res.path).test.ids.tolist() == [1, 2, 4]

    os.rename(kaggle_dir / "test" / "4.jpg", kaggle_dir / "test" / "9.jpg")  # same bytes, new name
    (res,) = _extract(kaggle_dir, cache)
    fs = catsdogs.load_features(res.path)
    assert res.computed == 0 and fs.test.ids.tolist() == [1, 2, 9]
    np.testing.assert_array_equal(fs.test.X[2], before.test.X[3])


@pytest.mark.parametrize("change", [{"image_size": 40}, {"precision": "bfloat16"}, {"resize": "crop"}])
def test_configuration_changes_get_their_own_file(kaggle_dir, tmp_path, change):
    (base,) = _extract(kaggle_dir, tmp_path / "c")
    (other,) = _extract(kaggle_dir, tmp_path / "c", **change)
    assert other.path != base.path and other.computed == 16
    meta = catsdogs.load_features(other.path).meta
    for key, value in change.items():
        assert meta[key] == value


def test_bfloat16_features_close_to_float32(kaggle_dir, tmp_path):
    (f32,) = _extract(kaggle_dir, tmp_path / "c")
    (bf16,) = _extract(kaggle_dir, tmp_path / "c", precision="bfloat16")
    a, b = catsdogs.load_features(f32.path).train.X, catsdogs.load_features(bf16.path).train.X
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.99 and not np.array_equal(a, b)


def test_flip_features(kaggle_dir, tmp_path, tiny_model, monkeypatch):
    cache = tmp_path / "c"
    (plain,) = _extract(kaggle_dir, cache)
    (flipped,) = _extract(kaggle_dir, cache, flip=True)  # only the flipped view is computed
    assert flipped.path == plain.path and flipped.computed == 16
    fs = catsdogs.load_features(flipped.path)
    assert fs.train.X_flip.shape == fs.train.X.shape
    img = load_image(kaggle_dir / fs.train.files[3], 32)[:, ::-1].astype(np.float32)[None]
    np.testing.assert_allclose(fs.train.X_flip[3], np.asarray(tiny_model(img))[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(fs.train.X, catsdogs.load_features(plain.path).train.X)
    monkeypatch.setattr(features_mod, "FeatureModel", None)  # neither call below may build a model
    for flip in (False, True):
        (again,) = _extract(kaggle_dir, cache, flip=flip)
        assert again.computed == 0
        assert catsdogs.load_features(again.path).train.X_flip is not None  # nothing lost


def test_same_features_in_another_process(kaggle_dir, tmp_path):
    (here,) = _extract(kaggle_dir, tmp_path / "a")
    proc = run_cli("extract", str(kaggle_dir), "-b", "resnet50", "--weights", "none", "--image-size", "32",
                   "--cache-dir", str(tmp_path / "b"), "--json", "--no-progress", check=True)
    (there,) = json.loads(proc.stdout)
    # the CLI's default batch size (32) is not TINY's (8): rows meet other batch positions
    assert_same_features(catsdogs.load_features(there["path"]).train.X,
                         catsdogs.load_features(here.path).train.X)


def test_unreadable_files_are_skipped_with_reasons(tmp_path, caplog, faults):
    root = make_kaggle(tmp_path / "d", n_per_class=2, n_test=1)
    for f in faults.iterdir():
        shutil.copy(f, root / "train" / f.name)
    with caplog.at_level(logging.WARNING, logger="catsdogs"):
        (res,) = _extract(root, tmp_path / "c")
    skipped = dict(res.skipped)
    assert set(skipped) == {"train/cat.90001.jpg", "train/cat.90002.jpg", "train/dog.90004.jpg"}
    assert "empty" in skipped["train/cat.90001.jpg"] and "truncated" in skipped["train/cat.90002.jpg"]
    assert res.n_train == 4 + 5  # every decodable fault is kept (gray, CMYK, 1x1, PNG-as-jpg, RGBA)
    fs = catsdogs.load_features(res.path)
    assert {"train/cat.90005.jpg", "train/dog.90006.jpg", "train/dog.90008.png", "train/cat.90007.jpg",
            "train/dog.90003.jpg"} <= set(fs.train.files)
    lines = [r.getMessage() for r in caplog.records]
    assert sum(line.startswith("skipped train/") for line in lines) == 3
    assert any("3 of 13 image files skipped" in line for line in lines)
    assert any("Thumbs.db" in line and "ignored" in line for line in lines)
    # a cached call reports the same, without retrying
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="catsdogs"):
        (again,) = _extract(root, tmp_path / "c")
    assert again.computed == 0 and dict(again.skipped) == skipped
    assert any("3 of 13 image files skipped" in r.getMessage() for r in caplog.records)


def test_bad_options_are_rejected_before_any_work(kaggle_dir, tmp_path):
    cases = [
        ({"precision": "float16"}, ConfigError, "unknown precision 'float16'"),
        ({"batch_size": 0}, ConfigError, "batch size must be a positive integer"),
        ({"resize": "stretch"}, ConfigError, "unknown resize policy"),
        ({"weights": "bogus"}, ConfigError, "does not offer weights 'bogus'"),
        ({"image_size": 16}, ConfigError, "too small for backbone 'resnet50'"),
        ({"backbones": ["resnet50", "nope"]}, PluginError, "unknown backbone 'nope'"),
    ]
    for kw, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            _extract(kaggle_dir, tmp_path / "c", **kw)
    assert not (tmp_path / "c").exists()


def test_damaged_cache_files_are_never_trusted(kaggle_dir, tmp_path, caplog):
    (res,) = _extract(kaggle_dir, tmp_path / "c")
    good = catsdogs.load_features(res.path).train.X
    res.path.write_bytes(res.path.read_bytes()[:1000])  # a torn file where the finished one was
    (tmp_path / "c" / "x").write_text("")
    with caplog.at_level(logging.WARNING, logger="catsdogs"):
        (again,) = _extract(kaggle_dir, tmp_path / "c")
    assert again.computed == 16 and "unreadable cache file" in caplog.text
    assert_same_features(catsdogs.load_features(again.path).train.X, good)


def test_a_runs_features_are_found_by_their_metadata_alone(kaggle_dir, tmp_path):
    """``locate_features`` finds a run's feature file from its HDF5 attributes (an int8 run's
    predictor needs only its metadata); ``find_features`` then reads and verifies its rows. A
    torn file named like the run's features is one clear error, not "not in the cache"."""
    from catsdogs.errors import DataError
    from catsdogs.runs.features import find_features, locate_features

    (res,) = _extract(kaggle_dir, tmp_path / "c")
    meta = catsdogs.load_features(res.path).meta
    key, fingerprint = meta["config_key"], meta["dataset_fingerprint"]
    path, found = locate_features(tmp_path / "c", key, fingerprint)
    assert path == res.path and found == meta
    with pytest.raises(DataError, match="are not in"):
        locate_features(tmp_path / "c", key, "another data set")

    # rows damaged, attributes intact: located (metadata only), refused when the rows are read
    with h5py.File(res.path, "r+") as h5:
        h5["train"]["features"][0] += 1.0
    assert locate_features(tmp_path / "c", key, fingerprint)[0] == res.path
    with pytest.raises(DataError, match="corrupt feature file"):
        find_features(tmp_path / "c", key, fingerprint)

    res.path.write_bytes(res.path.read_bytes()[:1000])  # torn: not even the attributes
    with pytest.raises(DataError, match=f"{res.path.name}: not a readable feature file"):
        locate_features(tmp_path / "c", key, fingerprint)


# --- kill -9 and resume, with a real subprocess ------------------------------------------------

def _chunk_markers(cache):
    return sorted(cache.rglob("chunk-*.json"))


@pytest.mark.slow
def test_kill_9_then_resume_gives_identical_features(tmp_path):
    root = make_kaggle(tmp_path / "d", n_per_class=60, n_test=40)  # 160 images
    cache = tmp_path / "killed"
    cmd = [sys.executable, "-m", "catsdogs", "extract", str(root), "-b", "resnet50", "--weights", "none",
           "--image-size", "64", "--batch-size", "8", "--chunk-size", "8", "--cache-dir", str(cache),
           "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while len(_chunk_markers(cache)) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "extraction finished before it could be killed; make it bigger"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(_chunk_markers(cache))
    assert 3 <= done < 20
    assert not list(cache.rglob("*.h5")), "no finished file may exist after a kill mid-way"

    (resumed,) = catsdogs.extract(root, ["resnet50"], weights="none", image_size=64, batch_size=8,
                                  chunk_size=8, cache_dir=cache, progress=False)
    assert resumed.computed <= 160 - 8 * done and resumed.reused >= 8 * done
    assert not list(cache.rglob("chunk-*")), "partial chunks are removed once the file is finished"
    assert not list(cache.rglob("*.tmp-*")), "a killed writer's temporaries are cleaned up"
    (clean,) = catsdogs.extract(root, ["resnet50"], weights="none", image_size=64, batch_size=8,
                                cache_dir=tmp_path / "clean", progress=False)
    a, b = catsdogs.load_features(resumed.path), catsdogs.load_features(clean.path)
    assert a.train.files == b.train.files and a.test.files == b.test.files
    assert_same_features(a.train.X, b.train.X)
    assert_same_features(a.test.X, b.test.X)


def test_damaged_chunk_is_recomputed(kaggle_dir, tmp_path, caplog):
    cache = tmp_path / "c"
    (res,) = _extract(kaggle_dir, cache)
    partial = res.path.with_name(res.path.name + ".partial")
    # fabricate the state a crash leaves: finished chunks in .partial, no final file
    good = catsdogs.load_features(res.path)
    res.path.unlink()
    partial.mkdir()
    store = cache_mod.Store(res.path, res.config)
    store.write_chunk(0, good.train.digests[:4], ["orig"], {"orig": good.train.X[:4]}, {})
    store.write_chunk(1, good.train.digests[4:8], ["orig"], {"orig": good.train.X[4:8]}, {})
    (partial / "chunk-000001.orig.npy").write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="catsdogs"):
        (again,) = _extract(kaggle_dir, cache)
    assert again.computed == 12 and "damaged chunk" in caplog.text
    assert_same_features(catsdogs.load_features(again.path).train.X, good.train.X)
    with h5py.File(again.path) as h5:
        assert h5.attrs["n_train"] == 12


@pytest.mark.slow
def test_full_mini_dataset(mini, tmp_path):
    (res,) = catsdogs.extract(mini, ["resnet50"], weights="none", image_size=32, batch_size=64,
                              cache_dir=tmp_path / "c", progress=False)
    assert (res.n_train, res.n_test, res.skipped) == (1000, 300, [])
    fs = catsdogs.load_features(res.path)
    assert fs.train.y.sum() == 500 and fs.test.ids.tolist() == list(range(1, 301))
    assert np.isfinite(fs.train.X).all()


def test_caller_may_pass_the_listing_and_digests_once(kaggle_dir, tmp_path, monkeypatch):
    from catsdogs.dataset.layout import digest_all, open_dataset

    ds = open_dataset(kaggle_dir)
    digests = digest_all(ds.records)
    (plain,) = _extract(kaggle_dir, tmp_path / "a")
    monkeypatch.setattr(features_mod, "digest_all", None)  # must not hash again
    (shared,) = _extract(kaggle_dir, tmp_path / "b", dataset=ds, digests=digests)
    np.testing.assert_array_equal(catsdogs.load_features(shared.path).train.X,
                                  catsdogs.load_features(plain.path).train.X)
    with pytest.raises(ConfigError, match="digests has 3 entries for 16 images"):
        _extract(kaggle_dir, tmp_path / "b", dataset=ds, digests=digests[:3])
