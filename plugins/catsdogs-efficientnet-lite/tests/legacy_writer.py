"""A torch-free writer of PyTorch's legacy checkpoint format, for the reader's round-trip tests.

It writes exactly what ``torch.save(obj, f, _use_new_zipfile_serialization=False)`` writes: the
magic number, the protocol version and the system info (protocol-2 pickles), the object pickle
whose tensors are ``torch._utils._rebuild_tensor_v2(...)`` calls on persistent-id storages, the
sorted storage keys, then each storage as ``int64 numel`` + raw bytes. The ``torch`` globals are
written by name (pickle's pure-Python pickler with a dispatch entry), so torch is not needed.
"""

from __future__ import annotations

import collections
import pickle
import struct
import sys
from dataclasses import dataclass

import numpy as np

MAGIC = 0x1950A86A20F9469CFC6C
PROTOCOL = 1001

STORAGE_NAMES = {
    np.dtype("float64"): "DoubleStorage", np.dtype("float32"): "FloatStorage",
    np.dtype("float16"): "HalfStorage", np.dtype("int64"): "LongStorage",
    np.dtype("int32"): "IntStorage", np.dtype("int16"): "ShortStorage", np.dtype("int8"): "CharStorage",
    np.dtype("uint8"): "ByteStorage", np.dtype("bool"): "BoolStorage",
}


class Global:
    """A global written as ``GLOBAL module name`` without importing it."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle requires reduce functions to be callable
        raise TypeError("marker only")


@dataclass
class Storage:
    """A flat storage: ``data`` (1-D) written as ``type_name`` (default: from the dtype)."""

    key: str
    data: np.ndarray
    type_name: str | None = None
    #: legacy view of the root storage: (view key, element offset, element count)
    view: tuple[str, int, int] | None = None


@dataclass
class Tensor:
    storage: Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


class _Pickler(pickle._Pickler):
    dispatch = pickle._Pickler.dispatch.copy()

    def __init__(self, file, types: dict[str, Global]):
        super().__init__(file, protocol=2)
        self.types = types
        self.rebuild = Global("torch._utils", "_rebuild_tensor_v2")

    def save_marker(self, obj: Global) -> None:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    dispatch[Global] = save_marker

    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            name = obj.type_name or STORAGE_NAMES[obj.data.dtype]
            stype = self.types.setdefault(name, Global("torch", name))
            return ("storage", stype, obj.key, "cpu", int(obj.data.size), obj.view)
        return None

    def reducer_override(self, obj):
        if isinstance(obj, Tensor):
            return (self.rebuild, (obj.storage, obj.offset, tuple(obj.size), tuple(obj.stride),
                                   False, collections.OrderedDict()))
        return NotImplemented


def contiguous(key: str, array: np.ndarray) -> Tensor:
    array = np.array(array, order="C")  # (ascontiguousarray would turn 0-d into 1-d)
    stride = tuple(s // array.itemsize for s in array.strides) if array.ndim else ()
    return Tensor(Storage(key, array.reshape(-1)), 0, array.shape, stride)


def write_legacy(f, obj, byteorder: str = "little") -> None:
    """Write ``obj`` (containing :class:`Tensor` objects) to the binary file ``f``."""
    for value in (MAGIC, PROTOCOL, {"protocol_version": PROTOCOL, "little_endian": byteorder == "little",
                                    "type_sizes": {"short": 2, "int": 4, "long": 8}}):
        pickle.dump(value, f, protocol=2)
    storages: dict[str, Storage] = {}

    def collect(o):
        if isinstance(o, Tensor):
            storages.setdefault(o.storage.key, o.storage)
        elif isinstance(o, dict):
            for v in o.values():
                collect(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                collect(v)

    collect(obj)
    _Pickler(f, {}).dump(obj)
    keys = sorted(storages)
    pickle.dump(keys, f, protocol=2)
    prefix = "<" if byteorder == "little" else ">"
    for key in keys:
        data = storages[key].data
        f.write(struct.pack(prefix + "q", data.size))
        f.write(data.astype(data.dtype.newbyteorder(prefix)).tobytes())


assert sys.byteorder in ("little", "big")
