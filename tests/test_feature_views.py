"""Feature views per backbone configuration (issue 24 lever 1): ``layers:`` (pooled earlier
layers after the last) and ``views:`` / ``merge:`` (orig, flip, the five crops of
``crop_fraction`` and their mirrors, merged), each cached under its own key, one decode per photo,
int8 included, and exported as the submission computes them.

A tiny seeded backbone plugin (two convolutions, ``conv1`` offered as a feature layer) is installed
as a real distribution; features are checked against the same network's outputs computed by hand.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import assert_same_features, install_fake_dist, make_kaggle, plugin_on_path

from catsdogs.errors import ConfigError

PLUGIN = '''
from catsdogs.components import Backbone, FeatureLayer
from catsdogs.hookspecs import hookimpl


class TinyLayers(Backbone):
    name = "tiny_layers"
    input_size = 32
    min_input_size = 8
    feature_dim = 8
    preprocessing = "x / 255"
    weights_options = ("none",)

    def feature_layers(self):
        return {"conv1": FeatureLayer("conv1", 4)}

    def build_model(self, weights, image_size):
        import keras

        image = keras.Input((image_size, image_size, 3), name="image")
        x = keras.layers.Rescaling(1 / 255)(image)
        x = keras.layers.Conv2D(4, 3, strides=2, activation="tanh", name="conv1")(x)
        x = keras.layers.Conv2D(8, 3, strides=2, activation="tanh", name="conv2")(x)
        return keras.Model(image, keras.layers.GlobalAveragePooling2D(name="gap")(x))


@hookimpl
def register_backbones(register):
    register(TinyLayers())
'''

NAME = "tiny_layers"
SIZE = 32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The plugin on ``sys.path`` (and ``PYTHONPATH``), a data set with test photos, a fresh
    registry that sees the plugin; undone afterwards."""
    root = tmp_path_factory.mktemp("feature-views")
    site = install_fake_dist(root / "site", "catsdogs-tiny-layers", "0.1",
                             {"catsdogs_tiny_layers": PLUGIN}, {"tiny_layers": "catsdogs_tiny_layers"})
    data = make_kaggle(root / "data", n_per_class=10, n_test=6)
    with plugin_on_path(site):
        yield {"root": root, "data": data}


def _extract(tiny, cache, **kw):
    import catsdogs

    (res,) = catsdogs.extract(tiny["data"], [NAME], weights="none", batch_size=8, cache_dir=cache,
                              progress=False, **kw)
    return res, catsdogs.load_features(res.path)


def _images(tiny, files):
    from catsdogs.dataset.images import load_image

    return np.stack([load_image(tiny["data"] / f, SIZE, "squash") for f in files])


def _by_hand(images):
    """The plain network's last features and conv1's output, pooled with NumPy."""
    import keras

    from catsdogs.plugins import get_registry

    model = get_registry().backbone(NAME).build("none", SIZE)
    both = keras.Model(model.inputs, [model.output, model.get_layer("conv1").output])
    last, conv1 = both.predict(images.astype(np.float32), verbose=0)
    return np.asarray(last), np.asarray(conv1).mean(axis=(1, 2))


def test_layers_are_the_last_features_then_the_pooled_earlier_layers(tiny, tmp_path):
    res, fs = _extract(tiny, tmp_path / "cache", layers=["conv1"])
    assert res.config.feature_dim == 8 + 4 and fs.train.X.shape[1] == 12
    last, conv1 = _by_hand(_images(tiny, fs.train.files))
    assert_same_features(fs.train.X, np.concatenate([last, conv1], axis=1))
    # the first columns are the configuration without layers, row for row
    _, plain = _extract(tiny, tmp_path / "cache")
    assert plain.train.files == fs.train.files
    assert_same_features(fs.train.X[:, :8], plain.train.X)


def test_flip_views_are_merged_by_mean_or_concat(tiny, tmp_path):
    _, mean = _extract(tiny, tmp_path / "cache", views=["flip", "orig"], flip=True)
    _, concat = _extract(tiny, tmp_path / "cache", views=["orig", "flip"], merge="concat")
    images = _images(tiny, mean.train.files)
    orig, _ = _by_hand(images)
    flipped, _ = _by_hand(images[:, :, ::-1, :])
    assert_same_features(mean.train.X, (orig + flipped) / 2)
    assert_same_features(concat.train.X, np.concatenate([orig, flipped], axis=1))
    # the TTA dataset is the same features of the mirrored photo: orig+flip is mirror-invariant
    assert_same_features(mean.train.X_flip, mean.train.X)


