"""The exported model is the submitted model (issue 20 item 1).

Two tiny real backbones of different input sizes (a seeded conv net at 32 px and one at 40 px,
installed as a plugin distribution) feed real experiments on generated JPEGs: flip TTA, learned
post-processing, refit, an ensemble, k-fold. For each kind of run -- a single run, the refitted
winner, a k-fold run (K fold heads), an ensemble of runs (members' heads and the blend) -- the
exported model (Keras and float TFLite) and ``predict --model RUN_DIR`` give, photo by photo,
the P(dog) of ``submission.csv`` (or of the run's post-processed test predictions, which is what
``predict-test`` submits) to 1e-3.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import run_cli
from export_fixtures import predict_photos, run_tiny, tiny_world

TOL = 1e-3

#: an over-confident head: dropout_sigmoid trained as usual, then its logit scaled by 10,000 (the
#: tiny backbones' logits are of order 0.01), so most P(dog) are exactly 1.0 or below 2^-24 (what
#: a confident real head does beyond a logit of about 17)
SHARP_HEAD = '''
from catsdogs.builtin.heads import DropoutSigmoidHead
from catsdogs.hookspecs import hookimpl


class SharpSigmoidHead(DropoutSigmoidHead):
    name = "sharp_sigmoid"

    def fit(self, X, y, **kwargs):
        super().fit(X, y, **kwargs)
        dense = self.model_.get_layer("prediction")
        dense.set_weights([w * 1e4 for w in dense.get_weights()])
        return self


@hookimpl
def register_heads(register):
    register(SharpSigmoidHead)
'''

COMMON = {
    "weights": "none",
    "backbones": ["tiny_a", "tiny_b"],
    "heads": ["dropout_sigmoid"],
    "optimizers": [{"name": "adam", "learning_rate": 0.05}],
    "epochs": 4,
    "batch_size": 8,
    "seed": 3,
    "tta": True,
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny backbones and the sharp head installed as a plugin, and a data set with test
    photos (:func:`export_fixtures.tiny_world`)."""
    with tiny_world(tmp_path_factory.mktemp("export-submission"), "catsdogs-tiny-export",
                    {"catsdogs_sharp_head": SHARP_HEAD}) as world:
        yield world


def _run(tiny, name: str, **fields):
    return run_tiny(tiny, COMMON, name, **fields)


def _photos(tiny) -> list:
    return sorted((tiny["data"] / "test").glob("*.jpg"))


def _submission(path) -> pd.Series:
    return pd.read_csv(path).set_index("id")["label"]


def _posted(run_dir, out) -> pd.Series:
    """What ``predict-test RUN_DIR`` submits for a run: its post-processed test predictions."""
    from catsdogs.runs.runner import write_run_submission

    write_run_submission(run_dir, out)
    return _submission(out)


def _max_diff(a: pd.Series, b: pd.Series) -> float:
    assert sorted(a.index) == sorted(b.index)
    return float(np.max(np.abs(a.sort_index().to_numpy() - b.sort_index().to_numpy())))


def _export_and_compare(run_dir, out, expected, photos, formats=("keras", "tflite")):
    from catsdogs.app.export import export_run

    manifest = export_run(run_dir, list(formats), out, neither=False)
    diffs = {"run_dir": _max_diff(predict_photos(run_dir, photos), expected)}
    for fmt in formats:
        if fmt != "coreml":  # converted from the same graph; Core ML cannot run on Linux
            diffs[fmt] = _max_diff(predict_photos(out, photos, fmt), expected)
    assert max(diffs.values()) <= TOL, diffs
    return manifest, diffs


@pytest.mark.slow
def test_grid_tta_auto_refit_ensemble_export_predict_equals_submission(tiny, record_property):
    """End to end: grid (mixed input sizes, TTA, postprocess auto, refit, a stacked ensemble)
    -> export of the submitted run -> ``catsdogs predict --json`` on the test photos ->
    P(dog) equals submission.csv to 1e-3; every other run's export equals what predict-test
    submits for it (single runs and the ensemble)."""
    result = _run(tiny, "e2e", combinations="all", postprocess="auto", refit=True,
                  ensemble={"top": 2, "method": "stack"})
    out, photos = result.out_dir, _photos(tiny)
    winner = result.winner
    refit = json.loads((out / "refit.json").read_text())
    assert refit["refit"] and refit["winner"] == winner.run_id and refit["heads"]
    export = out / "export-winner"
    manifest, diffs = _export_and_compare(out / "runs" / winner.run_id, export,
                                          _submission(out / "submission.csv"), photos)
    assert manifest["refit"] is True
    assert manifest["ranking_logloss"] == pytest.approx(winner.ranking_logloss)
    assert manifest["postprocess"]["kind"] == winner.postprocess["transform"]["kind"]
    proc = run_cli("predict", *map(str, photos), "--model", str(export), "--json")
    assert proc.returncode == 0, proc.stderr
    cli = pd.Series({int(r["file"].rsplit("/", 1)[-1].split(".")[0]): r["p_dog"]
                     for r in json.loads(proc.stdout)})
    diffs["cli"] = _max_diff(cli, _submission(out / "submission.csv"))
    assert diffs["cli"] <= TOL, diffs
    others = {}
    for record in result.records[1:]:
        run_dir = out / "runs" / record.run_id
        _, d = _export_and_compare(run_dir, out / f"export-{record.run_id}",
                                   _posted(run_dir, out / f"{record.run_id}.csv"), photos,
                                   formats=("tflite",))
        others[record.run_id] = max(d.values())
    assert any(r.ensemble for r in result.records)
    record_property("measured", f"export vs submission, max |dP(dog)|: winner {diffs}, "
                                f"other runs {others}")


