"""GAP feature extraction with a content-addressed, resumable HDF5 cache.

One HDF5 file per (data directory, backbone configuration)::

    $CACHE/features/<data dir name>-<hash of its path>/<backbone>-<size>-<weights>-<precision>-<resize>-<key>.h5

The configuration key covers the backbone name, weights id, input size, resize policy, precision
and cache format. Inside, every row carries the BLAKE2b digest of its image file, so a row's
features are reused only for byte-identical content: added, removed or changed files are detected
and only they are computed. Views: ``features`` (always) and ``features_flip`` (horizontally
flipped input, with ``flip=True``).

Durability: features are computed in chunks; each finished chunk is written atomically into
``<file>.partial/`` (``.npy`` arrays, then a ``.json`` marker, each via rename). After a crash or
``kill -9``, the next call reuses every finished chunk. The final ``.h5`` is written to a temporary
name and renamed into place, so a half-written file is never taken for a finished one.

Integrity (format 2): every dataset of the ``.h5`` carries BLAKE2b checksums of its rows in blocks
of :data:`CHECKSUM_ROWS` (attributes ``checksums`` and ``checksum_rows``), and every chunk marker
the checksums of its arrays. :func:`extract` verifies them before reusing anything: rows of a
corrupt block are recomputed with a warning (a corrupt label/id/file/digest column, or unreadable
HDF5 metadata, makes the whole file recomputed); :func:`load_features` refuses a corrupt file with
a :class:`~catsdogs.errors.DataError` naming it. Caches of format 1 (no checksums) have another
configuration key, so they are recomputed, never trusted. A finished, verified file is read
without taking the lock or writing anything, so a read-only cache works.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import platform
import shutil
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from catsdogs._version import __version__
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
from catsdogs.util.fileio import atomic_write, remove_stale_temporaries, replace_path

logger = logging.getLogger("catsdogs")

FORMAT_VERSION = 2  # 2: row-block checksums in the .h5 and the chunk markers
#: rows per checksum block of a feature dataset
CHECKSUM_ROWS = 256
PRECISIONS = ("float32", "bfloat16", "int8")
VIEWS = ("orig", "flip")
VIEW_DATASET = {"orig": "features", "flip": "features_flip"}
SPLITS = ("train", "test")


# --------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class FeatureConfig:
    """Everything that determines a feature vector apart from the image bytes."""

    backbone: str
    weights: str
    weights_id: str
    image_size: int
    resize: str
    precision: str
    preprocessing: str
    feature_dim: int
    calibration: str = ""  # int8 only: the quantised model's key (QuantisedModel.key, its content hash)

    @property
    def key(self) -> str:
        fields = asdict(self)
        if not fields["calibration"]:  # float keys stay what they were before int8 existed
            del fields["calibration"]
        blob = json.dumps({**fields, "format": FORMAT_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def filename(self) -> str:
        return (f"{self.backbone}-{self.image_size}-{self.weights}-{self.precision}-"
                f"{self.resize}-{self.key[:10]}.h5")


def default_cache_dir() -> Path:
    """``$CATSDOGS_CACHE_DIR``, else ``$XDG_CACHE_HOME/catsdogs``, else ``~/.cache/catsdogs``."""
    env = os.environ.get("CATSDOGS_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "catsdogs"


def dataset_cache_dir(cache_dir: Path, dataset_root: Path) -> Path:
    """The cache folder of a data set: its name and a hash of its path (or URL: a data set in
    object storage is cached on local disk like any other)."""
    tag = hashlib.blake2b(str(dataset_root).encode(), digest_size=4).hexdigest()
    return cache_dir / "features" / f"{dataset_root.name or 'data'}-{tag}"


def _copy_cache(cache_dir: Path, filename: str, listing: str) -> Path | None:
    """The finished cache file ``filename`` of another data set whose listing (relpaths and
    content digests) is exactly ``listing``: a local folder copied to a bucket reuses it."""
    import h5py

    for path in sorted((cache_dir / "features").glob(f"*/{filename}")):
        with contextlib.suppress(*_H5_ERRORS):
            with h5py.File(path, "r") as h5:
                found = h5.attrs.get("listing_fingerprint")
            if (found.decode() if isinstance(found, bytes) else found) == listing:
                return path
    return None


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


@dataclass
class FeatureSplit:
    X: np.ndarray
    X_flip: np.ndarray | None
    y: np.ndarray
    ids: np.ndarray
    files: list[str]
    digests: list[str]

    def __len__(self) -> int:
        return len(self.files)


@dataclass
class FeatureSet:
    """A finished feature file, loaded into memory."""

    path: Path
    meta: dict[str, Any]
    train: FeatureSplit
    test: FeatureSplit

    @property
    def backbone(self) -> str:
        return self.meta["backbone"]


def _read_split(h5, split: str) -> FeatureSplit:
    g = h5[split]
    return FeatureSplit(
        X=g["features"][...],
        X_flip=g["features_flip"][...] if "features_flip" in g else None,
        y=g["labels"][...].astype(np.int64),
        ids=g["ids"][...].astype(np.int64),
        files=[f.decode() if isinstance(f, bytes) else f for f in g["files"][...]],
        digests=[d.decode() if isinstance(d, bytes) else d for d in g["digests"][...]],
    )


def _read_meta(h5) -> dict[str, Any]:
    meta = {}
    for key, value in h5.attrs.items():
        if isinstance(value, bytes):
            value = value.decode()
        if isinstance(value, str) and key.endswith("_json"):
            meta[key[: -len("_json")]] = json.loads(value)
        elif isinstance(value, np.generic):
            meta[key] = value.item()
        else:
            meta[key] = value
    return meta


#: what h5py raises for damaged files (HDF5 metadata errors surface as RuntimeError, KeyError ...)
_H5_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError)


def _checksum(values) -> str:
    """BLAKE2b-128 of a block of rows: numbers by their bytes, strings joined by NUL."""
    h = hashlib.blake2b(digest_size=16)
    arr = np.asarray(values)
    if arr.dtype.kind in "OU":
        h.update(b"\0".join(v if isinstance(v, bytes) else str(v).encode() for v in arr.tolist()))
    else:
        h.update(f"{arr.dtype.str}{arr.shape}".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def _block_checksums(values, rows: int) -> list[str]:
    return [_checksum(values[start:start + rows]) for start in range(0, len(values), rows)]


def _set_checksums(ds, sums: list[str], rows: int) -> None:
    ds.attrs["checksum_rows"] = rows
    ds.attrs["checksums"] = np.array(sums, dtype="S32")


def _bad_rows(ds) -> list[tuple[int, int]]:
    """Row ranges ``[start, stop)`` of ``ds`` whose checksum does not match (all rows when the
    checksums are missing or malformed)."""
    n = ds.shape[0]
    if n == 0:  # an empty split (a data set without test photos): no rows to damage
        return []
    try:
        rows = int(ds.attrs["checksum_rows"])
        sums = [x.decode() if isinstance(x, bytes) else str(x) for x in ds.attrs["checksums"]]
    except _H5_ERRORS:
        return [(0, n)]
    if rows < 1 or len(sums) != -(-n // rows):
        return [(0, n)]
    return [(start, min(n, start + rows)) for i, start in enumerate(range(0, n, rows))
            if _checksum(ds[start:start + rows]) != sums[i]]


def _verify(h5, views: Sequence[str]) -> tuple[list[str], dict[str, list[tuple[int, int]]]]:
    """Check every checksum: (damaged index columns ``split/name``, bad feature rows per
    ``split/view``)."""
    index_bad, feature_bad = [], {}
    for split in SPLITS:
        for name in ("labels", "ids", "files", "digests"):
            if _bad_rows(h5[split][name]):
                index_bad.append(f"{split}/{name}")
        for view in views:
            bad = _bad_rows(h5[split][VIEW_DATASET[view]])
            if bad:
                feature_bad[f"{split}/{VIEW_DATASET[view]}"] = bad
    return index_bad, feature_bad


def _describe_damage(index_bad: list[str], feature_bad: dict[str, list[tuple[int, int]]]) -> str:
    parts = [f"{name} (whole column)" for name in index_bad]
    parts += [f"{name} rows " + ", ".join(f"{a}-{b - 1}" for a, b in ranges)
              for name, ranges in feature_bad.items()]
    return "checksum mismatch in " + "; ".join(parts)


def load_features(path: str | os.PathLike) -> FeatureSet:
    """Load a finished feature file (as returned in :attr:`ExtractResult.path`), verifying its
    checksums; a corrupt or unreadable file raises :class:`DataError` naming it."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise DataError(f"feature file {str(path)!r} does not exist; run `catsdogs extract` first")
    again = "run `catsdogs extract` (or `catsdogs run`) again to recompute it"
    try:
        with h5py.File(path, "r") as h5:
            meta = _read_meta(h5)
            if meta.get("format_version") != FORMAT_VERSION:
                raise DataError(f"{path}: unsupported feature file format "
                                f"{meta.get('format_version')!r} (this version reads format "
                                f"{FORMAT_VERSION}); {again}")
            index_bad, feature_bad = _verify(h5, meta["views"])
            if index_bad or feature_bad:
                raise DataError(f"{path}: corrupt feature file, "
                                f"{_describe_damage(index_bad, feature_bad)}; {again}")
            return FeatureSet(path, meta, _read_split(h5, "train"), _read_split(h5, "test"))
    except _H5_ERRORS as exc:
        raise DataError(f"{path}: not a readable feature file ({type(exc).__name__}: {exc}); "
                        f"{again}") from None


