"""Benchmark: int8 calibration sample size (and bias correction) vs cost and accuracy.

One backbone (default ``efficientnet_lite0``, ImageNet weights) on the mini data set (``--data``,
with ``test_labels.csv``), in one process: float32 features of every train and test image (the
TensorFlow path), then per configuration ``SIZE:BC`` (``BC``: ``fast`` bias correction, ``full``,
or ``none``) the CPU seconds of ``nncf.quantize`` on the seeded calibration sample
(:func:`catsdogs.features.int8.calibration_sample`, batches of 32 as extraction calibrates), the
int8 features' cosine to float32 (mean / min over the training images) and the log loss of the
same ``dropout_sigmoid`` head (adadelta 1.0, 8 epochs, batch 128, seed 2019) on a held-out 20 %
of the training images and on the test set.

Usage::

    python bench/int8_calibration.py [--data ../shared/data/dogs-vs-cats-mini]
        [--backbone efficientnet_lite0] [--configs 64:fast,300:fast,128:fast,64:none,32:fast]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
from catsdogs.util.tf_log import quiet_tensorflow_import  # noqa: E402

quiet_tensorflow_import()  # its absl start-up lines held to that level too (as the CLI does)

import numpy as np  # noqa: E402

import catsdogs  # noqa: E402
from catsdogs.features import int8  # noqa: E402

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data" / "dogs-vs-cats-mini")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--configs", default="64:fast,300:fast,128:fast,64:none,32:fast")
    args = ap.parse_args()
    int8.require_engine()
    import nncf
    import openvino as ov
    import pandas as pd
    from sklearn.model_selection import train_test_split

    from catsdogs.dataset.layout import digest_all, open_dataset
    from catsdogs.runs.metrics import log_loss

    registry = catsdogs.get_registry()
    backbone = registry.backbone(args.backbone)
    size = backbone.input_size
    weights = "imagenet" if args.backbone.startswith("efficientnet_lite") else "none"
    ds = open_dataset(args.data)
    digests = digest_all(ds.records)
    train_images = int8.decode_calibration([r.path for r in ds.train], size, "squash", 2)
    test_images = int8.decode_calibration([r.path for r in ds.test], size, "squash", 2)
    y = np.array([r.label for r in ds.train])
    truth = pd.read_csv(args.data / "test_labels.csv").set_index("id")["label"]
    y_test = truth.loc[[r.id for r in ds.test]].to_numpy()
    function = int8._uint8_function(backbone.build(weights, size), size)

    def features(call, images):
        return np.concatenate([np.asarray(call(images[i:i + 32])) for i in range(0, len(images), 32)])

    tf_call = lambda x: function(x).numpy()  # noqa: E731
    base = features(tf_call, train_images), features(tf_call, test_images)
    cpu = time.process_time()
    float_model = ov.convert_model(function)
    print(f"{args.backbone} ({weights}) at {size}: conversion {time.process_time() - cpu:.1f} CPU s")
    core = ov.Core()
    fit, held = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y, random_state=2019)

    def report(label, X, X_test):
        cos = (X * base[0]).sum(1) / (np.linalg.norm(X, axis=1) * np.linalg.norm(base[0], axis=1))
        head = registry.head("dropout_sigmoid")().fit(
            X[fit], y[fit], optimizer=registry.optimizer("adadelta")(learning_rate=1.0), epochs=8,
            batch_size=128, seed=2019)
        print(f"{label:24s} cosine mean {cos.mean():.5f} min {cos.min():.5f}  log loss held-out "
              f"{log_loss(y[held], head.predict_proba(X[held])):.5f} test "
              f"{log_loss(y_test, head.predict_proba(X_test)):.5f}  load {os.getloadavg()[1]:.1f}",
              flush=True)

    report("float32", *base)
    for config in args.configs.split(","):
        n, bc = config.split(":")
        sample = int8.calibration_sample(ds.records, digests, int(n))
        images = int8.decode_calibration([r.path for r, _ in sample], size, "squash", 2)
        batches = [images[i:i + 32] for i in range(0, len(images), 32)]
        advanced = nncf.AdvancedQuantizationParameters(batchwise_statistics=True,
                                                       disable_bias_correction=bc == "none")
        wall, cpu = time.perf_counter(), time.process_time()
        quantised = nncf.quantize(float_model, nncf.Dataset(batches), subset_size=len(batches),
                                  fast_bias_correction=bc != "full", advanced_parameters=advanced)
        print(f"n={n} bc={bc}: quantize {time.process_time() - cpu:.1f} CPU-s, "
              f"{time.perf_counter() - wall:.1f} s wall", flush=True)
        compiled = core.compile_model(quantised, "CPU", {"PERFORMANCE_HINT": "LATENCY"})
        int8_call = lambda x, c=compiled: c(x)[0]  # noqa: E731
        report(f"int8 n={n} bc={bc}", features(int8_call, train_images), features(int8_call, test_images))


if __name__ == "__main__":
    main()
