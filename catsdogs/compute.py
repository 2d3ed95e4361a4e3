"""The engine contract: what the pipeline asks of an engine, and the local engine.

An engine computes; the driver (this process) writes every file itself, whichever engine
computed. Feature extraction, the audit's classifier pass, the label-issue finder's features, a
grid's runs and the refit go through the same two seams:

* :meth:`Engine.map_chunks` -- apply what ``factory()`` builds (a feature model, a classifier:
  built once per worker) to every job: ``fn(*args_of(job))``, handing each result to
  ``on_result(job, result, node, pid)`` on the driver as it finishes (any order). Images travel
  as :meth:`Engine.payload`: paths here, bytes or paths on Ray; a worker reads one item of a
  payload with :func:`catsdogs.dataset.payload.payload_bytes`.
* :meth:`Engine.map_runs` -- ``fn(item, shared)`` for every item, yielding
  ``(item, result, node)`` as each finishes; ``shared`` is what every call reads (put into
  Ray's object store once). With ``checkpoints`` (a :class:`Checkpoints` on the driver, e.g. the
  runner's fold store) each call is ``fn(item, shared, store)``: ``store.put`` keeps a part of the
  item's work on the driver as soon as it is done, and ``store.get`` gives it back to a later
  call of the same item (a rerun after a kill, a retried task), wherever the call runs.

:class:`LocalEngine` is the default, in this process; :class:`catsdogs.engine.ray.RayEngine`
runs the same calls on a Ray cluster. This module is part of the core (it imports nothing of the
pipeline), so every stage can take an engine and default to the local one.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol, runtime_checkable

#: calls in flight per worker: one computing, one decoding (the Ray actors' ``max_concurrency``)
IN_FLIGHT_PER_WORKER = 2
#: the node id the local engine reports
LOCAL_NODE = "local"


class Checkpoints(Protocol):
    """Finished parts of unfinished items, kept by the driver (see :meth:`Engine.map_runs`)."""

    def get(self, key: Any) -> Any | None:
        """What was kept as ``key``, or None."""
        ...

    def put(self, key: Any, value: Any) -> None:
        """Keep ``value`` as ``key``'s (durably, on the driver)."""
        ...

    def saved(self) -> dict[Any, Any]:
        """Everything kept so far (an engine whose workers cannot reach the driver ships it)."""
        ...


@runtime_checkable
class Engine(Protocol):
    """Where the heavy work runs (see the module docstring)."""

    name: str
    #: whether calls of ``map_runs`` run at once (a cluster) or one after another (this process)
    parallel: bool

    def payload(self, paths: Sequence[str | os.PathLike]) -> Any:
        """What a worker gets for these images (read each item with ``payload_bytes``)."""
        ...

    def portable(self, factory: Callable[[], Any]) -> Callable[[], Any]:
        """``factory`` as this engine's workers can call it (e.g. a model file shipped along)."""
        ...

    def map_chunks(self, factory: Callable[[], Callable[..., Any]], jobs: Sequence,
                   args_of: Callable[[Any], tuple],
                   on_result: Callable[[Any, Any, str, int], None],
                   what: Callable[[Any], str] | None = None) -> int:
        """Apply ``factory()`` (built once per worker) to every job; returns the workers used."""
        ...

    def map_runs(self, fn: Callable[..., Any], items: Iterable, shared: Any,
                 checkpoints: Checkpoints | None = None) -> Iterator[tuple[Any, Any, str]]:
        """``fn(item, shared)`` for every item (``fn(item, shared, store)`` with ``checkpoints``,
        ``store`` reaching them from wherever the call runs); ``(item, result, node)`` as each
        finishes."""
        ...

    def describe(self) -> dict[str, Any] | None:
        """What the cache metadata records of the engine (None: nothing, the local engine)."""
        ...

    def release(self) -> None:
        """Free the workers held between calls (their CPUs go to the next call)."""
        ...

    def close(self) -> None:
        ...


class LocalEngine:
    """This process: one worker (``factory()`` built once per call), :data:`IN_FLIGHT_PER_WORKER`
    chunks in flight (one decoding in its threads while the other computes, as a Ray actor does);
    runs one after the other."""

    name = "local"
    parallel = False

    def payload(self, paths: Sequence[str | os.PathLike]) -> list[str]:
        return [str(p) for p in paths]  # the worker reads the files: this is their machine

    def portable(self, factory: Callable[[], Any]) -> Callable[[], Any]:
        return factory

    def map_chunks(self, factory: Callable[[], Callable[..., Any]], jobs: Sequence,
                   args_of: Callable[[Any], tuple],
                   on_result: Callable[[Any, Any, str, int], None],
                   what: Callable[[Any], str] | None = None) -> int:
        if not jobs:
            return 0
        fn = factory()
        pid = os.getpid()
        pending: deque[tuple[Any, Future]] = deque()
        with ThreadPoolExecutor(max_workers=IN_FLIGHT_PER_WORKER) as pool:
            try:
                for job in jobs:
                    pending.append((job, pool.submit(fn, *args_of(job))))
                    if len(pending) >= IN_FLIGHT_PER_WORKER:
                        done, future = pending.popleft()
                        on_result(done, future.result(), LOCAL_NODE, pid)
                while pending:
                    done, future = pending.popleft()
                    on_result(done, future.result(), LOCAL_NODE, pid)
            finally:
                for _, future in pending:
                    future.cancel()
        return 1

    def map_runs(self, fn: Callable[..., Any], items: Iterable, shared: Any,
                 checkpoints: Checkpoints | None = None) -> Iterator[tuple[Any, Any, str]]:
        extra = () if checkpoints is None else (checkpoints,)  # this process: the store itself
        for item in items:
            yield item, fn(item, shared, *extra), LOCAL_NODE

    def describe(self) -> dict[str, Any] | None:
        return None

    def release(self) -> None:
        pass

    def close(self) -> None:
        pass


#: the engine of calls that name none
LOCAL = LocalEngine()


__all__ = ["IN_FLIGHT_PER_WORKER", "LOCAL", "LOCAL_NODE", "Checkpoints", "Engine", "LocalEngine"]
