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
the listing order or file names. A size larger than the training set is capped to all of it
(said once, when calibrating).

**Calibrated once per backbone configuration and data set.** The quantised model is cached in the
data set's feature cache folder as OpenVINO IR (``model.xml`` + ``model.bin``), in a folder named
by its own content hash, ``<backbone>-int8-<hash>.openvino/``, written through
:mod:`catsdogs.util.fileio` (staged, then renamed into place). An index per backbone
configuration (backbone, weights, input size, resize policy, preprocessing, seed and engine
versions), ``<backbone>-int8-<slot>.json``, lists the calibrations made for it: their size and
their model. :func:`quantised_model` reuses the calibration of the requested size, or one made on
all the training images there were when fewer than requested; it calibrates only when there is
none (or with ``recalibrate=True``, ``--recalibrate``). Adding training images therefore does not
calibrate again: an added image costs one forward pass.

**Features are keyed by the quantised model's content hash** (``FeatureConfig.calibration`` =
``ir-<hash>``): the same model gives the same cache file, another model (a recalibration on other
images, another OpenVINO) its own.

The engine is the optional extra ``catsdogs[int8]``; without it, :func:`require_engine` raises one
:class:`~catsdogs.util.extras.MissingExtraError` saying how to install it.

**float32 on OpenVINO** (``runtime: openvino``): :class:`Float32FeatureModel` converts the same
Keras feature function without quantising it and runs it in float32 (no calibration, nothing
cached but the features, keyed by ``FeatureConfig.runtime``). Its features equal TensorFlow's to
float32 round-off (``bench/int8_speed.py --float32-runtimes``); it needs OpenVINO only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from catsdogs.dataset.layout import ImageRecord
from catsdogs.errors import ConfigError, DataError
from catsdogs.util.fileio import replace_path, staging_dir, write_json

logger = logging.getLogger("catsdogs")

DEFAULT_CALIBRATION_SIZE = 64
CALIBRATION_SEED = 0
ENGINE_PACKAGES = ("openvino", "nncf")
IR_SUFFIX = ".openvino"
IR_FILES = ("model.xml", "model.bin")
#: images per calibration forward pass: NNCF's statistics are collected per image either way
#: (``batchwise_statistics``), but one image per pass made calibration slower than extraction
CALIBRATION_BATCH = 32


def require_engine() -> None:
    """Raise one clear :class:`~catsdogs.util.extras.MissingExtraError` (:func:`catsdogs.util.extras.require`)
    when OpenVINO or NNCF cannot be imported."""
    from catsdogs.util.extras import require

    for module in ENGINE_PACKAGES:
        require(module, "int8", feature="--precision int8 (the OpenVINO + NNCF engine)")


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


def _uint8_function(model, image_size: int):
    import tensorflow as tf

    spec = tf.TensorSpec([None, image_size, image_size, 3], tf.uint8)

    @tf.function(input_signature=[spec])
    def call(x):
        return tf.cast(model(tf.cast(x, tf.float32), training=False), tf.float32)

    return call


@contextlib.contextmanager
def engine_output(progress: bool) -> Iterator[None]:
    """Route what OpenVINO and NNCF print (NNCF's "Statistics collection" progress bar, its log
    lines) to stderr, as plugin output is (:func:`catsdogs.plugins.stdout_to_stderr`): stdout stays
    the command's own (``--json``). Without ``progress`` the bars are not drawn at all."""
    from catsdogs.plugins import stdout_to_stderr

    try:
        import rich
    except ImportError:  # pragma: no cover - NNCF requires rich
        console = None
    else:
        console = rich.get_console()  # NNCF's bars draw on rich's global console
    quiet = console.quiet if console is not None else False
    if console is not None:
        console.quiet = quiet or not progress
    try:
        with stdout_to_stderr():
            try:
                yield
            finally:
                if sys.__stdout__ is not None:  # NNCF's log handler holds the real stdout
                    sys.__stdout__.flush()
    finally:
        if console is not None:
            console.quiet = quiet


def quantize(keras_model, image_size: int, calibration: np.ndarray, *, progress: bool = True):
    """The OpenVINO int8 model of a Keras feature model: uint8 ``(n, S, S, 3)`` -> features,
    calibrated on ``calibration`` (``(m, S, S, 3)`` uint8 images)."""
    import nncf
    import openvino as ov

    if not len(calibration):
        raise ConfigError("no readable calibration image: int8 quantisation needs training images")
    with engine_output(progress):
        float_model = ov.convert_model(_uint8_function(keras_model, image_size))
        step = CALIBRATION_BATCH
        batches = [calibration[i:i + step] for i in range(0, len(calibration), step)]
        return nncf.quantize(  # subset_size counts dataset items: batches
            float_model, nncf.Dataset(batches), subset_size=len(batches),
            advanced_parameters=nncf.AdvancedQuantizationParameters(batchwise_statistics=True))


