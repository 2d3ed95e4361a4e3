"""The submitted model of a run whose features were extracted in int8 (``precision: int8``).

Such a run was ranked and submitted on features computed by the quantised OpenVINO network of
each backbone (:mod:`catsdogs.features.int8`). A float32 graph of the same backbone (the Keras,
TFLite and Core ML exports) computes other features: on the bundled sample its P(dog) differs from
the submission by up to a few hundredths. This module computes what was submitted instead:

    photo(s), prepared by the reader as extraction prepared them
      -> per backbone: the **same quantised network extraction used** (its IR, read from the
         feature cache next to the run's feature file), over the same views, merged the same way
         (:func:`catsdogs.features.extraction.int8_feature_model`, the extraction's own code)
      -> the run's heads graph (:func:`catsdogs.app.export.build_graph` with ``feature_inputs``:
         fold heads, TTA, blend, post-processing and neither score, as the float graph has them)

:func:`catsdogs.app.export.open_run_pipeline` builds it from a run directory (what ``catsdogs predict --model RUN`` and
``catsdogs serve RUN`` use for an int8 run); :func:`catsdogs.app.export.save_pipeline` writes it as the export format
``openvino`` (a folder: ``pipeline.json``, ``heads.keras``, ``heads.tflite`` and each backbone's IR
under ``ir/``), and :func:`load_pipeline` reads it back (heads on TFLite: a server needs OpenVINO
and LiteRT, not TensorFlow). It needs the ``int8`` extra (OpenVINO) to run; it runs on servers,
not phones.
"""

from __future__ import annotations

import json
import logging
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from catsdogs.errors import DataError

logger = logging.getLogger(__name__)

PIPELINE_FILE = "pipeline.json"
HEADS_FILE = "heads.keras"
HEADS_TFLITE = "heads.tflite"
PIPELINE_VERSION = 1


@dataclass(frozen=True)
class Source:
    """How extraction computed one backbone's features: its quantised network and views."""

    backbone: str
    image_size: int
    views: tuple[str, ...]
    merge: str
    crop_fraction: float
    feature_dim: int
    ir: Path  # the OpenVINO IR folder (model.xml + model.bin)


def is_int8(info) -> bool:
    """Whether any backbone of the run (:class:`catsdogs.app.export.RunInfo`) predicts from int8
    features (its ``predict_precision``, else its ``precision``)."""
    return any(b.get("precision") == "int8" for b in info.backbones)


def _source(meta: dict[str, Any], ir: Path) -> Source:
    from catsdogs.components import DEFAULT_CROP_FRACTION

    return Source(str(meta["backbone"]), int(meta["image_size"]),
                  tuple(meta.get("input_views") or ("orig",)), str(meta.get("merge") or "mean"),
                  float(meta.get("crop_fraction") or DEFAULT_CROP_FRACTION),
                  int(meta["feature_dim"]), ir)


def run_sources(info, cache_dir=None) -> dict[str, Source]:
    """Each backbone's :class:`Source`, from the feature files the run's members predicted from
    (their records' :attr:`~catsdogs.runs.record.RunRecord.predicting_keys`; ``cache_dir``
    overrides the experiment's feature cache)."""
    from catsdogs.features import int8
    from catsdogs.features.extraction import default_cache_dir
    from catsdogs.runs.features import locate_features

    root = Path(cache_dir or info.experiment.get("cache_dir") or default_cache_dir()).expanduser()
    out: dict[str, Source] = {}
    for member in info.members:
        keys = member.record.predicting_keys
        for name in member.record.combination:
            if name in out:
                continue
            if name not in keys:
                raise DataError(f"run {member.run_id!r} records no feature key for {name!r}")
            path, meta = locate_features(root, keys[name]["config_key"],
                                         keys[name].get("dataset_fingerprint"))
            if meta.get("precision") != "int8":
                raise DataError(f"{path}: the features of {name!r} were not extracted in int8")
            ir = int8.ir_dir(path)
            again = "run the experiment again to recompute it"
            if not (ir / "model.xml").is_file():
                raise DataError(f"{ir}: the quantised network {name!r}'s features were extracted "
                                f"with is missing from the feature cache; {again}")
            # the folder is named by the network's content hash, which keys the features
            int8.check_model(ir, str(meta["calibration"]).removeprefix("ir-"), fix=again)
            out[name] = _source(meta, ir)
    return out


@dataclass(frozen=True)
class FeatureTap:
    """An input of a graph built with ``feature_inputs`` (:func:`build_graph`): ``backbone``'s
    features of the photo (``view`` ``orig``) or of its mirror (``flip``, TTA), as extraction
    computed them (its own ``views:`` merged)."""

    input: str
    backbone: str
    view: str


def input_name(size: int, largest: int) -> str:
    """The model input that takes the photo prepared at ``size`` px: ``image`` for the largest
    size (the only input when every backbone has one size), ``image_<size>`` for the others."""
    return "image" if size == largest else f"image_{size}"


def prepare_inputs(photo: np.ndarray, sizes, policy: str):
    """A model's input(s) from a decoded photo, as the reader prepared them for extraction: the
    ``(S, S, 3)`` uint8 image for one size, else ``{input name: image}`` per size (largest first
    is ``image``, :func:`input_name`), each resized from the photo with ``policy``."""
    from catsdogs.dataset.images import resize

    largest = max(sizes)
    if len(set(sizes)) == 1:
        return resize(photo, largest, policy)
    return {input_name(s, largest): resize(photo, s, policy) for s in sizes}


