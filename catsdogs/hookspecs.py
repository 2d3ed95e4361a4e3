"""The hooks a catsdogs plugin can implement.

A plugin is a module (or object) with functions decorated by :data:`hookimpl` and named like the
specifications below. Third-party plugins are found through the ``catsdogs`` entry-point group::

    # pyproject.toml of the plugin distribution
    [project.entry-points.catsdogs]
    my_plugin = "my_plugin"

Every hook receives a ``register`` callback and calls it once per component it provides, in the
style of ``llm``'s ``register_models(register)``. The built-in components are registered through
exactly the same hooks (see :data:`catsdogs.plugins.DEFAULT_PLUGINS`).

Hook implementations must be cheap: do not import TensorFlow or build networks here, only describe
components. Heavy work happens when a component is used.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from catsdogs.components import Backbone, Head, Optimizer

hookspec = pluggy.HookspecMarker("catsdogs")
hookimpl = pluggy.HookimplMarker("catsdogs")


@hookspec
def register_backbones(register: Callable[[Backbone], None]) -> None:
    """Register feature-extracting backbones.

    Call ``register(backbone)`` with an instance of a :class:`catsdogs.components.Backbone`
    subclass for every network the plugin provides. ``backbone.name`` must be unique among all
    installed plugins; it is what users write after ``--backbone`` and in experiment files.
    """


@hookspec
def register_heads(register: Callable[[type[Head]], None]) -> None:
    """Register classifier heads trained on (concatenated) cached features.

    Call ``register(HeadClass)`` with a subclass of :class:`catsdogs.components.Head`. The class is
    instantiated with the user's hyper-parameters (``HeadClass(**params)``), then ``fit(X, y, ...)``
    and ``predict_proba(X)`` are called, scikit-learn style.
    """


@hookspec
def register_optimizers(register: Callable[[type[Optimizer]], None]) -> None:
    """Register optimizers for Keras heads.

    Call ``register(OptimizerClass)`` with a subclass of :class:`catsdogs.components.Optimizer`.
    It is instantiated as ``OptimizerClass(learning_rate=..., **params)`` and ``build()`` returns a
    fresh ``keras.optimizers.Optimizer`` for every training run.
    """