# ------------------------------------------------------------------------------ the model cache
@dataclass(frozen=True)
class QuantisedModel:
    """A cached quantised model: its IR folder, content hash and what it was calibrated on."""

    directory: Path
    digest: str  # content hash of model.xml + model.bin
    size: int  # training images in its calibration sample
    capped: bool  # the sample was all the training images there were (fewer than requested)

    @property
    def key(self) -> str:
        """What int8 features are keyed by (``FeatureConfig.calibration``)."""
        return f"ir-{self.digest[:16]}"


def model_dir_name(backbone: str, key: str) -> str:
    """The IR folder of the model with key ``ir-<hash>`` (see :attr:`QuantisedModel.key`)."""
    return f"{backbone}-int8-{key.removeprefix('ir-')}{IR_SUFFIX}"


def ir_dir(feature_file: Path) -> Path:
    """The quantised model a finished int8 feature file was computed with (from its metadata)."""
    import h5py

    with h5py.File(feature_file, "r") as h5:
        backbone, key = (v.decode() if isinstance(v, bytes) else str(v)
                         for v in (h5.attrs["backbone"], h5.attrs["calibration"]))
    return Path(feature_file).with_name(model_dir_name(backbone, key))


def content_digest(directory: Path) -> str:
    """BLAKE2b of the IR files' names and bytes (streamed)."""
    h = hashlib.blake2b(digest_size=16)
    for name in IR_FILES:
        h.update(name.encode() + b"\0")
        with open(Path(directory) / name, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def check_model(directory: Path, digest: str, *, fix: str) -> Path:
    """``directory`` if its IR files hash to ``digest`` (the full :func:`content_digest`, or the
    16-character prefix a cache folder is named by); else one :class:`DataError` naming the folder
    and ``fix`` (what to do). Whoever runs a quantised network it did not just write checks it
    first: a damaged or swapped network would give other features than the run was ranked on."""
    try:
        found = content_digest(directory)
    except OSError as exc:
        raise DataError(f"{directory}: the quantised network cannot be read ({exc}); {fix}") from None
    if not digest or not found.startswith(digest):
        raise DataError(f"{directory}: the quantised network is not the one the features were "
                        f"computed with (content hash {found[:16]}, expected {digest[:16]}); {fix}")
    return Path(directory)


def slot_key(config: dict, seed: int = CALIBRATION_SEED) -> str:
    """The key of a backbone configuration's calibrations: ``config`` (backbone, weights id,
    input size, resize policy, preprocessing, feature size), the seed and the engine versions."""
    blob = json.dumps({**config, "seed": seed, "engine": engine_versions()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def index_path(directory: Path, backbone: str, slot: str) -> Path:
    return Path(directory) / f"{backbone}-int8-{slot}.json"


def _read_index(path: Path) -> list[dict]:
    try:
        entries = json.loads(path.read_text())["calibrations"]
        return [e for e in entries if isinstance(e, dict) and {"model", "digest", "size", "capped"} <= set(e)]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("ignoring unreadable int8 model index %s (%s)", path, exc)
        return []


def _pick(entries: list[dict], requested: int) -> dict | None:
    """The calibration of the requested size, else the largest one made on all the training
    images there were (fewer than requested)."""
    exact = [e for e in entries if e["size"] == requested]
    if exact:
        return exact[-1]
    capped = [e for e in entries if e["capped"] and e["size"] < requested]
    return max(capped, key=lambda e: e["size"]) if capped else None


def _verified(directory: Path, entry: dict) -> QuantisedModel | None:
    folder = Path(directory) / entry["model"]
    try:
        digest = content_digest(folder)
    except OSError:
        return None
    if digest != entry["digest"]:
        return None
    return QuantisedModel(folder, digest, int(entry["size"]), bool(entry["capped"]))


def find_model(directory: Path, backbone: str, slot: str, requested: int) -> QuantisedModel | None:
    """The cached model :func:`quantised_model` would reuse (read only; None when there is none)."""
    entries = _read_index(index_path(directory, backbone, slot))
    while (entry := _pick(entries, requested)) is not None:
        model = _verified(directory, entry)
        if model is not None:
            return model
        logger.warning("int8 model %s is missing or damaged; calibrating again", entry["model"])
        entries.remove(entry)
    return None


def save_model(model, directory: Path, backbone: str) -> tuple[Path, str]:
    """Write the OpenVINO IR into ``directory``, in a folder named by its content hash, through
    :func:`catsdogs.util.fileio.staging_dir` / :func:`~catsdogs.util.fileio.replace_path`."""
    import openvino as ov

    with staging_dir(Path(directory) / f"{backbone}-int8{IR_SUFFIX}") as tmp:
        ov.save_model(model, str(tmp / "model.xml"))
        digest = content_digest(tmp)
        target = Path(directory) / model_dir_name(backbone, f"ir-{digest[:16]}")
        replace_path(tmp, target)
    return target, digest


def quantised_model(directory: Path, backbone, *, slot: str, records: Sequence[ImageRecord],
                    digests: Sequence[str], requested: int, build: Callable[[], Any],
                    image_size: int, resize: str, workers: int = 2, recalibrate: bool = False,
                    progress: bool = True,
                    lock: Callable[[Path], contextlib.AbstractContextManager] | None = None
                    ) -> QuantisedModel:
    """The quantised model of ``backbone`` for this data set: the cached one when there is one
    (see the module docstring), else calibrated now on the seeded sample of ``requested``
    training images (``build()`` makes the Keras feature model) and cached. ``lock(path)``
    serialises calibrations of one configuration between processes; a cached model is found
    without it (read-only caches work)."""
    directory = Path(directory)
    index = index_path(directory, backbone.name, slot)
    if not recalibrate and (found := find_model(directory, backbone.name, slot, requested)):
        return _reused(found, backbone.name, records, digests, requested)
    with lock(index) if lock is not None else contextlib.nullcontext():
        if not recalibrate and (found := find_model(directory, backbone.name, slot, requested)):
            return _reused(found, backbone.name, records, digests, requested)
        sample = calibration_sample(records, digests, requested)
        if len(sample) < requested:
            logger.warning("calibration size %d is more than the %d training images: %s is "
                           "calibrated on all %d", requested, len(sample), backbone.name, len(sample))
        images = decode_calibration([r.path for r, _ in sample], image_size, resize, workers)
        logger.info("calibrating int8 %s on %d training images", backbone.name, len(images))
        folder, digest = save_model(quantize(build(), image_size, images, progress=progress),
                                    directory, backbone.name)
        model = QuantisedModel(folder, digest, len(sample), len(sample) < requested)
        entries = [e for e in _read_index(index) if e["size"] != model.size]
        entries.append({"model": folder.name, "digest": digest, "size": model.size,
                        "capped": model.capped, "images": int(len(images)),
                        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        write_json(index, {"backbone": backbone.name, "slot": slot, "calibrations": entries})
        return model


def _reused(model: QuantisedModel, name: str, records, digests, requested: int) -> QuantisedModel:
    if model.capped:
        n_train = len({d for r, d in zip(records, digests) if r.split == "train"})
        if n_train > model.size:
            logger.info("int8 %s: reusing the model calibrated on all %d training images there "
                        "were; --recalibrate calibrates on %d", name, model.size,
                        min(requested, n_train))
    return model


class OpenVINOFeatureModel:
    """:class:`~catsdogs.features.extraction.FeatureModel`'s interface over an OpenVINO model
    (``ov.Model``) compiled for this machine's CPU with ``config``."""

    def __init__(self, model, image_size: int, batch_size: int, fallback_dim: int,
                 config: dict[str, str]):
        import openvino as ov

        self.batch_size = batch_size
        self.image_size = image_size
        self.compiled = ov.Core().compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY", **config})
        # the model's own width: with ``layers:`` it is more than the backbone's ``feature_dim``
        width = self.compiled.output(0).get_partial_shape()[-1]
        self.feature_dim = width.get_length() if width.is_static else fallback_dim
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


class Int8FeatureModel(OpenVINOFeatureModel):
    """The int8 feature model: the quantised IR in ``model_dir`` (see :func:`quantised_model`)."""

    def __init__(self, backbone, image_size: int, batch_size: int, model_dir: Path):
        import openvino as ov

        xml = Path(model_dir) / "model.xml"
        try:
            model = ov.Core().read_model(str(xml))
        except RuntimeError as exc:
            raise DataError(f"cannot read the int8 model {xml} ({exc}); run the command again "
                            "with --recalibrate") from None
        super().__init__(model, image_size, batch_size, backbone.feature_dim, {})


class Float32FeatureModel(OpenVINOFeatureModel):
    """``runtime: openvino`` at float32: the Keras feature model ``network`` (what
    :class:`~catsdogs.features.extraction.FeatureModel` runs, the same uint8 -> float32 function
    around it) converted to OpenVINO and run in float32. ``INFERENCE_PRECISION_HINT`` is set:
    on a CPU with bfloat16 units OpenVINO would otherwise compute in bfloat16."""

    def __init__(self, network, image_size: int, batch_size: int):
        import openvino as ov

        with engine_output(False):
            model = ov.convert_model(_uint8_function(network, image_size))
        super().__init__(model, image_size, batch_size, int(network.output_shape[-1]),
                         {"INFERENCE_PRECISION_HINT": "f32"})


def require_float32_runtime(
        feature: str = "runtime: openvino (float32 features computed by OpenVINO)") -> None:
    """One clear :class:`~catsdogs.util.extras.MissingExtraError` when OpenVINO cannot be
    imported (``runtime: openvino`` and ``maps_runtime: openvino`` need it, not NNCF)."""
    from catsdogs.util.extras import require

    require("openvino", "int8", feature=feature)


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
