"""MLflow tracking of a grid: a real SQLite store, a real `mlflow server` on 127.0.0.1, resume
without duplicates, and a dead server (skipped with a warning, or one Error: line when required)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import make_kaggle, run_cli

from catsdogs.runs.record import load_record

pytestmark = [pytest.mark.tracking, pytest.mark.slow]
mlflow = pytest.importorskip("mlflow")

EPOCHS = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """A tiny grid (1 backbone x 1 head x 2 optimizers) run once with `--track` (default store)."""
    root = tmp_path_factory.mktemp("tracking")
    make_kaggle(root / "data", n_per_class=12, n_test=4)
    exp = root / "exp.yaml"
    doc = {"name": "tracked", "data": str(root / "data"), "output": str(root / "out"),
           "cache_dir": str(root / "cache"), "weights": "none",
           "backbones": [{"name": "resnet50", "image_size": 32}], "heads": [{"name": "dropout_sigmoid", "params": {"dropout": 0.3}}],
           "optimizers": [{"name": "adam", "learning_rate": 0.01}, "adadelta"], "epochs": EPOCHS,
           "batch_size": 8, "seed": 3, "validation": {"holdout": 0.25}}
    exp.write_text(yaml.safe_dump(doc, sort_keys=False))
    proc = run_cli("run", str(exp), "--no-progress", "--track", timeout=600)
    assert proc.returncode == 0, proc.stderr
    return {"root": root, "exp": exp, "doc": doc, "out": root / "out", "first": proc}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real `mlflow server` on a free 127.0.0.1 port, SQLite backend in tmp; stopped by pid."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
         "--artifacts-destination", str(root / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=open(root / "server.log", "w"), start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    try:
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, (root / "server.log").read_text()[-2000:]
            assert time.time() < deadline, "mlflow server did not start in 120 s"
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its worker processes, by pid
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _children(client, experiment_name):
    exp = client.get_experiment_by_name(experiment_name)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("catsdogs.kind") == "experiment"]
    children = [r for r in runs if r.data.tags.get("catsdogs.kind") == "run"]
    return parents, children


def _check_store(uri, out):
    """The store holds one parent run and one finished child run per grid run, as recorded."""
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    (parent,), children = _children(client, "tracked")
    board = pd.read_csv(out / "leaderboard.csv")
    assert sorted(r.info.run_name for r in children) == sorted(board["run_id"])
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {
        "leaderboard.csv", "leaderboard.png", "summary.md", "submission.csv", "experiment.json"}
    assert parent.data.tags["catsdogs.winner"] == board["run_id"][0]
    for run in children:
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        rec = load_record(out / "runs" / run.info.run_name)
        params, metrics = run.data.params, run.data.metrics
        assert params["settings_hash"] == rec.settings_hash == run.data.tags["catsdogs.settings_hash"]
        assert params["combination"] == "resnet50" and params["head"] == "dropout_sigmoid"
        assert params["optimizer"] == rec.optimizer.name and params["epochs"] == str(EPOCHS)
        assert params["data_fingerprint"] == rec.feature_keys["resnet50"]["dataset_fingerprint"]
        assert params["head.dropout"] == str(rec.params["dropout"]) == "0.3"
        assert metrics["val_logloss"] == pytest.approx(rec.metrics.logloss, rel=1e-12)
        assert metrics["val_accuracy"] == pytest.approx(rec.metrics.accuracy, rel=1e-12)
        curve = client.get_metric_history(run.info.run_id, "loss")
        assert [m.step for m in sorted(curve, key=lambda m: m.step)] == list(range(1, EPOCHS + 1))
        assert [m.value for m in sorted(curve, key=lambda m: m.step)] == pytest.approx(rec.history[0]["loss"])
        files = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"record.json", "curves.png", "head.keras"} <= files
    return client, parent, children


def test_default_sqlite_store_next_to_the_output(grid):
    out, proc = grid["out"], grid["first"]
    store = grid["root"] / "mlflow.db"
    uri = f"sqlite:///{store}"
    assert store.is_file() and (grid["root"] / "mlartifacts").is_dir()
    assert f"view: mlflow ui --backend-store-uri {uri}" in proc.stdout
    assert re.search(r"MLflow: 2 runs logged, 0 already there", proc.stdout), proc.stdout
    _check_store(uri, out)


def test_resume_logs_nothing_twice(grid):
    """A rerun reuses every run (tracking switched on in the experiment file this time): nothing is
    logged twice; a new run of the grid is the only new MLflow run."""
    exp = grid["root"] / "exp-resume.yaml"
    exp.write_text(yaml.safe_dump({**grid["doc"], "tracking": "mlflow"}, sort_keys=False))
    again = run_cli("run", str(exp), "--no-progress", timeout=600)
    assert again.returncode == 0, again.stderr
    assert "0 runs trained, 2 reused" in again.stdout
    assert "MLflow: 0 runs logged, 2 already there" in again.stdout
    uri = f"sqlite:///{grid['root'] / 'mlflow.db'}"
    _client, _parent, children = _check_store(uri, grid["out"])
    assert len(children) == 2


def test_real_mlflow_server(grid, server):
    """The same grid (all runs reused) logged to a real tracking server over HTTP, artifacts
    uploaded through it; a second call logs nothing more."""
    for expected in ("MLflow: 2 runs logged, 0 already there", "MLflow: 0 runs logged, 2 already there"):
        proc = run_cli("run", str(grid["exp"]), "--no-progress", "--track", server, "--track-required",
                       timeout=600)
        assert proc.returncode == 0, proc.stderr
        assert expected in proc.stdout and f"view: open {server} in a browser" in proc.stdout
    _check_store(server, grid["out"])


def test_dead_server_warns_or_fails_clearly(grid):
    """Nothing listens on the port: tracking is skipped with a warning (the run's results are
    written as usual), or with --track-required the run fails with one Error: line, before any
    work, leaving the finished records untouched."""
    dead = f"http://127.0.0.1:{_free_port()}"
    records = sorted((grid["out"] / "runs").glob("*/record.json"))
    before = {p: p.stat().st_mtime_ns for p in records}
    proc = run_cli("run", str(grid["exp"]), "--no-progress", "--track", dead, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert f"cannot track in MLflow at {dead}" in proc.stderr and "continuing without tracking" in proc.stderr
    assert "0 runs trained, 2 reused" in proc.stdout and "MLflow:" not in proc.stdout
    required = run_cli("run", str(grid["exp"]), "--no-progress", "--track", dead, "--track-required",
                       timeout=120)  # fails fast: no minutes of client retries
    assert required.returncode == 1 and "Traceback" not in required.stderr
    last = required.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: cannot track in MLflow at " + dead) and "no MLflow server answers" in last
    assert {p: p.stat().st_mtime_ns for p in records} == before


# ------------------------------------------------------------------- each on its own copy
@pytest.fixture
def copy(grid, tmp_path):
    """The grid's data, cache and output copied, with a new default store: a test that changes
    what is logged works on its own (the order of the tests does not matter)."""
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(grid["root"], root, symlinks=True,  # a store of its own, created by the test
                    ignore=shutil.ignore_patterns("mlflow.db*", "mlartifacts"))
    doc = {**grid["doc"], "data": str(root / "data"), "output": str(root / "out"),
           "cache_dir": str(root / "cache")}
    return {"root": root, "doc": doc, "out": root / "out", "uri": f"sqlite:///{root / 'mlflow.db'}"}


def _run(copy, name: str, **changes):
    exp = copy["root"] / f"{name}.yaml"
    exp.write_text(yaml.safe_dump({**copy["doc"], **changes}, sort_keys=False))
    proc = run_cli("run", str(exp), "--no-progress", "--track", "--track-required", timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_changed_numbers_are_logged_again_not_already_there(copy):
    """Post-processing is not part of a run's settings hash (the runs are reused), but it changes
    the numbers logged: the runs whose numbers changed are logged again, their old child runs
    replaced; the others are already there."""
    from catsdogs.tracking.mlflow_tracker import TAG_DIGEST, logged_digest

    first = _run(copy, "first")  # the copy's own store
    assert "MLflow: 2 runs logged, 0 already there" in first.stdout, first.stdout
    _client, _parent, children = _check_store(copy["uri"], copy["out"])
    before = {r.info.run_name: r.data.tags[TAG_DIGEST] for r in children}
    same = _run(copy, "same")
    assert "MLflow: 0 runs logged, 2 already there" in same.stdout, same.stdout
    changed = _run(copy, "changed", postprocess="none")  # auto had chosen a clip or temperature
    assert "0 runs trained, 2 reused" in changed.stdout
    now = {run_id: logged_digest(load_record(copy["out"] / "runs" / run_id)) for run_id in before}
    moved = {run_id for run_id in before if now[run_id] != before[run_id]}
    assert moved, "post-processing 'none' changed no run's numbers: the test proves nothing"
    assert f"MLflow: {len(moved)} runs logged, {2 - len(moved)} already there" in changed.stdout, \
        changed.stdout
    _client, _parent, children = _check_store(copy["uri"], copy["out"])  # one child per run
    assert {r.info.run_name: r.data.tags[TAG_DIGEST] for r in children} == now
    for run in children:  # the numbers logged now are the records' current ones
        record = load_record(copy["out"] / "runs" / run.info.run_name)
        if record.postprocess and record.postprocess.get("logloss_post") is not None:
            assert run.data.metrics["val_logloss_post"] == pytest.approx(
                record.postprocess["logloss_post"], rel=1e-12)


def test_runs_left_running_by_a_crash_are_deleted_on_resume(copy):
    """A crash between a child run's creation and its end leaves it RUNNING: the next call
    deletes it and logs the run properly (one finished child run per grid run)."""
    _run(copy, "first")
    client = mlflow.tracking.MlflowClient(tracking_uri=copy["uri"])
    (parent,), children = _children(client, "tracked")
    victim = children[0]
    client.delete_run(victim.info.run_id)  # as if its logging never finished:
    stale = client.create_run(parent.info.experiment_id, run_name=victim.info.run_name, tags={
        "mlflow.parentRunId": parent.info.run_id, "catsdogs.kind": "run",
        "catsdogs.run_id": victim.info.run_name, "catsdogs.settings_hash": "x"})
    again = _run(copy, "again")
    assert "MLflow: 1 runs logged, 1 already there" in again.stdout, again.stdout
    assert client.get_run(stale.info.run_id).info.lifecycle_stage == "deleted"
    _check_store(copy["uri"], copy["out"])  # every child FINISHED, one per grid run


def test_read_only_store_fails_fast_in_one_line(grid, tmp_path):
    """A store in a folder this process cannot write: one Error: line at once (MLflow itself
    retried for ~100 s). As root, permissions do not stop writes, so the folder is /sys."""
    if os.geteuid() == 0:
        folder = Path("/sys")
    else:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    proc = run_cli("run", str(grid["exp"]), "--no-progress", "--track", uri, "--track-required",
                   timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and f"the MLflow store {folder / 'mlflow.db'} cannot be written" in errors[0]
    assert "WARNING" not in proc.stderr, proc.stderr  # no retries


def test_concurrent_creation_of_a_new_store_is_serialised(tmp_path):
    """Four processes create the same new SQLite store at once (each waits for a gate file, then
    connects): all succeed (MLflow's migrations ran twice: "duplicate column name: step")."""
    db, gate = tmp_path / "store" / "mlflow.db", tmp_path / "go"
    code = (
        "import sys, time, pathlib\n"
        "from types import SimpleNamespace\n"
        "import mlflow  # imported before the gate: the processes then race on the store only\n"
        "from catsdogs.tracking.mlflow_tracker import MlflowTracker\n"
        "gate = pathlib.Path(sys.argv[2])\n"
        "pathlib.Path(sys.argv[3]).touch()\n"
        "while not gate.exists(): time.sleep(0.01)\n"
        "MlflowTracker.connect(sys.argv[1], SimpleNamespace(name='race'), pathlib.Path('.'))\n"
        "print('ok')\n")
    ready = [tmp_path / f"ready-{i}" for i in range(4)]
    procs = [subprocess.Popen([sys.executable, "-c", code, f"sqlite:///{db}", str(gate), str(r)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in ready]
    deadline = time.time() + 300
    while not all(r.exists() for r in ready):  # every process has imported MLflow and waits
        assert all(p.poll() is None for p in procs) and time.time() < deadline
        time.sleep(0.05)
    gate.touch()  # released together
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [e[-2000:] for _, e in outs]
    assert (db.parent / "mlflow.db.lock").exists()
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{db}")
    assert client.get_experiment_by_name("race") is not None
