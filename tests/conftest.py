"""Shared fixtures: generated JPEG datasets, the shared mini data, fake installed plugin dists."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Ray reads this when imported: the tests' throwaway clusters register 127.0.0.1, not the
# machine's network address, however pytest is started (tox's ray env sets it too)
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import catsdogs.testing as _testing  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CATSDOGS_SHARED_DATA", REPO.parent / "shared" / "data"))
MINI = SHARED_DATA / "dogs-vs-cats-mini"
FAULTS = SHARED_DATA / "faults"

#: the tiny real network the tests use: ResNet50 with seeded random weights at 32x32
TINY = {"backbones": ["resnet50"], "weights": "none", "image_size": 32, "batch_size": 8}


def copy_int8_models(features_dir: Path, to: Path) -> None:
    """Give the feature folder ``to`` the quantised models (and their index) of ``features_dir``.

    int8 features are keyed by the quantised model's content hash, and two calibrations of one
    configuration may differ in round-off (so in hash): a test that compares two extractions'
    files gives the second the first's calibration, as one cache would have it.
    """
    import shutil

    to.mkdir(parents=True, exist_ok=True)
    for item in features_dir.iterdir():
        if item.suffix != ".h5":
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, to / item.name)


def assert_same_features(actual, desired) -> None:
    """Two computations of the same photos' features agree to float32 round-off at the features'
    scale. TensorFlow's CPU kernels (oneDNN and Eigen alike, TF 2.21) give a row results that
    depend on its place in the batch by ~1e-5 of the largest feature (measured: a row at position 6
    of a batch of 8 vs position 2 of another differs by 1.0e-5 with features up to ~4), so a row
    recomputed in another chunk or with another batch size is equal only to that scale; an
    element-wise rtol on near-zero features would fail on that round-off, not on a wrong row.
    """
    actual, desired = np.asarray(actual), np.asarray(desired)
    assert actual.shape == desired.shape
    scale = float(np.abs(desired).max()) or 1.0
    np.testing.assert_allclose(actual, desired, rtol=1e-5, atol=1e-5 * scale)


# the generators plugin test suites use too (catsdogs.testing): one copy
write_jpeg = _testing.write_jpeg
make_kaggle = _testing.make_kaggle_dataset


@pytest.fixture
def kaggle_dir(tmp_path) -> Path:
    return make_kaggle(tmp_path / "data")


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("CATSDOGS_CACHE_DIR", str(path))
    return path


@pytest.fixture
def mini() -> Path:
    if not (MINI / "train").is_dir():
        pytest.skip(f"shared mini data not present at {MINI}")
    return MINI


@pytest.fixture
def faults() -> Path:
    if not FAULTS.is_dir():
        pytest.skip(f"shared faults data not present at {FAULTS}")
    return FAULTS


def install_fake_dist(site: Path, dist: str, version: str, modules: dict[str, str],
                      entry_points: dict[str, str]) -> Path:
    """Lay out an installed distribution (module files + .dist-info with entry points) in ``site``.

    This is what ``pip install`` leaves behind; ``importlib.metadata`` finds it on ``sys.path``.
    """
    site.mkdir(parents=True, exist_ok=True)
    for name, source in modules.items():
        (site / f"{name}.py").write_text(textwrap.dedent(source))
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    eps = "".join(f"{k} = {v}\n" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[catsdogs]\n{eps}")
    return site


@contextlib.contextmanager
def plugin_on_path(site: Path) -> Iterator[None]:
    """Make the fake dists in ``site`` importable here (``sys.path``) and in CLI subprocesses
    (``PYTHONPATH``), with a fresh registry that sees them; all undone on exit."""
    from catsdogs.plugins import reset_registry

    sys.path.insert(0, str(site))
    old_pythonpath = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), old_pythonpath]))
    reset_registry()
    try:
        yield
    finally:
        sys.path.remove(str(site))
        if old_pythonpath is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old_pythonpath
        reset_registry()


def run_cli(*args: str, env: dict | None = None, timeout: float = 300, check: bool = False):
    """Run the real ``catsdogs`` CLI in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "catsdogs", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"catsdogs {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def kill_cli_at(marker: Path, *args: str, env: dict) -> int:
    """Start the real ``catsdogs`` CLI (``args``, ``env``), wait for the event ``marker`` (a file
    its code writes, e.g. a test plugin's gate), then ``kill -9`` it; its pid. Fails, with its
    stderr, when it ends before the marker appears."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "catsdogs", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        while proc.poll() is None and not marker.exists():  # an event, not a time
            time.sleep(0.05)
        assert proc.poll() is None, (f"catsdogs {' '.join(args)} ended before {marker.name} "
                                     "appeared: " + proc.stderr.read().decode()[-2000:])
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stderr.close()
    return proc.pid


#: source for test plugins that hold a call at a gate: ``hold(gate)`` writes the process id to
#: ``<gate>/blocked`` (atomically) and waits until ``<gate>/release`` appears or the test kills
#: the process; ``note_then_hold(gate, name, hold_after)`` notes the process id in ``<gate>/NAME``
#: (one line a call) and holds the call once ``hold_after`` calls are noted, unless ``blocked``
#: exists (a retried task trains); prepend it to a plugin module's source
GATE_SOURCE = """
import os
import time
from pathlib import Path


