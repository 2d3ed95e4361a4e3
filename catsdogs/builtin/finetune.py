"""The ``finetune`` head: the top block(s) of a backbone fine-tuned, with a sigmoid unit, on
cached feature maps (issue 24, lever 4). A built-in head whose ``input`` is ``"maps"``: the runner
plans it on the single-backbone combinations of backbones that offer ``split_top``, caches their
maps (:func:`catsdogs.features.maps.cache_maps`) and gives it the backbone's name, weights and
image size (README, "Lever 4"; ``bench/finetune_gain.py`` measures it outside the runner).

The write-up froze every backbone weight. This head trains the backbone's last ``top_blocks``
blocks (and its head conv) too, without running the rest of the network again: its input is the
feature maps entering those blocks, cached once per photo in float16
(:mod:`catsdogs.features.maps`), flattened to one row per photo. The top starts from the
backbone's own weights (:meth:`~catsdogs.components.TopSplit.split_top`, ImageNet for
``weights: imagenet``), so before training it computes exactly the frozen GAP features.

Training, all on the rows given to :meth:`FineTuneHead.fit` (never on the validation rows the run
is ranked on, which only get a per-epoch ``val_loss`` curve):

1. a stratified, seeded inner split (``inner``, default 20 %) of the training rows;
2. ``Dropout(dropout) -> Dense(1, sigmoid)`` trained on the frozen top's GAP features with the
   head's ``optimizer`` (a registered optimizer's name, default ``adam``, at its default learning
   rate), early-stopped on the inner rows (``patience`` epochs, best weights kept);
3. the top block(s) and that unit trained together with the same optimizer class at the head's
   ``learning_rate`` (default 1e-4), BatchNormalization kept in inference mode (its statistics and
   scale stay the ImageNet ones), early-stopped on the inner rows the same way.

``epochs`` bounds each stage. The head chooses its own optimizer (``uses_optimizer`` is False), so
an experiment's grid does not fine-tune it once per optimizer of ``optimizers:``. A refit
(``refit: true``) trains each stage on every row for the epochs at which the ranked fit's inner
loss was lowest (:meth:`FineTuneHead.refit_params`: ``fixed_epochs``), with no inner split. The trained model (:meth:`FineTuneHead.keras_model`) takes the
flattened maps, rounds them to float16 as the cache did (so the export, which computes the maps in
float32, sees what training saw), reshapes them and runs the fine-tuned top and the unit: appended
to the backbone's bottom (maps) model it is the end-to-end network.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from catsdogs.components import Head, Optimizer, TopSplit, has_top_split, seeded_initializers
from catsdogs.errors import ConfigError
from catsdogs.hookspecs import hookimpl
from catsdogs.util.tf_log import float16_notice_held, retracing_held
from catsdogs.validation import SEED_MAX, check_int, check_labels, check_real

if TYPE_CHECKING:  # pragma: no cover
    import keras

#: rows per forward pass when predicting
PREDICT_BATCH_SIZE = 256


def _check_maps(X: Any, what: str, n_features: int | None = None) -> np.ndarray:
    """``X`` as a 2-D float16 array (the cache's precision: float32 input is rounded as the model
    rounds it), or :class:`ConfigError`. float16 halves the memory of 20,000 maps rows."""
    arr = np.asarray(X)
    if arr.dtype.kind != "f" or arr.ndim != 2:
        raise ConfigError(f"{what} must be a 2-D array of flattened feature maps, got "
                          f"{arr.dtype} {arr.shape}")
    if n_features is not None and arr.shape[1] != n_features:
        raise ConfigError(f"{what} has {arr.shape[1]} columns, the head was fitted on {n_features}")
    arr = arr.astype(np.float16, copy=False)
    if not np.isfinite(arr).all():
        raise ConfigError(f"{what} contains NaN or infinite values (or values beyond float16)")
    return np.ascontiguousarray(arr)


def _rows(X: np.ndarray, y: np.ndarray | None, rows: np.ndarray | None, batch_size: int,
          seed: int | None = None):
    """A ``keras.utils.PyDataset`` of batches of ``X[rows]`` (and ``y[rows]``; ``rows`` None:
    every row, in order), gathered batch by batch from the one array: ``fit`` and ``predict``
    never hold a copy of the maps (given as arrays, Keras copied them whole, in float32 -- a fit
    took about 6.5x its float16 maps).
    ``seed``: the rows are shuffled, by a generator of that seed, before each epoch."""
    import keras

    class Rows(keras.utils.PyDataset):
        def __init__(self) -> None:
            super().__init__()
            self.rng = None if seed is None else np.random.default_rng(seed)
            self.rows = np.arange(len(X)) if rows is None else np.asarray(rows)
            self.order = self.rows
            self.on_epoch_end()

        def __len__(self) -> int:
            return max(1, math.ceil(len(self.order) / batch_size))

        def __getitem__(self, i: int):
            idx = self.order[i * batch_size:(i + 1) * batch_size]
            return X[idx] if y is None else (X[idx], y[idx])

        def on_epoch_end(self) -> None:
            if self.rng is not None:
                self.order = self.rng.permutation(self.rows)

    return Rows()


@contextlib.contextmanager
def _rows_released() -> Iterator[None]:
    """Let go, on exit, of every batch source a Keras fit or predict inside took.

    With the TensorFlow backend Keras feeds a ``PyDataset`` through
    ``tf.data.Dataset.from_generator``, and TensorFlow keeps that generator's ``py_func`` alive in
    the process-wide default graph (``Graph._py_funcs_used_in_graph``) for as long as the graph
    lives, which in eager mode is the whole process. So every array a fit or predict read stayed
    in memory for good: each k-fold fold's maps rows (about 1.1 GB a fold for Lite2 on 20,000
    photos), its validation rows and its GAP features. On exit the functions that ``tf.data``
    added to that list inside the block (a generator's ``get_next_id``, ``generator_py_func`` and
    ``finalize_py_func``) are dropped from it; TensorFlow's registry of them is weak, so they go
    with their data. Any other ``py_func`` (one a model's own layers might trace) is kept."""
    graph = None
    try:
        from tensorflow.python.framework import ops

        graph = ops.get_default_graph()
    except ImportError:  # pragma: no cover - another Keras backend: nothing is kept
        pass
    funcs = getattr(graph, "_py_funcs_used_in_graph", None)
    before = len(funcs) if funcs is not None else 0
    try:
        yield
    finally:
        funcs = getattr(graph, "_py_funcs_used_in_graph", None)
        if funcs is not None:
            funcs[before:] = [f for f in funcs[before:] if not _from_tf_data(f)]


def _from_tf_data(func: Any) -> bool:
    return str(getattr(func, "__module__", "")).startswith("tensorflow.python.data.")


def inner_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A stratified, seeded split of row indices ``(fit, stop)``: ``stop`` is ``fraction`` of
    each class (at least one row of each), the rows early stopping is judged on."""
    rng = np.random.default_rng(seed)
    fit, stop = [], []
    for label in (0, 1):
        rows = np.flatnonzero(y == label)
        rows = rows[rng.permutation(len(rows))]
        k = max(1, int(round(fraction * len(rows))))
        if len(rows) - k < 1:
            raise ConfigError(f"finetune: the training rows need at least 2 of each class for "
                              f"the inner split (class {label}: {len(rows)})")
        stop.append(rows[:k])
        fit.append(rows[k:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(stop))


class FineTuneHead(Head):
    """The top block(s) of ``backbone`` plus ``Dropout -> Dense(1, sigmoid)``, trained on
    flattened cached maps (see the module docstring)."""

    name: ClassVar[str] = "finetune"
    uses_optimizer: ClassVar[bool] = False
    input: ClassVar[str] = "maps"

    def __init__(self, backbone: str | None = None, weights: str = "imagenet",
                 image_size: int | None = None, top_blocks: int = 1, dropout: float = 0.5,
                 learning_rate: float = 1e-4, patience: int = 2, inner: float = 0.2,
                 optimizer: str = "adam", fixed_epochs: list[int] | None = None):
        self.backbone = backbone
        self.weights = weights
        self.image_size = image_size
        self.top_blocks = top_blocks
        self.dropout = dropout
        self.learning_rate = learning_rate
        self.patience = patience
        self.inner = inner
        self.optimizer = optimizer
        self.fixed_epochs = fixed_epochs

    def validate_params(self) -> None:
        if self.backbone is not None and not isinstance(self.backbone, str):
            raise ConfigError(f"finetune: backbone must be a backbone name, got {self.backbone!r}")
        if not isinstance(self.weights, str):
            raise ConfigError(f"finetune: weights must be a string, got {self.weights!r}")
        if self.image_size is not None:
            check_int(self.image_size, "finetune: image_size")
        check_int(self.top_blocks, "finetune: top_blocks")
        check_real(self.dropout, "finetune: dropout", 0.0, 1.0)
        check_real(self.learning_rate, "finetune: learning_rate", 1e-12)
        check_int(self.patience, "finetune: patience")
        check_real(self.inner, "finetune: inner", 0.01, 0.9, high_inclusive=True)
        if not isinstance(self.optimizer, str):
            raise ConfigError(f"finetune: optimizer must be an optimizer's name (e.g. adam), got "
                              f"{self.optimizer!r}")
        if self.fixed_epochs is not None:
            if not isinstance(self.fixed_epochs, (list, tuple)) or len(self.fixed_epochs) != 2:
                raise ConfigError("finetune: fixed_epochs must be two epoch counts [unit, top] "
                                  f"(what a refit trains for), got {self.fixed_epochs!r}")
            for k, value in enumerate(self.fixed_epochs):
                check_int(value, f"finetune: fixed_epochs[{k}]")

    # -- the model ------------------------------------------------------------------------------
    def _backbone_name(self, blocks: Sequence[tuple[str, int]] | None) -> str:
        if self.backbone is not None:
            return self.backbone
        if blocks is not None and len(blocks) == 1:
            return str(blocks[0][0])
        raise ConfigError("finetune: which backbone's top to fine-tune is unknown: set the head's "
                          "`backbone` parameter (or train it on one backbone's maps)")

    def build_top(self, blocks: Sequence[tuple[str, int]] | None = None) -> keras.Model:
        """The backbone's top (maps -> GAP features) with the weights it has in the backbone."""
        from catsdogs.plugins import get_registry

        name = self._backbone_name(blocks)
        backbone = get_registry().backbone(name)
        if not has_top_split(backbone) or not isinstance(backbone, TopSplit):
            raise ConfigError(f"finetune: backbone {name!r} cannot be cut before its last blocks "
                              "(it does not offer split_top); choose one that does, e.g. "
                              "efficientnet_lite0")
        _, top = backbone.split_top(self.weights, self.image_size, blocks=int(self.top_blocks))
        return top

    def _assemble(self, top: keras.Model, seed: int) -> tuple[keras.Model, keras.Model]:
        """``(full, unit)``: flattened maps -> float16 round -> reshape -> top -> unit, and the
        unit (``Dropout -> Dense``) alone on GAP features, sharing its layers with ``full``."""
        import keras

        shape = tuple(int(s) for s in top.input.shape[1:])
        width = int(top.output.shape[-1])
        with seeded_initializers(seed):
            dropout = keras.layers.Dropout(float(self.dropout), seed=seed, name="dropout")
            dense = keras.layers.Dense(1, activation="sigmoid", name="prediction", dtype="float32")
        features = keras.Input((width,), name="features")
        unit = keras.Model(features, dense(dropout(features)), name="finetune_unit")
        maps = keras.Input((math.prod(shape),), name="maps")
        # the cache holds float16 maps: the model rounds its input the same way
        x = keras.layers.Identity(dtype="float16", name="float16_round")(maps)
        x = keras.layers.Reshape(shape, dtype="float32", name="unflatten")(x)
        full = keras.Model(maps, dense(dropout(top(x))), name="finetune")
        float16_notice_held()  # before its first float16 op
        return full, unit

    @staticmethod
    def _freeze_batchnorm(top: keras.Model) -> None:
        import keras

        for layer in top.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False  # inference mode: ImageNet statistics, scale and shift

    def _optimizer(self, optimizer: Optimizer | None, learning_rate: float | None):
        """A Keras optimizer: ``optimizer`` (given to :meth:`fit`) or else the head's
        ``optimizer`` plugin, at ``learning_rate`` (None: its own)."""
        if optimizer is None:
            from catsdogs.plugins import get_registry

            optimizer = get_registry().optimizer(str(self.optimizer))()
        if learning_rate is None:
            return optimizer.build()
        return type(optimizer)(learning_rate=learning_rate).build()

    def refit_params(self) -> dict[str, Any]:
        """What a refit on every row must fix to reproduce this fit: each stage's epochs at its
        lowest inner loss (the weights early stopping kept)."""
        if self.fixed_epochs is not None:
            return {"fixed_epochs": list(self.fixed_epochs)}
        best = [int(np.argmin(self.history_[key])) + 1 for key in ("unit_inner_loss", "inner_loss")]
        return {"fixed_epochs": best}

    # -- the contract ---------------------------------------------------------------------------
    def fit(self, X: np.ndarray, y: np.ndarray, *,
            validation: tuple[np.ndarray, np.ndarray] | None = None,
            optimizer: Optimizer | None = None, epochs: int = 8, batch_size: int = 128,
            seed: int = 2019, verbose: int = 0,
            blocks: Sequence[tuple[str, int]] | None = None) -> FineTuneHead:
        import keras

        self.validate_params()
        X = _check_maps(X, "X")
        y = check_labels(y, X.shape[0], "y").astype(np.float32)
        epochs = check_int(epochs, "epochs")
        batch_size = check_int(batch_size, "batch_size")
        seed = check_int(seed, "seed", 0, SEED_MAX)
        val = None
        if validation is not None:
            X_val = _check_maps(validation[0], "validation X", X.shape[1])
            val = (X_val, check_labels(validation[1], X_val.shape[0], "validation y").astype(np.float32))

        top = self.build_top(blocks)
        shape = tuple(int(s) for s in top.input.shape[1:])
        if math.prod(shape) != X.shape[1]:
            raise ConfigError(f"finetune: X has {X.shape[1]} columns but the top of "
                              f"{self._backbone_name(blocks)!r} ({self.top_blocks} block(s), image "
                              f"size {self.image_size or 'default'}) takes maps of shape {shape} "
                              f"= {math.prod(shape)}; train it on that backbone's cached maps")
        fixed = None if self.fixed_epochs is None else [int(e) for e in self.fixed_epochs]
        if fixed is None:
            fit_rows, stop_rows = inner_split(y.astype(np.int64), float(self.inner), seed)
        else:  # a refit: every row, each stage for its given epochs, nothing held out
            fit_rows, stop_rows = np.arange(len(y)), np.arange(0)
        keras.utils.set_random_seed(seed)
        full, unit = self._assemble(top, seed)
        self._freeze_batchnorm(top)

        def train(model, inputs, stage: int):
            batches = _rows(inputs, y, fit_rows, batch_size, seed=seed + stage)
            if fixed is not None:
                return model.fit(batches, epochs=fixed[stage], verbose=verbose)
            stopper = keras.callbacks.EarlyStopping(monitor="val_loss", patience=int(self.patience),
                                                    restore_best_weights=True)
            return model.fit(batches, validation_data=_rows(inputs, y, stop_rows, PREDICT_BATCH_SIZE),
                             epochs=epochs, verbose=verbose, callbacks=[stopper])

        with _rows_released(), retracing_held():
            # stage 1: the unit on the frozen top's GAP features (the top runs once per row)
            frozen = keras.Model(full.input, top(full.get_layer("unflatten").output))
            gap = frozen.predict(_rows(X, None, None, PREDICT_BATCH_SIZE), verbose=0)
            unit.compile(optimizer=self._optimizer(optimizer, None), loss="binary_crossentropy")
            h1 = train(unit, gap, 0)
            # stage 2: the top block(s) and the unit together, at the fine-tuning learning rate
            full.compile(optimizer=self._optimizer(optimizer, float(self.learning_rate)),
                         loss="binary_crossentropy")
            h2 = train(full, X, 1)
        self.model_ = full
        self.n_features_in_ = int(X.shape[1])
        self.inner_rows_ = int(len(stop_rows))
        self.stopped_epochs_ = [len(h1.history["loss"]), len(h2.history["loss"])]
        self.history_ = {"unit_loss": [float(v) for v in h1.history["loss"]],
                         "loss": [float(v) for v in h2.history["loss"]]}
        if fixed is None:
            self.history_["unit_inner_loss"] = [float(v) for v in h1.history["val_loss"]]
            self.history_["inner_loss"] = [float(v) for v in h2.history["val_loss"]]
        if val is not None:  # reported only: never used to stop or choose anything
            from sklearn.metrics import log_loss

            p = self.predict_proba(val[0])
            self.history_["val_loss"] = [float(log_loss(val[1], p, labels=[0, 1]))]
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        X = _check_maps(X, "X", self.n_features_in_)
        if len(X) == 0:
            return np.zeros(0)
        float16_notice_held()  # a loaded head's first float16 op may be this one
        with _rows_released(), retracing_held():
            out = self.model_.predict(_rows(X, None, None, PREDICT_BATCH_SIZE), verbose=0)
        return np.asarray(out, dtype=np.float64).reshape(-1)

    def keras_model(self) -> keras.Model:
        return self.model_

    def end_to_end(self, blocks: Sequence[tuple[str, int]] | None = None) -> keras.Model:
        """``image`` (raw RGB 0-255) -> P(dog): the backbone's bottom (the maps in float32),
        flattened, then :meth:`keras_model` (which rounds them to float16 as the cache did and
        runs the fine-tuned top and the unit). What an export of the run is."""
        import keras

        from catsdogs.plugins import get_registry

        name = self._backbone_name(blocks)
        backbone = get_registry().backbone(name)
        assert isinstance(backbone, TopSplit)
        bottom, _ = backbone.split_top(self.weights, self.image_size, blocks=int(self.top_blocks))
        image = keras.Input(tuple(bottom.input.shape[1:]), name="image")
        maps = keras.layers.Flatten(name="flatten_maps")(bottom(image))
        return keras.Model(image, self.keras_model()(maps), name=f"finetune_{name}")



@hookimpl
def register_heads(register):
    register(FineTuneHead)
