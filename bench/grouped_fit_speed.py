"""Benchmark: an experiment file's grid on its cached features, every run fitted alone against
the runner's grouped fit (:mod:`catsdogs.runs.multifit`), each in its own subprocess.

Both arms run ``catsdogs.run_experiment`` on the same data, feature cache and settings (the
features must be cached already, e.g. by ``bench/quality.py``: nothing is extracted); the
reference sets ``CATSDOGS_GROUPED_FIT=0``. Prints, per arm, the process CPU seconds and wall
seconds of the whole run (feature loading included), their ratio, and the largest differences
between the two arms' validation log loss and test P(dog) run for run (grouping reproduces each
run's own fit to float32 round-off). ``--heads`` restricts the grid to those heads; ``--arm
grouped`` (or ``alone``) runs one arm only and prints its seconds; ``--keep DIR`` keeps the
outputs there (default: a temporary folder, removed).

Usage::

    python bench/grouped_fit_speed.py bench/quality_experiments/scale150-kfold-prior-cal300.yaml \\
        --data ~/.cache/catsdogs-bench/split-s2021-19998-5000 \\
        --cache-dir ~/.cache/catsdogs-bench/cache [--heads imagenet_prior] [--arm grouped] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys
import catsdogs
experiment_file, data, cache, out, heads = sys.argv[1:6]
overrides = {"data": data, "output": out, "cache_dir": cache}
experiment = catsdogs.load_experiment(experiment_file, **overrides)
if heads:
    experiment.heads = [h for h in experiment.heads if h.name in heads.split(",")]
result = catsdogs.run_experiment(experiment, progress=False)
print(json.dumps(str(result.out_dir)))
"""


def arm(experiment: Path, data: Path, cache: Path, out: Path, heads: str, grouped: bool) -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    if not grouped:
        env["CATSDOGS_GROUPED_FIT"] = "0"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, str(experiment), str(data), str(cache),
                           str(out), heads], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        sys.exit(f"the {'grouped' if grouped else 'alone'} arm failed:\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"out": json.loads(proc.stdout.strip().splitlines()[-1]), "cpu_s": cpu, "wall_s": wall}


def differences(a: Path, b: Path) -> dict:
    import numpy as np
    import pandas as pd

    la, lb = (pd.read_csv(Path(d) / "leaderboard.csv").set_index("run_id") for d in (a, b))
    runs = sorted(la.index)
    val = float(np.abs(la.loc[runs, "val_logloss"] - lb.loc[runs, "val_logloss"]).max())
    test = 0.0
    for run in runs:
        pa, pb = (pd.read_csv(Path(d) / "runs" / run / "test_predictions.csv")["p_dog"]
                  for d in (a, b))
        test = max(test, float(np.abs(pa - pb).max()))
    return {"runs": len(runs), "same_ranking": list(la.index) == list(lb.index),
            "max_val_logloss_diff": val, "max_test_p_diff": test}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", type=Path)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--cache-dir", type=Path, required=True)
    parser.add_argument("--heads", default="", help="comma-separated heads to keep")
    parser.add_argument("--arm", choices=("both", "grouped", "alone"), default="both")
    parser.add_argument("--keep", type=Path, default=None, help="keep the outputs in this folder")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import contextlib

    def folder():
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            return contextlib.nullcontext(str(args.keep))
        return tempfile.TemporaryDirectory(prefix="grouped-fit-")

    if args.arm != "both":
        with folder() as tmp:
            one = arm(args.experiment, args.data.expanduser(), args.cache_dir.expanduser(),
                      Path(tmp) / args.arm, args.heads, grouped=args.arm == "grouped")
            import pandas as pd

            one["runs"] = len(pd.read_csv(Path(one["out"]) / "leaderboard.csv"))
        print(json.dumps(one, indent=2) if args.json else
              f"{args.arm}: {one['runs']} runs, CPU {one['cpu_s']:.1f} s, wall {one['wall_s']:.1f} s")
        return
    with folder() as tmp:
        alone = arm(args.experiment, args.data.expanduser(), args.cache_dir.expanduser(),
                    Path(tmp) / "alone", args.heads, grouped=False)
        grouped = arm(args.experiment, args.data.expanduser(), args.cache_dir.expanduser(),
                      Path(tmp) / "grouped", args.heads, grouped=True)
        report = {"alone": alone, "grouped": grouped,
                  "cpu_ratio": grouped["cpu_s"] / alone["cpu_s"],
                  "wall_ratio": grouped["wall_s"] / alone["wall_s"],
                  **differences(Path(alone["out"]), Path(grouped["out"]))}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    for name in ("alone", "grouped"):
        print(f"{name:8s} CPU {report[name]['cpu_s']:8.1f} s   wall {report[name]['wall_s']:7.1f} s")
    print(f"grouped / alone: CPU {report['cpu_ratio']:.3f}, wall {report['wall_ratio']:.3f} "
          f"({report['runs']} runs; same ranking: {report['same_ranking']}; largest differences: "
          f"validation log loss {report['max_val_logloss_diff']:.2e}, test P(dog) "
          f"{report['max_test_p_diff']:.2e})")


if __name__ == "__main__":
    main()
