"""The Ray engine on a real two-node Ray cluster on this machine (loopback only, no mocks).

One cluster serves the module: ``ray.cluster_utils.Cluster`` with a head and a second node of one
CPU each, so a pool of one actor per node really spreads over two raylets. Every Ray worker of
this module runs with a Python audit hook that refuses to open anything under the test's data
directory (see ``_forbid_data_dir``): the data path exists only for the driver. That is enforced at
the interpreter level of the worker processes (our readers open files through Python), not by the
operating system; the negative control ``--ray-shared-data`` shows the hook does block reads.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import GATE_SOURCE, copy_int8_models, make_kaggle, run_cli

pytestmark = [pytest.mark.ray]
ray = pytest.importorskip("ray")

import catsdogs  # noqa: E402
from catsdogs.engine import EngineError, open_engine  # noqa: E402

TINY = {"weights": "none", "image_size": 32, "batch_size": 4, "chunk_size": 4, "progress": False}
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}


def _forbid_data_dir(prefix: str):
    """A worker-process setup hook: Python's ``open`` of anything under ``prefix`` fails."""

    def hook() -> None:
        import os as _os
        import sys as _sys

        def audit(event, args):
            if event == "open" and args and isinstance(args[0], (str, bytes, _os.PathLike)):
                if _os.fsdecode(args[0]).startswith(prefix):
                    raise PermissionError(13, "the data directory is not visible on Ray workers",
                                          _os.fsdecode(args[0]))

        _sys.addaudithook(audit)

    return hook


@pytest.fixture(scope="module")
def driver_data(tmp_path_factory) -> Path:
    """A Kaggle-layout data set that only the driver may read (the workers' hook refuses it)."""
    root = tmp_path_factory.mktemp("driver-only") / "data"
    return make_kaggle(root, n_per_class=12, n_test=8)


@pytest.fixture(scope="module")
def cluster(driver_data):
    from ray.cluster_utils import Cluster

    saved = {k: os.environ.get(k) for k in RAY_ENV}
    os.environ.update(RAY_ENV)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": _forbid_data_dir(str(driver_data.parent))})
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def engine(cluster):
    """One engine for the module: its actor pool (TensorFlow imported once per node) is shared."""
    with open_engine("ray") as eng:
        yield eng


def _node_ids() -> set[str]:
    return {n["NodeID"] for n in ray.nodes() if n["Alive"]}


def _assert_same_cache(local_path: Path, ray_path: Path) -> dict:
    """Same file name, rows, digests, labels and metadata (apart from time/engine); features to 1e-4."""
    assert local_path.name == ray_path.name
    a, b = catsdogs.load_features(local_path), catsdogs.load_features(ray_path)
    for split in ("train", "test"):
        sa, sb = getattr(a, split), getattr(b, split)
        assert sa.files == sb.files and sa.digests == sb.digests
        assert np.array_equal(sa.y, sb.y) and np.array_equal(sa.ids, sb.ids)
        assert np.abs(sa.X - sb.X).max() <= 1e-4
        if sa.X_flip is not None:
            assert np.abs(sa.X_flip - sb.X_flip).max() <= 1e-4
    differ = {k for k in set(a.meta) | set(b.meta) if a.meta.get(k) != b.meta.get(k)}
    assert differ <= {"created", "engine"}, differ
    return b.meta["engine"]


@pytest.mark.slow
def test_extract_on_two_nodes_equals_local_without_reading_the_data_dir(engine, driver_data, tmp_path):
    (local,) = catsdogs.extract(driver_data, "resnet50", cache_dir=tmp_path / "local", flip=True,
                                **TINY)
    (res,) = catsdogs.extract(driver_data, "resnet50", cache_dir=tmp_path / "ray", flip=True,
                              engine=engine, **TINY)
    assert (res.computed, res.n_train, res.n_test) == (local.computed, 24, 8)
    info = _assert_same_cache(local.path, res.path)
    assert info["name"] == "ray" and set(info["nodes"]) == _node_ids() and len(info["nodes"]) == 2
    assert sum(info["nodes"].values()) == 32  # every image computed once, on one of the two nodes
    assert not res.path.with_name(res.path.name + ".partial").exists()


@pytest.mark.slow
def test_int8_on_ray_calibrates_on_the_driver_and_ships_the_model(engine, driver_data, tmp_path):
    """--precision int8 without shared data: the workers see neither the photos nor the cache
    (both under the forbidden folder), so the quantised model must reach them through Ray."""
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    from catsdogs.features.int8 import ir_dir

    opts = {**TINY, "precision": "int8", "calibration_size": 8}
    (local,) = catsdogs.extract(driver_data, "resnet50", cache_dir=tmp_path / "local", **opts)
    hidden = driver_data.parent / "cache-int8"  # workers may not open anything under it
    # int8 features are keyed by the quantised model's content hash, and two calibrations may
    # differ in round-off (another hash): the driver's cache gets the local run's calibrated model
    # (its one calibration per configuration), so the Ray run must compute with that very model,
    # which its workers can only get through Ray
    copy_int8_models(local.path.parent, hidden / local.path.parent.relative_to(tmp_path / "local"))
    (res,) = catsdogs.extract(driver_data, "resnet50", cache_dir=hidden, engine=engine, **opts)
    assert res.computed == local.computed == 32
    info = _assert_same_cache(local.path, res.path)
    assert info["name"] == "ray" and len(info["nodes"]) == 2
    assert (ir_dir(res.path) / "model.xml").is_file()  # calibrated once, cached by the driver
    (again,) = catsdogs.extract(driver_data, "resnet50", cache_dir=hidden, engine=engine, **opts)
    assert (again.computed, again.reused) == (0, 32)


