"""Real tiny runs and their exports, built once per test session (shared by test_export/test_predict).

* ``cam``: ResNet50 (seeded random weights) at 64 px + ``softmax_cam`` -> CAM-capable (2x2 maps),
  exported to Keras, Core ML and TFLite;
* ``stack``: the same features + ``lightgbm_stacking`` (no head.keras);
* ``mixed``: ResNet50 at 64 px + Xception at 71 px + ``dropout_sigmoid`` -> two model inputs
  (``image`` 71 px for Xception, ``image_64`` for ResNet50); exported to Keras.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path

import yaml
from conftest import install_fake_dist, make_kaggle, plugin_on_path

#: two tiny real backbones of different input sizes (seeded conv nets at 32 and 40 px, weights
#: ``none`` only), the source of a plugin module (:func:`conftest.install_fake_dist`)
TINY_BACKBONES = '''
from catsdogs.components import Backbone
from catsdogs.hookspecs import hookimpl


class _Tiny(Backbone):
    min_input_size = 8
    feature_dim = 8
    preprocessing = "x / 255"
    weights_options = ("none",)

    def build_model(self, weights, image_size):
        import keras

        image = keras.Input((image_size, image_size, 3), name="image")
        x = keras.layers.Rescaling(1 / 255)(image)
        x = keras.layers.Conv2D(8, 5, strides=2, activation="tanh", name="conv")(x)
        return keras.Model(image, keras.layers.GlobalAveragePooling2D(name="gap")(x))


class TinyA(_Tiny):
    name = "tiny_a"
    input_size = 32


class TinyB(_Tiny):
    name = "tiny_b"
    input_size = 40


@hookimpl
def register_backbones(register):
    register(TinyA())
    register(TinyB())
'''


@contextlib.contextmanager
def tiny_world(root: Path, dist: str, modules: dict[str, str] | None = None):
    """The tiny backbones (plus ``modules``: module name -> plugin source) installed as the
    distribution ``dist`` on ``sys.path`` (and ``PYTHONPATH`` for the CLI) and a data set with
    test photos under ``root``, with a fresh registry that sees them; undone afterwards. Yields
    ``{"root", "data"}`` for :func:`run_tiny`."""
    package = dist.replace("-", "_")
    modules = {package: TINY_BACKBONES, **(modules or {})}
    site = install_fake_dist(root / "site", dist, "0.1", modules,
                             {name.removeprefix("catsdogs_"): name for name in modules})
    data = make_kaggle(root / "data", n_per_class=14, n_test=8)
    with plugin_on_path(site):
        yield {"root": root, "data": data}


def run_tiny(world: dict, common: dict, name: str, **fields):
    """Run the experiment ``common`` + ``fields`` on :func:`tiny_world`'s data, its output in
    ``root/name`` and its features in the world's shared cache."""
    from catsdogs.experiment.spec import load_experiment
    from catsdogs.runs.runner import run_experiment

    root = world["root"]
    doc = {**common, "data": str(world["data"]), "output": str(root / name),
           "cache_dir": str(root / "cache"), **fields}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return run_experiment(load_experiment(path), progress=False)


COMMON = {
    "weights": "none",
    "optimizers": [{"name": "adam", "learning_rate": 0.01}],
    "epochs": 3,
    "batch_size": 16,
    "seed": 7,
    "validation": {"holdout": 0.25},
}


