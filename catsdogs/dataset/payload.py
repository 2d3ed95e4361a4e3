"""One item of an engine's image payload, as a worker reads it (:meth:`catsdogs.compute.Engine.payload`).

A payload item is the image's bytes (read by the driver and shipped: the worker need not see the
driver's disk), the driver's read error, or a path the worker reads itself (the local engine, or
``--ray-shared-data``). Every chunk worker -- feature extraction, the audit's classifier -- reads
its items through :func:`payload_bytes`, so a new kind of item (a key into object storage) is
one change here and one in the engine's ``payload``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from catsdogs.dataset.images import ImageDecodeError, read_image_file


def payload_bytes(item: Any) -> bytes | ImageDecodeError:
    """The image's bytes, or its read error (an ``ImageDecodeError``, reported as a skipped
    image); a path is read here (regular files only, size-capped: a pipe never blocks a worker),
    and so is an object in object storage (an ``ObjectPath``, or its URL: the worker reads it
    from the store itself); a reader's future (:func:`prefetch`) gives what its read gave."""
    if isinstance(item, Future):
        return item.result()
    if isinstance(item, (bytes, ImageDecodeError)):
        return item
    try:
        return read_image_file(item)
    except ImageDecodeError as exc:
        return exc


def read_payload(paths) -> list:
    """The items of a payload read here (what an engine ships when workers cannot see the disk).
    Objects in object storage are not read here: they go as they are (key and storage options),
    so the driver reads no photo bytes and each worker reads its own."""
    from catsdogs.dataset.storage import ObjectPath

    return [p if isinstance(p, ObjectPath) else payload_bytes(str(p)) for p in paths]


_readers_lock = threading.Lock()
_readers: ThreadPoolExecutor | None = None


def prefetch(payload: Sequence) -> list:
    """``payload`` with its objects in object storage being read ahead by this process's pool of
    readers (``CATSDOGS_READERS`` threads, shared by every call), so a high-latency store keeps
    the decoders busy; :func:`payload_bytes` of an item waits for its read. Local items stay."""
    from catsdogs.dataset.storage import ObjectPath, is_url, readers

    remote = [isinstance(i, ObjectPath) or is_url(i) for i in payload]
    if not any(remote):
        return list(payload)
    global _readers
    with _readers_lock:
        if _readers is None:
            _readers = ThreadPoolExecutor(max_workers=readers(), thread_name_prefix="catsdogs-read")
        pool = _readers
    return [pool.submit(payload_bytes, i) if r else i for i, r in zip(payload, remote)]


__all__ = ["payload_bytes", "prefetch", "read_payload"]