@pytest.mark.slow
def test_openvino_float32_on_ray_equals_local_without_reading_the_data_dir(engine, driver_data,
                                                                           tmp_path):
    """runtime openvino on Ray: the workers convert and run the float32 network themselves (they
    see neither the photos nor the cache) and compute what a local OpenVINO extraction does,
    keyed apart from TensorFlow's float32 features."""
    pytest.importorskip("openvino")
    opts = {**TINY, "runtime": "openvino"}
    (local,) = catsdogs.extract(driver_data, "resnet50", cache_dir=tmp_path / "local", **opts)
    (res,) = catsdogs.extract(driver_data, "resnet50", cache_dir=driver_data.parent / "cache-ov",
                              engine=engine, **opts)
    assert res.computed == local.computed == 32
    info = _assert_same_cache(local.path, res.path)
    assert info["name"] == "ray" and len(info["nodes"]) == 2
    (tf,) = catsdogs.extract(driver_data, "resnet50", cache_dir=driver_data.parent / "cache-ov",
                             engine=engine, **TINY)
    assert tf.path != res.path and tf.computed == 32  # TensorFlow's features are another file
    (again,) = catsdogs.extract(driver_data, "resnet50", cache_dir=driver_data.parent / "cache-ov",
                                engine=engine, **opts)
    assert (again.computed, again.reused) == (0, 32)


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["tensorflow", "openvino"])
def test_finetune_maps_on_ray_equal_local_without_reading_the_data_dir(engine, driver_data,
                                                                         tmp_path, runtime):
    """The maps a ``finetune`` head trains on, computed by the workers (``maps_runtime``: the
    bottom run by TensorFlow, or converted and run by OpenVINO in float32, from the factory Ray
    ships), are the local ones under the same cache folder name, although the workers see neither
    the photos nor the cache; a second call computes nothing."""
    if runtime == "openvino":
        pytest.importorskip("openvino")
    from catsdogs.features.maps import cache_maps
    from catsdogs.plugins import get_registry
    from catsdogs.testing import TinyTopSplit

    kw = {"weights": "none", "batch_size": 4, "chunk_size": 4, "runtime": runtime}
    hidden = driver_data.parent / f"cache-maps-{runtime}"  # workers may not open anything under it
    with get_registry().temporarily("backbones", TinyTopSplit(), "tests"):
        local = cache_maps(driver_data, TinyTopSplit.name, cache_dir=tmp_path / "local", **kw)
        res = cache_maps(driver_data, TinyTopSplit.name, cache_dir=hidden, engine=engine, **kw)
        assert res.computed == local.computed == 32
        assert res.path.name == local.path.name and res.config == local.config
        assert (f"-maps1-{runtime}-" in res.path.name) is (runtime == "openvino")
        for a, b in ((local.train, res.train), (local.test, res.test)):
            assert a.files == b.files and len(a.files) in (24, 8) and b.X.dtype == np.float16
            np.testing.assert_array_equal(b.X, a.X)
        if runtime == "openvino":  # not TensorFlow's maps: they differ from them by round-off
            tf_maps = cache_maps(driver_data, TinyTopSplit.name, cache_dir=tmp_path / "local",
                                 **{**kw, "runtime": "tensorflow"})
            assert not np.array_equal(tf_maps.train.X, res.train.X)
        again = cache_maps(driver_data, TinyTopSplit.name, cache_dir=hidden, engine=engine, **kw)
    assert again.computed == 0
    np.testing.assert_array_equal(again.train.X, res.train.X)


def test_workers_cannot_open_the_data_dir(cluster, driver_data):
    """The hook is real: a Ray task that opens a data file fails, the driver's open works."""

    @ray.remote(num_cpus=0)  # the module's actor pool may hold every CPU
    def read(path: str) -> int:
        return len(open(path, "rb").read())

    image = next(driver_data.glob("train/*.jpg"))
    assert len(image.read_bytes()) > 0
    with pytest.raises(ray.exceptions.RayTaskError, match="not visible on Ray workers"):
        ray.get(read.remote(str(image)))


def _gate_first_chunk(monkeypatch):
    """Hold the driver after it wrote the first chunk of the next extraction, until released:
    the workers then have at most their in-flight chunks to finish and the rest waits, so a fault
    injected meanwhile is mid-extraction by construction (no race with the workers)."""
    from catsdogs.features import extraction

    written, release = threading.Event(), threading.Event()
    write_chunk = extraction._Store.write_chunk

    def gated(self, *args, **kwargs):
        write_chunk(self, *args, **kwargs)
        if not written.is_set():
            written.set()
            release.wait(300)

    monkeypatch.setattr(extraction._Store, "write_chunk", gated)
    return written, release


@pytest.mark.slow
def test_killed_worker_mid_extraction_is_restarted_and_result_complete(engine, tmp_path, monkeypatch):
    data = make_kaggle(tmp_path / "data", n_per_class=30, n_test=20, seed=3)
    opts = {**TINY, "image_size": 64}
    (local,) = catsdogs.extract(data, "resnet50", cache_dir=tmp_path / "local", **opts)
    written, release = _gate_first_chunk(monkeypatch)
    box: dict = {}
    thread = threading.Thread(target=lambda: box.setdefault("res", catsdogs.extract(
        data, "resnet50", cache_dir=tmp_path / "ray", engine=engine, **opts)))
    thread.start()
    try:
        assert written.wait(300), "no chunk written"
        (pid,) = engine.pids  # the worker process that computed the first chunk
        done_at_kill = len(list((tmp_path / "ray").rglob("chunk-*.json")))
        os.kill(pid, signal.SIGKILL)
    finally:
        release.set()
    thread.join(300)
    (res,) = box["res"]
    assert done_at_kill == 1  # 20 chunks of 4 images: the rest came after the kill
    # the killed actor's next calls failed and were retried, or ran in its restarted process
    assert max(engine.tries.values()) >= 2 or len(engine.pids - {pid}) >= 1
    assert max(engine.tries.values()) <= 3  # bounded: at most TRIES tries of a chunk
    info = _assert_same_cache(local.path, res.path)
    assert res.computed == 80 and sum(info["nodes"].values()) == 80


