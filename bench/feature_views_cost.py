"""Benchmark: the network cost of feature views (issue 24 lever 1) against plain features.

In ONE process, alternated ``--repeats`` times, the CPU seconds (process time) of computing the
features of the same in-memory uint8 batch with:

* plain:  the backbone's feature model (:class:`catsdogs.features.extraction.FeatureModel`);
* layers: the same with ``layers`` (pooled earlier outputs appended, one forward pass);
* views:  ``views: [orig, flip]`` merged by mean (:class:`~catsdogs.features.extraction.MergedViews`),
          i.e. two forward passes per photo;
* crops:  ``views: [orig, center, top_left, top_right, bottom_left, bottom_right]`` merged by mean
          (``crop_fraction``, default 0.875): six forward passes per photo plus the five crops
          and resizes (:func:`catsdogs.features.views.crop_images`).

Printed as medians and ratios to plain. Decoding is not included (one decode per photo in every
case). Weights ``none`` cost what ImageNet weights cost; the machine's load moves the absolute
numbers, not much the ratios.

Usage::

    python bench/feature_views_cost.py [--backbone efficientnet_lite0] [--layers stage5,stage6,stage7]
                                       [--images 96] [--batch-size 32] [--repeats 3]
                                       [--crop-fraction 0.875]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
from catsdogs.util.tf_log import quiet_tensorflow_import  # noqa: E402

quiet_tensorflow_import()  # its absl start-up lines held to that level too (as the CLI does)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--layers", default="stage5,stage6,stage7")
    ap.add_argument("--weights", default="none")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--crop-fraction", type=float, default=None)
    args = ap.parse_args()

    import numpy as np

    from catsdogs.components import CROP_REGIONS, DEFAULT_CROP_FRACTION
    from catsdogs.features.extraction import FeatureModel, MergedViews
    from catsdogs.plugins import get_registry

    backbone = get_registry().backbone(args.backbone)
    size = args.image_size or backbone.input_size
    layers = [name for name in args.layers.split(",") if name]
    images = np.random.default_rng(0).integers(0, 256, (args.images, size, size, 3), dtype=np.uint8)
    plain = FeatureModel(backbone, args.weights, size, "float32", args.batch_size)
    models = {
        "plain": plain,
        f"layers {','.join(layers)}": FeatureModel(backbone, args.weights, size, "float32",
                                                  args.batch_size, layers),
        "views orig+flip (mean)": MergedViews(plain, ("orig", "flip"), "mean"),
        "views orig+5 crops (mean)": MergedViews(plain, ("orig", *CROP_REGIONS), "mean",
                                                 args.crop_fraction or DEFAULT_CROP_FRACTION),
    }
    dims = {name: model(images[: args.batch_size]).shape[1] for name, model in models.items()}  # traced
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            start = time.process_time()
            model(images)
            seconds[name].append(time.process_time() - start)
    base = float(np.median(seconds["plain"]))
    print(f"{args.backbone} at {size} px, {args.images} images, batch {args.batch_size}, "
          f"median of {args.repeats} alternated repeats (CPU seconds, process time); "
          f"load average {os.getloadavg()[0]:.1f}")
    for name, values in seconds.items():
        median = float(np.median(values))
        print(f"  {name:32s} {median:7.2f} s  {median / base:5.2f}x plain  ({dims[name]} features)")


if __name__ == "__main__":
    main()
