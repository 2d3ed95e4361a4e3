"""Benchmark: Ray extraction against the local engine on this machine, and a projection to N nodes.

(The grid comparison is bench/ray_scaling.py.)

Measured in ONE process, on the same images (symlinks to ``--limit`` train images, half cats and
half dogs, and ``--limit // 10`` test images), alternating engines so load changes hit both:

* extraction: images/s of ``extract(..., engine=LocalEngine())`` vs ``extract(..., engine=<Ray>)`` over
  the whole call (model build, chunks written, final HDF5), not counting the Ray instance's
  start, which a job pays once. Ray "cold" includes the actor pool's start (worker process,
  TensorFlow import); "warm" reuses the pool's processes, as a job's later backbones do.
  ``overhead`` = 1 - ray/local (target < 15 %); per-node images/s from the recorded node ids;
* grid: wall time of the same small grid (every combination x 2 optimizers on the cached
  features) run locally and as Ray tasks;
* projection: the write-up's grid (4 Keras backbones over 25,000 images, 30 runs) on N nodes like
  this one, from per-backbone local images/s measured on ``--sample`` images, the measured Ray
  efficiency, linear scaling over nodes (shards are independent), and the issue's measured
  4.5 min for a 42-run grid over 25,000 rows on one machine (6.4 s per run) for the runs.

The Ray instance is local (loopback, ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``) with this machine's
CPUs: one node, so one extraction actor. Other processes on the machine disturb absolute numbers;
the ratios are measured back to back.

Usage::

    python bench/ray_extract.py [--data ../shared/data/dogs-vs-cats-mini] [--limit 300]
                                [--backbone resnet50] [--weights none] [--sample 48] [--repeat 2]
"""

from __future__ import annotations

import argparse
import math
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

import catsdogs  # noqa: E402
from catsdogs.dataset.layout import open_dataset  # noqa: E402
from catsdogs.engine import EngineSpec, LocalEngine, open_engine  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "dogs-vs-cats-mini"
WRITEUP_BACKBONES = ("resnet50", "inception_v3", "xception", "inception_resnet_v2")
WRITEUP_IMAGES, WRITEUP_RUNS = 25_000, 30
ISSUE_RUN_SECONDS = 4.5 * 60 / 42  # the issue: 42 runs over 25,000 cached rows in 4.5 minutes