def test_chunk_that_crashes_its_worker_is_tried_three_times_and_named(engine, tmp_path):
    """A chunk whose worker process dies every time: 3 tries in all (Ray retries nothing, the
    driver retries it alone on an actor), then one error naming that chunk; chunks that merely
    shared its process are retried alone and succeed."""
    attempts = tmp_path / "attempts.txt"
    attempts.touch()

    class Crashes:  # defined here: pickled by value, so the workers need not import this module
        def __call__(self, job: int) -> int:
            with open(attempts, "a") as fh:
                fh.write(f"{job}\n")
            if job == 3:
                os._exit(1)  # a crash (segfault, OOM kill) while computing this chunk
            return job

    done: list[int] = []
    with pytest.raises(EngineError) as err:
        engine.map_chunks(Crashes, list(range(8)), lambda job: (job,),
                          lambda job, out, node, pid: done.append(out), lambda job: f"chunk #{job}")
    tried = [int(x) for x in attempts.read_text().split()]
    assert tried.count(3) == 3, tried
    assert all(tried.count(j) <= 2 for j in set(tried) - {3}), tried  # innocents: once alone
    message = str(err.value)
    assert message.startswith("chunk #3 crashed its Ray worker process 3 times"), message
    assert "nodes died" not in message and 3 not in done


def test_map_runs_cancels_the_other_tasks_when_one_fails(engine, tmp_path):
    """One grid task fails while another is still running (it waits for a gate that never
    opens): the failure is raised, and the other task is cancelled, its CPU free again."""
    started, gate = tmp_path / "started", tmp_path / "gate"

    def run(item: int, shared) -> int:
        import pathlib
        import time as _time

        if item == 1:
            pathlib.Path(started).touch()
            while not pathlib.Path(gate).exists():
                _time.sleep(0.05)
            return item
        while not pathlib.Path(started).exists():  # fail only once the other one runs
            _time.sleep(0.05)
        raise ValueError("run 0 is broken")

    total = ray.cluster_resources()["CPU"]
    try:
        with pytest.raises(ValueError, match="run 0 is broken"):
            for _ in engine.map_runs(run, [0, 1], None):
                pass
        assert started.exists()
        _wait_for(lambda: ray.available_resources().get("CPU", 0) >= total, 60,
                  "the other task to be cancelled")
    finally:
        gate.touch()


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.mark.slow
def test_worker_node_dying_mid_extraction_is_retried_on_the_others(cluster, engine, tmp_path, caplog,
                                                                   monkeypatch):
    """A third node joins, gets an actor and computes chunks, then the whole node goes away
    (raylet, object store, workers) with chunks of the next extraction given to it: they finish on
    the surviving nodes. (Ray alone would wait for ever: it restarts the lost actor, which finds
    no free CPU.)"""
    data = make_kaggle(tmp_path / "data", n_per_class=30, n_test=20, seed=5)  # 80 images
    opts = {**TINY, "batch_size": 2, "chunk_size": 2}  # 40 chunks of 2 images
    (local,) = catsdogs.extract(data, "resnet50", cache_dir=tmp_path / "local", **opts)
    engine.release()  # the module pool's CPUs: the engine below gets one actor on every node
    _wait_for(lambda: ray.available_resources().get("CPU", 0) >= 2, 60, "the pool's CPUs")
    node = cluster.add_node(num_cpus=1)
    try:
        cluster.wait_for_nodes()
        with open_engine("ray") as eng, caplog.at_level(logging.WARNING, logger="catsdogs"):
            doomed = node.node_id
            # warm up: 6 chunks, 2 per actor, so all three have imported TensorFlow
            warm = make_kaggle(tmp_path / "warm", n_per_class=4, n_test=4, seed=6)
            catsdogs.extract(warm, "resnet50", cache_dir=tmp_path / "warm-cache", engine=eng, **opts)
            assert len(eng.nodes) == 3 and doomed in eng.nodes
            written, release = _gate_first_chunk(monkeypatch)
            box: dict = {}

            def extract() -> None:
                try:
                    box["res"] = catsdogs.extract(data, "resnet50", cache_dir=tmp_path / "ray",
                                                  engine=eng, **opts)
                except BaseException as exc:  # reported by the assertion below
                    box["error"] = exc

            thread = threading.Thread(target=extract)
            thread.start()
            # the driver holds after the first chunk: every actor was given two chunks (the
            # third node's among them) and 34 or more of the 40 wait
            try:
                assert written.wait(300), box.get("error")
                done_at_removal = len(list((tmp_path / "ray").rglob("chunk-*.json")))
                cluster.remove_node(node)  # SIGTERM then SIGKILL to all of the node's processes
            finally:
                release.set()
            thread.join(180)
            assert not thread.is_alive(), "the extraction hangs after losing a node"
            assert "error" not in box, box.get("error")
            (res,) = box["res"]
    finally:
        if node in cluster.worker_nodes:
            cluster.remove_node(node)
    assert done_at_removal == 1  # removed mid-extraction, by construction
    assert f"Ray worker actor on node {doomed} lost its node" in caplog.text
    survivors = set(_node_ids())
    assert doomed not in survivors and len(survivors) == 2
    info = _assert_same_cache(local.path, res.path)  # complete, every row once, equal to local
    assert set(info["nodes"]) - {doomed} == survivors
    assert sum(info["nodes"].values()) == 80  # what the third node finished before it went is kept
    assert res.computed == 80 and not res.path.with_name(res.path.name + ".partial").exists()


#: ``python -c GATED_DRIVER GATE ARGS...``: the CLI (``catsdogs ARGS...``) whose driver, once it
#: has written its first chunk, writes GATE and waits there until the test kills it
GATED_DRIVER = (
    "import os, sys, time, pathlib\n"
    "from catsdogs.features import extraction\n"
    "gate, write_chunk = pathlib.Path(sys.argv[1]), extraction._Store.write_chunk\n"
    "def gated(self, *args, **kwargs):\n"
    "    write_chunk(self, *args, **kwargs)\n"
    "    gate.write_text(str(os.getpid()))\n"
    "    while True:\n"
    "        time.sleep(3600)\n"
    "extraction._Store.write_chunk = gated\n"
    "from catsdogs.cli import main\n"
    "main(sys.argv[2:])\n")


