"""Feature extraction: decode each photo once, run the backbone, write the cache in chunks.

:func:`extract` computes (or reuses) the global-average-pooled features of every train and test
image for each backbone configuration; the file format, its key, checksums and
:func:`load_features` are :mod:`catsdogs.features.cache` (re-exported here). Views: ``features``
(always) and ``features_flip`` (horizontally flipped input, with ``flip=True``).

Work is done in chunks of whole batches (:class:`ChunkFeatures`: decoding threads feed one
compiled call of the network, :class:`FeatureModel`, or its int8 model); an engine
(:class:`catsdogs.compute.Engine`) runs them here or on a Ray cluster, and each finished chunk is
written at once (:meth:`catsdogs.features.cache.Store.write_chunk`). After a crash or ``kill -9``,
the next call reuses every finished chunk. A finished, verified file is read without taking the
lock or writing anything, so a read-only cache works.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import platform
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from catsdogs._version import __version__
from catsdogs.components import DEFAULT_CROP_FRACTION, view_parts
from catsdogs.compute import LOCAL, Engine
from catsdogs.dataset.images import (
    RESIZE_POLICIES,
    ImageDecodeError,
    decode_rgb,
    resize,
)
from catsdogs.dataset.layout import Dataset, ImageRecord, digest_all, fingerprint, open_dataset
from catsdogs.dataset.payload import payload_bytes, prefetch
from catsdogs.dataset.storage import is_url
from catsdogs.errors import ConfigError, DataError
from catsdogs.features import int8
from catsdogs.features.cache import (  # noqa: F401  (re-exported: the public API imports them from here)
    CHECKSUM_ROWS,
    FORMAT_VERSION,
    PRECISIONS,
    RUNTIMES,
    SPLITS,
    VIEW_DATASET,
    VIEWS,
    FeatureConfig,
    FeatureSet,
    FeatureSplit,
    Store,
    assemble,
    dataset_cache_dir,
    default_cache_dir,
    find_copy,
    is_fresh,
    load_features,
    runtime_of,
)
from catsdogs.util.fileio import file_lock, remove_stale_temporaries

logger = logging.getLogger("catsdogs")

#: the store's former name here (tests of the Ray engine and of hardening patch it)
_Store = Store

# --------------------------------------------------------------------------------------- results
@dataclass
class ExtractResult:
    """What one backbone's extraction did."""

    backbone: str
    path: Path
    config: FeatureConfig
    n_train: int
    n_test: int
    computed: int  # images sent through the network in this call
    reused: int  # rows taken from the cache
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relpath, reason)
    seconds: float = 0.0
    compute_seconds: float = 0.0  # wall time of the compute loop (decode overlapped)

    @property
    def images_per_second(self) -> float | None:
        return self.computed / self.compute_seconds if self.computed and self.compute_seconds else None