class Pipeline:
    """Prepared photo(s) -> the run's submitted outputs, as :class:`catsdogs.app.models.KerasModel`
    takes and gives them (``{"prediction": ..., "neither_score": ...}``, batch dropped).

    ``heads`` runs the heads graph (a :class:`~catsdogs.app.models.KerasModel` or
    :class:`~catsdogs.app.models.TFLiteModel`) whose inputs are ``inputs``: the ``taps``' features
    and, for a head trained on maps, the photo(s). ``model`` is the Keras heads graph, when built
    here (what :func:`catsdogs.app.export.save_pipeline` writes)."""

    def __init__(self, heads, inputs, taps, sources: dict[str, Source], largest: int, model=None):
        from catsdogs.features.extraction import int8_feature_model

        self.heads = heads
        self.model = model
        self.taps = list(taps)
        self.sources = sources
        self.largest = largest
        self.image_inputs = [k for k in inputs if k not in {t.input for t in self.taps}]
        self.networks = {}
        for name, src in sources.items():
            self.networks[name] = int8_feature_model(
                types.SimpleNamespace(name=name, feature_dim=src.feature_dim), src.image_size, 1,
                src.ir, src.views, src.merge, src.crop_fraction)

    def features(self, image) -> dict[str, np.ndarray]:
        """The heads graph's feature inputs of one prepared photo: ``(1, width)`` each."""
        from catsdogs.features.extraction import view_images

        images = image if isinstance(image, dict) else {input_name(self.largest, self.largest): image}
        out = {}
        for tap in self.taps:
            src = self.sources[tap.backbone]
            pixels = np.asarray(images[input_name(src.image_size, self.largest)], np.uint8)[None]
            out[tap.input] = np.asarray(self.networks[tap.backbone](view_images(pixels, tap.view)),
                                        np.float32)
        return out

    def __call__(self, image) -> dict[str, np.ndarray]:
        feeds = {k: v[0] for k, v in self.features(image).items()}  # the runner adds the batch
        for name in self.image_inputs:
            feeds[name] = image[name] if isinstance(image, dict) else image
        return self.heads(feeds)


def load_pipeline(path: str | Path, backend: str = "tflite", num_threads: int | None = None
                  ) -> Pipeline:
    """Read a folder :func:`catsdogs.app.export.save_pipeline` wrote; its heads run as TFLite (``backend``
    ``"keras"``: the Keras file)."""
    from catsdogs.app.models import KerasModel, TFLiteModel
    from catsdogs.features.int8 import check_model, require_engine

    require_engine()
    path = Path(path)
    try:
        manifest = json.loads((path / PIPELINE_FILE).read_text())
        version = manifest["pipeline_version"]
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"{path}: not an exported int8 pipeline ({exc}); export the run again with "
                        "`catsdogs export RUN_DIR --format openvino`") from None
    if version != PIPELINE_VERSION:
        raise DataError(f"{path}: pipeline version {version!r} is not {PIPELINE_VERSION}; export "
                        "the run again with this catsdogs")
    again = "export the run again with `catsdogs export RUN_DIR --format openvino`"
    sources = {}
    for n, s in manifest["sources"].items():
        ir = path / s["ir"]
        if s.get("digest"):
            check_model(ir, str(s["digest"]), fix=again)
        else:  # written before exports recorded it (2026-12-05)
            logger.warning("%s: this export does not record its network's content hash, so it "
                           "cannot be checked; %s", ir, again)
        sources[n] = Source(s["backbone"], int(s["image_size"]), tuple(s["views"]), s["merge"],
                            float(s["crop_fraction"]), int(s["feature_dim"]), ir)
    taps = [FeatureTap(**t) for t in manifest["taps"]]
    inputs = [t.input for t in taps] + list(manifest.get("image_inputs") or [])
    if backend == "tflite":
        heads: Any = TFLiteModel(path / manifest["heads_tflite"], num_threads)
    else:
        heads = KerasModel.load(path / manifest["heads"])
    return Pipeline(heads, inputs, taps, sources, int(manifest["largest"]))


#: validation photos on which an int8 run's export measures its float32 graph against the run
FLOAT_CHECK_PHOTOS = 64


def float_vs_run(info, pipeline: Pipeline, float_model, n: int = FLOAT_CHECK_PHOTOS) -> dict:
    """How far the float32 graph (what the keras, tflite and coreml formats compute) is from the
    run's own P(dog) (``pipeline``), on a seeded sample of ``n`` of the run's validation photos:
    label agreement and max / mean |dP(dog)| (``n`` 0 when the photos cannot be read here)."""
    from catsdogs.app.models import KerasModel
    from catsdogs.app.tflite_int8 import prediction_gap, representative_sample, run_photos
    from catsdogs.dataset.images import ImageDecodeError, decode_rgb, read_image_file

    try:
        _, val = run_photos(Path(info.experiment["data"]), info.run_dir)
    except (OSError, DataError):  # data in object storage or gone: nothing measured
        val = []
    keras_model = KerasModel(float_model)
    ours, theirs = [], []
    for path in representative_sample(val, n):
        try:
            photo = decode_rgb(read_image_file(path))
        except (ImageDecodeError, OSError):
            continue
        image = prepare_inputs(photo, info.sizes, info.resize)
        ours.append(float(np.asarray(pipeline(image)["prediction"]).reshape(-1)[0]))
        theirs.append(float(np.asarray(keras_model(image)["prediction"]).reshape(-1)[0]))
    return prediction_gap(ours, theirs)