def _experiment(root: Path, name: str, **fields) -> Path:
    doc = {**COMMON, "data": str(root / "data"), "output": str(root / f"out-{name}"),
           "cache_dir": str(root / "cache"), **fields}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def session_runs(tmp_path_factory) -> dict[str, Path]:
    """The runs, built once per test session: under pytest-xdist the workers share one copy (the
    first one to get the lock builds it, the others wait for it and reuse it)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the session's temp root, common to all workers
    root = base / "export-runs"
    base.mkdir(parents=True, exist_ok=True)
    with open(base / "export-runs.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return build_runs(root)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build_runs(root: Path) -> dict[str, Path]:
    """Train the runs and export them (in process); reused when ``root`` already has them."""
    from catsdogs.app.export import export_run
    from catsdogs.experiment.spec import load_experiment
    from catsdogs.runs.runner import run_experiment

    done = root / "runs.json"
    if done.is_file():
        return {k: Path(v) for k, v in json.loads(done.read_text()).items()}
    if root.exists():  # a build that did not finish (its process died): start again
        import shutil

        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    make_kaggle(root / "data", n_per_class=16, n_test=6)
    single = run_experiment(load_experiment(_experiment(
        root, "single", backbones=[{"name": "resnet50", "image_size": 64}],
        heads=["softmax_cam", {"name": "lightgbm_stacking", "params": {"folds": 2}}])),
        progress=False, submit=False)
    mixed = run_experiment(load_experiment(_experiment(
        root, "mixed", backbones=[{"name": "resnet50", "image_size": 64},
                                  {"name": "xception", "image_size": 71}],
        combinations=[["resnet50", "xception"]], heads=["dropout_sigmoid"])),
        progress=False, submit=False)
    runs = {r.head.name: single.out_dir / "runs" / r.run_id for r in single.records}
    out = {
        "data": root / "data",
        "cam": runs["softmax_cam"],
        "stack": runs["lightgbm_stacking"],
        "mixed": mixed.out_dir / "runs" / mixed.records[0].run_id,
        "cam_export": root / "export-cam",
        "mixed_export": root / "export-mixed",
    }
    export_run(out["cam"], ["keras", "coreml", "tflite"], out["cam_export"])
    export_run(out["mixed"], ["keras"], out["mixed_export"])
    done.write_text(json.dumps({k: str(v) for k, v in out.items()}))
    return out


# --- shared by the tests of heads wired into experiments (test_finetune_runner, test_prior) ---

@contextlib.contextmanager
def tiny_env(tmp_path_factory, name: str, backbones):
    """A folder with a generated Kaggle-layout data set (16 photos a class, 8 test photos) and
    ``backbones`` registered for the block: ``{"root", "data", "registry"}``."""
    from catsdogs.plugins import get_registry

    root = tmp_path_factory.mktemp(name)
    data = make_kaggle(root / "data", n_per_class=16, n_test=8)
    registry = get_registry()
    with contextlib.ExitStack() as stack:
        for backbone in backbones:
            stack.enter_context(registry.temporarily("backbones", backbone, "tests"))
        yield {"root": root, "data": data, "registry": registry}


def tiny_experiment(root: Path, data: Path, name: str, **fields):
    """``root/NAME.yaml`` written and loaded: ``data``, output ``root/NAME``, cache ``root/cache``,
    weights none, adam, 6 epochs at batch 8, seed 4, a 0.25 holdout; ``fields`` override."""
    from catsdogs.experiment.spec import load_experiment

    doc = {"data": str(data), "output": str(root / name), "cache_dir": str(root / "cache"),
           "weights": "none", "optimizers": ["adam"], "epochs": 6, "batch_size": 8, "seed": 4,
           "validation": {"holdout": 0.25}, **fields}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return load_experiment(path)


def predict_photos(model, photos, backend: str = "auto"):
    """P(dog) per test id (a pandas Series) from ``open_predictor(model, backend)``: an export
    directory or a run directory."""
    import pandas as pd

    from catsdogs.app.predict import open_predictor, predict_files

    preds = predict_files(open_predictor(model, backend), photos)
    assert all(p.error is None for p in preds), [p.error for p in preds]
    return pd.Series({int(p.file.rsplit("/", 1)[-1].split(".")[0]): p.p_dog for p in preds})


def submitted_vs_ranked(result, record, margin: float):
    """A refitted holdout winner's ``submission.csv`` (a Series by id, sorted), after checking
    that it differs from the ranked head's own predictions by more than ``margin`` somewhere
    (it was refitted)."""
    import numpy as np
    import pandas as pd

    from catsdogs.runs.submission import write_run_submission

    out = result.out_dir
    assert (out / "refit" / record.run_id / "head.keras").is_file()
    submitted = pd.read_csv(out / "submission.csv").set_index("id")["label"].sort_index()
    write_run_submission(out / "runs" / record.run_id, out / "ranked.csv")
    ranked = pd.read_csv(out / "ranked.csv").set_index("id")["label"].sort_index()
    assert np.abs(submitted - ranked).max() > margin  # refitted
    return submitted

