"""Exporting a finished run as one end-to-end network: Keras, Core ML and TFLite.

``export_run(run_dir, formats, out)`` rebuilds what produced the run's predictions as one graph::

    image (1, S, S, 3) raw RGB 0-255, named "image"
      -> for each backbone of the combination, in combination order:
           [in-graph resize S -> s when the backbone's size s < S] -> preprocessing -> conv base -> GAP
      -> concatenation (combination order) -> the trained head (head.keras) -> "prediction" = P(dog)
      -> "neither_score" (cosine distance of the fused features to the nearest k-means centroid
         of the training features, :mod:`catsdogs.app.neither`), when the run's cached training
         features are available

**Input size.** ``S`` is the largest input size among the combination's backbones. The caller
resizes the photo to ``S x S`` with the reader's policy (:func:`catsdogs.dataset.images.resize`: squash,
crop or pad, Pillow's antialiased bilinear filter), exactly as feature extraction did. A backbone
with a smaller size ``s`` gets the image resized ``S -> s`` inside the graph with the same
triangle (antialiased bilinear) filter as Pillow, written as two fixed matrix products
(:func:`pillow_bilinear_matrix`): Keras' ``Resizing(antialias=True)`` lowers to TensorFlow's
``ScaleAndTranslate``, which neither TFLite nor Core ML can run.

**Parity with the run.** The end-to-end P(dog) equals the run's cached-feature prediction
(``test_predictions.csv``) to float32 round-off when every backbone of the combination has the
size ``S`` (one backbone, or equal sizes), the run was trained in float32, without TTA, on a
holdout split (k-fold test predictions average k heads; ``head.keras`` is the first fold's). For
mixed sizes, the smaller backbones see ``Pillow(photo -> S)`` then ``S -> s`` instead of
``Pillow(photo -> s)``: a small, measured difference (``bench/predict_latency.py`` and the tests
report it). bfloat16 runs are exported in float32.

**CAM model** (``softmax_cam`` head on one backbone): image -> the backbone's last feature map
(input of its ``gap`` layer) -> a bias-free 1x1 ``Conv2D`` whose kernel is the head's softmax
Dense kernel reshaped to ``(1, 1, C, 2)`` -> ``cam`` ``(1, h, w, 2)`` (channel 0 cat, 1 dog), plus
``probabilities`` ``(1, 2)`` = the head's softmax of the pooled features.

Files written to ``out`` (default ``<run dir>/export``): ``model.keras``, ``model.mlpackage``,
``model.tflite``, ``cam.*`` for CAM-capable runs, and ``export.json`` (the manifest: input size,
colour layout, scale, class labels, outputs, neither threshold, files and their sizes).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from catsdogs._version import __version__
from catsdogs.errors import ConfigError, DataError
from catsdogs.runs.record import RunRecord
from catsdogs.util.fileio import atomic_path, atomic_write, read_json, write_json

logger = logging.getLogger("catsdogs")

FORMATS = ("keras", "coreml", "tflite")
COREML_PRECISIONS = ("float16", "float32")
CLASS_LABELS = ("cat", "dog")
MANIFEST = "export.json"
MANIFEST_VERSION = 1
#: formats an export writes only when asked for (not part of the default FORMATS)
EXTRA_FORMATS = ("tflite-int8",)
SUFFIX = {"keras": ".keras", "coreml": ".mlpackage", "tflite": ".tflite",
          "tflite-int8": ".int8.tflite"}
#: tflite-int8: representative training photos / validation photos compared with the float model
INT8_REPRESENTATIVE = 300
INT8_VALIDATION = 500


# ------------------------------------------------------------------------------------ the run
@dataclass
class RunInfo:
    """What an export needs to know about a finished run."""

    run_dir: Path
    record: RunRecord
    experiment: dict[str, Any]
    backbones: list[dict[str, Any]]  # combination order: name, weights, image_size, precision, resize
    head: str
    cam_capable: bool
    notes: list[str] = field(default_factory=list)

    @property
    def run_id(self) -> str:
        return self.record.run_id

    @property
    def combination(self) -> list[str]:
        return [b["name"] for b in self.backbones]

    @property
    def input_size(self) -> int:
        return max(b["image_size"] for b in self.backbones)

    @property
    def resize(self) -> str:
        return self.backbones[0]["resize"]

    @property
    def same_sizes(self) -> bool:
        return len({b["image_size"] for b in self.backbones}) == 1


def _refuse_ensemble(run_dir: Path, record: RunRecord) -> None:
    """An ensemble of runs has no single model: say so, and how to export or use its members."""
    ens = record.ensemble or {}
    blend = ens.get("blend", {})
    how = ("the mean of their P(dog)" if blend.get("method") == "mean" else
           f"sigmoid({blend.get('bias', 0):.4g} + sum of weights {blend.get('weights')} x logit P(dog))")
    members = " ".join(str(run_dir.parent / m) for m in ens.get("members", []))
    raise ConfigError(
        f"run {record.run_id!r} is an ensemble of runs {', '.join(ens.get('members', []))} "
        f"({how}, then {record.postprocess['describe'] if record.postprocess else 'no post-processing'}); "
        "it has no single end-to-end model to export, predict with or draw CAMs from. Export its "
        f"members one by one (catsdogs export RUN_DIR for each of: {members}) and combine their "
        "P(dog) as above; its test predictions and submission are in its run directory.")


def load_run(run_dir: str | os.PathLike, registry=None) -> RunInfo:
    """Read a run's record and its experiment's backbone settings (``<out>/experiment.json``)."""
    from catsdogs.plugins import get_registry

    run_dir = Path(run_dir)
    record = RunRecord.load(run_dir)
    if record.ensemble:
        _refuse_ensemble(run_dir, record)
    exp_path = run_dir.parent.parent / "experiment.json"
    if not exp_path.is_file():
        raise DataError(f"{exp_path} not found: {run_dir} must stay inside its experiment's output "
                        "directory (<out>/runs/<run id>) so its backbone settings can be read")
    try:
        experiment = json.loads(exp_path.read_text())
    except ValueError as exc:
        raise DataError(f"{exp_path}: unreadable experiment description ({exc})") from None
    registry = registry or get_registry()
    specs = {b["name"]: b for b in experiment.get("backbones", [])}
    backbones = []
    for name in record.combination:
        if name not in specs:
            raise DataError(f"{exp_path} does not describe backbone {name!r} of run {record.run_id!r}")
        spec = dict(specs[name])
        spec["image_size"] = int(spec.get("image_size") or registry.backbone(name).input_size)
        backbones.append(spec)
    head_name = record.head.name
    try:
        cam_head = bool(getattr(registry.head(head_name), "cam_capable", False))
    except Exception:  # the head's plugin is not installed here: not needed to export head.keras
        cam_head = head_name == "softmax_cam"
    info = RunInfo(run_dir, record, experiment, backbones, head_name,
                   cam_capable=cam_head and len(backbones) == 1)
    if len({b["resize"] for b in backbones}) > 1:
        raise ConfigError(
            f"run {info.run_id!r}: its backbones were fed with different resize policies "
            f"({', '.join(b['name'] + ': ' + b['resize'] for b in backbones)}); an end-to-end model "
            "takes one image, so it can only be exported when they share one policy")
    if not info.same_sizes:
        sizes = ", ".join(f"{b['name']}: {b['image_size']}" for b in backbones)
        info.notes.append(
            f"mixed input sizes ({sizes}): "
            f"smaller backbones resize {info.input_size} px -> their size in the graph, so P(dog) "
            "differs slightly from the run's cached-feature predictions")
    if any(b["precision"] != "float32" for b in backbones):
        lower = sorted({b["precision"] for b in backbones} - {"float32"})
        info.notes.append(f"features were extracted in {' and '.join(lower)}; the export computes "
                          "in float32 (see --format tflite-int8 for an int8 model)")
    if record.tta:
        info.notes.append("the run averaged flipped-image predictions (TTA); the export does not")
    if record.validation.kind == "kfold":
        info.notes.append("k-fold run: the export holds the first fold's head; the run's test "
                          "predictions average every fold's head")
    return info


def _head_is_keras(name: str) -> bool | None:
    """Whether the head plugin ``name`` makes a Keras graph: it overrides ``keras_model`` without
    declaring it ``-> None`` (None: its plugin is not installed here)."""
    import inspect

    from catsdogs.components import Head
    from catsdogs.plugins import get_registry

    try:
        cls = get_registry().head(name)
    except Exception:  # noqa: BLE001 - a missing or broken plugin only changes the message
        return None
    method = getattr(cls, "keras_model", Head.keras_model)
    if method is Head.keras_model:
        return False
    return inspect.signature(method).return_annotation not in (None, "None", type(None))


def head_model_path(info: RunInfo) -> Path:
    """``<run>/head.keras``, or a :class:`ConfigError` saying what is missing and how to get it."""
    path = info.run_dir / "head.keras"
    if path.is_file():
        return path
    keras_head = _head_is_keras(info.head)
    if keras_head is False:
        raise ConfigError(
            f"run {info.run_id!r} cannot be exported end to end: its head {info.head!r} is not a "
            "Keras graph (a gradient-boosting stacker cannot be converted to Core ML or TFLite), so "
            f"the run has no head.keras. Its backbones' feature models ({', '.join(info.combination)}"
            ": image -> GAP features) can still be built with "
            "catsdogs.get_registry().backbone(name).build(weights, size). To get an end-to-end "
            "model, export a run with a Keras head (e.g. dropout_sigmoid, softmax_cam).")
    known = ("" if keras_head else f" (the plugin of head {info.head!r} is not installed here, "
             "so whether it makes one is unknown)")
    raise ConfigError(
        f"run {info.run_id!r} cannot be exported: {path} is missing. Its head {info.head!r} "
        f"should have saved it{known}; it was deleted or the run did not finish writing it. Get it "
        f"back by training the run again: delete {info.run_dir} and rerun its experiment "
        "(`catsdogs run EXPERIMENT.yaml`, which retrains only missing runs).")


def load_head(info: RunInfo):
    import keras

    from catsdogs import layers  # noqa: F401  (registers catsdogs layers for loading)

    path = head_model_path(info)
    try:  # safe mode: a crafted file can fail in many ways, never run code
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:  # noqa: BLE001  (any failure means the file cannot be used)
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path}: not a usable Keras head model ({reason}); retrain the run "
                        "(delete its directory and `catsdogs run` the experiment again)") from None


# ------------------------------------------------------------------------------------ resizing
def pillow_bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """The ``(out_size, in_size)`` matrix of Pillow's BILINEAR resize along one axis.

    Pillow's ``precompute_coeffs``: a triangle filter whose support grows with the downscaling
    factor (that is the antialiasing), centred on ``(i + 0.5) * scale``, weights normalised per
    output pixel. Pillow rounds to uint8 after each pass; this is the exact float version.
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale
    matrix = np.zeros((out_size, in_size), dtype=np.float64)
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        x = np.arange(lo, hi)
        w = np.clip(1.0 - np.abs((x - center + 0.5) / filterscale), 0.0, None)
        if w.sum() > 0:
            matrix[i, lo:hi] = w / w.sum()
    return matrix.astype(np.float32)


