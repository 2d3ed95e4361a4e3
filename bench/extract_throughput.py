"""Benchmark: `catsdogs extract` throughput vs the backbone's direct-call compute alone.

Measures in ONE process, for float32 and bfloat16:

* direct:  images/s of the compiled feature model called on an in-memory uint8 batch (the ceiling);
* extract: images/s of the full pipeline (read + decode + resize in threads, model, chunk writes),
           counted over the compute loop, plus the call's total wall time (model build, hashing and
           the final HDF5 write included);
* ratio:   extract / direct (the target is >= 0.90);
* decode:  images/s of read + decode + resize alone (2 threads), to show it is off the critical path;
* cached:  wall time of a second, identical extract call (zero forward passes);
* the max abs and cosine differences between float32 and bfloat16 features.

Usage::

    python bench/extract_throughput.py [--data ../shared/data/dogs-vs-cats-mini] [--backbone resnet50]
                                       [--weights none] [--limit 1000] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
from catsdogs.util.tf_log import quiet_tensorflow_import  # noqa: E402

quiet_tensorflow_import()  # its absl start-up lines held to that level too (as the CLI does)

import numpy as np  # noqa: E402

import catsdogs  # noqa: E402
from catsdogs.dataset.images import load_image  # noqa: E402
from catsdogs.dataset.layout import open_dataset  # noqa: E402
from catsdogs.features.extraction import FeatureModel  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "dogs-vs-cats-mini"


def direct_throughput(model: FeatureModel, size: int, seconds: float) -> float:
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (model.batch_size, size, size, 3), dtype=np.uint8)
    model(batch)  # warm up (trace + first run)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        model(batch)
        n += model.batch_size
    return n / (time.perf_counter() - start)


def decode_throughput(paths: list[Path], size: int, workers: int = 2) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda p: load_image(p, size), paths))
    return len(paths) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--weights", default="none")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--limit", type=int, default=1000, help="train images used (0 = all)")
    ap.add_argument("--direct-seconds", type=float, default=20.0)
    args = ap.parse_args()

    backbone = catsdogs.get_registry().backbone(args.backbone)
    size = args.image_size or backbone.input_size
    work = Path(tempfile.mkdtemp(prefix="catsdogs-bench-"))
    try:
        src = open_dataset(args.data)
        records = src.train[: args.limit] if args.limit else src.train
        (work / "data" / "train").mkdir(parents=True)
        for rec in records:  # a train-only copy (symlinks) of the first N images
            (work / "data" / "train" / rec.path.name).symlink_to(rec.path)
        data = work / "data"
        paths = [r.path for r in records]
        print(f"{args.backbone} ({args.weights}) at {size}px, batch {args.batch_size}, "
              f"{len(paths)} images from {args.data}, {os.cpu_count()} CPUs")
        decode_ips = decode_throughput(paths, size)
        print(f"decode+resize alone (2 threads): {decode_ips:8.1f} images/s")

        features = {}
        for precision in ("float32", "bfloat16"):
            model = FeatureModel(backbone, args.weights, size, precision, args.batch_size)
            before = direct_throughput(model, size, args.direct_seconds / 2)
            cache = work / f"cache-{precision}"
            (res,) = catsdogs.extract(data, [args.backbone], weights=args.weights, image_size=size,
                                      batch_size=args.batch_size, cache_dir=cache,
                                      precision=precision, progress=False)
            after = direct_throughput(model, size, args.direct_seconds / 2)  # bracket the run
            direct = (before + after) / 2
            del model
            t0 = time.perf_counter()
            (again,) = catsdogs.extract(data, [args.backbone], weights=args.weights, image_size=size,
                                        batch_size=args.batch_size, cache_dir=cache,
                                        precision=precision, progress=False)
            cached_s = time.perf_counter() - t0
            assert again.computed == 0
            ips = res.images_per_second
            print(f"[{precision:8s}] direct {direct:7.1f} images/s (before {before:.1f}, after {after:.1f}) | extract {ips:7.1f} images/s "
                  f"(ratio {ips / direct:5.3f}) | extract call total {res.seconds:6.1f}s for "
                  f"{res.computed} images | model compute share {len(paths) / direct / res.compute_seconds:5.1%} "
                  f"| cached call {cached_s:5.2f}s")
            features[precision] = catsdogs.load_features(res.path).train.X
        a, b = features["float32"], features["bfloat16"]
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
        print(f"float32 vs bfloat16 features: max abs diff {np.abs(a - b).max():.4g} "
              f"(feature scale: mean |x| {np.abs(a).mean():.4g}), cosine similarity "
              f"mean {cos.mean():.6f}, min {cos.min():.6f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
