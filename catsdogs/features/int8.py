"""int8 feature extraction (``--precision int8``): post-training static quantisation with OpenVINO.

The backbone's feature model is the one the float path builds (raw RGB 0-255 -> in-graph
normalisation -> conv base -> GAP), wrapped in the same ``tf.function`` over uint8 batches. It is
converted to OpenVINO (``openvino.convert_model``) and quantised by NNCF (``nncf.quantize``:
per-channel int8 weights, per-tensor int8 activations, fast bias correction), calibrated on a
fixed, seeded sample of the data set's own training images, decoded and resized exactly as
extraction feeds them. OpenVINO then runs convolutions and matrix products as int8 (VNNI / AMX).
Why OpenVINO and not ONNX Runtime: ``docs/architecture.md`` (measured on this project's machine).

**The calibration sample** is the ``calibration_size`` training images whose content digests come
first when ordered by ``blake2b(seed, digest)``: the same bytes give the same sample whatever
the listing order or file names. Its digests, its size and the engine versions form the
configuration's ``calibration`` key, so int8 features are cached under their own key and a
different sample (other images, other size, another OpenVINO) never reuses them.

**The quantised model** is cached next to the feature file, ``<feature file stem>.openvino/``
(``model.xml`` + ``model.bin``, OpenVINO IR), written to a temporary folder and renamed into
place: an interrupted or repeated call loads it instead of calibrating again.

The engine is the optional extra ``catsdogs[int8]``; without it, :func:`require_engine` raises one
:class:`~catsdogs.errors.ConfigError` saying how to install it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import threading
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path

import numpy as np

from catsdogs.dataset.layout import ImageRecord
from catsdogs.errors import ConfigError

logger = logging.getLogger("catsdogs")

DEFAULT_CALIBRATION_SIZE = 300
CALIBRATION_SEED = 0
ENGINE_PACKAGES = ("openvino", "nncf")
INSTALL_HINT = "pip install 'catsdogs[int8]'"
IR_SUFFIX = ".openvino"


def require_engine() -> None:
    """Raise one clear :class:`ConfigError` when OpenVINO + NNCF cannot be imported."""
    try:
        import nncf  # noqa: F401
        import openvino  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            f"--precision int8 needs the int8 engine (OpenVINO + NNCF), which is not installed "
            f"({exc.name or exc}); install it with: {INSTALL_HINT}") from None


def engine_versions() -> dict[str, str]:
    """Installed versions of the engine's packages (part of the calibration key)."""
    out = {}
    for dist in ENGINE_PACKAGES:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "missing"
    return out


def check_calibration_size(value) -> int:
    from catsdogs.validation import check_positive_int

    return check_positive_int(value, "calibration size")


def calibration_sample(records: Sequence[ImageRecord], digests: Sequence[str], size: int,
                       seed: int = CALIBRATION_SEED) -> list[tuple[ImageRecord, str]]:
    """The ``size`` training images (one per distinct content) first in ``blake2b(seed, digest)``
    order; all of them when there are fewer."""
    salt = str(seed).encode()
    train: dict[str, ImageRecord] = {}
    for rec, dig in zip(records, digests):
        if rec.split == "train":
            train.setdefault(dig, rec)
    order = sorted(train, key=lambda d: hashlib.blake2b(salt + d.encode(), digest_size=16).digest())
    return [(train[d], d) for d in order[:size]]


def calibration_key(sample: Sequence[tuple[ImageRecord, str]], size: int,
                    seed: int = CALIBRATION_SEED) -> str:
    """The key of a calibration: its image digests, requested size, seed and engine versions."""
    blob = json.dumps({"digests": sorted(d for _, d in sample), "size": size, "seed": seed,
                       "engine": engine_versions()}, sort_keys=True)
    return f"n{len(sample)}-" + hashlib.sha256(blob.encode()).hexdigest()[:16]


def ir_dir(feature_file: Path) -> Path:
    """Where the quantised model of a feature file's configuration is cached."""
    return feature_file.with_name(feature_file.stem + IR_SUFFIX)


def _uint8_function(model, image_size: int):
    import tensorflow as tf

    spec = tf.TensorSpec([None, image_size, image_size, 3], tf.uint8)

    @tf.function(input_signature=[spec])
    def call(x):
        return tf.cast(model(tf.cast(x, tf.float32), training=False), tf.float32)

    return call


def quantize(keras_model, image_size: int, calibration: np.ndarray):
    """The OpenVINO int8 model of a Keras feature model: uint8 ``(n, S, S, 3)`` -> features,
    calibrated on ``calibration`` (``(m, S, S, 3)`` uint8 images)."""
    import nncf
    import openvino as ov

    if not len(calibration):
        raise ConfigError("no readable calibration image: int8 quantisation needs training images")
    float_model = ov.convert_model(_uint8_function(keras_model, image_size))
    dataset = nncf.Dataset([calibration[i:i + 1] for i in range(len(calibration))])
    return nncf.quantize(float_model, dataset, subset_size=len(calibration))


def save_ir(model, directory: Path) -> None:
    """Write the OpenVINO IR into ``directory`` atomically (temporary folder, then rename)."""
    import openvino as ov

    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ov.save_model(model, str(tmp / "model.xml"))
    for path in tmp.iterdir():
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)


class Int8FeatureModel:
    """:class:`~catsdogs.features.extraction.FeatureModel`'s interface over an OpenVINO int8 model.

    ``calibration_images()`` is called (and the model quantised and saved to ``model_dir``) only
    when ``model_dir`` holds no finished IR.
    """

    def __init__(self, backbone, weights: str, image_size: int, batch_size: int, model_dir: Path,
                 calibration_images: Callable[[], np.ndarray]):
        import openvino as ov

        self.batch_size = batch_size
        self.image_size = image_size
        self.feature_dim = backbone.feature_dim
        self.calibrated = False
        core = ov.Core()
        xml = model_dir / "model.xml"
        model = None
        if xml.is_file():
            try:
                model = core.read_model(str(xml))
            except RuntimeError as exc:
                logger.warning("ignoring unreadable int8 model %s (%s); calibrating again", xml, exc)
        if model is None:
            images = calibration_images()
            logger.info("calibrating int8 %s on %d training images", backbone.name, len(images))
            model = quantize(backbone.build(weights, image_size), image_size, images)
            save_ir(model, model_dir)
            self.calibrated = True
        self.compiled = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY"})
        # calling a compiled model uses its one default infer request, which is not thread-safe
        # (a Ray actor overlaps chunks); the model's own threads use every core anyway
        self._lock = threading.Lock()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Features for ``(n, S, S, 3)`` uint8 images, any ``n``, in batches of ``batch_size``."""
        with self._lock:
            out = [np.array(self.compiled(np.ascontiguousarray(images[s:s + self.batch_size]))[0],
                            np.float32)
                   for s in range(0, len(images), self.batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.feature_dim), np.float32)


def decode_calibration(paths: Sequence[Path], image_size: int, resize: str,
                       workers: int = 2) -> np.ndarray:
    """Decode and resize calibration images as extraction does (unreadable ones left out)."""
    from concurrent.futures import ThreadPoolExecutor

    from catsdogs.dataset.images import ImageDecodeError, load_image

    def one(path: Path):
        with contextlib.suppress(ImageDecodeError, OSError):
            return load_image(path, image_size, resize)
        return None

    with ThreadPoolExecutor(max(1, workers)) as pool:
        images = [im for im in pool.map(one, paths) if im is not None]
    if not images:
        return np.zeros((0, image_size, image_size, 3), np.uint8)
    return np.stack(images)
