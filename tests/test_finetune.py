"""Issue 24 lever 4: the ``finetune`` head trains a backbone's top block(s) on cached maps.

Real tiny networks: a seeded conv net with the :class:`~catsdogs.components.TopSplit`
capability, installed as a plugin distribution (EfficientNet-Lite0's seeded random network at
64 px has maps of ~1e-9, which float16 flushes to zero, so it only serves the weight checks).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
from conftest import install_fake_dist

from catsdogs.builtin.finetune import FineTuneHead, inner_split
from catsdogs.errors import ConfigError

SIZE = 24
PARAMS = {"backbone": "tiny_split", "weights": "none", "image_size": SIZE, "patience": 1}

TINY_SPLIT = '''
from catsdogs.components import Backbone, copy_weights_by_name
from catsdogs.hookspecs import hookimpl


def _bottom(image):
    import keras

    x = keras.layers.Rescaling(1 / 255, name="scale")(image)
    return keras.layers.Conv2D(6, 5, strides=2, activation="tanh", name="conv")(x)


def _top(x):
    import keras

    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="top_conv")(x)
    x = keras.layers.BatchNormalization(name="top_bn")(x)
    return keras.layers.GlobalAveragePooling2D(name="gap")(x)


class TinySplit(Backbone):
    name = "tiny_split"
    input_size = 24
    min_input_size = 8
    feature_dim = 8
    preprocessing = "x / 255"
    weights_options = ("none",)
    has_top_split = True

    def build_model(self, weights, image_size):
        import keras

        image = keras.Input((image_size, image_size, 3), name="image")
        return keras.Model(image, _top(_bottom(image)), name=self.name)

    def split_top(self, weights="none", image_size=None, blocks=1):
        import keras

        size = image_size or self.input_size
        full = self.build(weights, size)
        image = keras.Input((size, size, 3), name="image")
        bottom = keras.Model(image, _bottom(image), name="tiny_bottom")
        maps = keras.Input(tuple(bottom.output.shape[1:]), name="maps")
        top = keras.Model(maps, _top(maps), name="tiny_top")
        copy_weights_by_name(full, (bottom, top))
        return bottom, top


@hookimpl
def register_backbones(register):
    register(TinySplit())
'''


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The plugin on ``sys.path`` and a fresh registry that sees it; undone afterwards."""
    from catsdogs.plugins import get_registry, reset_registry

    root = tmp_path_factory.mktemp("finetune")
    site = install_fake_dist(root / "site", "catsdogs-tiny-split", "0.1",
                             {"catsdogs_tiny_split": TINY_SPLIT}, {"tiny_split": "catsdogs_tiny_split"})
    sys.path.insert(0, str(site))
    reset_registry()
    try:
        yield get_registry().backbone("tiny_split")
    finally:
        sys.path.remove(str(site))
        reset_registry()


