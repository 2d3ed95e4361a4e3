"""The Ray engine (:class:`RayEngine`, a :class:`catsdogs.compute.Engine`): chunks in a pool of
long-lived actors, grid runs as Ray tasks.

* **Connection**: with an address (``--ray-address``, else ``$RAY_ADDRESS``) the engine joins that
  cluster and says so; with neither it starts a **private** instance for the call
  (``address="local"``, loopback) and never joins a cluster another process left running
  (``--ray-address auto`` joins the running one on purpose). A refused or missing
  authentication token, and a loopback-only head that Ray would reach through this machine's
  network address, are one line each (:func:`_connect_error`, :func:`_check_not_rewritten`).
* **Chunks** (:meth:`RayEngine.map_chunks`: feature extraction, the audit's classifier pass):
  one :class:`_Worker` actor per node with a free CPU builds what the factory makes once (the
  local engine's own worker classes and model factories, shipped with cloudpickle) and applies it
  to whole chunks. The driver reads the image bytes and ``ray.put``\\ s them (:meth:`payload`), so
  workers never touch the driver's disk (``shared_data=True`` sends paths instead). Every finished
  chunk comes back to the driver, which writes it. Retries are the driver's alone and bounded:
  a chunk is tried at most :data:`TRIES` times in all (Ray retries no actor call). A chunk whose
  worker process dies is retried alone on an actor (Ray restarts the process), so a chunk that
  crashes its worker every time is named in the error, while chunks that merely shared its
  process finish. An actor whose node dies is dropped (the driver checks the nodes every
  :data:`NODE_CHECK_SECONDS`) and its chunks go to the other actors without counting a try.
* **Runs** (:meth:`RayEngine.map_runs`): each item is one Ray task (at most :data:`TRIES` tries);
  what every task reads is put into the object store once. The driver waits in
  :data:`NODE_CHECK_SECONDS` steps and cancels the other tasks when one fails or the caller stops.
  With checkpoints (the runner's fold store) the tasks put the parts they finish into a
  mailbox actor, whose new entries the driver writes at each of those steps; a retried task
  reads back what its killed try put there.

Node ids are reported with every chunk and run.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from catsdogs.compute import IN_FLIGHT_PER_WORKER, Checkpoints
from catsdogs.dataset.payload import read_payload
from catsdogs.engine.spec import EngineError, EngineSpec
from catsdogs.util.extras import require

logger = logging.getLogger("catsdogs")

#: CPUs reserved per actor / grid task (the model's threads use what the node has)
ACTOR_CPUS = 1.0
#: tries of one chunk or one run in all (the first included), whatever failed
TRIES = 3
#: seconds between checks that the nodes of the actors are alive (see :meth:`RayEngine.map_chunks`)
NODE_CHECK_SECONDS = 1.0
#: seconds between probes of an actor whose process is being restarted
RESTART_WAIT_SECONDS = 0.5
AUTH_HINT = (
    "if the cluster uses token authentication (the default since Ray 2.52), present its token: "
    "set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the value "
    "`ray get-auth-token` prints on the head node; throwaway local clusters may be started with "
    "RAY_AUTH_MODE=disabled"
)
#: what Ray's native client logs when the cluster refuses its token (missing or wrong)
AUTH_REFUSED_MARKS = (b"InvalidAuthToken", b"Unauthenticated")


class Terminated(EngineError):
    """The driver got SIGTERM while the engine was working (one line, no stack dump)."""


TERMINATED = ("terminated (SIGTERM): everything finished so far is kept; rerun the same command "
              "to resume")


#: the logger of Ray's deserialiser, which logs (with its traceback) the error of an object it
#: could not deserialise before handing it to the driver as a ``RaySystemError``
RAY_DESERIALISER_LOGGER = "ray._private.serialization"


class _NotTerminated(logging.Filter):
    """Drops Ray's report of the :class:`Terminated` our SIGTERM handler raised inside its code
    (the driver reports that itself, in one line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        seen: set[int] = set()
        while exc is not None and id(exc) not in seen:  # Ray raises its own error from ours
            if isinstance(exc, Terminated):
                return False
            seen.add(id(exc))
            exc = exc.__cause__ or exc.__context__
        return True


def import_ray():
    """The ``ray`` module, or one :class:`~catsdogs.util.extras.MissingExtraError` line naming
    ``--engine ray`` and the extra that installs it (:func:`~catsdogs.util.extras.require`)."""
    return require("ray", feature="--engine ray")


def check_address(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of a ``HOST:PORT`` or ``ray://HOST:PORT`` address, None for ``auto`` /
    ``local``; an :class:`EngineError` quoting the address as given when it is neither."""
    target = address.split("://", 1)[-1]
    if target in ("auto", "local"):
        return None
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise EngineError(f"invalid Ray address {address!r}: expected HOST:PORT (a port number "
                          "from 1 to 65535), ray://HOST:PORT or auto")
    return host.strip("[]"), int(port)


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast, with a clear message, when ``host:port`` does not accept connections."""
    where = check_address(address)
    if where is None:
        return
    try:
        socket.create_connection(where, timeout=timeout).close()
    except OSError as exc:
        raise EngineError(
            f"cannot reach the Ray cluster at {address!r} ({exc.strerror or exc}); start one with "
            "`ray start --head` or fix --ray-address / RAY_ADDRESS (or use --engine local)") from exc


#: hosts Ray replaces by this machine's address before it connects (its ``is_localhost``)
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def _check_not_rewritten(address: str, timeout: float = 5.0) -> None:
    """Ray connects to a loopback address through this machine's network address (unless
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``): a head listening on loopback only is then never
    reached (Ray retries for minutes and names the other address). Say so at once, in one line."""
    where = check_address(address)
    if where is None or where[0] not in LOOPBACK_HOSTS:
        return
    try:
        from ray.util import get_node_ip_address

        node_ip = get_node_ip_address()
    except Exception:  # Ray finds out for itself below
        return
    if node_ip in LOOPBACK_HOSTS or node_ip.startswith("127."):
        return
    try:
        socket.create_connection((node_ip, where[1]), timeout=timeout).close()
    except OSError:
        raise EngineError(
            f"the Ray cluster at {address!r} listens on loopback only, but Ray connects to a "
            f"loopback address through this machine's address {node_ip}, where port {where[1]} is "
            "closed: start the head without --node-ip-address 127.0.0.1 (or give --ray-address "
            f"{node_ip}:{where[1]} once it listens there), or set "
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 for the head and for this command") from None


@contextlib.contextmanager
def _stderr_kept(keep: Callable[[], bool]) -> Iterator[list[bytes]]:
    """Hold what is written to file descriptor 2 meanwhile (Ray's C++ core logs there, ~20 lines
    of warnings before an authentication error); write it out afterwards only when ``keep()``
    (the call succeeded), else log it at debug level: our own one-line error says what to do.
    The held bytes are appended to the list yielded (for :func:`_connect_error` to read)."""
    held_text: list[bytes] = []
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all
        yield held_text
        return
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield held_text
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            text = held.read()
            held_text.append(text)
            if text and keep():
                os.write(2, text)
            elif text:
                logger.debug("Ray's output while connecting:\n%s", text.decode(errors="replace"))


def _token_source() -> str | None:
    """Where Ray's client takes its authentication token from (its own order), None if nowhere."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        return f"RAY_AUTH_TOKEN_PATH ({path})"
    default = Path.home() / ".ray" / "auth_token"
    return str(default) if default.is_file() else None


def _connect_error(address: str, exc: BaseException, native: bytes) -> str:
    """One line for a failed ``ray.init(address=...)``: a refused or missing authentication
    token said as such (Ray itself says only "Failed to connect"), with what to set."""
    ray_auth_error = type(exc).__name__ == "AuthenticationError"
    if not ray_auth_error and not any(mark in native for mark in AUTH_REFUSED_MARKS):
        return f"cannot connect to the Ray cluster at {address!r}: {_first_line(exc)}; {AUTH_HINT}"
    todo = "the value `ray get-auth-token` prints on the head node"
    source = _token_source()
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        unused = f" ({source} is used only then)" if source else ""
        return (f"the Ray cluster at {address!r} requires an authentication token and this "
                f"process sent none: set RAY_AUTH_MODE=token{unused} and RAY_AUTH_TOKEN (or "
                f"RAY_AUTH_TOKEN_PATH) to {todo}")
    if source is None:
        return (f"RAY_AUTH_MODE=token but no authentication token was found for the Ray cluster "
                f"at {address!r}: set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to {todo}")
    return (f"the Ray cluster at {address!r} refused the authentication token from {source}: "
            f"set it to {todo}")


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _first_line(exc: BaseException) -> str:
    """The line of a Ray error that says why (its exit detail), else its first line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "exit detail" in line.lower():
            return line[:300]
    return (lines[0] if lines else type(exc).__name__)[:300]


# ------------------------------------------------------------------------------------ workers
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




class _Worker:
    """A long-lived Ray actor (one per node): holds what ``factory()`` built for the current job
    (a feature model, a classifier) and applies it to one chunk per call. A restarted actor
    rebuilds it on the next call, which carries the job's key and factory."""

    def __init__(self) -> None:
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


def _run_task(fn: Callable, item: Any, shared: Any, *extra: Any) -> tuple[Any, str]:
    return fn(item, shared, *extra), _node_id()


class _Mailbox:
    """A Ray actor (no CPU) for one :meth:`RayEngine.map_runs` call with checkpoints: holds what
    the driver kept when the call began and what its tasks kept since (:meth:`get`, for a retried
    task), and hands the new ones to the driver, which writes them (:meth:`take`)."""

    def __init__(self, saved: dict[Any, Any]) -> None:
        self.kept = dict(saved)
        self.new: list[tuple[Any, Any]] = []

    def get(self, key: Any) -> Any | None:
        return self.kept.get(key)

    def put(self, key: Any, value: Any) -> None:
        self.kept[key] = value
        self.new.append((key, value))

    def take(self) -> list[tuple[Any, Any]]:
        new, self.new = self.new, []
        return new


class _MailboxCheckpoints:
    """The :class:`~catsdogs.compute.Checkpoints` a Ray task gets: the call's :class:`_Mailbox`."""

    def __init__(self, box: Any) -> None:
        self.box = box

    def get(self, key: Any) -> Any | None:
        import ray

        return ray.get(self.box.get.remote(key))

    def put(self, key: Any, value: Any) -> None:
        import ray

        ray.get(self.box.put.remote(key, value))

    def saved(self) -> dict[Any, Any]:
        raise NotImplementedError("a task reads its checkpoints one by one (get)")


# ------------------------------------------------------------------------------------ engine
class RayEngine:
    """A connection to a Ray cluster (see the module docstring); use via
    :func:`catsdogs.engine.open_engine`."""

    name = "ray"
    parallel = True

    def __init__(self, spec: EngineSpec, started: bool, address: str | None = None):
        self.spec = spec
        self.started = started  # a private instance started for this call, shut down by close()
        self.address = address  # the cluster's address as Ray reports it
        self.nodes: dict[str, int] = {}  # node id -> chunks computed in the last map_chunks
        self.pids: set[int] = set()  # worker processes that returned chunks (a restart adds one)
        self.tries: Counter[int] = Counter()  # tries per job index of the last map_chunks
        self.actors: dict[str, Any] = {}  # the actor pool (see _pool), by a stable id of ours
        self.actor_nodes: dict[str, str] = {}  # actor id -> its last known node id
        self.pool_nodes: set[str] = set()  # the nodes alive when the pool was started
        self._previous_sigterm: Any = None
        self.terminated = False  # our SIGTERM handler ran (see terminable)
        # this engine's own filter object: closing an engine opened inside another (each catches
        # SIGTERM, the inner one restoring the outer's handler) leaves the outer's filter in place
        self._log_filter = _NotTerminated()

    # ------------------------------------------------------------------ connection
    @classmethod
    def connect(cls, spec: EngineSpec) -> RayEngine:
        ray = import_ray()
        address = spec.resolved_address
        started = False
        ok = {"value": False}
        if not ray.is_initialized():
            options = {"logging_level": logging.WARNING, "configure_logging": False,
                       "log_to_driver": False}
            if address is None:
                # a private instance: never a cluster another process left running (plain
                # ray.init() would join it). Ray runs workers at nice 15 by default; on a machine
                # shared with other work that would starve them against the local engine
                os.environ.setdefault("RAY_worker_niceness", "0")
                try:
                    with _stderr_kept(lambda: ok["value"]):
                        ray.init(address="local", include_dashboard=False,
                                 _node_ip_address="127.0.0.1", **options)
                        ok["value"] = True
                except Exception as exc:  # e.g. its raylet not up in Ray's 30 s on a busy machine
                    with contextlib.suppress(Exception):
                        ray.shutdown()
                    raise EngineError(f"could not start a private Ray instance: {_first_line(exc)} "
                                      "(a machine this busy may need a retry), or use --engine "
                                      "local or --ray-address of a running cluster") from None
                started = True
            else:
                _check_reachable(address)
                _check_not_rewritten(address)
                native: list[bytes] = []
                try:
                    with _stderr_kept(lambda: ok["value"]) as native:
                        ray.init(address=address, **options)
                        ok["value"] = True
                except Exception as exc:  # auth, version mismatch, a dead head: say what to do
                    raise EngineError(_connect_error(address, exc, b"".join(native))) from None
        engine = cls(spec, started, _gcs_address(ray))
        try:
            engine._check_cpus()
        except EngineError:
            engine.close()
            raise
        cpus = ray.cluster_resources().get("CPU", 0)
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        if started:
            logger.info("Ray: started a private instance for this call (%g CPUs); to use a running "
                        "cluster, pass --ray-address auto or its address", cpus)
        else:
            logger.info("Ray: joined the cluster at %s (%d nodes, %g CPUs)",
                        engine.address or address, nodes, cpus)
        engine._catch_sigterm()
        return engine

    def _catch_sigterm(self) -> None:
        """SIGTERM of the driver becomes one :class:`Terminated` error (Ray's own handler would
        print a native stack dump); the previous handler is back after :meth:`close`."""
        if threading.current_thread() is not threading.main_thread():
            return

        def terminated(signum, frame):
            self.terminated = True
            raise Terminated(TERMINATED)

        self._previous_sigterm = signal.signal(signal.SIGTERM, terminated)
        logging.getLogger(RAY_DESERIALISER_LOGGER).addFilter(self._log_filter)

    @contextlib.contextmanager
    def terminable(self) -> Iterator[None]:
        """Around all that :func:`catsdogs.engine.open_engine` runs with this engine: once our
        SIGTERM handler has run, whatever came of the :class:`Terminated` it raised is that error
        again. The handler raises wherever the main thread is, and inside other code (Ray's above
        all) that error is rewrapped (a ``SystemError`` around a native wait, a ``RaySystemError``
        when it lands while ``ray.get`` deserialises a result) or swallowed;
        :meth:`check_terminated` in the engine's loops catches the swallowed case."""
        try:
            yield
        except Exception as exc:
            if self.terminated and not isinstance(exc, Terminated):
                raise Terminated(TERMINATED) from None
            raise

    def check_terminated(self) -> None:
        """:class:`Terminated` if our SIGTERM handler has run (its own error may have been
        swallowed by the Ray code it interrupted)."""
        if self.terminated:
            raise Terminated(TERMINATED)

    def _check_cpus(self) -> None:
        import ray

        total = ray.cluster_resources().get("CPU", 0)
        free = ray.available_resources().get("CPU", 0)
        where = self.spec.resolved_address or "the private Ray instance"
        if total <= 0:
            raise EngineError(f"the Ray cluster at {where} has no CPU; add worker nodes with CPUs")
        if free < ACTOR_CPUS:
            raise EngineError(f"no CPU free on the Ray cluster at {where} ({total:g} CPUs, "
                              f"{free:g} free; catsdogs needs {ACTOR_CPUS:g}): wait for other jobs "
                              "to finish or add nodes")

    def close(self) -> None:
        import ray

        try:
            self.release()
            if self.started and ray.is_initialized():
                ray.shutdown()
        finally:
            if self._previous_sigterm is not None:
                signal.signal(signal.SIGTERM, self._previous_sigterm)
                self._previous_sigterm = None
                logging.getLogger(RAY_DESERIALISER_LOGGER).removeFilter(self._log_filter)

    def describe(self) -> dict[str, Any]:
        """What the cache metadata records of the engine (the caller adds the node ids)."""
        return {"name": self.name, "address": self.spec.resolved_address,
                "shared_data": self.spec.shared_data}

    def _cpu_nodes(self) -> list[str]:
        import ray

        return sorted(n["NodeID"] for n in ray.nodes()
                      if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) >= ACTOR_CPUS)

    def release(self) -> None:
        """Stop the actor pool, freeing its CPUs (the next call starts a new one)."""
        import ray

        for actor in self.actors.values():
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
        self.actors, self.actor_nodes = {}, {}

    # ------------------------------------------------------------------ what workers get
    def payload(self, paths: Sequence[str | os.PathLike]) -> Any:
        """What workers get for these images: their bytes read here and put into the object store
        (workers need not see the driver's disk), or with ``shared_data`` just the paths."""
        import ray

        if self.spec.shared_data:
            return [str(p) for p in paths]
        return ray.put(read_payload(paths))

    def portable(self, factory: Callable[[], Any]) -> Callable[[], Any]:
        """An int8 model factory ships its calibrated model when workers cannot see the disk."""
        from catsdogs.features.extraction import Int8ModelFactory

        if isinstance(factory, Int8ModelFactory) and not self.spec.shared_data:
            return shipped_int8_factory(factory)
        return factory

    # ------------------------------------------------------------------ actor pools
    def _pool(self) -> dict[str, Any]:
        """The engine's actors by id, one per node with a free CPU, started on first use and kept
        (imports and process start paid once) until a grid needs the CPUs or the engine closes.
        Ray restarts a dead worker process (no limit: the driver bounds the tries per chunk) and
        retries no call (the driver does, :meth:`map_chunks`)."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if not self.actors:
            # ray's overloads of remote() omit the actor-only option max_concurrency
            remote_cls = ray.remote(num_cpus=ACTOR_CPUS, max_restarts=-1,  # type: ignore[call-overload]
                                    max_task_retries=0,
                                    max_concurrency=IN_FLIGHT_PER_WORKER)(_Worker)
            nodes: Sequence[str | None] = self._cpu_nodes() or [None]
            self.pool_nodes = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
            self.actors = {uuid.uuid4().hex[:12]: remote_cls.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=True) if n else "DEFAULT"
            ).remote() for n in nodes}
        return self.actors

    def map_chunks(self, factory: Callable[[], Callable[..., Any]], jobs: Sequence,
                   args_of: Callable[[Any], tuple],
                   on_result: Callable[[Any, Any, str, int], None],
                   what: Callable[[Any], str] | None = None) -> int:
        """Apply what ``factory()`` builds (once per actor) to every job: ``run(*args_of(job))``,
        :data:`IN_FLIGHT_PER_WORKER` jobs at a time per actor. ``on_result(job, result, node id,
        pid)`` runs on the driver as jobs finish, once per job. Returns the number of actors used.

        Faults (see the module docstring): a job whose worker process died is retried alone on
        an actor, at most :data:`TRIES` tries in all, then the call fails naming the job
        (``what(job)``) and the worker's exit; a job raising an error raises it here (a
        :class:`~catsdogs.errors.CatsdogsError` as itself). Every :data:`NODE_CHECK_SECONDS` the
        driver checks the nodes of its actors and drops an actor whose node is gone (Ray would
        wait for ever to restart it while the pool holds the other CPUs); its jobs go to the
        other actors, not counted as tries. An actor's node is known from its answers (kept
        across calls); once a node has died, an actor that never answered is dropped too."""
        import ray

        lost_errors = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                       ray.exceptions.NodeDiedError, ray.exceptions.ObjectLostError)
        describe = what or (lambda job: "a chunk")
        self.nodes, self.pids, self.tries = {}, set(), Counter()
        if not jobs:
            return 0
        pool = self._pool()
        ids = list(pool)[:len(jobs)]
        key, factory_ref = uuid.uuid4().hex, ray.put(factory)
        # (job index, tries so far, alone): a job retried after its worker died runs alone
        todo: deque[tuple[int, int, bool]] = deque((n, 0, False) for n in range(len(jobs)))
        pending: dict[Any, tuple[int, int, bool, str]] = {}  # result ref -> (job, tries, alone, actor)
        busy: Counter[str] = Counter()  # actor id -> slots taken
        live = set(ids)  # actors not dropped
        where = {a: self.actor_nodes[a] for a in ids if a in self.actor_nodes}
        probes = {pool[a].ready.remote(): a for a in ids if a not in where}

        # actors whose process died: no job until a probe answers (Ray restarts the process;
        # a call sent meanwhile would fail without running), re-probed every RESTART_WAIT_SECONDS
        restarting: dict[str, float] = {}  # actor id -> when to probe it again (0: probe out)

        def fill() -> None:
            for a in ids:
                while a in live and a not in restarting and todo and busy[a] < IN_FLIGHT_PER_WORKER:
                    n, tries, alone = todo[0]
                    if alone and busy[a]:
                        break
                    todo.popleft()
                    ref = pool[a].run.remote(key, factory_ref, *args_of(jobs[n]))
                    pending[ref] = (n, tries, alone, a)
                    busy[a] += IN_FLIGHT_PER_WORKER if alone else 1

        def probe(a: str) -> None:
            probes[pool[a].ready.remote()] = a
            restarting[a] = 0.0

        def drop(a: str, why: str) -> None:
            if a in live:
                live.discard(a)
                logger.warning("Ray worker actor on node %s %s; its chunks go to the other workers",
                               where.get(a, "?"), why)
                ray.kill(pool[a], no_restart=True)  # its queued calls fail now and are retried

        def check_nodes() -> None:
            alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
            for a in sorted(live):
                if where.get(a) not in alive and (a in where or self.pool_nodes - alive):
                    drop(a, "lost its node" if a in where else "never answered")

        next_check = time.monotonic()  # a node may have died since the last call: check first
        finished = False
        try:
            while True:
                self.check_terminated()
                if time.monotonic() >= next_check:
                    check_nodes()
                    next_check = time.monotonic() + NODE_CHECK_SECONDS
                fill()
                if not pending and not (todo and live):
                    break
                now = time.monotonic()
                for a in [a for a, t in restarting.items() if 0.0 < t <= now and a in live]:
                    probe(a)
                wait = min([NODE_CHECK_SECONDS, *(t - now + 0.01 for t in restarting.values() if t > now)])
                if not pending and not probes:  # every live actor is restarting
                    time.sleep(wait)
                    continue
                done = _wait([*pending, *probes], wait)
                for ref in done:
                    if ref in probes:
                        a = probes.pop(ref)
                        try:
                            node = ray.get(ref)[0]
                        except ray.exceptions.RayError:  # still restarting (or gone: the node check)
                            if a in restarting:
                                restarting[a] = time.monotonic() + RESTART_WAIT_SECONDS
                            continue
                        restarting.pop(a, None)
                        where.setdefault(a, node)
                        self.actor_nodes.setdefault(a, node)
                        continue
                    n, tries, alone, a = pending.pop(ref)
                    busy[a] -= IN_FLIGHT_PER_WORKER if alone else 1
                    try:
                        out = ray.get(ref)
                    except lost_errors as exc:
                        check_nodes()  # a lost node is no fault of the job: not a try
                        if a not in live:
                            todo.appendleft((n, tries, alone))
                            continue
                        if a not in restarting:
                            probe(a)
                        tries += 1
                        self.tries[n] = tries
                        if tries >= TRIES:
                            raise EngineError(
                                f"{describe(jobs[n])} crashed its Ray worker process {tries} times "
                                f"(the last {tries - 1} alone on it; Ray: {_first_line(exc)}); the "
                                "chunks finished so far are kept: fix or remove what crashes it, "
                                "then rerun to resume") from None
                        todo.appendleft((n, tries, True))
                    except ray.exceptions.RayTaskError as exc:
                        raise _task_error(exc) from None
                    else:
                        self.tries[n] = tries + 1
                        where[a] = self.actor_nodes[a] = out["node"]
                        self.nodes[out["node"]] = self.nodes.get(out["node"], 0) + 1
                        self.pids.add(out["pid"])
                        on_result(jobs[n], out["result"], out["node"], out["pid"])
            if todo:
                raise EngineError("every Ray worker actor of this call was lost (their nodes "
                                  "died); everything finished so far is kept: rerun to resume")
            finished = True
        finally:
            if not finished:  # stop what is still computing (the next call starts a new pool)
                live.clear()
                self.release()
            for a in ids:
                if a not in live:
                    self.actors.pop(a, None)
                    self.actor_nodes.pop(a, None)
        return len(ids)

    # ------------------------------------------------------------------ runs
    def map_runs(self, fn: Callable[..., Any], items: Iterable, shared: Any,
                 checkpoints: Checkpoints | None = None) -> Iterator[tuple[Any, Any, str]]:
        """Run ``fn(item, shared)`` for every item as a Ray task (at most :data:`TRIES` tries
        when its worker dies); yield ``(item, result, node id)`` in completion order. ``shared``
        is put into the object store once for all tasks. When a task fails or the caller stops
        (an error, SIGTERM, the generator closed), the other tasks are cancelled.

        With ``checkpoints`` each task gets a third argument reaching a :class:`_Mailbox` actor
        (on the driver's node when it can): it starts with ``checkpoints.saved()``, and what the
        tasks put there is written through ``checkpoints.put`` by the driver, every
        :data:`NODE_CHECK_SECONDS`, before each finished item is yielded, and when the call ends
        however it ends. A retried task reads what its killed try kept."""
        import ray

        self.release()  # the actor pool's CPUs go to the runs
        task = ray.remote(num_cpus=ACTOR_CPUS, max_retries=TRIES - 1)(_run_task)
        shared_ref = ray.put(shared)
        box: Any = None
        extra: tuple[Any, ...] = ()
        if checkpoints is not None:
            options: dict[str, Any] = {"num_cpus": 0}
            with contextlib.suppress(Exception):  # a Ray Client driver is on no node: anywhere
                from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

                options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
                    ray.get_runtime_context().get_node_id(), soft=True)
            box = ray.remote(**options)(_Mailbox).remote(checkpoints.saved())
            extra = (_MailboxCheckpoints(box),)

        def deliver() -> None:  # what the tasks kept, written here
            if box is not None:
                for key, value in ray.get(box.take.remote()):
                    checkpoints.put(key, value)  # type: ignore[union-attr]

        pending = {task.remote(fn, item, shared_ref, *extra): item for item in items}
        try:
            while pending:
                self.check_terminated()
                done = _wait(list(pending), NODE_CHECK_SECONDS)
                deliver()
                for ref in done:
                    item = pending.pop(ref)
                    try:
                        result, node = ray.get(ref)
                    except ray.exceptions.RayTaskError as exc:
                        raise _task_error(exc) from None
                    except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                            ray.exceptions.ObjectLostError) as exc:
                        raise EngineError(f"a Ray grid task failed {TRIES} times ({_first_line(exc)}); "
                                          "everything finished so far is kept: rerun to resume") from None
                    yield item, result, node
        finally:
            for ref in pending:
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
            if box is not None:
                try:
                    deliver()  # what the stopped tasks finished is kept for the rerun
                except Exception as exc:  # the call's own error (or SIGTERM's) is the one to report
                    logger.warning("the last checkpoints of this Ray call were lost: %s",
                                   _first_line(exc))
                with contextlib.suppress(Exception):
                    ray.kill(box)


def _wait(refs: list, timeout: float) -> list:
    """The refs of ``refs`` done within ``timeout`` seconds (at least one unless it passed)."""
    import ray

    done, _ = ray.wait(refs, num_returns=1, timeout=timeout)
    return done


def _task_error(exc) -> BaseException:
    """The error a Ray task raised, as the driver reports it: a
    :class:`~catsdogs.errors.CatsdogsError` as itself, anything else as Ray's error."""
    from catsdogs.errors import CatsdogsError

    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, CatsdogsError) else exc


def _gcs_address(ray) -> str | None:
    with contextlib.suppress(Exception):
        return ray.get_runtime_context().gcs_address
    return None
