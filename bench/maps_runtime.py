"""The maps' bottom pass by TensorFlow (what ``cache_maps`` runs) against the same bottom run by
OpenVINO in float32: CPU seconds per photo, as a ratio measured in one process, and how far apart
the float16 maps the two give are.

Why: ``best.yaml`` caches the float32 maps entering each fine-tuned backbone's last block with
TensorFlow (:class:`catsdogs.features.maps.MapsModel`), beside the float32 GAP features it already
computes with OpenVINO (``runtime: openvino``). On 24,977 photos those three bottom passes took
about 44 min wall of the whole pipeline from an empty cache (2026-12-07): more than OpenVINO's
float32 extraction of the whole networks.

The two arms run on the same decoded photos, alternately (TF, OV, OV, TF, TF, OV for three
rounds), so a machine busy with other work slows both alike; each arm's process CPU time
(``time.process_time``: every thread of this process) is summed over the rounds. Both arms are
:class:`catsdogs.features.maps.MapsModel`, as ``maps_runtime`` runs it: the OpenVINO arm runs
the bottom through :class:`catsdogs.features.int8.Float32FeatureModel` (what ``runtime:
openvino``'s float32 features run on), cast to float16 as the cache stores maps.

Usage::

    python bench/maps_runtime.py [--backbone efficientnet_lite2] [--image-size 390]
        [--blocks 1] [--photos DIR] [--n 192] [--rounds 3] [--json]

``--photos`` is a folder of JPEGs searched recursively (default: the PetImages photos of
``bench/quality.py`` when they are at ``/work/data/PetImages``, else the shared mini set's
``train``); the first ``--n`` are used (unreadable ones left out), half from each of the first two sub-folders
when there are two (``Cat``, ``Dog``).
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

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_PHOTOS = (Path("/work/data/PetImages"),
                  HERE.parent.parent / "shared" / "data" / "dogs-vs-cats-mini" / "train")


def _photos(root: Path, n: int, size: int) -> np.ndarray:
    """The first ``n`` photos under ``root`` (half from each of its first two folders when it has
    two), decoded and resized as extraction does; unreadable ones are left out."""
    from catsdogs.features.int8 import decode_calibration

    folders = sorted(p for p in root.iterdir() if p.is_dir())
    pools = [sorted(f.rglob("*.jpg")) for f in folders[:2]] if len(folders) >= 2 else \
        [sorted(root.rglob("*.jpg"))]
    images = decode_calibration([p for pool in pools for p in pool[:n // len(pools)]], size,
                                "squash")
    if not len(images):
        sys.exit(f"no readable JPEG under {root}: pass --photos DIR")
    return images


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="efficientnet_lite2")
    parser.add_argument("--image-size", type=int, default=390)
    parser.add_argument("--blocks", type=int, default=1)
    parser.add_argument("--photos", type=Path, default=None)
    parser.add_argument("--n", type=int, default=192)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    from catsdogs.features.maps import MapsModel
    from catsdogs.plugins import Registry

    root = args.photos or next((p for p in DEFAULT_PHOTOS if p.is_dir()), None)
    if root is None:
        sys.exit("no photos found: pass --photos DIR")
    x = _photos(root, args.n, args.image_size)
    backbone = Registry().load().backbone(args.backbone)
    arms = {runtime: MapsModel(backbone, "imagenet", args.image_size, args.blocks,
                               args.batch_size, runtime)
            for runtime in ("tensorflow", "openvino")}  # what maps_runtime runs
    step = args.batch_size
    for call in arms.values():  # compile and warm up outside the timing
        call(x[:step])
    cpu = dict.fromkeys(arms, 0.0)
    maps: dict[str, np.ndarray] = {}
    for r in range(args.rounds):
        order = list(arms) if r % 2 == 0 else list(arms)[::-1]
        for arm in order:
            c0 = time.process_time()
            maps[arm] = arms[arm](x)
            cpu[arm] += time.process_time() - c0
    a, b = (maps[k].astype(np.float32) for k in arms)
    diff = np.abs(a - b)
    n = args.rounds * len(x)
    result = {
        "backbone": args.backbone, "image_size": args.image_size, "blocks": args.blocks,
        "photos": int(len(x)), "rounds": args.rounds,
        "cpu_s_per_photo": {k: v / n for k, v in cpu.items()},
        "tensorflow_over_openvino": cpu["tensorflow"] / cpu["openvino"],
        "maps_max_abs_diff": float(diff.max()), "maps_mean_abs_diff": float(diff.mean()),
        "maps_mean_abs": float(np.abs(a).mean()),
        "float16_values_equal": float(np.mean(maps["tensorflow"] == maps["openvino"])),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        per = result["cpu_s_per_photo"]
        print(f"{args.backbone} at {args.image_size} px, {len(x)} photos x {args.rounds} rounds: "
              f"CPU s per photo TensorFlow {per['tensorflow']:.4f}, OpenVINO {per['openvino']:.4f} "
              f"({result['tensorflow_over_openvino']:.2f}x); maps max |diff| "
              f"{result['maps_max_abs_diff']:.3g}, mean {result['maps_mean_abs_diff']:.3g} (mean "
              f"|map| {result['maps_mean_abs']:.3g}), float16 values equal "
              f"{result['float16_values_equal']:.3f}")
    return result


if __name__ == "__main__":
    main()
