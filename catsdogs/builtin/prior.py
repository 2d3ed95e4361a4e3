"""The ``imagenet_prior`` head: ``dropout_sigmoid`` plus the backbones' own ImageNet classifiers.

An ImageNet backbone comes with the classifier it was trained with: 1000 logits, a Dense layer on
the very GAP features the cache stores. 118 of its classes are dog breeds and 5 are domestic
cats, so ``logsumexp(dog logits) - logsumexp(cat logits)`` is a dog-vs-cat log-odds learned from
1.28 million photos. It is not a linear function of the features, so the linear heads
(``dropout_sigmoid``, ``softmax_cam``, ``logistic``) cannot learn it from 20,000 photos. On the
PetImages benchmark (README, "The backbones' own ImageNet classifiers") the head beats
``dropout_sigmoid`` on the same features in 28 of 28 runs on validation and 27 of 28 on test, by
most for one backbone alone (Lite0: about -0.0015 test log loss), least for the three fused (the
grid's winner: +0.0001, -0.0004 and -0.0007 on three splits), and ``experiments/best.yaml`` has
it among its heads.

The head's graph::

    features -> Dropout -> Dense(1)                                   (as dropout_sigmoid)
    features -> per backbone: SpeciesLogOdds (frozen) -> Dense(1)     (one learned weight each)
    sum -> sigmoid = P(dog)

``SpeciesLogOdds`` (:mod:`catsdogs.layers`) holds the classifier's dog and cat columns, frozen;
only the first Dense and one weight per backbone (starting at 1 / the number of backbones) and a
bias are trained, by the same compiled loop and optimizers as the other Keras heads, and in the
same group (:mod:`catsdogs.runs.multifit`: each backbone's log-odds computed once per batch for
every run of the group that reads it; :meth:`ImageNetPriorHead._group_terms`). The runner
plans it on the combinations whose every backbone offers the ImageNet-classifier capability
(:func:`catsdogs.components.has_imagenet_classifier`) and gives it ``weights``, the weights the
features were extracted with; the classifier's weights are read from the backbone
(``build_classifier``), so the saved head carries them and exports like any head.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from catsdogs.builtin.heads import KerasHead
from catsdogs.errors import ConfigError
from catsdogs.hookspecs import hookimpl

if TYPE_CHECKING:  # pragma: no cover
    import keras

    from catsdogs.components import Optimizer

#: the (kernel, bias) of a backbone's classifier on its dog and cat classes, per backbone class,
#: name and weights: building a real classifier takes seconds, every fit of a grid needs it
_SPECIES_WEIGHTS: dict[tuple[str, str, str, str], tuple[np.ndarray, np.ndarray]] = {}


def species_weights(backbone: Any, weights: str) -> tuple[np.ndarray, np.ndarray]:
    """``backbone``'s ImageNet classifier restricted to the dog classes, then the cat classes
    (:data:`catsdogs.audit.imagenet.DOG_CLASSES`, :data:`~catsdogs.audit.imagenet.CAT_CLASSES`):
    kernel ``(feature_dim, 123)`` and bias ``(123,)``, float32. The classifier must end in a Dense
    layer from the ``feature_dim`` GAP features to the 1000 logits (linear or softmax), as
    EfficientNet-Lite's and Keras Applications' do; anything else is a :class:`ConfigError`."""
    import keras

    from catsdogs.audit.imagenet import CAT_CLASSES, DOG_CLASSES, NUM_CLASSES
    from catsdogs.components import has_imagenet_classifier

    if not has_imagenet_classifier(backbone):
        raise ConfigError(f"backbone {backbone.name!r} has no ImageNet classifier "
                          "(has_classifier/build_classifier), which the imagenet_prior head reads")
    memo = (type(backbone).__module__, type(backbone).__qualname__, backbone.name,
            backbone.weights_id(weights))
    if memo not in _SPECIES_WEIGHTS:
        model = backbone.build_classifier(weights)
        dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)
                 and tuple(layer.kernel.shape) == (backbone.feature_dim, NUM_CLASSES)]
        activation = getattr(dense[-1].activation, "__name__", "") if dense else ""
        if not dense or activation not in ("linear", "softmax"):
            raise ConfigError(
                f"backbone {backbone.name!r}: its ImageNet classifier does not end in a Dense "
                f"layer ({backbone.feature_dim} features -> {NUM_CLASSES} logits, linear or "
                "softmax), so the imagenet_prior head cannot read it from the cached features")
        kernel, bias = (np.asarray(w, np.float32) for w in dense[-1].get_weights())
        columns = [*DOG_CLASSES, *CAT_CLASSES]
        _SPECIES_WEIGHTS[memo] = (np.ascontiguousarray(kernel[:, columns]), bias[columns])
    return _SPECIES_WEIGHTS[memo]


def log_odds(X: np.ndarray, kernel: np.ndarray, bias: np.ndarray, n_cat: int) -> np.ndarray:
    """What :class:`catsdogs.layers.SpeciesLogOdds` computes, in NumPy: ``(n,)``."""
    z = X @ kernel + bias
    return np.logaddexp.reduce(z[:, :-n_cat], axis=1) - np.logaddexp.reduce(z[:, -n_cat:], axis=1)


class ImageNetPriorHead(KerasHead):
    """``dropout_sigmoid`` plus, per backbone, its own ImageNet classifier's dog-vs-cat
    log-odds with one learned weight (module docstring). ``weights``: the backbones' weights
    (one name for all, or ``{backbone: weights}``); the runner sets it from the experiment."""

    name = "imagenet_prior"
    #: the runner plans it where every backbone has an ImageNet classifier and sets ``weights``
    uses_classifier = True

    def __init__(self, dropout: float = 0.5, weights: str | Mapping[str, str] = "imagenet"):
        self.dropout = dropout
        self.weights = weights

    def validate_params(self) -> None:
        super().validate_params()
        ok = isinstance(self.weights, str) or (
            isinstance(self.weights, Mapping)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in self.weights.items()))
        if not ok:
            raise ConfigError(f"{self.name}: weights must be a weights name or a mapping backbone "
                              f"-> weights name, got {self.weights!r}")

    def _backbone_weights(self, name: str) -> str:
        if isinstance(self.weights, str):
            return self.weights
        if name not in self.weights:
            raise ConfigError(f"{self.name}: no weights given for backbone {name!r} "
                              f"(weights: {dict(self.weights)})")
        return self.weights[name]

    def fit(self, X: np.ndarray, y: np.ndarray, *,
            validation: tuple[np.ndarray, np.ndarray] | None = None,
            optimizer: Optimizer | None = None, epochs: int = 8, batch_size: int = 128,
            seed: int = 2019, verbose: int = 0,
            blocks: Sequence[tuple[str, int]] | None = None) -> ImageNetPriorHead:
        """:meth:`KerasHead.fit`; ``blocks`` (which backbone each column range of ``X`` comes
        from) is required: it says whose classifier reads which columns."""
        if not blocks:
            raise ConfigError(f"{self.name}: fit needs blocks=[(backbone, width), ...], the "
                              "backbones whose features X holds, in column order")
        starts = np.cumsum([0] + [int(width) for _, width in blocks])
        columns = {str(name): slice(int(a), int(b))
                   for (name, _), a, b in zip(blocks, starts, starts[1:])}
        with self._reading(blocks, lambda name: X[:, columns[name]]):
            KerasHead.fit(self, X, y, validation=validation, optimizer=optimizer, epochs=epochs,
                          batch_size=batch_size, seed=seed, verbose=verbose, blocks=blocks)
        return self

    @contextlib.contextmanager
    def _reading(self, blocks: Sequence[tuple[str, int]], rows: Callable[[str], np.ndarray]
                 ) -> Iterator[None]:
        """What :meth:`_build_model` reads while a model is built: ``blocks`` (backbone, width)
        in column order, and ``rows(backbone)``, that backbone's training rows."""
        self._blocks = [(str(name), int(width)) for name, width in blocks]
        self._rows = rows
        try:
            yield
        finally:
            del self._blocks, self._rows

    def can_fit_grouped(self) -> bool:
        """Yes while training is :class:`KerasHead`'s compiled loop: grouped training reproduces
        this head's model (:meth:`_group_terms`); :meth:`fit` only records the blocks."""
        cls = type(self)
        return (cls.fit is ImageNetPriorHead.fit and cls._build_model is ImageNetPriorHead._build_model
                and self._trained_by_compiled_loop())

    def _group_model(self, blocks, rows, optimizer, seed):
        with self._reading(blocks, rows):
            return self._compiled_model(sum(int(width) for _, width in blocks), optimizer, seed)

    def _group_terms(self, model, blocks):
        """The model's parts (:meth:`_build_model`): ``dropout``, the ``logit`` Dense, one frozen
        ``prior_i`` log-odds per backbone of ``blocks`` (keyed by backbone and weights: equal in
        every run that reads them), the trained ``prior_weight`` Dense and the sigmoid. None when
        the priors do not read exactly those blocks' columns, in that order."""
        from catsdogs.components import GroupTerms
        from catsdogs.layers import SpeciesLogOdds

        priors = sorted((layer for layer in model.layers if isinstance(layer, SpeciesLogOdds)),
                        key=lambda layer: layer.start)
        starts = np.cumsum([0] + [int(width) for _, width in blocks])
        if [(p.start, p.stop) for p in priors] != list(zip(starts[:-1], starts[1:])):
            return None
        terms = tuple(((name, self._backbone_weights(name)), name, layer)
                      for (name, _), layer in zip(blocks, priors, strict=True))
        return GroupTerms(model.get_layer("dropout"), model.get_layer("logit"), terms,
                          model.get_layer("prior_weight"), model.get_layer("prediction").activation)

    def _build_model(self, n_features: int) -> keras.Model:
        import keras

        from catsdogs.audit.imagenet import CAT_CLASSES
        from catsdogs.layers import SpeciesLogOdds
        from catsdogs.plugins import get_registry

        blocks = self._blocks
        if sum(width for _, width in blocks) != n_features:
            raise ConfigError(f"{self.name}: blocks {blocks} do not add up to the {n_features} "
                              "feature columns")
        registry = get_registry()
        features = keras.Input((n_features,), name="features", dtype="float32")
        x = keras.layers.Dropout(self.dropout, name="dropout")(features)
        terms = [keras.layers.Dense(1, name="logit", dtype="float32")(x)]
        priors, means, start = [], [], 0
        for i, (name, width) in enumerate(blocks):
            backbone = registry.backbone(name)
            kernel, bias = species_weights(backbone, self._backbone_weights(name))
            if kernel.shape[0] != width:
                raise ConfigError(
                    f"{self.name}: backbone {name!r} gives {width} feature columns, its "
                    f"classifier reads {kernel.shape[0]} (its plain GAP features); the head "
                    "does not take earlier-block features (layers:)")
            n_cat = len(CAT_CLASSES)
            layer = SpeciesLogOdds(start, start + width, kernel.shape[1] - n_cat, n_cat,
                                   name=f"prior_{i}")
            priors.append((layer, layer(features), kernel, bias))
            X = np.asarray(self._rows(name), np.float32)
            means.append(float(np.mean(log_odds(X, kernel, bias, n_cat))))
            start += width
        logodds = [p for _, p, _, _ in priors]
        # the prior term starts centred on the training rows: a classifier's log-odds carry a
        # constant (118 dog classes against 5 cat ones) that the bias would have to unlearn first
        offset = float(np.mean(means))
        stacked = (keras.layers.Concatenate(name="priors")(logodds) if len(logodds) > 1
                   else logodds[0])
        terms.append(keras.layers.Dense(
            1, name="prior_weight", dtype="float32",
            kernel_initializer=keras.initializers.Constant(1.0 / len(logodds)),
            bias_initializer=keras.initializers.Constant(-offset))(stacked))
        logit = keras.layers.Add(name="logit_sum")(terms)
        out = keras.layers.Activation("sigmoid", name="prediction", dtype="float32")(logit)
        model = keras.Model(features, out, name=self.name)
        for layer, _, kernel, bias in priors:
            layer.set_weights([kernel, bias])
        return model


@hookimpl
def register_heads(register):
    register(ImageNetPriorHead)
