"""Real tiny runs and their exports, built once per test session (shared by test_export/test_predict).

* ``cam``: ResNet50 (seeded random weights) at 64 px + ``softmax_cam`` -> CAM-capable (2x2 maps),
  exported to Keras, Core ML and TFLite;
* ``stack``: the same features + ``lightgbm_stacking`` (no head.keras);
* ``mixed``: ResNet50 at 64 px + Xception at 71 px + ``dropout_sigmoid`` -> two model inputs
  (``image`` 71 px for Xception, ``image_64`` for ResNet50); exported to Keras.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import yaml
from conftest import make_kaggle

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
