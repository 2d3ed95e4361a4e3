"""Measure: an int8 run's ``openvino`` model is its submission; its float32 graph is not.

Takes a finished experiment output folder OUT whose winner was extracted in int8 (e.g. one of
``bench/quality.py``'s outputs of ``experiments/best.yaml``'s grid) and predicts a seeded sample of
its test photos (``--n``) twice, prepared as :func:`catsdogs.app.predict.open_predictor` prepares
them for the winner's run directory: with the run's own quantised networks (``catsdogs.app.pipeline``, what ``predict``,
``serve`` and the ``openvino`` export use) and with the float32 graph (what the keras, tflite and
coreml exports compute). Printed per model: max / mean |P(dog) - submitted P(dog)|, label agreement
with the submission, the log loss on the sample when the data has ``test_labels.csv`` (scored at
the float32 bound, as submissions are) and its paired difference to the submission's with a
bootstrap standard error (2,000 resamples of the sample's photos), and CPU s. ``--n 0``: every
test photo. ``--save-predictions CSV`` writes both models' P(dog) per photo.

Usage::

    python bench/int8_export_parity.py OUT [--n 1000] [--save-predictions CSV] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
from catsdogs.util.tf_log import quiet_tensorflow_import  # noqa: E402

quiet_tensorflow_import()  # its absl start-up lines held to that level too (as the CLI does)


def main(argv=None) -> int:
    import numpy as np
    import pandas as pd

    from catsdogs.app.export import build_app_model, load_run, open_run_pipeline
    from catsdogs.app.models import KerasModel
    from catsdogs.app.predict import open_predictor, predict_files
    from catsdogs.evaluation.metrics import row_log_losses

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-predictions", type=Path, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    from catsdogs.evaluation.metrics import PROB_EPS

    winner = pd.read_csv(args.out / "leaderboard.csv").iloc[0]["run_id"]
    data = Path(json.loads((args.out / "experiment.json").read_text())["data"])
    submitted = pd.read_csv(args.out / "submission.csv").set_index("id")["label"]
    rng = np.random.default_rng(args.seed)
    n = len(submitted) if args.n <= 0 else min(args.n, len(submitted))
    ids = sorted(rng.choice(submitted.index.values, size=n, replace=False))
    photos = [data / "test" / f"{i}.jpg" for i in ids]
    labels_csv = data / "test_labels.csv"
    y = (pd.read_csv(labels_csv).set_index("id")["label"].loc[ids].values
         if labels_csv.is_file() else None)
    want = submitted.loc[ids].values
    run = args.out / "runs" / winner
    def losses(p):
        return row_log_losses(y, np.clip(p, PROB_EPS, 1 - PROB_EPS))

    result = {"winner": winner, "n": len(ids),
              "submission_logloss": None if y is None else float(losses(want).mean())}
    saved = pd.DataFrame({"id": ids, "submitted": want})
    for name in ("run's own networks", "float32 graph"):
        t = time.process_time()
        predictor = open_predictor(run)  # the reader's preparation of the run's inputs
        info = load_run(run)  # the models themselves, whatever export/ the run has
        predictor.classifier = (KerasModel(build_app_model(info)) if name == "float32 graph"
                                else open_run_pipeline(info))
        p = np.array([q.p_dog for q in predict_files(predictor, photos)])
        saved[name] = p
        delta = np.abs(p - want)
        result[name] = {"backend": "keras" if name == "float32 graph" else "openvino",
                        "max_abs_dp": float(delta.max()), "mean_abs_dp": float(delta.mean()),
                        "label_agreement": float(np.mean((p >= 0.5) == (want >= 0.5))),
                        "logloss": None, "vs_submission": None, "vs_submission_se": None,
                        "cpu_s": round(time.process_time() - t, 1)}
        if y is not None:
            d = losses(p) - losses(want)
            draws = np.random.default_rng(0).integers(0, len(d), (2000, len(d)))
            result[name].update(logloss=float(losses(p).mean()), vs_submission=float(d.mean()),
                                vs_submission_se=float(d[draws].mean(axis=1).std()))
    if args.save_predictions is not None:
        saved.to_csv(args.save_predictions, index=False)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{winner}, {len(ids)} test photos; submission log loss {result['submission_logloss']}")
        for name in ("run's own networks", "float32 graph"):
            r = result[name]
            paired = ("" if r["vs_submission"] is None else
                      f" ({r['vs_submission']:+.5f} +- {r['vs_submission_se']:.5f} vs submitted)")
            print(f"  {name:<20} max |dP| {r['max_abs_dp']:.2e}  mean {r['mean_abs_dp']:.2e}  labels "
                  f"agree {r['label_agreement']:.3f}  log loss {r['logloss']}{paired}  "
                  f"{r['cpu_s']} CPU s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