@pytest.mark.slow
def test_driver_killed_mid_extraction_rerun_resumes_from_the_finished_chunks(cluster, engine, tmp_path):
    """``kill -9`` of the CLI driver mid-extraction: Ray ends the job's workers (the cluster's CPUs
    come back), and the same command run again reuses every finished chunk and computes the rest."""
    data = make_kaggle(tmp_path / "data", n_per_class=15, n_test=10, seed=7)  # 40 images
    opts = {**TINY, "batch_size": 2, "chunk_size": 2}  # 20 chunks
    (local,) = catsdogs.extract(data, "resnet50", cache_dir=tmp_path / "local", **opts)
    engine.release()  # the module pool's CPUs go to the CLI's job
    _wait_for(lambda: ray.available_resources().get("CPU", 0) >= 2, 60, "the pool's CPUs")
    cache = tmp_path / "ray"
    args = ["extract", str(data), "-b", "resnet50", "--weights", "none", "--image-size", "32",
            "--batch-size", "2", "--chunk-size", "2", "--cache-dir", str(cache), "--no-progress",
            "--json", "--engine", "ray", "--ray-address", cluster.address]
    env = {**os.environ, **RAY_ENV, "RAY_ADDRESS": ""}
    gate = tmp_path / "first-chunk-written"
    with open(tmp_path / "killed.log", "wb") as log:
        # the CLI, its driver held after it wrote the first chunk (the kill lands mid-extraction
        # by construction, not by how fast the workers are)
        proc = subprocess.Popen([sys.executable, "-c", GATED_DRIVER, str(gate), *args], env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_for(lambda: proc.poll() is not None or gate.exists(), 180, "a finished chunk")
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-2000:]
    finished = len(list(cache.rglob("chunk-*.json")))
    assert finished == 1 and not list(cache.rglob("*.h5"))  # killed mid-extraction
    # the killed job's actors are ended by Ray: both CPUs free again (the next job can run)
    _wait_for(lambda: ray.available_resources().get("CPU", 0) >= 2, 60,
              "the killed driver's workers to exit")
    rerun = run_cli(*args, env=env)
    assert rerun.returncode == 0, rerun.stderr
    (out,) = json.loads(rerun.stdout)
    assert (out["reused"], out["computed"]) == (2 * finished, 40 - 2 * finished)
    _assert_same_cache(local.path, Path(out["path"]))
    assert not Path(out["path"] + ".partial").exists()


def test_audit_on_ray_equals_local(engine, driver_data, tmp_path):
    from catsdogs.audit.checks import audit
    from catsdogs.plugins import get_registry

    if "efficientnet_lite0" not in get_registry().names("backbones"):
        pytest.skip("needs the EfficientNet-Lite plugin (a backbone with an ImageNet classifier)")
    opts = {"classifier": "efficientnet_lite0", "weights": "none", "image_size": 64,
            "batch_size": 4, "progress": False}
    local = audit(driver_data, tmp_path / "local", **opts)
    on_ray = audit(driver_data, tmp_path / "ray", engine=engine, **opts)
    assert [a.file for a in local.images] == [a.file for a in on_ray.images]
    for a, b in zip(local.images, on_ray.images):
        assert (a.flags, a.width, a.height, a.colour_stat) == (b.flags, b.width, b.height, b.colour_stat)
        assert abs(a.top[0][1] - b.top[0][1]) <= 1e-4  # top-1 probability (ties may reorder)
        assert abs(a.p_cat - b.p_cat) <= 1e-4 and abs(a.p_dog - b.p_dog) <= 1e-4
    assert (tmp_path / "ray" / "report.md").is_file()


@pytest.mark.slow
def test_cli_extract_engine_ray_shared_data(cluster, engine, driver_data, tmp_path):
    """The CLI as a separate Ray job (no hook there: the workers can read the data directory),
    with --ray-shared-data: workers open the files by path; same features as local."""
    engine.release()  # the module pool's CPUs go to the CLI's job
    (local,) = catsdogs.extract(driver_data, "resnet50", cache_dir=tmp_path / "local", **TINY)
    env = {**os.environ, **RAY_ENV, "RAY_ADDRESS": ""}
    proc = run_cli("extract", str(driver_data), "-b", "resnet50", "--weights", "none",
                   "--image-size", "32", "--batch-size", "4", "--chunk-size", "4",
                   "--cache-dir", str(tmp_path / "ray"), "--no-progress", "--json",
                   "--engine", "ray", "--ray-address", cluster.address, "--ray-shared-data", env=env)
    assert proc.returncode == 0, proc.stderr
    (out,) = json.loads(proc.stdout)
    assert out["computed"] == 32
    info = _assert_same_cache(local.path, Path(out["path"]))
    assert info["address"] == cluster.address and info["shared_data"] is True
    assert set(info["nodes"]) <= _node_ids()


GRID = {
    "weights": "none",
    "backbones": [{"name": "resnet50", "image_size": 32}],
    "heads": ["dropout_sigmoid"],
    "optimizers": [{"name": "adam", "learning_rate": 0.01}, "adadelta"],
    "epochs": 3,
    "batch_size": 8,
    "seed": 7,
    "validation": {"holdout": 0.25},
}


def _experiment(tmp_path, data: Path, name: str, registry=None, **changes):
    import yaml

    from catsdogs.experiment.spec import load_experiment

    doc = {**GRID, "data": str(data), "output": str(tmp_path / name), "cache_dir": str(tmp_path / "cache"),
           **changes}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return load_experiment(path, registry=registry)


#: a test optimizer plugin that gates a grid task on a Ray worker: ``adam`` whose ``build()``
#: (called as the task's runs are compiled, before they train: once per fold), when
#: ``GatedAdam.gate`` names a folder without a ``blocked`` file and ``hold_after`` builds are noted
#: there, writes its process id there and waits for ``release``; a retried task finds ``blocked``
#: and trains. The module is pickled by value (the workers cannot import it), so the class and its
#: ``gate`` reach them inside the registry the grid ships.
GATED_OPTIMIZER = GATE_SOURCE + """
from catsdogs.builtin.optimizers import AdamOptimizer
from catsdogs.hookspecs import hookimpl


class GatedAdam(AdamOptimizer):
    name = "gated_adam"
    gate = None
    hold_after = 0

    def build(self):
        if self.gate:
            note_then_hold(self.gate, "builds", self.hold_after)
        return super().build()


@hookimpl
def register_optimizers(register):
    register(GatedAdam)
"""


