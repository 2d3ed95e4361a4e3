"""Exporting a finished run as one end-to-end network: Keras, Core ML and TFLite.

``export_run(run_dir, formats, out)`` rebuilds what produced the run's submitted P(dog) as one
graph::

    "image" (1, S, S, 3) raw RGB 0-255 [+ "image_<s>" (1, s, s, 3) per other backbone size s]
      -> each backbone once, on the input of its own size [and on its horizontal flip, with TTA]
         -> preprocessing -> conv base -> GAP
      -> per single run ("member"; an ensemble has several): concatenation of its backbones'
         features (combination order) -> each of its heads -> mean over original/flipped (TTA)
      -> mean over the K fold heads (k-fold) -> the ensemble's blend (mean or logistic stack)
         of its members -> the run's post-processing transform (none, clip or temperature);
         a k-fold run whose test predictions have per-fold columns (``p_dog_foldK``) blends and
         post-processes fold by fold, then averages, as its submission does
      -> "prediction" = P(dog)
      -> "neither_score" (cosine distance of the first member's fused features to the nearest
         k-means centroid of the training features, :mod:`catsdogs.app.neither`), when the run's
         cached training features are available

**The submitted model.** The heads are the ones the submission was computed with: the run's
``head.keras``; for k-fold every fold's head (``head.keras``, ``head-fold1.keras``, ...); when the
runner refitted this run for the submission (``refit: true``, ``<out>/refit.json`` names it), the
refitted head(s) ``<out>/refit/<run id>/head.keras``. TTA, fold averaging, blend and
post-processing are graph layers (:mod:`catsdogs.app.graph`). So P(dog) equals the run's
post-processed test prediction (for the submitted run: ``submission.csv``) to float32 round-off;
``tests/test_export_submission.py`` checks every kind of winner to 1e-3. A head that is not a
Keras graph (the LightGBM stacker, alone or in an ensemble) cannot be exported: one error.

**Input sizes.** Each backbone sees the photo resized by the reader to its own size
(:func:`catsdogs.dataset.images.resize`: squash, crop or pad, Pillow's antialiased bilinear
filter), exactly as feature extraction fed it, so a run whose backbones take several sizes has one
input per size (``image`` for the largest, ``image_<size>`` for the others; the manifest's
``inputs``); :mod:`catsdogs.app.predict` prepares them all. bfloat16 runs are exported in float32.

**int8 runs.** A run whose features were extracted in int8 was submitted on its quantised
networks' features; the graph above computes the backbones in float32, so its formats do not
reproduce the run (``"reproduces_run": false`` per format, a note in the manifest). For such a run
the format ``openvino`` (written by default) is :mod:`catsdogs.app.pipeline`: those quantised
networks and this graph's heads part (:func:`build_graph` with ``feature_inputs``), which does.

**CAM model** (``softmax_cam`` head on one backbone): image -> the backbone's last feature map
(input of its ``gap`` layer) -> a bias-free 1x1 ``Conv2D`` whose kernel is the head's softmax
Dense kernel reshaped to ``(1, 1, C, 2)`` -> ``cam`` ``(1, h, w, 2)`` (channel 0 cat, 1 dog), plus
``probabilities`` ``(1, 2)`` = the head's softmax of the pooled features (the first head: fold 0
of a k-fold run, the refitted one when refitted; no TTA or post-processing: it draws the map).

Files written to ``out`` (default ``<run dir>/export``): ``model.keras``, ``model.mlpackage``,
``model.tflite``, ``model.openvino/`` for int8 runs, ``cam.*`` for CAM-capable runs, and
``export.json`` (the manifest: inputs,
colour layout, scale, class labels, outputs, the ranking validation loss, the post-processing
transform, members and heads, neither threshold, files and their sizes).
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
from catsdogs.app.pipeline import FeatureTap, input_name  # noqa: F401  (re-exported)
from catsdogs.errors import ConfigError, DataError
from catsdogs.runs.postprocess import ranking_loss
from catsdogs.runs.record import RunRecord, fold_head_file
from catsdogs.util.extras import require
from catsdogs.util.fileio import atomic_path, atomic_write, read_json, write_json
from catsdogs.util.tf_log import tensorflow_logging_kept

logger = logging.getLogger("catsdogs")

FORMATS = ("keras", "coreml", "tflite")
COREML_PRECISIONS = ("float16", "float32")
CLASS_LABELS = ("cat", "dog")
MANIFEST = "export.json"
MANIFEST_VERSION = 1
#: formats an export writes only when asked for (not part of the default FORMATS); ``openvino``
#: is also written by default for a run whose features were extracted in int8
EXTRA_FORMATS = ("tflite-int8", "openvino")
SUFFIX = {"keras": ".keras", "coreml": ".mlpackage", "tflite": ".tflite",
          "tflite-int8": ".int8.tflite", "openvino": ".openvino"}
#: tflite-int8: representative training photos / validation photos compared with the float model
INT8_REPRESENTATIVE = 300
INT8_VALIDATION = 500


# ------------------------------------------------------------------------------------ the run
#: ``<out>/refit.json``: what the runner refitted for the submission (:mod:`catsdogs.runs.refit`)
REFIT_MANIFEST = "refit.json"


@dataclass
class Member:
    """One single run inside the exported model, with the head files it predicts with."""

    record: RunRecord
    run_dir: Path
    heads: list[Path]  # one head; the K fold heads of a k-fold run; the refitted head
    refit: bool = False

    @property
    def run_id(self) -> str:
        return self.record.run_id

    @property
    def tta(self) -> bool:
        return bool(self.record.tta)


@dataclass
class RunInfo:
    """What an export needs to know about a finished run: the single runs it is made of
    (``members``: the run itself, or an ensemble's members), how their P(dog) are combined
    (``blend``) and post-processed (``transform``)."""

    run_dir: Path
    record: RunRecord
    experiment: dict[str, Any]
    backbones: list[dict[str, Any]]  # every member's backbones, first use first: name, weights, size...
    head: str
    cam_capable: bool
    members: list[Member] = field(default_factory=list)
    blend: Any = None  # catsdogs.runs.ensemble.Blend of an ensemble run, else None
    transform: Any = None  # catsdogs.runs.postprocess.Transform
    #: k-fold (a run or an ensemble of k-fold runs): the submission blends and post-processes
    #: fold by fold, then averages (``p_dog_foldK`` columns, :func:`catsdogs.runs.postprocess.apply_to_test`)
    per_fold: bool = False
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
    def sizes(self) -> list[int]:
        """The distinct input sizes, largest first: one model input each (:func:`input_name`)."""
        return sorted({int(b["image_size"]) for b in self.backbones}, reverse=True)

    @property
    def resize(self) -> str:
        return self.backbones[0]["resize"]

    @property
    def same_sizes(self) -> bool:
        return len(self.sizes) == 1

    @property
    def refit(self) -> bool:
        return any(m.refit for m in self.members)

    @property
    def tta(self) -> bool:
        return any(m.tta for m in self.members)


def _refit_heads(run_dir: Path, record: RunRecord) -> dict[str, dict[str, Any]]:
    """Run id -> refitted head entry of ``refit.json`` when ``record`` is the run the runner
    refitted and submitted (its members' heads for an ensemble); empty otherwise."""
    path = run_dir.parent.parent / REFIT_MANIFEST
    if not path.is_file():
        return {}
    info = read_json(path, what="refit description", missing="")
    if not info.get("refit") or info.get("winner") != record.run_id:
        return {}
    heads = info.get("heads")
    if not isinstance(heads, dict):
        raise DataError(f"{path}: run {record.run_id!r} was refitted for the submission, but the "
                        "refitted heads were not saved (written by an older catsdogs); rerun "
                        "`catsdogs run` on the experiment to refit and save them")
    return heads


def _member(run_dir: Path, record: RunRecord, refit: dict[str, dict[str, Any]]) -> Member:
    """The head files ``record``'s run predicts the submission with."""
    entry = refit.get(record.run_id)
    if entry is not None:
        head = run_dir.parent.parent / entry["dir"] / "head.keras"
        if entry.get("settings_hash") != record.settings_hash:
            raise DataError(f"{head}: the refitted head of {record.run_id!r} belongs to other "
                            "settings than the run; rerun `catsdogs run` on the experiment")
        if not head.is_file():
            _check_keras_head(record, run_dir, head)
        return Member(record, run_dir, [head], refit=True)
    folds = int(record.validation.folds or 1) if record.validation.kind == "kfold" else 1
    heads = [run_dir / fold_head_file(k) for k in range(folds)]
    for head in heads:
        if not head.is_file():
            _check_keras_head(record, run_dir, head)
    return Member(record, run_dir, heads)


def _fold_columns(run_dir: Path) -> bool:
    """Whether the run's ``test_predictions.csv`` has per-fold columns (then its submission
    post-processes each fold head's predictions before averaging them)."""
    import pandas as pd

    from catsdogs.runs.postprocess import fold_columns

    path = run_dir / "test_predictions.csv"
    return path.is_file() and bool(fold_columns(pd.read_csv(path, nrows=0)))


def _check_keras_head(record: RunRecord, run_dir: Path, missing: Path) -> None:
    """A head file is missing: say why (not a Keras head, an older k-fold run, deleted)."""
    info = RunInfo(run_dir, record, {}, [], record.head.name, False)
    head_model_path(info)  # not a Keras graph: that message
    if missing.name.startswith("head-fold"):
        raise ConfigError(
            f"run {record.run_id!r} is a k-fold run whose submission averages "
            f"{record.validation.folds} fold heads, but {missing} is missing (the run was written "
            "before catsdogs saved every fold's head, or the file was deleted); delete "
            f"{run_dir} and rerun its experiment (`catsdogs run EXPERIMENT.yaml` retrains only "
            "missing runs)")
    raise ConfigError(f"run {record.run_id!r} cannot be exported: {missing} is missing; rerun "
                      "its experiment (`catsdogs run EXPERIMENT.yaml`)")


def _backbone_specs(names: list[str], experiment: dict[str, Any], exp_path: Path, run_id: str,
                    registry) -> list[dict[str, Any]]:
    specs = {b["name"]: b for b in experiment.get("backbones", [])}
    out = []
    for name in names:
        if name not in specs:
            raise DataError(f"{exp_path} does not describe backbone {name!r} of run {run_id!r}")
        spec = dict(specs[name])
        spec["image_size"] = int(spec.get("image_size") or registry.backbone(name).input_size)
        # what the submission's features were computed in (predict_precision); the heads may
        # have been trained on features of another precision ("trained_precision")
        spec["trained_precision"] = spec["precision"]
        spec["precision"] = spec.get("predict_precision") or spec["precision"]
        out.append(spec)
    return out


def load_run(run_dir: str | os.PathLike, registry=None) -> RunInfo:
    """Read a run's record, its experiment's backbone settings (``<out>/experiment.json``) and
    what its submitted predictions are made of: the run's head (the K fold heads of a k-fold run;
    the refitted head when the runner refitted this run for the submission), an ensemble's members
    and blend, and the post-processing transform."""
    from catsdogs.plugins import get_registry
    from catsdogs.runs.ensemble import Blend
    from catsdogs.runs.postprocess import transform_of

    run_dir = Path(run_dir)
    record = RunRecord.load(run_dir)
    exp_path = run_dir.parent.parent / "experiment.json"
    if not exp_path.is_file():
        raise DataError(f"{exp_path} not found: {run_dir} must stay inside its experiment's output "
                        "directory (<out>/runs/<run id>) so its backbone settings can be read")
    try:
        experiment = json.loads(exp_path.read_text())
    except ValueError as exc:
        raise DataError(f"{exp_path}: unreadable experiment description ({exc})") from None
    registry = registry or get_registry()
    refit = _refit_heads(run_dir, record)
    blend = None
    if record.ensemble:
        ens = record.ensemble
        member_records = []
        for member_id in ens.get("members", []):
            member_dir = run_dir.parent / member_id
            if not (member_dir / "record.json").is_file():
                raise DataError(f"ensemble {record.run_id!r}: its member run {member_dir} is "
                                "missing; rerun the experiment")
            member_records.append((member_dir, RunRecord.load(member_dir)))
        b = ens["blend"]
        blend = Blend(b["method"], tuple(float(w) for w in b["weights"]), float(b.get("bias", 0.0)))
        members = [_member(d, r, refit) for d, r in member_records]
    else:
        members = [_member(run_dir, record, refit)]
    names: list[str] = []
    for m in members:
        names += [b for b in m.record.combination if b not in names]
    backbones = _backbone_specs(names, experiment, exp_path, record.run_id, registry)
    head_name = record.head.name
    try:
        cam_head = bool(getattr(registry.head(head_name), "cam_capable", False))
    except Exception:  # the head's plugin is not installed here: not needed to export head.keras
        cam_head = head_name == "softmax_cam"
    info = RunInfo(run_dir, record, experiment, backbones, head_name,
                   cam_capable=cam_head and len(backbones) == 1 and blend is None
                   and _plain_features(backbones[0]),
                   members=members, blend=blend, transform=transform_of(record),
                   per_fold=_fold_columns(run_dir))
    if info.per_fold and len({len(m.heads) for m in members}) != 1:
        raise DataError(f"run {record.run_id!r} blends k-fold runs fold by fold, but its members "
                        "have different numbers of fold heads; rerun the experiment")
    if len({b["resize"] for b in backbones}) > 1:
        raise ConfigError(
            f"run {info.run_id!r}: its backbones were fed with different resize policies "
            f"({', '.join(b['name'] + ': ' + b['resize'] for b in backbones)}); an end-to-end model "
            "takes one image, so it can only be exported when they share one policy")
    if any(b["precision"] != "float32" for b in backbones):
        lower = sorted({b["precision"] for b in backbones} - {"float32"})
        openvino = ("; the openvino format computes them with the quantised networks extraction "
                    "used and reproduces the run" if "int8" in lower else "")
        info.notes.append(f"features were extracted in {' and '.join(lower)}; the keras, tflite "
                          f"and coreml formats compute them in float32{openvino}")
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
    if info.members:  # every member's heads were checked by load_run
        return info.members[0].heads[0]
    path = info.run_dir / "head.keras"
    if path.is_file():
        return path
    keras_head = _head_is_keras(info.head)
    if keras_head is False:
        raise ConfigError(
            f"run {info.run_id!r} cannot be exported end to end: its head {info.head!r} is not a "
            "Keras graph (a gradient-boosting stacker cannot be converted to Core ML or TFLite), so "
            f"the run has no head.keras. Its backbones' feature models ({', '.join(info.record.combination)}"
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


def load_head_file(path: Path):
    """A saved head (``head.keras``) loaded in safe mode, or one :class:`DataError`."""
    import keras

    from catsdogs import layers  # noqa: F401  (registers catsdogs layers for loading)

    try:  # safe mode: a crafted file can fail in many ways, never run code
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:  # noqa: BLE001  (any failure means the file cannot be used)
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path}: not a usable Keras head model ({reason}); retrain the run "
                        "(delete its directory and `catsdogs run` the experiment again)") from None


def load_head(info: RunInfo):
    """The (first) head the run predicts with: the refitted one when refitted, fold 0's for
    k-fold."""
    return load_head_file(head_model_path(info))


# ------------------------------------------------------------------------------------ graphs
def _graph_name(text: str) -> str:
    """A model name TensorFlow accepts as a root name scope (run ids contain ``+``)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)[:80]


def _build_backbone(name: str, spec: dict[str, Any], registry):
    """The backbone's feature model as extraction built it (with its ``layers:``, when any)."""
    layers = tuple(spec.get("layers") or ())
    backbone = registry.backbone(name)
    if layers:
        return backbone.build(spec["weights"], int(spec["image_size"]), layers=layers)
    return backbone.build(spec["weights"], int(spec["image_size"]))


def _plain_features(spec: dict[str, Any]) -> bool:
    """The backbone's features are its last layer's of the photo as it is (no ``layers:``, one
    view): what a class activation map explains."""
    return not spec.get("layers") and list(spec.get("views") or ["orig"]) == ["orig"]


def build_app_model(info: RunInfo, neither=None, registry=None):
    """The end-to-end Keras model (see :func:`build_graph`)."""
    return build_graph(info, neither, registry)[0]


def build_graph(info: RunInfo, neither=None, registry=None, *, feature_inputs: bool = False):
    """The end-to-end Keras model: the prepared photo(s) -> ``{"prediction": P(dog), "neither_score": ...}``.

    One input per distinct backbone size (:func:`input_name`): each backbone sees the photo
    resized to its own size by the reader, the pixels feature extraction gave it. Each backbone is
    built once, whichever members use it; with TTA it also sees the flipped image. Per member:
    its heads on the fused features (original and flipped averaged with TTA), then the K fold
    heads averaged, the ensemble's blend and the run's post-processing transform -- or, when the
    run's test predictions are post-processed fold by fold (``info.per_fold``), fold k's heads
    blended and post-processed, then averaged over the folds. These are the numbers of the
    run's (post-processed) test predictions, or of the refitted submission.
    ``neither`` (a :class:`catsdogs.app.neither.NeitherStats`) adds the ``neither_score`` output,
    computed on the first member's fused features.

    Returns ``(model, taps)``. With ``feature_inputs`` the backbones are not in the graph: each
    backbone's features of the photo (``orig``) or of its mirror (``flip``, TTA) are an input of
    their own, and ``taps`` lists them (:class:`FeatureTap`: input name, backbone, view), for
    :mod:`catsdogs.app.pipeline` to compute with the network extraction used (int8: the quantised
    model). The model's inputs are then those features, then the photo(s) only where a head
    trained on maps needs the bottom: a list of named inputs, called with a dict by name. Without
    it ``taps`` is empty.
    """
    import keras

    from catsdogs.app.graph import BlendProbabilities, CropView, HorizontalFlip, PostProcess
    from catsdogs.components import DEFAULT_CROP_FRACTION, view_parts
    from catsdogs.plugins import get_registry

    registry = registry or get_registry()
    largest = info.input_size
    specs = {b["name"]: b for b in info.backbones}
    inputs = {size: keras.Input((size, size, 3), name=input_name(size, largest), dtype="float32")
              for size in info.sizes}
    flipped: dict[int, Any] = {}
    cropped: dict[tuple[int, bool, str, float, bool], Any] = {}
    networks: dict[str, Any] = {}
    features: dict[tuple[str, str], Any] = {}
    taps: list[FeatureTap] = []
    used_sizes: set[int] = set()

    def image(size: int, mirrored: bool):
        used_sizes.add(size)
        if not mirrored:
            return inputs[size]
        if size not in flipped:
            flipped[size] = HorizontalFlip(name=f"flip_{size}")(inputs[size])
        return flipped[size]

    def view_image(size: int, tta_mirrored: bool, own: str, fraction: float):
        """View ``own`` (:func:`catsdogs.components.view_parts`) of the photo or of its mirror
        (TTA), as extraction's :func:`~catsdogs.features.extraction.view_images` made it: a crop
        view is :class:`CropView` of that image, then mirrored for ``flip_<crop>``."""
        region, mirrored = view_parts(own)
        if region is None:  # orig / flip: the mirror of the mirror is the photo
            return image(size, tta_mirrored != mirrored)
        key = (size, tta_mirrored, region, fraction, mirrored)
        if key not in cropped:
            tag = f"{region}_{size}_{fraction:g}{'_tta' if tta_mirrored else ''}".replace(".", "p")
            crop = cropped.get(key[:4] + (False,))
            if crop is None:
                crop = CropView(region, fraction, name=f"crop_{tag}")(image(size, tta_mirrored))
                cropped[key[:4] + (False,)] = crop
            cropped[key] = HorizontalFlip(name=f"flip_crop_{tag}")(crop) if mirrored else crop
        return cropped[key]

    def feature(name: str, view: str):
        """The backbone's features of the photo (``orig``) or its mirror (``flip``, TTA), as
        extraction computed them: its own views of that image (``views:``; crop views of
        ``crop_fraction``) merged by ``merge:``."""
        if (name, view) not in features and feature_inputs:
            spec = specs[name]
            width = registry.backbone(name).features_dim(tuple(spec.get("layers") or ()))
            if spec.get("merge", "mean") == "concat":
                width *= len(spec.get("views") or ["orig"])
            tap = FeatureTap(f"features_{_graph_name(name)}_{view}", name, view)
            taps.append(tap)
            features[(name, view)] = keras.Input((width,), name=tap.input, dtype="float32")
        if (name, view) not in features:
            spec = specs[name]
            size = int(spec["image_size"])
            if name not in networks:
                networks[name] = _build_backbone(name, spec, registry)
            fraction = float(spec.get("crop_fraction") or DEFAULT_CROP_FRACTION)
            outs = [networks[name](view_image(size, view == "flip", own, fraction))
                    for own in spec.get("views") or ["orig"]]
            if len(outs) == 1:
                features[(name, view)] = outs[0]
            elif spec.get("merge", "mean") == "concat":
                features[(name, view)] = keras.layers.Concatenate(
                    axis=-1, name=f"views_{name}_{view}")(outs)
            else:
                features[(name, view)] = keras.layers.Average(name=f"views_{name}_{view}")(outs)
        return features[(name, view)]

    bottoms: dict[tuple[str, int], Any] = {}

    def maps(name: str, blocks: int):
        """The photo's flattened maps entering ``name``'s last ``blocks`` block(s), computed in
        float32 by the backbone's bottom (a head trained on maps rounds them as the cache did)."""
        if (name, blocks) not in bottoms:
            spec = specs[name]
            bottom, _ = registry.backbone(name).split_top(spec["weights"], int(spec["image_size"]),
                                                          blocks=blocks)
            bottoms[(name, blocks)] = keras.layers.Flatten(name=f"maps_{_graph_name(name)}_{blocks}")(
                bottom(image(int(spec["image_size"]), False)))
        return bottoms[(name, blocks)]

    def member_heads(i: int, member: Member, x: dict[str, Any], source: str) -> list:
        """``member``'s heads, each on its input ``x`` (by view: ``orig``, and ``flip`` with TTA,
        averaged), checked against the width ``source`` (what gives it, and the verb) gives."""
        width = x["orig"].shape[-1]
        per_head = []
        for k, path in enumerate(member.heads):
            loaded = load_head_file(path)
            expected = loaded.inputs[0].shape[-1]
            if expected != width:
                raise DataError(f"run {member.run_id!r}: {path.name} takes {expected} values but "
                                f"{source} {width}; the run's backbone settings changed?")
            head = keras.Model(loaded.inputs[0], loaded.outputs[0], name=f"head_{i}_{k}")
            views_p = [head(x[view]) for view in x]  # TTA: original and flipped
            per_head.append(views_p[0] if len(views_p) == 1 else
                            keras.layers.Average(name=f"tta_{i}_{k}")(views_p))
        return per_head

    member_p = []
    first_fused = None
    for i, member in enumerate(info.members):
        top_blocks = _maps_blocks(member.record, registry)
        if top_blocks is not None:  # trained on maps (finetune): the bottom, flattened, the head
            (name,) = member.record.combination
            member_p.append(member_heads(i, member, {"orig": maps(name, top_blocks)},
                                         f"{name!r}'s bottom (flattened maps) gives"))
            continue
        fused = {}
        for view in ("orig", "flip") if member.tta else ("orig",):
            blocks = [feature(b, view) for b in member.record.combination]
            fused[view] = blocks[0] if len(blocks) == 1 else \
                keras.layers.Concatenate(axis=-1, name=f"features_{i}_{view}")(blocks)
        if i == 0:  # the neither score's features: the first member's, which its stats are fitted on
            first_fused = fused["orig"]
        member_p.append(member_heads(i, member, fused, "the rebuilt backbones give"))
    t = info.transform

    def post(x, name):
        return PostProcess(t.kind, t.lo, t.hi, t.temperature, t.bound, name=name)(x)

    def mean(xs, name):
        return xs[0] if len(xs) == 1 else keras.layers.Average(name=name)(xs)

    def blend(ps, name):
        if info.blend is None:
            (single,) = ps
            return single
        return BlendProbabilities(info.blend.method, info.blend.weights, info.blend.bias,
                                  name=name)(ps)

    if info.per_fold:  # k-fold: fold k's heads (blended), post-processed, then averaged
        p = mean([post(blend([heads[k] for heads in member_p], f"blend_{k}"), f"postprocess_{k}")
                  for k in range(len(member_p[0]))], "fold_mean")
    else:  # each member's heads averaged (TTA already), blended, post-processed
        p = post(blend([mean(heads, f"member_{i}") for i, heads in enumerate(member_p)], "blend"),
                 "postprocess")
    outputs = {"prediction": keras.layers.Identity(name="prediction")(p)}
    if neither is not None:
        if first_fused is None:  # the first member is trained on maps: its backbones' features
            first = [feature(b, "orig") for b in info.members[0].record.combination]
            first_fused = first[0] if len(first) == 1 else \
                keras.layers.Concatenate(axis=-1, name="features_neither")(first)
        outputs["neither_score"] = neither.score_layer(first_fused)
    name = _graph_name(f"catsdogs_{info.run_id}")
    if feature_inputs:  # a list (named), as the converters take it; called with a dict by name
        listed = [features[(tap.backbone, tap.view)] for tap in taps]
        listed += [inputs[s] for s in info.sizes if s in used_sizes]
        return keras.Model(listed, outputs, name=name), taps
    model_inputs = [inputs[s] for s in info.sizes]
    return keras.Model(model_inputs if len(model_inputs) > 1 else model_inputs[0], outputs,
                       name=name), taps


def _maps_blocks(record: RunRecord, registry) -> int | None:
    """How many top blocks' maps ``record``'s head was trained on (None: on features)."""
    from catsdogs.runs.features import maps_blocks

    try:
        head_cls = registry.head(record.head.name)
    except Exception:  # noqa: BLE001 - the head's plugin is not installed: a features head
        return None
    return maps_blocks(head_cls, record.params)


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
    import tensorflow as tf

    from catsdogs.app.models import convert_tflite

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    data = convert_tflite(converter)
    atomic_write(path, lambda fh: fh.write(data))
    return path


def save_coreml(model, path: Path, *, size: int, precision: str, description: str,
                output_descriptions: dict[str, str], metadata: dict[str, str]) -> Path:
    """Core ML ML Program (``.mlpackage``) with an RGB image input ``image`` (pixels 0-255)."""
    with tensorflow_logging_kept():  # its TensorFlow frontend would set them to FATAL for good
        ct = require("coremltools", feature="export --format coreml")  # catsdogs[export]

    if precision not in COREML_PRECISIONS:
        raise ConfigError(f"Core ML precision must be one of {', '.join(COREML_PRECISIONS)}, got {precision!r}")
    # one RGB image input per model input (a run whose backbones take several sizes has several)
    images = [(t.name.split(":")[0], int(t.shape[1])) for t in model.inputs]
    mlmodel = ct.convert(
        model,
        source="tensorflow",
        inputs=[ct.ImageType(name=name, shape=(1, s, s, 3), scale=1.0, bias=[0, 0, 0],
                             color_layout=ct.colorlayout.RGB) for name, s in images],
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
    for name, s in images:
        mlmodel.input_description[name] = f"RGB photo resized to {s}x{s} (pixel values 0-255)"
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


def export_run(run_dir: str | os.PathLike, formats=None, out: str | os.PathLike | None = None, *,
               coreml_precision: str = "float16", neither: bool = True, registry=None) -> dict[str, Any]:
    """Export a finished run (see the module docstring); returns the manifest written to
    ``<out>/export.json``. ``formats`` default: :data:`FORMATS`, and ``openvino`` for a run whose
    features were extracted in int8 (:mod:`catsdogs.app.pipeline`: the one format that computes
    them as the run did). ``neither=False`` leaves out the neither-cat-nor-dog score."""
    from catsdogs.app.neither import NeitherStats, fit_neither
    from catsdogs.app.pipeline import is_int8
    from catsdogs.plugins import get_registry

    if coreml_precision not in COREML_PRECISIONS:
        raise ConfigError(f"Core ML precision must be one of {', '.join(COREML_PRECISIONS)}, "
                          f"got {coreml_precision!r}")
    registry = registry or get_registry()
    info = load_run(run_dir, registry)  # fails early (no Keras head, ...) before any network is built
    int8_run = is_int8(info)
    asked = formats is not None
    formats = parse_formats(formats if asked else FORMATS + (("openvino",) if int8_run else ()))
    if "openvino" in formats and not int8_run:
        raise ConfigError(f"run {info.run_id!r} cannot be exported as openvino: its features were "
                          "not extracted in int8 (the keras and tflite formats compute them as the "
                          "run did)")
    if "tflite-int8" in formats and not info.same_sizes:
        raise ConfigError(
            f"run {info.run_id!r} cannot be exported as tflite-int8: its backbones take photos of "
            f"{len(info.sizes)} sizes ({', '.join(map(str, info.sizes))} px), one model input each, "
            "and the full-integer export takes one image input; export keras, tflite or coreml")
    out = Path(out) if out is not None else info.run_dir / "export"
    out.mkdir(parents=True, exist_ok=True)
    size = info.input_size

    stats: NeitherStats | None = None
    neither_info: dict[str, Any] | None = None
    if neither:
        try:
            first = info.members[0]
            stats = fit_neither(first.record, info.experiment, first.run_dir)
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
        "val_logloss": f"{ranking_loss(info.record):.6f}",
        "postprocess": info.transform.describe(),
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
        "inputs": [{"name": input_name(s, size), "size": s,
                    "backbones": [b["name"] for b in info.backbones if b["image_size"] == s]}
                   for s in info.sizes],
        "ranking_logloss": ranking_loss(info.record),
        "postprocess": {**info.transform.to_dict(), "describe": info.transform.describe()},
        "tta": info.tta,
        "refit": info.refit,
        "members": [{"run_id": m.run_id, "tta": m.tta, "refit": m.refit,
                     "heads": [str(h.resolve()) for h in m.heads]} for m in info.members],
        "blend": None if info.blend is None else info.blend.to_dict(),
        "reproduces": ("the refitted submission (<out>/submission.csv)" if info.refit else
                       "the run's post-processed test predictions (test_predictions.csv with its "
                       "post-processing: what `catsdogs predict-test` and the submission write)"),
        "parity_with_run": not info.notes,
        "notes": info.notes,
        "coreml_precision": coreml_precision,
        "neither": neither_info,
        "metrics": info.record.metrics.to_dict(),
        "models": {},
    }
    if stats is not None:
        manifest["outputs"]["neither_score"] = {"shape": [1, 1], "threshold": stats.threshold}

    description = (f"Cat or dog? P(dog) from {'+'.join(info.combination)} features and a "
                   f"{info.head} head (catsdogs run {info.run_id})")
    pipeline = None
    if "openvino" in formats:
        from catsdogs.util.extras import MissingExtraError

        try:
            pipeline = open_run_pipeline(info, stats, registry)
        except (DataError, MissingExtraError) as exc:
            if asked:
                raise
            # the default formats: write the others, and say why this one is missing
            logger.warning("not writing the openvino model of run %s: %s", info.run_id, exc)
            manifest["notes"].append(f"the openvino format, the one that reproduces this int8 "
                                     f"run, was not written: {exc}")
            manifest["parity_with_run"] = False
            formats = [f for f in formats if f != "openvino"]
    graphs = [f for f in formats if f != "openvino"]
    model = build_app_model(info, stats, registry) if graphs else None
    models = manifest["models"]["classifier"] = _export_one(
        model, "model", out, graphs, size=size, precision=coreml_precision,
        description=description, outputs=outputs, metadata=metadata, info=info)
    for fmt in graphs:
        models[fmt]["reproduces_run"] = not info.notes
    if pipeline is not None:
        from catsdogs.app.pipeline import float_vs_run

        path = out / f"model{SUFFIX['openvino']}"
        logger.info("writing %s", path)
        save_pipeline(pipeline, path)
        models["openvino"] = {"file": path.name, "bytes": file_size(path), "reproduces_run": True}
        manifest["parity_with_run"] = True
        if model is not None:  # how far the phone formats' float32 graph is from the run
            manifest["float32_vs_run"] = float_vs_run(info, pipeline, model)
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


# ------------------------------------------------------------------- int8 runs (openvino)
def open_run_pipeline(info: RunInfo, neither=None, registry=None, cache_dir=None):
    """The :class:`catsdogs.app.pipeline.Pipeline` of an int8 run: its backbones' quantised
    networks (:func:`catsdogs.app.pipeline.run_sources`) and :func:`build_graph`'s heads part."""
    from catsdogs.app.models import KerasModel
    from catsdogs.app.pipeline import Pipeline, run_sources
    from catsdogs.features.int8 import require_engine

    require_engine()
    sources = run_sources(info, cache_dir)
    heads, taps = build_graph(info, neither, registry, feature_inputs=True)
    return Pipeline(KerasModel(heads), [t.name for t in heads.inputs], taps, sources,
                    info.input_size, heads)


def save_pipeline(pipeline, path: Path) -> Path:
    """Write ``pipeline`` (:class:`catsdogs.app.pipeline.Pipeline`, from :func:`open_run_pipeline`)
    as the folder ``path`` (the export format ``openvino``), atomically: the heads graph as
    ``heads.keras`` and as float32 ``heads.tflite`` (what
    :func:`catsdogs.app.pipeline.load_pipeline` runs, so a server needs no TensorFlow), each
    backbone's IR under ``ir/``."""
    import shutil
    from dataclasses import asdict

    from catsdogs.app.pipeline import HEADS_FILE, HEADS_TFLITE, PIPELINE_FILE, PIPELINE_VERSION
    from catsdogs.features.int8 import IR_FILES, content_digest

    if pipeline.model is None:
        raise ValueError("only a pipeline built from a run (open_run_pipeline) can be saved")
    with atomic_path(Path(path)) as tmp:
        tmp.mkdir(parents=True, exist_ok=True)
        pipeline.model.save(tmp / HEADS_FILE)
        save_tflite(pipeline.model, tmp / HEADS_TFLITE)
        for name, src in pipeline.sources.items():
            target = tmp / "ir" / name
            target.mkdir(parents=True)
            for file in IR_FILES:
                shutil.copyfile(src.ir / file, target / file)
        write_json(tmp / PIPELINE_FILE, {
            "pipeline_version": PIPELINE_VERSION, "largest": pipeline.largest,
            "heads": HEADS_FILE, "heads_tflite": HEADS_TFLITE,
            "taps": [asdict(t) for t in pipeline.taps], "image_inputs": pipeline.image_inputs,
            # each network's content hash, which load_pipeline checks before running it
            "sources": {n: {**asdict(s), "views": list(s.views), "ir": f"ir/{n}",
                            "digest": content_digest(tmp / "ir" / n)}
                        for n, s in pipeline.sources.items()}})
    return Path(path)


def load_manifest(export_dir: str | os.PathLike) -> dict[str, Any]:
    return read_json(Path(export_dir) / MANIFEST, what="export manifest",
                     missing=f"{export_dir} is not an export directory (no {MANIFEST}); "
                             "create one with `catsdogs export RUN_DIR`")
