"""Built-in classifier heads trained on cached GAP features (built-in plugin).

* ``dropout_sigmoid``: ``features -> Dropout -> Dense(1, sigmoid)``, binary cross-entropy;
* ``softmax_cam``: ``features -> Dropout -> Dense(2, softmax, L2)``, sparse categorical
  cross-entropy. Its ``(feature_dim, 2)`` kernel turns a backbone's last feature map into a class
  activation map (see :meth:`SoftmaxCamHead.dense_weights`);
* ``logistic``: L2 logistic regression on standardised features, its strength chosen by inner
  cross-validation (:mod:`catsdogs.builtin.linear`; registered here).

Both follow the scikit-learn conventions of :class:`catsdogs.components.Head`: ``__init__`` stores
hyper-parameters only, they are validated by :meth:`KerasHead.fit`, and fitted state lives in
attributes ending in ``_`` (``model_``, ``history_``, ``n_features_in_``).

Training loop. ``model.fit`` spends most of each step in Python (callbacks, data adapter, one
``tf.function`` call per batch), which dominates for heads this small: an epoch over 20,000 x 8,192
features is well under a GFLOP. :meth:`KerasHead.fit` therefore runs its own loop by default
(``training_loop = "compiled"``, :meth:`KerasHead._fit_compiled`): the same compiled Keras model,
loss (``model.compute_loss``, which adds the regularisation losses of ``model.losses``), optimizer
object and accuracy metric, but one ``tf.function`` call per epoch that loops over the shuffled
mini-batches inside the graph. ``training_loop = "keras"`` (on the class, or on one instance to
compare) runs ``model.fit`` instead. tests/test_fast_fit.py checks that both loops give the same
weights and history; bench/grid_speed.py measures the speed-up on the write-up's grid.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from catsdogs.builtin.linear import LogisticHead
from catsdogs.components import GroupTerms, Head, Optimizer
from catsdogs.errors import ConfigError
from catsdogs.hookspecs import hookimpl
from catsdogs.validation import (  # noqa: F401  (NotFittedError and the checks: public here too)
    NotFittedError,
    check_features,
    check_labels,
    check_schedule,
    check_validation,
)
from catsdogs.validation import check_real as _check_real

if TYPE_CHECKING:  # pragma: no cover
    import keras

#: rows per forward pass in :meth:`KerasHead.predict_proba`
PREDICT_BATCH_SIZE = 4096

#: values of :attr:`KerasHead.training_loop`
TRAINING_LOOPS = ("compiled", "keras")


# -- heads -------------------------------------------------------------------------------------------
class KerasHead(Head):
    """Shared code of the Keras heads: build, compile, fit, batched prediction, export.

    Subclasses implement :meth:`_build_model` (returning the functional model whose output layer
    is named ``prediction``), set :attr:`loss`, and override :meth:`_targets` /
    :meth:`_dog_probability` when the output is not a single sigmoid unit.
    """

    uses_optimizer = True
    #: Keras loss used to compile the model
    loss: ClassVar[str] = "binary_crossentropy"
    #: name of the ``keras.metrics`` function the compiled loop reports as ``accuracy``; ``None``:
    #: the one ``compile(metrics=["accuracy"])`` picks (:meth:`_accuracy_function`)
    accuracy_metric: ClassVar[str | None] = None
    #: ``"compiled"``: one ``tf.function`` call per epoch (:meth:`_fit_compiled`, the default);
    #: ``"keras"``: ``model.fit``. Same model, loss, optimizer and history keys; not a
    #: hyper-parameter (``get_params`` leaves it out), set it on an instance to compare the two.
    training_loop: ClassVar[str] = "compiled"

    def __init__(self, dropout: float = 0.5):
        self.dropout = dropout

    # -- hooks for subclasses -----------------------------------------------------------------
    def validate_params(self) -> None:
        _check_real(self.dropout, f"{self.name}: dropout", 0.0, 1.0)

    def _build_model(self, n_features: int) -> keras.Model:  # pragma: no cover - abstract
        raise NotImplementedError

    def _targets(self, y: np.ndarray) -> np.ndarray:
        return y.astype(np.float32)

    def _dog_probability(self, output: np.ndarray) -> np.ndarray:
        """Model output (batch, units) -> P(dog) (batch,)."""
        return output.reshape(-1)

    # -- Head API ---------------------------------------------------------------------------------
    def can_fit_grouped(self) -> bool:
        """Yes while training is this class's own compiled loop (``fit`` and ``_fit_compiled`` not
        overridden, ``training_loop == "compiled"``); :mod:`catsdogs.runs.multifit` also checks the
        built model is ``Input -> Dropout -> Dense``."""
        return type(self).fit is KerasHead.fit and self._trained_by_compiled_loop()

    def _trained_by_compiled_loop(self) -> bool:
        """``_fit_compiled`` not overridden and ``training_loop == "compiled"``."""
        return (type(self)._fit_compiled is KerasHead._fit_compiled
                and getattr(self, "training_loop", "compiled") == "compiled")

    def _group_model(self, blocks: Sequence[tuple[str, int]], rows: Callable[[str], np.ndarray],
                     optimizer: Optimizer | None, seed: int) -> keras.Model:
        """The compiled, untrained model grouped training (:mod:`catsdogs.runs.multifit`) trains
        for this head, the one :meth:`fit` would build on these ``blocks`` (backbone, width) in
        column order; ``rows(backbone)`` gives that block's training rows, for a head whose
        initial weights depend on them."""
        return self._compiled_model(sum(width for _, width in blocks), optimizer, seed)

    def _group_terms(self, model: keras.Model, blocks: Sequence[tuple[str, int]]
                     ) -> GroupTerms | None:
        """For a model that is not exactly ``Input -> Dropout -> Dense``: its parts in the shape
        grouped training also reproduces (:class:`GroupTerms`), else None; ``blocks`` as for
        :meth:`_group_model`."""
        return None

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
    ) -> KerasHead:
        """Train on ``X`` (n, d) and 0/1 labels ``y`` (n,); return ``self``.

        ``keras.utils.set_random_seed(seed)`` is called first (it seeds Python's ``random``, NumPy's
        global generator and TensorFlow), so weight initialisation, dropout masks and shuffling,
        hence the fitted model, are the same for the same seed and data within one process (the
        compiled loop shuffles with ``np.random.default_rng(seed)``).
        ``optimizer`` defaults to ``adam`` with Keras' default learning rate. The model is compiled
        as for ``model.fit`` and trained by :meth:`_fit_compiled`, or by ``model.fit`` when
        :attr:`training_loop` is ``"keras"``.
        """
        X = check_features(X, "X")
        y = check_labels(y, X.shape[0], "y")
        validation_data = check_validation(validation, X.shape[1])
        if validation_data is not None:
            validation_data = (validation_data[0], self._targets(validation_data[1]))
        epochs, batch_size, seed = check_schedule(epochs, batch_size, seed)
        loop = self._checked_training_loop()
        model = self._compiled_model(X.shape[1], optimizer, seed)
        if loop == "keras":
            history = model.fit(
                X,
                self._targets(y),
                validation_data=validation_data,
                epochs=epochs,
                batch_size=batch_size,
                shuffle=True,
                verbose=verbose,
            ).history
        else:
            history = self._fit_compiled(model, X, self._targets(y), validation_data,
                                         epochs=epochs, batch_size=batch_size, seed=seed,
                                         verbose=verbose)
        return self._set_fitted(model, X.shape[1], history)

    def _checked_training_loop(self) -> str:
        loop = getattr(self, "training_loop", "compiled")
        if loop not in TRAINING_LOOPS:
            raise ConfigError(
                f"{self.name}: training_loop must be one of {', '.join(TRAINING_LOOPS)}, got {loop!r}"
            )
        return loop

    def _compiled_model(self, n_features: int, optimizer: Optimizer | None, seed: int) -> keras.Model:
        """The untrained model of :meth:`fit`, compiled: hyper-parameters and ``optimizer`` checked,
        ``keras.utils.set_random_seed(seed)``, :meth:`_build_model`, ``compile``. Shared with the
        grouped trainer (:mod:`catsdogs.runs.multifit`), so both start from the same weights and
        dropout seed."""
        import keras

        self.validate_params()
        if optimizer is None:
            from catsdogs.builtin.optimizers import AdamOptimizer

            optimizer = AdamOptimizer()
        if not callable(getattr(optimizer, "build", None)):
            raise ConfigError(
                f"optimizer must be a catsdogs Optimizer (e.g. get_registry().optimizer('adam')()), "
                f"got {optimizer!r}"
            )
        keras.utils.set_random_seed(seed)
        model = self._build_model(n_features)
        model.compile(optimizer=optimizer.build(), loss=self.loss, metrics=["accuracy"])
        return model

    def _set_fitted(self, model: keras.Model, n_features: int,
                    history: dict[str, list[float]]) -> KerasHead:
        """Store the fitted state (``model_``, ``n_features_in_``, ``history_``); return ``self``."""
        self.model_ = model
        self.n_features_in_ = int(n_features)
        self.history_ = {str(key): [float(v) for v in values] for key, values in history.items()}
        self._export_model = None
        return self

    def _fit_compiled(self, model: keras.Model, X: np.ndarray, y: np.ndarray,
                      validation_data: tuple[np.ndarray, np.ndarray] | None, *, epochs: int,
                      batch_size: int, seed: int, verbose: int = 0) -> dict[str, list[float]]:
        """``model.fit(X, y, validation_data, epochs, batch_size, shuffle=True)`` as one
        ``tf.function`` call per epoch; returns the per-epoch history (Keras' keys and order).

        Per epoch: a fresh permutation of the rows from ``np.random.default_rng(seed)``; for each
        mini-batch of ``batch_size`` permuted rows (the last one partial), in the graph:
        ``model(x, training=True)`` (dropout active), ``model.compute_loss`` (the compiled Keras
        loss plus ``model.losses``, the L2 terms), the gradient of ``optimizer.scale_loss(loss)``
        and ``optimizer.apply_gradients`` with ``model.optimizer``, the object ``model.fit`` would
        use. ``loss`` / ``accuracy`` are the batch-size-weighted means over the epoch's batches,
        computed before each update, as Keras' metrics report them; ``val_loss`` /
        ``val_accuracy`` are computed after the epoch with ``training=False`` in batches of
        ``batch_size``, as ``model.evaluate`` does.
        """
        import tensorflow as tf

        optimizer = model.optimizer
        variables = model.trainable_variables
        optimizer.build(variables)  # creates the slot variables outside the traced function
        accuracy = self._accuracy_function(model, y)
        y_t = tf.convert_to_tensor(y)
        if validation_data is not None:
            y_val_t = tf.convert_to_tensor(validation_data[1])
        # The features stay NumPy arrays, read by tf.numpy_function: converting them to tensors
        # would copy them (TensorFlow keeps the transient copy's memory, too). TensorFlow's
        # registry of numpy_function callables outlives the fit, so they reach the arrays through
        # this dict, emptied when training ends.
        arrays: dict[str, Any] = {"train": X,
                                  "val": None if validation_data is None else validation_data[0]}

        def take(which: str, rows):
            """``arrays[which][rows]`` inside the graph."""
            out = tf.numpy_function(lambda r: arrays[which][r], [rows], tf.float32, stateful=False)
            out.set_shape((None, X.shape[1]))
            return out

        def run_batches(which: str, y_all, indices, train: bool):
            """Batch-size-weighted sums of loss and accuracy over ``ceil(n / batch_size)`` batches."""
            n = tf.shape(indices)[0]
            loss_sum = tf.zeros((), tf.float32)
            correct = tf.zeros((), tf.float32)
            for start in tf.range(0, n, batch_size):
                rows = indices[start:start + batch_size]
                xb, yb = take(which, rows), tf.gather(y_all, rows)
                if train:
                    with tf.GradientTape() as tape:
                        y_pred = model(xb, training=True)
                        loss = model.compute_loss(x=xb, y=yb, y_pred=y_pred, training=True)
                        scaled = optimizer.scale_loss(loss)
                    gradients = tape.gradient(scaled, variables)
                    optimizer.apply_gradients(zip(gradients, variables))
                else:
                    y_pred = model(xb, training=False)
                    loss = model.compute_loss(x=xb, y=yb, y_pred=y_pred, training=False)
                loss_sum += tf.cast(loss, tf.float32) * tf.cast(tf.shape(rows)[0], tf.float32)
                correct += tf.reduce_sum(tf.cast(accuracy(yb, y_pred), tf.float32))
            count = tf.cast(n, tf.float32)
            return loss_sum / count, correct / count

        def run_epoch(permutation):
            loss, acc = run_batches("train", y_t, permutation, train=True)
            out = {"accuracy": acc, "loss": loss}
            if validation_data is not None:
                val_loss, val_acc = run_batches("val", y_val_t, tf.range(tf.shape(y_val_t)[0]),
                                                train=False)
                out.update(val_accuracy=val_acc, val_loss=val_loss)
            return out

        # Traced once per fit (the model's variables are captured). TensorFlow counts traces per
        # code object and warns about "retracing" when many short fits trace the same nested
        # function; a partial has no code object, so each fit's function is counted on its own.
        epoch = tf.function(functools.partial(run_epoch), jit_compile=False)

        rng = np.random.default_rng(seed)
        history: dict[str, list[float]] = {}
        try:
            for i in range(epochs):
                permutation = tf.convert_to_tensor(rng.permutation(X.shape[0]).astype(np.int32))
                logs = {key: float(value) for key, value in epoch(permutation).items()}
                for key, value in logs.items():
                    history.setdefault(key, []).append(value)
                if verbose:
                    print(f"Epoch {i + 1}/{epochs} - "
                          + " - ".join(f"{k}: {v:.4f}" for k, v in logs.items()), flush=True)
        finally:
            arrays.clear()
        return history

    def _accuracy_function(self, model: keras.Model, y: np.ndarray):
        """The stateless per-sample ``keras.metrics`` function behind ``accuracy``: the one named
        by :attr:`accuracy_metric`, else Keras' own choice for ``"accuracy"`` (compile_utils'
        ``is_binary_or_sparse_categorical``): binary for one output unit, sparse categorical for
        integer class targets of lower rank than the output, categorical otherwise."""
        import keras

        if self.accuracy_metric is not None:
            return getattr(keras.metrics, self.accuracy_metric)
        out_shape = tuple(model.outputs[0].shape)
        if out_shape[-1] == 1:
            return keras.metrics.binary_accuracy
        if y.ndim < len(out_shape) or (y.ndim > 1 and y.shape[-1] == 1):
            return keras.metrics.sparse_categorical_accuracy
        return keras.metrics.categorical_accuracy

    def _fitted_model(self) -> keras.Model:
        model = getattr(self, "model_", None)
        if model is None:
            raise NotFittedError(f"{self.name}: head not fitted; call fit() first")
        return model

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """P(dog) for each row of ``X``, float64 of shape ``(n,)``.

        Calls the model directly in batches: ``Model.predict`` adds seconds of overhead per call
        in Keras 3, which dominates for small heads.
        """
        model = self._fitted_model()
        X = check_features(X, "X", n_features=self.n_features_in_, allow_empty=True)
        chunks = [
            self._dog_probability(np.asarray(model(X[i:i + PREDICT_BATCH_SIZE], training=False)))
            for i in range(0, X.shape[0], PREDICT_BATCH_SIZE)
        ]
        if not chunks:
            return np.zeros(0, dtype=np.float64)
        return np.concatenate(chunks).astype(np.float64)

    def keras_model(self) -> keras.Model:
        """The trained head: input ``features`` (batch, d) -> output ``prediction`` (batch, 1) = P(dog)."""
        return self._fitted_model()


class DropoutSigmoidHead(KerasHead):
    """``features -> Dropout(dropout) -> Dense(1, sigmoid, name="prediction")``; binary cross-entropy."""

    name = "dropout_sigmoid"

    def _build_model(self, n_features: int) -> keras.Model:
        import keras

        features = keras.Input((n_features,), name="features", dtype="float32")
        x = keras.layers.Dropout(self.dropout, name="dropout")(features)
        out = keras.layers.Dense(1, activation="sigmoid", name="prediction", dtype="float32")(x)
        return keras.Model(features, out, name=self.name)


class SoftmaxCamHead(KerasHead):
    """``features -> Dropout(dropout) -> Dense(2, softmax, L2(l2), name="prediction")``.

    Column 0 of the softmax is P(cat), column 1 P(dog). Because the Dense layer sits directly on
    the GAP features, its kernel weights the backbone's last feature map channels: a class
    activation map for class ``c`` is ``feature_map @ kernel[:, c]`` (:meth:`dense_weights`).
    """

    name = "softmax_cam"
    cam_capable = True
    loss = "sparse_categorical_crossentropy"

    def __init__(self, dropout: float = 0.5, l2: float = 1e-4):
        self.dropout = dropout
        self.l2 = l2

    def validate_params(self) -> None:
        super().validate_params()
        _check_real(self.l2, f"{self.name}: l2", 0.0)

    def _build_model(self, n_features: int) -> keras.Model:
        import keras

        l2 = float(self.l2)
        features = keras.Input((n_features,), name="features", dtype="float32")
        x = keras.layers.Dropout(self.dropout, name="dropout")(features)
        out = keras.layers.Dense(
            2,
            activation="softmax",
            kernel_regularizer=keras.regularizers.l2(l2) if l2 > 0 else None,
            bias_regularizer=keras.regularizers.l2(l2) if l2 > 0 else None,
            name="prediction",
            dtype="float32",
        )(x)
        return keras.Model(features, out, name=self.name)

    def _targets(self, y: np.ndarray) -> np.ndarray:
        return y.astype(np.int32)

    def _dog_probability(self, output: np.ndarray) -> np.ndarray:
        return output[:, 1]

    def dense_weights(self) -> tuple[np.ndarray, np.ndarray]:
        """The trained softmax layer as float32 numpy arrays: kernel ``(d, 2)`` and bias ``(2,)``.

        Column 1 belongs to "dog". The CAM of an image is ``feature_map @ kernel[:, 1]`` (plus
        ``bias[1]``), with ``feature_map`` the ``(h, w, d)`` input of the backbone's ``gap`` layer.
        """
        kernel, bias = self._fitted_model().get_layer("prediction").get_weights()
        return np.asarray(kernel, dtype=np.float32), np.asarray(bias, dtype=np.float32)

    def keras_model(self) -> keras.Model:
        """The trained head as features -> P(dog) ``(batch, 1)``, output layer ``prediction``.

        The trained two-unit softmax model (:attr:`model_`) is nested inside as the layer named
        ``softmax_cam`` (its Dense layer is ``prediction`` there); the outer ``prediction`` layer is
        a frozen ``Dense(1)`` with kernel ``[[0], [1]]`` that selects the dog column exactly. Only
        built-in Keras layers are used, so the model saves and loads without custom objects.
        """
        model = self._fitted_model()
        export = getattr(self, "_export_model", None)
        if export is None:
            import keras

            features = keras.Input((self.n_features_in_,), name="features", dtype="float32")
            probs = model(features)
            select = keras.layers.Dense(
                1, use_bias=False, trainable=False, name="prediction", dtype="float32"
            )
            out = select(probs)
            select.set_weights([np.array([[0.0], [1.0]], dtype=np.float32)])
            export = keras.Model(features, out, name=f"{self.name}_dog")
            self._export_model = export
        return export


HEADS = (DropoutSigmoidHead, SoftmaxCamHead, LogisticHead)


@hookimpl
def register_heads(register):
    for head_cls in HEADS:
        register(head_cls)