def _crop_by_hand(images, region, fraction):
    """The crop view with NumPy: the square of ``round(fraction * S)`` pixels in a corner or
    centred (offset rounded down), resized back to ``S x S`` by bilinear interpolation with
    half-pixel centres (float64) and rounded to uint8."""
    size = images.shape[1]
    side = int(np.floor(fraction * size + 0.5))
    margin = size - side
    top = {"center": margin // 2, "top_left": 0, "top_right": 0}.get(region, margin)
    left = {"center": margin // 2, "top_left": 0, "bottom_left": 0}.get(region, margin)
    crop = images[:, top:top + side, left:left + side, :].astype(np.float64)
    src = np.clip((np.arange(size) + 0.5) * side / size - 0.5, 0, None)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, side - 1)
    w = src - lo
    rows = crop[:, lo] * (1 - w)[None, :, None, None] + crop[:, hi] * w[None, :, None, None]
    out = rows[:, :, lo] * (1 - w)[None, None, :, None] + rows[:, :, hi] * w[None, None, :, None]
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


CROPS = ["center", "top_left", "top_right", "bottom_left", "bottom_right"]


def test_crop_views_are_the_crops_resized_back_and_fed_to_the_network(tiny, tmp_path):
    """Each crop view's features are the network's features of the by-hand crop + resize (in
    canonical order when concatenated); ``flip_<crop>`` is that crop mirrored; mean averages."""
    fraction = 0.75  # 24 of 32 pixels: the corners differ from each other and from the centre
    _, concat = _extract(tiny, tmp_path / "cache", views=list(reversed(CROPS)), merge="concat",
                         crop_fraction=fraction)
    images = _images(tiny, concat.train.files)
    crops = {region: _crop_by_hand(images, region, fraction) for region in CROPS}
    assert len({c.tobytes() for c in crops.values()}) == 5
    by_hand = {region: _by_hand(crop)[0] for region, crop in crops.items()}
    assert_same_features(concat.train.X, np.concatenate([by_hand[r] for r in CROPS], axis=1))

    _, mean = _extract(tiny, tmp_path / "cache", views=["flip_top_left", "orig", "center"],
                       crop_fraction=fraction, flip=True)
    orig, _ = _by_hand(images)
    mirrored_tl, _ = _by_hand(crops["top_left"][:, :, ::-1, :])
    assert_same_features(mean.train.X, (orig + by_hand["center"] + mirrored_tl) / 3)
    # TTA: the same views of the mirrored photo
    mirror = images[:, :, ::-1, :]
    expected_flip = (_by_hand(mirror)[0] + _by_hand(_crop_by_hand(mirror, "center", fraction))[0]
                     + _by_hand(_crop_by_hand(mirror, "top_left", fraction)[:, :, ::-1, :])[0]) / 3
    assert_same_features(mean.train.X_flip, expected_flip)


def test_crop_view_layer_is_what_extraction_computes_also_in_tflite(tmp_path):
    """The export's :class:`CropView` layer, converted to TFLite as the export converts, gives
    the very pixels extraction crops (``crop_images``): the exported graph sees the same view."""
    import keras

    from catsdogs.app.export import save_tflite
    from catsdogs.app.graph import CropView
    from catsdogs.app.models import tflite_interpreter
    from catsdogs.features.views import crop_images

    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (3, 40, 40, 3), dtype=np.uint8)
    for region, fraction in (("bottom_right", 0.875), ("center", 0.63)):
        inp = keras.Input((40, 40, 3), name="image")
        model = keras.Model(inp, CropView(region, fraction)(inp))
        path = save_tflite(model, tmp_path / f"{region}.tflite")
        runner = tflite_interpreter(path).get_signature_runner()
        (name,) = runner.get_input_details()
        got = np.stack([next(iter(runner(**{name: im[None].astype(np.float32)}).values()))[0]
                        for im in images])
        want = crop_images(images, region, fraction)
        np.testing.assert_array_equal(got, want.astype(np.float32))
        np.testing.assert_array_equal(want, _crop_by_hand(images, region, fraction))


