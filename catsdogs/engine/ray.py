"""The Ray engine: feature chunks in a pool of long-lived actors, grid runs as Ray tasks.

* **Extraction**: one :class:`_FeatureWorker` actor per node with a free CPU builds the backbone
  once (the local engine's own model factory, shipped with cloudpickle, so weights ``none`` /
  ``imagenet``, plugin backbones and precision options behave identically) and computes whole
  chunks: decode (threads) + forward pass with :func:`catsdogs.features.extraction.compute_chunk`.
  The driver reads the image bytes and ``ray.put``\\ s them, so workers never touch the driver's
  disk (``shared_data=True`` sends paths instead). Every finished chunk comes back to the driver,
  which writes it through the cache's own chunk machinery: same files, same resume after
  ``kill -9``. Actors restart and their pending chunk is retried when a worker process dies
  (``max_restarts`` / ``max_task_retries``); an actor whose whole node dies is dropped and its
  chunks go to the other actors (:meth:`RayEngine.actor_map`).
* **Grids**: each pending run is one Ray task (``max_retries``); what every run reads (the aligned
  features, the splits, the experiment) is put into the object store once. Tasks return the
  record and the run's files as bytes; the driver writes them atomically.
* **Audit**: the decode + ImageNet-classify pass runs in actors like extraction.

Node ids are reported with every chunk and run (:meth:`RayEngine.describe`, run records).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from catsdogs.engine.spec import EngineError, EngineSpec

if TYPE_CHECKING:
    from catsdogs.dataset.images import ImageDecodeError

logger = logging.getLogger("catsdogs")

#: chunks queued per actor: one computing, one decoding / in transit
IN_FLIGHT_PER_ACTOR = 2
#: CPUs reserved per actor / grid task (the model's threads use what the node has)
ACTOR_CPUS = 1.0
RETRIES = 3
#: seconds between checks that the nodes of the actors are alive (see :meth:`RayEngine.actor_map`)
NODE_CHECK_SECONDS = 1.0
AUTH_HINT = (
    "if the cluster uses token authentication (the default since Ray 2.52), present its token: "
    "set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the value `ray get-auth-token` prints on the "
    "head node; throwaway local clusters may be started with RAY_AUTH_MODE=disabled"
)


def import_ray():
    """The ``ray`` module, or an :class:`EngineError` saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise EngineError("--engine ray needs Ray, which is not installed here: "
                          "pip install 'catsdogs[ray]' (or use --engine local)") from exc
    return ray


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast, with a clear message, when ``host:port`` does not accept connections."""
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", "local" and the like: Ray resolves them
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise EngineError(
            f"cannot reach the Ray cluster at {address!r} ({exc.strerror or exc}); start one with "
            "`ray start --head` or fix --ray-address / RAY_ADDRESS (or use --engine local)") from exc


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


# ------------------------------------------------------------------------------------ workers
def payload_bytes(item: bytes | str | ImageDecodeError) -> bytes | ImageDecodeError:
    """A worker's view of one image of a payload (:meth:`RayEngine.payload`): its bytes, or the
    read error (an ``ImageDecodeError``, reported like the local engine's); a path is read here."""
    from catsdogs.dataset.images import ImageDecodeError, read_image_file

    if not isinstance(item, str):
        return item
    try:  # regular files only, size-capped (a pipe or /dev/zero never blocks a worker)
        return read_image_file(item)
    except ImageDecodeError as exc:  # unreadable file (permissions, vanished): skipped like locally
        return exc


def shipped_int8_factory(factory):
    """int8 for workers that cannot see the driver's disk: the driver loads or calibrates the
    quantised model (cached next to the features, as with the local engine, so a resume does not
    calibrate again) and the workers get its IR files with their factory, through Ray."""
    from catsdogs.features import int8

    model_dir = Path(factory.model_dir)
    factory()  # loads the cached IR (checking it reads) or calibrates here and saves it
    files = {name: (model_dir / name).read_bytes() for name in ("model.xml", "model.bin")}
    logger.info("int8 model for the Ray workers: %s (%.1f MB, shipped through the object store)",
                model_dir, sum(map(len, files.values())) / 1e6)
    return functools.partial(_int8_from_files, factory, files, int8.IR_SUFFIX)


def _int8_from_files(factory, files: dict[str, bytes], suffix: str):
    """On a worker: write the shipped IR to a private folder, load and compile it (never calibrate
    here), remove the folder (the compiled model lives in memory)."""
    import dataclasses
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="catsdogs-int8-", suffix=suffix))
    try:
        for name, data in files.items():
            (folder / name).write_bytes(data)
        return dataclasses.replace(factory, model_dir=folder, calibration_paths=[])()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class ChunkFeatures:
    """What an extraction worker holds: the backbone's feature model (built once, by the local
    engine's own model factory) and decoding threads; called once per chunk."""

    def __init__(self, model_factory: Callable, image_size: int, resize: str, feature_dim: int,
                 decode_threads: int):
        from catsdogs.features.extraction import lower_thread_priority

        self.image_size, self.resize, self.feature_dim = image_size, resize, feature_dim
        self.pool = ThreadPoolExecutor(max_workers=max(1, decode_threads),
                                       initializer=lower_thread_priority)
        self.model = model_factory()

    def __call__(self, views: Sequence[str], digests: Sequence[str], payload: list) -> dict[str, Any]:
        """``payload``: per image its bytes (or a read error), or its path when data is shared."""
        from catsdogs.features.extraction import compute_chunk, decode_bytes

        def decode(item):
            return decode_bytes(payload_bytes(item), self.image_size, self.resize)

        decoded = list(self.pool.map(decode, payload))
        done, arrays, skipped = compute_chunk(self.model, views, digests, decoded, self.image_size,
                                              self.feature_dim)
        return {"digests": done, "arrays": arrays, "skipped": skipped}