def subset(src: Path, dst: Path, limit: int) -> Path:
    """Symlinks to ``limit`` train images (half cats, half dogs) and ``limit // 10`` test images of ``src``."""
    ds = open_dataset(src)
    train = [r for r in ds.train if r.label == 0][:limit // 2] + \
        [r for r in ds.train if r.label == 1][:limit - limit // 2]
    for split, records in (("train", train), ("test", ds.test[:limit // 10])):
        (dst / split).mkdir(parents=True)
        for rec in records:
            (dst / split / rec.path.name).symlink_to(rec.path)
    return dst


def extract_rate(data: Path, cache: Path, backbone: str, weights: str, engine) -> tuple[float, dict]:
    shutil.rmtree(cache, ignore_errors=True)
    t0 = time.perf_counter()
    (res,) = catsdogs.extract(data, backbone, weights=weights, cache_dir=cache, progress=False,
                              engine=engine or LocalEngine())
    meta = catsdogs.load_features(res.path).meta.get("engine") or {}
    return res.computed / (time.perf_counter() - t0), dict(meta.get("nodes", {}))


def grid_seconds(data: Path, cache: Path, out: Path, backbones: list[dict], engine: str) -> float:
    import yaml

    from catsdogs.experiment.spec import load_experiment
    from catsdogs.runs.runner import run_experiment

    shutil.rmtree(out, ignore_errors=True)
    doc = {"data": str(data), "output": str(out), "cache_dir": str(cache), "weights": "none",
           "backbones": backbones, "heads": ["dropout_sigmoid"],
           "optimizers": ["adam", {"name": "adadelta", "learning_rate": 1.0}],
           "epochs": 8, "batch_size": 128, "seed": 2019, "validation": {"holdout": 0.2}}
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(doc))
    t0 = time.perf_counter()
    result = run_experiment(load_experiment(path), progress=False, submit=False,
                            engine=EngineSpec(engine))
    assert result.computed == len(result.records)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--limit", type=int, default=300, help="train images for the engine comparison")
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--weights", default="none")
    ap.add_argument("--sample", type=int, default=48, help="images per backbone for the projection")
    ap.add_argument("--repeat", type=int, default=2, help="alternating local/ray rounds")
    ap.add_argument("--nodes", default="1,2,4,8,16")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="catsdogs-ray-bench-"))
    try:
        data = subset(args.data, work / "data", args.limit)
        sample = subset(args.data, work / "sample", args.sample)
        print(f"{args.limit} images, {args.backbone} ({args.weights}), {os.cpu_count()} CPUs")

        local_rates, cold_rates, ray_rates, per_node = [], [], [], {}
        with open_engine("ray") as engine:  # a local Ray instance, started once
            for _ in range(args.repeat):
                engine.release()  # cold: the pool's start (process, TF import, model) is measured
                local_rates.append(extract_rate(data, work / "c-local", args.backbone, args.weights, None)[0])
                cold_rates.append(extract_rate(data, work / "c-ray", args.backbone, args.weights, engine)[0])
                rate, per_node = extract_rate(data, work / "c-ray", args.backbone, args.weights, engine)
                ray_rates.append(rate)  # warm: the pool of a long job (model rebuilt, process kept)
        local, cold, ray_ = max(local_rates), max(cold_rates), max(ray_rates)
        print(f"extract local:    {', '.join(f'{r:.1f}' for r in local_rates)} images/s (best {local:.1f})")
        print(f"extract ray cold: {', '.join(f'{r:.1f}' for r in cold_rates)} images/s (best {cold:.1f})")
        print(f"extract ray warm: {', '.join(f'{r:.1f}' for r in ray_rates)} images/s (best {ray_:.1f})")
        print(f"ray overhead: cold {100 * (1 - cold / local):.1f} %, warm {100 * (1 - ray_ / local):.1f} % "
              "(target < 15 %)")
        for node, n in per_node.items():
            print(f"  node {node[:12]}: {n} images, {ray_ * n / max(1, sum(per_node.values())):.1f} images/s")

        grid_backbones = [{"name": args.backbone}]
        g_local = grid_seconds(data, work / "c-local", work / "g-local", grid_backbones, "local")
        g_ray = grid_seconds(data, work / "c-local", work / "g-ray", grid_backbones, "ray")
        print(f"grid (2 runs, {args.limit} rows): local {g_local:.1f} s, ray {g_ray:.1f} s "
              f"(ray incl. its start), ratio {g_ray / g_local:.2f}")

        rates = {}
        for name in WRITEUP_BACKBONES:
            rates[name] = extract_rate(sample, work / f"c-{name}", name, "none", None)[0]
            print(f"local {name}: {rates[name]:.1f} images/s ({args.sample} images)")
        efficiency = ray_ / local
        one_node_extract = sum(WRITEUP_IMAGES / (r * efficiency) for r in rates.values())
        print(f"\nprojection: {len(WRITEUP_BACKBONES)} backbones x {WRITEUP_IMAGES} images, "
              f"{WRITEUP_RUNS} runs of {ISSUE_RUN_SECONDS:.1f} s, nodes like this one")
        print("| nodes | extraction | grid | total |")
        print("|---|---|---|---|")
        cpus = os.cpu_count() or 1
        for n in (int(x) for x in args.nodes.split(",")):
            ext = one_node_extract / n
            grid = math.ceil(WRITEUP_RUNS / (n * cpus)) * ISSUE_RUN_SECONDS * cpus
            print(f"| {n} | {ext / 60:.0f} min | {grid / 60:.1f} min | {(ext + grid) / 60:.0f} min |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
