"""Where the heavy work runs: in this process (``local``, the default) or on a Ray cluster (``ray``).

Every engine is a :class:`~catsdogs.compute.Engine` with the same seams -- ``map_chunks``
(feature extraction, the audit's classifier pass, the label-issue finder's features) and
``map_runs`` (a grid's runs, in groups that train together, and the refit) -- while the driver
(this process) writes every file itself, atomically, whichever engine computed.

:func:`open_engine` gives the :class:`~catsdogs.compute.LocalEngine` for ``local`` and a connected
:class:`catsdogs.engine.ray.RayEngine` for ``ray``. Ray is an optional extra
(``pip install 'catsdogs[ray]'``) imported only here, on demand: ``import catsdogs`` never
imports it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from catsdogs.compute import LOCAL, Engine, LocalEngine  # noqa: F401  (public here)
from catsdogs.engine.spec import ENGINES, EngineError, EngineSpec  # noqa: F401  (public here)


@contextlib.contextmanager
def open_engine(spec: EngineSpec | str | None = None, **kwargs) -> Iterator[Engine]:
    """The local engine, or a connected Ray engine closed (a private Ray instance shut down) on
    exit. ``spec`` may be an :class:`EngineSpec` or an engine name with ``address`` /
    ``shared_data`` as keyword arguments."""
    if spec is None or isinstance(spec, str):
        spec = EngineSpec(spec or "local", **kwargs)
    if spec.name == "local":
        yield LocalEngine()
        return
    from catsdogs.engine.ray import RayEngine

    engine = RayEngine.connect(spec)
    try:
        with engine.terminable():  # SIGTERM is one Terminated error, whatever code it interrupted
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
                     help="Ray cluster to join for --engine ray: HOST:PORT, ray://HOST:PORT or "
                          "auto (the one running on this machine) [default: $RAY_ADDRESS; none: "
                          "a private Ray instance for this call]."),
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


__all__ = ["ENGINES", "LOCAL", "Engine", "EngineError", "EngineSpec", "LocalEngine", "click_options",
           "engine_spec", "open_engine"]
