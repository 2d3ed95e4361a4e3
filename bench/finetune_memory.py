"""Memory of one ``finetune`` fit, as a ratio to the float16 maps it is trained on.

The maps of a backbone (``cache_maps``: computed once per photo, cached) are loaded in this process,
then :class:`catsdogs.builtin.finetune.FineTuneHead` is fitted on ``--rows`` of them (``--epochs``
per stage; its early stopping on an inner 20 %). Reported: the maps' size, the process's peak
resident memory before and after the fit, and ``growth / maps`` -- what a fit costs on top of the
maps the runner already holds. The head reads its rows batch by batch from the one array, so the
ratio is well below 1; given whole arrays, Keras copied them (in float32), about 6.5x.

Usage::

    python bench/finetune_memory.py [--data DIR] [--cache-dir DIR] [--backbone efficientnet_lite2]
        [--image-size 390] [--rows 16000] [--epochs 1] [--json]

``--data`` defaults to ``bench/quality.py``'s split (seed 2019) when it exists, else the shared
mini set; the maps are computed there first when they are not cached yet.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
QUALITY_SPLIT = Path("~/.cache/catsdogs-bench/split-s2019-19998-5000").expanduser()
QUALITY_CACHE = Path("~/.cache/catsdogs-bench/cache").expanduser()
MINI = HERE.parent.parent / "shared" / "data" / "dogs-vs-cats-mini"


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=QUALITY_SPLIT if QUALITY_SPLIT.is_dir() else MINI)
    ap.add_argument("--cache-dir", type=Path, default=QUALITY_CACHE)
    ap.add_argument("--backbone", default="efficientnet_lite2")
    ap.add_argument("--image-size", type=int, default=390)
    ap.add_argument("--rows", type=int, default=16000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--seed", type=int, default=2019)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from catsdogs.builtin.finetune import FineTuneHead
    from catsdogs.features.maps import cache_maps

    t0 = time.process_time()
    maps = cache_maps(args.data, args.backbone, weights="imagenet", image_size=args.image_size,
                      cache_dir=args.cache_dir, progress=not args.json)
    # a seeded sample of the rows (in the cache's order the classes come one after the other)
    rows = np.sort(np.random.default_rng(args.seed).permutation(len(maps.train.y))[:args.rows])
    X, y = maps.train.X[rows], maps.train.y[rows]
    del maps
    maps_cpu = time.process_time() - t0
    before = peak_gb()
    t1, c1 = time.perf_counter(), time.process_time()
    FineTuneHead(backbone=args.backbone, weights="imagenet", image_size=args.image_size).fit(
        X, y, epochs=args.epochs, batch_size=32, seed=args.seed)
    after = peak_gb()
    out = {"backbone": args.backbone, "image_size": args.image_size, "rows": int(len(X)),
           "maps_gb": X.nbytes / 1e9, "peak_before_fit_gb": before, "peak_after_fit_gb": after,
           "growth_over_maps": (after - before) / (X.nbytes / 1e9),
           "fit_wall_s": time.perf_counter() - t1, "fit_cpu_s": time.process_time() - c1,
           "maps_cpu_s": maps_cpu}
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:>20}: {v:.3f}" if isinstance(v, float) else f"{k:>20}: {v}")


if __name__ == "__main__":
    main()
