"""Predicting photos with an exported (or freshly rebuilt) end-to-end model.

``open_predictor(path)`` takes an export directory (``export.json``: the ``openvino`` model when
there, else TFLite when there, else the ``.keras`` model) or a run directory (its ``export/`` when
present, else the run's Keras graphs rebuilt in memory by the exporter's own
:func:`~catsdogs.app.export.build_app_model`: the same submitted model, TTA, fold heads, refitted
heads, blend and post-processing included; for a run whose features were extracted in int8, the
quantised networks extraction used and those heads, :mod:`catsdogs.app.pipeline`, or with one
warning the float32 graph where the feature cache or OpenVINO is not at hand; ``backend``
``"openvino"`` insists on the former, ``"keras"`` asks for the latter). A model whose
manifest says it does not reproduce the run (a float32 graph of an int8 run) is used with a
warning saying so. Photos go
through the reader: ``decode_rgb`` (any mode, EXIF orientation) and
:func:`catsdogs.dataset.images.resize` to each model input's size with the run's policy, the same
preparation feature extraction used.

``predict_files(predictor, paths)`` returns one :class:`Prediction` per path; unreadable files
carry the reader's reason (``"empty file (0 bytes)"``) instead of a probability.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from catsdogs.app.models import KerasModel, TFLiteModel, tflite_interpreter  # noqa: F401
from catsdogs.dataset.images import ImageDecodeError, decode_rgb, read_image_file
from catsdogs.errors import ConfigError, DataError

logger = logging.getLogger("catsdogs")

BACKENDS = ("auto", "openvino", "tflite", "tflite-int8", "keras")
LABELS = ("cat", "dog")


@dataclass
class Prediction:
    file: str
    p_dog: float | None = None
    label: str | None = None
    confidence: float | None = None  # probability of the predicted label
    neither: bool | None = None  # None: the model has no neither score
    neither_score: float | None = None
    neither_threshold: float | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        if self.error:
            return f"skipped {self.file}: {self.error}"
        assert self.confidence is not None  # set on every prediction without an error
        verdict = f"{self.label} {100 * self.confidence:.2f}% (P(dog) = {self.p_dog:.4f})"
        if self.neither is None:
            return f"{self.file}: {verdict}"
        if self.neither:
            return (f"{self.file}: neither cat nor dog? (neither score {self.neither_score:.3f} > "
                    f"threshold {self.neither_threshold:.3f}); the classifier says {verdict}")
        return (f"{self.file}: {verdict}; neither score {self.neither_score:.3f} <= "
                f"{self.neither_threshold:.3f}")


def read_photo(path: str | os.PathLike) -> np.ndarray:
    """Decode a photo to RGB uint8 (raises :class:`ImageDecodeError` with a reason). Only regular
    files within the size cap are read (:func:`catsdogs.dataset.images.read_image_file`)."""
    return decode_rgb(read_image_file(path))


# ------------------------------------------------------------------------------------ predictor
class Predictor:
    """An end-to-end classifier (and CAM model when the run has one) behind the reader."""

    def __init__(self, source: str, size: int, policy: str, classifier, cam=None,
                 threshold: float | None = None, backend: str = "keras",
                 sizes: list[int] | None = None):
        self.source = source
        self.size = size  # the largest input size (input ``image``)
        #: every input size, largest first: one model input each (a run whose backbones take
        #: several sizes), each prepared from the photo by the reader as extraction did
        self.sizes = sorted(set(sizes or [size]), reverse=True)
        self.policy = policy
        self.classifier = classifier
        self.cam_model = cam
        self.threshold = threshold
        self.backend = backend

    @property
    def cam_capable(self) -> bool:
        return self.cam_model is not None

    def prepare(self, photo: np.ndarray):
        """The model's input(s) from a decoded photo: the (S, S, 3) uint8 image, or for a model
        with one input per backbone size ``{input name: image}`` (each resized from the photo)."""
        from catsdogs.app.pipeline import prepare_inputs

        return prepare_inputs(photo, self.sizes, self.policy)

    def predict_image(self, image, name: str = "") -> Prediction:
        """``image``: the prepared input (:meth:`prepare`)."""
        out = self.classifier(image)
        p = float(np.asarray(out["prediction"]).reshape(-1)[0])
        label = LABELS[int(p >= 0.5)]
        pred = Prediction(name, p_dog=p, label=label, confidence=p if label == "dog" else 1.0 - p)
        if "neither_score" in out and self.threshold is not None:
            score = float(np.asarray(out["neither_score"]).reshape(-1)[0])
            pred.neither_score, pred.neither_threshold = score, self.threshold
            pred.neither = bool(score > self.threshold)
        return pred

    def cam(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """CAM maps ``(h, w, 2)`` (cat, dog) and softmax ``(2,)`` of a prepared image."""
        if self.cam_model is None:
            raise ConfigError(f"{self.source} has no CAM model: class activation maps need a run "
                              "with a softmax_cam head on one backbone")
        out = self.cam_model(image)
        return np.asarray(out["cam"], np.float32), np.asarray(out["probabilities"], np.float32)


def _from_export(directory: Path, backend: str, num_threads: int | None, warn: bool = True
                 ) -> Predictor:
    from catsdogs.app.export import load_manifest

    manifest = load_manifest(directory)
    models = manifest.get("models", {})
    formats = models.get("classifier", {})
    if backend == "auto":  # openvino when there: only it computes an int8 run's own features
        backend = next((b for b in ("openvino", "tflite", "tflite-int8") if b in formats), "keras")
    if backend not in formats:
        have = ", ".join(formats) or "none"
        raise DataError(f"{directory} has no {backend} model (exported formats: {have}); "
                        f"export it with `catsdogs export RUN_DIR --format {backend}`")
    if warn and formats[backend].get("reproduces_run") is False:  # say it: not the run's numbers
        logger.warning("%s: the %s model does not compute what the run submitted (%s)", directory,
                       backend, "; ".join(manifest.get("notes") or []) or "see export.json")

    def load(kind: str):
        entry = models.get(kind, {}).get(backend)
        if entry is None:
            return None
        path = directory / entry["file"]
        if not path.exists():
            raise DataError(f"{path} is listed in {directory / 'export.json'} but missing")
        if backend == "openvino":
            from catsdogs.app.pipeline import load_pipeline

            return load_pipeline(path, num_threads=num_threads)
        return (TFLiteModel(path, num_threads) if backend.startswith("tflite")
                else KerasModel.load(path))

    neither = manifest.get("neither") or {}
    sizes = [int(i["size"]) for i in manifest.get("inputs") or [manifest["input"]]]
    return Predictor(str(directory), int(manifest["input"]["size"]), manifest["input"]["resize"],
                     load("classifier"), load("cam"), neither.get("threshold"), backend, sizes)


def _from_run(run_dir: Path, backend: str = "auto", warn: bool = True) -> Predictor:
    from catsdogs.app.export import build_app_model, build_cam_model, head_model_path, load_run
    from catsdogs.app.neither import fit_neither
    from catsdogs.app.pipeline import is_int8

    info = load_run(run_dir)
    head_model_path(info)
    stats = None
    try:
        first = info.members[0]
        stats = fit_neither(first.record, info.experiment, first.run_dir)
    except DataError as exc:
        logger.warning("no neither-cat-nor-dog score: %s", exc)
    classifier: Any = None
    asked, backend = backend, "keras"
    int8 = is_int8(info)
    if asked == "openvino" and not int8:
        raise ConfigError(f"run {run_dir} was not extracted in int8, so it has no openvino model: "
                          "its keras graph computes what it submitted (--backend auto or keras)")
    if int8 and asked in ("auto", "openvino"):  # the quantised networks its features came from
        from catsdogs.app.export import open_run_pipeline
        from catsdogs.util.extras import MissingExtraError

        try:
            classifier, backend = open_run_pipeline(info, stats), "openvino"
        except (DataError, MissingExtraError) as exc:  # no cache or no OpenVINO here: say so
            if asked == "openvino":
                raise
            logger.warning("predicting with the float32 graph, which does not compute what run "
                           "%s submitted (its features were extracted in int8): %s",
                           info.run_id, exc)
    elif int8 and warn:  # the float32 graph, asked for by name
        logger.warning("%s: the keras model (the float32 graph) does not compute what the run "
                       "submitted: its features were extracted in int8 (--backend openvino does)",
                       run_dir)
    if classifier is None:
        classifier = KerasModel(build_app_model(info, stats))
    cam = KerasModel(build_cam_model(info)) if info.cam_capable else None
    return Predictor(str(run_dir), info.input_size, info.resize, classifier, cam,
                     None if stats is None else stats.threshold, backend, info.sizes)


def open_predictor(path: str | os.PathLike, backend: str = "auto",
                   num_threads: int | None = None, *, warn: bool = True) -> Predictor:
    """A :class:`Predictor` for an export directory or a run directory (see the module docstring).
    ``warn=False`` leaves out the warning that an export's model does not compute what the run
    submitted (for a caller opening the same model again, e.g. a server's further slots)."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    path = Path(path)
    if (path / "export.json").is_file():
        return _from_export(path, backend, num_threads, warn)
    if (path / "record.json").is_file():
        if (path / "export" / "export.json").is_file():
            return _from_export(path / "export", backend, num_threads, warn)
        if backend.startswith("tflite"):
            raise DataError(f"run {path} has not been exported; run `catsdogs export {path}` first")
        return _from_run(path, backend, warn)
    raise DataError(f"{path} is neither an export directory (export.json) nor a finished run "
                    "directory (record.json)")


def predict_bytes(predictor: Predictor, data: bytes, name: str = "") -> tuple[Prediction, Any]:
    """Predict one uploaded photo from its bytes: ``(prediction, (photo, image))``, or
    ``(Prediction(name, error=reason), None)`` when the reader cannot use the bytes."""
    try:
        photo = decode_rgb(data)
    except ImageDecodeError as exc:
        return Prediction(name, error=exc.reason), None
    image = predictor.prepare(photo)
    return predictor.predict_image(image, name), (photo, image)


def predict_files(predictor: Predictor, paths, on_photo=None) -> list[Prediction]:
    """Predict each file; unreadable ones get ``error``. ``on_photo(pred, photo, image)`` is called
    for every readable file (e.g. to draw its CAM)."""
    results = []
    for path in paths:
        name = str(path)
        try:
            photo = read_photo(path)
        except ImageDecodeError as exc:
            results.append(Prediction(name, error=exc.reason))
            continue
        image = predictor.prepare(photo)
        pred = predictor.predict_image(image, name)
        if on_photo is not None:
            on_photo(pred, photo, image)
        results.append(pred)
    return results