# --------------------------------------------------------------------------------------- files
@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An advisory lock (:func:`catsdogs.util.fileio.file_lock`) so that two processes never
    extract the same file at once; the second one waits."""
    def unwritable(exc: OSError) -> DataError:
        return DataError(
            f"cannot write to the feature cache {str(path.parent)!r} ({exc.strerror or exc}): the "
            f"features of {path.name} are not all cached yet; make it writable or choose another "
            "cache with --cache-dir or CATSDOGS_CACHE_DIR")

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise unwritable(exc) from None
    with file_lock(path.with_name(path.name + ".lock"), unwritable=unwritable,
                   waiting=lambda pid: logger.warning("waiting for another process (pid %s) "
                                                      "extracting %s", pid, path.name)):
        yield


# --------------------------------------------------------------------------------------- compute
@dataclass
class _Work:
    digest: str
    record: ImageRecord
    views: tuple[str, ...]


def _chunks(work: list[_Work], size: int) -> Iterator[list[_Work]]:
    """Consecutive chunks of at most ``size`` items needing the same views."""
    chunk: list[_Work] = []
    for item in work:
        if chunk and (len(chunk) == size or chunk[0].views != item.views):
            yield chunk
            chunk = []
        chunk.append(item)
    if chunk:
        yield chunk


class FeatureModel:
    """A backbone's feature model behind one compiled call on fixed-size uint8 batches.

    This is the "direct call" path: ``tf.function`` over ``model(x, training=False)``, which was
    measured about twice as fast as Keras 3's ``Model.predict`` on CPU.
    """

    def __init__(self, backbone, weights: str, image_size: int, precision: str, batch_size: int,
                 layers: Sequence[str] = ()):
        import keras
        import tensorflow as tf

        previous = keras.config.dtype_policy()
        if precision == "bfloat16":
            keras.config.set_dtype_policy("mixed_bfloat16")
        try:
            self.model = self.build_network(backbone, weights, image_size, layers)
        finally:
            keras.config.set_dtype_policy(previous)
        self.batch_size = batch_size
        self.image_size = image_size
        model = self.model
        # a dynamic batch dimension: one trace serves every batch, the last one is not padded
        spec = tf.TensorSpec([None, image_size, image_size, 3], tf.uint8)

        @tf.function(input_signature=[spec])
        def _call(x):
            return tf.cast(model(tf.cast(x, tf.float32), training=False), tf.float32)

        self._call = _call

    @staticmethod
    def build_network(backbone, weights: str, image_size: int, layers: Sequence[str] = ()):
        """The backbone's Keras feature model, with ``layers`` (passed only when there are some:
        a plugin that overrides ``build`` may not take them)."""
        if layers:
            return backbone.build(weights, image_size, layers=tuple(layers))
        return backbone.build(weights, image_size)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Features for ``(n, S, S, 3)`` uint8 images, any ``n``, in batches of ``batch_size``."""
        out = [self._call(images[start:start + self.batch_size]).numpy()
               for start in range(0, len(images), self.batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.model.output_shape[-1]), np.float32)


def view_images(images: np.ndarray, view: str, crop_fraction: float = DEFAULT_CROP_FRACTION
                ) -> np.ndarray:
    """``(n, S, S, 3)`` prepared images as ``view`` shows them (:data:`catsdogs.components.FEATURE_VIEWS`):
    ``orig`` as they are, ``flip`` mirrored left to right, a crop view (``center``, ``top_left``,
    ...) cropped to ``crop_fraction`` of the side and resized back
    (:func:`catsdogs.features.views.crop_images`, the export's :class:`~catsdogs.features.views.CropView`),
    ``flip_<crop>`` that crop mirrored."""
    if view == "orig":
        return images
    region, mirrored = view_parts(view)
    if region is not None:
        from catsdogs.features.views import crop_images

        images = crop_images(images, region, crop_fraction)
    return np.ascontiguousarray(images[:, :, ::-1, :]) if mirrored else images


class MergedViews:
    """A feature model over several views of each (already decoded) image, merged into one vector:
    the mean of the views' features, or their concatenation in view order (``views:`` and
    ``merge:`` of a backbone configuration; crop views take ``crop_fraction`` of the side)."""

    def __init__(self, model, views: Sequence[str], merge: str,
                 crop_fraction: float = DEFAULT_CROP_FRACTION):
        self.model, self.views, self.merge = model, tuple(views), merge
        self.crop_fraction = crop_fraction

    def __call__(self, images: np.ndarray) -> np.ndarray:
        outs = [np.asarray(self.model(view_images(images, v, self.crop_fraction)), np.float32)
                for v in self.views]
        if self.merge == "concat":
            return np.concatenate(outs, axis=1)
        total = outs[0]
        for out in outs[1:]:
            total = total + out
        return total * np.float32(1.0 / len(outs))


