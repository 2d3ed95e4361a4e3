"""Fold checkpoints (:mod:`catsdogs.runs.folds`): a k-fold run killed in a fold resumes at that
fold, with the folds it had finished taken from the driver's disk, and equals the run trained in
one go. Real features, a real head plugin, the CLI in a subprocess killed with ``kill -9``."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import GATE_SOURCE, GATED_HEAD, install_fake_dist, kill_cli_at, make_kaggle, noted

from catsdogs.runs.folds import FOLDS_DIR, FoldCheckpoint, FoldStore, fold_state

FOLDS = 4
RUN_ID = "resnet50__gated_logistic"


@pytest.fixture
def gated(tmp_path, monkeypatch):
    """The gated head installed as a plugin distribution; its module and a registry with it."""
    import importlib

    from catsdogs.plugins import Registry

    site = install_fake_dist(tmp_path / "site", "catsdogs-foldgate", "1.0",
                             {"catsdogs_foldgate": GATED_HEAD}, {"foldgate": "catsdogs_foldgate"})
    monkeypatch.syspath_prepend(str(site))
    registry = Registry().load(strict=True)
    module = importlib.import_module("catsdogs_foldgate")
    yield module, registry, site
    module.GatedLogistic.gate = None
    module.GatedLogistic.hold_after = 2


def _write(tmp_path, name: str, data, **changes) -> object:
    doc = {"weights": "none", "backbones": [{"name": "resnet50", "image_size": 32}],
           "heads": ["gated_logistic"], "optimizers": ["adam"], "validation": {"kfold": FOLDS},
           "seed": 7,
           "data": str(data), "output": str(tmp_path / f"out-{name}"),
           "cache_dir": str(tmp_path / "cache"), **changes}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _fits(gate) -> list[int]:
    return noted(gate, "fits")


def _killed_at_the_gate(tmp_path, site, exp) -> tuple[object, int]:
    """``catsdogs run EXP`` with the plugins of ``site``, killed at its gate (a new folder): the
    gate and the killed process id."""
    gate = tmp_path / "gate"
    gate.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get(
        "PYTHONPATH")])), "CATSDOGS_TEST_GATE": str(gate), "CATSDOGS_STRICT_PLUGINS": "1"}
    return gate, kill_cli_at(gate / "blocked", "run", str(exp), "--no-progress", env=env)


def _same_run(a, b, run_id: str = RUN_ID) -> None:
    """Two output folders hold the same finished run: predictions, per-fold test predictions,
    the record's numbers, and a model file per fold."""
    ra, rb = a / "runs" / run_id, b / "runs" / run_id
    for name in ("val_predictions.csv", "test_predictions.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(ra / name), pd.read_csv(rb / name))
    from catsdogs.runs.record import load_record

    one, two = load_record(ra), load_record(rb)
    assert one.metrics == two.metrics and one.history == two.history and one.params == two.params
    assert one.refit_params == two.refit_params
    models = sorted(p.name for p in ra.glob("head*.keras"))
    assert models == sorted(p.name for p in rb.glob("head*.keras")) and len(models) == FOLDS


@pytest.mark.slow
def test_a_killed_kfold_run_resumes_at_its_first_unfinished_fold(tmp_path, gated):
    """``kill -9`` of ``catsdogs run`` while its one run trains its third fold (held there by the
    head plugin, not found by time): the first two folds are on disk, the rerun trains only the
    last two, and the run equals the run trained in one go. Without fold checkpoints the rerun
    trained all four."""
    module, registry, site = gated
    from catsdogs.experiment.spec import load_experiment
    from catsdogs.runs.runner import run_experiment

    data = make_kaggle(tmp_path / "data", n_per_class=16, n_test=6)
    exp = _write(tmp_path, "k", data)
    out = tmp_path / "out-k"
    gate, pid = _killed_at_the_gate(tmp_path, site, exp)
    assert _fits(gate) == [pid] * 3  # folds 1 and 2 trained, killed in fold 3
    assert not (out / "runs" / RUN_ID).exists()  # the run itself was never written
    kept = sorted(p.name for p in (out / FOLDS_DIR / RUN_ID).glob("*/fold-*"))
    assert kept == ["fold-0", "fold-1"], kept

    # each kept fold carries its training time; the resumed run's seconds count them (a fold
    # said to have taken 1,000 s: the run cannot have taken less)
    (state_file,) = (out / FOLDS_DIR / RUN_ID).glob("*/fold-1/state.json")
    state = json.loads(state_file.read_text())
    assert 0 < state["seconds"] < 1000
    state_file.write_text(json.dumps({**state, "seconds": 1000.0}))
    (first,) = (out / FOLDS_DIR / RUN_ID).glob("*/fold-0/state.json")
    kept_seconds = 1000.0 + json.loads(first.read_text())["seconds"]

    resumed_gate = tmp_path / "resumed"
    resumed_gate.mkdir()
    module.GatedLogistic.gate, module.GatedLogistic.hold_after = str(resumed_gate), 99
    t0 = time.perf_counter()
    result = run_experiment(load_experiment(exp, registry=registry), registry=registry,
                            progress=False)
    took = time.perf_counter() - t0
    assert (result.computed, result.reused) == (1, 0)
    assert kept_seconds < result.records[0].seconds < kept_seconds + took  # the kept folds' plus this call's
    assert _fits(resumed_gate) == [os.getpid()] * 2  # folds 3 and 4 only
    assert not (out / FOLDS_DIR).exists()  # the run is written: its folds are gone
    assert not list((out / "runs").glob(".*tmp*"))

    clean_gate = tmp_path / "clean"
    clean_gate.mkdir()
    module.GatedLogistic.gate = str(clean_gate)
    clean = run_experiment(load_experiment(_write(tmp_path, "clean", data), registry=registry),
                           registry=registry, progress=False)
    assert _fits(clean_gate) == [os.getpid()] * FOLDS
    _same_run(out, clean.out_dir)
    assert (out / "submission.csv").read_bytes() == (clean.out_dir / "submission.csv").read_bytes()


#: an optimizer plugin: adam that notes each ``build`` (one per fold of its run, in a group too)
#: in ``$CATSDOGS_TEST_GATE/builds`` and holds the build after ``hold_after`` of them
GATED_ADAM = GATE_SOURCE + """
from catsdogs.builtin.optimizers import AdamOptimizer
from catsdogs.hookspecs import hookimpl


class GatedAdam(AdamOptimizer):
    name = "gated_adam"
    hold_after = 2

    def build(self):
        gate = os.environ.get("CATSDOGS_TEST_GATE")
        if gate:
            note_then_hold(gate, "builds", self.hold_after)
        return super().build()


@hookimpl
def register_optimizers(register):
    register(GatedAdam)
"""

GROUP = ("resnet50__dropout_sigmoid__gated_adam", "resnet50__dropout_sigmoid__adadelta")
GROUPED = {"heads": ["dropout_sigmoid"], "epochs": 2, "batch_size": 16,
           "optimizers": [{"name": "gated_adam", "learning_rate": 0.01}, "adadelta"]}


@pytest.mark.slow
def test_a_killed_group_resumes_at_its_first_unfinished_fold(tmp_path, monkeypatch):
    """The grid's grouped fit keeps each fold of each run of the group as soon as the group has
    trained it: ``kill -9`` in the third fold (held by the optimizer plugin, not found by time)
    leaves folds 1-2 of both runs, the rerun trains the group's folds 3-4 only, and both runs
    equal the runs trained in one go. Before, a group kept nothing until all its folds were done,
    and the rerun trained all four."""
    from catsdogs.experiment.spec import load_experiment
    from catsdogs.plugins import Registry
    from catsdogs.runs.runner import run_experiment

    site = install_fake_dist(tmp_path / "site", "catsdogs-gatedadam", "1.0",
                             {"catsdogs_gatedadam": GATED_ADAM}, {"gatedadam": "catsdogs_gatedadam"})
    monkeypatch.syspath_prepend(str(site))
    registry = Registry().load(strict=True)
    data = make_kaggle(tmp_path / "data", n_per_class=16, n_test=6)
    exp, out = _write(tmp_path, "g", data, **GROUPED), tmp_path / "out-g"
    gate, pid = _killed_at_the_gate(tmp_path, site, exp)
    assert noted(gate, "builds") == [pid] * 3  # folds 1 and 2 trained, killed in fold 3
    assert not (out / "runs").exists() or not list((out / "runs").glob("*/record.json"))
    for run_id in GROUP:  # both runs of the group: they are trained together
        kept = sorted(p.name for p in (out / FOLDS_DIR / run_id).glob("*/fold-*"))
        assert kept == ["fold-0", "fold-1"], (run_id, kept)

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    monkeypatch.setenv("CATSDOGS_TEST_GATE", str(resumed))
    result = run_experiment(load_experiment(exp, registry=registry), registry=registry,
                            progress=False)
    assert (result.computed, result.reused) == (2, 0)
    assert noted(resumed, "builds") == [os.getpid()] * 2  # the group's folds 3 and 4 only
    assert not (out / FOLDS_DIR).exists()  # the runs are written: their folds are gone

    monkeypatch.delenv("CATSDOGS_TEST_GATE")
    clean = run_experiment(load_experiment(_write(tmp_path, "clean", data, **GROUPED),
                                           registry=registry), registry=registry, progress=False)
    for run_id in GROUP:
        _same_run(out, clean.out_dir, run_id)
    assert (out / "submission.csv").read_bytes() == (clean.out_dir / "submission.csv").read_bytes()


def test_a_grouped_fold_is_serialised_once(tmp_path, monkeypatch, caplog):
    """A fold the group trains is checkpointed as it is trained, and the run writes its model
    files from that checkpoint's bytes: each fold head is serialised once, not once for the fold
    store and again for the run folder. Those folds are this try's, not resumed ones: no run says
    it took a fold from a stopped try."""
    import keras

    from catsdogs.experiment.spec import load_experiment
    from catsdogs.plugins import Registry
    from catsdogs.runs.runner import run_experiment

    saves: list[str] = []
    original = keras.Model.save

    def counted(model, filepath, *args, **kwargs):
        saves.append(os.path.basename(str(filepath)))
        return original(model, filepath, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "save", counted)
    registry = Registry().load(strict=True)
    data = make_kaggle(tmp_path / "data", n_per_class=12, n_test=4)
    grid = {**GROUPED, "optimizers": [{"name": "adam", "learning_rate": 0.01}, "adadelta"]}
    caplog.set_level(logging.INFO, logger="catsdogs")
    result = run_experiment(load_experiment(_write(tmp_path, "once", data, **grid),
                                            registry=registry), registry=registry, progress=False)
    assert result.computed == 2
    assert not [r for r in caplog.records if "kept from a try" in r.getMessage()]
    names = ["head.keras"] + [f"head-fold{k}.keras" for k in range(1, FOLDS)]
    assert sorted(saves) == sorted(names * 2)  # two runs, one save per fold head
    for record in result.records:
        run_dir = result.out_dir / "runs" / record.run_id
        assert sorted(p.name for p in run_dir.glob("head*.keras")) == sorted(names)
        for name in names:
            assert keras.models.load_model(run_dir / name).count_params() > 0


def test_a_folds_state_names_every_key():
    state = fold_state(1.5, history={}, tuning=None, params={}, learning_rate=None,
                       refit_params=None)
    assert state["seconds"] == 1.5 and set(state) == {"seconds", "history", "tuning", "params",
                                                      "learning_rate", "refit_params"}
    with pytest.raises(TypeError, match="a fold's state takes history"):
        fold_state(1.0, history={}, params={})


def test_folds_of_other_settings_and_finished_runs_are_never_used(tmp_path, gated):
    """A fold kept under another settings hash (here: another seed) is deleted, not resumed; so
    are the folds of a run that is no longer trained. A holdout experiment keeps no folds."""
    module, registry, _ = gated
    from catsdogs.experiment.spec import load_experiment
    from catsdogs.runs.runner import run_experiment

    data = make_kaggle(tmp_path / "data", n_per_class=12, n_test=4)
    exp = _write(tmp_path, "s", data)
    out = tmp_path / "out-s"
    stale = (RUN_ID, "0123456789abcdef", 0)
    FoldStore(out / FOLDS_DIR, {RUN_ID: stale[1]}).put(stale, FoldCheckpoint(
        {"history": {}, "tuning": None, "params": {}, "learning_rate": None, "refit_params": None},
        {"val": np.zeros(3)}))
    (out / FOLDS_DIR / "gone__run" / "fedcba9876543210" / "fold-0").mkdir(parents=True)
    gate = tmp_path / "gate"
    gate.mkdir()
    module.GatedLogistic.gate, module.GatedLogistic.hold_after = str(gate), 99
    result = run_experiment(load_experiment(exp, registry=registry), registry=registry,
                            progress=False)
    assert len(_fits(gate)) == FOLDS  # every fold trained: nothing of the stale hash was read
    assert not (out / FOLDS_DIR).exists()
    assert np.isfinite(result.records[0].metrics.logloss)

    doc = yaml.safe_load(exp.read_text())
    doc.update(validation={"holdout": 0.25}, output=str(tmp_path / "out-h"))
    exp.write_text(yaml.safe_dump(doc))
    (gate / "fits").unlink()
    run_experiment(load_experiment(exp, registry=registry), registry=registry, progress=False)
    assert len(_fits(gate)) == 1 and not (tmp_path / "out-h" / FOLDS_DIR).exists()


@pytest.mark.parametrize("damage", ["not a zip", "truncated zip", "no state", "no val"])
def test_store_keeps_a_fold_whole_and_drops_what_it_cannot_read(tmp_path, caplog, damage):
    """Round trip; a fold folder half-written by a dead process is cleaned up when the store
    opens; an unreadable or incomplete one is trained again (None), said in the log, and
    deleted."""
    root = tmp_path / FOLDS_DIR
    key = ("a__logistic", "0" * 16, 1)
    store = FoldStore(root, {"a__logistic": "0" * 16})
    checkpoint = FoldCheckpoint({"history": {"val_loss": [0.5, 0.25]}, "tuning": None,
                                 "params": {"folds": 5}, "learning_rate": None, "refit_params": None},
                                {"val": np.array([0.1, 0.9]), "test": np.array([0.3])},
                                {"head-fold1.keras": b"model bytes"})
    store.put(key, checkpoint)
    got = store.get(key)
    assert got is not None and got.state == checkpoint.state and got.files == checkpoint.files
    assert all(np.array_equal(got.arrays[k], checkpoint.arrays[k]) for k in ("val", "test"))
    assert set(store.saved()) == {key} and store.get((*key[:2], 0)) is None

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    half = root / "a__logistic" / ("0" * 16) / f".fold-2.tmp-{dead}"
    (half / "fold-2").mkdir(parents=True)
    store = FoldStore(root, {"a__logistic": "0" * 16})
    assert not half.exists() and store.get(key) is not None

    fold = root / "a__logistic" / ("0" * 16) / "fold-1"
    if damage == "not a zip":
        (fold / "arrays.npz").write_bytes(b"not a zip")
    elif damage == "truncated zip":
        (fold / "arrays.npz").write_bytes((fold / "arrays.npz").read_bytes()[:100])
    elif damage == "no state":
        (fold / "state.json").unlink()
    else:
        np.savez(fold / "arrays.npz", test=np.array([0.3]))
    with caplog.at_level(logging.WARNING, logger="catsdogs"):
        assert store.get(key) is None
    assert "training fold 2 of run a__logistic again" in caplog.text
    assert not (root / "a__logistic" / ("0" * 16) / "fold-1").exists()
    store.drop("a__logistic")
    store.close()
    assert not root.exists()