@pytest.mark.slow
def test_single_run_export_has_tta_and_postprocessing(tiny):
    """A single holdout run with flip TTA and a temperature: the export equals its
    post-processed test predictions (without the fix: raw head, no flip, no temperature)."""
    result = _run(tiny, "single", combinations=[["tiny_a", "tiny_b"]], postprocess="temperature")
    (record,) = result.records
    assert record.tta and record.postprocess["transform"]["kind"] == "temperature"
    run_dir = result.out_dir / "runs" / record.run_id
    formats = ("keras", "tflite") + (("coreml",) if _has_coremltools() else ())
    manifest, _ = _export_and_compare(run_dir, result.out_dir / "export", _submission(
        result.out_dir / "submission.csv"), _photos(tiny), formats)
    assert [i["size"] for i in manifest["inputs"]] == [40, 32]  # each backbone: its own pixels
    assert manifest["tta"] and manifest["postprocess"]["kind"] == "temperature"
    if "coreml" in formats:  # the same graph converts: two RGB image inputs, P(dog) out
        import coremltools as ct

        spec = ct.models.MLModel(str(result.out_dir / "export" / "model.mlpackage"),
                                 skip_model_load=True).get_spec()
        assert {(i.name, i.type.imageType.width) for i in spec.description.input} == {
            ("image", 40), ("image_32", 32)}
        assert [o.name for o in spec.description.output] == ["prediction"]


def _has_coremltools() -> bool:
    import importlib.util

    return importlib.util.find_spec("coremltools") is not None


@pytest.mark.slow
def test_refit_winner_export_is_the_refitted_head(tiny):
    """``refit: true``: the refitted head is saved (refit/<run>/head.keras) and the export of the
    winner equals the refitted submission, not the ranked head's predictions."""
    result = _run(tiny, "refit", combinations=[["tiny_a"]], refit=True, postprocess="none",
                  epochs=20)
    out = result.out_dir
    (record,) = result.records
    assert (out / "refit" / record.run_id / "head.keras").is_file()
    submitted = _submission(out / "submission.csv")
    ranked = _posted(out / "runs" / record.run_id, out / "ranked.csv")
    assert _max_diff(submitted, ranked) > 10 * TOL  # the refit changes the predictions
    manifest, _ = _export_and_compare(out / "runs" / record.run_id, out / "export", submitted,
                                      _photos(tiny))
    assert manifest["refit"] and manifest["members"][0]["heads"][0].endswith(
        f"refit/{record.run_id}/head.keras")


@pytest.mark.slow
def test_kfold_export_averages_every_fold_head(tiny):
    """k-fold: every fold's head is saved; the export post-processes each fold head's P(dog) and
    averages them, and an ensemble of k-fold runs blends fold by fold, as the submission does
    (the mean: a stack may give one of two members no weight and drop it)."""
    result = _run(tiny, "kfold", combinations=[["tiny_b"], ["tiny_a"]], validation={"kfold": 3},
                  postprocess="temperature", refit=True, ensemble={"top": 2, "method": "mean"})
    out, photos = result.out_dir, _photos(tiny)
    for record in result.records:
        run_dir = out / "runs" / record.run_id
        if not record.ensemble:
            assert sorted(p.name for p in run_dir.glob("head*.keras")) == [
                "head-fold1.keras", "head-fold2.keras", "head.keras"]
        winner = record.run_id == result.winner.run_id
        expected = _submission(out / "submission.csv") if winner else \
            _posted(run_dir, out / f"{record.run_id}.csv")
        manifest, _ = _export_and_compare(run_dir, out / f"export-{record.run_id}", expected,
                                          photos, ("keras", "tflite") if winner else ("tflite",))
        assert [len(m["heads"]) for m in manifest["members"]] == [3] * (2 if record.ensemble else 1)
        assert not manifest["refit"]  # k-fold: nothing refitted, the fold heads are submitted