def _with_views(model, views: Sequence[str], merge: str, crop_fraction: float = DEFAULT_CROP_FRACTION):
    return model if tuple(views) == ("orig",) else MergedViews(model, views, merge, crop_fraction)


def _model_factory(backbone, weights: str, size: int, precision: str, batch_size: int, resize: str,
                   workers: int, model_dir: Path | None, config: FeatureConfig):
    """What builds the feature model when there is work: float32/bfloat16 Keras, float32 OpenVINO
    (``config.runtime``), or int8 OpenVINO (the quantised model in ``model_dir``, resolved by
    :func:`catsdogs.features.int8.quantised_model` before the features were keyed by it); over the
    configuration's views and layers."""
    layers, views, merge, crop = config.layers, config.input_views, config.merge, config.crop_fraction
    if config.runtime == "openvino" and precision == "float32":
        return lambda: _with_views(
            int8.Float32FeatureModel(FeatureModel.build_network(backbone, weights, size, layers),
                                     size, batch_size), views, merge, crop)
    if precision != "int8":
        return lambda: _with_views(FeatureModel(backbone, weights, size, precision, batch_size, layers),
                                   views, merge, crop)
    assert model_dir is not None
    return Int8ModelFactory(backbone, weights, size, batch_size, model_dir, [], resize, workers,
                            views, merge, crop)


@dataclass
class Int8ModelFactory:
    """Builds the int8 feature model from the quantised IR in ``model_dir`` (never calibrates:
    the model was calibrated or found before extraction, as the features are keyed by it). An
    engine whose workers cannot see the driver's disk ships the IR (:mod:`catsdogs.engine.ray`).
    ``weights``, ``calibration_paths`` (always empty), ``resize`` and ``workers`` are unused and
    kept for engines that copy the factory with :func:`dataclasses.replace`."""

    backbone: Any
    weights: str
    size: int
    batch_size: int
    model_dir: Path
    calibration_paths: list[Path]
    resize: str
    workers: int
    #: the configuration's views and their merge (the quantised model computes each view)
    views: tuple[str, ...] = ("orig",)
    merge: str = "mean"
    #: the crop views' side, as a fraction of the image's
    crop_fraction: float = DEFAULT_CROP_FRACTION

    def __call__(self):
        return int8_feature_model(self.backbone, self.size, self.batch_size, self.model_dir,
                                  self.views, self.merge, self.crop_fraction)


def int8_feature_model(backbone: Any, size: int, batch_size: int, model_dir: Path,
                       views: Sequence[str] = ("orig",), merge: str = "mean",
                       crop_fraction: float = DEFAULT_CROP_FRACTION):
    """The int8 feature model extraction runs (:class:`Int8ModelFactory`): the quantised IR in
    ``model_dir`` (``backbone``: its ``name`` and ``feature_dim``) computing each of ``views``,
    merged by ``merge``. An int8 run's predictor computes its features with it too
    (:class:`catsdogs.app.pipeline.Pipeline`)."""
    return _with_views(int8.Int8FeatureModel(backbone, size, batch_size, model_dir), views,
                       merge, crop_fraction)


def lower_thread_priority() -> None:
    """Run a decoding thread at the lowest CPU priority (Linux: per-thread niceness).

    The network's intra-op threads split every operation evenly over the cores, so a decoder that
    pre-empts one of them stalls the whole operation. At nice 19 decoding fills the gaps instead.
    """
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


def decode_bytes(data: bytes | ImageDecodeError, size: int, policy: str):
    """One image's pixels from its bytes (or its read error, passed on): what :class:`ChunkFeatures`
    decodes, whichever engine it runs in."""
    if isinstance(data, ImageDecodeError):
        return data
    try:
        return resize(decode_rgb(data), size, policy)
    except ImageDecodeError as exc:
        return exc