def test_each_option_has_its_own_cache_key_and_the_defaults_keep_the_old_one(tiny, tmp_path):
    from catsdogs.features.cache import FORMAT_VERSION, FeatureConfig

    base = FeatureConfig(backbone=NAME, weights="none", weights_id="w", image_size=SIZE,
                         resize="squash", precision="float32", preprocessing="x / 255", feature_dim=8)
    # the key as it was computed before these options existed (the fields FeatureConfig had)
    old_fields = {k: asdict(base)[k] for k in ("backbone", "weights", "weights_id", "image_size",
                                               "resize", "precision", "preprocessing",
                                               "feature_dim")}
    old_key = hashlib.sha256(json.dumps({**old_fields, "format": FORMAT_VERSION},
                                        sort_keys=True).encode()).hexdigest()[:16]
    assert base.key == old_key
    # the flip views' key as it was before crop views existed
    flip = FeatureConfig(**{**asdict(base), "input_views": ("orig", "flip")})
    flip_key = hashlib.sha256(json.dumps(
        {**old_fields, "input_views": ["orig", "flip"], "format": FORMAT_VERSION},
        sort_keys=True).encode()).hexdigest()[:16]
    assert flip.key == flip_key

    def key(**kw):
        return FeatureConfig(**{**asdict(base), **kw}).key

    keys = {base.key, key(layers=("conv1",)), flip.key,
            key(input_views=("orig", "flip"), merge="concat"),
            key(input_views=("orig", "center")),
            key(input_views=("orig", "center"), crop_fraction=0.75),
            key(input_views=("orig", "flip_center")), key(input_views=("center",))}
    assert len(keys) == 8
    # one view merges nothing: its merge is not part of the key; no crop view: nor the fraction
    assert key(merge="concat") == base.key
    assert key(crop_fraction=0.5) == base.key
    assert key(input_views=("orig", "flip"), crop_fraction=0.5) == flip.key
    # extraction: the default call has that key; each option a file of its own
    paths = {_extract(tiny, tmp_path / "cache", **kw)[0].path for kw in
             ({}, {"layers": ["conv1"]}, {"views": ["orig", "flip"]},
              {"views": ["orig", "flip"], "crop_fraction": 0.5},
              {"views": ["orig", "center"]}, {"views": ["orig", "center"], "crop_fraction": 0.5})}
    assert len(paths) == 5


@pytest.mark.parametrize("views", [["orig", "flip"], ["orig", *CROPS, *(f"flip_{c}" for c in CROPS)]])
def test_one_decode_per_photo_whatever_the_views(tiny, tmp_path, monkeypatch, views):
    from catsdogs.features import extraction

    decoded = []
    real = extraction.decode_rgb

    def counting(data, *args, **kwargs):
        decoded.append(hashlib.blake2b(data, digest_size=8).hexdigest())
        return real(data, *args, **kwargs)

    monkeypatch.setattr(extraction, "decode_rgb", counting)
    res, fs = _extract(tiny, tmp_path / "cache", layers=["conv1"], views=views, flip=True)
    assert res.computed == len(fs.train) + len(fs.test) > 0
    assert fs.train.X.shape[1] == 12  # merged by mean
    assert len(decoded) == len(set(decoded)) == res.computed


def test_bad_view_options_are_one_clear_error(tiny, tmp_path):
    with pytest.raises(ConfigError, match="has no feature layer 'conv9'; available: conv1"):
        _extract(tiny, tmp_path / "cache", layers=["conv9"])
    with pytest.raises(ConfigError, match="view 'orig' is listed twice"):
        _extract(tiny, tmp_path / "cache", views=["orig", "orig"])
    with pytest.raises(ConfigError, match="unknown view merge 'max'"):
        _extract(tiny, tmp_path / "cache", views=["orig", "flip"], merge="max")
    with pytest.raises(ConfigError, match=r"unknown view 'centre' \(did you mean 'center'\?\)"):
        _extract(tiny, tmp_path / "cache", views=["orig", "centre"])
    for bad in (1.0, 0, -0.5, float("nan"), True, "0.8"):
        with pytest.raises(ConfigError, match=r"crop_fraction must be a number in \(0, 1\)"):
            _extract(tiny, tmp_path / "cache", views=["orig", "center"], crop_fraction=bad)
    assert not (tmp_path / "cache").exists()  # checked before anything was computed


