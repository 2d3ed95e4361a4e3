"""``predict_precision``: heads trained on one precision's features, every held-out and test row
predicted from another's (issue 24: int8-trained heads ranked and submitted on float32 features).

Two tiny real backbones (seeded conv nets, installed as a plugin) on generated JPEGs, bfloat16
features to train on and float32 ones to predict from (the same mechanism as int8 -> float32,
without the int8 extra). Three experiments side by side: ``bf16`` (bfloat16 throughout), ``both``
(trained on bfloat16, ``predict_precision: float32``) and ``f32`` (float32 throughout). ``both``
trains exactly the heads of ``bf16`` and predicts exactly as those heads do on ``f32``'s cached
features; its export is its submission, with no note that the graph computes another precision.
The alignment of both sets on the same rows is also checked on in-memory feature sets.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml
from export_fixtures import predict_photos, run_tiny, tiny_world

COMMON = {
    "weights": "none",
    "backbones": ["tiny_a", "tiny_b"],
    "combinations": [["tiny_a"], ["tiny_a", "tiny_b"]],  # two runs: one group when grouped
    "heads": ["dropout_sigmoid"],
    "optimizers": [{"name": "adam", "learning_rate": 0.05}],
    "epochs": 4,
    "batch_size": 8,
    "seed": 5,
    "tta": True,
    "precision": "bfloat16",
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    with tiny_world(tmp_path_factory.mktemp("predict-precision"), "catsdogs-tiny-precision") as world:
        yield world


def _run(tiny, name: str, **fields):
    return run_tiny(tiny, COMMON, name, **fields)


def _by_combination(result) -> dict:
    return {tuple(r.combination): r for r in result.records}


def _features(result, record, keys, split: str):
    """The run's fused rows of ``split`` from the cached files named by ``keys`` (backbone ->
    feature key): file -> original row and file -> flipped row (TTA)."""
    from catsdogs.runs.features import find_features

    root = result.experiment.cache_dir
    sets = [getattr(find_features(root, keys[b]["config_key"], keys[b]["dataset_fingerprint"]),
                    split) for b in record.combination]
    files = sets[0].files
    index = [{f: i for i, f in enumerate(s.files)} for s in sets]
    X = np.concatenate([s.X[[ix[f] for f in files]] for s, ix in zip(sets, index)], axis=1)
    flip = np.concatenate([s.X_flip[[ix[f] for f in files]] for s, ix in zip(sets, index)], axis=1)
    return files, X, flip


def _heads(run_dir):
    import keras

    return [keras.saving.load_model(p, compile=False)
            for p in sorted(run_dir.glob("head*.keras"))]


def _p(head, X, flip) -> np.ndarray:
    """P(dog) of a dropout_sigmoid head with flip TTA, as the runner computes it."""
    one = lambda A: np.asarray(head.predict(A, verbose=0), np.float64).reshape(-1)  # noqa: E731
    return (one(X) + one(flip)) / 2


@pytest.mark.slow
@pytest.mark.parametrize("validation,grouped", [({"holdout": 0.25}, "0"), ({"kfold": 3}, "1")])
def test_heads_train_on_one_precision_and_every_row_is_predicted_from_the_other(
        tiny, validation, grouped, monkeypatch):
    """Holdout with each run fitted alone (``CATSDOGS_GROUPED_FIT=0``) and k-fold with the two
    runs of a fold fitted as one group: the heads are bit-equal to those trained on bfloat16
    throughout; every held-out row's P(dog) (the ranking number's rows) and every test row's are
    those heads' predictions on the float32 features, not on the bfloat16 ones; the float32 file
    is the very one a float32 run extracts."""
    from catsdogs.runs.multifit import GROUPED_ENV

    monkeypatch.setenv(GROUPED_ENV, grouped)
    name = "holdout" if "holdout" in validation else "kfold"
    bf16 = _run(tiny, f"bf16-{name}", validation=validation)
    f32 = _run(tiny, f"f32-{name}", validation=validation, precision="float32")
    both = _run(tiny, f"both-{name}", validation=validation, predict_precision="float32")
    plain, exact, mixed = (_by_combination(r) for r in (bf16, f32, both))
    assert both.feature_files == bf16.feature_files and not bf16.predicting_files
    assert both.predicting_files == f32.feature_files
    for combination, record in mixed.items():
        run_dir = both.out_dir / "runs" / record.run_id
        heads = _heads(run_dir)
        assert len(heads) == (3 if name == "kfold" else 1)
        same = _heads(bf16.out_dir / "runs" / plain[combination].run_id)
        for h, g in zip(heads, same, strict=True):  # trained on the bfloat16 features
            for a, b in zip(h.get_weights(), g.get_weights(), strict=True):
                np.testing.assert_array_equal(a, b)
        assert record.feature_keys == plain[combination].feature_keys
        assert record.predicting_keys == exact[combination].feature_keys
        assert record.settings_hash != plain[combination].settings_hash

        # held-out rows: each is predicted by one of the heads, from its float32 features
        val = pd.read_csv(run_dir / "val_predictions.csv")
        for keys, matches in ((record.predicting_keys, True), (record.feature_keys, False)):
            files, X, flip = _features(both, record, keys, "train")
            rows = [files.index(f) for f in val["file"]]
            gaps = np.min([np.abs(_p(h, X[rows], flip[rows]) - val["p_dog"].to_numpy())
                           for h in heads], axis=0)
            if matches:
                assert gaps.max() < 1e-6, gaps
            else:  # the bfloat16 features would have given other predictions
                assert gaps.max() > 1e-5, gaps
        # test rows: the heads' mean on the float32 features
        test = pd.read_csv(run_dir / "test_predictions.csv")
        files, X, flip = _features(both, record, record.predicting_keys, "test")
        rows = [files.index(f) for f in test["file"]]
        expected = np.mean([_p(h, X[rows], flip[rows]) for h in heads], axis=0)
        np.testing.assert_allclose(test["p_dog"], expected, atol=1e-6)


@pytest.mark.slow
def test_export_and_predict_are_the_submission(tiny):
    """The submitted run's export (Keras, TFLite) and ``predict`` on its run directory give
    ``submission.csv`` photo by photo, and its manifest says the backbones compute float32, the
    precision it was ranked and submitted in (a bfloat16 run's export says it computes another)."""
    from catsdogs.app.export import export_run

    both = _run(tiny, "export", predict_precision="float32", postprocess="temperature")
    out = both.out_dir
    run_dir = out / "runs" / both.winner.run_id
    submitted = pd.read_csv(out / "submission.csv").set_index("id")["label"].sort_index()
    manifest = export_run(run_dir, ["keras", "tflite"], out / "export", neither=True)
    photos = sorted((tiny["data"] / "test").glob("*.jpg"))
    for source, backend in ((run_dir, "auto"), (out / "export", "keras"),
                            (out / "export", "tflite")):
        got = predict_photos(source, photos, backend).sort_index()
        assert list(got.index) == list(submitted.index)
        assert np.abs(got.to_numpy() - submitted.to_numpy()).max() <= 1e-4, (source, backend)
    assert {b["precision"] for b in manifest["backbones"]} == {"float32"}
    assert {b["trained_precision"] for b in manifest["backbones"]} == {"bfloat16"}
    assert not any("computes" in n or "float32" in n for n in manifest.get("notes", []))
    plain = _run(tiny, "export-bf16", postprocess="temperature")
    notes = export_run(plain.out_dir / "runs" / plain.winner.run_id, ["keras"],
                       plain.out_dir / "export", neither=False).get("notes", [])
    assert any("extracted in bfloat16" in n for n in notes), notes


def _set(files: list[str], value: float, labels=None):
    """An in-memory feature set of the training photos ``files`` and one test photo; every
    feature is ``value`` plus the row's index (so rows can be told apart)."""
    from pathlib import Path

    from catsdogs.features.cache import FeatureSet, FeatureSplit

    def split(names, y):
        X = value + np.arange(len(names), dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
        return FeatureSplit(X, None, np.asarray(y), np.arange(len(names)), list(names),
                            [f"d{n}" for n in names])

    y = labels if labels is not None else [ord(f[-5]) % 2 for f in files]  # by photo
    return FeatureSet(Path("x.h5"), {}, split(files, y), split(["test/1.jpg"], [0]))


def test_align_puts_the_predicting_features_on_the_same_rows():
    """``align(sets, exclude, predicting)``: ``train`` keeps the trained-on features, ``held_out``
    and ``test`` the predicting ones of the backbones that have them (the others' very arrays);
    a row missing from either set of a backbone is dropped from all; a predicting set for an
    unknown backbone, or with other labels, is one error."""
    from catsdogs.errors import DataError
    from catsdogs.features.fusion import align

    files = [f"train/{n}.jpg" for n in "abcde"]
    own = {"a": _set(files, 0.0), "b": _set(files, 100.0)}
    aligned = align(own, [], {"a": _set(files[1:], 50.0)})  # photo a has no predicting row
    assert aligned.train.files == aligned.held_out.files == files[1:]
    np.testing.assert_array_equal(aligned.train.X["a"][:, 0], [1, 2, 3, 4])
    np.testing.assert_array_equal(aligned.held_out.X["a"][:, 0], [50, 51, 52, 53])
    assert aligned.held_out.X["b"] is aligned.train.X["b"]
    np.testing.assert_array_equal(aligned.test.X["a"][:, 0], [50])
    np.testing.assert_array_equal(aligned.test.X["b"][:, 0], [100])
    plain = align(own)
    assert plain.predicted_train is None and plain.held_out is plain.train
    with pytest.raises(DataError, match="predicting features of 'c' without"):
        align(own, [], {"c": _set(files, 1.0)})
    with pytest.raises(DataError, match="labels of the train rows differ"):
        align(own, [], {"a": _set(files, 1.0, labels=[1, 1, 0, 0, 1])})


def test_the_setting_is_inherited_and_overridden_per_backbone(tmp_path):
    """Top-level ``predict_precision`` is every backbone's default; a backbone may set its own;
    the same precision as ``precision`` predicts from the trained-on features (no second set);
    an unknown precision is one error naming the field."""
    from catsdogs.experiment.spec import ExperimentError, load_experiment

    path = tmp_path / "x.yaml"
    doc = {"data": str(tmp_path), "precision": "int8", "predict_precision": "float32",
           "backbones": ["resnet50", {"name": "xception", "predict_precision": "int8"},
                         {"name": "inception_v3", "precision": "float32"}],
           "heads": ["dropout_sigmoid"], "optimizers": ["adam"]}
    path.write_text(yaml.safe_dump(doc))
    specs = load_experiment(path).backbones
    assert [(b.precision, b.predicts_in, b.predicts_apart) for b in specs] == [
        ("int8", "float32", True), ("int8", "int8", False), ("float32", "float32", False)]
    path.write_text(yaml.safe_dump({**doc, "predict_precision": "float64"}))
    with pytest.raises(ExperimentError, match=r"x\.yaml:\d+: predict_precision: .*float32"):
        load_experiment(path)


@pytest.mark.slow
def test_predicting_in_the_trained_precision_keeps_finished_runs(tiny):
    """``predict_precision`` equal to ``precision`` changes nothing: the runs of the same
    experiment without it are reused, not retrained (their settings are the same)."""
    first = _run(tiny, "same", validation={"holdout": 0.25})
    again = _run(tiny, "same", validation={"holdout": 0.25}, predict_precision="bfloat16")
    assert again.computed == 0 and again.reused == len(first.records)
    apart = _run(tiny, "same", validation={"holdout": 0.25}, predict_precision="float32")
    assert apart.computed == len(first.records)
