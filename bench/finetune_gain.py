"""Issue 24 lever 4: does fine-tuning a backbone's top block(s) on cached maps pay?

On a Kaggle-layout data set with labelled test photos (default: the shared mini set, 1,000 train
/ 300 test), in one process:

1. one forward pass per photo through the backbone's bottom (``split_top``; real ImageNet weights
   for EfficientNet-Lite): the maps entering the last ``--blocks`` block(s), kept in float16 as
   the cache keeps them, and the frozen top's GAP features (the extraction's features, to float32
   round-off);
2. baseline: ``dropout_sigmoid`` (adam, ``--epochs`` at ``--batch-size``) on the GAP features of
   all training photos;
3. lever 4: the ``finetune`` head on the maps of the same photos (its early stopping on an inner
   20 % of them), and ``finetune_frozen``, the same head whose stage 2 cannot move (learning
   rate 1e-12): its early-stopped unit on the frozen features, to tell what fine-tuning adds
   from what early stopping adds;
4. test log loss of both (clipped as the demo clips, 0.005/0.995, and ``bounded``: at the float32
   bound ``PROB_EPS`` that the runner's post-processing, the submission and the export apply
   to every probability, so a saturated mistake costs 16.6 nats, not 34.5), the paired bootstrap
   standard error of the difference over the test photos, and the CPU seconds (process time) of
   each step, per photo and extrapolated to ``--extrapolate`` training photos.

Usage::

    python bench/finetune_gain.py [--data DIR] [--backbone efficientnet_lite0] [--blocks 1]
        [--epochs 30] [--batch-size 32] [--lr 1e-4] [--seeds 2019,2020] [--limit N]
        [--maps-cache DIR] [--no-frozen] [--save-predictions DIR] [--json]

``--maps-cache`` keeps step 1's arrays, so further seeds cost only the fits; the predictions
saved by ``--save-predictions`` are submissions that ``bench/quality.py --baseline-predictions``
and a paired comparison with any benchmark run can read.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

DEFAULT_DATA = Path("/work/shared/data/dogs-vs-cats-mini")


def _load_pixels(records, size: int) -> np.ndarray:
    from catsdogs.dataset.images import decode_rgb, read_image_file, resize

    return np.stack([resize(decode_rgb(read_image_file(r.path)), size, "squash") for r in records])


def _bootstrap_diff(a: np.ndarray, b: np.ndarray, n: int = 2000, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), (n, len(a)))
    return float((a[idx].mean(1) - b[idx].mean(1)).std(ddof=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--weights", default="imagenet")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--blocks", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seeds", default="2019", help="comma-separated seeds of the heads' fits")
    ap.add_argument("--limit", type=int, default=None, help="use N train photos (a seeded sample)")
    ap.add_argument("--extrapolate", type=int, default=20000)
    ap.add_argument("--maps-cache", type=Path, default=None,
                    help="keep the forward pass's maps and GAP features in this folder (.npy) and "
                         "reuse them on a rerun with the same data, backbone, size and blocks")
    ap.add_argument("--no-frozen", action="store_true",
                    help="skip finetune_frozen (it costs as much as finetune's second stage)")
    ap.add_argument("--save-predictions", type=Path, default=None,
                    help="write each model's test predictions to DIR/<model>-s<seed>.csv (id,label: "
                         "a submission, for bench/quality.py --baseline-predictions)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import pandas as pd

    from catsdogs.builtin.finetune import FineTuneHead
    from catsdogs.builtin.heads import DropoutSigmoidHead
    from catsdogs.builtin.optimizers import AdamOptimizer
    from catsdogs.dataset.layout import open_dataset
    from catsdogs.evaluation.metrics import PROB_EPS, row_log_losses
    from catsdogs.plugins import get_registry
    from catsdogs.util.fileio import atomic_write

    backbone = get_registry().backbone(args.backbone)
    size = args.image_size or backbone.input_size
    ds = open_dataset(args.data)
    train = ds.train
    if args.limit:  # a seeded sample (the listing is sorted by class)
        keep = np.random.default_rng(2019).permutation(len(train))[: args.limit]
        train = [train[i] for i in sorted(keep)]
    labels = pd.read_csv(args.data / "test_labels.csv").set_index("id")["label"]
    test = [r for r in ds.test if r.id in labels.index]
    y_train = np.array([r.label for r in train], np.float32)
    y_test = labels.loc[[r.id for r in test]].to_numpy(np.float64)

    cpu: dict[str, float] = {}
    t = time.process_time()
    bottom, top = backbone.split_top(args.weights, size, blocks=args.blocks)
    cpu["build"] = time.process_time() - t

    def forward(records):
        maps, gap = [], []
        for start in range(0, len(records), 64):
            px = _load_pixels(records[start:start + 64], size).astype(np.float32)
            # predict (a compiled graph, batches of 16), not an eager call: an eager functional
            # call keeps every layer's activations of the whole chunk (17.6 GB for 64 photos
            # through Lite1 at 360 px)
            m = bottom.predict(px, batch_size=16, verbose=0)
            maps.append(m.reshape(len(m), -1).astype(np.float16))
            gap.append(top.predict(m, batch_size=16, verbose=0))
        return np.concatenate(maps), np.concatenate(gap)

    t = time.process_time()
    cache = None
    if args.maps_cache:
        key = f"{args.data.resolve().name}-{args.backbone}-{args.weights}-s{size}-b{args.blocks}-n{len(train)}"
        cache = args.maps_cache / key
    names = ("maps_train", "gap_train", "maps_test", "gap_test")
    # cpu.json is written last: its presence means every array before it is complete
    if cache is not None and (cache / "cpu.json").exists():
        maps_train, gap_train, maps_test, gap_test = (np.load(cache / f"{n}.npy") for n in names)
        cpu["forward (maps + GAP)"] = json.loads((cache / "cpu.json").read_text())["forward"]
    else:
        maps_train, gap_train = forward(train)
        maps_test, gap_test = forward(test)
        cpu["forward (maps + GAP)"] = time.process_time() - t
        if cache is not None:
            cache.mkdir(parents=True, exist_ok=True)
            for n, a in zip(names, (maps_train, gap_train, maps_test, gap_test)):
                atomic_write(cache / f"{n}.npy", lambda fh, a=a: np.save(fh, a))
            forward_s = json.dumps({"forward": cpu["forward (maps + GAP)"]}).encode()
            atomic_write(cache / "cpu.json", lambda fh: fh.write(forward_s))
    n_photos = len(train) + len(test)

    result: dict = {"data": str(args.data), "backbone": args.backbone, "weights": args.weights,
                    "image_size": size, "blocks": args.blocks, "train": len(train), "test": len(test),
                    "maps_shape": list(top.input.shape[1:]), "epochs_max": args.epochs,
                    "lr": args.lr, "cores": os.cpu_count(), "seeds": {}}
    fit_rows = len(train)
    for seed in [int(s) for s in args.seeds.split(",")]:
        preds, cpu_s, stopped = {}, {}, {}
        t = time.process_time()
        base = DropoutSigmoidHead().fit(gap_train, y_train, optimizer=AdamOptimizer(),
                                        epochs=args.epochs, batch_size=args.batch_size, seed=seed)
        preds["dropout_sigmoid"] = base.predict_proba(gap_test)
        cpu_s["dropout_sigmoid"] = time.process_time() - t
        # finetune_frozen: the same head with a learning rate that moves nothing in stage 2,
        # i.e. its early-stopped unit on the frozen features (what fine-tuning adds is the rest)
        variants = [("finetune", args.lr)] + ([] if args.no_frozen else [("finetune_frozen", 1e-12)])
        for name, lr in variants:
            t = time.process_time()
            head = FineTuneHead(backbone=args.backbone, weights=args.weights, image_size=size,
                                top_blocks=args.blocks, learning_rate=lr)
            head.fit(maps_train, y_train, optimizer=AdamOptimizer(), epochs=args.epochs,
                     batch_size=args.batch_size, seed=seed)
            preds[name] = head.predict_proba(maps_test)
            cpu_s[name] = time.process_time() - t
            stopped[name] = head.stopped_epochs_
        out: dict = {"cpu_s": cpu_s, "stopped_epochs": stopped}
        if args.save_predictions:
            args.save_predictions.mkdir(parents=True, exist_ok=True)
            ids = [r.id for r in test]
            for name, p in preds.items():
                pd.DataFrame({"id": ids, "label": p}).to_csv(
                    args.save_predictions / f"{name}-s{seed}.csv", index=False)
        for label, eps in (("bounded", PROB_EPS), ("clip 0.005", 0.005)):
            losses = {k: row_log_losses(y_test, p, eps) for k, p in preds.items()}
            out[label] = {k: float(v.mean()) for k, v in losses.items()}
            for other in [k for k in ("dropout_sigmoid", "finetune_frozen") if k in losses]:
                diff = losses["finetune"] - losses[other]
                out[label][f"finetune - {other}"] = float(diff.mean())
                out[label][f"paired_se vs {other}"] = _bootstrap_diff(losses["finetune"], losses[other])
        result["seeds"][seed] = out
    cpu_ft = float(np.mean([o["cpu_s"]["finetune"] for o in result["seeds"].values()]))
    cpu_ds = float(np.mean([o["cpu_s"]["dropout_sigmoid"] for o in result["seeds"].values()]))
    result["cpu_s"] = cpu
    result["load_avg"] = os.getloadavg()
    result["extrapolated_cpu_s"] = {
        "forward per photo": cpu["forward (maps + GAP)"] / n_photos,
        f"finetune fit on {args.extrapolate}": cpu_ft * args.extrapolate / fit_rows,
        f"dropout_sigmoid fit on {args.extrapolate}": cpu_ds * args.extrapolate / fit_rows,
        "maps float16 MB per 1000 photos": maps_train[:1].nbytes * 1000 / 1e6,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")


if __name__ == "__main__":
    main()