def _doc(tiny, name, **backbone):
    return {"data": str(tiny["data"]), "output": str(tiny["root"] / name),
            "cache_dir": str(tiny["root"] / "cache"), "weights": "none",
            "backbones": [{"name": NAME, **backbone}], "heads": ["dropout_sigmoid"],
            "optimizers": [{"name": "adam", "learning_rate": 0.05}], "epochs": 3, "batch_size": 8,
            "seed": 3}


def test_experiment_file_checks_and_orders_the_view_options(tiny):
    from catsdogs.experiment.spec import parse_experiment

    exp = parse_experiment(yaml.safe_dump(_doc(tiny, "x", layers=["conv1"], views=["flip", "orig"])))
    spec = exp.backbone(NAME)
    assert (spec.layers, spec.views, spec.merge) == (["conv1"], ["orig", "flip"], "mean")
    plain = parse_experiment(yaml.safe_dump(_doc(tiny, "x"))).backbone(NAME)
    assert (plain.layers, plain.views, plain.merge) == ([], ["orig"], "mean")
    with pytest.raises(ConfigError, match=r"backbones\[0\]\.layers.*no feature layer 'stage9'"):
        parse_experiment(yaml.safe_dump(_doc(tiny, "x", layers=["stage9"])))
    with pytest.raises(ConfigError, match=r"backbones\[0\]\.views: unknown view 'mirror'"):
        parse_experiment(yaml.safe_dump(_doc(tiny, "x", views=["orig", "mirror"])))
    crops = parse_experiment(yaml.safe_dump(_doc(tiny, "x", views=["flip_center", "center", "orig"],
                                                 crop_fraction=0.8))).backbone(NAME)
    assert (crops.views, crops.crop_fraction) == (["orig", "center", "flip_center"], 0.8)
    assert plain.crop_fraction == 0.875
    for bad in (1, 0.0, 1.5, "x"):
        with pytest.raises(ConfigError, match=r"backbones\[0\]\.crop_fraction: must be a number "
                                              r"in \(0, 1\)"):
            parse_experiment(yaml.safe_dump(_doc(tiny, "x", views=["center"], crop_fraction=bad)))


@pytest.mark.slow
def test_layers_and_flip_views_run_exports_its_submission(tiny):
    """A run on ``layers: [conv1]`` with orig+flip views averaged (and flip TTA): the exported
    model (Keras and float TFLite) gives the P(dog) of ``submission.csv``."""
    _assert_export_is_submission(tiny, {**_doc(tiny, "run", layers=["conv1"], views=["orig", "flip"]),
                                        "tta": True})


@pytest.mark.slow
def test_crop_views_run_exports_its_submission(tiny):
    """A run on crop views (a corner, a mirrored corner and the centre of 0.8 of the side,
    concatenated; flip TTA): the exported model's graph crops as extraction did, and gives the
    P(dog) of ``submission.csv`` (Keras and float TFLite)."""
    _assert_export_is_submission(tiny, {
        **_doc(tiny, "run-crops", views=["top_right", "flip_bottom_left", "center"],
               merge="concat", crop_fraction=0.8), "tta": True})


def _assert_export_is_submission(tiny, doc):
    from catsdogs.app.export import export_run
    from catsdogs.app.predict import open_predictor, predict_files
    from catsdogs.experiment.spec import parse_experiment
    from catsdogs.runs.runner import run_experiment

    result = run_experiment(parse_experiment(yaml.safe_dump(doc)), progress=False)
    (record,) = result.records
    assert record.tta
    expected = pd.read_csv(result.out_dir / "submission.csv").set_index("id")["label"]
    photos = sorted((tiny["data"] / "test").glob("*.jpg"))
    out = result.out_dir / "export"
    export_run(result.out_dir / "runs" / record.run_id, ["keras", "tflite"], out, neither=False)
    for backend in ("keras", "tflite"):
        preds = predict_files(open_predictor(out, backend), photos)
        got = pd.Series({int(p.file.rsplit("/", 1)[-1].split(".")[0]): p.p_dog for p in preds})
        diff = np.abs(got.sort_index().to_numpy() - expected.sort_index().to_numpy())
        assert sorted(got.index) == sorted(expected.index) and diff.max() <= 1e-3, (backend, diff)