def resize_in_graph(x, in_size: int, out_size: int, name: str):
    """``(b, S, S, c) -> (b, s, s, c)`` with :func:`pillow_bilinear_matrix`, as Permute + Dense.

    Only built-in layers (TRANSPOSE and FULLY_CONNECTED in TFLite, transpose/linear in Core ML).
    """
    import keras

    if in_size == out_size:
        return x
    a = pillow_bilinear_matrix(in_size, out_size).T  # (S, s)
    x = keras.layers.Permute((1, 3, 2), name=f"{name}_hcw")(x)  # (b, H, C, W)
    dense_w = keras.layers.Dense(out_size, use_bias=False, trainable=False, name=f"{name}_w")
    x = dense_w(x)  # (b, H, C, s)
    x = keras.layers.Permute((3, 2, 1), name=f"{name}_wch")(x)  # (b, s, C, H)
    dense_h = keras.layers.Dense(out_size, use_bias=False, trainable=False, name=f"{name}_h")
    x = dense_h(x)  # (b, s_w, C, s_h)
    x = keras.layers.Permute((3, 1, 2), name=name)(x)  # (b, s_h, s_w, C)
    dense_w.set_weights([a])
    dense_h.set_weights([a])
    return x


# ------------------------------------------------------------------------------------ graphs
def _graph_name(text: str) -> str:
    """A model name TensorFlow accepts as a root name scope (run ids contain ``+``)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)[:80]


def _build_backbone(name: str, spec: dict[str, Any], registry):
    return registry.backbone(name).build(spec["weights"], int(spec["image_size"]))


def build_app_model(info: RunInfo, neither=None, registry=None):
    """The end-to-end Keras model: ``image`` -> ``{"prediction": P(dog), "neither_score": ...}``.

    ``neither`` (a :class:`catsdogs.app.neither.NeitherStats`) adds the ``neither_score`` output.
    """
    import keras

    from catsdogs.plugins import get_registry

    registry = registry or get_registry()
    size = info.input_size
    head = load_head(info)
    image = keras.Input((size, size, 3), name="image", dtype="float32")
    features = []
    for spec in info.backbones:
        x = resize_in_graph(image, size, spec["image_size"], f"resize_{spec['name']}")
        features.append(_build_backbone(spec["name"], spec, registry)(x))
    fused = features[0] if len(features) == 1 else \
        keras.layers.Concatenate(axis=-1, name="features")(features)
    expected = head.inputs[0].shape[-1]
    if expected != fused.shape[-1]:
        raise DataError(f"run {info.run_id!r}: head.keras takes {expected} features but the rebuilt "
                        f"backbones give {fused.shape[-1]}; the run's backbone settings changed?")
    outputs = {"prediction": keras.layers.Identity(name="prediction")(head(fused))}
    if neither is not None:
        outputs["neither_score"] = neither.score_layer(fused)
    return keras.Model(image, outputs, name=_graph_name(f"catsdogs_{info.run_id}"))


def softmax_dense(head) -> tuple[np.ndarray, np.ndarray]:
    """Kernel ``(C, 2)`` and bias ``(2,)`` of the 2-unit softmax Dense inside a loaded head."""
    import keras

    def walk(layer):
        yield layer
        for sub in getattr(layer, "layers", []):
            yield from walk(sub)

    for layer in walk(head):
        if isinstance(layer, keras.layers.Dense) and layer.units == 2 and \
                getattr(layer.activation, "__name__", "") == "softmax":
            kernel, bias = layer.get_weights()
            return np.asarray(kernel, np.float32), np.asarray(bias, np.float32)
    raise ConfigError("the head has no 2-unit softmax Dense layer (a softmax_cam head is needed for CAMs)")


def build_cam_model(info: RunInfo, registry=None):
    """``image`` -> ``{"cam": (1, h, w, 2), "probabilities": (1, 2)}`` for a CAM-capable run."""
    import keras

    from catsdogs.plugins import get_registry

    if not info.cam_capable:
        why = (f"its head is {info.head!r}" if info.head != "softmax_cam"
               else f"it fuses {len(info.backbones)} backbones")
        raise ConfigError(f"run {info.run_id!r} is not CAM-capable ({why}); class activation maps "
                          "need a softmax_cam head on one backbone")
    registry = registry or get_registry()
    (spec,) = info.backbones
    kernel, bias = softmax_dense(load_head(info))
    backbone = _build_backbone(spec["name"], spec, registry)
    try:
        feature_map = backbone.get_layer("gap").input
    except ValueError:
        raise ConfigError(f"backbone {spec['name']!r} has no layer named 'gap' whose input is its "
                          "last feature map; CAMs need one") from None
    if feature_map.shape[-1] != kernel.shape[0]:
        raise DataError(f"the head's kernel has {kernel.shape[0]} rows, the feature map "
                        f"{feature_map.shape[-1]} channels")
    conv = keras.layers.Conv2D(2, 1, use_bias=False, name="cam", dtype="float32", trainable=False)
    cam = conv(feature_map)
    conv.set_weights([kernel.reshape(1, 1, *kernel.shape)])
    pooled = backbone.get_layer("gap").output
    dense = keras.layers.Dense(2, activation="softmax", name="probabilities", dtype="float32",
                               trainable=False)
    probs = dense(pooled)
    dense.set_weights([kernel, bias])
    return keras.Model(backbone.input, {"cam": cam, "probabilities": probs},
                       name=f"catsdogs_cam_{spec['name']}")


# ------------------------------------------------------------------------------------ converters
def save_tflite(model, path: Path) -> Path:
    """Float32 TFLite flatbuffer (builtin ops only) of a Keras model, with a ``serving_default``
    signature: input ``image``, outputs named like the model's outputs (its dict keys).

    ``from_keras_model`` freezes the weights into constants (``from_concrete_functions`` leaves
    non-trainable Keras 3 variables as ``VAR_HANDLE``/``READ_VARIABLE`` ops that read garbage).
    """
    import contextlib
    import sys

    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    with contextlib.redirect_stdout(sys.stderr):  # Keras prints "Saved artifact at ..."
        data = converter.convert()
    atomic_write(path, lambda fh: fh.write(data))
    return path


def save_coreml(model, path: Path, *, size: int, precision: str, description: str,
                output_descriptions: dict[str, str], metadata: dict[str, str]) -> Path:
    """Core ML ML Program (``.mlpackage``) with an RGB image input ``image`` (pixels 0-255)."""
    import coremltools as ct

    if precision not in COREML_PRECISIONS:
        raise ConfigError(f"Core ML precision must be one of {', '.join(COREML_PRECISIONS)}, got {precision!r}")
    mlmodel = ct.convert(
        model,
        source="tensorflow",
        inputs=[ct.ImageType(name="image", shape=(1, size, size, 3), scale=1.0, bias=[0, 0, 0],
                             color_layout=ct.colorlayout.RGB)],
        convert_to="mlprogram",
        compute_precision=ct.precision.FLOAT16 if precision == "float16" else ct.precision.FLOAT32,
        minimum_deployment_target=ct.target.iOS15,
    )
    spec = mlmodel.get_spec()
    # a dict-output Keras model converts with outputs Identity, Identity_1, ... in sorted-key order
    names = sorted(model.output.keys()) if isinstance(model.output, dict) else list(model.output_names)
    current = [o.name for o in spec.description.output]
    if len(current) != len(names):
        raise RuntimeError(f"Core ML conversion gave outputs {current}, expected {names}")
    for old, new in zip(current, names):
        if old != new:
            ct.utils.rename_feature(spec, old, new)
    mlmodel = ct.models.MLModel(spec, weights_dir=mlmodel.weights_dir, skip_model_load=True)
    mlmodel.short_description = description
    mlmodel.author = "catsdogs " + __version__
    mlmodel.license = metadata.pop("license", "MIT")
    mlmodel.version = metadata.pop("version", __version__)
    mlmodel.input_description["image"] = (f"RGB photo resized to {size}x{size} "
                                          f"(pixel values 0-255)")
    for name, text in output_descriptions.items():
        mlmodel.output_description[name] = text
    for key, value in metadata.items():
        mlmodel.user_defined_metadata[key] = value
    with atomic_path(path) as tmp:  # a folder: written beside, then swapped in
        mlmodel.save(str(tmp))
    return path


def file_size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


# ------------------------------------------------------------------------------------ export
def parse_formats(formats) -> list[str]:
    if isinstance(formats, str):
        formats = formats.split(",")
    out = []
    for f in formats:
        f = f.strip().lower()
        if not f:
            continue
        if f not in FORMATS + EXTRA_FORMATS:
            raise ConfigError(f"unknown export format {f!r}; choose from: "
                              f"{', '.join(FORMATS + EXTRA_FORMATS)}")
        if f not in out:
            out.append(f)
    if not out:
        raise ConfigError(f"no export format given; choose from: {', '.join(FORMATS)}")
    return out


def _int8_images(info: RunInfo, validation: bool) -> np.ndarray:
    """The run's training photos (representative data) or validation photos, prepared as the
    export's input (seeded samples of at most INT8_REPRESENTATIVE / INT8_VALIDATION)."""
    from catsdogs.app.tflite_int8 import representative_sample, run_photos
    from catsdogs.features.int8 import decode_calibration

    train, val = run_photos(Path(info.experiment["data"]), info.run_dir)
    paths = representative_sample(val if validation else train,
                                  INT8_VALIDATION if validation else INT8_REPRESENTATIVE)
    return decode_calibration(paths, info.input_size, info.resize)


