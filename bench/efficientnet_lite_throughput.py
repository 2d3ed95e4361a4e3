"""Benchmark: `catsdogs extract` throughput of EfficientNet-Lite0/1/2 vs the PyTorch reference.

For each variant, in ONE process and on the same images:

* extract:   images/s of `catsdogs.extract` (read + decode + resize in threads, Keras model, chunk
             writes; fresh cache), counted over its compute loop, plus the call's total wall time;
* reference: images/s of the PyTorch reference implementation (`efficientnet-lite-pytorch`, same
             ImageNet weights) computing the same GAP features (`extract_features` + mean) on the
             already decoded and resized images, batch 32, torch using all CPU threads;
* ratio:     extract / reference (decoding is included on our side only).

Needs the plugin and its `reference` extra (`pip install -e 'plugins/catsdogs-efficientnet-lite[reference]'`).

Usage::

    python bench/efficientnet_lite_throughput.py [--data ../shared/data/dogs-vs-cats-mini] [--limit 500]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
from catsdogs.util.tf_log import quiet_tensorflow_import  # noqa: E402

quiet_tensorflow_import()  # its absl start-up lines held to that level too (as the CLI does)

import numpy as np  # noqa: E402

import catsdogs  # noqa: E402
from catsdogs.dataset.images import load_image  # noqa: E402
from catsdogs.dataset.layout import open_dataset  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "dogs-vs-cats-mini"
VARIANTS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def reference_throughput(name: str, paths: list[Path], batch_size: int) -> float:
    import torch
    from catsdogs_efficientnet_lite import get_backbone
    from catsdogs_efficientnet_lite.weights import checkpoint_path
    from efficientnet_lite_pytorch import EfficientNet

    torch.set_num_threads(os.cpu_count() or 1)
    backbone = get_backbone(name)
    model = EfficientNet.from_pretrained(backbone.variant.reference_name,
                                         weights_path=str(checkpoint_path(name))).eval()
    size = backbone.input_size
    pixels = np.stack([load_image(p, size) for p in paths]).astype(np.float32)
    x_all = torch.from_numpy(np.ascontiguousarray(((pixels - 127.0) / 128.0).transpose(0, 3, 1, 2)))
    with torch.no_grad():
        model.extract_features(x_all[:batch_size]).mean(dim=(2, 3))  # warm-up
        start = time.perf_counter()
        for i in range(0, len(x_all), batch_size):
            model.extract_features(x_all[i:i + batch_size]).mean(dim=(2, 3)).numpy()
        return len(x_all) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--limit", type=int, default=500, help="train images used")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="catsdogs-bench-effl-"))
    try:
        records = open_dataset(args.data).train[: args.limit]
        (work / "data" / "train").mkdir(parents=True)
        for rec in records:
            (work / "data" / "train" / rec.path.name).symlink_to(rec.path)
        paths = [r.path for r in records]
        print(f"{len(paths)} images from {args.data}, batch {args.batch_size}, {os.cpu_count()} CPUs")
        for name in VARIANTS:
            (res,) = catsdogs.extract(work / "data", [name], weights="imagenet", batch_size=args.batch_size,
                                      cache_dir=work / "cache", progress=False)
            ref = reference_throughput(name, paths, args.batch_size)
            ours = res.images_per_second
            print(f"{name:20s} ({res.config.image_size} px): catsdogs extract {ours:7.1f} images/s "
                  f"(call total {res.seconds:5.1f}s) | PyTorch reference {ref:7.1f} images/s | "
                  f"ratio {ours / ref:5.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
