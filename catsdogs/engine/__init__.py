"""Where the heavy work runs: in this process (``local``, the default) or on a Ray cluster (``ray``).

An engine computes two things for the pipeline, while the driver (this process) keeps writing
every file itself, atomically, exactly as with the local engine:

* ``compute_features(store, work, model_factory, ...)`` -- the feature chunks still missing from a
  cache file (:func:`catsdogs.features.extraction.extract` hands them over);
* ``map_runs(fn, items, shared)`` -- the grid's pending runs, yielding ``(item, result, node)`` as
  each finishes (:func:`catsdogs.runs.runner.run_experiment`);
* ``audit_chunks(...)`` -- the decode + classify pass of :func:`catsdogs.audit.checks.audit`.

:func:`open_engine` gives ``None`` for ``local`` (callers then run their in-process code path) and
a connected :class:`catsdogs.engine.ray.RayEngine` for ``ray``. Ray is an optional extra
(``pip install 'catsdogs[ray]'``) imported only here, on demand: ``import catsdogs`` never
imports it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from catsdogs.engine.spec import ENGINES, EngineError, EngineSpec  # noqa: F401  (public here)


@contextlib.contextmanager
def open_engine(spec: EngineSpec | str | None = None, **kwargs) -> Iterator:
    """``None`` for the local engine, else a connected Ray engine, closed (a Ray instance started
    for the call shut down) on exit. ``spec`` may be an :class:`EngineSpec` or an engine name
    with ``address``/``shared_data`` as keyword arguments."""
    if spec is None or isinstance(spec, str):
        spec = EngineSpec(spec or "local", **kwargs)
    if spec.name == "local":
        yield None
        return
    from catsdogs.engine.ray import RayEngine

    engine = RayEngine.connect(spec)
    try:
        yield engine
    finally:
        engine.close()


def click_options(command):
    """``--engine``, ``--ray-address`` and ``--ray-shared-data`` for a click command (its
    function gets ``engine``, ``ray_address``, ``ray_shared_data``; ``engine`` None = not given)."""
    import click

    for option in reversed([
        click.option("--engine", type=click.Choice(ENGINES), default=None,
                     help="Where to compute: this process (local, the default) or a Ray cluster."),
        click.option("--ray-address", default=None, metavar="ADDR",
                     help="Ray cluster address for --engine ray [default: $RAY_ADDRESS; none: a "
                          "local Ray instance for this call]."),
        click.option("--ray-shared-data", is_flag=True,
                     help="--engine ray: the data directory is readable at the same path on "
                          "every worker (send paths, not image bytes)."),
    ]):
        command = option(command)
    return command


def engine_spec(engine: str | None, ray_address: str | None = None, ray_shared_data: bool = False,
                default: str = "local", default_address: str | None = None) -> EngineSpec:
    """The spec of command-line options over defaults (e.g. an experiment's ``engine:``)."""
    name = engine or default
    address = ray_address or (default_address if name == "ray" else None)
    return EngineSpec(name, address, ray_shared_data)


__all__ = ["ENGINES", "EngineError", "EngineSpec", "click_options", "engine_spec", "open_engine"]