@pytest.mark.slow
def test_ensemble_export_blends_its_members(tiny):
    """An ensemble of runs exports as one graph (backbones computed once, members' heads, the
    blend, the post-processing) equal to its submitted predictions."""
    result = _run(tiny, "ensemble", combinations=[["tiny_a"], ["tiny_b"], ["tiny_a", "tiny_b"]],
                  ensemble={"top": 3, "method": "stack"}, postprocess="clip")
    out = result.out_dir
    (ens,) = [r for r in result.records if r.ensemble]
    run_dir = out / "runs" / ens.run_id
    manifest, _ = _export_and_compare(run_dir, out / "export", _posted(run_dir, out / "ens.csv"),
                                      _photos(tiny))
    assert [m["run_id"] for m in manifest["members"]] == ens.ensemble["members"]
    assert manifest["blend"]["method"] == "stack"
    import keras

    from catsdogs.app import graph  # noqa: F401  (the export's layers)

    model = keras.saving.load_model(out / "export" / "model.keras", compile=False)
    networks = [layer for layer in model.layers if isinstance(layer, keras.Model)
                and any(sub.name == "conv" for sub in layer.layers)]
    assert len(networks) == 2  # tiny_a and tiny_b once each, shared by the three members


@pytest.mark.slow
def test_a_saturated_head_is_ranked_submitted_and_exported_at_one_bound(tiny):
    """A head whose float32 P(dog) is exactly 0.0 or 1.0: the ranking number, submission.csv and
    the exported TFLite model all keep P(dog) in [2^-24, 1 - 2^-24], the very same numbers (before
    the bound the submission held 1.0, which a log loss clipped at 1e-15 scores at 34.5 nats on a
    cat, and the ranking number counted it so)."""
    from catsdogs.app.export import export_run
    from catsdogs.evaluation.metrics import PROB_EPS, log_loss

    result = _run(tiny, "sharp", combinations=[["tiny_a"]], heads=["sharp_sigmoid"],
                  postprocess="none", epochs=6, tta=False)
    out, (record,) = result.out_dir, result.records
    run_dir = out / "runs" / record.run_id
    val = pd.read_csv(run_dir / "val_predictions.csv")
    raw = val["p_dog"].to_numpy()
    beyond = (raw < PROB_EPS) | (raw > 1.0 - PROB_EPS)
    assert beyond.mean() >= 0.5 and (raw == 1.0).any(), raw  # the head saturates, at 1.0 too
    bounded = np.clip(raw, PROB_EPS, 1.0 - PROB_EPS)
    assert record.ranking_logloss == pytest.approx(log_loss(val["label"], bounded), rel=1e-9)
    assert record.ranking_logloss <= 24 * np.log(2.0)
    submitted = _submission(out / "submission.csv")
    assert submitted.min() >= PROB_EPS and submitted.max() <= 1.0 - PROB_EPS
    test_raw = pd.read_csv(run_dir / "test_predictions.csv").set_index("id")["p_dog"]
    saturated = test_raw.index[(test_raw < PROB_EPS) | (test_raw > 1.0 - PROB_EPS)]
    assert len(saturated) >= len(test_raw) // 2
    assert set(submitted[saturated]) <= {PROB_EPS, 1.0 - PROB_EPS}
    export_run(run_dir, ["tflite"], out / "export", neither=False)
    exported = predict_photos(out / "export", _photos(tiny), "tflite")
    assert exported[saturated].tolist() == submitted[saturated].tolist()
    assert _max_diff(exported, submitted) <= TOL


@pytest.mark.slow
def test_a_head_of_another_width_is_one_clear_error(tiny):
    """A run directory whose head takes another number of values than its backbones give (here:
    the head of the tiny_a + tiny_b run copied into the tiny_a run) is not exported: one error
    naming the run, the head file and both widths."""
    import shutil

    from catsdogs.app.export import export_run
    from catsdogs.errors import DataError

    result = _run(tiny, "swapped", combinations=[["tiny_a"], ["tiny_a", "tiny_b"]])
    by_combination = {tuple(r.combination): r for r in result.records}
    one, two = by_combination[("tiny_a",)], by_combination[("tiny_a", "tiny_b")]
    runs = result.out_dir / "runs"
    shutil.copyfile(runs / two.run_id / "head.keras", runs / one.run_id / "head.keras")
    with pytest.raises(DataError, match=rf"run '{one.run_id}': head.keras takes \d+ values but "
                                        r"the rebuilt backbones give \d+"):
        export_run(runs / one.run_id, ["keras"], result.out_dir / "export-swapped", neither=False)
