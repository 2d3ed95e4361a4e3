"""The engine contract without Ray: the local engine is an object with the same seams as the Ray
engine, and extraction, the audit, the label-issue finder and the grid all go through them.

A recording engine (the local engine, logging what it is asked) stands in for any engine; with
``parallel = True`` it gets the grid in groups, one per combination, as the Ray engine does, and
the runs must come out as the single-group local ones."""

from __future__ import annotations

import pytest
import yaml
from conftest import make_kaggle

import catsdogs
from catsdogs.compute import LOCAL_NODE, Engine, LocalEngine
from catsdogs.engine import EngineSpec, open_engine


class Recording(LocalEngine):
    """The local engine, recording the workers it builds and the groups of runs it gets."""

    def __init__(self, parallel: bool = False):
        self.parallel = parallel
        self.workers: list[str] = []
        self.groups: list = []
        self.calls: list[str] = []

    def map_chunks(self, factory, jobs, args_of, on_result, what=None):
        self.workers.append(factory.func.__name__)
        return super().map_chunks(factory, jobs, args_of, on_result, what)

    def map_runs(self, fn, items, shared):
        items = list(items)
        self.calls.append(fn.__name__)
        self.groups += [[spec.run_id for spec, _ in group] if isinstance(group, list) else group
                        for group in items]
        yield from super().map_runs(fn, items, shared)


def test_local_is_an_engine_object():
    with open_engine("local") as engine:
        assert isinstance(engine, LocalEngine) and isinstance(engine, Engine)
        assert engine.describe() is None and not engine.parallel
    with open_engine(EngineSpec("local")) as engine:
        assert isinstance(engine, LocalEngine)


def test_local_map_chunks_builds_once_and_reports_every_job():
    built = []

    def factory():
        built.append(1)
        return lambda x: x * 10

    seen = []
    used = LocalEngine().map_chunks(factory, list(range(7)), lambda job: (job,),
                                    lambda job, out, node, pid: seen.append((job, out, node)))
    assert used == 1 and built == [1]
    assert sorted(seen) == [(j, 10 * j, LOCAL_NODE) for j in range(7)]


def test_local_map_chunks_raises_the_jobs_error():
    def factory():
        def fn(x):
            if x == 3:
                raise ValueError("chunk 3 is broken")
            return x
        return fn

    with pytest.raises(ValueError, match="chunk 3 is broken"):
        LocalEngine().map_chunks(factory, list(range(6)), lambda job: (job,), lambda *a: None)


@pytest.mark.slow
def test_extraction_and_label_issue_finder_go_through_the_engine(tmp_path):
    """The audit's classifier pass and the label-issue finder's features are both computed by
    the engine given to ``audit`` (the finder used to extract in this process whatever
    ``--engine`` said)."""
    from test_audit import install_tiny_classifier, tiny_classifier_registry
    from test_label_issues import _planted_dataset

    from catsdogs.audit.checks import audit

    registry = tiny_classifier_registry(install_tiny_classifier(tmp_path / "site"))
    data = tmp_path / "data"
    _planted_dataset(data, n=8, swaps=1)
    engine = Recording()
    audit(data, tmp_path / "audit", classifier="tiny_classifier", weights="none", image_size=32,
          batch_size=8, label_issues=True, cache_dir=tmp_path / "cache", progress=False,
          registry=registry, engine=engine)
    assert engine.workers == ["_AuditWorker", "ChunkFeatures"]
    (res,) = catsdogs.extract(data, "tiny_classifier", weights="none", image_size=32,
                              cache_dir=tmp_path / "cache", progress=False, registry=registry,
                              engine=engine)
    assert res.computed == 0 and engine.workers == ["_AuditWorker", "ChunkFeatures"]  # cached


GRID = {
    "weights": "none",
    "backbones": [{"name": "resnet50", "image_size": 32}, {"name": "xception", "image_size": 71}],
    "heads": ["dropout_sigmoid"],
    "optimizers": [{"name": "adam", "learning_rate": 0.01}, "adadelta"],
    "epochs": 2,
    "batch_size": 8,
    "seed": 7,
    "validation": {"holdout": 0.25},
}


@pytest.mark.slow
def test_parallel_engine_gets_groups_per_combination_with_the_same_records(tmp_path):
    """An engine that runs calls at once (Ray) gets one group of runs per combination, each
    trained together in its call; the records equal those of the whole grid grouped in one
    process (validation log loss within 1e-6, same ranking)."""
    from catsdogs.experiment.spec import load_experiment
    from catsdogs.runs.runner import run_experiment

    data = make_kaggle(tmp_path / "data", n_per_class=12, n_test=4)

    def experiment(name):
        doc = {**GRID, "data": str(data), "output": str(tmp_path / name),
               "cache_dir": str(tmp_path / "cache")}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return load_experiment(path)

    one, many = Recording(parallel=False), Recording(parallel=True)
    local = run_experiment(experiment("one"), progress=False, submit=False, engine=one)
    spread = run_experiment(experiment("many"), progress=False, submit=False, engine=many)
    assert len(one.groups) == 1 and len(one.groups[0]) == 6  # 3 combinations x 2 optimizers
    assert sorted(map(len, many.groups)) == [2, 2, 2]
    for group in many.groups:  # one combination per group
        combos = {r.run_id: tuple(r.combination) for r in spread.records}
        assert len({combos[run_id] for run_id in group}) == 1
    want = {r.run_id: r.metrics.logloss for r in local.records}
    got = {r.run_id: r.metrics.logloss for r in spread.records}
    assert want.keys() == got.keys() and all(abs(want[k] - got[k]) <= 1e-6 for k in want)
    assert [r.run_id for r in local.records] == [r.run_id for r in spread.records]
    assert all(r.engine is None for r in spread.records)  # computed in this process


@pytest.mark.slow
def test_refit_runs_on_the_engine(tmp_path):
    """``refit: true``: the winner is refitted by the engine the grid ran on (a map_runs call per
    refit), and the driver writes its refit folder and the submission."""
    from catsdogs.experiment.spec import load_experiment
    from catsdogs.runs.runner import run_experiment

    data = make_kaggle(tmp_path / "data", n_per_class=12, n_test=4)
    doc = {**GRID, "backbones": [{"name": "resnet50", "image_size": 32}], "refit": True,
           "data": str(data), "output": str(tmp_path / "out"), "cache_dir": str(tmp_path / "cache")}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    engine = Recording()
    result = run_experiment(load_experiment(tmp_path / "exp.yaml"), progress=False, engine=engine)
    assert engine.calls == ["run_group", "_refit_member"]
    assert engine.groups[-1] == result.winner.run_id  # the refit's one item: the winner
    assert (tmp_path / "out" / "refit" / result.winner.run_id / "test_predictions.csv").is_file()
    assert result.submission is not None and result.submission.is_file()