def _pickled_plugin(tmp_path, monkeypatch, name: str, source: str):
    """The plugin module ``catsdogs_NAME`` (``source``) installed as a distribution, a registry
    with it, and the module, registered with Ray's cloudpickle to travel by value (the workers
    cannot import it); the caller unregisters it."""
    import importlib

    from conftest import install_fake_dist

    from catsdogs.plugins import Registry

    site = install_fake_dist(tmp_path / "site", f"catsdogs-{name}", "1.0",
                             {f"catsdogs_{name}": source}, {name: f"catsdogs_{name}"})
    monkeypatch.syspath_prepend(str(site))
    registry = Registry().load(strict=True)
    module = importlib.import_module(f"catsdogs_{name}")
    ray.cloudpickle.register_pickle_by_value(module)
    return registry, module


@pytest.mark.slow
def test_grid_on_ray_equals_local_survives_a_killed_task_and_is_reused(engine, driver_data, tmp_path,
                                                                       monkeypatch):
    """kill -9 of the worker process running a grid task, while it is in the task (held there by
    the gated optimizer, not found by time): Ray retries the task, and the grid equals local."""

    from catsdogs.runs.runner import load_record, run_experiment

    registry, gated = _pickled_plugin(tmp_path, monkeypatch, "raygate", GATED_OPTIMIZER)
    optimizers = [{"name": "gated_adam", "learning_rate": 0.01}, "adadelta"]
    gate = tmp_path / "gate"
    gate.mkdir()
    engine.release()
    try:
        local = run_experiment(_experiment(tmp_path, driver_data, "local", registry,
                                           optimizers=optimizers), registry=registry, progress=False)
        gated.GatedAdam.gate = str(gate)  # from here on (the Ray grid's registry is pickled after)
        box: dict = {}

        def grid() -> None:
            try:
                box["result"] = run_experiment(
                    _experiment(tmp_path, driver_data, "ray", registry, engine="ray",
                                optimizers=optimizers), registry=registry, progress=False)
            except BaseException as exc:  # reported by the assertions below
                box["error"] = exc

        thread = threading.Thread(target=grid)
        thread.start()
        try:
            while thread.is_alive() and not (gate / "blocked").exists():  # the gate's file
                time.sleep(0.05)
            assert (gate / "blocked").exists(), box.get("error", "the grid never reached the gate")
            killed = int((gate / "blocked").read_text())
            assert killed != os.getpid()  # a Ray worker process, in the grid task
            os.kill(killed, signal.SIGKILL)
        finally:
            (gate / "release").touch()
            thread.join(300)
        assert not thread.is_alive() and "error" not in box, box.get("error")
        on_ray = box["result"]
        again = run_experiment(_experiment(tmp_path, driver_data, "ray", registry, engine="ray",
                                           optimizers=optimizers), registry=registry, progress=False)
    finally:
        gated.GatedAdam.gate = None
        ray.cloudpickle.unregister_pickle_by_value(gated)
    builds = [int(pid) for pid in (gate / "builds").read_text().split()]
    assert builds[0] == killed and set(builds) - {killed}, builds  # the task ran again elsewhere
    assert on_ray.computed == local.computed == 2 and on_ray.reused == 0
    want = {r.run_id: r.metrics.logloss for r in local.records}
    got = {r.run_id: r.metrics.logloss for r in on_ray.records}
    assert want.keys() == got.keys()
    assert all(abs(want[k] - got[k]) <= 1e-6 for k in want), (want, got)
    assert [r.run_id for r in local.records] == [r.run_id for r in on_ray.records]  # same ranking
    runs = sorted(p.name for p in (tmp_path / "ray" / "runs").iterdir())
    assert runs == sorted(want)  # complete, nothing duplicated, no temporaries left
    for run_id in runs:  # written here by the driver, with the node that computed it
        saved = load_record(tmp_path / "ray" / "runs" / run_id)
        assert saved.engine["name"] == "ray" and saved.engine["node_id"] in _node_ids()
        assert (tmp_path / "ray" / "runs" / run_id / "val_predictions.csv").is_file()
    assert (tmp_path / "ray" / "leaderboard.csv").is_file() and (tmp_path / "ray" / "submission.csv").is_file()
    assert (again.computed, again.reused) == (0, 2)


def _ray_grid_killed_in_its_fold(tmp_path, driver_data, registry, gate, fields: dict,
                                 folds_kept: int) -> tuple[Any, int, list[str]]:
    """The grid of ``fields`` on Ray in a thread; once its task is held at ``gate`` (a test
    plugin's, see :data:`GATED_OPTIMIZER`) and the driver has written ``folds_kept`` fold folders
    (it writes what the call's mailbox got once a second), ``kill -9`` of that worker; then the
    gate is released. The grid's result (retried by Ray), the killed process id and the fold
    folders kept before the kill (``RUN_ID/fold-K``)."""
    from catsdogs.runs.folds import FOLDS_DIR
    from catsdogs.runs.runner import run_experiment

    box: dict = {}

    def grid() -> None:
        try:
            box["result"] = run_experiment(
                _experiment(tmp_path, driver_data, "ray", registry, engine="ray", **fields),
                registry=registry, progress=False)
        except BaseException as exc:  # reported by the assertions below
            box["error"] = exc

    thread = threading.Thread(target=grid)
    thread.start()
    kept: list[str] = []
    try:
        while thread.is_alive() and not (gate / "blocked").exists():  # the gate's file
            time.sleep(0.05)
        assert (gate / "blocked").exists(), box.get("error", "the grid never reached the gate")
        killed = int((gate / "blocked").read_text())
        assert killed != os.getpid()  # a Ray worker process, in the grid's task
        folds = tmp_path / "ray" / FOLDS_DIR
        for _ in range(600):  # an event: the fold folders on the driver's disk
            kept = sorted(f"{p.parent.parent.name}/{p.name}" for p in folds.glob("*/*/fold-*"))
            if len(kept) == folds_kept:
                break
            time.sleep(0.05)
        os.kill(killed, signal.SIGKILL)
    finally:
        (gate / "release").touch()
        thread.join(300)
    assert not thread.is_alive() and "error" not in box, box.get("error")
    assert not (tmp_path / "ray" / FOLDS_DIR).exists()  # the runs are written: their folds gone
    return box["result"], killed, kept


