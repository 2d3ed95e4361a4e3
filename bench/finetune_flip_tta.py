"""Does mirroring the cached maps give a fine-tuned top a free test-time view? Out of fold only.

A ``finetune`` run's top block sees the float16 maps entering it, cached once per photo. A
horizontal flip of the photo would need another bottom pass (another maps cache, as costly as the
first); mirroring the cached maps along their width costs nothing, and equals the maps of the
mirrored photo only as far as the bottom's kernels are mirror-symmetric. This script measures
whether that approximate view helps: it takes a finished k-fold ``finetune`` run, rebuilds its
folds, has each fold's top (``head.keras``, ``head-foldK.keras``) predict its own validation rows
from their maps and from the mirrored maps, and prints the out-of-fold log loss of the plain
predictions, the mirrored ones, and their means (of probabilities, of logits). No test photo is
read. Before anything is averaged it checks that the plain predictions are the run's recorded
``val_predictions.csv`` (so the folds and the maps are the run's own).

Usage::

    python bench/finetune_flip_tta.py RUN_DIR [--json]

``RUN_DIR`` is ``OUTPUT/runs/<backbone>__finetune`` of an experiment run with ``validation:
{kfold: K}`` (its ``experiment.json`` two folders up names the data, the cache and the seed).
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

import numpy as np  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)

    import keras
    import pandas as pd
    from sklearn.model_selection import StratifiedKFold

    from catsdogs.evaluation.metrics import log_loss, logit, sigmoid
    from catsdogs.features.maps import cache_maps
    from catsdogs.runs.record import fold_head_file

    run = args.run_dir
    record = json.loads((run / "record.json").read_text())
    experiment = json.loads((run.parent.parent / "experiment.json").read_text())
    if record["head"]["name"] != "finetune" or record["validation"]["kind"] != "kfold":
        sys.exit(f"{run}: not a k-fold finetune run")
    params = record["params"]
    (backbone,) = [b for b in experiment["backbones"] if b["name"] == params["backbone"]]
    val = pd.read_csv(run / "val_predictions.csv")
    files, y = list(val.file), val.label.to_numpy()
    maps = cache_maps(experiment["data"], params["backbone"], weights=params["weights"],
                      image_size=params["image_size"], resize=backbone["resize"],
                      cache_dir=experiment["cache_dir"], runtime=backbone["maps_runtime"],
                      order={"train": files, "test": []})
    if maps.computed or maps.train.files != files:
        sys.exit(f"{run}: the run's maps are not all in its cache")
    X, shape = maps.train.X, tuple(maps.config.shape)

    def mirrored(rows: np.ndarray) -> np.ndarray:
        return rows.reshape((len(rows),) + shape)[:, :, ::-1, :].reshape(len(rows), -1)

    folds = int(record["validation"]["folds"])
    plain, mirror = np.zeros(len(y)), np.zeros(len(y))
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=experiment["seed"])
    for fold, (_, va) in enumerate(splitter.split(np.zeros(len(y)), y)):
        top = keras.models.load_model(run / fold_head_file(fold), compile=False)
        plain[va] = top.predict(X[va], batch_size=256, verbose=0).reshape(-1)
        mirror[va] = top.predict(mirrored(X[va]), batch_size=256, verbose=0).reshape(-1)
    recorded = val.p_dog.to_numpy()
    off = float(np.abs(plain - recorded).max())
    if off > 1e-5:
        sys.exit(f"{run}: the folds' tops do not give the recorded predictions (max |diff| {off})")
    out = {"run": str(run), "rows": len(y), "folds": folds, "max_diff_to_recorded": off,
           "oof_logloss": {"plain": log_loss(y, plain), "mirrored_maps": log_loss(y, mirror),
                           "mean_of_probabilities": log_loss(y, (plain + mirror) / 2),
                           "mean_of_logits": log_loss(y, sigmoid((logit(plain) + logit(mirror)) / 2))}}
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out["oof_logloss"].items():
            print(f"{k:>22}: {v:.6f}")
    return out


if __name__ == "__main__":
    main()
