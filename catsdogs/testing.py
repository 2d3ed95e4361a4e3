"""Conformance checks for plugin components, in the spirit of scikit-learn's ``check_estimator``.

Every property of the contract (:mod:`catsdogs.components`) is one named check, so a failing test
says which property broke. A plugin's own test suite runs them all, one pytest test per check::

    from catsdogs.testing import parametrize_with_checks

    @parametrize_with_checks([MyBackbone(), MyHead, MyOptimizer])
    def test_conformance(component, check):
        check(component)

or all checks of one component in one test::

    from catsdogs.testing import check_backbone, check_head, check_optimizer

    def test_my_head():
        check_head(MyHead)

A check returns nothing when the component honours the property and raises
:class:`AssertionError` naming the component and the broken property otherwise. The checks run
on CPU in seconds, offline: backbones are built with ``weights="none"`` (seeded random
initialisation) and heads are trained on a small synthetic, linearly separable data set.
:func:`backbone_checks`, :func:`head_checks` and :func:`optimizer_checks` list the checks of each
kind; fixtures for plugin test suites ship as a pytest plugin (:mod:`catsdogs.pytest_plugin`).
"""

from __future__ import annotations

import functools
import http.client
import inspect
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np

from catsdogs.components import (
    WEIGHTS_NONE,
    Backbone,
    Head,
    Optimizer,
    component_name,
    has_top_split,
    trains_on_maps,
    uses_classifier,
)
from catsdogs.errors import ConfigError, PluginError
from catsdogs.validation import NotFittedError, is_int

if TYPE_CHECKING:  # pragma: no cover
    import keras

__all__ = [
    "check_backbone",
    "check_head",
    "check_optimizer",
    "backbone_checks",
    "head_checks",
    "optimizer_checks",
    "checks_for",
    "parametrize_with_checks",
    "make_separable_features",
    "make_maps",
    "TinyTopSplit",
    "TinyClassifier",
    "make_kaggle_dataset",
    "write_jpeg",
]

#: a check: called with the component (a Backbone instance, a Head or Optimizer class) and, for
#: backbones and heads, the further arguments their ``*_checks()`` docstrings list
Check = Callable[..., None]


class _Checker:
    """Builds uniform failure messages: ``<kind> <name>: <property>``."""

    def __init__(self, kind: str, obj: Any):
        self.kind = kind
        self.label = f"{kind} {getattr(obj, 'name', None)!r} ({_qualname(obj)})"

    def fail(self, message: str) -> NoReturn:
        raise AssertionError(f"{self.label}: {message}")

    def check(self, condition: Any, message: str) -> None:
        if not condition:
            self.fail(message)

    def raises(self, exc_type: type[BaseException] | tuple[type[BaseException], ...],
               func, message: str) -> None:
        try:
            func()
        except exc_type:
            return
        except Exception as exc:
            self.fail(f"{message}; it raised {type(exc).__name__}: {exc}")
        self.fail(f"{message}; nothing was raised")


def _qualname(obj: Any) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _check_name(c: _Checker, obj: Any) -> None:
    try:
        component_name(obj)
    except PluginError as exc:
        c.fail(f"invalid name: {exc}")


