"""Benchmark: does refit (retraining a ranked run on train + validation rows) improve the test
log loss, and why not? Over several seeds, on a data set with test labels.

For each ``--seeds`` value the grid of EXPERIMENT.yaml (default: the demo's EfficientNet-Lite0/1/2
grid) runs with that seed (so another holdout split, other initial weights, other dropout masks)
and no refit; the ``--top`` best runs by the ranking loss are then refitted on all training rows
in variants, each scored on the test labels after the run's own post-processing transform
(``postprocess: auto``, chosen on its validation predictions, as the submission applies it):

``ranked``
    the run's own head (trained on the 80 % training part): its submitted test predictions;
``refit``
    the refit as it was before issue 20 item 7: same epochs and batch size, so 25 % more
    optimizer steps on 25 % more rows;
``refit_same_steps``
    :func:`catsdogs.runs.refit.refit_head` now: same epochs, the batch grown with the rows
    (:func:`~catsdogs.runs.refit.refit_batch_size`): the same number of optimizer steps per epoch
    and in total as the ranked fit (each row still seen ``epochs`` times);

and the raw (not post-processed) losses of each. Printed: per seed and run the test log losses;
then, over all (seed, run) pairs, the mean paired difference to ``ranked`` with its standard error
(pairs are not independent across runs of one seed; the per-seed mean of the winner is printed too).
Features are extracted once into ``--cache-dir`` and shared by every seed.

Usage::

    python bench/refit_seeds.py [EXPERIMENT.yaml] --data ../shared/data/dogs-vs-cats-mini
        [--seeds 1,2,3] [--top 5] [--cache-dir DIR] [--out DIR] [--backbones a,b] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
from catsdogs.util.tf_log import quiet_tensorflow_import  # noqa: E402

quiet_tensorflow_import()  # its absl start-up lines held to that level too (as the CLI does)

REPO = Path(__file__).resolve().parents[1]


def _test_loss(y, p):
    from catsdogs.runs.metrics import log_loss

    return float(log_loss(y, p))


def main(argv=None) -> int:
    import numpy as np
    import pandas as pd

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", nargs="?", default=str(REPO / "experiments" / "demo.yaml"))
    parser.add_argument("--data", required=True)
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--out", default="/tmp/catsdogs-refit-seeds")
    parser.add_argument("--backbones", default=None, help="comma-separated subset of the backbones")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    from catsdogs.experiment.spec import load_experiment
    from catsdogs.features.extraction import load_features
    from catsdogs.features.fusion import align
    from catsdogs.plugins import get_registry
    from catsdogs.runs.postprocess import ranking_loss, transform_of
    from catsdogs.runs.refit import refit_batch_size, refit_head
    from catsdogs.runs.runner import run_experiment
    from catsdogs.runs.submission import read_labels

    data = Path(args.data).resolve()
    labels = read_labels(data / "test_labels.csv")
    registry = get_registry()
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        exp = load_experiment(args.experiment)
        changes = {"seed": seed, "data": data, "output": Path(args.out) / f"seed{seed}",
                   "refit": False, "ensemble": None, "postprocess": "auto"}
        if args.cache_dir:
            changes["cache_dir"] = Path(args.cache_dir).resolve()
        if args.backbones:
            keep = args.backbones.split(",")
            changes["backbones"] = [b for b in exp.backbones if b.name in keep]
            changes["combinations"] = [c for c in exp.combinations if set(c) <= set(keep)]
        exp = exp.model_copy(update=changes)
        result = run_experiment(exp, progress=False, submit=False)
        aligned = align({b: load_features(f) for b, f in result.feature_files.items()}, exp.exclude)
        n_all = len(aligned.train.y)
        for rank, record in enumerate(result.records[: args.top], 1):
            run_dir = result.out_dir / "runs" / record.run_id
            test = pd.read_csv(run_dir / "test_predictions.csv").set_index("id")
            ids = [i for i in test.index if i in labels.index]
            y = labels.loc[ids].to_numpy()
            t = transform_of(record)
            p_ranked = test.loc[ids, "p_dog"].to_numpy()
            row = {"seed": seed, "rank": rank, "run_id": record.run_id,
                   "val_ranking": ranking_loss(record), "transform": t.describe(),
                   "ranked": _test_loss(y, t.apply(p_ranked)), "ranked_raw": _test_loss(y, p_ranked)}
            for variant, batch in (("refit", exp.batch_size),
                                   ("refit_same_steps",
                                    refit_batch_size(exp.batch_size, record.n_train, n_all))):
                _, refit_ids, p = refit_head(record, exp, aligned, registry, batch_size=batch)
                p = pd.Series(p, index=refit_ids).loc[ids].to_numpy()
                row[variant] = _test_loss(y, t.apply(p))
                row[variant + "_raw"] = _test_loss(y, p)
            rows.append(row)
            print(json.dumps(row), flush=True)
    frame = pd.DataFrame(rows)
    summary = {}
    for variant in ("refit", "refit_same_steps"):
        for suffix in ("", "_raw"):
            d = frame[variant + suffix] - frame["ranked" + suffix]
            summary[variant + suffix] = {
                "mean_diff_vs_ranked": float(d.mean()),
                "se": float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0,
                "better_in": f"{int((d < 0).sum())} of {len(d)}",
                "winner_diff_per_seed": [float(v) for v in
                                         (frame[frame["rank"] == 1][variant + suffix]
                                          - frame[frame["rank"] == 1]["ranked" + suffix])],
            }
    if args.json:
        print(json.dumps({"rows": rows, "summary": summary}, indent=2))
    else:
        cols = ["seed", "rank", "run_id", "transform", "ranked", "refit", "refit_same_steps",
                "ranked_raw", "refit_raw", "refit_same_steps_raw"]
        print(frame[cols].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        for name, s in summary.items():
            print(f"{name:>22}: test log loss minus ranked {s['mean_diff_vs_ranked']:+.4f} "
                  f"± {s['se']:.4f} (better in {s['better_in']}); winner per seed "
                  + ", ".join(f"{v:+.4f}" for v in s["winner_diff_per_seed"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
