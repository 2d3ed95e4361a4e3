"""The full-integer TFLite export (``catsdogs export --format tflite-int8``) for phones.

Post-training integer quantisation by the TFLite converter (int8 weights and activations,
builtin int8 ops only, uint8 image input, float32 outputs), the representative data being a
fixed, seeded sample of the run's training photos, decoded and resized as extraction feeds them
(:func:`catsdogs.features.int8.decode_calibration`). :func:`compare_with_float` measures, on the
run's validation photos, what the export records in its manifest: label agreement and the max /
mean |dP(dog)| against the float model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from catsdogs.errors import ConfigError
from catsdogs.features.int8 import CALIBRATION_SEED
from catsdogs.util.fileio import atomic_write


def run_photos(data_dir: Path, run_dir: Path) -> tuple[list[Path], list[Path]]:
    """A run's training photos and validation photos (the rows of its ``val_predictions.csv``)."""
    import pandas as pd

    from catsdogs.dataset.layout import open_dataset

    val_csv = run_dir / "val_predictions.csv"
    val = set(pd.read_csv(val_csv)["file"]) if val_csv.is_file() else set()
    train = open_dataset(data_dir).train
    return ([r.path for r in train if r.relpath not in val],
            [r.path for r in train if r.relpath in val])


def representative_sample(paths: Sequence[Path], size: int,
                          seed: int = CALIBRATION_SEED) -> list[Path]:
    """``size`` of ``paths``, a fixed seeded sample (by file name, as the export has no digests)."""
    salt = str(seed).encode()
    order = sorted(paths, key=lambda p: hashlib.blake2b(salt + p.name.encode(), digest_size=16).digest())
    return order[:size]


def save_tflite_int8(model, path: Path, images: np.ndarray) -> bytes:
    """Full-integer TFLite (int8 weights and activations, builtin int8 ops only) of a Keras model
    whose input is a raw RGB image: ``images`` (``(n, S, S, 3)`` uint8) are the representative
    data. The input is uint8 (the pixels as they are); the outputs stay float32 (dequantised)."""
    import tensorflow as tf

    from catsdogs.app.models import convert_tflite

    if not len(images):
        raise ConfigError("no readable training photo: a full-integer TFLite export needs "
                          "representative images")

    def representative():
        for image in images:
            yield [image[None].astype(np.float32)]

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.uint8
    data = convert_tflite(converter)
    atomic_write(path, lambda fh: fh.write(data))
    return data


def compare_with_float(model, tflite_path: Path, images: np.ndarray) -> dict:
    """P(dog) of the float Keras model vs the int8 TFLite file on ``images`` (uint8): label
    agreement and max / mean |dP(dog)|."""
    from catsdogs.app.models import TFLiteModel

    lite = TFLiteModel(tflite_path, num_threads=None)
    p_float, p_int8 = [], []
    for image in images:
        out = model(image[None].astype(np.float32), training=False)
        out = out["prediction"] if isinstance(out, dict) else out
        p_float.append(float(np.asarray(out).reshape(-1)[0]))
        p_int8.append(float(np.asarray(lite(image)["prediction"]).reshape(-1)[0]))
    return prediction_gap(p_float, p_int8)


def prediction_gap(a: Sequence[float], b: Sequence[float]) -> dict:
    """Two models' P(dog) on the same photos: ``n``, label agreement and max / mean |dP(dog)|
    (``{"n": 0}`` for no photo)."""
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not len(x):
        return {"n": 0}
    delta = np.abs(x - y)
    return {"n": int(len(x)), "label_agreement": float(np.mean((x >= 0.5) == (y >= 0.5))),
            "max_abs_dp": float(delta.max()), "mean_abs_dp": float(delta.mean())}