def compute_chunk(model, views: Sequence[str], digests: Sequence[str], decoded: Sequence,
                  image_size: int, feature_dim: int
                  ) -> tuple[list[str], dict[str, np.ndarray], dict[str, str]]:
    """One chunk's features from its decoded images (an array or an ``ImageDecodeError`` each).

    Returns the digests computed, one ``(n, feature_dim)`` array per view and the skipped digests
    with their reasons: what :meth:`~catsdogs.features.cache.Store.write_chunk` takes. The local engine calls it in this
    process, the Ray engine (:mod:`catsdogs.engine.ray`) in its long-lived workers.
    """
    images, done, skipped = [], [], {}
    for dig, result in zip(digests, decoded):
        if isinstance(result, ImageDecodeError):
            skipped[dig] = result.reason
        else:
            images.append(result)
            done.append(dig)
    batch = np.stack(images) if images else np.zeros((0, image_size, image_size, 3), np.uint8)
    arrays = {}
    for view in views:
        x = view_images(batch, view)
        arrays[view] = model(x) if len(x) else np.zeros((0, feature_dim), np.float32)
    return done, arrays, skipped


class ChunkFeatures:
    """An engine's extraction worker: the backbone's feature model (built once per worker, by
    the model factory) and decoding threads; called once per chunk with its views, digests and
    payload (per image its bytes or read error, or its path: :func:`payload_bytes`). Two calls
    may run at once (one decoding while the other computes)."""

    def __init__(self, model_factory, image_size: int, resize: str, feature_dim: int,
                 decode_threads: int):
        self.image_size, self.resize, self.feature_dim = image_size, resize, feature_dim
        self.pool = ThreadPoolExecutor(max_workers=max(1, decode_threads),
                                       initializer=lower_thread_priority)
        self.model = model_factory()

    def __call__(self, views: Sequence[str], digests: Sequence[str], payload: list) -> dict[str, Any]:
        def decode(item):
            return decode_bytes(payload_bytes(item), self.image_size, self.resize)

        decoded = list(self.pool.map(decode, prefetch(payload)))  # objects: read ahead
        done, arrays, skipped = compute_chunk(self.model, views, digests, decoded, self.image_size,
                                              self.feature_dim)
        return {"digests": done, "arrays": arrays, "skipped": skipped}


def _compute(store: Store, work: list[_Work], model_factory, *, engine, image_size: int,
             resize: str, chunk_size: int, workers: int, progress: bool, desc: str
             ) -> tuple[int, float, dict[str, int]]:
    """The missing chunks, computed by ``engine`` (:meth:`catsdogs.compute.Engine.map_chunks`)
    and written here through ``store`` as each finishes: ``(images computed, seconds, images per
    node)``."""
    from catsdogs.util.progress import progress_bar

    if not work:
        return 0, 0.0, {}
    chunks = list(_chunks(work, chunk_size))
    state = {"index": store.next_chunk_index(), "computed": 0}
    nodes: dict[str, int] = {}
    suffix = "" if engine.name == "local" else f" ({engine.name})"
    bar = progress_bar(total=len(work), desc=desc + suffix, unit="img", enabled=progress)

    def args_of(chunk: list[_Work]) -> tuple:
        return chunk[0].views, [w.digest for w in chunk], engine.payload([w.record.path for w in chunk])

    def on_result(chunk: list[_Work], out: dict[str, Any], node: str, pid: int) -> None:
        store.write_chunk(state["index"], out["digests"], chunk[0].views, out["arrays"], out["skipped"])
        state["index"] += 1
        state["computed"] += len(out["digests"])
        nodes[node] = nodes.get(node, 0) + len(chunk)
        bar.update(len(chunk))

    def what(chunk: list[_Work]) -> str:
        return f"the chunk of {len(chunk)} images {chunk[0].record.relpath} .. {chunk[-1].record.relpath}"

    factory = functools.partial(ChunkFeatures, engine.portable(model_factory), image_size, resize,
                                store.config.feature_dim, workers)
    start = time.perf_counter()
    try:
        engine.map_chunks(factory, chunks, args_of, on_result, what)
    finally:
        bar.close()
    return state["computed"], time.perf_counter() - start, nodes