def _same_as_local(tmp_path, local, on_ray, tol: float) -> None:
    """Each run of ``local`` equals its twin trained on Ray: log loss and predictions."""
    import pandas as pd

    got = {r.run_id: r for r in on_ray.records}
    assert got.keys() == {r.run_id for r in local.records}
    for want in local.records:
        assert got[want.run_id].engine["name"] == "ray"
        assert abs(want.metrics.logloss - got[want.run_id].metrics.logloss) <= tol
        for name in ("val_predictions.csv", "test_predictions.csv"):
            a = pd.read_csv(tmp_path / "local" / "runs" / want.run_id / name)
            b = pd.read_csv(tmp_path / "ray" / "runs" / want.run_id / name)
            pd.testing.assert_frame_equal(a, b, atol=tol)


@pytest.mark.slow
@pytest.mark.parametrize("trained", ["alone", "in a group"])
def test_a_kfold_task_killed_in_its_third_fold_resumes_there_on_ray(engine, driver_data, tmp_path,
                                                                   monkeypatch, trained):
    """kill -9 of the worker process in the third fold of a k-fold run trained alone (held there
    by the gated head) or of a group of two runs (by the gated optimizer, built once a fold): the
    folds finished were written to the driver's disk while it trained (through the call's mailbox
    actor), for every run of the group; the task's retry on Ray trains the third and fourth folds
    only, and the runs equal those trained locally in one go."""
    from conftest import GATED_HEAD, noted

    from catsdogs.runs.runner import run_experiment

    if trained == "alone":
        plugin, source, name, noted_in, tol = "rayfolds", GATED_HEAD, "GatedLogistic", "fits", 1e-9
        fields: dict = {"heads": ["gated_logistic"], "validation": {"kfold": 4}}
    else:
        plugin, source, name, noted_in, tol = "raygroupfolds", GATED_OPTIMIZER, "GatedAdam", "builds", 1e-6
        fields = {"optimizers": [{"name": "gated_adam", "learning_rate": 0.01}, "adadelta"],
                  "validation": {"kfold": 4}}
    registry, module = _pickled_plugin(tmp_path, monkeypatch, plugin, source)
    gated = getattr(module, name)
    gate = tmp_path / "gate"
    gate.mkdir()
    engine.release()
    try:
        local = run_experiment(_experiment(tmp_path, driver_data, "local", registry, **fields),
                               registry=registry, progress=False)
        run_ids = sorted(r.run_id for r in local.records)
        # from here on (the Ray grid's registry is pickled after): held in the third fold
        gated.gate, gated.hold_after = str(gate), 2
        on_ray, killed, kept = _ray_grid_killed_in_its_fold(tmp_path, driver_data, registry, gate,
                                                            fields, 2 * len(run_ids))
    finally:
        gated.gate, gated.hold_after = None, (2 if trained == "alone" else 0)
        ray.cloudpickle.unregister_pickle_by_value(module)
    assert len(run_ids) == (1 if trained == "alone" else 2)
    assert kept == [f"{r}/fold-{k}" for r in run_ids for k in (0, 1)], kept
    calls = noted(gate, noted_in)
    assert calls[:3] == [killed] * 3 and len(calls) == 5 and killed not in calls[3:], calls
    _same_as_local(tmp_path, local, on_ray, tol)


def test_unreachable_address_is_one_clear_error(tmp_path, driver_data):
    proc = run_cli("extract", str(driver_data), "-b", "resnet50", "--weights", "none",
                   "--cache-dir", str(tmp_path), "--engine", "ray", "--ray-address", "127.0.0.1:9",
                   env={**os.environ, **RAY_ENV}, timeout=120)
    assert proc.returncode == 1
    assert "Error: cannot reach the Ray cluster at '127.0.0.1:9'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_ray_not_installed_is_one_clear_error(tmp_path, driver_data):
    code = ("import sys; sys.modules['ray'] = None; from catsdogs.cli import main; "
            f"main(['extract', {str(driver_data)!r}, '-b', 'resnet50', '--weights', 'none', "
            f"'--cache-dir', {str(tmp_path)!r}, '--engine', 'ray'])")
    import subprocess

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "pip install 'catsdogs[ray]'" in proc.stderr and "Traceback" not in proc.stderr


def test_no_free_cpu_is_one_clear_error(engine):
    engine.release()  # the pool's CPUs back to the cluster, then taken by other "jobs"

    @ray.remote(num_cpus=1)
    class Hog:
        def ready(self):
            return True

    hogs = [Hog.remote() for _ in range(2)]
    ray.get([h.ready.remote() for h in hogs])
    try:
        with pytest.raises(EngineError, match="no CPU free on the Ray cluster"):
            with open_engine("ray"):
                pass
    finally:
        for h in hogs:
            ray.kill(h)


def _cli_env(**changes) -> dict:
    env = {**os.environ, **RAY_ENV, **changes}
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.mark.slow
def test_engine_ray_without_address_starts_a_private_instance(cluster, engine, driver_data, tmp_path):
    """A cluster another process left running on this machine (the module's) is not joined by
    ``--engine ray`` without an address or RAY_ADDRESS: the CLI starts a private instance and
    says so (plain ``ray.init()`` joined the running cluster, whose CPUs the module's pool holds)."""
    proc = run_cli("extract", str(driver_data), "-b", "resnet50", "--weights", "none",
                   "--image-size", "32", "--batch-size", "4", "--chunk-size", "4",
                   "--cache-dir", str(tmp_path / "ray"), "--no-progress", "--json",
                   "--engine", "ray", env=_cli_env())
    assert proc.returncode == 0, proc.stderr
    assert "Ray: started a private instance for this call" in proc.stderr
    (out,) = json.loads(proc.stdout)
    info = catsdogs.load_features(out["path"]).meta["engine"]
    assert info["address"] is None and info["nodes"] and not set(info["nodes"]) & _node_ids()