@pytest.mark.slow
@pytest.mark.int8  # the int8 tox env runs it; elsewhere openvino is missing and it skips
def test_int8_quantises_the_layers_model(tiny, tmp_path):
    """int8 quantises the model ``build(..., layers=...)`` returns (one output: the concatenation)
    and computes every view with it; the features stay close to float32's."""
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    _, f32 = _extract(tiny, tmp_path / "cache", layers=["conv1"], views=["orig", "flip"])
    res, q = _extract(tiny, tmp_path / "cache", layers=["conv1"], views=["orig", "flip"],
                      precision="int8", calibration_size=8)
    assert res.config.calibration and q.train.X.shape == f32.train.X.shape == (len(q.train), 12)
    scale = float(np.abs(f32.train.X).max())
    assert float(np.abs(q.train.X - f32.train.X).max()) < 0.1 * scale
    # the runtime model knows its own width, also for an empty batch
    from catsdogs.features import int8
    from catsdogs.plugins import get_registry

    (model_dir,) = (tmp_path / "cache").glob(f"features/*/{NAME}-int8-*.openvino")
    runtime = int8.Int8FeatureModel(get_registry().backbone(NAME), SIZE, 8, model_dir)
    assert runtime(np.zeros((0, SIZE, SIZE, 3), np.uint8)).shape == (0, 12)


@pytest.mark.slow
@pytest.mark.int8  # the int8 tox env runs it; elsewhere openvino is missing and it skips
def test_int8_computes_the_crop_views_with_the_one_calibration(tiny, tmp_path):
    """int8 crop views: the quantised network of the plain configuration (one calibration, shared
    by every view) on each by-hand crop, averaged; close to float32's crop-view features."""
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    from catsdogs.features import int8
    from catsdogs.plugins import get_registry

    cache = tmp_path / "cache"
    views, fraction = ["orig", *CROPS], 0.75
    plain, _ = _extract(tiny, cache, precision="int8", calibration_size=8)
    _, f32 = _extract(tiny, cache, views=views, crop_fraction=fraction)
    res, q = _extract(tiny, cache, views=views, crop_fraction=fraction, precision="int8",
                      calibration_size=8)
    assert res.config.calibration == plain.config.calibration and res.path != plain.path
    (model_dir,) = cache.glob(f"features/*/{NAME}-int8-*.openvino")
    runtime = int8.Int8FeatureModel(get_registry().backbone(NAME), SIZE, 8, model_dir)
    images = _images(tiny, q.train.files)
    outs = [runtime(images)] + [runtime(_crop_by_hand(images, r, fraction)) for r in CROPS]
    assert_same_features(q.train.X, np.mean(outs, axis=0))
    scale = float(np.abs(f32.train.X).max())
    assert q.train.X.shape == f32.train.X.shape
    assert float(np.abs(q.train.X - f32.train.X).max()) < 0.1 * scale


@pytest.mark.parametrize("name,layers", [("resnet50", ["conv4", "conv2"]), ("inception_v3", ["mixed9"])])
def test_keras_backbones_offer_their_stage_outputs(name, layers):
    """The built-in Keras Applications backbones: the named layers exist with the declared
    widths, and ``build(..., layers=...)`` is one model of ``features_dim`` outputs."""
    from catsdogs.plugins import get_registry

    backbone = get_registry().backbone(name)
    size = backbone.min_input_size
    plain = backbone.build("none", size)
    for layer in backbone.feature_layers().values():
        assert plain.get_layer(layer.layer).output.shape[-1] == layer.channels
    model = backbone.build("none", size, layers=layers)
    assert backbone.check_layers(layers) == tuple(sorted(layers, key=list(backbone.feature_layers()).index))
    assert len(model.outputs) == 1 and model.output.shape[-1] == backbone.features_dim(layers)


def test_plugins_listing_shows_each_backbones_feature_layers(tiny):
    """What ``catsdogs plugins --json`` prints (``Registry.to_dict``) names the feature layers."""
    from catsdogs.plugins import get_registry

    listing = json.dumps(get_registry().to_dict())
    entries = {}

    def walk(node):
        if isinstance(node, dict):
            if "feature_layers" in node:
                entries[node["name"]] = node["feature_layers"]
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(listing))
    assert entries[NAME] == {"conv1": 4}
    assert list(entries["resnet50"]) == ["conv2", "conv3", "conv4"]