# --------------------------------------------------------------------------------------- assemble
def _versions() -> dict[str, str]:
    out = {"catsdogs": __version__, "python": platform.python_version()}
    from importlib import metadata

    for dist in ("tensorflow", "keras", "numpy", "h5py", "pillow", *int8.ENGINE_PACKAGES):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    return out


# --------------------------------------------------------------------------------------- API
def _precision_label(precision: str, runtime: str) -> str:
    """What a progress bar adds to the backbone's name: a precision other than float32, or the
    runtime of float32 computed by OpenVINO."""
    if precision != "float32":
        return f" ({precision})"
    return " (float32, openvino)" if runtime == "openvino" else ""


def _check_options(backbones, weights, image_size, batch_size, precision, resize, chunk_size, workers,
                   runtime="tensorflow"):
    if not backbones:
        raise ConfigError("no backbone given; name at least one (e.g. --backbone resnet50)")
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    # OpenVINO computes float32 and int8 features (int8 always runs there), TensorFlow float32
    # and bfloat16 ones
    if runtime not in RUNTIMES:
        raise ConfigError(f"unknown runtime {runtime!r}; choose one of: {', '.join(RUNTIMES)}")
    if runtime == "openvino" and precision == "bfloat16":
        raise ConfigError("runtime openvino computes float32 (and int8) features, not bfloat16; "
                          "use precision float32 or int8, or runtime tensorflow")
    if resize not in RESIZE_POLICIES:
        raise ConfigError(f"unknown resize policy {resize!r}; choose one of: {', '.join(RESIZE_POLICIES)}")
    from catsdogs.validation import check_backbone_options, check_positive_int

    for name, value in (("batch size", batch_size), ("chunk size", chunk_size), ("workers", workers)):
        check_positive_int(value, name)
    check_backbone_options(image_size, weights)


