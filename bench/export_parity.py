"""Measure: the exported model is the submitted model, on real photos with real backbones.

Runs two small experiments on DATA (default: the EfficientNet-Lite plugin's Lite0 + Lite1,
224 and 240 px, so the export has two image inputs), with flip TTA and ``postprocess: auto``:

* holdout: every combination, ``dropout_sigmoid`` x (adam, adadelta), ``refit: true``, a stacked ensemble of
  the top 2 -> the **refitted winner** (vs ``submission.csv``), the best **single** run that is not
  the winner and the **ensemble** run (each vs what ``predict-test`` submits for it);
* ``validation: {kfold: 3}`` on the first backbone alone -> a **k-fold** run (vs
  ``submission.csv``).

Each is exported (``--formats``, default keras) and every test photo is predicted through
:func:`catsdogs.app.predict.open_predictor` (the code behind ``catsdogs predict --model``); printed:
max and mean |P(dog) - submitted P(dog)| per kind. ``--cache-dir`` shares the features.

Usage::

    python bench/export_parity.py --data ../shared/data/dogs-vs-cats-mini [--cache-dir DIR]
        [--out /tmp/catsdogs-export-parity] [--backbones efficientnet_lite0,efficientnet_lite1]
        [--formats keras] [--epochs 30] [--limit N] [--json]
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


def main(argv=None) -> int:
    import numpy as np
    import pandas as pd
    import yaml

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--out", default="/tmp/catsdogs-export-parity")
    parser.add_argument("--backbones", default="efficientnet_lite0,efficientnet_lite1")
    parser.add_argument("--formats", default="keras")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--limit", type=int, default=None, help="predict only the first N test photos")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    from catsdogs.app.export import export_run
    from catsdogs.app.predict import open_predictor, predict_files
    from catsdogs.experiment.spec import load_experiment
    from catsdogs.runs.runner import run_experiment, write_run_submission

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data).resolve()
    backbones = args.backbones.split(",")
    common = {"data": str(data), "weights": "imagenet", "heads": ["dropout_sigmoid"],
              "optimizers": ["adam", {"name": "adadelta", "learning_rate": 1.0}],
              "epochs": args.epochs, "batch_size": 32, "seed": 2019,
              "tta": True, "postprocess": "auto"}
    if args.cache_dir:
        common["cache_dir"] = str(Path(args.cache_dir).resolve())

    def run(name: str, **fields):
        path = out / f"{name}.yaml"
        path.write_text(yaml.safe_dump({**common, "output": str(out / name), **fields}))
        return run_experiment(load_experiment(path), progress=False)

    photos = sorted((data / "test").glob("*.jpg"), key=lambda p: int(p.stem))[: args.limit]

    def parity(kind: str, run_dir: Path, expected_csv: Path) -> dict:
        expected = pd.read_csv(expected_csv).set_index("id")["label"]
        export = out / "exports" / kind
        formats = args.formats.split(",")
        manifest = export_run(run_dir, formats, export, neither=False)
        result = {"kind": kind, "run": run_dir.name, "inputs": [i["size"] for i in manifest["inputs"]],
                  "postprocess": manifest["postprocess"]["describe"], "refit": manifest["refit"],
                  "members": len(manifest["members"]),
                  "heads": sum(len(m["heads"]) for m in manifest["members"])}
        for fmt in formats:
            preds = predict_files(open_predictor(export, fmt), photos)
            got = np.array([p.p_dog for p in preds])
            want = expected.loc[[int(p.stem) for p in photos]].to_numpy()
            d = np.abs(got - want)
            result[fmt] = {"max_abs_dp": float(d.max()), "mean_abs_dp": float(d.mean()),
                           "n": int(len(d))}
        print(json.dumps(result), flush=True)
        return result

    rows = []
    holdout = run("holdout", backbones=backbones, combinations="all", refit=True,
                  ensemble={"top": 2, "method": "stack"})
    hout = holdout.out_dir
    winner = holdout.winner
    rows.append(parity("refit" if not winner.ensemble else "refit (ensemble winner)",
                       hout / "runs" / winner.run_id, hout / "submission.csv"))
    single = next(r for r in holdout.records[1:] if not r.ensemble)
    write_run_submission(hout / "runs" / single.run_id, out / "single.csv")
    rows.append(parity("single", hout / "runs" / single.run_id, out / "single.csv"))
    ens = next((r for r in holdout.records if r.ensemble), None)
    if ens is not None and ens.run_id != winner.run_id:
        write_run_submission(hout / "runs" / ens.run_id, out / "ensemble.csv")
        rows.append(parity("ensemble", hout / "runs" / ens.run_id, out / "ensemble.csv"))
    kfold = run("kfold", backbones=backbones[:1], validation={"kfold": 3},
                optimizers=["adam"])
    rows.append(parity("k-fold", kfold.out_dir / "runs" / kfold.winner.run_id,
                       kfold.out_dir / "submission.csv"))
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