def test_ray_address_joins_the_running_cluster_and_says_so(cluster, engine, driver_data, tmp_path):
    """Joining is explicit: ``--ray-address`` names the cluster, and the CLI says which one it
    joined; the work is done on its nodes."""
    engine.release()  # the module pool's CPUs go to the CLI's job
    _wait_for(lambda: ray.available_resources().get("CPU", 0) >= 2, 60, "the pool's CPUs")
    proc = run_cli("extract", str(driver_data), "-b", "resnet50", "--weights", "none",
                   "--image-size", "32", "--batch-size", "4", "--chunk-size", "4",
                   "--cache-dir", str(tmp_path), "--no-progress", "--json", "--engine", "ray",
                   "--ray-address", cluster.address, env=_cli_env())
    assert proc.returncode == 0, proc.stderr
    assert f"Ray: joined the cluster at {cluster.address} (2 nodes, 2 CPUs)" in proc.stderr
    (out,) = json.loads(proc.stdout)
    info = catsdogs.load_features(out["path"]).meta["engine"]
    assert info["address"] == cluster.address and set(info["nodes"]) <= _node_ids()


def test_runs_on_ray_show_on_the_bar_when_they_end_with_no_fold_steps(cluster, engine, driver_data,
                                                                     tmp_path):
    """The README's promise for progress: work on a Ray worker shows only when it ends. A 2-fold
    grid with ``--engine ray`` logs the ``runs`` bar counting runs to the end, and none of the
    fold steps that the same grid shows when trained locally (``tests/test_progress.py``): the
    worker has no bar to send them to."""
    import yaml

    engine.release()  # the module pool's CPUs go to the CLI's job
    _wait_for(lambda: ray.available_resources().get("CPU", 0) >= 2, 60, "the pool's CPUs")
    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump({**GRID, "data": str(driver_data), "output": str(tmp_path / "out"),
                                   "cache_dir": str(tmp_path / "cache"), "epochs": 2,
                                   "heads": ["dropout_sigmoid", "logistic"],
                                   "validation": {"kfold": 2}}))
    proc = run_cli("run", str(exp), "--engine", "ray", "--ray-address", cluster.address,
                   env=_cli_env(CATSDOGS_PROGRESS_INTERVAL="0"), timeout=600)
    assert proc.returncode == 0, proc.stderr
    runs = [line for line in proc.stderr.splitlines() if line.startswith("runs: ")]
    # 2 dropout_sigmoid runs (adam, adadelta) and the logistic run
    assert runs[0].startswith("runs: 0/3 run (0%)") and runs[-1].startswith("runs: 3/3 run (100%)"), runs
    assert not [line for line in runs if "], " in line], runs  # no step: no "fold i/k"


def test_invalid_address_is_quoted_as_given(tmp_path, driver_data):
    proc = run_cli("extract", str(driver_data), "-b", "resnet50", "--weights", "none",
                   "--cache-dir", str(tmp_path), "--engine", "ray", "--ray-address",
                   "127.0.0.1:notaport", env=_cli_env(), timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "Error: invalid Ray address '127.0.0.1:notaport': expected HOST:PORT (a port number from "
        "1 to 65535), ray://HOST:PORT or auto"]


@pytest.mark.slow
def test_sigterm_of_the_driver_is_one_line(tmp_path):
    """SIGTERM to ``catsdogs extract --engine ray`` once a chunk is on disk: one Error: line (no
    Python traceback, no native stack dump from Ray's signal handler), exit status 1, and the
    finished chunks are kept."""
    data = make_kaggle(tmp_path / "data", n_per_class=20, n_test=0, seed=9)  # 40 images
    cache = tmp_path / "cache"
    with open(tmp_path / "err.log", "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "catsdogs", "extract", str(data), "-b", "resnet50", "--weights",
             "none", "--image-size", "32", "--batch-size", "2", "--chunk-size", "2",
             "--cache-dir", str(cache), "--no-progress", "--engine", "ray"],
            env=_cli_env(), stdout=subprocess.DEVNULL, stderr=err)
        try:
            _wait_for(lambda: proc.poll() is not None or any(cache.rglob("chunk-*.json")), 300,
                      "a finished chunk")
            assert proc.poll() is None, (tmp_path / "err.log").read_text()[-3000:]
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(120)
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(30)
    text = (tmp_path / "err.log").read_text()
    assert not list(cache.rglob("*.h5")), "finished before the signal"
    assert proc.returncode == 1, text
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("INFO: ")]
    assert lines == ["Error: terminated (SIGTERM): everything finished so far is kept; rerun the "
                     "same command to resume"], text
    assert list(cache.rglob("chunk-*.json"))


@pytest.mark.parametrize("where", ["map_chunks", "map_runs", "driver"])
def test_sigterm_while_ray_deserialises_a_result_is_terminated(cluster, engine, where, caplog):
    """The SIGTERM handler raises where the main thread happens to be. Landing inside Ray's
    deserialisation of a result, its error came out as Ray's ``RaySystemError`` (a traceback
    instead of the one Error: line; CI saw it once in the CLI test above): it must be
    :class:`Terminated`, whichever of the engine's loops was waiting, and Ray's deserialiser
    does not log it with a traceback of its own. The same holds for the driver's own work while
    the engine is open (``open_engine``), in code that wraps the error in its own."""
    from catsdogs.engine.ray import TERMINATED, Terminated

    driver = os.getpid()

    class SignalsTheDriver:  # defined here: pickled by value, the workers need not import this
        """Returned by a worker; unpickling it on the driver (inside ``ray.get``) sends SIGTERM
        to the driver, and ``os.kill`` runs the driver's handler before it returns: the handler
        raises inside Ray's deserialiser every time."""

        def __reduce__(self):
            return os.kill, (driver, signal.SIGTERM)

    def chunk_fn():
        return lambda job: SignalsTheDriver()

    # an engine of its own: its handler is the driver's now (a node the cluster fixture adds
    # in this process installs Ray's), and the module engine's pool gives it the CPUs
    engine.release()
    total = ray.cluster_resources()["CPU"]
    _wait_for(lambda: ray.available_resources().get("CPU", 0) >= total, 60, "the pools' CPUs")
    with pytest.raises(Terminated) as err:
        with open_engine("ray") as own:
            if where == "map_chunks":
                own.map_chunks(chunk_fn, [0], lambda job: (job,), lambda *result: None)
            elif where == "map_runs":
                for _ in own.map_runs(lambda item, shared: SignalsTheDriver(), [0], None):
                    pass
            else:  # the driver's own work while the engine is open, in code that rewraps errors
                try:
                    pickle.loads(pickle.dumps(SignalsTheDriver()))
                except Exception as exc:
                    raise RuntimeError("a library's own error") from exc
    assert str(err.value) == TERMINATED and err.value.__cause__ is None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_an_engine_closed_inside_another_leaves_the_outer_ones_log_filter(cluster, engine):
    """Each engine that catches SIGTERM filters Ray's deserialiser log with a filter of its own:
    closing one opened inside another (its handler restores the outer's) keeps the outer's."""
    from catsdogs.engine.ray import RAY_DESERIALISER_LOGGER

    engine.release()
    total = ray.cluster_resources()["CPU"]
    _wait_for(lambda: ray.available_resources().get("CPU", 0) >= total, 60, "the pools' CPUs")
    filters = logging.getLogger(RAY_DESERIALISER_LOGGER).filters
    with open_engine("ray") as outer:
        with open_engine("ray") as inner:
            assert outer._log_filter in filters and inner._log_filter in filters
        assert outer._log_filter in filters and inner._log_filter not in filters
    assert outer._log_filter not in filters