# --------------------------------------------------------------------------------------- files
@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An advisory lock so that two processes never extract the same file at once."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    lock = path.with_name(path.name + ".lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(lock, "w")
    except OSError as exc:
        raise DataError(
            f"cannot write to the feature cache {str(path.parent)!r} ({exc.strerror or exc}): the "
            f"features of {path.name} are not all cached yet; make it writable or choose another "
            "cache with --cache-dir or CATSDOGS_CACHE_DIR") from None
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.warning("waiting for another process extracting %s", path.name)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------- store
@dataclass
class _Source:
    """Where the features of one digest live: a row of the old .h5 or of a chunk file."""

    kind: str  # "h5" or "chunk"
    ref: Any  # (split, row) for h5; chunk stem for chunk
    row: int


class _Store:
    """Index of everything already computed for one configuration: digest -> view -> source."""

    def __init__(self, final: Path, config: FeatureConfig):
        self.final = final
        self.partial = final.with_name(final.name + ".partial")
        self.config = config
        self.sources: dict[str, dict[str, _Source]] = {}
        self.skipped: dict[str, str] = {}
        self.final_meta: dict[str, Any] | None = None
        self.intact = False  # set by load_final: the finished file verified, all rows usable

    def load(self) -> _Store:
        self.load_final()
        self._load_chunks()
        return self

    def load_final(self) -> _Store:
        """Index the finished file's verified rows (reads only; see :attr:`intact`)."""
        import h5py

        if not self.final.exists():
            return self
        try:
            with h5py.File(self.final, "r") as h5:
                meta = _read_meta(h5)
                if meta.get("format_version") != FORMAT_VERSION or meta.get("config_key") != self.config.key:
                    logger.warning("%s belongs to another configuration; recomputing", self.final)
                    return self
                index_bad, feature_bad = _verify(h5, meta["views"])
                if index_bad:
                    logger.warning("corrupt cache file %s (%s); recomputing all of it", self.final,
                                   _describe_damage(index_bad, feature_bad))
                    return self
                if feature_bad:
                    logger.warning("corrupt cache file %s (%s); recomputing those rows", self.final,
                                   _describe_damage(index_bad, feature_bad))
                for split in SPLITS:
                    digests = [d.decode() for d in h5[split]["digests"][...]]
                    for view in meta["views"]:
                        bad = feature_bad.get(f"{split}/{VIEW_DATASET[view]}", [])
                        for row, dig in enumerate(digests):
                            if not any(a <= row < b for a, b in bad):
                                self.sources.setdefault(dig, {})[view] = _Source("h5", split, row)
                for item in meta.get("skipped", []):
                    self.skipped[item["digest"]] = item["reason"]
                self.final_meta = meta
                self.intact = not feature_bad
        except _H5_ERRORS as exc:
            self.sources.clear()
            self.skipped.clear()
            self.final_meta = None
            logger.warning("ignoring unreadable cache file %s (%s: %s); recomputing", self.final,
                           type(exc).__name__, exc)
        return self

    def _load_chunks(self) -> None:
        if not self.partial.is_dir():
            return
        for marker in sorted(self.partial.glob("chunk-*.json")):
            try:
                info = json.loads(marker.read_text())
                if info.get("config_key") != self.config.key:
                    continue
                digests = info["digests"]
                for view in info["views"]:
                    arr = np.load(marker.with_suffix(f".{view}.npy"), allow_pickle=False)
                    if arr.shape != (len(digests), self.config.feature_dim):
                        raise ValueError(f"shape {arr.shape}")
                    if _checksum(arr) != info["checksums"][view]:
                        raise ValueError(f"checksum mismatch in its {view} features")
                for view in info["views"]:
                    for row, dig in enumerate(digests):
                        self.sources.setdefault(dig, {})[view] = _Source("chunk", marker.stem, row)
                self.skipped.update(info.get("skipped", {}))
            except (OSError, ValueError, KeyError) as exc:
                logger.warning("ignoring damaged chunk %s (%s)", marker.name, exc)

    def next_chunk_index(self) -> int:
        if not self.partial.is_dir():
            return 0
        indices = [int(p.stem[6:]) for p in self.partial.glob("chunk-*.json")
                   if p.stem[6:].isascii() and p.stem[6:].isdigit()]
        return max(indices, default=-1) + 1

    def write_chunk(self, index: int, digests: list[str], views: Sequence[str],
                    arrays: dict[str, np.ndarray], skipped: dict[str, str]) -> None:
        self.partial.mkdir(parents=True, exist_ok=True)
        stem = f"chunk-{index:06d}"
        for view in views:
            atomic_write(self.partial / f"{stem}.{view}.npy", functools.partial(np.save, arr=arrays[view]))
        info = {"config_key": self.config.key, "digests": digests, "views": list(views), "skipped": skipped,
                "checksums": {view: _checksum(np.asarray(arrays[view])) for view in views}}
        atomic_write(self.partial / f"{stem}.json", lambda fh: fh.write(json.dumps(info).encode()))
        for view in views:
            for row, dig in enumerate(digests):
                self.sources.setdefault(dig, {})[view] = _Source("chunk", stem, row)
        self.skipped.update(skipped)


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

    def __init__(self, backbone, weights: str, image_size: int, precision: str, batch_size: int):
        import keras
        import tensorflow as tf

        previous = keras.config.dtype_policy()
        if precision == "bfloat16":
            keras.config.set_dtype_policy("mixed_bfloat16")
        try:
            self.model = backbone.build(weights, image_size)
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

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Features for ``(n, S, S, 3)`` uint8 images, any ``n``, in batches of ``batch_size``."""
        out = [self._call(images[start:start + self.batch_size]).numpy()
               for start in range(0, len(images), self.batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.model.output_shape[-1]), np.float32)


def _model_factory(backbone, weights: str, size: int, precision: str, batch_size: int, resize: str,
                   workers: int, model_dir: Path | None):
    """What builds the feature model when there is work: float32/bfloat16 Keras, or int8 OpenVINO
    (the quantised model in ``model_dir``, resolved by :func:`catsdogs.features.int8.quantised_model`
    before the features were keyed by it)."""
    if precision != "int8":
        return lambda: FeatureModel(backbone, weights, size, precision, batch_size)
    assert model_dir is not None
    return Int8ModelFactory(backbone, weights, size, batch_size, model_dir, [], resize, workers)


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

    def __call__(self) -> int8.Int8FeatureModel:
        return int8.Int8FeatureModel(self.backbone, self.size, self.batch_size, self.model_dir)


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
    with their reasons: what :meth:`_Store.write_chunk` takes. The local engine calls it in this
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
        x = batch if view == "orig" else np.ascontiguousarray(batch[:, :, ::-1, :])
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


def _compute(store: _Store, work: list[_Work], model_factory, *, engine, image_size: int,
             resize: str, chunk_size: int, workers: int, progress: bool, desc: str
             ) -> tuple[int, float, dict[str, int]]:
    """The missing chunks, computed by ``engine`` (:meth:`catsdogs.compute.Engine.map_chunks`)
    and written here through ``store`` as each finishes: ``(images computed, seconds, images per
    node)``."""
    from tqdm.auto import tqdm

    if not work:
        return 0, 0.0, {}
    chunks = list(_chunks(work, chunk_size))
    state = {"index": store.next_chunk_index(), "computed": 0}
    nodes: dict[str, int] = {}
    suffix = "" if engine.name == "local" else f" ({engine.name})"
    bar = tqdm(total=len(work), desc=desc + suffix, unit="img", disable=not progress,
               dynamic_ncols=True)

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


def _gather(store: _Store, digests: list[str], view: str, h5_old, chunk_cache: dict) -> np.ndarray:
    out = np.empty((len(digests), store.config.feature_dim), np.float32)
    for i, dig in enumerate(digests):
        src = store.sources[dig][view]
        if src.kind == "h5":
            out[i] = h5_old[src.ref][VIEW_DATASET[view]][src.row]
        else:
            key = (src.ref, view)
            if key not in chunk_cache:
                if len(chunk_cache) > 8:
                    chunk_cache.clear()
                chunk_cache[key] = np.load(store.partial / f"{src.ref}.{view}.npy", mmap_mode="r")
            out[i] = chunk_cache[key][src.row]
    return out


def _assemble(store: _Store, rows: dict[str, list[tuple[ImageRecord, str]]], views: list[str],
              meta: dict[str, Any], block: int = 8 * CHECKSUM_ROWS) -> None:
    import h5py

    final = store.final
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    h5_old = h5py.File(final, "r") if store.final_meta is not None else None
    chunk_cache: dict = {}
    try:
        with h5py.File(tmp, "w") as h5:
            for key, value in meta.items():
                h5.attrs[key + "_json" if isinstance(value, (list, dict)) else key] = (
                    json.dumps(value) if isinstance(value, (list, dict)) else value
                )
            for split in SPLITS:
                items = rows[split]
                g = h5.create_group(split)
                n, d = len(items), store.config.feature_dim
                columns = {
                    "labels": np.array([r.label for r, _ in items], np.int8),
                    "ids": np.array([r.id for r, _ in items], np.int64),
                    "files": [r.relpath for r, _ in items],
                    "digests": np.array([dg for _, dg in items], dtype="S32"),
                }
                for name, values in columns.items():
                    ds = g.create_dataset(name, data=values, **(
                        {"dtype": h5py.string_dtype()} if name == "files" else {}))
                    _set_checksums(ds, [_checksum(values)], max(1, n))
                for view in views:
                    ds = g.create_dataset(VIEW_DATASET[view], shape=(n, d), dtype=np.float32)
                    sums = []
                    for start in range(0, n, block):
                        part = [dg for _, dg in items[start:start + block]]
                        values = _gather(store, part, view, h5_old, chunk_cache)
                        ds[start:start + len(part)] = values
                        sums += _block_checksums(values, CHECKSUM_ROWS)
                    _set_checksums(ds, sums, CHECKSUM_ROWS)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        if h5_old is not None:
            h5_old.close()
            h5_old = None
        replace_path(tmp, final)
    finally:
        if h5_old is not None:
            h5_old.close()
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    shutil.rmtree(store.partial, ignore_errors=True)


# --------------------------------------------------------------------------------------- API
def _fresh(store: _Store, listing: str, views: Sequence[str]) -> bool:
    """The finished file verified intact and made from exactly this listing, with these views."""
    old = store.final_meta
    return (store.intact and old is not None and old.get("listing_fingerprint") == listing
            and set(views) <= set(old["views"]))


def _check_options(backbones, weights, image_size, batch_size, precision, resize, chunk_size, workers):
    if not backbones:
        raise ConfigError("no backbone given; name at least one (e.g. --backbone resnet50)")
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
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
    """
    from catsdogs.plugins import get_registry

    names = [backbones] if isinstance(backbones, str) else list(backbones)
    _check_options(names, weights, image_size, batch_size, precision, resize, chunk_size, workers)
    if precision == "int8":
        int8.check_calibration_size(calibration_size)
        int8.require_engine()
    registry = registry or get_registry()
    specs = []
    for name in names:  # validate everything before computing anything
        backbone = registry.backbone(name)
        backbone.check_weights(weights)
        size = backbone.input_size if image_size is None else image_size
        backbone.check_image_size(size)
        specs.append((backbone, size))

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
    views = ["orig", "flip"] if flip else ["orig"]
    chunk_size = -(-chunk_size // batch_size) * batch_size  # whole batches per chunk

    results: list[ExtractResult] = []
    unreadable: dict[str, str] = {}
    for backbone, size in specs:
        t0 = time.perf_counter()
        config = FeatureConfig(
            backbone=backbone.name,
            weights=weights,
            weights_id=backbone.weights_id(weights),
            image_size=size,
            resize=resize,
            precision=precision,
            preprocessing=backbone.preprocessing,
            feature_dim=backbone.feature_dim,
        )
        quantised = None
        if precision == "int8":  # int8 features are keyed by the quantised model's content hash
            quantised = int8.quantised_model(
                directory, backbone, slot=int8.slot_key({k: v for k, v in asdict(config).items()
                                                         if k not in ("precision", "calibration")}),
                records=records, digests=digests, requested=calibration_size,
                build=functools.partial(backbone.build, weights, size), image_size=size,
                resize=resize, workers=workers, recalibrate=recalibrate, progress=progress,
                lock=_locked)
            config = dataclasses.replace(config, calibration=quantised.key)
        final = directory / config.filename
        if is_url(ds.root) and not final.exists():  # the same photos cached from a local copy?
            final = _copy_cache(cache_root, config.filename, listing) or final
        # a finished, verified file is used read-only: no lock, no write (read-only caches work)
        store = _Store(final, config).load_final()
        warm = _fresh(store, listing, views)
        with contextlib.nullcontext() if warm else _locked(final):
            if not warm:
                remove_stale_temporaries(directory)  # e.g. an .h5 being assembled when killed
                remove_stale_temporaries(final.with_name(final.name + ".partial"))
                store = _Store(final, config).load()
            old = store.final_meta
            if old is not None and _fresh(store, listing, views):
                result = ExtractResult(backbone.name, final, config, old["n_train"], old["n_test"],
                                       computed=0, reused=old["n_train"] + old["n_test"],
                                       skipped=[(s["file"], s["reason"]) for s in old.get("skipped", [])])
            else:
                # keep every view the old file had, so a later call without --flip loses nothing
                file_views = [v for v in VIEWS if v in views or (old and v in old["views"])]
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
                                   quantised.directory if quantised else None),
                    engine=engine, image_size=size, resize=resize, chunk_size=chunk_size, workers=workers,
                    progress=progress, desc=f"{backbone.name} features",
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
                meta = {
                    "format_version": FORMAT_VERSION,
                    "config_key": config.key,
                    **{k: v for k, v in asdict(config).items()},
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
                _assemble(store, rows, file_views, meta)
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
