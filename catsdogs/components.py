"""The three component contracts plugins implement: :class:`Backbone`, :class:`Head`, :class:`Optimizer`.

Everything the core relies on is declared here, nothing is duck-typed:

* :class:`Backbone` – the feature model; the optional ImageNet-classifier capability the audit
  uses is the :class:`ImageNetClassifier` protocol (``has_classifier = True`` plus
  ``build_classifier``), tested with :func:`has_imagenet_classifier`; the optional split of the
  feature model before its last blocks (fine-tuning from cached maps) is the :class:`TopSplit`
  protocol (``has_top_split = True`` plus ``split_top``), tested with :func:`has_top_split`;
* :class:`Head` – ``fit`` / ``predict_proba``; its hyper-parameters are its ``__init__``
  arguments (:meth:`Head.param_names`), checked by :meth:`Head.validate_params`; the tunable ones
  are declared by :meth:`Head.search_space` (keras-tuner ``HyperModel`` style) and a head is
  built from a trial's values by :meth:`Head.from_hp`;
* :class:`Optimizer` – a factory of Keras optimizers.

Input checks and :class:`~catsdogs.validation.NotFittedError` live in :mod:`catsdogs.validation`.
This module imports neither TensorFlow nor Keras, so listing plugins stays fast; components import
them inside the methods that need them.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import functools
import inspect
import logging
import math
import numbers
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from catsdogs.errors import ConfigError, PluginError
from catsdogs.validation import NotFittedError, is_int

if TYPE_CHECKING:  # pragma: no cover
    import keras
    import numpy as np

NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")

#: the version of the plugin contract this module declares; ``docs/plugins.md`` says what changed
#: in each version and which deprecated forms are still accepted (with a
#: :class:`PluginContractWarning`) until when
CONTRACT_VERSION = 2


class PluginContractWarning(FutureWarning):
    """A plugin component uses a form the plugin contract has deprecated. It still works (the
    base class adapts it) for one more contract version; the message names the component, its
    class and module (the plugin) and what to change."""

#: weights options every backbone understands. ``none`` means a deterministically seeded random
#: initialisation (offline, for tests); ``imagenet`` means pretrained ImageNet weights.
WEIGHTS_NONE = "none"
WEIGHTS_IMAGENET = "imagenet"

#: the square crops a crop view takes of the prepared ``S x S`` image (a side of
#: ``crop_fraction * S``, resized back to ``S x S``): the classic five test-time crops
CROP_REGIONS = ("center", "top_left", "top_right", "bottom_left", "bottom_right")
#: input views of a photo that a backbone configuration's features may merge (``views:``), all
#: computed from one decode: the prepared image, its left-right mirror, its five crops and the
#: crops' mirrors (``flip_<crop>``: the crop, then mirrored; with the crops themselves, the classic
#: ten crops)
FEATURE_VIEWS = ("orig", "flip", *CROP_REGIONS, *(f"flip_{region}" for region in CROP_REGIONS))
#: how several views' features are merged: averaged, or concatenated in :data:`FEATURE_VIEWS` order
VIEW_MERGES = ("mean", "concat")
#: the side of a crop view's square as a fraction of the prepared image's (224 of 256)
DEFAULT_CROP_FRACTION = 0.875


def check_views(views: Sequence[str], merge: str = "mean") -> tuple[str, ...]:
    """``views`` in canonical (:data:`FEATURE_VIEWS`) order, or a :class:`ConfigError`: unknown or
    repeated views, none, or an unknown ``merge``."""
    import difflib

    views = list(views)
    for view in views:
        if view not in FEATURE_VIEWS:
            close = difflib.get_close_matches(str(view), FEATURE_VIEWS, n=1, cutoff=0.75)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown view {view!r}{hint}; choose from: {', '.join(FEATURE_VIEWS)}")
        if views.count(view) > 1:
            raise ConfigError(f"view {view!r} is listed twice; list each view once")
    if not views:
        raise ConfigError(f"no view given; list at least one of: {', '.join(FEATURE_VIEWS)}")
    if merge not in VIEW_MERGES:
        raise ConfigError(f"unknown view merge {merge!r}; choose one of: {', '.join(VIEW_MERGES)}")
    return tuple(v for v in FEATURE_VIEWS if v in views)


def view_parts(view: str) -> tuple[str | None, bool]:
    """A view as ``(crop region or None for the whole image, mirrored)``: ``flip_top_left`` is
    ``("top_left", True)`` (the top-left crop, mirrored), ``orig`` ``(None, False)``."""
    check_views((view,))  # an unknown view: the one message, with its close match
    mirrored = view == "flip" or view.startswith("flip_")
    region = view.removeprefix("flip_") if view.startswith("flip_") else view
    return (None if region in ("orig", "flip") else region), mirrored


def has_crop_views(views: Sequence[str]) -> bool:
    """Whether any of ``views`` crops the image (so that ``crop_fraction`` matters)."""
    return any(view_parts(v)[0] is not None for v in views)


def check_crop_fraction(fraction: Any) -> float:
    """``crop_fraction`` as a float, or a :class:`ConfigError` naming it: a number in (0, 1)."""
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or \
            not math.isfinite(float(fraction)) or not 0 < float(fraction) < 1:
        raise ConfigError(f"crop_fraction must be a number in (0, 1) (the crop's side as a "
                          f"fraction of the image's, e.g. {DEFAULT_CROP_FRACTION}), got {fraction!r}")
    return float(fraction)


def crop_box(region: str, size: int, fraction: float) -> tuple[int, int, int]:
    """``(top, left, side)`` of the square crop ``region`` (:data:`CROP_REGIONS`) of an ``size x
    size`` image: a side of ``floor(fraction * size + 0.5)`` pixels (at least 1), in a corner or
    centred (the centre's offset rounded down)."""
    if region not in CROP_REGIONS:
        raise ConfigError(f"unknown crop {region!r}; choose from: {', '.join(CROP_REGIONS)}")
    side = min(size, max(1, math.floor(check_crop_fraction(fraction) * size + 0.5)))
    margin = size - side
    top = {"center": margin // 2, "top_left": 0, "top_right": 0}.get(region, margin)
    left = {"center": margin // 2, "top_left": 0, "bottom_left": 0}.get(region, margin)
    return top, left, side

#: the default search ranges of the common hyper-parameters: name -> (low, high, sampling);
#: ``learning_rate`` is the optimizer's (tuned for every head with ``uses_optimizer``)
DEFAULT_SEARCH_SPACE: dict[str, tuple[float, float, str]] = {
    "dropout": (0.1, 0.7, "linear"),
    "learning_rate": (1e-4, 1e-1, "log"),
    "l2": (1e-6, 1e-2, "log"),
}


@contextlib.contextmanager
def seeded_initializers(seed: int) -> Iterator[None]:
    """Make every unseeded Keras initializer created inside the block draw from ``seed``.

    Keras 3 gives each unseeded initializer a seed from ``make_default_seed()``, which reads
    Python's global ``random`` module; other code (imports, TensorFlow start-up) also draws from it,
    so seeding ``random`` alone is not reproducible. Inside the block ``make_default_seed`` draws
    from a private generator instead; the caller's ``random`` state is left untouched.
    """
    import random
    import sys

    import keras  # noqa: F401  (loads keras.src.* so that the patch points exist)

    rng = random.Random(seed)
    original = getattr(sys.modules.get("keras.src.random.seed_generator"), "make_default_seed", None)
    patched: list[Any] = []  # keras modules, patched by attribute
    if original is not None:
        def make_default_seed() -> int:
            return rng.randint(1, int(1e9))

        modules: list[Any] = list(sys.modules.values())
        for module in modules:
            if getattr(module, "__name__", "").startswith("keras") and \
                    getattr(module, "make_default_seed", None) is original:
                module.make_default_seed = make_default_seed
                patched.append(module)
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)
        for module in patched:
            module.make_default_seed = original


@dataclasses.dataclass(frozen=True)
class FeatureLayer:
    """An earlier output a backbone offers for ``layers:`` (:meth:`Backbone.feature_layers`)."""

    #: the Keras layer of the backbone's model whose (NHWC) output is pooled
    layer: str
    #: its channels: what the pooled features add to the vector
    channels: int


class Backbone(abc.ABC):
    """A convolutional base that maps a raw RGB image to a global-average-pooled feature vector.

    Subclasses set the class or instance attributes below and implement :meth:`build_model`.
    The model returned by :meth:`build` takes raw RGB pixels (float32, 0-255, shape
    ``(batch, S, S, 3)``, input named ``image``) and returns ``(batch, feature_dim)`` float features.
    The backbone's own preprocessing (mean subtraction, scaling, channel order) is part of the graph,
    so a saved or exported model needs nothing but pixels.
    """

    #: unique registry name, e.g. ``resnet50``
    name: str
    #: default square input size in pixels
    input_size: int
    #: smallest input size the architecture accepts
    min_input_size: int = 32
    #: length of the GAP feature vector
    feature_dim: int
    #: human-readable description of the preprocessing inside the graph (stored in cache metadata)
    preprocessing: str
    #: weights options this backbone accepts
    weights_options: tuple[str, ...] = (WEIGHTS_IMAGENET, WEIGHTS_NONE)
    #: seed for ``weights="none"``
    seed: int = 2019
    #: True when the backbone also builds its ImageNet classifier (see :class:`ImageNetClassifier`)
    has_classifier: bool = False
    #: True when the backbone can cut its feature model before its last blocks (see :class:`TopSplit`)
    has_top_split: bool = False
    #: top-level modules it needs beyond the core's dependencies (an extra's); ``catsdogs plugins``
    #: lists the component as unavailable, and why, while one is missing
    requires: tuple[str, ...] = ()

    def feature_layers(self) -> Mapping[str, FeatureLayer]:
        """Earlier outputs whose global-average-pooled features ``layers:`` may add, by name, in
        network order (optional capability; default: none). Each names the Keras layer of
        :meth:`build_model`'s graph whose output is pooled, and its channels."""
        return {}

    def check_layers(self, layers: Sequence[str]) -> tuple[str, ...]:
        """``layers`` in network order, or a :class:`ConfigError` naming what this backbone offers."""
        offered = self.feature_layers()
        layers = list(layers)
        for name in layers:
            if name not in offered:
                available = ", ".join(offered) or "none"
                raise ConfigError(f"backbone {self.name!r} has no feature layer {name!r}; "
                                  f"available: {available}")
            if layers.count(name) > 1:
                raise ConfigError(f"feature layer {name!r} of backbone {self.name!r} is listed "
                                  "twice; list each layer once")
        return tuple(name for name in offered if name in layers)

    def features_dim(self, layers: Sequence[str] = ()) -> int:
        """Length of the feature vector :meth:`build` gives with these ``layers``."""
        offered = self.feature_layers()
        return self.feature_dim + sum(offered[name].channels for name in self.check_layers(layers))

    def weights_id(self, weights: str) -> str:
        """A string that changes whenever the weights do; part of every feature-cache key."""
        self.check_weights(weights)
        if weights == WEIGHTS_NONE:
            from importlib.metadata import version

            # seeded random init depends on Keras' initialiser implementations
            return f"random-seed{self.seed}-keras{version('keras')}"
        return f"{weights}-{type(self).__module__}.{type(self).__name__}"

    def weights_at_hand(self, weights: str, classifier: bool = False) -> bool:
        """True when building with ``weights`` needs no download (``classifier``: the
        :class:`ImageNetClassifier`'s weights). Default: every offered option is at hand, as for
        weights shipped with the plugin; a backbone whose weights are fetched on first use
        (Keras Applications) says whether they already are. The audit's default classifier is
        the first backbone whose classifier weights are at hand."""
        return weights in self.weights_options

    def check_weights(self, weights: str) -> None:
        if weights not in self.weights_options:
            raise ConfigError(
                f"backbone {self.name!r} does not offer weights {weights!r}; "
                f"choose one of: {', '.join(self.weights_options)}"
            )

    def check_image_size(self, image_size: int) -> None:
        if not is_int(image_size) or image_size < self.min_input_size:
            raise ConfigError(
                f"image size {image_size!r} is too small for backbone {self.name!r} "
                f"(minimum {self.min_input_size}, default {self.input_size})"
            )

    def checked_size(self, weights: str, image_size: int | None = None) -> int:
        """The input size a model built with these arguments takes: ``weights`` checked
        (:meth:`check_weights`), then ``image_size`` (default :attr:`input_size`) checked
        (:meth:`check_image_size`). Every builder of this backbone's networks (:meth:`build`, a
        classifier, a split) starts with it, so all refuse the same arguments the same way."""
        self.check_weights(weights)
        size = self.input_size if image_size is None else image_size
        self.check_image_size(size)
        return int(size)

    @contextlib.contextmanager
    def seeded_for(self, weights: str) -> Iterator[None]:
        """Build inside this block to make ``weights="none"`` the same network in every process
        (:func:`seeded_initializers` with :attr:`seed`); other weights are left as they are."""
        if weights == WEIGHTS_NONE:
            with seeded_initializers(self.seed):
                yield
        else:
            yield

    def build(self, weights: str = WEIGHTS_IMAGENET, image_size: int | None = None,
              layers: Sequence[str] = ()) -> keras.Model:
        """Build the feature model. ``weights="none"`` gives the same network in every process.

        ``layers`` (names from :meth:`feature_layers`): the model's output is the usual features
        followed by each layer's global-average-pooled output, in network order, concatenated
        (one forward pass; a single-output model, so it saves, exports and quantises as usual)."""
        size = self.checked_size(weights, image_size)
        layers = self.check_layers(layers)
        with self.seeded_for(weights):
            model = self.build_model(weights, size)
        return self._with_layers(model, layers) if layers else model

    def _with_layers(self, model: keras.Model, layers: Sequence[str]) -> keras.Model:
        import keras

        offered = self.feature_layers()
        pooled = [model.output]
        for name in layers:
            try:
                out = model.get_layer(offered[name].layer).output
            except ValueError:
                raise PluginError(f"backbone {self.name!r} offers feature layer {name!r} as Keras "
                                  f"layer {offered[name].layer!r}, which its model does not "
                                  "have") from None
            pooled.append(keras.layers.GlobalAveragePooling2D(name=f"gap_{name}", dtype="float32")(out))
        features = keras.layers.Concatenate(axis=-1, name="features", dtype="float32")(pooled)
        return keras.Model(model.inputs, features, name=f"{model.name}_layers")

    @abc.abstractmethod
    def build_model(self, weights: str, image_size: int) -> keras.Model:
        """Return the functional Keras model (see the class docstring). Called by :meth:`build`."""

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "input_size": self.input_size,
            "min_input_size": self.min_input_size,
            "feature_dim": self.feature_dim,
            "feature_layers": {name: fl.channels for name, fl in self.feature_layers().items()},
            "preprocessing": self.preprocessing,
            "weights": list(self.weights_options),
            "weights_at_hand": [o for o in self.weights_options if weights_at_hand(self, o)],
            "classifier": has_imagenet_classifier(self),
            "top_split": has_top_split(self),
        }


class SearchSpace:
    """Records what :meth:`Head.search_space` declares, without importing keras-tuner.

    It offers the declaring half of keras-tuner's ``HyperParameters`` (``Float``, ``Int``,
    ``Choice``, ``Boolean``); :meth:`replay` declares the recorded entries on a real one.
    ``entries`` maps each name to ``(method, args, kwargs)`` in declaration order.
    """

    def __init__(self) -> None:
        self.entries: dict[str, tuple[str, tuple[Any, ...], dict[str, Any]]] = {}

    def _record(self, method: str, name: str, *args: Any, **kwargs: Any) -> None:
        if name in self.entries:
            raise ConfigError(f"tunable hyper-parameter {name!r} is declared twice")
        self.entries[name] = (method, args, kwargs)

    def Float(self, name: str, min_value: float, max_value: float, **kwargs: Any) -> None:  # noqa: N802
        self._record("Float", name, min_value, max_value, **kwargs)

    def Int(self, name: str, min_value: int, max_value: int, **kwargs: Any) -> None:  # noqa: N802
        self._record("Int", name, min_value, max_value, **kwargs)

    def Choice(self, name: str, values: Sequence[Any], **kwargs: Any) -> None:  # noqa: N802
        self._record("Choice", name, list(values), **kwargs)

    def Boolean(self, name: str, **kwargs: Any) -> None:  # noqa: N802
        self._record("Boolean", name, **kwargs)

    def replay(self, hp: Any, names: Sequence[str] | None = None) -> None:
        """Declare the recorded entries (only ``names``, when given) on keras-tuner's ``hp``."""
        for name, (method, args, kwargs) in self.entries.items():
            if names is None or name in names:
                getattr(hp, method)(name, *args, **kwargs)


@runtime_checkable
class ImageNetClassifier(Protocol):
    """The optional capability of a backbone to build its ImageNet classifier (used by the audit).

    A backbone offering it sets ``has_classifier = True`` and implements ``build_classifier``:
    a Keras model taking the same raw pixels as :meth:`Backbone.build` and returning the 1000
    ImageNet logits, or with ``with_features=True`` a dict ``{"logits": ..., "features": ...}``
    (the GAP features of :meth:`Backbone.build`) from one forward pass.
    """

    has_classifier: bool

    def build_classifier(self, weights: str = WEIGHTS_IMAGENET, image_size: int | None = None,
                         with_features: bool = False) -> keras.Model: ...


def weights_at_hand(backbone: Any, weights: str, classifier: bool = False) -> bool:
    """``backbone.weights_at_hand(weights, classifier)`` (no download needed) as a listing or a
    default choice may rely on it: a plugin whose check raises or answers something other than
    True counts as not having them (logged), and is not a failure of the caller."""
    try:
        return backbone.weights_at_hand(weights, classifier) is True
    except Exception as exc:
        logging.getLogger("catsdogs").warning(
            "backbone %r: weights_at_hand(%r) failed (%s: %s); counted as not at hand",
            getattr(backbone, "name", backbone), weights, type(exc).__name__, exc)
        return False


def has_imagenet_classifier(backbone: Any) -> bool:
    """True when ``backbone`` offers the :class:`ImageNetClassifier` capability."""
    return getattr(backbone, "has_classifier", False) is True and isinstance(backbone, ImageNetClassifier)


@runtime_checkable
class TopSplit(Protocol):
    """The optional capability of a backbone to cut its feature model before its last blocks
    (lever 4 of issue 24: fine-tuning the top of the network from cached maps).

    A backbone offering it sets ``has_top_split = True`` and implements ``split_top``, which
    returns ``(bottom, top)``: ``bottom`` takes the same raw pixels as :meth:`Backbone.build`
    (input ``image``) and returns the feature maps entering the last ``blocks`` blocks,
    ``(batch, h, w, c)``; ``top`` takes those maps (input ``maps``) and returns the GAP features.
    Both carry the weights :meth:`Backbone.build` gives (``weights="none"``: the same seeded
    network), so ``top(bottom(x))`` equals ``build(weights, image_size)(x)`` to float32 round-off.
    """

    has_top_split: bool

    def split_top(self, weights: str = WEIGHTS_IMAGENET, image_size: int | None = None,
                  blocks: int = 1) -> tuple[keras.Model, keras.Model]: ...


def has_top_split(backbone: Any) -> bool:
    """True when ``backbone`` offers the :class:`TopSplit` capability."""
    return getattr(backbone, "has_top_split", False) is True and isinstance(backbone, TopSplit)


def uses_classifier(head_cls: Any) -> bool:
    """True when the head class ``head_cls`` reads its combination's backbones' own ImageNet
    classifiers (``uses_classifier = True``, e.g. ``imagenet_prior``): the runner plans it only
    where every backbone offers :class:`ImageNetClassifier` and gives it ``weights``."""
    return getattr(head_cls, "uses_classifier", False) is True


def trains_on_maps(head_cls: Any) -> bool:
    """True when the head class ``head_cls`` is trained on cached feature maps
    (:attr:`Head.input` ``"maps"``) rather than on feature vectors."""
    return getattr(head_cls, "input", "features") == "maps"


def copy_weights_by_name(source: keras.Model, targets: Sequence[keras.Model]) -> None:
    """Give every layer with weights of each model in ``targets`` the weights of ``source``'s
    layer of the same name (how :class:`TopSplit` implementations carry a built network's weights
    into its two halves); a target layer with weights that ``source`` lacks is an error."""
    by_name = {layer.name: layer for layer in source.layers}
    for target in targets:
        for layer in target.layers:
            if not layer.weights:
                continue
            if layer.name not in by_name:
                raise PluginError(f"layer {layer.name!r} of {target.name!r} is not in {source.name!r}")
            layer.set_weights(by_name[layer.name].get_weights())


class _Params:
    """scikit-learn style parameter handling: ``__init__`` stores its arguments and nothing else."""

    @classmethod
    def param_names(cls) -> list[str]:
        """The hyper-parameter names: the ``__init__`` arguments (scikit-learn style)."""
        sig = inspect.signature(cls.__init__)
        return [
            p.name
            for p in sig.parameters.values()
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]

    def get_params(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.param_names()}

    def set_params(self, **params: Any) -> _Params:
        valid = self.param_names()
        for key, value in params.items():
            if key not in valid:
                raise ConfigError(
                    f"{type(self).__name__} ({getattr(self, 'name', '?')!r}) has no parameter {key!r}; "
                    f"valid: {', '.join(valid) or '(none)'}"
                )
            setattr(self, key, value)
        return self

    def clone(self):
        return type(self)(**self.get_params())

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"


class Optimizer(_Params, abc.ABC):
    """A factory for Keras optimizers. ``__init__`` stores ``learning_rate`` (``None`` = default)."""

    name: ClassVar[str]
    #: learning rate used when the user gives none (the Keras default)
    default_learning_rate: ClassVar[float]
    #: top-level modules it needs beyond the core's dependencies (see :attr:`Backbone.requires`)
    requires: ClassVar[tuple[str, ...]] = ()

    def __init__(self, learning_rate: float | None = None):
        self.learning_rate = learning_rate

    @property
    def effective_learning_rate(self) -> float:
        """The learning rate to use; raises :class:`ConfigError` unless it is a positive number."""
        lr = self.default_learning_rate if self.learning_rate is None else self.learning_rate
        if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(lr) or lr <= 0:
            raise ConfigError(f"optimizer {self.name!r}: learning_rate must be a positive number, got {lr!r}")
        return float(lr)

    @abc.abstractmethod
    def build(self) -> keras.optimizers.Optimizer:
        """Return a new, unused Keras optimizer."""


@dataclasses.dataclass(frozen=True)
class GroupTerms:
    """The parts of a Keras head's model that grouped training (:mod:`catsdogs.runs.multifit`)
    reproduces beyond ``Input -> Dropout -> Dense``: the model computes
    ``activation(dense(dropout(x)) + term_dense(concat(layer.on_block(x_b) for each term)))``,
    where each term is a frozen layer reading one backbone's feature columns ``x_b`` (e.g. that
    backbone's ImageNet classifier as a dog-vs-cat log-odds) and ``term_dense`` is trained.
    ``terms`` are ``(key, backbone, layer)``: terms with equal keys compute equal columns, so a
    group computes each once per batch."""

    dropout: Any
    dense: Any
    terms: tuple[tuple[Any, str, Any], ...]
    term_dense: Any
    activation: Any


class Head(_Params, abc.ABC):
    """A classifier trained on feature vectors that predicts P(dog).

    The contract is deliberately not Keras-specific, so a gradient-boosting or stacking head fits it:

    * ``__init__(**hyper_parameters)`` stores its arguments only;
    * ``fit(X, y, validation=(X_val, y_val), optimizer=..., epochs=..., batch_size=..., seed=...)``
      trains and returns ``self``; it sets ``history_`` (metric name -> list of per-epoch values,
      possibly empty);
    * ``predict_proba(X)`` returns P(dog) as a float array of shape ``(n,)``.

    Heads that train with a Keras optimizer set ``uses_optimizer = True`` (the runner then crosses
    them with the optimizers of an experiment); others ignore ``optimizer``. Keras heads expose the
    trained graph through :meth:`keras_model` for export.

    The base class enforces what a subclass need not write itself (:meth:`__init_subclass__`):
    ``predict_proba`` / ``keras_model`` before ``fit`` raise
    :class:`~catsdogs.validation.NotFittedError`, and a contract-1 ``fit`` without ``blocks`` keeps
    working with a :class:`PluginContractWarning` (contract versions: :data:`CONTRACT_VERSION`,
    ``docs/plugins.md``).
    """

    name: ClassVar[str]
    uses_optimizer: ClassVar[bool] = True
    #: True when the head's weights can form a class activation map (a 2-unit softmax Dense layer)
    cam_capable: ClassVar[bool] = False
    #: what the head is trained on: ``"features"`` (the fused GAP features of a combination) or
    #: ``"maps"`` (one :class:`TopSplit` backbone's flattened feature maps entering its last
    #: ``top_blocks`` block(s), :mod:`catsdogs.features.maps`; the runner plans such a head on
    #: single-backbone combinations only and gives it ``backbone``, ``weights`` and ``image_size``)
    input: ClassVar[str] = "features"
    #: top-level modules it needs beyond the core's dependencies (see :attr:`Backbone.requires`)
    requires: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Enforce the contract for every subclass, whatever its methods do inside:

        * ``predict_proba`` and ``keras_model`` defined by the subclass are wrapped so that, before
          the head is fitted (:func:`is_fitted`), they raise :class:`NotFittedError` without
          running the subclass's code (a head written with sklearn's ``self.model_`` and no check
          of its own would raise ``AttributeError``);
        * ``fit`` is wrapped to mark the instance fitted when it returns, and, when it does not
          accept ``blocks`` (contract 1, see ``docs/plugins.md``), to call it without ``blocks``
          after one :class:`PluginContractWarning` naming the head and its module.
        """
        super().__init_subclass__(**kwargs)
        for method in ("predict_proba", "keras_model"):
            func = cls.__dict__.get(method)
            if callable(func) and not getattr(func, "__catsdogs_guarded__", False):
                setattr(cls, method, _guard_fitted(func))
        fit = cls.__dict__.get("fit")
        if callable(fit) and not getattr(fit, "__catsdogs_guarded__", False):
            cls.fit = _marking_fit(cls, fit)  # type: ignore[method-assign]

    @abc.abstractmethod
    def fit(
        self,
        X: np.ndarray,
        y: np.ndarray,
        *,
        validation: tuple[np.ndarray, np.ndarray] | None = None,
        optimizer: Optimizer | None = None,
        epochs: int = 8,
        batch_size: int = 128,
        seed: int = 2019,
        verbose: int = 0,
        blocks: Sequence[tuple[str, int]] | None = None,
    ) -> Head:
        """Train on features ``X`` (n, d) and labels ``y`` (n,) in {0, 1}; return ``self``.

        ``blocks`` describes how ``X`` was fused: ``[(backbone name, width), ...]`` in column
        order (widths add up to d). Heads that treat each backbone separately (stacking) use it;
        others ignore it. ``None`` means one block.
        """

    @abc.abstractmethod
    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Return P(dog) for each row of ``X`` as float array of shape ``(n,)``."""

    def can_fit_grouped(self) -> bool:
        """Whether the runner may train this head together with other runs of the grid, in one
        pass over the rows (:mod:`catsdogs.runs.multifit`). Only the built-in Keras heads say yes
        (their compiled loop over ``Input -> Dropout -> Dense``, or that plus frozen per-backbone
        terms described by :class:`GroupTerms`, is what grouping reproduces to float32
        round-off); every other head is fitted alone by its own :meth:`fit`."""
        return False

    def validate_params(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid hyper-parameter.

        Called by the experiment loader (so a bad value fails before any work) and by ``fit``.
        The default accepts everything; override it when a parameter has a range.
        """

    @classmethod
    def search_space(cls, hp: Any) -> None:
        """Declare the head's tunable hyper-parameters on ``hp`` (keras-tuner style).

        ``hp`` offers keras-tuner's ``Float(name, min_value, max_value, sampling=...)``,
        ``Int(name, min_value, max_value, ...)``, ``Choice(name, values)`` and
        ``Boolean(name)``; every name must be a parameter of the head (:meth:`param_names`).
        The tuner declares the optimizer's ``learning_rate`` itself for heads with
        ``uses_optimizer``. The default declares ``dropout`` and ``l2`` (ranges from
        :data:`DEFAULT_SEARCH_SPACE`) when they are parameters of the head.
        """
        names = cls.param_names()
        for name in ("dropout", "l2"):
            if name in names:
                low, high, sampling = DEFAULT_SEARCH_SPACE[name]
                hp.Float(name, low, high, sampling=sampling)

    @classmethod
    def tuning_space(cls) -> SearchSpace:
        """Everything the tuner may search for this head: :meth:`search_space`, plus the
        optimizer's ``learning_rate`` when the head ``uses_optimizer``.

        Raises :class:`ConfigError` when the head declares a name that is not one of its
        parameters (or ``learning_rate``, which belongs to the optimizer).
        """
        space = SearchSpace()
        cls.search_space(space)
        names = cls.param_names()
        for name in space.entries:
            if name not in names:
                raise ConfigError(f"head {cls.name!r} declares the tunable hyper-parameter "
                                  f"{name!r}, which is not one of its parameters "
                                  f"({', '.join(names) or 'none'})")
        if cls.uses_optimizer:
            low, high, sampling = DEFAULT_SEARCH_SPACE["learning_rate"]
            space.Float("learning_rate", low, high, sampling=sampling)
        return space

    @classmethod
    def from_hp(cls, hp: Any, params: Mapping[str, Any] | None = None) -> Head:
        """A new head from a trial's values (keras-tuner's ``HyperModel.build(hp)``).

        ``hp`` is a keras-tuner ``HyperParameters`` (or a plain mapping of values); its values that
        are parameters of the head override the fixed ``params``. Other values (such as the
        optimizer's ``learning_rate``) are left to the caller.
        """
        values = hp if isinstance(hp, Mapping) else hp.values
        names = cls.param_names()
        return cls(**{**(params or {}), **{k: v for k, v in values.items() if k in names}})

    def keras_model(self) -> keras.Model | None:
        """The trained head as a Keras model, or None for heads that are not Keras graphs.

        The model takes one input of shape ``(batch, n_features)`` and has one output of shape
        ``(batch, 1)`` named ``prediction`` holding P(dog), equal to :meth:`predict_proba`.
        Exporters append it to the backbones' feature models to build an end-to-end network.
        """
        return None


#: the instance attribute the wrapped ``fit`` sets (private: not a fitted attribute, not a param)
_FITTED_FLAG = "_catsdogs_fitted"


def is_fitted(head: Head) -> bool:
    """True once ``head`` is fitted: its ``fit`` returned, or it holds fitted state, i.e. an
    instance attribute whose name ends with ``_`` (scikit-learn's rule; :mod:`catsdogs.runs.multifit`
    sets a grouped-trained head's ``model_``/``history_`` directly, and unpickled heads keep
    theirs). ``__init__`` sets no such attribute (a conformance check)."""
    state = getattr(head, "__dict__", {})
    return bool(state.get(_FITTED_FLAG)) or any(
        k.endswith("_") and not k.startswith("_") for k in state)


def check_is_fitted(head: Head, method: str = "predict_proba") -> None:
    """Raise :class:`NotFittedError` naming the head and ``method`` unless ``head`` is fitted."""
    if not is_fitted(head):
        cls = type(head)
        raise NotFittedError(
            f"head {getattr(cls, 'name', cls.__name__)!r} ({cls.__module__}.{cls.__qualname__}): "
            f"{method}() before fit(): head not fitted; call fit() first")


def _guard_fitted(func: Any) -> Any:
    @functools.wraps(func)
    def guarded(self: Head, *args: Any, **kwargs: Any) -> Any:
        check_is_fitted(self, func.__name__)
        return func(self, *args, **kwargs)

    guarded.__catsdogs_guarded__ = True  # type: ignore[attr-defined]
    return guarded


def _accepts(func: Any, name: str) -> bool:
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in params)


def _marking_fit(cls: type[Head], func: Any) -> Any:
    """``fit`` that marks the instance fitted when it returns; a contract-1 ``fit`` without
    ``blocks`` is called without it (deprecated: one :class:`PluginContractWarning` per class)."""
    takes_blocks = _accepts(func, "blocks")
    if not takes_blocks:
        import warnings

        warnings.warn(
            f"head {getattr(cls, 'name', cls.__name__)!r} ({cls.__module__}.{cls.__qualname__}, "
            f"plugin module {cls.__module__!r}): fit() does not accept the keyword argument "
            "`blocks` that catsdogs passes since plugin contract 2; it is called without it "
            f"until contract {CONTRACT_VERSION + 1}, which will require it. Add `blocks=None` "
            "to fit's keyword arguments (see docs/plugins.md)",
            PluginContractWarning, stacklevel=4)

    @functools.wraps(func)
    def fit(self: Head, *args: Any, **kwargs: Any) -> Any:
        if not takes_blocks:
            kwargs.pop("blocks", None)
        result = func(self, *args, **kwargs)
        self.__dict__[_FITTED_FLAG] = True
        return result

    fit.__catsdogs_guarded__ = True  # type: ignore[attr-defined]
    return fit


def component_name(obj: Any) -> str:
    name = getattr(obj, "name", None)
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise PluginError(
            f"component {obj!r} has an invalid name {name!r} "
            "(lower-case letters, digits and underscores, starting with a letter)"
        )
    return name

