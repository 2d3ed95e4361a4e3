"""Compare runs of one grid with their twins: the same combination and head, another optimizer
(or the same combination and optimizer, another head).

For each experiment output folder OUT (e.g. one of ``bench/quality.py``'s outputs per split) and
each run whose ``--vary`` field (``optimizer`` or ``head``) is not ``--base``: its ranking number
(out of fold or validation, post-processed, as ranked) and its raw test log loss (the mean of its
fold heads' P(dog), at the float32 bound, as submissions are scored; the data folder's
``test_labels.csv``) minus its twin's with ``--base``. Printed per OUT and value: the mean
difference of both and how many twins it beats. Ensembles are left out.

Usage::

    python bench/twin_runs.py OUT [OUT ...] --vary optimizer --base adam [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def runs(out: Path):
    """One row per trained run of ``out``: combination, head, optimizer, ranking number and raw
    test log loss."""
    import numpy as np
    import pandas as pd

    from catsdogs.evaluation.metrics import PROB_EPS, row_log_losses
    from catsdogs.runs.record import RunRecord

    data = Path(json.loads((out / "experiment.json").read_text())["data"])
    y = pd.read_csv(data / "test_labels.csv").set_index("id")["label"]
    rows = []
    for run in sorted((out / "runs").iterdir()):
        record = RunRecord.load(run)
        if record.ensemble:
            continue
        p = pd.read_csv(run / "test_predictions.csv").set_index("id")["p_dog"].loc[y.index]
        rows.append({"combination": "+".join(record.combination), "head": record.head.name,
                     "optimizer": record.optimizer.name if record.optimizer else "",
                     "rank": record.ranking_logloss,
                     "test": float(row_log_losses(y.to_numpy(), np.clip(p.to_numpy(), PROB_EPS,
                                                                       1 - PROB_EPS)).mean())})
    return pd.DataFrame(rows)


def compare(frame, vary: str, base: str) -> dict:
    """Per value of ``vary`` other than ``base``: mean differences to the twins and counts."""
    keep = [c for c in ("combination", "head", "optimizer") if c != vary]
    twins = frame[frame[vary] == base].set_index(keep)[["rank", "test"]]
    out = {}
    for value, group in frame[frame[vary] != base].groupby(vary):
        d = (group.set_index(keep)[["rank", "test"]] - twins).dropna()
        out[value] = {"twins": len(d), "rank_mean": float(d["rank"].mean()),
                      "rank_lower": int((d["rank"] < 0).sum()), "test_mean": float(d["test"].mean()),
                      "test_lower": int((d["test"] < 0).sum())}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, nargs="+")
    parser.add_argument("--vary", choices=("optimizer", "head"), default="optimizer")
    parser.add_argument("--base", required=True, help="the twin compared against, e.g. adam")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = {str(out): compare(runs(out), args.vary, args.base) for out in args.out}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for out, values in result.items():
        print(out)
        for value, r in values.items():
            print(f"  {value} - {args.base} ({r['twins']} twins): ranking number "
                  f"{r['rank_mean']:+.5f} ({r['rank_lower']} lower), raw test log loss "
                  f"{r['test_mean']:+.5f} ({r['test_lower']} lower)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