def _params_equal(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a.keys() != b.keys():
        return False
    for key in a:
        x, y = a[key], b[key]
        if x is y:
            continue
        try:
            if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
                if not np.array_equal(x, y):
                    return False
            elif not bool(x == y):
                return False
        except Exception:
            return False
    return True


def _check_params(c: _Checker, obj: Any, cls: type[Any], given: dict[str, Any] | None = None) -> dict[str, Any]:
    """sklearn rules: ``__init__`` stores its arguments unchanged, get/set_params and clone work.

    ``obj`` must have been constructed as ``cls(**given)``.
    """
    given = given or {}
    try:
        params = obj.get_params()
    except Exception as exc:
        c.fail(f"get_params() failed ({type(exc).__name__}: {exc}); "
               "__init__ must store every argument as an attribute of the same name")
    c.check(isinstance(params, dict), f"get_params() must return a dict, got {type(params).__name__}")
    signature = inspect.signature(cls.__init__)
    for name, value in params.items():
        expected = given.get(name, signature.parameters[name].default)
        if expected is not inspect.Parameter.empty:
            c.check(_params_equal({name: value}, {name: expected}),
                    f"__init__ must store argument {name!r} unchanged: passed {expected!r}, "
                    f"stored {value!r}")
    fitted = sorted(k for k in vars(obj) if k.endswith("_") and not k.startswith("_"))
    c.check(not fitted, f"__init__ must store its arguments only, but it set fitted attributes {fitted}")
    try:
        again = cls(**params).get_params()
    except Exception as exc:
        c.fail(f"cannot be re-created from get_params() ({type(exc).__name__}: {exc})")
    c.check(_params_equal(again, params),
            f"get_params() does not round-trip through __init__: {params!r} -> {again!r}")
    clone = obj.clone()
    c.check(type(clone) is cls and clone is not obj, "clone() must return a new instance of the same class")
    c.check(_params_equal(clone.get_params(), params),
            f"clone() changed the parameters: {params!r} -> {clone.get_params()!r}")
    c.check(obj.set_params(**params) is obj, "set_params() must return self")
    c.raises(ConfigError, lambda: obj.clone().set_params(no_such_parameter_xyz=1),
             "set_params() with an unknown parameter must raise ConfigError")
    return params


# -- backbones -------------------------------------------------------------------------------------
def _random_pixels(n: int, size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(0.0, 255.0, size=(n, size, size, 3)).astype(np.float32)


def _positive_int(value: Any) -> bool:
    return is_int(value) and value > 0


def check_backbone_attributes(backbone: Backbone, image_size: int | None = None,
                              weights: str = WEIGHTS_NONE) -> None:
    """A Backbone instance with a valid name, sizes, feature_dim, preprocessing, weights options."""
    c = _Checker("backbone", backbone)
    c.check(isinstance(backbone, Backbone),
            f"must be an instance of catsdogs.components.Backbone, got {type(backbone).__name__}")
    _check_name(c, backbone)
    c.check(_positive_int(backbone.min_input_size),
            f"min_input_size must be a positive int, got {backbone.min_input_size!r}")
    c.check(_positive_int(backbone.input_size) and backbone.input_size >= backbone.min_input_size,
            f"input_size must be an int >= min_input_size ({backbone.min_input_size}), "
            f"got {backbone.input_size!r}")
    c.check(_positive_int(backbone.feature_dim),
            f"feature_dim must be a positive int, got {backbone.feature_dim!r}")
    c.check(isinstance(backbone.preprocessing, str) and backbone.preprocessing.strip(),
            f"preprocessing must be a non-empty description, got {backbone.preprocessing!r}")
    options = tuple(backbone.weights_options)
    c.check(options and all(isinstance(o, str) for o in options),
            f"weights_options must be a non-empty tuple of strings, got {options!r}")
    c.check(WEIGHTS_NONE in options, f"weights_options {options!r} must include {WEIGHTS_NONE!r}")
    c.check(weights in options, f"weights {weights!r} to check is not in weights_options {options!r}")
    c.check(backbone.describe().get("name") == backbone.name, "describe()['name'] must be the name")
    size = backbone.min_input_size if image_size is None else image_size
    c.check(_positive_int(size) and size >= backbone.min_input_size,
            f"image_size to check ({size!r}) must be an int >= min_input_size")
    c.check(isinstance(backbone.has_classifier, bool), "has_classifier must be a bool")
    for option in options:
        c.check(isinstance(backbone.weights_at_hand(option), bool),
                f"weights_at_hand({option!r}) must be a bool")
    if backbone.has_classifier:
        _classifier_builder(c, backbone)


def _classifier_builder(c: _Checker, backbone: Backbone) -> Callable[..., Any]:
    """A backbone with ``has_classifier`` set: its ``build_classifier``, or the check fails."""
    build = getattr(backbone, "build_classifier", None)
    if not callable(build):
        c.fail("has_classifier is True but there is no build_classifier() "
               "(the catsdogs.components.ImageNetClassifier capability)")
    return build


def check_backbone_weights_ids(backbone: Backbone, image_size: int | None = None,
                               weights: str = WEIGHTS_NONE) -> None:
    """``weights_id`` is a non-empty string per weights option, different for each option."""
    c = _Checker("backbone", backbone)
    ids = {}
    for option in tuple(backbone.weights_options):
        try:
            ids[option] = backbone.weights_id(option)
        except Exception as exc:
            c.fail(f"weights_id({option!r}) failed: {type(exc).__name__}: {exc}")
        c.check(isinstance(ids[option], str) and ids[option],
                f"weights_id({option!r}) must be a non-empty string, got {ids[option]!r}")
    c.check(len(set(ids.values())) == len(ids),
            f"weights_id must differ between weights options (it keys the feature cache): {ids!r}")


def check_backbone_rejects_bad_arguments(backbone: Backbone, image_size: int | None = None,
                                         weights: str = WEIGHTS_NONE) -> None:
    """Unknown weights and too small images are a :class:`ConfigError` (:meth:`check_weights`,
    :meth:`check_image_size`), and the optional builders (``build_classifier``, ``split_top``)
    refuse them as :meth:`build` does, before building anything
    (:meth:`~catsdogs.components.Backbone.checked_size`)."""
    c = _Checker("backbone", backbone)
    c.raises(ConfigError, lambda: backbone.check_weights("bogus"),
             "check_weights('bogus') must raise ConfigError")
    small = backbone.min_input_size - 1
    c.raises(ConfigError, lambda: backbone.check_image_size(small),
             f"check_image_size(min_input_size - 1 = {small}) must raise ConfigError")
    size = backbone.min_input_size if image_size is None else image_size
    builders: list[tuple[str, Callable[..., Any]]] = []
    if backbone.has_classifier:
        builders.append(("build_classifier", _classifier_builder(c, backbone)))
    if has_top_split(backbone):
        builders.append(("split_top", backbone.split_top))  # type: ignore[attr-defined]
    for name, build in builders:
        c.raises(ConfigError, lambda build=build: build("bogus", size),
                 f"{name}('bogus', {size}) must raise ConfigError, as build() does")
        c.raises(ConfigError, lambda build=build: build(weights, small),
                 f"{name}({weights!r}, min_input_size - 1 = {small}) must raise ConfigError, "
                 "as build() does")


def _build_backbone(c: _Checker, backbone: Backbone, weights: str, size: int) -> keras.Model:
    import keras

    try:
        model = backbone.build(weights, size)
    except Exception as exc:
        c.fail(f"build({weights!r}, {size}) failed: {type(exc).__name__}: {exc}")
    c.check(isinstance(model, keras.Model),
            f"build() must return a keras.Model, got {type(model).__name__}")
    return model


def _backbone_features(c: _Checker, backbone: Backbone, where: str, m: keras.Model,
                       pixels: np.ndarray) -> np.ndarray:
    import keras

    try:
        out = m(pixels, training=False)
    except Exception as exc:
        c.fail(f"{where} failed on a batch of {len(pixels)} images: {type(exc).__name__}: {exc}")
    arr = np.asarray(keras.ops.convert_to_numpy(out))
    expected = (len(pixels), backbone.feature_dim)
    c.check(arr.shape == expected,
            f"{where}: features of {len(pixels)} image(s) have shape {arr.shape}, expected {expected}")
    c.check(arr.dtype == np.float32, f"{where}: features must be float32, got {arr.dtype}")
    c.check(np.isfinite(arr).all(), f"{where}: features contain NaN or inf")
    return arr


def check_backbone_model(backbone: Backbone, image_size: int | None = None,
                         weights: str = WEIGHTS_NONE) -> None:
    """``build()`` gives a one-input (``image``), one-output ``(None, feature_dim)`` model with a
    ``gap`` layer over a 4-D feature map; features are finite float32, depend on the image and
    not on the rest of the batch."""
    c = _Checker("backbone", backbone)
    size = backbone.min_input_size if image_size is None else image_size
    model = _build_backbone(c, backbone, weights, size)
    where = f"model from build({weights!r}, {size})"
    c.check(len(model.inputs) == 1, f"{where} must have exactly one input, has {len(model.inputs)}")
    image = model.inputs[0]
    c.check(image.name == "image", f"{where}: the input must be named 'image', got {image.name!r}")
    c.check(tuple(image.shape) == (None, size, size, 3),
            f"{where}: input shape must be (None, {size}, {size}, 3), got {tuple(image.shape)}")
    c.check(len(model.outputs) == 1, f"{where} must have exactly one output, has {len(model.outputs)}")
    out_shape = tuple(model.outputs[0].shape)
    c.check(out_shape == (None, backbone.feature_dim),
            f"{where}: output shape must be (None, feature_dim={backbone.feature_dim}), got {out_shape}")
    try:
        gap = model.get_layer("gap")
    except ValueError:
        c.fail(f"{where} has no layer named 'gap' (global average pooling, used for class "
               "activation maps)")
    gap_in = tuple(gap.input.shape)
    c.check(len(gap_in) == 4,
            f"{where}: the input of layer 'gap' must be a 4-D feature map (batch, h, w, channels), "
            f"got shape {gap_in}")

    pixels = _random_pixels(3, size)
    batch = _backbone_features(c, backbone, where, model, pixels)
    # randomly initialised networks give features of very different magnitudes (Xception's are
    # ~1e-5 at its minimum size), so tolerances are relative to the largest feature
    scale = float(np.abs(batch).max())
    c.check(scale > 0 and not np.allclose(batch[0], batch[1:], rtol=1e-6, atol=1e-6 * scale),
            f"{where}: different images give the same features (is the input used?)")
    single = _backbone_features(c, backbone, where, model, pixels[1:2])
    c.check(np.allclose(batch[1:2], single, rtol=0, atol=1e-4 * scale),
            f"{where}: features of an image depend on the rest of the batch "
            f"(max difference {np.abs(batch[1:2] - single).max():.3g}, largest feature {scale:.3g}; "
            "call sub-layers with training=False)")


def check_backbone_deterministic(backbone: Backbone, image_size: int | None = None,
                                 weights: str = WEIGHTS_NONE) -> None:
    """Two ``build()`` calls give the same weights and the same features."""
    c = _Checker("backbone", backbone)
    size = backbone.min_input_size if image_size is None else image_size
    where = f"model from build({weights!r}, {size})"
    model, again = (_build_backbone(c, backbone, weights, size) for _ in range(2))
    weights_a, weights_b = model.get_weights(), again.get_weights()
    same_weights = len(weights_a) == len(weights_b) and all(
        a.shape == b.shape and np.array_equal(a, b) for a, b in zip(weights_a, weights_b)
    )
    c.check(same_weights, f"two build({weights!r}, {size}) calls give different weights; "
            "the network must be deterministic (seed the initialisation)")
    pixels = _random_pixels(3, size)
    batch = _backbone_features(c, backbone, where, model, pixels)
    scale = float(np.abs(batch).max())
    batch_again = _backbone_features(c, backbone, where, again, pixels)
    c.check(np.allclose(batch, batch_again, rtol=0, atol=1e-5 * scale),
            f"two build({weights!r}, {size}) calls give different features "
            f"(max difference {np.abs(batch - batch_again).max():.3g})")


def check_backbone_classifier(backbone: Backbone, image_size: int | None = None,
                              weights: str = WEIGHTS_NONE) -> None:
    """With the ImageNet-classifier capability (``has_classifier``): ``build_classifier`` gives
    a model on the same ``image`` input whose output is the 1000 logits, and with
    ``with_features=True`` a dict whose ``features`` are :meth:`~Backbone.build`'s features
    and whose ``logits`` are the plain model's (what the audit and ``imagenet_prior`` rely on).
    Nothing to check without the capability."""
    import keras

    if not backbone.has_classifier:
        return
    c = _Checker("backbone", backbone)
    size = backbone.min_input_size if image_size is None else image_size
    where = f"build_classifier({weights!r}, {size})"
    build = _classifier_builder(c, backbone)
    try:
        plain = build(weights, size)
        both = build(weights, size, with_features=True)
    except Exception as exc:
        c.fail(f"{where} failed: {type(exc).__name__}: {exc}")
    c.check(isinstance(plain, keras.Model) and isinstance(both, keras.Model),
            f"{where} must return a keras.Model")
    c.check([t.name for t in plain.inputs] == ["image"],
            f"{where}: the one input must be named 'image', like build()'s")
    pixels = _random_pixels(3, size)
    logits = np.asarray(keras.ops.convert_to_numpy(plain(pixels, training=False)))
    c.check(logits.shape == (3, 1000) and np.isfinite(logits).all(),
            f"{where}: the output must be finite logits of shape (3, 1000) for 3 images, got "
            f"shape {logits.shape}")
    out = both(pixels, training=False)
    c.check(isinstance(out, dict) and set(out) == {"features", "logits"},
            f"{where}, with_features=True: the output must be a dict with 'features' and "
            f"'logits', got {type(out).__name__}{sorted(out) if isinstance(out, dict) else ''}")
    features = np.asarray(keras.ops.convert_to_numpy(out["features"]))
    expected = _backbone_features(c, backbone, f"model from build({weights!r}, {size})",
                                  _build_backbone(c, backbone, weights, size), pixels)
    scale = float(np.abs(expected).max()) or 1.0
    c.check(features.shape == expected.shape
            and np.allclose(features, expected, rtol=0, atol=1e-5 * scale),
            f"{where}: the classifier's features must be build()'s features (the cached ones "
            "its logits are read from)")
    both_logits = np.asarray(keras.ops.convert_to_numpy(out["logits"]))
    lscale = float(np.abs(logits).max()) or 1.0
    c.check(np.allclose(both_logits, logits, rtol=0, atol=1e-5 * lscale),
            f"{where}: with_features=True must give the same logits as without")


def backbone_checks() -> list[Check]:
    """The backbone checks, cheapest first (each takes ``(backbone, image_size, weights)``)."""
    return [check_backbone_attributes, check_backbone_weights_ids,
            check_backbone_rejects_bad_arguments, check_backbone_model,
            check_backbone_deterministic, check_backbone_classifier]


def check_backbone(backbone: Backbone, image_size: int | None = None, weights: str = WEIGHTS_NONE) -> None:
    """Run every backbone check on a :class:`~catsdogs.components.Backbone` instance.

    The network is built with ``weights`` (default ``none``, offline) at ``image_size`` (default:
    the backbone's ``min_input_size``, the cheapest size it accepts) and called on random raw RGB
    pixels. Raises :class:`AssertionError` on the first broken property.
    """
    check_backbone_attributes(backbone, image_size, weights)
    for check in backbone_checks()[1:]:
        check(backbone, image_size, weights)


# -- heads -------------------------------------------------------------------------------------------
def make_separable_features(n: int = 200, d: int = 16, seed: int = 0, margin: float = 1.0):
    """A small linearly separable problem: float32 ``X`` (n, d) and 0/1 labels ``y`` (n,).

    Labels come from the sign of a random projection; each class is then pushed ``margin`` away
    from the separating hyperplane.
    """
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=d)
    direction /= np.linalg.norm(direction)
    X = rng.normal(size=(n, d))
    y = (X @ direction > 0).astype(np.int64)
    X += np.outer(np.where(y == 1, margin, -margin), direction)
    return X.astype(np.float32), y


def write_jpeg(path: Path, seed: int, size: tuple[int, int] = (40, 30), label: int = 0) -> Path:
    """A real JPEG of ``size`` (w, h) with a label-dependent pattern (dogs brighter on the left)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    img = rng.integers(0, 120, (h, w, 3), dtype=np.uint8)
    if label == 1:
        img[:, : w // 2] += 120
    else:
        img[: h // 2] += 100
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, "JPEG", quality=90)
    return path


def make_kaggle_dataset(root: Path, n_per_class: int = 6, n_test: int = 4, seed: int = 0) -> Path:
    """A Kaggle-layout data set of generated JPEGs: train/cat.N.jpg, train/dog.N.jpg, test/N.jpg."""
    root = Path(root)
    for label, cls in enumerate(("cat", "dog")):
        for i in range(1, n_per_class + 1):
            write_jpeg(root / "train" / f"{cls}.{i}.jpg", seed * 1000 + label * 100 + i,
                       size=(30 + i * 3, 28 + (i % 4) * 5), label=label)
    for i in range(1, n_test + 1):
        write_jpeg(root / "test" / f"{i}.jpg", seed * 1000 + 500 + i, label=i % 2)
    return root


class TinyTopSplit(Backbone):
    """A seeded tiny conv net with the :class:`~catsdogs.components.TopSplit` capability: its
    bottom (rescale, strided conv) gives the maps, its top (conv, BatchNormalization, GAP) the
    features. The data the head checks train ``input = "maps"`` heads on (:func:`make_maps`)."""

    name = "catsdogs_testing_split"
    input_size = 24
    min_input_size = 8
    feature_dim = 8
    preprocessing = "x / 255"
    weights_options = (WEIGHTS_NONE,)
    has_top_split = True

    @staticmethod
    def _bottom(image):
        import keras

        x = keras.layers.Rescaling(1 / 255, name="scale")(image)
        return keras.layers.Conv2D(6, 5, strides=2, activation="tanh", name="conv")(x)

    @staticmethod
    def _top(x):
        import keras

        x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="top_conv")(x)
        x = keras.layers.BatchNormalization(name="top_bn")(x)
        return keras.layers.GlobalAveragePooling2D(name="gap")(x)

    def build_model(self, weights: str, image_size: int) -> keras.Model:
        import keras

        image = keras.Input((image_size, image_size, 3), name="image")
        return keras.Model(image, self._top(self._bottom(image)), name=self.name)

    def split_top(self, weights: str = WEIGHTS_NONE, image_size: int | None = None,
                  blocks: int = 1) -> tuple[keras.Model, keras.Model]:
        import keras

        from catsdogs.components import copy_weights_by_name

        if blocks != 1:
            raise ConfigError(f"{self.name} has one top block, got blocks={blocks}")
        size = image_size or self.input_size
        full = self.build(weights, size)
        image = keras.Input((size, size, 3), name="image")
        bottom = keras.Model(image, self._bottom(image), name=f"{self.name}_bottom")
        maps = keras.Input(tuple(bottom.output.shape[1:]), name="maps")
        top = keras.Model(maps, self._top(maps), name=f"{self.name}_top")
        copy_weights_by_name(full, (bottom, top))
        return bottom, top


class TinyClassifier(Backbone):
    """A seeded 32 px conv net with a 1000-way ImageNet-style head (the
    :class:`~catsdogs.components.ImageNetClassifier` capability: ``Dense(1000, name="logits")``
    on the GAP features): the shape of an ImageNet classifier, nothing more. The head checks
    train ``uses_classifier`` heads (``imagenet_prior``) with it registered."""

    name = "catsdogs_testing_classifier"
    input_size = 32
    min_input_size = 8
    feature_dim = 8
    preprocessing = "x / 255"
    weights_options = (WEIGHTS_NONE,)
    has_classifier = True

    def build_model(self, weights: str, image_size: int) -> keras.Model:
        return self._build(image_size, False, features_only=True)

    def build_classifier(self, weights: str = WEIGHTS_NONE, image_size: int | None = None,
                         with_features: bool = False) -> keras.Model:
        size = self.checked_size(weights, image_size)
        with self.seeded_for(weights):
            return self._build(size, with_features)

    def _build(self, size: int, with_features: bool, features_only: bool = False) -> keras.Model:
        import keras

        from catsdogs.layers import PixelNormalization

        image = keras.Input((size, size, 3), name="image")
        x = PixelNormalization(mean=0.0, std=255.0)(image)
        x = keras.layers.Conv2D(8, 3, activation="relu")(x)
        gap = keras.layers.GlobalAveragePooling2D(name="gap", dtype="float32")(x)
        if features_only:
            return keras.Model(image, gap)
        logits = keras.layers.Dense(1000, name="logits", dtype="float32")(gap)
        outputs = {"features": gap, "logits": logits} if with_features else logits
        return keras.Model(image, outputs)


#: what the head checks give an ``input = "maps"`` head besides its own defaults
MAPS_HEAD_PARAMS = {"backbone": TinyTopSplit.name, "weights": WEIGHTS_NONE,
                    "image_size": TinyTopSplit.input_size}


def make_maps(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Flattened float16 maps of :class:`TinyTopSplit`'s bottom for ``n`` generated photos and
    their 0/1 labels: dogs redder, cats bluer (a difference the top's global average pooling
    keeps, so even the frozen top separates them)."""
    rng = np.random.default_rng(seed)
    size = TinyTopSplit.input_size
    y = rng.permutation(np.arange(n) % 2).astype(np.int64)
    pixels = rng.uniform(0, 120, (n, size, size, 3)).astype(np.float32)
    pixels[y == 1, ..., 0] += 120
    pixels[y == 0, ..., 2] += 120
    bottom, _ = TinyTopSplit().split_top(WEIGHTS_NONE, size)
    maps = np.asarray(bottom(pixels, training=False))
    return maps.reshape(n, -1).astype(np.float16), y


class _HeadRun:
    """The shared setup of the head checks: data, fit arguments, fit and predict with checks.
    A head whose ``input`` is ``"maps"`` gets :func:`make_maps`'s rows and
    :data:`MAPS_HEAD_PARAMS` (the checks run with :class:`TinyTopSplit` registered)."""

    def __init__(self, head_cls: type[Head], optimizer: Optimizer | None, epochs: int,
                 batch_size: int, seed: int):
        self.c = _Checker("head", head_cls)
        self.head_cls = head_cls
        self.maps = trains_on_maps(head_cls)
        classifier = uses_classifier(head_cls)
        self.defaults = dict(MAPS_HEAD_PARAMS) if self.maps else (
            {"weights": WEIGHTS_NONE} if classifier else {})
        data = make_maps(seed=seed) if self.maps else make_separable_features(
            d=TinyClassifier.feature_dim if classifier else 16, seed=seed)
        self.X: np.ndarray = data[0]
        self.y: np.ndarray = data[1]
        if head_cls.uses_optimizer and optimizer is None:
            from catsdogs.plugins import get_registry

            optimizer = get_registry().optimizer("adam")(learning_rate=0.01)
        self.fit_kwargs: dict[str, Any] = dict(
            optimizer=optimizer if head_cls.uses_optimizer else None,
            epochs=epochs, batch_size=batch_size, seed=seed)
        if classifier:  # its columns are TinyClassifier's GAP features
            self.fit_kwargs["blocks"] = [(TinyClassifier.name, self.X.shape[1])]

    def new(self, **params: Any) -> Head:
        try:
            return self.head_cls(**{**self.defaults, **params})
        except Exception as exc:
            self.c.fail(f"cannot be constructed with default arguments: {type(exc).__name__}: {exc}")

    def fit(self, h: Head) -> Head:
        try:
            result = h.fit(self.X, self.y, **self.fit_kwargs)
        except Exception as exc:
            self.c.fail(f"fit() failed: {type(exc).__name__}: {exc}")
        self.c.check(result is h, f"fit() must return self, got {result!r}")
        return h

    def predict(self, h: Head, X: np.ndarray) -> np.ndarray:
        c = self.c
        try:
            p = h.predict_proba(X)
        except Exception as exc:
            c.fail(f"predict_proba() failed: {type(exc).__name__}: {exc}")
        c.check(isinstance(p, np.ndarray),
                f"predict_proba() must return a numpy array, got {type(p).__name__}")
        c.check(p.shape == (len(X),),
                f"predict_proba() must return shape (n,) = ({len(X)},), got {p.shape}")
        c.check(p.dtype.kind == "f", f"predict_proba() must return floats, got dtype {p.dtype}")
        c.check(np.isfinite(p).all(), "predict_proba() returned NaN or inf")
        c.check(((p >= 0) & (p <= 1)).all(),
                f"predict_proba() must return probabilities in [0, 1], got range "
                f"[{p.min():.4g}, {p.max():.4g}]")
        return p

    def fitted(self) -> tuple[Head, np.ndarray]:
        """A head fitted with the default parameters and its predictions on the training rows.

        Shared by the checks of one head and fit settings (the last few are kept), so running
        every check fits the head twice, not once per check. Checks must not modify it.
        """
        opt = self.fit_kwargs["optimizer"]
        key = (self.head_cls, None if opt is None else (type(opt), repr(opt.get_params())),
               *(self.fit_kwargs[k] for k in ("epochs", "batch_size", "seed")))
        if key not in _FITTED:
            head = self.fit(self.new())
            if len(_FITTED) >= 4:
                _FITTED.pop(next(iter(_FITTED)))
            _FITTED[key] = (head, self.predict(head, self.X))
        return _FITTED[key]


#: fitted heads shared by the checks (see :meth:`_HeadRun.fitted`)
_FITTED: dict[tuple[Any, ...], tuple[Head, np.ndarray]] = {}


def _head_check(func: Callable[[_HeadRun], None]) -> Callable[..., None]:
    """Turn ``func(run)`` into a public check ``check(head_cls, optimizer=None, epochs=30, ...)``."""

    @functools.wraps(func)
    def check(head_cls: type[Head], optimizer: Optimizer | None = None, epochs: int = 30,
              batch_size: int = 128, seed: int = 7) -> None:
        c = _Checker("head", head_cls)
        c.check(isinstance(head_cls, type) and issubclass(head_cls, Head),
                "must be a subclass of catsdogs.components.Head")
        kind = getattr(head_cls, "input", "features")
        c.check(kind in ("features", "maps"), f"input must be 'features' or 'maps', got {kind!r}")
        from catsdogs.plugins import get_registry

        if kind == "maps":
            with get_registry().temporarily("backbones", TinyTopSplit(), "catsdogs.testing"):
                func(_HeadRun(head_cls, optimizer, epochs, batch_size, seed))
        elif uses_classifier(head_cls):
            with get_registry().temporarily("backbones", TinyClassifier(), "catsdogs.testing"):
                func(_HeadRun(head_cls, optimizer, epochs, batch_size, seed))
        else:
            func(_HeadRun(head_cls, optimizer, epochs, batch_size, seed))

    return check


@_head_check
def check_head_attributes(run: _HeadRun) -> None:
    """A Head subclass with a valid name and boolean ``uses_optimizer`` / ``cam_capable``."""
    c, head_cls = run.c, run.head_cls
    _check_name(c, head_cls)
    c.check(isinstance(head_cls.uses_optimizer, bool), "uses_optimizer must be a bool")
    c.check(isinstance(head_cls.cam_capable, bool), "cam_capable must be a bool")


@_head_check
def check_head_params(run: _HeadRun) -> None:
    """scikit-learn parameters: ``__init__`` stores its arguments; get/set_params, clone; the
    defaults pass ``validate_params``."""
    head = run.new()
    _check_params(run.c, head, run.head_cls, run.defaults)
    try:
        head.validate_params()
    except Exception as exc:
        run.c.fail(f"validate_params() rejects the default parameters: {type(exc).__name__}: {exc}")


@_head_check
def check_head_search_space(run: _HeadRun) -> None:
    """``search_space`` declares only parameters of the head; ``from_hp`` builds a head from them."""
    c, head_cls = run.c, run.head_cls
    try:
        space = head_cls.tuning_space()
    except ConfigError as exc:
        c.fail(f"search_space(): {exc}")
    except Exception as exc:
        c.fail(f"search_space() failed: {type(exc).__name__}: {exc}")
    values = {name: _first_value(method, args, kwargs)
              for name, (method, args, kwargs) in space.entries.items()}
    try:
        head = head_cls.from_hp(values)
    except Exception as exc:
        c.fail(f"from_hp({values!r}) failed: {type(exc).__name__}: {exc}")
    c.check(isinstance(head, head_cls), f"from_hp() must return a {head_cls.__name__}, got {head!r}")
    own = {k: v for k, v in values.items() if k != "learning_rate"}
    c.check(_params_equal({k: head.get_params()[k] for k in own}, own),
            f"from_hp({values!r}) did not set the declared parameters: {head.get_params()!r}")


def _first_value(method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """A legal value of one :class:`SearchSpace` entry (its lower bound / first choice)."""
    if method == "Boolean":
        return kwargs.get("default", False)
    if method == "Choice":
        return args[0][0]
    return args[0]


@_head_check
def check_head_not_fitted(run: _HeadRun) -> None:
    """``predict_proba`` (and ``keras_model``) before ``fit`` raise :class:`NotFittedError`.

    :class:`~catsdogs.components.Head` enforces this for every subclass (plugin contract 2), so
    the check fails only for a head that gets around the base class (e.g. a ``predict_proba``
    assigned to the class after it was defined)."""
    fresh = run.new()
    run.c.raises(NotFittedError, lambda: fresh.predict_proba(run.X),
                 "predict_proba() before fit() must raise catsdogs.validation.NotFittedError")


@_head_check
def check_head_fit_predict(run: _HeadRun) -> None:
    """``fit`` returns self, keeps the parameters, learns a separable problem, sets
    ``history_``; ``predict_proba`` gives (n,) probabilities independent of the batch."""
    c = run.c
    params = run.new().get_params()
    head, p = run.fitted()
    c.check(_params_equal(head.get_params(), params), "fit() must not change the parameters")
    accuracy = float(((p > 0.5) == run.y).mean())
    c.check(accuracy > 0.9,
            f"training accuracy on a linearly separable problem is {accuracy:.3f} (must be > 0.9) "
            f"after fit({', '.join(f'{k}={v!r}' for k, v in run.fit_kwargs.items())})")
    history = getattr(head, "history_", None)
    if not isinstance(history, dict):
        c.fail(f"fit() must set history_ to a dict, got {history!r}")
    for key, values in history.items():
        c.check(isinstance(key, str) and isinstance(values, (list, tuple)),
                f"history_ must map metric names to lists, got {key!r}: {type(values).__name__}")
    c.check(np.allclose(run.predict(head, run.X[:5]), p[:5], atol=1e-6, rtol=0),
            "predict_proba() of the first rows differs from the same rows predicted with all of X")


@_head_check
def check_head_reproducible(run: _HeadRun) -> None:
    """Two fits with the same seed give the same predictions."""
    _, p = run.fitted()
    p_again = run.predict(run.fit(run.new()), run.X)
    run.c.check(np.allclose(p, p_again, atol=1e-5, rtol=0),
                f"two fits with the same seed give different predictions "
                f"(max difference {np.abs(p - p_again).max():.3g}); seed all randomness from `seed`")


@_head_check
def check_head_keras_model(run: _HeadRun) -> None:
    """``keras_model()`` is None or a ``(None, d) -> (None, 1)`` model equal to ``predict_proba``,
    which survives a ``.keras`` save/load round trip (Keras' safe mode) unchanged."""
    import keras

    c = run.c
    head, p = run.fitted()
    model = head.keras_model()
    if model is None:
        return
    X = run.X
    c.check(isinstance(model, keras.Model),
            f"keras_model() must return a keras.Model or None, got {type(model).__name__}")
    c.check(len(model.inputs) == 1 and tuple(model.inputs[0].shape) == (None, X.shape[1]),
            f"keras_model() must take one input of shape (None, d={X.shape[1]}), got "
            f"{[tuple(t.shape) for t in model.inputs]}")
    out = np.asarray(keras.ops.convert_to_numpy(model(X, training=False)))
    c.check(out.shape in ((len(X),), (len(X), 1)),
            f"keras_model() must output P(dog) of shape (batch, 1), got {out.shape}")
    c.check(np.allclose(out.reshape(-1), p, atol=1e-5, rtol=0),
            f"keras_model() output differs from predict_proba() "
            f"(max difference {np.abs(out.reshape(-1) - p).max():.3g})")
    with tempfile.TemporaryDirectory(prefix="catsdogs-check-") as tmp:
        path = Path(tmp) / "head.keras"
        try:
            model.save(path)
            loaded = keras.saving.load_model(path, safe_mode=True)
        except Exception as exc:
            c.fail(f"keras_model() does not survive a .keras save/load round trip: "
                   f"{type(exc).__name__}: {exc}")
        again = np.asarray(keras.ops.convert_to_numpy(loaded(X, training=False))).reshape(-1)
    c.check(np.allclose(again, out.reshape(-1), atol=1e-6, rtol=0),
            f"keras_model() predicts differently after a .keras save/load round trip "
            f"(max difference {np.abs(again - out.reshape(-1)).max():.3g})")


def head_checks() -> list[Check]:
    """The head checks, cheapest first (each takes ``(head_cls, optimizer, epochs, batch_size,
    seed)``)."""
    return [check_head_attributes, check_head_params, check_head_search_space,
            check_head_not_fitted, check_head_fit_predict, check_head_reproducible,
            check_head_keras_model]


def check_head(head_cls: type[Head], optimizer: Optimizer | None = None, epochs: int = 30,
               batch_size: int = 128, seed: int = 7) -> None:
    """Run every head check on a :class:`~catsdogs.components.Head` subclass.

    Constructs it with defaults, checks the scikit-learn parameter conventions and the search
    space, fits it (twice, for reproducibility) on :func:`make_separable_features` and checks its
    probabilities, :class:`NotFittedError` before ``fit`` and
    :meth:`~catsdogs.components.Head.keras_model`. Heads with ``uses_optimizer`` are trained with
    ``optimizer`` (default: the registered ``adam`` with ``learning_rate=0.01``).
    """
    for check in head_checks():
        check(head_cls, optimizer, epochs, batch_size, seed)


# -- optimizers ----------------------------------------------------------------------------------
def _optimizer_calls(optimizer_cls: type[Optimizer]) -> Iterator[tuple[str, dict[str, Any], float]]:
    default = float(optimizer_cls.default_learning_rate)
    for kwargs, expected in (({}, default), ({"learning_rate": 0.05}, 0.05)):
        call = f"{optimizer_cls.__name__}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
        yield call, kwargs, expected


def _new_optimizer(c: _Checker, optimizer_cls: type[Optimizer], call: str,
                   kwargs: dict[str, Any]) -> Optimizer:
    try:
        return optimizer_cls(**kwargs)
    except Exception as exc:
        c.fail(f"{call} failed: {type(exc).__name__}: {exc}")


def check_optimizer_attributes(optimizer_cls: type[Optimizer]) -> None:
    """An Optimizer subclass with a valid name and a positive ``default_learning_rate``."""
    c = _Checker("optimizer", optimizer_cls)
    c.check(isinstance(optimizer_cls, type) and issubclass(optimizer_cls, Optimizer),
            "must be a subclass of catsdogs.components.Optimizer")
    _check_name(c, optimizer_cls)
    default = getattr(optimizer_cls, "default_learning_rate", None)
    c.check(isinstance(default, (int, float)) and not isinstance(default, bool) and default > 0,
            f"default_learning_rate must be a positive number, got {default!r}")


def check_optimizer_params(optimizer_cls: type[Optimizer]) -> None:
    """scikit-learn parameters; ``effective_learning_rate`` is the given or the default rate."""
    c = _Checker("optimizer", optimizer_cls)
    for call, kwargs, expected in _optimizer_calls(optimizer_cls):
        opt = _new_optimizer(c, optimizer_cls, call, kwargs)
        _check_params(c, opt, optimizer_cls, kwargs)
        c.check(np.isclose(opt.effective_learning_rate, expected, rtol=1e-6, atol=0),
                f"{call}.effective_learning_rate is {opt.effective_learning_rate!r}, expected {expected:.6g}")


def check_optimizer_build(optimizer_cls: type[Optimizer]) -> None:
    """``build()`` returns a new Keras optimizer with the learning rate on every call."""
    import keras

    c = _Checker("optimizer", optimizer_cls)
    for call, kwargs, expected in _optimizer_calls(optimizer_cls):
        opt = _new_optimizer(c, optimizer_cls, call, kwargs)
        built = opt.build()
        c.check(isinstance(built, keras.optimizers.Optimizer),
                f"{call}.build() must return a keras.optimizers.Optimizer, got {type(built).__name__}")
        lr = float(keras.ops.convert_to_numpy(built.learning_rate))
        c.check(np.isclose(lr, expected, rtol=1e-6, atol=0),
                f"{call}.build() has learning_rate {lr:.6g}, expected {expected:.6g}")
        c.check(opt.build() is not built, f"{call}.build() must return a new optimizer on every call")


def check_optimizer_trains(optimizer_cls: type[Optimizer]) -> None:
    """One training step with ``build()`` changes a model's weights."""
    import keras

    c = _Checker("optimizer", optimizer_cls)
    for call, kwargs, _ in _optimizer_calls(optimizer_cls):
        opt = _new_optimizer(c, optimizer_cls, call, kwargs)
        keras.utils.set_random_seed(0)
        inputs = keras.Input((4,))
        model = keras.Model(inputs, keras.layers.Dense(1)(inputs))
        model.compile(optimizer=opt.build(), loss="mse", run_eagerly=True)
        before = [w.copy() for w in model.get_weights()]
        rng = np.random.default_rng(0)
        model.train_on_batch(rng.normal(size=(8, 4)).astype(np.float32),
                             rng.normal(size=(8, 1)).astype(np.float32))
        after = model.get_weights()
        c.check(any(not np.array_equal(a, b) for a, b in zip(before, after)),
                f"one training step with {call}.build() did not change the weights")


def optimizer_checks() -> list[Check]:
    """The optimizer checks, cheapest first (each takes the optimizer class)."""
    return [check_optimizer_attributes, check_optimizer_params, check_optimizer_build,
            check_optimizer_trains]


def check_optimizer(optimizer_cls: type[Optimizer]) -> None:
    """Run every optimizer check on an :class:`~catsdogs.components.Optimizer` subclass:
    defaults, ``learning_rate``, fresh Keras optimizers from :meth:`build`, and one training step
    that moves the weights."""
    for check in optimizer_checks():
        check(optimizer_cls)


# -- pytest --------------------------------------------------------------------------------------------
_OPTIONS = {
    "backbone": ("image_size", "weights"),
    "head": ("optimizer", "epochs", "batch_size", "seed"),
    "optimizer": (),
}


def _kind(component: Any) -> str:
    if isinstance(component, Backbone):
        return "backbone"
    if isinstance(component, type) and issubclass(component, Head):
        return "head"
    if isinstance(component, type) and issubclass(component, Optimizer):
        return "optimizer"
    raise TypeError(f"{component!r} is not a Backbone instance or a Head / Optimizer subclass")


def checks_for(component: Any, **options: Any) -> Iterator[Check]:
    """The checks of ``component``'s kind, each bound to the ``options`` that apply to it
    (backbones: ``image_size``, ``weights``; heads: ``optimizer``, ``epochs``, ``batch_size``,
    ``seed``; unknown option names are a :class:`TypeError`)."""
    kind = _kind(component)
    unknown = sorted(set(options) - {o for names in _OPTIONS.values() for o in names})
    if unknown:
        raise TypeError(f"unknown check options {unknown}; known: {_OPTIONS}")
    bound = {k: v for k, v in options.items() if k in _OPTIONS[kind]}
    checks = {"backbone": backbone_checks, "head": head_checks, "optimizer": optimizer_checks}[kind]()
    for check in checks:
        yield functools.update_wrapper(functools.partial(check, **bound), check)


def parametrize_with_checks(components: Iterable[Any], **options: Any) -> Any:
    """A ``pytest.mark.parametrize`` over ``(component, check)`` pairs: one test per property.

    ``components`` are Backbone instances and Head / Optimizer classes; ``options`` go to the
    checks they apply to (:func:`checks_for`). Test ids read ``<name>-<check name>``::

        @parametrize_with_checks([MyBackbone(), MyHead], epochs=10)
        def test_conformance(component, check):
            check(component)
    """
    import pytest

    params = []
    for component in components:
        for check in checks_for(component, **options):
            name = getattr(component, "name", type(component).__name__)
            params.append(pytest.param(component, check, id=f"{name}-{check.__name__}"))
    return pytest.mark.parametrize("component, check", params)


__all__ += [
    "check_backbone_attributes", "check_backbone_weights_ids",
    "check_backbone_rejects_bad_arguments", "check_backbone_model", "check_backbone_deterministic",
    "check_head_attributes", "check_head_params", "check_head_search_space",
    "check_head_not_fitted", "check_head_fit_predict", "check_head_reproducible",
    "check_head_keras_model", "check_optimizer_attributes", "check_optimizer_params",
    "check_optimizer_build", "check_optimizer_trains",
]


# ------------------------------------------------------------------------------ an S3 proxy
def start_s3_server(env: dict[str, str] | None = None, timeout: float = 60.0
                    ) -> tuple[subprocess.Popen, str]:
    """A moto S3 server (``python -m moto.server``, from ``moto[server]``) in a subprocess on a
    free 127.0.0.1 port, answering: the process (the caller terminates it) and its endpoint URL.
    ``env``: its environment (default: this one's)."""
    import socket
    import sys
    import time

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"the moto S3 server did not start on 127.0.0.1:{port} "
                                   f"(exit code {proc.returncode})") from None
            time.sleep(0.1)


class ObjectStoreProxy(ThreadingHTTPServer):
    """An HTTP proxy on 127.0.0.1 in front of an S3-compatible server (``upstream``, e.g. a moto
    server) for tests and benchmarks of data sets in object storage: pass its :attr:`url` as the
    ``endpoint_url``. Every request is forwarded as it is; a subclass changes what object GETs
    (not listings) get by overriding :meth:`object_get` (e.g. adding latency or faults), using the
    handler's :meth:`~ProxyHandler.forward` and :meth:`~ProxyHandler.answer`. Serves from a daemon
    thread from the start; :meth:`shutdown` stops it."""

    daemon_threads = True

    def __init__(self, upstream: str):
        self.upstream = upstream.split("://", 1)[1]
        super().__init__(("127.0.0.1", 0), ProxyHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def object_get(self, handler: ProxyHandler, key: str) -> None:
        """Answer ``handler``'s GET of the object ``key`` (default: forwarded as it is)."""
        handler.answer(*handler.forward())


class ProxyHandler(BaseHTTPRequestHandler):
    """A request to an :class:`ObjectStoreProxy`: object GETs go to its
    :meth:`~ObjectStoreProxy.object_get`, everything else is forwarded."""

    protocol_version = "HTTP/1.1"
    server: ObjectStoreProxy

    def log_message(self, *args: Any) -> None:
        pass

    def forward(self) -> tuple[int, list[tuple[str, str]], bytes]:
        """This request sent upstream: the answer's status, headers (not the hop-by-hop ones nor
        its length) and body."""
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        conn = http.client.HTTPConnection(self.server.upstream, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
        conn.request(self.command, self.path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        return resp.status, [(k, v) for k, v in resp.getheaders()
                             if k.lower() not in ("transfer-encoding", "connection", "content-length")], data

    def answer(self, status: int, headers: list[tuple[str, str]], data: bytes, cut: bool = False) -> None:
        """Send an answer; ``cut``: only the first half of the body, then the connection is closed
        (a connection dropped in the middle of a body)."""
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if cut:
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if self.command != "HEAD":
            self.wfile.write(data)

    def object_key(self) -> str | None:
        """The key of an object GET (``/bucket/key``, not a listing), else None."""
        path, _, query = self.path.partition("?")
        parts = path.strip("/").split("/", 1)
        if self.command == "GET" and len(parts) == 2 and parts[1] and "list-type" not in query:
            return parts[1]
        return None

    def do_GET(self) -> None:
        key = self.object_key()
        if key is None:
            self.answer(*self.forward())
        else:
            self.server.object_get(self, key)

    def _forwarded(self) -> None:
        self.answer(*self.forward())

    do_HEAD = do_PUT = do_POST = do_DELETE = _forwarded


__all__ += ["ObjectStoreProxy", "ProxyHandler", "start_s3_server"]
