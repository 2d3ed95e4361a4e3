"""Plugin loading and the component registry.

Plugins are loaded lazily, once per process, the first time :func:`get_registry` is called:
first the built-in modules in :data:`DEFAULT_PLUGINS`, then every entry point in the ``catsdogs``
group. A plugin that fails to import (any exception, ``SystemExit`` included; only
``KeyboardInterrupt`` passes), implements a hook that does not exist (a misspelled
``register_backbone``: pluggy's ``check_pending`` for that plugin) or fails to register is reported
on the ``catsdogs`` logger (plugin name and error) and skipped; with ``CATSDOGS_STRICT_PLUGINS=1``
the failure is raised instead. Two components of one kind with the same name are a conflict: the
name becomes unusable and using it raises an error naming both plugins.

``CATSDOGS_DISABLE_PLUGINS=name1,name2`` switches installed plugins off (pluggy's
``set_blocked``): they are not imported and ``catsdogs plugins`` lists them as disabled.

Plugin code runs with stdout redirected to stderr (Python's ``sys.stdout`` and file descriptor 1),
so a plugin that prints while being imported cannot corrupt a ``--json`` command's output.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import inspect
import logging
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from catsdogs import hookspecs
from catsdogs.components import (
    Backbone,
    Head,
    Optimizer,
    component_name,
    trains_on_maps,
    uses_classifier,
)
from catsdogs.errors import PluginError

logger = logging.getLogger("catsdogs")

ENTRY_POINT_GROUP = "catsdogs"
DEFAULT_PLUGINS: tuple[str, ...] = (
    "catsdogs.builtin.keras_backbones",
    "catsdogs.builtin.heads",
    "catsdogs.builtin.optimizers",
    "catsdogs.builtin.stacking",
    "catsdogs.builtin.finetune",
    "catsdogs.builtin.prior",
)
KINDS: tuple[str, ...] = ("backbones", "heads", "optimizers")
_HOOKS = {kind: f"register_{kind}" for kind in KINDS}


@dataclass
class PluginInfo:
    """One loaded (or failed) plugin."""

    name: str
    version: str | None
    source: str  # "builtin" or "entry point"
    module: str
    components: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in KINDS})
    error: str | None = None
    #: switched off by ``CATSDOGS_DISABLE_PLUGINS`` (not imported)
    disabled: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "source": self.source,
            "module": self.module,
            **{kind: list(names) for kind, names in self.components.items()},
            "error": self.error,
            "disabled": self.disabled,
        }


@dataclass
class Component:
    kind: str
    name: str
    plugin: str
    obj: Any


class Registry:
    """All components registered by the loaded plugins. Use :func:`get_registry` to obtain it."""

    def __init__(self) -> None:
        self.plugins: list[PluginInfo] = []
        self._components: dict[str, dict[str, Component]] = {k: {} for k in KINDS}
        self._conflicts: dict[str, dict[str, list[str]]] = {k: {} for k in KINDS}
        self.pm = pluggy.PluginManager("catsdogs")
        self.pm.add_hookspecs(hookspecs)

    # -- public lookups -------------------------------------------------------------------------
    def names(self, kind: str) -> list[str]:
        return sorted(self._components[kind])

    def components(self, kind: str) -> list[Component]:
        return [self._components[kind][n] for n in self.names(kind)]

    def get(self, kind: str, name: str) -> Any:
        singular = kind[:-1]
        if name in self._conflicts[kind]:
            owners = self._conflicts[kind][name]
            raise PluginError(
                f"{singular} {name!r} is registered by more than one plugin: "
                f"{' and '.join(repr(o) for o in owners)}; uninstall or disable one of them"
            )
        try:
            return self._components[kind][name].obj
        except KeyError:
            available = ", ".join(self.names(kind)) or "(none installed)"
            raise PluginError(
                f"unknown {singular} {name!r}; available: {available}. "
                "Run `catsdogs plugins` to see what is installed."
            ) from None

    def backbone(self, name: str) -> Backbone:
        return self.get("backbones", name)

    def head(self, name: str) -> type[Head]:
        return self.get("heads", name)

    def optimizer(self, name: str) -> type[Optimizer]:
        return self.get("optimizers", name)

    @contextlib.contextmanager
    def temporarily(self, kind: str, obj: Any, plugin: str) -> Iterator[None]:
        """``obj`` registered as a component of ``kind`` by ``plugin`` for the ``with`` block
        (e.g. :mod:`catsdogs.testing`'s tiny backbone while a head check runs); a name already
        registered is a :class:`PluginError`."""
        problem = _problem(kind, obj)
        if problem is not None:
            raise PluginError(f"{plugin}: {problem}")
        name = component_name(obj)
        if name in self._components[kind] or name in self._conflicts[kind]:
            raise PluginError(f"{plugin}: {kind[:-1]} {name!r} is already registered")
        self._components[kind][name] = Component(kind, name, plugin, obj)
        try:
            yield
        finally:
            self._components[kind].pop(name, None)

    @property
    def failures(self) -> list[PluginInfo]:
        return [p for p in self.plugins if p.error]

    @property
    def disabled(self) -> list[PluginInfo]:
        return [p for p in self.plugins if p.disabled]

    @property
    def conflicts(self) -> dict[str, dict[str, list[str]]]:
        return {k: dict(v) for k, v in self._conflicts.items() if v}

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"plugins": [p.to_dict() for p in self.plugins]}
        for kind in KINDS:
            entries = []
            for comp in self.components(kind):
                entry: dict[str, Any] = {"name": comp.name, "plugin": comp.plugin}
                if kind == "backbones":
                    entry.update(comp.obj.describe())
                else:
                    entry["class"] = f"{comp.obj.__module__}.{comp.obj.__qualname__}"
                    if kind == "heads":
                        entry["uses_optimizer"] = comp.obj.uses_optimizer
                        entry["cam_capable"] = comp.obj.cam_capable
                        entry["uses_classifier"] = uses_classifier(comp.obj)
                        entry["trains_on_maps"] = trains_on_maps(comp.obj)
                    else:
                        entry["default_learning_rate"] = comp.obj.default_learning_rate
                entries.append(entry)
            for name, owners in self._conflicts[kind].items():
                entries.append({"name": name, "plugin": owners, "error": "conflict"})
            out[kind] = entries
        return out

    # -- loading ----------------------------------------------------------------------------------
    def load(self, strict: bool = False, entry_points: bool = True,
             disabled: tuple[str, ...] | None = None) -> Registry:
        """Load the built-in plugins, then the entry points; ``disabled`` (default: from
        ``CATSDOGS_DISABLE_PLUGINS``) names plugins to leave out."""
        disabled = disabled_from_env() if disabled is None else tuple(disabled)
        for name in disabled:
            self.pm.set_blocked(name)
        for module_name in DEFAULT_PLUGINS:
            self._load_one(module_name, None, "builtin",
                           lambda m=module_name: importlib.import_module(m), strict)
        if entry_points:
            for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
                version = ep.dist.version if ep.dist is not None else None
                self._load_one(ep.name, version, "entry point", ep.load, strict, module=ep.value)
        known = [p.name for p in self.plugins]
        for name in disabled:
            if name not in known:
                logger.warning("CATSDOGS_DISABLE_PLUGINS names %r, which is not installed%s; "
                               "installed: %s", name, _suggest(name, known), ", ".join(known))
        return self

    def _fail(self, info: PluginInfo, message: str, strict: bool, exc: BaseException | None) -> None:
        info.error = message
        if strict:
            raise PluginError(f"plugin {info.name!r} failed: {message}") from exc
        logger.warning(
            "plugin %r failed and was skipped: %s "
            "(set CATSDOGS_STRICT_PLUGINS=1 to make this fatal)",
            info.name,
            message,
        )

    def _load_one(self, name, version, source, loader, strict, module=None) -> None:
        from catsdogs._version import __version__

        info = PluginInfo(
            name=name,
            version=__version__ if source == "builtin" else version,
            source=source,
            module=module or name,
        )
        self.plugins.append(info)
        if self.pm.is_blocked(name):
            info.disabled = True
            return
        try:
            with stdout_to_stderr():
                plugin = loader()
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # a broken plugin (even one calling sys.exit) is contained
            self._fail(info, f"import failed: {type(exc).__name__}: {exc}", strict, exc)
            return
        try:
            self.pm.register(plugin, name=name)
        except Exception as exc:  # e.g. the same module registered twice, or a bad hookimpl
            self._fail(info, f"registration failed: {type(exc).__name__}: {exc}", strict, exc)
            return
        unknown = self._unknown_hooks(plugin)
        if unknown:
            self.pm.unregister(name=name)
            self._fail(info, "; ".join(unknown), strict, None)
            return
        # collect and validate everything first: a plugin registers all of its components or none
        collected: list[tuple[str, str, Any]] = []
        for kind, hook_name in _HOOKS.items():
            hook = getattr(self.pm.hook, hook_name)
            for impl in hook.get_hookimpls():
                if impl.plugin_name != name:
                    continue
                registered: list[Any] = []
                try:
                    with stdout_to_stderr():
                        impl.function(**{arg: registered.append for arg in impl.argnames})
                except KeyboardInterrupt:
                    raise
                except BaseException as exc:
                    self.pm.unregister(name=name)
                    self._fail(info, f"{hook_name} raised {type(exc).__name__}: {exc}", strict, exc)
                    return
                for obj in registered:
                    problem = _problem(kind, obj)
                    if problem:
                        self._fail(info, f"{hook_name}: {problem}", strict, None)
                        return
                    collected.append((kind, obj.name, obj))
        for kind, comp_name, obj in collected:
            self._add(info, kind, comp_name, obj, strict)

    def _unknown_hooks(self, plugin: Any) -> list[str]:
        """pluggy's ``check_pending`` for one plugin: its hook implementations without a spec."""
        problems = []
        for caller in self.pm.get_hookcallers(plugin) or []:
            if caller.spec is not None:
                continue
            for impl in caller.get_hookimpls():
                if impl.plugin is plugin and not impl.optionalhook:
                    hooks = list(_HOOKS.values())
                    problems.append(f"unknown hook {caller.name!r}{_suggest(caller.name, hooks)}; "
                                    f"catsdogs hooks: {', '.join(hooks)}")
        return problems

    def _add(self, info: PluginInfo, kind: str, name: str, obj: Any, strict: bool) -> None:
        info.components[kind].append(name)
        if name in self._conflicts[kind]:
            self._conflicts[kind][name].append(info.name)
            return
        existing = self._components[kind].get(name)
        if existing is not None:
            owners = [existing.plugin, info.name]
            message = (
                f"{kind[:-1]} {name!r} is registered by two plugins: "
                f"{owners[0]!r} and {owners[1]!r}"
            )
            if strict:
                raise PluginError(message)
            logger.warning("%s; the name is unusable until one is removed", message)
            del self._components[kind][name]
            self._conflicts[kind][name] = owners
            return
        self._components[kind][name] = Component(kind, name, info.name, obj)


def _problem(kind: str, obj: Any) -> str | None:
    """Why ``obj`` cannot be registered as a component of ``kind`` (None when it can)."""
    try:
        component_name(obj)
    except PluginError as exc:
        return str(exc)
    if kind == "backbones":
        return None if isinstance(obj, Backbone) else f"got {obj!r}, expected a Backbone instance"
    base = Head if kind == "heads" else Optimizer
    if not (isinstance(obj, type) and issubclass(obj, base)):
        return f"got {obj!r}, expected a {base.__name__} subclass"
    if inspect.isabstract(obj):
        missing = ", ".join(sorted(obj.__abstractmethods__))
        return f"{obj.__name__} is abstract (does not implement {missing})"
    return None


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send everything written to stdout inside the block to stderr.

    Both ``sys.stdout`` and, where there is one, file descriptor 1 (so ``print`` and C-level writes
    alike) are redirected; the JSON a command prints afterwards stays the only thing on stdout.
    """
    sys.stdout.flush()
    saved: int | None = None
    try:
        saved = os.dup(1)
        os.dup2(2, 1)
    except OSError:  # no real descriptors (embedded interpreters): Python-level only
        saved = None
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        if saved is not None:
            with contextlib.suppress(OSError):
                os.dup2(saved, 1)
            os.close(saved)


_registry: Registry | None = None
_lock = threading.Lock()


def strict_from_env() -> bool:
    return os.environ.get("CATSDOGS_STRICT_PLUGINS", "").strip().lower() in {"1", "true", "yes", "on"}


def disabled_from_env() -> tuple[str, ...]:
    """The plugin names listed in ``CATSDOGS_DISABLE_PLUGINS`` (comma-separated)."""
    raw = os.environ.get("CATSDOGS_DISABLE_PLUGINS", "")
    return tuple(dict.fromkeys(n.strip() for n in raw.split(",") if n.strip()))


def get_registry() -> Registry:
    """The process-wide registry, loaded on first use (once)."""
    global _registry
    if _registry is None:
        with _lock:
            if _registry is None:
                _registry = Registry().load(strict=strict_from_env())
    return _registry


def reset_registry() -> None:
    """Forget the loaded registry (the next :func:`get_registry` loads plugins again)."""
    global _registry
    with _lock:
        _registry = None
