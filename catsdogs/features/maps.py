"""Cached feature maps entering a backbone's last block(s), in float16 (issue 24, lever 4).

The ``finetune`` head (:mod:`catsdogs.builtin.finetune`) trains a backbone's top block(s) on the
maps that enter them. Those come from one forward pass per photo through the backbone's bottom
(:meth:`~catsdogs.components.TopSplit.split_top`) and are cached like every feature set:

* keyed by everything that determines them: backbone, weights id, input size, resize policy, the
  number of top blocks, the maps' shape and what computed them (:class:`MapsConfig`), in the data
  set's feature-cache folder (:func:`catsdogs.features.cache.dataset_cache_dir`)::

      <cache>/features/<data dir>-<hash>/<backbone>-<size>-<weights>-<resize>-maps<blocks>-<key>/
      <cache>/features/<data dir>-<hash>/<backbone>-<size>-<weights>-<resize>-maps<blocks>-openvino-<key>/

* content-addressed: every row is stored under the BLAKE2b digest of its photo's bytes, so an
  added or changed photo costs one forward pass and a row never belongs to other bytes;
* in chunks (``chunk-<hash of its digests>.npz``: the flattened float16 maps and their digests,
  then ``.json``: the key, digests, skipped photos and a checksum of the maps, written last; both
  through :func:`catsdogs.util.fileio.atomic_write`): after ``kill -9`` every finished chunk is
  reused; a damaged chunk (found when its rows are read, each chunk once, checked against its
  marker's checksum) is ignored with a warning and its photos recomputed;
* computed by the engine's :meth:`~catsdogs.compute.Engine.map_chunks` with extraction's worker
  (:class:`catsdogs.features.extraction.ChunkFeatures`: decoding threads, one compiled call);
* by TensorFlow (``runtime="tensorflow"``, the default: the bottom as the export's graph computes
  it) or by OpenVINO in float32 (``"openvino"``, the backbone's ``maps_runtime``: the same bottom
  converted, as ``runtime: openvino`` computes features, and cast to float16 alike; about 1.7-1.9x
  less CPU for EfficientNet-Lite0/1/2, ``bench/maps_runtime.py``). The two give equal float16 maps
  but for round-off (about 1.3 % of values one float16 step apart); each runtime has its own key,
  and TensorFlow's keys are those of before the choice existed.

float16 halves the cache and the memory of the maps (Lite0 at 224 px: 7 x 7 x 192 = 9,408 values,
18.8 kB a photo, 376 MB for 20,000 photos); the head rounds its input to float16 too, so the
export, which computes the maps in float32, predicts what training saw.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from catsdogs.compute import LOCAL, Engine
from catsdogs.errors import ConfigError
from catsdogs.features.cache import RUNTIMES, SPLITS, dataset_cache_dir, default_cache_dir
from catsdogs.util.fileio import atomic_write

logger = logging.getLogger("catsdogs")

#: the maps cache's format; part of every key
MAPS_FORMAT = 1


@dataclass(frozen=True)
class MapsConfig:
    """Everything that determines a photo's cached maps apart from its bytes."""

    backbone: str
    weights: str
    weights_id: str
    image_size: int
    resize: str
    blocks: int
    shape: tuple[int, ...]  # (h, w, c) of the maps entering the top block(s)
    runtime: str = "tensorflow"  # what computes them (:data:`~catsdogs.features.cache.RUNTIMES`)

    @property
    def width(self) -> int:
        return math.prod(self.shape)

    @property
    def key(self) -> str:
        fields = asdict(self)
        if self.runtime == "tensorflow":  # the keys of every maps cache from before the choice
            del fields["runtime"]
        blob = json.dumps({**fields, "kind": "maps", "dtype": "float16", "format": MAPS_FORMAT},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def dirname(self) -> str:
        runtime = "" if self.runtime == "tensorflow" else f"{self.runtime}-"
        return (f"{self.backbone}-{self.image_size}-{self.weights}-{self.resize}-maps{self.blocks}-"
                f"{runtime}{self.key[:10]}")


@dataclass
class MapsSplit:
    """One split's rows: ``X`` is ``(n, h*w*c)`` float16 (row-major flattened maps)."""

    X: np.ndarray
    y: np.ndarray
    ids: np.ndarray
    files: list[str]
    digests: list[str]

    def __len__(self) -> int:
        return len(self.files)


@dataclass
class MapsSet:
    config: MapsConfig
    path: Path
    train: MapsSplit
    test: MapsSplit
    computed: int = 0  # photos whose maps this call computed
    skipped: dict[str, str] = field(default_factory=dict)  # relpath -> reason


class MapsModel:
    """The bottom model behind one compiled call on uint8 batches: flattened float16 maps, computed
    by TensorFlow or (``runtime="openvino"``) by the same bottom converted to OpenVINO and run in
    float32 (:class:`catsdogs.features.int8.Float32FeatureModel`, what ``runtime: openvino``
    computes features with)."""

    def __init__(self, backbone, weights: str, image_size: int, blocks: int, batch_size: int,
                 runtime: str = "tensorflow"):
        import tensorflow as tf

        from catsdogs.util.tf_log import float16_notice_held

        bottom, _ = backbone.split_top(weights, image_size, blocks=blocks)
        self.batch_size = batch_size
        self.width = math.prod(int(s) for s in bottom.output_shape[1:])
        self._openvino: Any = None
        if runtime == "openvino":
            from catsdogs.features.int8 import Float32FeatureModel

            self._openvino = Float32FeatureModel(bottom, image_size, batch_size)
            return
        float16_notice_held()  # the maps are cast to float16
        spec = tf.TensorSpec([None, image_size, image_size, 3], tf.uint8)

        @tf.function(input_signature=[spec])
        def _call(x):
            maps = bottom(tf.cast(x, tf.float32), training=False)
            return tf.cast(tf.reshape(maps, [tf.shape(maps)[0], -1]), tf.float16)

        self._call = _call

    def __call__(self, images: np.ndarray) -> np.ndarray:
        if self._openvino is not None:  # float32 maps, cast as TensorFlow's graph casts them
            return self._openvino(images).reshape(len(images), self.width).astype(np.float16)
        out = [self._call(images[s:s + self.batch_size]).numpy()
               for s in range(0, len(images), self.batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.width), np.float16)


@dataclass
class MapsModelFactory:
    """Builds :class:`MapsModel` in a worker (picklable for engines that ship it)."""

    backbone: Any
    weights: str
    image_size: int
    blocks: int
    batch_size: int
    runtime: str = "tensorflow"

    def __call__(self) -> MapsModel:
        return MapsModel(self.backbone, self.weights, self.image_size, self.blocks,
                         self.batch_size, self.runtime)


def maps_config(backbone, weights: str, image_size: int | None, blocks: int,
                resize: str = "squash", runtime: str = "tensorflow") -> MapsConfig:
    """The configuration of ``backbone``'s maps entering its last ``blocks`` block(s), computed
    by ``runtime`` (``openvino`` needs OpenVINO importable: one
    :class:`~catsdogs.util.extras.MissingExtraError` otherwise)."""
    from catsdogs.components import has_top_split

    if runtime not in RUNTIMES:
        raise ConfigError(f"unknown maps runtime {runtime!r}; choose one of: {', '.join(RUNTIMES)}")
    if runtime == "openvino":
        from catsdogs.features.int8 import require_float32_runtime

        require_float32_runtime(f"maps_runtime: openvino ({backbone.name}'s fine-tune maps "
                                "computed by OpenVINO)")
    if not has_top_split(backbone):
        raise ConfigError(f"backbone {backbone.name!r} cannot be cut before its last blocks (it "
                          "does not offer split_top), so it has no maps to fine-tune on")
    size = int(image_size or backbone.input_size)
    weights_id = backbone.weights_id(weights)
    # the shape needs the split network built (seconds for a real backbone): once per process
    memo = (type(backbone).__module__, type(backbone).__qualname__, backbone.name, weights_id,
            size, int(blocks))
    if memo not in _MAPS_SHAPES:
        _, top = backbone.split_top(weights, size, blocks=blocks)
        _MAPS_SHAPES[memo] = tuple(int(s) for s in top.input.shape[1:])
    return MapsConfig(backbone.name, weights, weights_id, size, resize, int(blocks),
                      _MAPS_SHAPES[memo], runtime)


#: :func:`maps_config`'s maps shapes, per backbone class, weights, input size and top blocks
_MAPS_SHAPES: dict[tuple[Any, ...], tuple[int, ...]] = {}


def _checksum(arr: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(arr).tobytes(), digest_size=16).hexdigest()


@dataclass
class _Chunks:
    """The finished chunks of a maps cache folder, from their ``.json`` markers alone: where each
    digest's row is, the skipped photos, and each chunk's row count and checksum (its rows are
    read, and checked against that checksum, once: by :func:`_gather`)."""

    where: dict[str, tuple[Path, int]] = field(default_factory=dict)  # digest -> (.npz, row)
    skipped: dict[str, str] = field(default_factory=dict)
    sums: dict[Path, tuple[int, str]] = field(default_factory=dict)  # .npz -> (rows, checksum)

    def add(self, npz: Path, digests: list[str], skipped: Mapping[str, str], checksum: str) -> None:
        self.where.update((d, (npz, i)) for i, d in enumerate(digests))
        self.skipped.update(skipped)
        self.sums[npz] = (len(digests), checksum)


class _DamagedChunk(Exception):
    """A chunk whose rows cannot be read or do not match its marker's checksum."""

    def __init__(self, npz: Path, reason: Exception):
        super().__init__(f"{npz}: {reason}")
        self.npz, self.reason = npz, reason


def _scan_chunks(folder: Path, config: MapsConfig, damaged: set[Path]) -> _Chunks:
    """Every finished chunk of ``config`` in ``folder`` but the ``damaged`` ones, each from its
    marker (nothing of its maps is read here); an unreadable marker is left out with a warning
    (its photos are recomputed)."""
    chunks = _Chunks()
    if not folder.is_dir():
        return chunks
    for marker in sorted(folder.glob("chunk-*.json")):
        npz = marker.with_suffix(".npz")
        if npz in damaged:
            continue
        try:
            info = json.loads(marker.read_text())
            if info.get("key") != config.key:
                continue
            digests, checksum = [str(d) for d in info["digests"]], str(info["checksum"])
            skipped = {str(k): str(v) for k, v in info.get("skipped", {}).items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            logger.warning("ignoring damaged maps chunk %s (%s); its photos are recomputed",
                           marker, exc)
            continue
        chunks.add(npz, digests, skipped, checksum)
    return chunks


def _read_chunk(npz: Path, config: MapsConfig, n: int | None = None) -> np.ndarray:
    """A chunk's ``(n, width)`` float16 maps (``n`` None: any number of rows; ValueError:
    another dtype or shape)."""
    with np.load(npz, allow_pickle=False) as arrays:
        maps = arrays["maps"]
    if maps.dtype != np.float16 or maps.ndim != 2 or maps.shape[1] != config.width \
            or (n is not None and maps.shape[0] != n):
        raise ValueError(f"maps of {maps.dtype} {maps.shape}")
    return maps


def _gather(chunks: _Chunks, digests: Mapping[str, list[str]], config: MapsConfig) -> dict[str, np.ndarray]:
    """Per split, the rows of its ``digests`` (each in ``chunks.where``), in that order, read
    chunk by chunk into one array per split: the maps are held once, never a second time while
    they are put in order, and each chunk is read once (a chunk may hold rows of both splits) and
    checked against its marker's checksum as it is read (:class:`_DamagedChunk` when it does not
    match)."""
    X = {split: np.empty((len(d), config.width), np.float16) for split, d in digests.items()}
    by_chunk: dict[Path, list[tuple[str, int, int]]] = {}
    for split, digs in digests.items():
        for out_row, digest in enumerate(digs):
            npz, row = chunks.where[digest]
            by_chunk.setdefault(npz, []).append((split, out_row, row))
    for npz, places in by_chunk.items():
        rows, checksum = chunks.sums[npz]
        try:
            maps = _read_chunk(npz, config, rows)
            if _checksum(maps) != checksum:
                raise ValueError("checksum mismatch")
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise _DamagedChunk(npz, exc) from exc
        for split in digests:
            pairs = [(o, r) for s, o, r in places if s == split]
            if pairs:
                out_rows, in_rows = (np.array(v) for v in zip(*pairs))
                X[split][out_rows] = maps[in_rows]
        del maps
    return X


def _write_chunk(folder: Path, config: MapsConfig, digests: list[str], maps: np.ndarray,
                 skipped: dict[str, str]) -> tuple[Path, str]:
    folder.mkdir(parents=True, exist_ok=True)
    maps = np.ascontiguousarray(maps, dtype=np.float16).reshape(len(digests), config.width)
    stem = "chunk-" + hashlib.blake2b("\n".join(digests + sorted(skipped)).encode(),
                                      digest_size=8).hexdigest()
    atomic_write(folder / f"{stem}.npz", functools.partial(np.savez, maps=maps))
    checksum = _checksum(maps)
    info = {"key": config.key, "digests": digests, "skipped": skipped, "checksum": checksum}
    atomic_write(folder / f"{stem}.json", lambda fh: fh.write(json.dumps(info).encode()))
    return folder / f"{stem}.npz", checksum


def cache_maps(data_dir: str | os.PathLike, backbone: str, *, weights: str = "imagenet",
               image_size: int | None = None, blocks: int = 1, resize: str = "squash",
               cache_dir: str | os.PathLike | None = None, chunk_size: int = 256,
               batch_size: int = 32, workers: int = 2, registry=None, dataset=None,
               digests: Sequence[str] | None = None, engine: Engine = LOCAL,
               progress: bool = False, order: Mapping[str, Sequence[str]] | None = None,
               runtime: str = "tensorflow") -> MapsSet:
    """The float16 maps entering ``backbone``'s last ``blocks`` block(s) for every photo of
    ``data_dir`` (computed once per photo content and configuration, see the module docstring),
    by ``runtime``: ``tensorflow`` or ``openvino`` (float32, needs OpenVINO: ``catsdogs[int8]``).
    ``progress``: a bar on stderr while maps are computed. ``order``: per split, the photos
    (relative paths) to return, in that order (e.g. the rows of the features they join; one
    without maps is left out); default every photo, in the data set's order. The rows are read
    from the cache chunk by chunk into one array per split, so the maps are held once."""
    from catsdogs.dataset.layout import digest_all, open_dataset
    from catsdogs.features.extraction import ChunkFeatures
    from catsdogs.util.progress import progress_bar

    if registry is None:
        from catsdogs.plugins import get_registry

        registry = get_registry()
    bb = registry.backbone(backbone)
    bb.check_weights(weights)
    config = maps_config(bb, weights, image_size, blocks, resize, runtime)
    ds = dataset if dataset is not None else open_dataset(data_dir)
    records = ds.records
    digs = list(digests) if digests is not None else digest_all(records, engine=engine)
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    folder = dataset_cache_dir(root, Path(ds.root)) / config.dirname

    computed = 0
    excluded: set[Path] = set()  # chunks found damaged while read and not rewritten since
    times: dict[Path, int] = {}  # how often each chunk was found damaged

    def compute(chunks: _Chunks) -> None:
        """The maps of every photo that no intact chunk holds, written chunk by chunk."""
        nonlocal computed
        todo: dict[str, Any] = {}
        for rec, dig in zip(records, digs):
            if dig not in chunks.where and dig not in chunks.skipped and dig not in todo:
                todo[dig] = rec
        if not todo:
            return
        items = list(todo.items())
        parts = [items[i:i + chunk_size] for i in range(0, len(items), chunk_size)]
        factory = functools.partial(
            ChunkFeatures,
            engine.portable(MapsModelFactory(bb, weights, config.image_size, config.blocks,
                                             batch_size, runtime)),
            config.image_size, resize, config.width, workers)

        def args_of(part):
            return ("orig",), [d for d, _ in part], engine.payload([r.path for _, r in part])

        label = "" if runtime == "tensorflow" else f" ({runtime})"
        bar = progress_bar(total=len(items), desc=f"{backbone} maps{label}", unit="img",
                           enabled=progress)

        def on_result(part, out, node, pid) -> None:
            nonlocal computed
            digests, skipped = list(out["digests"]), dict(out["skipped"])
            npz, checksum = _write_chunk(folder, config, digests, out["arrays"]["orig"], skipped)
            excluded.discard(npz)  # rewritten (the same photos give the same name): read it again
            chunks.add(npz, digests, skipped, checksum)
            computed += len(digests)
            bar.update(len(part))

        def what(part):
            return f"the maps of {len(part)} photos {part[0][1].relpath} .. {part[-1][1].relpath}"

        try:
            engine.map_chunks(factory, parts, args_of, on_result, what)
        finally:
            bar.close()

    while True:  # a chunk found damaged while read is left out and its photos recomputed
        chunks = _scan_chunks(folder, config, excluded)
        compute(chunks)
        rows = {}
        for split in SPLITS:
            recs = [(r, d) for r, d in zip(records, digs) if r.split == split and d in chunks.where]
            if order is not None:  # the caller's rows, in its order (those that have maps)
                by_path = {r.relpath: (r, d) for r, d in recs}
                recs = [by_path[f] for f in order.get(split, ()) if f in by_path]
            rows[split] = recs
        try:
            X = _gather(chunks, {split: [d for _, d in recs] for split, recs in rows.items()}, config)
            break
        except _DamagedChunk as bad:
            times[bad.npz] = times.get(bad.npz, 0) + 1
            if times[bad.npz] >= 2:
                raise OSError(f"the maps cache chunk {bad.npz} is damaged again after it was "
                              f"recomputed ({bad.reason}); check the disk under {folder}") from bad
            logger.warning("ignoring damaged maps chunk %s (%s); its photos are recomputed",
                           bad.npz, bad.reason)
            excluded.add(bad.npz)
    splits = {split: MapsSplit(X[split], np.array([r.label for r, _ in recs], np.int8),
                               np.array([r.id for r, _ in recs], np.int64),
                               [r.relpath for r, _ in recs], [d for _, d in recs])
              for split, recs in rows.items()}
    reasons = {r.relpath: chunks.skipped[d] for r, d in zip(records, digs) if d in chunks.skipped}
    return MapsSet(config, folder, splits["train"], splits["test"], computed, reasons)
