"""The feature cache's format: configuration key, checksums, the HDF5 file, chunk markers, loading.

One HDF5 file per (data directory, backbone configuration)::

    $CACHE/features/<data dir name>-<hash of its path>/<backbone>-<size>-<weights>-<precision>-<resize>-<key>.h5

The configuration key (:attr:`FeatureConfig.key`) covers the backbone name, weights id, input size,
resize policy, precision (int8: the quantised model's hash; float32: its runtime, when OpenVINO), the feature views (``layers``, input
``views`` and their ``merge``; left out at their defaults, so older keys stay valid) and the cache
format. Inside, every row carries the BLAKE2b digest of its
image file, so a row's features are reused only for byte-identical content. Datasets: ``features``
(always) and ``features_flip`` (horizontally flipped input, for test-time augmentation).

Durability: :class:`Store` writes each finished chunk atomically into ``<file>.partial/`` (``.npy``
arrays, then a ``.json`` marker, each via rename); :func:`assemble` writes the final ``.h5`` to a
temporary name and renames it into place, so a half-written file is never taken for a finished one.

Integrity (format 2): every dataset of the ``.h5`` carries BLAKE2b checksums of its rows in blocks
of :data:`CHECKSUM_ROWS` (attributes ``checksums`` and ``checksum_rows``), and every chunk marker
the checksums of its arrays. :meth:`Store.load` verifies them before anything is reused (rows of a
corrupt block are left out, to be recomputed, with a warning; a corrupt label/id/file/digest
column, or unreadable HDF5 metadata, leaves out the whole file); :func:`load_features` refuses a
corrupt file with a :class:`~catsdogs.errors.DataError` naming it. Caches of format 1 (no
checksums) have another configuration key, so they are recomputed, never trusted.

What computes the features (decode, the network, chunks, engines) is
:mod:`catsdogs.features.extraction`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from catsdogs.components import DEFAULT_CROP_FRACTION, has_crop_views
from catsdogs.dataset.layout import ImageRecord
from catsdogs.errors import DataError
from catsdogs.util.fileio import atomic_write, replace_path

logger = logging.getLogger("catsdogs")

__all__ = ["CHECKSUM_ROWS", "FORMAT_VERSION", "PRECISIONS", "RUNTIMES", "SPLITS", "VIEWS", "VIEW_DATASET",
           "FeatureConfig", "FeatureSet", "FeatureSplit", "Source", "Store", "assemble",
           "dataset_cache_dir", "default_cache_dir", "find_copy", "is_fresh", "load_features",
           "runtime_of"]


FORMAT_VERSION = 2  # 2: row-block checksums in the .h5 and the chunk markers
#: rows per checksum block of a feature dataset
CHECKSUM_ROWS = 256
#: feature precisions (int8: post-training quantised backbones, calibrated on training images)
PRECISIONS = ("float32", "bfloat16", "int8")
#: what computes float32 features: TensorFlow (the Keras network itself, as the export's graph
#: does) or OpenVINO (the same network converted, in float32; the ``int8`` extra)
RUNTIMES = ("tensorflow", "openvino")
VIEWS = ("orig", "flip")
VIEW_DATASET = {"orig": "features", "flip": "features_flip"}
SPLITS = ("train", "test")


def runtime_of(precision: str, runtime: str) -> str:
    """What computes features of ``precision`` when ``runtime`` is asked for: ``runtime`` for
    float32; int8 features always run on OpenVINO and bfloat16 ones on TensorFlow, whatever it
    says, and both are keyed as ``tensorflow`` (the default, left out of the key)."""
    return runtime if precision == "float32" else "tensorflow"


# --------------------------------------------------------------------------------------- config
#: FeatureConfig fields left out of the key at these (default) values
_OPTIONAL: dict[str, Any] = {"calibration": "", "layers": (), "input_views": ("orig",), "merge": "mean",
                             "runtime": "tensorflow"}


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
    #: earlier layers whose pooled features follow the last (``layers:``), in network order
    layers: tuple[str, ...] = ()
    #: input views whose features are merged into one vector (``views:``), and how (``merge:``)
    input_views: tuple[str, ...] = ("orig",)
    merge: str = "mean"
    #: the crop views' side as a fraction of the image's (``crop_fraction:``); in the key only
    #: when a crop view is among ``input_views``
    crop_fraction: float = DEFAULT_CROP_FRACTION
    #: float32 only: what computed the features (:data:`RUNTIMES`); int8 is always OpenVINO's,
    #: keyed by its quantised model (``calibration``), bfloat16 always TensorFlow's
    runtime: str = "tensorflow"

    def identity(self) -> dict[str, Any]:
        """The fields that make the key: options at their defaults are left out, so a key stays
        what it was before the option existed (int8's ``calibration``, ``layers``, ``views``,
        ``runtime``);
        ``crop_fraction`` is in it only when some view crops."""
        fields = asdict(self)
        if len(self.input_views) == 1:  # one view: nothing is merged
            fields["merge"] = _OPTIONAL["merge"]
        if not has_crop_views(self.input_views):  # no crop: the fraction changes nothing
            del fields["crop_fraction"]
        return {k: v for k, v in fields.items() if k not in _OPTIONAL or v != _OPTIONAL[k]}

    @property
    def key(self) -> str:
        blob = json.dumps({**self.identity(), "format": FORMAT_VERSION}, sort_keys=True)
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


def find_copy(cache_dir: Path, filename: str, listing: str) -> Path | None:
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


def read_feature_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata (HDF5 attributes) of a feature file, without reading or verifying its rows:
    enough to tell which configuration, data set and (int8) quantised model it belongs to.
    :func:`load_features` reads and verifies the rows."""
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            return _read_meta(h5)
    except _H5_ERRORS as exc:
        raise DataError(f"{path}: not a readable feature file ({type(exc).__name__}: {exc}); "
                        "run `catsdogs extract` (or `catsdogs run`) again to recompute it") from None



# --------------------------------------------------------------------------------------- store
@dataclass
class Source:
    """Where the features of one digest live: a row of the old .h5 or of a chunk file."""

    kind: str  # "h5" or "chunk"
    ref: Any  # (split, row) for h5; chunk stem for chunk
    row: int


class Store:
    """Index of everything already computed for one configuration: digest -> view -> source."""

    def __init__(self, final: Path, config: FeatureConfig):
        self.final = final
        self.partial = final.with_name(final.name + ".partial")
        self.config = config
        self.sources: dict[str, dict[str, Source]] = {}
        self.skipped: dict[str, str] = {}
        self.final_meta: dict[str, Any] | None = None
        self.intact = False  # set by load_final: the finished file verified, all rows usable

    def load(self) -> Store:
        self.load_final()
        self._load_chunks()
        return self

    def load_final(self) -> Store:
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
                                self.sources.setdefault(dig, {})[view] = Source("h5", split, row)
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
                        self.sources.setdefault(dig, {})[view] = Source("chunk", marker.stem, row)
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
                self.sources.setdefault(dig, {})[view] = Source("chunk", stem, row)
        self.skipped.update(skipped)



# --------------------------------------------------------------------------------------- assemble
def _gather(store: Store, digests: list[str], view: str, h5_old, chunk_cache: dict) -> np.ndarray:
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


def assemble(store: Store, rows: dict[str, list[tuple[ImageRecord, str]]], views: list[str],
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


def is_fresh(store: Store, listing: str, views: Sequence[str]) -> bool:
    """The finished file verified intact and made from exactly this listing, with these views."""
    old = store.final_meta
    return (store.intact and old is not None and old.get("listing_fingerprint") == listing
            and set(views) <= set(old["views"]))
