"""Compare runs of one grid with their twins: the same combination and head, another optimizer
(or the same combination and optimizer, another head).

For each experiment output folder OUT (e.g. one of ``bench/quality.py``'s outputs per split) and
each run whose ``--vary`` field (``optimizer`` or ``head``) is not ``--base``: its ranking number
(out of fold or validation, post-processed, as ranked), its raw test log loss (the mean of its
fold heads' P(dog)) and its post-processed one (as it would be submitted), both at the float32
bound, as submissions are scored, on the data folder's ``test_labels.csv``, minus its twin's with
``--base``. Printed per OUT and value: the mean
difference of both and how many twins it beats. Ensembles are left out. With ``--vary head``, a
head that takes no optimizer (``logistic``) is compared with the base head's run that has
``--twin-optimizer``.

Usage::

    python bench/twin_runs.py OUT [OUT ...] --vary optimizer --base adam [--json]
    python bench/twin_runs.py OUT [OUT ...] --vary head --base dropout_sigmoid --twin-optimizer adadelta
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

#: the numbers compared, and how they are printed
NUMBERS = {"rank": "ranking number", "test": "raw test log loss", "post": "post-processed test"}


def runs(out: Path):
    """One row per trained run of ``out``: combination, head, optimizer, ranking number and raw
    test log loss."""
    import numpy as np
    import pandas as pd

    from catsdogs.evaluation.metrics import PROB_EPS, row_log_losses
    from catsdogs.runs.postprocess import apply_to_test, transform_of
    from catsdogs.runs.record import RunRecord

    data = Path(json.loads((out / "experiment.json").read_text())["data"])
    y = pd.read_csv(data / "test_labels.csv").set_index("id")["label"]
    rows = []
    for run in sorted((out / "runs").iterdir()):
        record = RunRecord.load(run)
        if record.ensemble:
            continue
        frame = pd.read_csv(run / "test_predictions.csv").set_index("id").loc[y.index]

        def loss(p):
            return float(row_log_losses(y.to_numpy(), np.clip(p, PROB_EPS, 1 - PROB_EPS)).mean())

        rows.append({"combination": "+".join(record.combination), "head": record.head.name,
                     "optimizer": record.optimizer.name if record.optimizer else "",
                     "rank": record.ranking_logloss, "test": loss(frame["p_dog"].to_numpy()),
                     "post": loss(apply_to_test(transform_of(record), frame))})
    return pd.DataFrame(rows)


def compare(frame, vary: str, base: str, twin_optimizer: str | None = None) -> dict:
    """Per value of ``vary`` other than ``base``: mean differences to the twins and counts (a run
    without an optimizer: to the base's run with ``twin_optimizer``)."""
    keep = [c for c in ("combination", "head", "optimizer") if c != vary]
    base_rows = frame[frame[vary] == base]
    twins = base_rows.set_index(keep)[list(NUMBERS)]
    out = {}
    for value, group in frame[frame[vary] != base].groupby(vary):
        if vary == "head" and twin_optimizer and (group["optimizer"] == "").all():
            group = group.assign(optimizer=twin_optimizer)
        d = (group.set_index(keep)[list(NUMBERS)] - twins).dropna()
        out[value] = {"twins": len(d), **{f"{k}_{stat}": float(d[k].mean()) if stat == "mean"
                                           else int((d[k] < 0).sum())
                                           for k in NUMBERS for stat in ("mean", "lower")}}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, nargs="+")
    parser.add_argument("--vary", choices=("optimizer", "head"), default="optimizer")
    parser.add_argument("--base", required=True, help="the twin compared against, e.g. adam")
    parser.add_argument("--twin-optimizer", default=None,
                        help="--vary head: the base head's optimizer a head without one is compared with")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = {str(out): compare(runs(out), args.vary, args.base, args.twin_optimizer)
              for out in args.out}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for out, values in result.items():
        print(out)
        for value, r in values.items():
            print(f"  {value} - {args.base} ({r['twins']} twins): " + ", ".join(
                f"{label} {r[k + '_mean']:+.5f} ({r[k + '_lower']} lower)"
                for k, label in NUMBERS.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
