"""Benchmark: a grid on Ray on this machine against the local engine, grouped training on both.

The grid of issue 22: 3 backbones, all 7 combinations, x 2 heads (``dropout_sigmoid``,
``softmax_cam``) x 2 optimizers (adam 0.001, adadelta 1.0) = 28 runs, 8 epochs, batch 128, an
80/20 holdout, over ``--rows`` cached training rows (default 19,998) and ``--test-rows`` test
rows. Features are synthetic float32 blocks shaped like EfficientNet-Lite0/1/2's GAP features
(1280, 1280, 1408 columns; N(0, 1) noise plus a weak class signal, as bench/grid_speed.py), so
nothing is extracted: the runner's own training seam (``_train_runs``: groups of runs, one
:meth:`Engine.map_runs` call each, files written by the driver) is timed on each engine.

* local: the :class:`~catsdogs.compute.LocalEngine` (bounded groups in this process);
* ray: a private Ray instance on this machine (its start is not timed, a job pays it once),
  one task per combination (its runs trained together); "cold" is the first grid (each worker
  process imports TensorFlow), "warm" a second grid on the same instance.

Checked: the same run ids and every run's validation log loss within 1e-6 of the local one.
Target (issue 22): ray <= 1.3x local. Other processes on the machine disturb the seconds; the
engines are measured back to back in one process.

Usage::

    python bench/ray_scaling.py [--rows 19998] [--test-rows 2000] [--epochs 8] [--repeat 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
from catsdogs.util.tf_log import quiet_tensorflow_import  # noqa: E402

quiet_tensorflow_import()  # its absl start-up lines held to that level too (as the CLI does)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np  # noqa: E402

#: backbone name -> GAP width (the Lite plugin's when installed, else core backbones)
LITE = {"efficientnet_lite0": 1280, "efficientnet_lite1": 1280, "efficientnet_lite2": 1408}
CORE = {"resnet50": 2048, "inception_v3": 2048, "xception": 2048}


def make_aligned(widths: dict[str, int], rows: int, test_rows: int, signal: float, seed: int):
    from catsdogs.features.fusion import Aligned, AlignedSplit

    rng = np.random.default_rng(seed)

    def split(n: int, prefix: str, labelled: bool) -> AlignedSplit:
        y = (np.arange(n) % 2).astype(np.int64)
        sign = np.where(y == 1, 1.0, -1.0).astype(np.float32)[:, None]
        X = {}
        for name, width in widths.items():
            direction = np.random.default_rng(hash(name) % 2**32).choice(
                np.array([-signal, signal], np.float32), size=width)
            block = rng.standard_normal((n, width), dtype=np.float32)
            block += sign * direction
            X[name] = block
        return AlignedSplit([f"{prefix}/{i}.jpg" for i in range(n)], np.arange(1, n + 1),
                            y if labelled else np.full(n, -1), X, {name: None for name in widths})

    return Aligned(tuple(widths), split(rows, "train", True), split(test_rows, "test", False))


def experiment_file(folder: Path, backbones: list[str], epochs: int) -> Path:
    import yaml

    data = folder / "data"
    for split in ("train", "test"):
        (data / split).mkdir(parents=True, exist_ok=True)
    doc = {"name": "ray-scaling", "data": str(data), "output": str(folder / "out"),
           "cache_dir": str(folder / "cache"), "weights": "none",
           "backbones": backbones, "heads": ["dropout_sigmoid", "softmax_cam"],
           "optimizers": [{"name": "adam", "learning_rate": 0.001},
                          {"name": "adadelta", "learning_rate": 1.0}],
           "epochs": epochs, "batch_size": 128, "seed": 2019, "validation": {"holdout": 0.2}}
    path = folder / "grid.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def train(engine, experiment, aligned, registry, out: Path) -> tuple[float, dict[str, float]]:
    from catsdogs.runs.runner import _settings, _splits, _train_runs, plan_runs

    shutil.rmtree(out, ignore_errors=True)
    (out / "runs").mkdir(parents=True)
    splits = _splits(aligned.train.y, experiment)
    keys = {b: {"config_key": "synthetic", "dataset_fingerprint": "synthetic"} for b in aligned.backbones}
    pending = [(spec, _settings(spec, experiment, keys, "synthetic"))
               for spec in plan_runs(experiment, registry)]
    t0 = time.perf_counter()
    records = _train_runs(pending, experiment, aligned, splits, registry, out, {}, False, engine)
    seconds = time.perf_counter() - t0
    return seconds, {r.run_id: r.metrics.logloss for r in records}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=19_998)
    ap.add_argument("--test-rows", type=int, default=2_000)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--signal", type=float, default=0.03)
    ap.add_argument("--repeat", type=int, default=2, help="ray rounds (the first cold), each "
                                                          "followed by a local one")
    args = ap.parse_args()

    from catsdogs.engine import open_engine
    from catsdogs.experiment.spec import load_experiment
    from catsdogs.plugins import get_registry

    registry = get_registry()
    widths = LITE if set(LITE) <= set(registry.names("backbones")) else CORE
    work = Path(tempfile.mkdtemp(prefix="catsdogs-ray-grid-"))
    try:
        experiment = load_experiment(experiment_file(work, list(widths), args.epochs))
        aligned = make_aligned(widths, args.rows, args.test_rows, args.signal, 2019)
        n_cols = sum(widths.values())
        print(f"grid: {len(widths)} backbones ({', '.join(widths)}), all combinations x 2 heads x "
              f"2 optimizers, {args.epochs} epochs, {args.rows} + {args.test_rows} rows x {n_cols} "
              f"columns; {os.cpu_count()} CPUs")
        local_s, ray_s = [], []
        with open_engine("local") as local:
            seconds, want = train(local, experiment, aligned, registry, work / "local")
            local_s.append(seconds)
            print(f"local: {len(want)} runs in {seconds:.1f} s")
        t0 = time.perf_counter()
        with open_engine("ray") as ray_engine:
            print(f"ray: private instance started in {time.perf_counter() - t0:.1f} s (not timed)")
            for round_ in range(args.repeat):
                seconds, got = train(ray_engine, experiment, aligned, registry, work / "ray")
                ray_s.append(seconds)
                assert got.keys() == want.keys()
                worst = max(abs(got[k] - want[k]) for k in want)
                print(f"ray {'warm' if round_ else 'cold'}: {len(got)} runs in {seconds:.1f} s; "
                      f"largest validation log loss difference to local {worst:.2e} "
                      f"(within 1e-6: {worst <= 1e-6})")
                with open_engine("local") as local:  # back to back: load changes hit both
                    seconds, _ = train(local, experiment, aligned, registry, work / "local")
                    local_s.append(seconds)
                    print(f"local: {seconds:.1f} s")
        base = min(local_s)
        warm = min(ray_s[1:]) if len(ray_s) > 1 else float("nan")
        print(f"ratio ray/local: cold {ray_s[0] / base:.2f}x, warm {warm / base:.2f}x "
              f"(target <= 1.3x; local best of {len(local_s)}: {base:.1f} s)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