def hold(gate):
    Path(gate, "blocked.tmp").write_text(str(os.getpid()))
    Path(gate, "blocked.tmp").rename(Path(gate, "blocked"))
    for _ in range(6000):  # until the test kills this process (or releases it)
        if Path(gate, "release").exists():
            break
        time.sleep(0.05)


def note_then_hold(gate, name, hold_after):
    noted = Path(gate, name)
    seen = len(noted.read_text().split()) if noted.exists() else 0
    with open(noted, "a") as fh:
        fh.write(f"{os.getpid()}\\n")
    if seen >= hold_after and not Path(gate, "blocked").exists():
        hold(gate)
"""


def noted(gate: Path, name: str) -> list[int]:
    """The process ids ``note_then_hold`` (:data:`GATE_SOURCE`) noted in ``<gate>/NAME``."""
    path = gate / name
    return [int(p) for p in path.read_text().split()] if path.exists() else []

#: a head plugin: ``logistic`` (trained fold by fold, never in a group) that notes each fit's
#: process id in ``<gate>/fits`` and, once the gate has seen ``hold_after`` fits, holds the next
#: one (:data:`GATE_SOURCE`) unless ``blocked`` exists (a retried task trains). The gate is
#: ``GatedLogistic.gate`` or ``$CATSDOGS_TEST_GATE`` (for a CLI subprocess).
GATED_HEAD = GATE_SOURCE + """
from catsdogs.builtin.linear import LogisticHead
from catsdogs.hookspecs import hookimpl


class GatedLogistic(LogisticHead):
    name = "gated_logistic"
    gate = None
    hold_after = 2

    def fit(self, X, y, **kwargs):
        gate = self.gate or os.environ.get("CATSDOGS_TEST_GATE")
        if gate:
            note_then_hold(gate, "fits", self.hold_after)
        return super().fit(X, y, **kwargs)


@hookimpl
def register_heads(register):
    register(GatedLogistic)
"""


def pytest_terminal_summary(terminalreporter):
    """What tests measured (``record_property("measured", text)``: latencies, precision on planted
    faults), printed at the end of the run so CI logs show it; works under pytest-xdist too, whose
    workers send each report's user properties to the controller."""
    lines = [f"{report.nodeid}: {value}" for report in terminalreporter.stats.get("passed", [])
             for name, value in getattr(report, "user_properties", ()) if name == "measured"]
    if lines:
        terminalreporter.section("measured")
        for line in lines:
            terminalreporter.write_line(line)