class _Worker:
    """A long-lived Ray actor (one per node): holds what ``factory()`` built for the current job
    (a feature model, a classifier) and applies it to one chunk per call. A restarted actor
    rebuilds it on the retried call, which carries the job's key and factory."""

    def __init__(self) -> None:
        import threading

        self.key: str | None = None
        self.fn: Callable | None = None
        self.lock = threading.Lock()

    def ready(self) -> tuple[str, int]:
        return _node_id(), os.getpid()

    def run(self, key: str, factory: Callable, *args: Any) -> dict[str, Any]:
        with self.lock:
            if key != self.key:
                self.fn = None  # release the previous job's model first
                self.fn = factory()
                self.key = key
            fn = self.fn
        assert fn is not None
        return {"result": fn(*args), "node": _node_id(), "pid": os.getpid()}


def _run_task(fn: Callable, item: Any, shared: Any) -> tuple[Any, str]:
    return fn(item, shared), _node_id()


# ------------------------------------------------------------------------------------ engine
class RayEngine:
    """A connection to a Ray cluster (see the module docstring); use via
    :func:`catsdogs.engine.open_engine`."""

    name = "ray"

    def __init__(self, spec: EngineSpec, started: bool):
        self.spec = spec
        self.started = started  # a local instance started for this call, shut down by close()
        self.nodes: dict[str, int] = {}  # node id -> images computed in the last extraction
        self.pids: set[int] = set()  # worker processes that returned chunks (a restart adds one)
        self.actors: list = []  # the actor pool of extraction and audit (see _pool)
        self.actor_nodes: dict[int, str] = {}  # id() of an actor of the pool -> its last node id
        self.pool_nodes: set[str] = set()  # the nodes alive when the pool was started

    # ------------------------------------------------------------------ connection
    @classmethod
    def connect(cls, spec: EngineSpec) -> RayEngine:
        ray = import_ray()
        address = spec.resolved_address
        started = False
        if not ray.is_initialized():
            if address is None:
                # Ray runs workers at nice 15 by default; on a machine shared with other work that
                # would starve them against the local engine's nice-0 process
                os.environ.setdefault("RAY_worker_niceness", "0")
                ray.init(include_dashboard=False, logging_level=logging.WARNING,
                         configure_logging=False, log_to_driver=False)
                started = True
            else:
                _check_reachable(address)
                try:
                    ray.init(address=address, logging_level=logging.WARNING,
                             configure_logging=False, log_to_driver=False)
                except Exception as exc:  # auth, version mismatch, a dead head: say what to do
                    raise EngineError(f"cannot connect to the Ray cluster at {address!r}: "
                                      f"{str(exc).splitlines()[0] if str(exc) else exc!r}; "
                                      f"{AUTH_HINT}") from exc
        engine = cls(spec, started)
        try:
            engine._check_cpus()
        except EngineError:
            engine.close()
            raise
        return engine

    def _check_cpus(self) -> None:
        import ray

        total = ray.cluster_resources().get("CPU", 0)
        free = ray.available_resources().get("CPU", 0)
        where = self.spec.resolved_address or "the local Ray instance"
        if total <= 0:
            raise EngineError(f"the Ray cluster at {where} has no CPU; add worker nodes with CPUs")
        if free < ACTOR_CPUS:
            raise EngineError(f"no CPU free on the Ray cluster at {where} ({total:g} CPUs, "
                              f"{free:g} free; catsdogs needs {ACTOR_CPUS:g}): wait for other jobs "
                              "to finish or add nodes")

    def close(self) -> None:
        import ray

        self.release()
        if self.started and ray.is_initialized():
            ray.shutdown()

    def describe(self) -> dict[str, Any]:
        """What the cache metadata records: the engine and the node ids of the last extraction."""
        return {"name": self.name, "address": self.spec.resolved_address,
                "shared_data": self.spec.shared_data, "nodes": dict(self.nodes)}

    def _cpu_nodes(self) -> list[str]:
        import ray

        return sorted(n["NodeID"] for n in ray.nodes()
                      if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) >= ACTOR_CPUS)

    def release(self) -> None:
        """Stop the actor pool, freeing its CPUs (the next extraction starts a new one)."""
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors, self.actor_nodes = [], {}

    # ------------------------------------------------------------------ actor pools
    def _pool(self) -> list:
        """The engine's actors, one per node with a free CPU, started on first use and kept
        (imports and process start paid once) until a grid needs the CPUs or the engine closes."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if not self.actors:
            # ray's overloads of remote() omit the actor-only option max_concurrency
            remote_cls = ray.remote(num_cpus=ACTOR_CPUS, max_restarts=RETRIES,  # type: ignore[call-overload]
                                    max_task_retries=RETRIES,
                                    max_concurrency=IN_FLIGHT_PER_ACTOR)(_Worker)
            nodes: Sequence[str | None] = self._cpu_nodes() or [None]
            self.pool_nodes = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
            self.actors = [remote_cls.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=True) if n else "DEFAULT"
            ).remote() for n in nodes]
        return self.actors

    def actor_map(self, factory: Callable, jobs: Sequence, args_of: Callable,
                  on_result: Callable[[Any, Any, str, int], None]) -> int:
        """Apply what ``factory()`` builds (once per actor) to every job: ``run(*args_of(job))``,
        :data:`IN_FLIGHT_PER_ACTOR` jobs at a time per actor, at most one actor per job.
        ``on_result(job, result, node id, pid)`` runs on the driver as jobs finish, once per job.
        Returns the number of actors used.

        A worker process that dies is restarted by Ray and its calls retried (``max_restarts`` /
        ``max_task_retries``). A whole node that dies takes its actor with it, and Ray cannot
        restart that actor while the other nodes' CPUs are held by this pool: every
        :data:`NODE_CHECK_SECONDS` the driver checks the nodes of its actors, drops an actor whose
        node is gone, and its jobs (like those of an actor past its restarts) go to the other
        actors, at most :data:`RETRIES` times per job. An actor's node is known from its answers
        (kept across calls: a node may die between two calls); once a node has died, an actor
        that never answered is dropped too (it may have been there)."""
        import uuid
        from collections import Counter, deque

        import ray

        lost_errors = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                       ray.exceptions.NodeDiedError, ray.exceptions.ObjectLostError)
        actors = self._pool()[:max(1, len(jobs))]
        key, factory_ref = uuid.uuid4().hex, ray.put(factory)
        todo: deque[tuple[Any, int]] = deque((job, 0) for job in jobs)  # (job, tries so far)
        pending: dict[Any, tuple[Any, int, int]] = {}  # result ref -> (job, tries, actor index)
        busy: Counter[int] = Counter()  # actor index -> jobs in flight
        live = set(range(len(actors)))  # actors not dropped
        # actor index -> node id: from earlier calls, else asked first (an actor runs calls in
        # order), then from each result
        where = {i: self.actor_nodes[id(a)] for i, a in enumerate(actors) if id(a) in self.actor_nodes}
        probes = {actor.ready.remote(): i for i, actor in enumerate(actors) if i not in where}

        def fill() -> None:
            for i in sorted(live):
                while todo and busy[i] < IN_FLIGHT_PER_ACTOR:
                    job, tries = todo.popleft()
                    pending[actors[i].run.remote(key, factory_ref, *args_of(job))] = (job, tries, i)
                    busy[i] += 1

        def drop(i: int, why: str) -> None:
            if i in live:
                live.discard(i)
                logger.warning("Ray worker actor on node %s %s; its chunks go to the other workers",
                               where.get(i, "?"), why)
                ray.kill(actors[i], no_restart=True)  # its queued calls fail now and are retried

        next_check = time.monotonic()  # a node may have died since the last call: check first
        try:
            while True:
                if time.monotonic() >= next_check:
                    alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
                    for i in sorted(live):
                        if where.get(i) not in alive and (i in where or self.pool_nodes - alive):
                            drop(i, "lost its node" if i in where else "never answered")
                    next_check = time.monotonic() + NODE_CHECK_SECONDS
                fill()
                if not pending:
                    break
                done, _ = ray.wait([*pending, *probes], num_returns=1, timeout=NODE_CHECK_SECONDS)
                for ref in done:
                    if ref in probes:
                        i = probes.pop(ref)
                        try:
                            where.setdefault(i, ray.get(ref)[0])
                            self.actor_nodes.setdefault(id(actors[i]), where[i])
                        except ray.exceptions.RayError:
                            pass  # what became of the actor shows in its jobs
                        continue
                    job, tries, i = pending.pop(ref)
                    busy[i] -= 1
                    try:
                        out = ray.get(ref)
                    except lost_errors as exc:
                        if isinstance(exc, ray.exceptions.ActorDiedError):
                            drop(i, "is gone for good")
                        if tries >= RETRIES:
                            raise EngineError(
                                f"a Ray worker actor died {tries + 1} times on one chunk "
                                f"({type(exc).__name__}); everything finished so far is kept: "
                                "rerun to resume") from exc
                        todo.appendleft((job, tries + 1))
                    except ray.exceptions.RayTaskError:
                        self._get(ref, "worker actor")  # raises it: a user error as itself
                        raise
                    else:
                        where[i] = self.actor_nodes[id(actors[i])] = out["node"]
                        on_result(job, out["result"], out["node"], out["pid"])
            if todo:
                raise EngineError("every Ray worker actor of this call was lost (their nodes "
                                  "died); everything finished so far is kept: rerun to resume")
        finally:
            dropped = [actors[i] for i in range(len(actors)) if i not in live]
            self.actors = [a for a in self.actors if not any(a is d for d in dropped)]
            for a in dropped:
                self.actor_nodes.pop(id(a), None)
        return len(actors)

    def payload(self, paths: Sequence[str | os.PathLike]) -> Any:
        """What workers get for these images: their bytes read here and put into the object store
        (workers need not see the driver's disk), or with ``shared_data`` just the paths."""
        import ray

        if self.spec.shared_data:
            return [str(p) for p in paths]
        return ray.put([payload_bytes(str(p)) for p in paths])

    # ------------------------------------------------------------------ extraction
    def compute_features(self, store, work: list, model_factory, *, image_size: int, resize: str,
                         chunk_size: int, workers: int, progress: bool, desc: str) -> tuple[int, float]:
        """The Ray twin of :func:`catsdogs.features.extraction._compute` (same arguments, same
        chunks written through ``store``); node ids per image land in :attr:`nodes`."""
        import functools

        from tqdm.auto import tqdm

        from catsdogs.features.extraction import _chunks

        self.nodes, self.pids = {}, set()
        if not work:
            return 0, 0.0
        if store.config.precision == "int8" and not self.spec.shared_data:
            model_factory = shipped_int8_factory(model_factory)
        chunks = list(_chunks(work, chunk_size))
        bar = tqdm(total=len(work), desc=f"{desc} (ray)", unit="img", disable=not progress,
                   dynamic_ncols=True)
        state = {"index": store.next_chunk_index(), "computed": 0}

        def args_of(chunk: list) -> tuple:
            return chunk[0].views, [w.digest for w in chunk], self.payload([w.record.path for w in chunk])

        def on_result(chunk: list, out: dict[str, Any], node: str, pid: int) -> None:
            store.write_chunk(state["index"], out["digests"], chunk[0].views, out["arrays"],
                              out["skipped"])
            state["index"] += 1
            state["computed"] += len(out["digests"])
            self.nodes[node] = self.nodes.get(node, 0) + len(chunk)
            self.pids.add(pid)
            bar.update(len(chunk))

        factory = functools.partial(ChunkFeatures, model_factory, image_size, resize,
                                    store.config.feature_dim, workers)
        start = time.perf_counter()
        try:
            self.actor_map(factory, chunks, args_of, on_result)
        finally:
            bar.close()
        return state["computed"], time.perf_counter() - start

    @staticmethod
    def _get(ref, what: str):
        """``ray.get``; a worker that died past its retries, or a user error raised in a worker
        (a :class:`~catsdogs.errors.CatsdogsError`), becomes one clear error here."""
        import ray

        from catsdogs.errors import CatsdogsError

        try:
            return ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                ray.exceptions.NodeDiedError) as exc:
            raise EngineError(f"a Ray {what} died {RETRIES + 1} times ({type(exc).__name__}); "
                              "everything finished so far is kept: rerun to resume") from exc
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, CatsdogsError):
                raise exc.cause from None
            raise

    # ------------------------------------------------------------------ grids
    def map_runs(self, fn: Callable[[Any, Any], Any], items: Iterable, shared: Any
                 ) -> Iterator[tuple[Any, Any, str]]:
        """Run ``fn(item, shared)`` for every item as a Ray task; yield ``(item, result, node id)``
        in completion order. ``shared`` is put into the object store once for all tasks."""
        import ray

        self.release()  # the extraction pool's CPUs go to the runs
        task = ray.remote(num_cpus=ACTOR_CPUS, max_retries=RETRIES)(_run_task)
        shared_ref = ray.put(shared)
        pending = {task.remote(fn, item, shared_ref): item for item in items}
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            item = pending.pop(ref)
            result, node = self._get(ref, "grid worker")
            yield item, result, node