TOKEN = "catsdogs-test-token-7f3a9c"
AUTH_VARS = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def _auth_env(home: Path, **changes: str) -> dict:
    """The environment of a process talking to the token cluster: no Ray auth setting inherited
    (the module's cluster sets RAY_AUTH_MODE=disabled), a HOME of its own (no ~/.ray/auth_token)."""
    env = {k: v for k, v in os.environ.items() if k not in AUTH_VARS}
    return {**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "HOME": str(home), **changes}


@pytest.fixture()
def token_cluster(tmp_path):
    """A one-node Ray cluster on loopback that requires TOKEN (``ray start --head --block`` in its
    own session, with its own temp dir and HOME); yields its address. Ready when ``ray start``
    says so on its output (read line by line, no polling); stopped by SIGTERM to that process,
    which drains and stops the node's processes."""
    import tempfile

    temp = Path(tempfile.mkdtemp(prefix="rtok"))  # short: Ray's socket paths live under it
    home = tmp_path / "head-home"
    home.mkdir()
    port = _free_loopback_port()
    env = _auth_env(home, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN)
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
         "--num-cpus", "1", "--include-dashboard", "false", "--disable-usage-stats",
         "--temp-dir", str(temp)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # blocks until the next line or the end (if it dies)
            seen.append(line)
            if "Ray runtime started" in line:
                break
        else:
            pytest.fail("ray start --head failed:\n" + "".join(seen[-30:]))
        threading.Thread(target=proc.stdout.read, daemon=True).start()  # never block its writes
        yield f"127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: only what it started
            proc.wait(30)
        import shutil

        shutil.rmtree(temp, ignore_errors=True)


def _free_loopback_port() -> int:
    """A port number that was free on 127.0.0.1 a moment ago."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_refused_or_missing_token_is_one_line_naming_what_to_set(token_cluster, driver_data, tmp_path):
    """A token-auth cluster: the right token connects (the control), a wrong one, none and
    RAY_AUTH_MODE=token without a token are each one Error: line saying which and what to set
    (Ray alone says "Failed to connect" after ~20 lines of native warnings)."""
    home = tmp_path / "home"
    home.mkdir()
    control = subprocess.run(
        [sys.executable, "-c", f"import ray; ray.init(address={token_cluster!r}, "
         "log_to_driver=False); print(int(ray.cluster_resources()['CPU']))"],
        env=_auth_env(home, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN),
        capture_output=True, text=True, timeout=180)
    assert control.returncode == 0 and control.stdout.split()[-1] == "1", control.stderr[-3000:]

    def extract(**auth: str) -> list[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "catsdogs", "extract", str(driver_data), "-b", "resnet50",
             "--weights", "none", "--cache-dir", str(tmp_path / "cache"), "--no-progress",
             "--engine", "ray", "--ray-address", token_cluster],
            env=_auth_env(home, **auth), capture_output=True, text=True, timeout=240)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        return proc.stderr.strip().splitlines()

    where = f"the Ray cluster at {token_cluster!r}"
    todo = "the value `ray get-auth-token` prints on the head node"
    assert extract(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="not-the-token") == [
        f"Error: {where} refused the authentication token from RAY_AUTH_TOKEN: set it to {todo}"]
    assert extract() == [
        f"Error: {where} requires an authentication token and this process sent none: set "
        f"RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to {todo}"]
    assert extract(RAY_AUTH_MODE="token") == [
        f"Error: RAY_AUTH_MODE=token but no authentication token was found for {where}: set "
        f"RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to {todo}"]


def test_loopback_only_cluster_reached_through_the_network_address_is_one_line(cluster, driver_data,
                                                                               tmp_path):
    """The module's cluster listens on 127.0.0.1 only. Without RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
    Ray connects to ``127.0.0.1:PORT`` through this machine's network address instead (and
    retried for minutes, then named that address): one line at once, saying what to do."""
    env = {k: v for k, v in os.environ.items() if k not in AUTH_VARS}
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    env["RAY_AUTH_MODE"] = "disabled"
    probe = subprocess.run([sys.executable, "-c", "from ray.util import get_node_ip_address; "
                            "print(get_node_ip_address())"], env=env, capture_output=True,
                           text=True, timeout=120)
    node_ip = probe.stdout.strip()
    if probe.returncode != 0 or not node_ip or node_ip.startswith("127."):
        pytest.skip(f"this machine has no network address for Ray to use ({probe.stdout!r})")
    port = cluster.address.rsplit(":", 1)[1]
    proc = subprocess.run(
        [sys.executable, "-m", "catsdogs", "extract", str(driver_data), "-b", "resnet50",
         "--weights", "none", "--cache-dir", str(tmp_path), "--no-progress", "--engine", "ray",
         "--ray-address", f"127.0.0.1:{port}"],
        env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        f"Error: the Ray cluster at '127.0.0.1:{port}' listens on loopback only, but Ray connects "
        f"to a loopback address through this machine's address {node_ip}, where port {port} is "
        "closed: start the head without --node-ip-address 127.0.0.1 (or give --ray-address "
        f"{node_ip}:{port} once it listens there), or set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 for "
        "the head and for this command"]