def _export_one(model, stem: str, out: Path, formats: list[str], *, size: int, precision: str,
                description: str, outputs: dict[str, str], metadata: dict[str, str],
                info: RunInfo | None = None) -> dict[str, Any]:
    files = {}
    for fmt in formats:
        path = out / f"{stem}{SUFFIX[fmt]}"
        logger.info("writing %s", path)
        if fmt == "keras":
            with atomic_path(path) as tmp:
                model.save(tmp)
        elif fmt == "tflite":
            save_tflite(model, path)
        elif fmt == "tflite-int8":
            from catsdogs.app.tflite_int8 import compare_with_float, save_tflite_int8

            assert info is not None  # int8 needs the run's photos; only the classifier has the format
            save_tflite_int8(model, path, _int8_images(info, validation=False))
            files[fmt] = {"file": path.name, "bytes": file_size(path),
                          "vs_float_on_validation": compare_with_float(
                              model, path, _int8_images(info, validation=True))}
            continue
        else:
            save_coreml(model, path, size=size, precision=precision, description=description,
                        output_descriptions=outputs, metadata=dict(metadata))
        files[fmt] = {"file": path.name, "bytes": file_size(path)}
    return files


def export_run(run_dir: str | os.PathLike, formats=FORMATS, out: str | os.PathLike | None = None, *,
               coreml_precision: str = "float16", neither: bool = True, registry=None) -> dict[str, Any]:
    """Export a finished run (see the module docstring); returns the manifest written to
    ``<out>/export.json``. ``neither=False`` leaves out the neither-cat-nor-dog score."""
    from catsdogs.app.neither import NeitherStats, fit_neither
    from catsdogs.plugins import get_registry

    formats = parse_formats(formats)
    if coreml_precision not in COREML_PRECISIONS:
        raise ConfigError(f"Core ML precision must be one of {', '.join(COREML_PRECISIONS)}, "
                          f"got {coreml_precision!r}")
    registry = registry or get_registry()
    info = load_run(run_dir, registry)
    head_model_path(info)  # fail early, before any network is built
    out = Path(out) if out is not None else info.run_dir / "export"
    out.mkdir(parents=True, exist_ok=True)
    size = info.input_size

    stats: NeitherStats | None = None
    neither_info: dict[str, Any] | None = None
    if neither:
        try:
            stats = fit_neither(info.record, info.experiment, info.run_dir)
        except DataError as exc:
            logger.warning("no neither-cat-nor-dog score in the export: %s", exc)
        if stats is not None:
            stats.save(out / "neither.npz")
            neither_info = {**stats.describe(), "file": "neither.npz",
                            "bytes": (out / "neither.npz").stat().st_size}

    labels = json.dumps(list(CLASS_LABELS))
    metadata = {
        "classes": labels,
        "run_id": info.run_id,
        "combination": "+".join(info.combination),
        "head": info.head,
        "input_size": str(size),
        "resize": info.resize,
        "val_logloss": f"{info.record.metrics.logloss:.6f}",
        "license": "MIT",
        "version": __version__,
    }
    if stats is not None:
        metadata["neither_threshold"] = repr(float(stats.threshold))
    outputs = {"prediction": "P(dog), shape (1, 1); P(cat) = 1 - P(dog)"}
    if stats is not None:
        outputs["neither_score"] = (f"distance of the photo's features to the training photos; "
                                    f"above {stats.threshold:.4g}: neither cat nor dog")
    manifest: dict[str, Any] = {
        "manifest_version": MANIFEST_VERSION,
        "catsdogs_version": __version__,
        "run_id": info.run_id,
        "run_dir": str(info.run_dir.resolve()),
        "combination": info.combination,
        "head": info.head,
        "backbones": info.backbones,
        "input": {"name": "image", "shape": [1, size, size, 3], "size": size,
                  "color_layout": "RGB", "scale": 1.0, "bias": [0.0, 0.0, 0.0],
                  "dtype": "float32", "range": [0, 255], "resize": info.resize,
                  "resampling": "Pillow BILINEAR (antialiased), as catsdogs.dataset.images.resize"},
        "class_labels": list(CLASS_LABELS),
        "outputs": {"prediction": {"shape": [1, 1], "meaning": "P(dog)"}},
        "in_graph_resize": {b["name"]: [size, b["image_size"]] for b in info.backbones
                            if b["image_size"] != size},
        "parity_with_run": not info.notes,
        "notes": info.notes,
        "coreml_precision": coreml_precision,
        "neither": neither_info,
        "metrics": info.record.metrics.to_dict(),
        "models": {},
    }
    if stats is not None:
        manifest["outputs"]["neither_score"] = {"shape": [1, 1], "threshold": stats.threshold}

    model = build_app_model(info, stats, registry)
    description = (f"Cat or dog? P(dog) from {'+'.join(info.combination)} features and a "
                   f"{info.head} head (catsdogs run {info.run_id})")
    manifest["models"]["classifier"] = _export_one(
        model, "model", out, formats, size=size, precision=coreml_precision,
        description=description, outputs=outputs, metadata=metadata, info=info)
    formats = [f for f in formats if f not in EXTRA_FORMATS]  # no int8 CAM model

    if info.cam_capable:
        cam = build_cam_model(info, registry)
        h, w = cam.output["cam"].shape[1:3]
        cam_outputs = {"cam": f"class activation maps (1, {h}, {w}, 2): channel 0 cat, 1 dog",
                       "probabilities": "softmax (1, 2): P(cat), P(dog)"}
        manifest["models"]["cam"] = _export_one(
            cam, "cam", out, formats, size=size, precision=coreml_precision,
            description=f"Class activation maps of catsdogs run {info.run_id}",
            outputs=cam_outputs, metadata=metadata)
        manifest["cam"] = {"shape": [1, int(h), int(w), 2], "channels": list(CLASS_LABELS)}
    else:
        manifest["cam"] = None

    write_json(out / MANIFEST, manifest)
    return manifest


def load_manifest(export_dir: str | os.PathLike) -> dict[str, Any]:
    return read_json(Path(export_dir) / MANIFEST, what="export manifest",
                     missing=f"{export_dir} is not an export directory (no {MANIFEST}); "
                             "create one with `catsdogs export RUN_DIR`")