def extract(
    data_dir: str | os.PathLike,
    backbones: str | Iterable[str],
    *,
    weights: str = "imagenet",
    image_size: int | None = None,
    batch_size: int = 32,
    cache_dir: str | os.PathLike | None = None,
    flip: bool = False,
    precision: str = "float32",
    resize: str = "squash",
    chunk_size: int = 256,
    workers: int = 2,
    progress: bool = True,
    registry=None,
    dataset: Dataset | None = None,
    digests: Sequence[str] | None = None,
    engine: Engine = LOCAL,
    calibration_size: int = int8.DEFAULT_CALIBRATION_SIZE,
    recalibrate: bool = False,
    layers: Sequence[str] = (),
    views: Sequence[str] = ("orig",),
    merge: str = "mean",
    crop_fraction: float = DEFAULT_CROP_FRACTION,
    runtime: str = "tensorflow",
) -> list[ExtractResult]:
    """Compute (or reuse) GAP features of every train and test image for each backbone.

    Returns one :class:`ExtractResult` per backbone; load the features with
    :func:`load_features(result.path) <load_features>`. A second identical call does no forward
    pass; a call after an interruption computes only what is missing. Callers extracting several
    configurations of one data directory may pass ``dataset`` (from :func:`open_dataset`) and its
    ``digests`` (:func:`catsdogs.dataset.layout.digest_all`) so the directory is listed and hashed once.
    ``engine`` (a :class:`catsdogs.compute.Engine`, from :func:`catsdogs.engine.open_engine`;
    default: this process) computes the missing chunks, e.g. on a Ray cluster; the cache written
    is the same.
    ``precision="int8"`` quantises each backbone, calibrated on ``calibration_size`` training
    images once per backbone configuration and data set (the cached quantised model is reused,
    so added images cost one forward pass each; ``recalibrate=True`` calibrates again), and keys
    the features by the quantised model (:mod:`catsdogs.features.int8`; needs ``catsdogs[int8]``).
    ``runtime="openvino"`` computes float32 features with OpenVINO instead of TensorFlow (the same
    network, converted; keyed apart; needs OpenVINO, in ``catsdogs[int8]``); int8 always runs there.

    Feature views (each a configuration of its own, with its own cache key; the defaults keep the
    keys of before they existed): ``layers`` appends the global-average-pooled outputs of earlier
    layers (:meth:`catsdogs.components.Backbone.feature_layers`) to the features, from the same
    forward pass; ``views`` (``orig``, ``flip``, the crops ``center``, ``top_left``, ``top_right``,
    ``bottom_left``, ``bottom_right`` and their mirrors ``flip_<crop>``) computes the features of
    each view of the decoded image and ``merge`` averages (``mean``) or concatenates (``concat``)
    them; a crop view is the square of ``crop_fraction`` of the side (in the key only when a crop
    view is used), resized back to the image size. Each photo is decoded once per backbone
    configuration, whatever the views; the flipped TTA dataset (``flip=True``) is the same
    features of the mirrored image.
    """
    from catsdogs.components import check_crop_fraction, check_views
    from catsdogs.plugins import get_registry

    names = [backbones] if isinstance(backbones, str) else list(backbones)
    _check_options(names, weights, image_size, batch_size, precision, resize, chunk_size, workers,
                   runtime)
    runtime = runtime_of(precision, runtime)  # int8: always OpenVINO's
    if runtime == "openvino":
        int8.require_float32_runtime()
    views = check_views(views, merge)
    crop_fraction = check_crop_fraction(crop_fraction)
    if precision == "int8":
        int8.check_calibration_size(calibration_size)
        int8.require_engine()
    registry = registry or get_registry()
    specs = []
    for name in names:  # validate everything before computing anything
        backbone = registry.backbone(name)
        specs.append((backbone, backbone.checked_size(weights, image_size),
                      backbone.check_layers(layers)))

    if dataset is None:  # a caller passing the dataset reports its ignored files itself
        dataset = open_dataset(data_dir)
        for relpath, reason in dataset.ignored:
            logger.warning("ignored %s: %s", relpath, reason)
    ds = dataset
    records = ds.records
    if digests is None:
        digests = digest_all(records, engine=engine)  # objects: hashed where they are read
    elif len(digests) != len(records):
        raise ConfigError(f"digests has {len(digests)} entries for {len(records)} images; "
                          "pass digest_all(dataset.records)")
    digests = list(digests)
    listing = fingerprint(records, digests)
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    directory = dataset_cache_dir(cache_root, ds.root)
    tta_views = ["orig", "flip"] if flip else ["orig"]
    chunk_size = -(-chunk_size // batch_size) * batch_size  # whole batches per chunk

    results: list[ExtractResult] = []
    unreadable: dict[str, str] = {}
    for backbone, size, own_layers in specs:
        t0 = time.perf_counter()
        config = FeatureConfig(
            backbone=backbone.name,
            weights=weights,
            weights_id=backbone.weights_id(weights),
            image_size=size,
            resize=resize,
            precision=precision,
            preprocessing=backbone.preprocessing,
            feature_dim=backbone.features_dim(own_layers) * (len(views) if merge == "concat" else 1),
            layers=own_layers,
            input_views=views,
            merge=merge if len(views) > 1 else "mean",
            crop_fraction=crop_fraction,
            runtime=runtime,
        )
        quantised = None
        if precision == "int8":  # int8 features are keyed by the quantised model's content hash
            quantised = int8.quantised_model(
                # the quantised network is the same whatever the views: one calibration for them
                directory, backbone, slot=int8.slot_key({
                    k: v for k, v in config.identity().items()
                    if k not in ("precision", "calibration", "input_views", "merge",
                                 "crop_fraction")}),
                records=records, digests=digests, requested=calibration_size,
                build=functools.partial(FeatureModel.build_network, backbone, weights, size, own_layers),
                image_size=size,
                resize=resize, workers=workers, recalibrate=recalibrate, progress=progress,
                lock=_locked)
            config = dataclasses.replace(config, calibration=quantised.key)
        final = directory / config.filename
        if is_url(ds.root) and not final.exists():  # the same photos cached from a local copy?
            final = find_copy(cache_root, config.filename, listing) or final
        # a finished, verified file is used read-only: no lock, no write (read-only caches work)
        store = Store(final, config).load_final()
        warm = is_fresh(store, listing, tta_views)
        with contextlib.nullcontext() if warm else _locked(final):
            if not warm:
                remove_stale_temporaries(directory)  # e.g. an .h5 being assembled when killed
                remove_stale_temporaries(final.with_name(final.name + ".partial"))
                store = Store(final, config).load()
            old = store.final_meta
            if old is not None and is_fresh(store, listing, tta_views):
                result = ExtractResult(backbone.name, final, config, old["n_train"], old["n_test"],
                                       computed=0, reused=old["n_train"] + old["n_test"],
                                       skipped=[(s["file"], s["reason"]) for s in old.get("skipped", [])])
            else:
                # keep every view the old file had, so a later call without --flip loses nothing
                file_views = [v for v in VIEWS if v in tta_views or (old and v in old["views"])]
                work, seen = [], set()
                for rec, dig in zip(records, digests):
                    if dig in store.skipped or dig in seen:
                        continue
                    have = store.sources.get(dig, {})
                    need = tuple(v for v in file_views if v not in have)
                    if need:
                        work.append(_Work(dig, rec, need))
                        seen.add(dig)
                computed, compute_s, nodes = _compute(
                    store, work,
                    _model_factory(backbone, weights, size, precision, batch_size, resize, workers,
                                   quantised.directory if quantised else None, config),
                    engine=engine, image_size=size, resize=resize, chunk_size=chunk_size, workers=workers,
                    progress=progress,
                    desc=f"{backbone.name} features" + _precision_label(precision, runtime),
                )
                described = engine.describe()
                rows: dict[str, list[tuple[ImageRecord, str]]] = {s: [] for s in SPLITS}
                skipped = []
                for rec, dig in zip(records, digests):
                    if dig in store.skipped:
                        skipped.append({"split": rec.split, "file": rec.relpath, "digest": dig,
                                        "reason": store.skipped[dig]})
                    else:
                        rows[rec.split].append((rec, dig))
                meta: dict[str, Any] = {
                    "format_version": FORMAT_VERSION,
                    "config_key": config.key,
                    **{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()},
                    "views": file_views,
                    "dataset_root": str(ds.root),
                    "dataset_layout": ds.layout,
                    "dataset_fingerprint": fingerprint(
                        [r for s in SPLITS for r, _ in rows[s]], [d for s in SPLITS for _, d in rows[s]]),
                    "listing_fingerprint": listing,
                    "n_train": len(rows["train"]),
                    "n_test": len(rows["test"]),
                    "skipped": skipped,
                    "versions": _versions(),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    **({} if described is None else {"engine": {**described, "nodes": nodes}}),
                }
                assemble(store, rows, file_views, meta)
                n = meta["n_train"] + meta["n_test"]
                result = ExtractResult(backbone.name, final, config, meta["n_train"], meta["n_test"],
                                       computed=computed, reused=n - computed,
                                       skipped=[(s["file"], s["reason"]) for s in skipped],
                                       compute_seconds=compute_s)
        result.seconds = time.perf_counter() - t0
        results.append(result)
        unreadable.update(result.skipped)
    for relpath, reason in unreadable.items():
        logger.warning("skipped %s: %s", relpath, reason)
    if unreadable:
        logger.warning("%d of %d image files skipped as unreadable", len(unreadable), len(records))
    return results
