"""Issue 24 lever 4 wired: the ``finetune`` head in experiments, from plan to export.

A real tiny network with ``split_top`` (:class:`catsdogs.testing.TinyTopSplit`, registered for
the module) and one without it feed real experiments on generated JPEGs. The runner plans the
head on single split-capable backbones only, caches their maps, ranks the head on validation
rows it was not fitted on, refits it for the submission, and the exported model (Keras and
float TFLite: the backbone's bottom, flattened, then the fine-tuned top) predicts the submitted
P(dog) photo by photo.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from export_fixtures import predict_photos, submitted_vs_ranked, tiny_env, tiny_experiment

from catsdogs.errors import ConfigError
from catsdogs.testing import TinyTopSplit

TOL = 1e-3
SPLIT = TinyTopSplit.name


class TinyNoSplit(TinyTopSplit):
    """The same network without the capability: a features-only backbone."""

    name = "catsdogs_testing_nosplit"
    has_top_split = False


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with tiny_env(tmp_path_factory, "finetune-runner", [TinyTopSplit(), TinyNoSplit()]) as env:
        yield env


def _experiment(env, name: str, **fields):
    return tiny_experiment(env["root"], env["data"], name, **{
        "backbones": [SPLIT], "heads": ["finetune"], **fields})


def _run(env, name: str, **fields):
    from catsdogs.runs.runner import run_experiment

    return run_experiment(_experiment(env, name, **fields), progress=False)


def test_plan_gives_finetune_only_single_split_backbones_once(env):
    from catsdogs.runs.runner import plan_runs

    exp = _experiment(env, "plan", backbones=[SPLIT, TinyNoSplit.name],
                      heads=["dropout_sigmoid", "finetune"],
                      optimizers=["adam", {"name": "adadelta", "learning_rate": 1.0}])
    runs = plan_runs(exp)
    tuned = [(list(r.combination), r.optimizer) for r in runs if r.head.name == "finetune"]
    assert tuned == [([SPLIT], None)]  # not per optimizer, not on the other combinations
    assert sum(r.head.name == "dropout_sigmoid" for r in runs) == 6
    # trained for long and sharing nothing: its own group, written as soon as it is trained
    from catsdogs.compute import LOCAL
    from catsdogs.runs.runner import _run_groups

    groups = _run_groups([(r, {}) for r in runs], LOCAL, env["registry"])
    assert [[spec.head.name for spec, _ in g] for g in groups][-1] == ["finetune"]
    assert all("finetune" not in [spec.head.name for spec, _ in g] for g in groups[:-1])


@pytest.mark.parametrize("fields, message", [
    ({"backbones": [TinyNoSplit.name]}, "no combination of the experiment is a single backbone "
                                        "that offers split_top"),
    ({"backbones": [SPLIT, TinyNoSplit.name], "combinations": [[SPLIT, TinyNoSplit.name]]},
     "no combination"),
    ({"heads": [{"name": "finetune", "params": {"image_size": 24}}]}, "do not set 'image_size'"),
    ({"heads": [{"name": "finetune", "params": {"backbone": TinyNoSplit.name}}],
      "backbones": [SPLIT, TinyNoSplit.name]}, f"and is '{TinyNoSplit.name}'"),
])
def test_a_finetune_head_that_cannot_run_is_one_clear_error_on_load(env, fields, message):
    with pytest.raises(ConfigError, match=message) as info:
        _experiment(env, "bad", **fields)
    assert "bad.yaml" in str(info.value) and "heads[0]" in str(info.value)


@pytest.mark.slow
def test_finetune_run_is_ranked_honestly_and_reused(env):
    from catsdogs.app.export import load_head_file
    from catsdogs.features.maps import cache_maps

    result = _run(env, "grid", heads=["dropout_sigmoid", "finetune"], refit=False)
    out = result.out_dir
    (ft,) = [r for r in result.records if r.head.name == "finetune"]
    assert ft.params["backbone"] == SPLIT and ft.params["weights"] == "none"
    assert ft.params["image_size"] == TinyTopSplit.input_size
    assert ft.n_train == 24 and ft.n_val == 8 and not ft.tta
    assert ft.refit_params["fixed_epochs"][0] >= 1
    assert list(ft.settings["maps"]) == [f"{SPLIT}/maps1"]
    # its validation predictions are its saved head on the cached maps of validation photos:
    # the head that is ranked was fitted on the other 24 rows only
    maps = cache_maps(env["data"], SPLIT, weights="none", cache_dir=env["root"] / "cache")
    val = pd.read_csv(out / "runs" / ft.run_id / "val_predictions.csv")
    index = {f: i for i, f in enumerate(maps.train.files)}
    rows = maps.train.X[[index[f] for f in val["file"]]]
    head = load_head_file(out / "runs" / ft.run_id / "head.keras")
    np.testing.assert_allclose(head.predict(rows, verbose=0).reshape(-1), val["p_dog"], atol=1e-6)
    frozen = [r for r in result.records if r.head.name == "dropout_sigmoid"]
    assert set(pd.read_csv(out / "runs" / frozen[0].run_id / "val_predictions.csv")["file"]) == \
        set(val["file"])  # the same validation photos as every run
    again = _run(env, "grid", heads=["dropout_sigmoid", "finetune"], refit=False)
    assert again.computed == 0 and again.reused == len(result.records)


@pytest.mark.slow
def test_maps_are_read_only_for_the_runs_trained_or_refitted_now(env, monkeypatch):
    """A resumed experiment whose maps runs are all finished reads no maps (on the benchmark
    that is about 4.5 GB and 90 s for three backbones); a refit of a finetune winner reads its
    maps once, and a refit reused reads none."""
    import catsdogs.features.maps as maps_mod

    first = _run(env, "lazy", refit=False)
    calls: list[str] = []
    real = maps_mod.cache_maps
    monkeypatch.setattr(maps_mod, "cache_maps", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    again = _run(env, "lazy", refit=False)
    assert again.computed == 0 and calls == []
    refitted = _run(env, "lazy", refit=True)
    assert refitted.computed == 0 and calls == [SPLIT]
    assert refitted.winner.run_id == first.winner.run_id
    assert (refitted.out_dir / "refit" / first.winner.run_id / "head.keras").is_file()
    assert json.loads((refitted.out_dir / "refit.json").read_text())["reused"] == []
    _run(env, "lazy", refit=True)
    assert calls == [SPLIT]  # the refit reused: nothing read


@pytest.mark.slow
def test_refitted_finetune_export_predicts_the_submission(env):
    """``refit: true``: the winner is refitted for its stopped epochs on every row; the export
    (the bottom's maps, flattened, then the refitted fine-tuned top) is the submission."""
    from catsdogs.app.export import export_run

    result = _run(env, "refit", refit=True, postprocess="temperature")
    out = result.out_dir
    (record,) = result.records
    submitted = submitted_vs_ranked(result, record, 10 * TOL)
    photos = sorted((env["data"] / "test").glob("*.jpg"))
    manifest = export_run(out / "runs" / record.run_id, ["keras", "tflite"], out / "export",
                          neither=True)
    assert manifest["refit"]
    for model, backend in ((out / "runs" / record.run_id, "auto"), (out / "export", "keras"),
                           (out / "export", "tflite")):
        got = predict_photos(model, photos, backend)
        diff = np.abs(got.sort_index().to_numpy() - submitted.sort_index().to_numpy()).max()
        assert diff <= TOL, (model, backend, diff)


@pytest.mark.slow
def test_kfold_ensemble_with_a_finetune_member_exports_what_it_submits(env):
    """k-fold: a fine-tuned top per fold, saved and averaged; an ensemble blending it with a
    features run (flip TTA) fold by fold exports as one graph that predicts its submission."""
    from catsdogs.app.export import export_run
    from catsdogs.runs.submission import write_run_submission

    result = _run(env, "kfold", heads=["dropout_sigmoid", "finetune"], tta=True,
                  validation={"kfold": 3}, ensemble={"top": 2, "method": "stack"},
                  postprocess="temperature")
    out, photos = result.out_dir, sorted((env["data"] / "test").glob("*.jpg"))
    (ft,) = [r for r in result.records if r.head.name == "finetune"]
    assert sorted(p.name for p in (out / "runs" / ft.run_id).glob("head*.keras")) == [
        "head-fold1.keras", "head-fold2.keras", "head.keras"]
    assert ft.n_val == 32  # every training row, each predicted by the fold top not fitted on it
    (ens,) = [r for r in result.records if r.ensemble]
    assert ft.run_id in ens.ensemble["members"]
    for record in (ft, ens):
        run_dir = out / "runs" / record.run_id
        write_run_submission(run_dir, out / f"{record.run_id}.csv")
        expected = pd.read_csv(out / f"{record.run_id}.csv").set_index("id")["label"]
        manifest = export_run(run_dir, ["tflite"], out / f"export-{record.run_id}", neither=False)
        assert [len(m["heads"]) for m in manifest["members"]] == [3] * len(manifest["members"])
        got = predict_photos(out / f"export-{record.run_id}", photos, "tflite")
        diff = np.abs(got.sort_index().to_numpy() - expected.sort_index().to_numpy()).max()
        assert diff <= TOL, (record.run_id, diff)


def test_an_ensemble_led_by_a_finetune_run_exports_its_neither_score_from_that_run(env):
    """The neither score is fitted on the first member's features. When that member is trained
    on maps (a finetune run, as ranked first on experiments/best.yaml's bundled sample), the graph
    takes its backbone's features, not those of the first features run in the ensemble: there a
    fusion of two backbones made ``export`` fail on a weight shape (3840 vs 1280 columns). The
    members are put in that order here (a mean blend does not depend on it), and the default
    export, neither score included, predicts the submission."""
    from catsdogs.app.export import build_graph, export_run, load_run
    from catsdogs.app.neither import fit_neither
    from catsdogs.runs.submission import write_run_submission

    result = _run(env, "neither", backbones=[SPLIT, TinyNoSplit.name],
                  combinations=[[SPLIT], [SPLIT, TinyNoSplit.name]],
                  heads=["finetune", "dropout_sigmoid"], ensemble={"top": 3, "method": "mean"})
    (ens,) = [r for r in result.records if r.ensemble]
    run_dir = result.out_dir / "runs" / ens.run_id
    info = load_run(run_dir, env["registry"])
    fused = [m for m in info.members if len(m.record.combination) == 2]
    (ft,) = [m for m in info.members if m.record.head.name == "finetune"]
    info.members = [ft, *fused, *(m for m in info.members if m is not ft and m not in fused)]
    stats = fit_neither(ft.record, info.experiment, ft.run_dir)
    model = build_graph(info, stats, env["registry"])[0]
    assert model.get_layer("neither_similarity").kernel.shape[0] == stats.centroids.shape[1]

    write_run_submission(run_dir, result.out_dir / "ens.csv")
    expected = pd.read_csv(result.out_dir / "ens.csv").set_index("id")["label"]
    manifest = export_run(run_dir, ["keras"], result.out_dir / "export-ens")
    assert manifest["neither"]["threshold"] > 0
    got = predict_photos(result.out_dir / "export-ens", sorted((env["data"] / "test").glob("*.jpg")),
                         "keras")
    assert np.abs(got.sort_index().to_numpy() - expected.sort_index().to_numpy()).max() <= TOL


@pytest.mark.slow
def test_a_tuned_finetune_run_is_tuned_on_its_training_rows_and_refitted_as_tuned(env):
    """``tuning:`` searches the ``finetune`` head's own space (its dropout) on the run's training
    rows only; the ranked head and the refit for the submission both use the parameters it
    chose, and the injected backbone settings stay the run's."""
    import keras

    from catsdogs.app.export import load_head_file

    result = _run(env, "tuned", tuning={"budget": 2}, refit=True)
    (ft,) = result.records
    tuning = ft.tuning
    assert tuning is not None and len(tuning["trials"]) == 2
    assert tuning["n_rows"] == ft.n_train == 24  # never the 8 validation rows
    best = tuning["best_params"]
    assert ft.params["dropout"] == best["dropout"] and 0.0 <= best["dropout"] <= 1.0
    assert ft.params["backbone"] == SPLIT and ft.params["image_size"] == TinyTopSplit.input_size
    for path in (result.out_dir / "runs" / ft.run_id / "head.keras",
                 result.out_dir / "refit" / ft.run_id / "head.keras"):
        rates = [layer.rate for layer in load_head_file(path).layers
                 if isinstance(layer, keras.layers.Dropout)]
        assert rates == [pytest.approx(best["dropout"])], path


@pytest.mark.slow
def test_a_stopped_kfold_finetune_run_resumes_at_the_fold_it_was_in(env, monkeypatch):
    """A ``finetune`` run whose third fold fails (an error raised in its fit, as a kill would stop
    it) keeps its first two folds (:mod:`catsdogs.runs.folds`); the rerun fine-tunes the third
    fold only, and the run (held-out and test predictions, each fold's saved top) equals the run
    trained in one go, so the fine-tunes are what a rerun would have made."""
    from catsdogs.builtin.finetune import FineTuneHead
    from catsdogs.runs.folds import FOLDS_DIR

    fits: list[int] = []
    fit = FineTuneHead.fit

    def counted(self, X, *args, **kwargs):
        fits.append(len(X))
        if stop_at is not None and len(fits) == stop_at:
            raise RuntimeError("stopped in this fold")
        return fit(self, X, *args, **kwargs)

    monkeypatch.setattr(FineTuneHead, "fit", counted)
    stop_at: int | None = 3
    with pytest.raises(RuntimeError, match="stopped in this fold"):
        _run(env, "resumed", validation={"kfold": 3})
    out = env["root"] / "resumed"
    assert sorted(p.name for p in (out / FOLDS_DIR).glob("*/*/fold-*")) == ["fold-0", "fold-1"]
    stop_at, fits[:] = None, []
    resumed = _run(env, "resumed", validation={"kfold": 3})
    assert len(fits) == 1 and not (out / FOLDS_DIR).exists()
    fits[:] = []
    clean = _run(env, "clean", validation={"kfold": 3})
    assert len(fits) == 3
    (a,), (b,) = resumed.records, clean.records
    for name in ("val_predictions.csv", "test_predictions.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(out / "runs" / a.run_id / name),
                                      pd.read_csv(clean.out_dir / "runs" / b.run_id / name))
    from catsdogs.app.export import load_head_file

    for name in ("head.keras", "head-fold1.keras", "head-fold2.keras"):
        for wa, wb in zip(load_head_file(out / "runs" / a.run_id / name).get_weights(),
                          load_head_file(clean.out_dir / "runs" / b.run_id / name).get_weights(),
                          strict=True):
            np.testing.assert_array_equal(wa, wb)