@pytest.fixture(scope="module")
def maps_data(tiny):
    """Flattened float16 maps of 48 generated photos (dogs brighter on the left) and labels."""
    rng = np.random.default_rng(0)
    y = np.tile([0, 1], 24)
    pixels = rng.uniform(0, 120, (48, SIZE, SIZE, 3)).astype(np.float32)
    pixels[y == 1, :, : SIZE // 2] += 120
    pixels[y == 0, : SIZE // 2] += 100
    bottom, _ = tiny.split_top("none", SIZE)
    maps = np.asarray(bottom(pixels, training=False)).reshape(48, -1).astype(np.float16)
    return maps, y


def _weights(model):
    return {w.path: np.asarray(w) for w in model.weights}


def test_the_top_starts_from_the_backbone_weights(tiny):
    head = FineTuneHead(**PARAMS)
    top = head.build_top()
    bottom, reference = tiny.split_top("none", SIZE)
    for layer, ref in zip(top.layers, reference.layers):
        for a, b in zip(layer.get_weights(), ref.get_weights()):
            np.testing.assert_array_equal(a, b)
    # the cached maps through the top are the backbone's own GAP features
    pixels = np.random.default_rng(3).uniform(0, 255, (4, SIZE, SIZE, 3)).astype(np.float32)
    got = np.asarray(top(bottom(pixels, training=False), training=False))
    want = np.asarray(tiny.build("none", SIZE)(pixels, training=False))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


def test_lite0_top_is_the_imagenet_top_of_the_plugin():
    """For EfficientNet-Lite0 the head's top is the plugin's split_top top, weight for weight."""
    lite = pytest.importorskip("catsdogs_efficientnet_lite")
    head = FineTuneHead(backbone="efficientnet_lite0", weights="none", image_size=64)
    top = head.build_top()
    _, reference = lite.get_backbone("efficientnet_lite0").split_top("none", 64)
    ref = {layer.name: layer.get_weights() for layer in reference.layers}
    assert {layer.name for layer in top.layers} == set(ref)
    for layer in top.layers:
        for a, b in zip(layer.get_weights(), ref[layer.name]):
            np.testing.assert_array_equal(a, b)


def test_fit_trains_the_top_and_keeps_batchnorm(maps_data):
    maps, y = maps_data
    head = FineTuneHead(**PARAMS, learning_rate=1e-2).fit(maps, y, epochs=3, batch_size=8, seed=1)
    initial = {layer.name: layer.get_weights() for layer in head.build_top().layers}
    top = head.model_.get_layer("tiny_top")
    changed = []
    for layer in top.layers:
        if not layer.get_weights():
            continue
        same = all(np.array_equal(a, b) for a, b in zip(layer.get_weights(), initial[layer.name]))
        if type(layer).__name__ == "BatchNormalization":
            assert same, f"{layer.name}: BatchNormalization must stay as in the backbone"
        elif not same:
            changed.append(layer.name)
    assert changed == ["top_conv"]
    p = head.predict_proba(maps)
    assert p.shape == (48,) and np.all((p > 0) & (p < 1))
    assert set(head.history_) >= {"unit_loss", "unit_inner_loss", "loss", "inner_loss"}
    assert head.inner_rows_ == 10  # 20 % of each class of 48 rows


def test_early_stopping_never_sees_the_validation_rows(maps_data):
    """Flipping the validation labels changes nothing; the inner rows are the training rows'."""
    maps, y = maps_data
    X, X_val, y_fit, y_val = maps[:36], maps[36:], y[:36], y[36:]
    kw = {"epochs": 4, "batch_size": 8, "seed": 5}
    a = FineTuneHead(**PARAMS).fit(X, y_fit, validation=(X_val, y_val), **kw)
    b = FineTuneHead(**PARAMS).fit(X, y_fit, validation=(X_val, 1 - y_val), **kw)
    assert a.stopped_epochs_ == b.stopped_epochs_
    for (name, wa), wb in zip(_weights(a.model_).items(), _weights(b.model_).values()):
        np.testing.assert_array_equal(wa, wb, err_msg=name)
    np.testing.assert_array_equal(a.predict_proba(X_val), b.predict_proba(X_val))
    assert a.history_["val_loss"] != b.history_["val_loss"]  # the flip was seen, and only reported


def test_a_fitted_head_lets_go_of_every_array_it_read(maps_data):
    """TensorFlow kept each PyDataset's generator in its process-wide graph, so the rows of every
    fit and predict (a k-fold fold's maps: 1.6 GB on the benchmark) lived as long as the process.
    Arrays given to ``fit`` and ``predict_proba`` are freed once the caller drops them, while the
    head (and its model) live on."""
    import gc
    import weakref

    maps, y = maps_data
    X, X_val, X_new = maps[:36].copy(), maps[36:].copy(), maps.copy()
    read = [weakref.ref(a) for a in (X, X_val, X_new)]
    head = FineTuneHead(**PARAMS).fit(X, y[:36], validation=(X_val, y[36:]), epochs=2,
                                      batch_size=8, seed=3)
    p = head.predict_proba(X_new)
    del X, X_val, X_new
    gc.collect()
    assert [r() is None for r in read] == [True, True, True]
    np.testing.assert_array_equal(head.predict_proba(maps), p)  # the head still works


def test_only_tf_data_generators_are_let_go_of():
    """What the release drops is tf.data's generator plumbing; a py_func of anything else (a
    model's own layer might trace one) stays registered."""
    import tensorflow as tf
    from tensorflow.python.framework import ops

    from catsdogs.builtin.finetune import _rows_released

    def own(x):
        return x

    traced = tf.function(lambda x: tf.numpy_function(own, [x], tf.float32))
    with _rows_released():
        traced(tf.constant(1.0))  # tracing registers ``own`` in the process-wide graph
        list(tf.data.Dataset.from_generator(lambda: iter([1.0]), output_signature=tf.TensorSpec(())))
    kept = ops.get_default_graph()._py_funcs_used_in_graph
    assert [f for f in kept if getattr(f, "__name__", "") == "own"]  # autograph wraps it
    assert not [f for f in kept if f.__module__.startswith("tensorflow.python.data.")]
    assert float(traced(tf.constant(2.0))) == 2.0  # its trace still finds it


def test_predicting_every_row_count_writes_no_retracing_warning(maps_data, caplog, monkeypatch):
    """A new model per fold, predicting row counts of every size, traces each model's predict
    function again for each batch shape; TensorFlow's warning about it goes to the DEBUG log."""
    import logging

    from tensorflow.python.eager.polymorphic_function import polymorphic_function as pf

    # TensorFlow warns at most twice per traced Python function in a process: start afresh, so
    # the earlier tests' fits do not use that up
    monkeypatch.setattr(pf, "_frequent_tracing_detector_manager", pf._FrequentTracingDetectorManager())
    # and at TensorFlow's default level: importing coremltools (an earlier test in the same worker
    # that imports it itself) sets the "tensorflow" logger to FATAL, and then no warning is made
    caplog.set_level(logging.WARNING, logger="tensorflow")
    maps, y = maps_data
    written = []

    class Written(logging.Handler):
        def emit(self, record):
            written.append(record.getMessage())

    handler = Written()
    logging.getLogger("tensorflow").addHandler(handler)
    try:
        with caplog.at_level(logging.DEBUG, logger="catsdogs"):
            for seed in range(3):
                head = FineTuneHead(**PARAMS).fit(maps, y, validation=(maps[:10], y[:10]),
                                                  epochs=1, batch_size=8, seed=seed)
                for n in (5, 7, 9, 11):
                    head.predict_proba(maps[:n])
    finally:
        logging.getLogger("tensorflow").removeHandler(handler)
    assert not [m for m in written if "retracing" in m]
    assert any("triggered tf.function retracing" in r.getMessage() for r in caplog.records
               if r.name == "catsdogs" and r.levelno == logging.DEBUG)


def test_inner_split_is_stratified_and_seeded():
    y = np.array([0] * 10 + [1] * 20)
    fit, stop = inner_split(y, 0.2, 7)
    assert sorted(np.concatenate([fit, stop]).tolist()) == list(range(30))
    assert np.bincount(y[stop]).tolist() == [2, 4]
    np.testing.assert_array_equal(stop, inner_split(y, 0.2, 7)[1])
    with pytest.raises(ConfigError, match="at least 2 of each class"):
        inner_split(np.array([0, 1, 1]), 0.2, 0)


def test_saved_model_rounds_like_the_cache_and_round_trips(tmp_path, maps_data):
    from catsdogs.app.export import load_head_file

    maps, y = maps_data
    head = FineTuneHead(**PARAMS).fit(maps, y, epochs=1, batch_size=16, seed=0)
    model = head.keras_model()
    path = tmp_path / "head.keras"
    model.save(path)
    loaded = load_head_file(path)
    # float32 maps a quarter float16 step off the cached ones round back to them in the model
    x32 = maps.astype(np.float32) * np.float32(1 + 2**-12)
    assert not np.array_equal(x32, maps.astype(np.float32))
    want = head.predict_proba(maps)
    got = np.asarray(loaded.predict(x32, batch_size=256, verbose=0)).reshape(-1)
    np.testing.assert_array_equal(got, want)


def test_wrong_maps_are_one_clear_error(maps_data):
    maps, y = maps_data
    with pytest.raises(ConfigError, match="takes maps of shape"):
        FineTuneHead(**PARAMS).fit(maps[:, :100], y, epochs=1)
    with pytest.raises(ConfigError, match="does not offer split_top|cannot be cut"):
        FineTuneHead(backbone="resnet50", weights="none").fit(maps, y, epochs=1)
    with pytest.raises(ConfigError, match="which backbone"):
        FineTuneHead(weights="none").fit(maps, y, epochs=1, blocks=[("a", 1), ("b", 2)])
    with pytest.raises(ConfigError, match="top_blocks"):
        FineTuneHead(**{**PARAMS, "top_blocks": 0}).fit(maps, y, epochs=1)


# -- the maps cache ------------------------------------------------------------------------------
def _bottom_maps(tiny, paths) -> np.ndarray:
    from catsdogs.dataset.images import decode_rgb, read_image_file, resize

    bottom, _ = tiny.split_top("none", SIZE)
    pixels = np.stack([resize(decode_rgb(read_image_file(p)), SIZE, "squash") for p in paths])
    return np.asarray(bottom(pixels.astype(np.float32), training=False)).reshape(len(paths), -1)


def test_maps_are_cached_in_float16_and_reused(tiny, tmp_path):
    from conftest import make_kaggle, write_jpeg

    from catsdogs.features.maps import cache_maps

    data = make_kaggle(tmp_path / "data", n_per_class=4, n_test=3)
    kw = {"weights": "none", "cache_dir": tmp_path / "cache", "chunk_size": 3}
    first = cache_maps(data, "tiny_split", **kw)
    assert first.computed == 11 and first.train.X.dtype == np.float16
    assert first.train.X.shape == (8, first.config.width) and len(first.test) == 3
    want = _bottom_maps(tiny, [data / f for f in first.train.files])
    np.testing.assert_allclose(first.train.X.astype(np.float32), want, rtol=2**-10, atol=1e-6)
    assert sorted(first.train.y.tolist()) == [0] * 4 + [1] * 4

    again = cache_maps(data, "tiny_split", **kw)
    assert again.computed == 0
    np.testing.assert_array_equal(again.train.X, first.train.X)
    np.testing.assert_array_equal(again.test.X, first.test.X)

    write_jpeg(data / "train" / "dog.2.jpg", 999, label=1)  # new content: one forward pass
    changed = cache_maps(data, "tiny_split", **kw)
    assert changed.computed == 1
    row = changed.train.files.index("train/dog.2.jpg")
    np.testing.assert_allclose(changed.train.X[row].astype(np.float32),
                               _bottom_maps(tiny, [data / "train/dog.2.jpg"])[0], rtol=2**-10, atol=1e-6)

    other = cache_maps(data, "tiny_split", **{**kw, "image_size": 32})  # another configuration
    assert other.computed == 11 and other.path != first.path


def test_the_maps_configuration_builds_the_split_network_once(tiny, monkeypatch):
    """The runner asks for a backbone's maps configuration more than once per call (its runs'
    settings, then the cache): the split network, seconds to build for a real backbone, is built
    once per backbone, weights, size and blocks."""
    from catsdogs.features import maps

    monkeypatch.setattr(maps, "_MAPS_SHAPES", {}, raising=False)
    built = []
    split_top = type(tiny).split_top
    monkeypatch.setattr(type(tiny), "split_top",
                        lambda self, *a, **k: built.append(a) or split_top(self, *a, **k))
    first = maps.maps_config(tiny, "none", SIZE, 1)
    assert maps.maps_config(tiny, "none", SIZE, 1) == first and len(built) == 1
    other = maps.maps_config(tiny, "none", 32, 1)
    assert len(built) == 2 and other.shape != first.shape and other.key != first.key


def test_a_damaged_maps_chunk_is_recomputed(tiny, tmp_path, caplog):
    from conftest import make_kaggle

    from catsdogs.features.maps import cache_maps

    data = make_kaggle(tmp_path / "data", n_per_class=3, n_test=0)
    kw = {"weights": "none", "cache_dir": tmp_path / "cache", "chunk_size": 4}
    first = cache_maps(data, "tiny_split", **kw)
    npz = sorted(first.path.glob("chunk-*.npz"))
    assert len(npz) == 2
    rows = len(json_digests(npz[0]))
    npz[0].write_bytes(npz[0].read_bytes()[:-40] + b"x" * 40)
    again = cache_maps(data, "tiny_split", **kw)
    assert again.computed == rows
    assert "damaged maps chunk" in caplog.text
    np.testing.assert_array_equal(again.train.X, first.train.X)


def test_each_maps_chunk_is_read_once(tiny, tmp_path, monkeypatch):
    """A call that finds everything cached reads each chunk's rows once (checked against its
    marker's checksum as they are read), not once to verify and again to gather."""
    from conftest import make_kaggle

    import catsdogs.features.maps as maps_mod

    data = make_kaggle(tmp_path / "data", n_per_class=4, n_test=3)
    kw = {"weights": "none", "cache_dir": tmp_path / "cache", "chunk_size": 3}
    first = maps_mod.cache_maps(data, "tiny_split", **kw)
    reads: list = []
    read = maps_mod._read_chunk
    monkeypatch.setattr(maps_mod, "_read_chunk", lambda npz, *a: reads.append(npz) or read(npz, *a))
    again = maps_mod.cache_maps(data, "tiny_split", **kw)
    assert again.computed == 0
    np.testing.assert_array_equal(again.train.X, first.train.X)
    chunks = sorted(first.path.glob("chunk-*.npz"))
    assert len(chunks) == 4 and sorted(reads) == chunks  # 11 photos in chunks of 3: each read once


def test_a_maps_chunk_damaged_again_after_its_recompute_is_one_clear_error(tiny, tmp_path, monkeypatch):
    from conftest import make_kaggle

    import catsdogs.features.maps as maps_mod

    data = make_kaggle(tmp_path / "data", n_per_class=2, n_test=0)
    kw = {"weights": "none", "cache_dir": tmp_path / "cache", "chunk_size": 4}
    (npz,) = maps_mod.cache_maps(data, "tiny_split", **kw).path.glob("chunk-*.npz")
    read = maps_mod._read_chunk

    def unreadable(path, *a):  # a disk that damages this chunk every time it is written
        if path == npz:
            raise ValueError("bad sector")
        return read(path, *a)

    monkeypatch.setattr(maps_mod, "_read_chunk", unreadable)
    with pytest.raises(OSError, match=r"chunk-.*npz is damaged again after it was recomputed "
                                      r"\(bad sector\); check the disk"):
        maps_mod.cache_maps(data, "tiny_split", **kw)


def test_maps_come_in_the_order_asked_for(tiny, tmp_path):
    """``order`` (what the runner passes: the rows of the features the maps join) returns those
    photos' rows in that order, read straight from the cache (equal to the default rows,
    permuted); a photo with no maps is left out, for the caller to name."""
    from conftest import make_kaggle

    from catsdogs.features.maps import cache_maps

    data = make_kaggle(tmp_path / "data", n_per_class=4, n_test=3)
    kw = {"weights": "none", "cache_dir": tmp_path / "cache", "chunk_size": 3}
    every = cache_maps(data, "tiny_split", **kw)
    train = list(reversed(every.train.files))[:5] + ["train/cat.99.jpg"]  # the last: no such photo
    test = [every.test.files[2], every.test.files[0]]
    ordered = cache_maps(data, "tiny_split", **kw, order={"train": train, "test": test})
    assert ordered.computed == 0 and ordered.train.files == train[:5] and ordered.test.files == test
    rows = [every.train.files.index(f) for f in train[:5]]
    np.testing.assert_array_equal(ordered.train.X, every.train.X[rows])
    np.testing.assert_array_equal(ordered.train.y, every.train.y[rows])
    np.testing.assert_array_equal(ordered.test.X, every.test.X[[2, 0]])
    assert ordered.train.X.flags.owndata  # one array read from the chunks, not a view of another


def json_digests(npz_path) -> list:
    import json

    return json.loads(npz_path.with_suffix(".json").read_text())["digests"]


def test_end_to_end_model_predicts_what_the_cached_maps_give(tiny, tmp_path):
    """Export parity: photos -> bottom (float32) -> fine-tuned top equals the head's P(dog) on
    the cached float16 maps of the same photos."""
    from conftest import make_kaggle

    from catsdogs.dataset.images import decode_rgb, read_image_file, resize
    from catsdogs.features.maps import cache_maps

    data = make_kaggle(tmp_path / "data", n_per_class=8, n_test=6)
    ms = cache_maps(data, "tiny_split", weights="none", cache_dir=tmp_path / "cache")
    head = FineTuneHead(**PARAMS, learning_rate=1e-2).fit(ms.train.X, ms.train.y, epochs=3,
                                                        batch_size=4, seed=2)
    model = head.end_to_end()
    pixels = np.stack([resize(decode_rgb(read_image_file(data / f)), SIZE, "squash")
                       for f in ms.test.files]).astype(np.float32)
    got = np.asarray(model.predict(pixels, verbose=0)).reshape(-1)
    want = head.predict_proba(ms.test.X)
    assert np.ptp(want) > 1e-4  # the photos get different answers
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_refit_params_fix_each_stage_at_its_best_inner_epoch(maps_data):
    """``refit_params`` gives the epochs whose weights early stopping kept; a head built with them
    (as a refit is) trains every row for exactly those epochs, holding nothing out."""
    maps, y = maps_data
    ranked = FineTuneHead(**PARAMS).fit(maps, y, epochs=5, batch_size=8, seed=2)
    fixed = ranked.refit_params()["fixed_epochs"]
    best = [int(np.argmin(ranked.history_[k])) + 1 for k in ("unit_inner_loss", "inner_loss")]
    assert fixed == best and all(1 <= e <= 5 for e in fixed)
    refit = FineTuneHead(**PARAMS, **ranked.refit_params()).fit(maps, y, epochs=5, batch_size=8,
                                                                 seed=2)
    assert refit.inner_rows_ == 0 and refit.stopped_epochs_ == fixed
    assert "inner_loss" not in refit.history_
    assert refit.refit_params() == {"fixed_epochs": fixed}
    with pytest.raises(ConfigError, match="fixed_epochs must be two epoch counts"):
        FineTuneHead(**PARAMS, fixed_epochs=[3]).validate_params()
