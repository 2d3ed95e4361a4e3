"""Memory of one ``finetune`` fit, as a ratio to the float16 maps it is trained on.

The maps of a backbone (``cache_maps``: computed once per photo, cached) are loaded in this process,
then :class:`catsdogs.builtin.finetune.FineTuneHead` is fitted on ``--rows`` of them (``--epochs``
per stage; its early stopping on an inner 20 %). Reported: the maps' size, the process's peak
resident memory before and after the fit, and ``growth / maps`` -- what a fit costs on top of the
maps the runner already holds. The head reads its rows batch by batch from the one array, so the
ratio is well below 1; given whole arrays, Keras copied them (in float32), about 6.5x.

``--fits K`` (K >= 2) measures what a k-fold run's folds leave behind: K fits in a row, each on a
fresh copy of its rows (as the runner gives each fold ``train.X[fold rows]``), dropped afterwards;
after each one the resident memory (not the peak) is read. Reported: ``retained_per_fit_over_maps``,
the growth from the first fit's end to the last's per fit, as a ratio to one fit's maps; and the
same measured in the same process with the head's release of its batch sources switched off
(``_rows_released``, the baseline: TensorFlow's default graph then keeps every fit's rows, about
1x). Run with the release on first, since the baseline's memory is never given back.

Usage::

    python bench/finetune_memory.py [--data DIR] [--cache-dir DIR] [--backbone efficientnet_lite2]
        [--image-size 390] [--rows 16000] [--epochs 1] [--fits 1] [--json]

``--data`` defaults to ``bench/quality.py``'s split (seed 2019) when it exists, else the shared
mini set; the maps are computed there first when they are not cached yet.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
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


def resident_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 1e9


def retained_per_fit(fit, X: np.ndarray, fits: int, release: bool) -> tuple[float, list[float]]:
    """Fit ``fits`` times on fresh copies of ``X`` (dropped after each fit); the resident memory
    after each, and the growth per fit after the first as a ratio to ``X``'s size."""
    from catsdogs.builtin import finetune

    real = finetune._rows_released
    if not release:  # the baseline: what every fit kept before the release
        finetune._rows_released = contextlib.nullcontext  # type: ignore[assignment]
    try:
        after = []
        for _ in range(fits):
            fit(X.copy())
            gc.collect()
            after.append(resident_gb())
    finally:
        finetune._rows_released = real
    return (after[-1] - after[0]) / (fits - 1) / (X.nbytes / 1e9), after


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=QUALITY_SPLIT if QUALITY_SPLIT.is_dir() else MINI)
    ap.add_argument("--cache-dir", type=Path, default=QUALITY_CACHE)
    ap.add_argument("--backbone", default="efficientnet_lite2")
    ap.add_argument("--image-size", type=int, default=390)
    ap.add_argument("--rows", type=int, default=16000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--seed", type=int, default=2019)
    ap.add_argument("--fits", type=int, default=1,
                    help="K >= 2: K fits in a row, and what each leaves behind (see above)")
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
    if args.fits >= 2:
        def fit(rows: np.ndarray) -> None:
            FineTuneHead(backbone=args.backbone, weights="imagenet", image_size=args.image_size
                         ).fit(rows, y, epochs=args.epochs, batch_size=32, seed=args.seed)

        for release, suffix in ((True, ""), (False, "_without_release")):
            ratio, after = retained_per_fit(fit, X, args.fits, release)
            out["retained_per_fit_over_maps" + suffix] = ratio
            out["resident_after_each_fit_gb" + suffix] = after
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            shown = [round(x, 3) for x in v] if isinstance(v, list) else v
            print(f"{k:>20}: {v:.3f}" if isinstance(v, float) else f"{k:>20}: {shown}")


if __name__ == "__main__":
    main()
