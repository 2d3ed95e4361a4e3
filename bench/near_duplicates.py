"""Measure: could a nearest-neighbour lever lower the loss? Near-duplicates among training photos.

A photo whose near-copy is in the training rows could take that copy's label (a k-NN term, or a
stacked nearest-neighbour run). Whether that can pay is measured on the **training rows only**
(no test photo is looked at): RUN_DIR is a finished run (k-fold: its ``val_predictions.csv`` is
out of fold on every training row). Its features are rebuilt from the cache as the run was
trained on them (:func:`catsdogs.runs.features.rebuild_run_features`); each backbone's block is
centred and L2-normalised, the blocks weighted equally, and every training photo's nearest
other training photo found by cosine similarity. Printed per similarity threshold: how many
photos have a neighbour that close, how often its label agrees, and what share of the run's
out-of-fold log loss (its post-processed P(dog), at the float32 bound) those photos carry; and,
for the run's worst photos, how close their nearest neighbour is and whether its label agrees.

Usage::

    python bench/near_duplicates.py RUN_DIR [--thresholds 0.99,0.95,0.9,0.8] [--worst 40] [--json]
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


def nearest_neighbours(X, blocks, chunk: int = 2000):
    """Index and cosine similarity of each row's nearest other row: each ``(name, width)`` block
    of ``X`` centred and L2-normalised, the blocks weighted equally."""
    import numpy as np

    parts, start = [], 0
    for _name, width in blocks:
        block = np.asarray(X[:, start:start + width], np.float32)
        block = block - block.mean(axis=0)
        block /= np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12)
        parts.append(block)
        start += width
    Z = np.hstack(parts) / np.sqrt(len(parts))
    index = np.zeros(len(Z), np.int64)
    similarity = np.zeros(len(Z), np.float64)
    for i in range(0, len(Z), chunk):
        S = Z[i:i + chunk] @ Z.T
        S[np.arange(len(S)), np.arange(i, i + len(S))] = -np.inf  # not itself
        index[i:i + chunk] = S.argmax(axis=1)
        similarity[i:i + chunk] = S.max(axis=1)
    return index, similarity


def main(argv=None) -> int:
    import numpy as np
    import pandas as pd

    from catsdogs.evaluation.metrics import row_log_losses
    from catsdogs.runs.features import rebuild_run_features
    from catsdogs.runs.record import RunRecord

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a finished run folder (<out>/runs/<run id>)")
    parser.add_argument("--thresholds", default="0.99,0.95,0.9,0.8")
    parser.add_argument("--worst", type=int, default=40, help="the run's K worst training photos")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    record = RunRecord.load(args.run_dir)
    experiment = json.loads((args.run_dir.parent.parent / "experiment.json").read_text())
    train = rebuild_run_features(record, experiment).train
    val = pd.read_csv(args.run_dir / "val_predictions.csv").set_index("file")
    files = [str(f) for f in train.files]
    missing = sorted(set(files) - set(val.index))
    if missing or len(val) != len(files):
        print(f"{args.run_dir}: val_predictions.csv does not cover the {len(files)} training rows "
              f"once each (a holdout run covers only its validation rows; use a k-fold run)",
              file=sys.stderr)
        return 2
    y = np.asarray(train.y, np.int64)
    p = val.loc[files, "p_dog_post"].to_numpy(np.float64)
    loss = row_log_losses(y, p)
    index, similarity = nearest_neighbours(train.X, train.blocks)
    agree = y[index] == y

    rows = []
    for t in (float(v) for v in args.thresholds.split(",")):
        near = similarity >= t
        rows.append({"threshold": t, "photos": int(near.sum()),
                     "neighbour_label_agrees": int(agree[near].sum()),
                     "loss_share": float(loss[near].sum() / loss.sum()),
                     "loss_share_disagreeing": float(loss[near & ~agree].sum() / loss.sum())})
    worst = np.argsort(-loss)[:args.worst]
    out = {"run": str(args.run_dir), "n_train": len(y), "oof_log_loss": float(loss.mean()),
           "thresholds": rows,
           "worst": {"k": len(worst), "loss_share": float(loss[worst].sum() / loss.sum()),
                     "median_similarity": float(np.median(similarity[worst])),
                     "max_similarity": float(similarity[worst].max()),
                     "neighbour_label_agrees": int(agree[worst].sum()),
                     "median_similarity_all": float(np.median(similarity))}}
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print(f"{out['run']}: {len(y)} training photos, out-of-fold log loss {out['oof_log_loss']:.5f}")
    print("cosine >= | photos | neighbour's label agrees | share of the loss | of which disagreeing")
    for r in rows:
        print(f"{r['threshold']:9.2f} | {r['photos']:6d} | {r['neighbour_label_agrees']:6d} | "
              f"{r['loss_share']:.4f} | {r['loss_share_disagreeing']:.4f}")
    w = out["worst"]
    print(f"the {w['k']} worst photos ({w['loss_share']:.1%} of the loss): nearest neighbour's "
          f"cosine median {w['median_similarity']:.3f} (all photos {w['median_similarity_all']:.3f}), "
          f"max {w['max_similarity']:.3f}; its label agrees for {w['neighbour_label_agrees']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
