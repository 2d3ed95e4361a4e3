"""What names an engine (:class:`EngineSpec`) and its error; a module of its own so that the
engines import it without importing the package facade (:mod:`catsdogs.engine`)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from catsdogs.errors import CatsdogsError, ConfigError

ENGINES = ("local", "ray")


class EngineError(CatsdogsError):
    """The execution engine is unavailable: Ray missing, cluster unreachable, no CPU free."""


@dataclass(frozen=True)
class EngineSpec:
    """Which engine, and for Ray: the cluster address (None: ``$RAY_ADDRESS``, else a private Ray
    instance for the call; ``auto``: the cluster running on this machine) and whether the data directory is readable at the same path on every
    worker (``shared_data``; otherwise image bytes travel through Ray's object store)."""

    name: str = "local"
    address: str | None = None
    shared_data: bool = False

    def __post_init__(self) -> None:
        if self.name not in ENGINES:
            raise ConfigError(f"unknown engine {self.name!r}; choose one of: {', '.join(ENGINES)}")
        if self.name == "local" and self.address:
            raise ConfigError("a Ray address was given but the engine is 'local'; add --engine ray")

    @property
    def resolved_address(self) -> str | None:
        return self.address or os.environ.get("RAY_ADDRESS") or None
