"""Measure: a run's submission predicted from OpenVINO's float32 features (``runtime: openvino``).

Takes a finished experiment output folder OUT whose winner predicts from TensorFlow's float32
features (e.g. ``bench/quality.py``'s output of ``experiments/best.yaml``, ``predict_precision:
float32``) and a feature cache OTHER holding the same test photos' float32 features computed by
OpenVINO (``catsdogs extract DATA -b NAME --image-size S --runtime openvino --cache-dir OTHER``
for each of the winner's backbones; DATA may hold only the test photos and a few training ones,
rows are matched by photo id). The winner's fold heads (as trained) and post-processing then
predict the test photos from both feature sets, as the runner predicts them: printed, max
|P(dog) - submitted| for each, the test log loss at the float32 bound when the data has
``test_labels.csv``, and the paired difference OpenVINO - TensorFlow with its bootstrap standard
error (2,000 resamples).

Usage::

    python bench/float32_runtime_parity.py OUT OTHER [--json]
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

    from catsdogs.app.export import load_head_file
    from catsdogs.evaluation.metrics import PROB_EPS, row_log_losses
    from catsdogs.features.cache import load_features, read_feature_meta
    from catsdogs.features.extraction import default_cache_dir
    from catsdogs.runs.features import locate_features
    from catsdogs.runs.postprocess import apply_to_test, transform_of
    from catsdogs.runs.record import RunRecord

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("other", type=Path, help="feature cache with OpenVINO's float32 features")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    experiment = json.loads((args.out / "experiment.json").read_text())
    cache = Path(experiment.get("cache_dir") or default_cache_dir()).expanduser()
    winner = pd.read_csv(args.out / "leaderboard.csv").iloc[0]["run_id"]
    run = args.out / "runs" / winner
    record = RunRecord.load(run)
    submitted = pd.read_csv(args.out / "submission.csv").set_index("id")["label"].sort_index()
    ids = submitted.index.to_numpy()
    labels = Path(experiment["data"]) / "test_labels.csv"
    y = pd.read_csv(labels).set_index("id")["label"].loc[ids].to_numpy() if labels.is_file() else None

    def test_rows(path: Path) -> np.ndarray:
        split = load_features(path).test
        return pd.DataFrame(split.X, index=split.ids).loc[ids].to_numpy(np.float32)

    def openvino_file(name: str, size: int) -> Path:
        for path in sorted(args.other.glob(f"features/*/{name}-{size}-*-float32-*.h5")):
            if read_feature_meta(path).get("runtime") == "openvino":
                return path
        raise SystemExit(f"{args.other}: no OpenVINO float32 features of {name} at {size} px")

    sets: dict[str, list[np.ndarray]] = {"tensorflow": [], "openvino": []}
    for name in record.combination:
        key = record.predicting_keys[name]
        path, meta = locate_features(cache, key["config_key"], key.get("dataset_fingerprint"))
        if meta.get("precision") != "float32" or meta.get("runtime", "tensorflow") != "tensorflow":
            raise SystemExit(f"{path}: the run did not predict from TensorFlow's float32 features")
        sets["tensorflow"].append(test_rows(path))
        sets["openvino"].append(test_rows(openvino_file(name, int(meta["image_size"]))))
    heads = [load_head_file(run / "head.keras")] + [
        load_head_file(run / f"head-fold{k}.keras") for k in range(1, record.validation.folds or 1)]
    transform = transform_of(record)

    def losses(p):
        return row_log_losses(y, np.clip(p, PROB_EPS, 1 - PROB_EPS))

    result: dict = {"winner": winner, "n": len(ids)}
    predicted = {}
    for runtime, blocks in sets.items():
        X = np.concatenate(blocks, axis=1)
        folds = {f"p_dog_fold{k}": np.asarray(h(X, training=False), np.float64).reshape(-1)
                 for k, h in enumerate(heads)}
        frame = pd.DataFrame({"p_dog": np.mean(list(folds.values()), axis=0),
                              **(folds if len(folds) > 1 else {})})
        p = predicted[runtime] = apply_to_test(transform, frame)
        result[runtime] = {"max_abs_dp_vs_submitted": float(np.abs(p - submitted.to_numpy()).max()),
                           "logloss": None if y is None else float(losses(p).mean())}
    if y is not None:
        d = losses(predicted["openvino"]) - losses(predicted["tensorflow"])
        draws = np.random.default_rng(0).integers(0, len(d), (2000, len(d)))
        result.update(submitted_logloss=float(losses(submitted.to_numpy()).mean()),
                      openvino_minus_tensorflow=float(d.mean()),
                      se=float(d[draws].mean(axis=1).std()))
    result["max_abs_dp_between"] = float(np.abs(predicted["openvino"] - predicted["tensorflow"]).max())
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{winner}, {len(ids)} test photos; submission log loss {result.get('submitted_logloss')}")
        for runtime in sets:
            r = result[runtime]
            print(f"  {runtime:<10} max |P - submitted| {r['max_abs_dp_vs_submitted']:.2e}  "
                  f"log loss {r['logloss']}")
        if y is not None:
            print(f"  openvino - tensorflow: {result['openvino_minus_tensorflow']:+.2e} +- "
                  f"{result['se']:.1e}; max |dP| between them {result['max_abs_dp_between']:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
