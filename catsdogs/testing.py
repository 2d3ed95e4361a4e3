"""Conformance checks for plugin components, in the spirit of scikit-learn's ``check_estimator``.

A plugin's own test suite calls these on its components::

    from catsdogs.testing import check_backbone, check_head, check_optimizer

    def test_my_backbone():
        check_backbone(MyBackbone())

    def test_my_head():
        check_head(MyHead)

    def test_my_optimizer():
        check_optimizer(MyOptimizer)

Each function returns nothing when the component honours its contract
(:mod:`catsdogs.components`) and raises :class:`AssertionError` naming the component and the
broken property otherwise. They run on CPU in seconds, offline: backbones are built with
``weights="none"`` (seeded random initialisation) and heads are trained on a small synthetic,
linearly separable data set.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np

from catsdogs.components import WEIGHTS_NONE, Backbone, Head, Optimizer, component_name
from catsdogs.errors import ConfigError, PluginError

__all__ = ["check_backbone", "check_head", "check_optimizer", "make_separable_features"]


class _Checker:
    """Builds uniform failure messages: ``<kind> <name>: <property>``."""

    def __init__(self, kind: str, obj: Any):
        self.kind = kind
        self.label = f"{kind} {getattr(obj, 'name', None)!r} ({_qualname(obj)})"

    def fail(self, message: str) -> None:
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


def _check_params(c: _Checker, obj: Any, cls: type, given: dict[str, Any] | None = None) -> dict[str, Any]:
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


def check_backbone(backbone: Backbone, image_size: int | None = None, weights: str = WEIGHTS_NONE) -> None:
    """Check a :class:`~catsdogs.components.Backbone` instance.

    The network is built twice with ``weights`` (default ``none``, offline) at ``image_size``
    (default: the backbone's ``min_input_size``, the cheapest size it accepts) and called on random
    raw RGB pixels. Raises :class:`AssertionError` on the first broken property.
    """
    import keras

    c = _Checker("backbone", backbone)
    c.check(isinstance(backbone, Backbone),
            f"must be an instance of catsdogs.components.Backbone, got {type(backbone).__name__}")
    _check_name(c, backbone)

    def positive_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value > 0

    c.check(positive_int(backbone.min_input_size),
            f"min_input_size must be a positive int, got {backbone.min_input_size!r}")
    c.check(positive_int(backbone.input_size) and backbone.input_size >= backbone.min_input_size,
            f"input_size must be an int >= min_input_size ({backbone.min_input_size}), "
            f"got {backbone.input_size!r}")
    c.check(positive_int(backbone.feature_dim),
            f"feature_dim must be a positive int, got {backbone.feature_dim!r}")
    c.check(isinstance(backbone.preprocessing, str) and backbone.preprocessing.strip(),
            f"preprocessing must be a non-empty description, got {backbone.preprocessing!r}")
    options = tuple(backbone.weights_options)
    c.check(options and all(isinstance(o, str) for o in options),
            f"weights_options must be a non-empty tuple of strings, got {options!r}")
    c.check(WEIGHTS_NONE in options, f"weights_options {options!r} must include {WEIGHTS_NONE!r}")
    c.check(weights in options, f"weights {weights!r} to check is not in weights_options {options!r}")

    ids = {}
    for option in options:
        try:
            ids[option] = backbone.weights_id(option)
        except Exception as exc:
            c.fail(f"weights_id({option!r}) failed: {type(exc).__name__}: {exc}")
        c.check(isinstance(ids[option], str) and ids[option],
                f"weights_id({option!r}) must be a non-empty string, got {ids[option]!r}")
    c.check(len(set(ids.values())) == len(ids),
            f"weights_id must differ between weights options (it keys the feature cache): {ids!r}")

    c.raises(ConfigError, lambda: backbone.check_weights("bogus"),
             "check_weights('bogus') must raise ConfigError")
    c.raises(ConfigError, lambda: backbone.check_image_size(backbone.min_input_size - 1),
             f"check_image_size(min_input_size - 1 = {backbone.min_input_size - 1}) must raise ConfigError")
    c.check(backbone.describe().get("name") == backbone.name, "describe()['name'] must be the name")

    size = backbone.min_input_size if image_size is None else image_size
    c.check(positive_int(size) and size >= backbone.min_input_size,
            f"image_size to check ({size!r}) must be an int >= min_input_size")

    def build() -> keras.Model:
        try:
            model = backbone.build(weights, size)
        except Exception as exc:
            c.fail(f"build({weights!r}, {size}) failed: {type(exc).__name__}: {exc}")
        c.check(isinstance(model, keras.Model),
                f"build() must return a keras.Model, got {type(model).__name__}")
        return model

    model = build()
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

    def features(m: keras.Model, pixels: np.ndarray) -> np.ndarray:
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

    pixels = _random_pixels(3, size)
    batch = features(model, pixels)
    # randomly initialised networks give features of very different magnitudes (Xception's are
    # ~1e-5 at its minimum size), so tolerances are relative to the largest feature
    scale = float(np.abs(batch).max())
    c.check(scale > 0 and not np.allclose(batch[0], batch[1:], rtol=1e-6, atol=1e-6 * scale),
            f"{where}: different images give the same features (is the input used?)")
    single = features(model, pixels[1:2])
    c.check(np.allclose(batch[1:2], single, rtol=0, atol=1e-4 * scale),
            f"{where}: features of an image depend on the rest of the batch "
            f"(max difference {np.abs(batch[1:2] - single).max():.3g}, largest feature {scale:.3g}; "
            "call sub-layers with training=False)")

    again = build()
    weights_a, weights_b = model.get_weights(), again.get_weights()
    same_weights = len(weights_a) == len(weights_b) and all(
        a.shape == b.shape and np.array_equal(a, b) for a, b in zip(weights_a, weights_b)
    )
    c.check(same_weights, f"two build({weights!r}, {size}) calls give different weights; "
            "the network must be deterministic (seed the initialisation)")
    batch_again = features(again, pixels)
    c.check(np.allclose(batch, batch_again, rtol=0, atol=1e-5 * scale),
            f"two build({weights!r}, {size}) calls give different features "
            f"(max difference {np.abs(batch - batch_again).max():.3g})")


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


def check_head(head_cls: type[Head], optimizer: Optimizer | None = None, epochs: int = 30,
               batch_size: int = 128, seed: int = 7) -> None:
    """Check a :class:`~catsdogs.components.Head` subclass.

    Constructs it with defaults, checks the scikit-learn parameter conventions, fits it (twice,
    for reproducibility) on :func:`make_separable_features` and checks its probabilities and
    :meth:`~catsdogs.components.Head.keras_model`. Heads with ``uses_optimizer`` are trained with
    ``optimizer`` (default: the registered ``adam`` with ``learning_rate=0.01``).
    """
    c = _Checker("head", head_cls)
    c.check(isinstance(head_cls, type) and issubclass(head_cls, Head),
            "must be a subclass of catsdogs.components.Head")
    _check_name(c, head_cls)
    c.check(isinstance(head_cls.uses_optimizer, bool), "uses_optimizer must be a bool")
    c.check(isinstance(head_cls.cam_capable, bool), "cam_capable must be a bool")
    try:
        head = head_cls()
    except Exception as exc:
        c.fail(f"cannot be constructed with default arguments: {type(exc).__name__}: {exc}")
    params = _check_params(c, head, head_cls)

    X, y = make_separable_features(seed=seed)
    fresh = head_cls()
    c.raises(Exception, lambda: fresh.predict_proba(X),
             "predict_proba() before fit() must raise an error")

    if head_cls.uses_optimizer and optimizer is None:
        from catsdogs.plugins import get_registry

        optimizer = get_registry().optimizer("adam")(learning_rate=0.01)
    fit_kwargs = dict(optimizer=optimizer if head_cls.uses_optimizer else None,
                      epochs=epochs, batch_size=batch_size, seed=seed)

    def fit(h: Head) -> Head:
        try:
            result = h.fit(X, y, **fit_kwargs)
        except Exception as exc:
            c.fail(f"fit() failed: {type(exc).__name__}: {exc}")
        c.check(result is h, f"fit() must return self, got {result!r}")
        return h

    def predict(h: Head, X: np.ndarray) -> np.ndarray:
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

    fit(head)
    c.check(_params_equal(head.get_params(), params), "fit() must not change the parameters")
    p = predict(head, X)
    accuracy = float(((p > 0.5) == y).mean())
    c.check(accuracy > 0.9,
            f"training accuracy on a linearly separable problem is {accuracy:.3f} (must be > 0.9) "
            f"after fit({', '.join(f'{k}={v!r}' for k, v in fit_kwargs.items())})")
    history = getattr(head, "history_", None)
    c.check(isinstance(history, dict), f"fit() must set history_ to a dict, got {history!r}")
    for key, values in history.items():
        c.check(isinstance(key, str) and isinstance(values, (list, tuple)),
                f"history_ must map metric names to lists, got {key!r}: {type(values).__name__}")
    c.check(np.allclose(predict(head, X[:5]), p[:5], atol=1e-6, rtol=0),
            "predict_proba() of the first rows differs from the same rows predicted with all of X")

    p_again = predict(fit(head_cls(**params)), X)
    c.check(np.allclose(p, p_again, atol=1e-5, rtol=0),
            f"two fits with the same seed give different predictions "
            f"(max difference {np.abs(p - p_again).max():.3g}); seed all randomness from `seed`")

    model = head.keras_model()
    if model is not None:
        import keras

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


# -- optimizers ----------------------------------------------------------------------------------
def check_optimizer(optimizer_cls: type[Optimizer]) -> None:
    """Check an :class:`~catsdogs.components.Optimizer` subclass: defaults, ``learning_rate``,
    fresh Keras optimizers from :meth:`build`, and one training step that moves the weights."""
    import keras

    c = _Checker("optimizer", optimizer_cls)
    c.check(isinstance(optimizer_cls, type) and issubclass(optimizer_cls, Optimizer),
            "must be a subclass of catsdogs.components.Optimizer")
    _check_name(c, optimizer_cls)
    default = getattr(optimizer_cls, "default_learning_rate", None)
    c.check(isinstance(default, (int, float)) and not isinstance(default, bool) and default > 0,
            f"default_learning_rate must be a positive number, got {default!r}")

    for kwargs, expected in (({}, float(default)), ({"learning_rate": 0.05}, 0.05)):
        call = f"{optimizer_cls.__name__}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
        try:
            opt = optimizer_cls(**kwargs)
        except Exception as exc:
            c.fail(f"{call} failed: {type(exc).__name__}: {exc}")
        _check_params(c, opt, optimizer_cls, kwargs)
        c.check(np.isclose(opt.effective_learning_rate, expected, rtol=1e-6, atol=0),
                f"{call}.effective_learning_rate is {opt.effective_learning_rate!r}, expected {expected:.6g}")
        built = opt.build()
        c.check(isinstance(built, keras.optimizers.Optimizer),
                f"{call}.build() must return a keras.optimizers.Optimizer, got {type(built).__name__}")
        lr = float(keras.ops.convert_to_numpy(built.learning_rate))
        c.check(np.isclose(lr, expected, rtol=1e-6, atol=0),
                f"{call}.build() has learning_rate {lr:.6g}, expected {expected:.6g}")
        c.check(opt.build() is not built, f"{call}.build() must return a new optimizer on every call")

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
