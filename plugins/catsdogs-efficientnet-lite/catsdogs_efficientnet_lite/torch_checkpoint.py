"""Read PyTorch checkpoints (state dicts of tensors) into numpy arrays, without PyTorch.

Two on-disk formats exist:

* the **legacy** format (``torch.save`` before PyTorch 1.6, or with
  ``_use_new_zipfile_serialization=False``): one stream of consecutive pickles -- the magic number
  ``0x1950a86a20f9469cfc6c``, the protocol version ``1001``, a dict of system information
  (byte order, type sizes), then the object itself, whose tensors point at storages through
  *persistent ids* ``('storage', torch.FloatStorage, key, location, numel, view)``, then the sorted
  list of storage keys, and finally each storage's raw bytes as ``int64 numel`` followed by
  ``numel * element size`` bytes in the writer's byte order;
* the **zip** format (PyTorch >= 1.6): a zip archive with ``<name>/data.pkl`` (the same kind of
  pickle, persistent ids without ``view``) and one member ``<name>/data/<key>`` per storage.

A tensor is pickled as ``torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride,
requires_grad, backward_hooks[, metadata])``; offset and strides count elements. The reader
materialises each tensor as a C-contiguous numpy copy.

Unpickling is restricted: only ``collections.OrderedDict``, the tensor rebuild functions and the
storage types are allowed as globals, so a checkpoint cannot run code. Anything else raises
:class:`CheckpointFormatError` (callers may then fall back to ``torch.load``).
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = ["LEGACY_MAGIC", "LEGACY_PROTOCOL", "STORAGE_DTYPES", "CheckpointFormatError",
           "load", "load_state_dict"]

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

#: torch storage class name -> numpy dtype of its elements (``bfloat16`` is widened to float32)
STORAGE_DTYPES: dict[str, str] = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "UntypedStorage": "uint8",
}


class CheckpointFormatError(ValueError):
    """The file is not a PyTorch checkpoint this reader understands (or it is damaged)."""


# -- pickled objects ---------------------------------------------------------------------------------
class _StorageType:
    """Stands for ``torch.FloatStorage`` etc. inside the pickle."""

    def __init__(self, name: str):
        self.name = name
        kind = STORAGE_DTYPES[name]
        self.bfloat16 = kind == "bfloat16"
        self.dtype = np.dtype("uint16" if self.bfloat16 else kind)

    def __repr__(self) -> str:
        return f"torch.{self.name}"


class _Storage:
    """A root storage: ``numel`` elements of one type, filled in after the pickle is read."""

    def __init__(self, key: str, stype: _StorageType, numel: int):
        self.key, self.stype, self.numel = key, stype, int(numel)
        self.array: np.ndarray | None = None

    def fill(self, data: bytes, byteorder: str) -> None:
        dtype = self.stype.dtype.newbyteorder("<" if byteorder == "little" else ">")
        expected = self.numel * dtype.itemsize
        if len(data) != expected:
            raise CheckpointFormatError(
                f"storage {self.key}: expected {expected} bytes ({self.numel} x {self.stype}), "
                f"found {len(data)} (truncated file?)")
        array = np.frombuffer(data, dtype=dtype).astype(dtype.newbyteorder("="), copy=True)
        if self.stype.bfloat16:  # bfloat16 is the upper half of a float32
            array = (array.astype(np.uint32) << 16).view(np.float32)
        self.array = array


class _StorageView:
    """``numel`` elements of a root storage starting at element ``offset`` (legacy views)."""

    def __init__(self, root: _Storage, offset: int, numel: int):
        self.root, self.offset, self.numel = root, int(offset), int(numel)


class _Tensor:
    def __init__(self, storage: _StorageView, offset: int, size, stride):
        if not isinstance(storage, _StorageView):
            raise CheckpointFormatError(f"tensor rebuilt from {type(storage).__name__}, not a storage")
        self.storage, self.offset = storage, int(offset)
        self.size = tuple(int(s) for s in size)
        self.stride = tuple(int(s) for s in stride)
        if len(self.size) != len(self.stride):
            raise CheckpointFormatError(f"tensor size {self.size} and stride {self.stride} differ in length")

    def materialise(self) -> np.ndarray:
        root = self.storage.root
        if root.array is None:
            raise CheckpointFormatError(f"storage {root.key} has no data in the file")
        base = root.array[self.storage.offset:self.storage.offset + self.storage.numel]
        if any(s == 0 for s in self.size):
            return np.zeros(self.size, dtype=base.dtype)
        if self.offset < 0 or any(st < 0 for st in self.stride):
            raise CheckpointFormatError(f"negative offset or stride ({self.offset}, {self.stride})")
        last = self.offset + sum((n - 1) * st for n, st in zip(self.size, self.stride))
        if last >= len(base):
            raise CheckpointFormatError(
                f"tensor of size {self.size}, stride {self.stride}, offset {self.offset} reaches "
                f"element {last} of a storage of {len(base)}")
        item = base.itemsize
        view = np.lib.stride_tricks.as_strided(
            base[self.offset:], shape=self.size, strides=tuple(st * item for st in self.stride),
            writeable=False)
        return np.array(view, copy=True, order="C")  # (ascontiguousarray would make 0-d 1-d)


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored) -> _Tensor:
    # _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, backward_hooks[, metadata])
    return _Tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *_ignored):
    return data


def _header_only(module: str, name: str):
    raise CheckpointFormatError(f"unexpected global {module}.{name} in a checkpoint header")


class _HeaderUnpickler(pickle.Unpickler):
    """For the plain values of the legacy header: no globals at all."""

    def find_class(self, module, name):
        _header_only(module, name)

    def persistent_load(self, pid):
        raise CheckpointFormatError("unexpected persistent id in a checkpoint header")


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes], storages: dict[str, _Storage]):
        super().__init__(file)
        self.storages = storages

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        if module == "torch" and name == "Size":
            return tuple
        raise CheckpointFormatError(
            f"the checkpoint contains {module}.{name}, which this reader does not support "
            "(only state dicts of plain tensors)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise CheckpointFormatError(f"unsupported persistent id {pid!r}")
        stype, key, _location, numel = pid[1:5]
        view = pid[5] if len(pid) > 5 else None
        if not isinstance(stype, _StorageType):
            raise CheckpointFormatError(f"unsupported storage type {stype!r}")
        key = str(key)
        root = self.storages.get(key)
        if root is None:
            root = self.storages[key] = _Storage(key, stype, numel)
        elif root.stype.name != stype.name:
            raise CheckpointFormatError(f"storage {key} used as both {root.stype} and {stype}")
        if view is not None:  # (view key, offset, size) into the root storage (PyTorch < 1.6)
            _view_key, offset, size = view
            return _StorageView(root, offset, size)
        return _StorageView(root, 0, root.numel)


def _materialise(obj: Any) -> Any:
    if isinstance(obj, _Tensor):
        return obj.materialise()
    if isinstance(obj, collections.OrderedDict):
        return collections.OrderedDict((k, _materialise(v)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: _materialise(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_materialise(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_materialise(v) for v in obj)
    if isinstance(obj, (_Storage, _StorageView, _StorageType)):
        raise CheckpointFormatError("the checkpoint contains bare storages (only tensors are supported)")
    return obj


# -- the two formats ---------------------------------------------------------------------------------
def _read_legacy(f: IO[bytes]) -> Any:
    def header() -> Any:
        try:
            return _HeaderUnpickler(f).load()
        except CheckpointFormatError:
            raise
        except Exception as exc:
            raise CheckpointFormatError(f"not a PyTorch checkpoint ({type(exc).__name__}: {exc})") from None

    magic = header()
    if magic != LEGACY_MAGIC:
        raise CheckpointFormatError("not a PyTorch checkpoint (wrong magic number)")
    protocol = header()
    if protocol != LEGACY_PROTOCOL:
        raise CheckpointFormatError(f"unsupported legacy protocol version {protocol!r}")
    sys_info = header()
    byteorder = "little"
    if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
        byteorder = "big"

    storages: dict[str, _Storage] = {}
    try:
        obj = _Unpickler(f, storages).load()
    except CheckpointFormatError:
        raise
    except Exception as exc:
        raise CheckpointFormatError(f"cannot unpickle the checkpoint ({type(exc).__name__}: {exc})") from None
    keys = header()
    if not isinstance(keys, list):
        raise CheckpointFormatError("the storage key list is missing")
    for key in keys:
        root = storages.get(str(key))
        if root is None:
            raise CheckpointFormatError(f"storage {key} is listed but no tensor uses it")
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointFormatError(f"storage {key}: file ends before its size (truncated file?)")
        (numel,) = struct.unpack("<q" if byteorder == "little" else ">q", raw)
        if numel != root.numel:
            raise CheckpointFormatError(f"storage {key}: {numel} elements on disk, {root.numel} expected")
        root.fill(f.read(numel * root.stype.dtype.itemsize), byteorder)
    return _materialise(obj)


def _read_zip(path: Path) -> Any:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pickles = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise CheckpointFormatError(f"zip checkpoint with {len(pickles)} data.pkl members")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = "little"
        if prefix + "byteorder" in names:
            byteorder = zf.read(prefix + "byteorder").decode().strip() or "little"
        storages: dict[str, _Storage] = {}
        try:
            obj = _Unpickler(io.BytesIO(zf.read(pickles[0])), storages).load()
        except CheckpointFormatError:
            raise
        except Exception as exc:
            raise CheckpointFormatError(f"cannot unpickle the checkpoint ({type(exc).__name__}: {exc})") from None
        for key, root in storages.items():
            member = f"{prefix}data/{key}"
            if member not in names:
                raise CheckpointFormatError(f"storage {key} is missing from the archive")
            root.fill(zf.read(member), byteorder)
    return _materialise(obj)


def load(path: str | os.PathLike) -> Any:
    """Load a PyTorch checkpoint; tensors become numpy arrays. Raises :class:`CheckpointFormatError`."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        return _read_zip(path)
    with open(path, "rb") as f:
        return _read_legacy(f)


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load a checkpoint that holds a state dict (``name -> tensor``) as ``name -> numpy array``."""
    obj = load(path)
    if not isinstance(obj, Mapping) or not all(
            isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items()):
        raise CheckpointFormatError(f"{Path(path).name} does not hold a state dict of tensors")
    return dict(obj)
