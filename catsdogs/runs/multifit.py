"""Grouped training: many Keras-head runs of a grid in one pass over the cached features.

A grid trains one small head per (combination × head × optimizer) on column subsets of the same
feature matrix, on the same rows, with the same epochs, batch size and seed. Run one at a time,
each run streams its fused matrix and draws its dropout masks ``epochs`` times, and that (not the
arithmetic of a ``Dense`` layer) is where the time goes. :func:`fit_group` trains such runs
together, one ``tf.function`` call per epoch for the whole group. Per mini-batch it:

* gathers the batch's rows of every backbone block once (``tf.numpy_function`` on the NumPy
  blocks: nothing is copied up front) and concatenates each combination's blocks from them;
* draws each distinct dropout stream once: Keras' ``Dropout`` (TensorFlow backend) keeps a unit
  when ``stateless_uniform(shape, seed) >= rate``, with ``seed`` the layer's seed generator state
  ``[s, step]``; Philox is counter-based, so the ``(b, d)`` draw is the first ``b * d`` values of
  one ``(b * d_max,)`` draw, and every run with the same seed state (all runs of one seed) takes
  its mask as a prefix of that one draw;
* masks each (combination, rate, stream) once (an adam and an adadelta run of one combination
  share it), calls each run's own ``Dense`` layer on it, its compiled loss
  (``model.compute_loss``, L2 terms included) and accuracy, and applies the gradient with the
  run's own Keras optimizer object.

The per-epoch validation pass (no dropout) fuses nothing: each block's rows are multiplied once by
the kernel rows of every run that uses the block, 1,024 rows a step; a run's validation loss equals
its single fit's up to float32 summation order.

Every run's model is built and compiled by :meth:`KerasHead._compiled_model`, exactly as
:meth:`KerasHead.fit` builds it (same initial weights and dropout seed), shuffled with
``np.random.default_rng(seed)`` as the compiled loop does, and its seed generator advances one
step per batch as in the single fit: each run ends with the weights, optimizer state and history
of training it alone, to float round-off (tests/test_multifit.py). A head joins a group when its
training is the built-in compiled loop over ``Input -> Dropout -> Dense`` (:func:`groupable`), or
over that plus frozen per-backbone terms added through a trained Dense (the ``imagenet_prior``
head: :class:`~catsdogs.components.GroupTerms`, each backbone's term computed once per batch for
every run that reads it); any other member is fitted alone by its own :meth:`fit`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from catsdogs.components import GroupTerms, Head, Optimizer
from catsdogs.errors import ConfigError
from catsdogs.validation import check_labels, check_schedule

#: rows per finiteness check of the blocks (bounded temporaries)
_CHECK_ROWS = 4096

#: validation rows per step of the grouped loop (a bounded temporary: 1024 x 7,680 floats = 30 MiB)
_EVAL_ROWS = 1024

#: environment variable: ``0`` makes the runner train every run alone (the reference path)
GROUPED_ENV = "CATSDOGS_GROUPED_FIT"

#: the most runs the runner trains in one group (:func:`plan_groups`): each group's run
#: directories are written before the next group trains, so a kill loses at most one group's
#: training (bench/grid_speed.py --group-runs measures the cost against one group for the grid)
GROUP_RUNS = 16

#: environment variable overriding :data:`GROUP_RUNS` (a positive integer)
GROUP_RUNS_ENV = "CATSDOGS_GROUP_RUNS"


@dataclass(frozen=True)
class Member:
    """One run of a group: an unfitted head, its optimizer, and the blocks it is trained on (in
    column order, like :func:`catsdogs.features.fusion.fuse`)."""

    head: Head
    optimizer: Optimizer | None
    combination: tuple[str, ...]


def groupable(head: Head) -> bool:
    """Whether ``head`` is trained by the built-in compiled loop of :class:`KerasHead` (its
    ``fit`` and loop not overridden, ``training_loop == "compiled"``). Its model must also be
    ``Input -> Dropout -> Dense``, or say its parts (``_group_terms``), which :func:`fit_group`
    checks once built."""
    return bool(head.can_fit_grouped())


def _dropout_dense(model) -> tuple[Any, Any] | None:
    """``(Dropout, Dense)`` when ``model`` is exactly ``Input -> Dropout -> Dense``, else None."""
    import keras

    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    if (len(layers) == 2 and type(layers[0]) is keras.layers.Dropout
            and type(layers[1]) is keras.layers.Dense and layers[0].noise_shape is None
            and len(model.inputs) == 1 and model.outputs[0] is layers[1].output
            and layers[1].input is layers[0].output and layers[0].input is model.inputs[0]):
        return layers[0], layers[1]
    return None


def _check_blocks(blocks: Mapping[str, np.ndarray], names: Sequence[str],
                  rows: np.ndarray) -> dict[str, np.ndarray]:
    """The named blocks as float32 C-contiguous (n, d) arrays, finite on ``rows``."""
    n = None
    checked = {}
    for name in names:
        if name not in blocks:
            raise ConfigError(f"fit_group: no feature block {name!r} (have {', '.join(blocks)})")
        arr = np.asarray(blocks[name])
        if arr.ndim != 2 or arr.dtype != np.float32 or arr.shape[1] == 0:
            raise ConfigError(f"fit_group: block {name!r} must be a float32 (rows, features) "
                              f"array, got {arr.dtype} {arr.shape}")
        if n is not None and arr.shape[0] != n:
            raise ConfigError(f"fit_group: block {name!r} has {arr.shape[0]} rows, "
                              f"the others {n}")
        n = arr.shape[0]
        arr = np.ascontiguousarray(arr)
        for start in range(0, len(rows), _CHECK_ROWS):
            if not np.isfinite(arr[rows[start:start + _CHECK_ROWS]]).all():
                raise ConfigError(f"fit_group: block {name!r} contains NaN or infinite values")
        checked[name] = arr
    return checked


def _check_rows(rows: Any, n: int, what: str) -> np.ndarray:
    arr = np.asarray(rows)
    if arr.ndim != 1 or arr.dtype.kind not in "iu" or len(arr) == 0:
        raise ConfigError(f"fit_group: {what} must be a non-empty 1-D array of row indices")
    if arr.min() < 0 or arr.max() >= n:
        raise ConfigError(f"fit_group: {what} holds indices outside 0..{n - 1}")
    return arr.astype(np.int64)


@dataclass
class _Prepared:
    """A member ready for the grouped loop."""

    index: int  # position in the members list
    head: Any
    model: Any
    dropout: Any
    dense: Any
    combination: tuple[str, ...]
    width: int
    accuracy: Any
    stream: tuple[int, ...] | None  # initial seed generator state (2 ints); None without dropout
    terms: GroupTerms | None = None  # the frozen per-backbone terms of a model that has them


def fit_group(members: Sequence[Member], blocks: Mapping[str, np.ndarray], y: Any, *,
              train_rows: Any, val_rows: Any = None, epochs: int = 8, batch_size: int = 128,
              seed: int = 2019, verbose: int = 0) -> list[Head]:
    """Fit every member's head, as ``head.fit(X[train_rows], y[train_rows], validation=(X[val_rows],
    y[val_rows]), optimizer=..., epochs=..., batch_size=..., seed=...)`` would with ``X`` its
    combination's fused blocks; return the fitted heads in member order.

    ``blocks`` maps backbone name -> float32 ``(n, d)`` features (all rows; e.g.
    ``Aligned.train.X``), ``y`` holds the n 0/1 labels. Members that are not :func:`groupable`
    are fitted alone by their own ``fit``.
    """
    epochs, batch_size, seed = check_schedule(epochs, batch_size, seed)
    names = list(dict.fromkeys(b for m in members for b in m.combination))
    n = len(np.asarray(y))
    train_rows = _check_rows(train_rows, n, "train_rows")
    val = None if val_rows is None else _check_rows(val_rows, n, "val_rows")
    used_rows = train_rows if val is None else np.concatenate([train_rows, val])
    arrays = _check_blocks(blocks, names, used_rows)
    y = check_labels(y, n, "y")

    prepared, alone = [], []
    for i, member in enumerate(members):
        if not member.combination:
            raise ConfigError(f"fit_group: member {i} has an empty combination")
        widths = _block_widths(arrays, member.combination)
        width = sum(w for _, w in widths)
        if groupable(member.head):
            head: Any = member.head  # a KerasHead (core never imports catsdogs.builtin)
            model = head._group_model(widths, lambda b: arrays[b][train_rows], member.optimizer,
                                      seed)
            terms = head._group_terms(model, widths)
            layers = _dropout_dense(model) if terms is None else (terms.dropout, terms.dense)
            if layers is not None:
                dropout, dense = layers
                stream = None
                if dropout.rate > 0:
                    stream = tuple(int(v) for v in np.asarray(dropout.seed_generator.state.value))
                prepared.append(_Prepared(
                    i, member.head, model, dropout, dense, member.combination, width,
                    head._accuracy_function(model, head._targets(y[:1])), stream, terms))
                continue
        alone.append(i)

    fitted: list[Head | None] = [None] * len(members)
    if prepared:
        histories = _train(prepared, arrays, names, y, train_rows, val, epochs=epochs,
                           batch_size=batch_size, seed=seed, verbose=verbose)
        for p, history in zip(prepared, histories, strict=True):
            fitted[p.index] = p.head._set_fitted(p.model, p.width, history)
    for i in alone:
        m = members[i]
        X = np.concatenate([arrays[b] for b in m.combination], axis=1)
        validation = None if val is None else (X[val], y[val])
        fitted[i] = m.head.fit(X[train_rows], y[train_rows], validation=validation,
                               optimizer=m.optimizer, epochs=epochs, batch_size=batch_size,
                               seed=seed, verbose=verbose)
    return fitted  # type: ignore[return-value]


def _train(prepared: list[_Prepared], arrays: dict[str, np.ndarray], names: list[str],
           y: np.ndarray, train_rows: np.ndarray, val_rows: np.ndarray | None, *, epochs: int,
           batch_size: int, seed: int, verbose: int) -> list[dict[str, list[float]]]:
    """The grouped loop: one ``tf.function`` call per epoch for all ``prepared`` runs."""
    import tensorflow as tf
    from keras.src.backend.tensorflow.random import _cast_seed

    variables = [p.model.trainable_variables for p in prepared]
    for p, v in zip(prepared, variables, strict=True):
        p.model.optimizer.build(v)  # slot variables outside the traced function
    targets = [tf.convert_to_tensor(p.head._targets(y)) for p in prepared]
    # the blocks stay NumPy arrays read by tf.numpy_function (see KerasHead._fit_compiled)
    source = {"blocks": [arrays[b] for b in names]}
    position = {b: i for i, b in enumerate(names)}
    widths = {b: arrays[b].shape[1] for b in names}
    streams = {p.stream for p in prepared if p.stream is not None}
    stream_width = {s: max(p.width for p in prepared if p.stream == s) for s in streams}

    def take(rows):
        """The batch's rows of every block, in the graph."""
        out = tf.numpy_function(lambda r: [a[r] for a in source["blocks"]], [rows],
                                [tf.float32] * len(names), stateful=False)
        for t, b in zip(out, names, strict=True):
            t.set_shape((None, widths[b]))
        return out

    def fused(parts, combination):
        tensors = [parts[position[b]] for b in combination]
        return tensors[0] if len(tensors) == 1 else tf.concat(tensors, axis=1)

    def output(p, z, parts, computed):
        """A run's output from its Dense's output ``z``: for a model with frozen per-backbone
        terms, ``activation(z + term_dense(their columns))``, each column computed once per
        batch (``computed``: key -> column)."""
        if p.terms is None:
            return z
        columns = []
        for key, backbone, layer in p.terms.terms:
            if key not in computed:
                computed[key] = layer.on_block(parts[position[backbone]])
            columns.append(computed[key])
        stacked = columns[0] if len(columns) == 1 else tf.concat(columns, axis=1)
        return p.terms.activation(z + p.terms.term_dense(stacked))

    def train_step(rows):
        """One update of every run on the batch ``rows``; per-run loss and correct counts."""
        parts = take(rows)
        b = tf.shape(rows)[0]
        # every run's seed generator advances, as in its single fit; one draw per stream
        seeds = {}
        for p in prepared:
            if p.stream is not None:
                s = p.dropout.seed_generator.next()
                seeds.setdefault(p.stream, _cast_seed(s))
        uniforms = {s: tf.random.stateless_uniform(tf.reshape(b * stream_width[s], (1,)),
                                                   seed=seeds[s]) for s in streams}
        inputs, keeps, masked = {}, {}, {}
        for p in prepared:
            x = inputs.get(p.combination)
            if x is None:
                x = inputs[p.combination] = fused(parts, p.combination)
            key = _mask_key(p)
            if key not in masked:
                if p.stream is None:
                    masked[key] = x
                else:  # stateless_dropout's where(u >= rate, x * scale, 0), u the stream's prefix
                    # scale or 0 for the stream's whole draw, once per (stream, rate); each
                    # width's mask is a prefix of it
                    keep = keeps.get(key[1:3])
                    if keep is None:
                        rate = float(p.dropout.rate)
                        keep = keeps[key[1:3]] = \
                            tf.cast(uniforms[p.stream] >= rate, tf.float32) * (1 / (1 - rate))
                    # x * scale where kept, (signed) zero elsewhere
                    masked[key] = x * tf.reshape(keep[:b * p.width], (b, p.width))
        computed: dict[Any, Any] = {}
        with tf.GradientTape() as tape:
            preds, losses, scaled_losses = [], [], []
            for p, y_all in zip(prepared, targets, strict=True):
                yb = tf.gather(y_all, rows)
                y_pred = output(p, p.dense(masked[_mask_key(p)]), parts, computed)
                loss = p.model.compute_loss(x=inputs[p.combination], y=yb, y_pred=y_pred,
                                            training=True)
                preds.append((yb, y_pred))
                losses.append(loss)
                scaled_losses.append(p.model.optimizer.scale_loss(loss))
            total = tf.add_n(scaled_losses)
        gradients = tape.gradient(total, [v for vs in variables for v in vs])
        start = 0
        for p, vs in zip(prepared, variables, strict=True):
            p.model.optimizer.apply_gradients(zip(gradients[start:start + len(vs)], vs))
            start += len(vs)
        return _sums(prepared, preds, losses, b)

    # validation needs no dropout, so no fused copy either: each block's batch rows are multiplied
    # once by the kernel rows of every run that uses the block (as predict_group does), and a
    # run's logits are the sum over its blocks (equal to its Dense on the fused columns up to
    # float32 summation order)
    users: dict[str, list[tuple[int, int]]] = {b: [] for b in names}  # block -> (run, row offset)
    for i, p in enumerate(prepared):
        offset = 0
        for b in p.combination:
            users[b].append((i, offset))
            offset += widths[b]

    def eval_step(rows):
        parts = take(rows)
        logits: list[Any] = [None] * len(prepared)
        for b, uses in users.items():
            if not uses:  # a block only members fitted alone use
                continue
            kernel = tf.concat([prepared[i].dense.kernel[o:o + widths[b]] for i, o in uses], axis=1)
            product = tf.matmul(parts[position[b]], kernel)
            column = 0
            for i, _ in uses:
                units = prepared[i].dense.units
                z = product[:, column:column + units]
                logits[i] = z if logits[i] is None else logits[i] + z
                column += units
        preds, losses = [], []
        computed: dict[Any, Any] = {}
        for p, z, y_all in zip(prepared, logits, targets, strict=True):
            if p.dense.use_bias:
                z = z + p.dense.bias
            # Dropout is the identity when not training
            y_pred = output(p, p.dense.activation(z), parts, computed)
            yb = tf.gather(y_all, rows)
            losses.append(p.model.compute_loss(x=None, y=yb, y_pred=y_pred, training=False))
            preds.append((yb, y_pred))
        return _sums(prepared, preds, losses, tf.shape(rows)[0])

    def run_batches(step, indices, size):
        n = tf.shape(indices)[0]
        loss_sum = tf.zeros((len(prepared),), tf.float32)
        correct = tf.zeros((len(prepared),), tf.float32)
        for start in tf.range(0, n, size):
            batch_loss, batch_correct = step(indices[start:start + size])
            loss_sum += batch_loss
            correct += batch_correct
        count = tf.cast(n, tf.float32)
        return loss_sum / count, correct / count

    eval_batch = max(batch_size, _EVAL_ROWS)

    def run_epoch(permutation):
        loss, acc = run_batches(train_step, permutation, batch_size)
        out = {"accuracy": acc, "loss": loss}
        if val_rows is not None:
            # the mean loss and the correct count do not depend on how the rows are batched
            val_loss, val_acc = run_batches(eval_step, tf.constant(val_rows), eval_batch)
            out.update(val_accuracy=val_acc, val_loss=val_loss)
        return out

    epoch = tf.function(functools.partial(run_epoch), jit_compile=False)
    rng = np.random.default_rng(seed)
    histories: list[dict[str, list[float]]] = [{} for _ in prepared]
    try:
        for e in range(epochs):
            permutation = train_rows[rng.permutation(len(train_rows))]
            logs = {k: v.numpy() for k, v in epoch(tf.convert_to_tensor(permutation)).items()}
            for i, history in enumerate(histories):
                for key, values in logs.items():
                    history.setdefault(key, []).append(float(values[i]))
            if verbose:
                print(f"Epoch {e + 1}/{epochs} ({len(prepared)} runs) - mean loss "
                      f"{float(np.mean(logs['loss'])):.4f}", flush=True)
    finally:
        source.clear()
    return histories


def _mask_key(p: _Prepared) -> tuple:
    """Runs with equal keys train on the same dropped-out inputs; ``key[1:]`` identifies the mask."""
    return (p.combination, p.stream, float(p.dropout.rate), p.width)


def _sums(prepared: list[_Prepared], preds, losses, b):
    """Per run: batch loss times batch size, and the count of correct predictions (as the single
    compiled loop accumulates them)."""
    import tensorflow as tf

    size = tf.cast(b, tf.float32)
    loss = tf.stack([tf.cast(v, tf.float32) * size for v in losses])
    correct = tf.stack([tf.reduce_sum(tf.cast(p.accuracy(yb, y_pred), tf.float32))
                        for p, (yb, y_pred) in zip(prepared, preds, strict=True)])
    return loss, correct


def group_runs() -> int:
    """The bound on runs per group: :data:`GROUP_RUNS`, or ``CATSDOGS_GROUP_RUNS`` when set."""
    import os

    from catsdogs.validation import check_positive_int

    raw = os.environ.get(GROUP_RUNS_ENV, "").strip()
    if not raw:
        return GROUP_RUNS
    try:
        value: Any = int(raw)
    except ValueError:
        value = raw
    return check_positive_int(value, GROUP_RUNS_ENV)


def plan_groups(items: Sequence[Any], combination_of: Any, *, parallel: bool = False,
                max_runs: int | None = None, alone: Any = None) -> list[list[Any]]:
    """The runs trained together, one :func:`fit_grid` call per group, in plan order; the runner
    writes a group's run directories before the next group trains.

    Runs of one combination share their fused columns and dropout masks, so a combination's runs
    stay together; whole combinations are packed into groups of at most ``max_runs`` runs
    (default :func:`group_runs`), a combination with more runs than that being split. A
    ``parallel`` engine (Ray) gets one group per combination (still bounded by ``max_runs``), so
    the groups spread over its CPUs. ``combination_of(item)`` gives an item's combination.
    Items for which ``alone(item)`` is true (runs that share nothing with the others and train
    for long, e.g. a head fine-tuned on maps) get a group each, after the others, so each is
    written as soon as it is trained.
    """
    limit = group_runs() if max_runs is None else max_runs
    by_combination: dict[tuple[str, ...], list[Any]] = {}
    singles: list[list[Any]] = []
    for item in items:
        if alone is not None and alone(item):
            singles.append([item])
        else:
            by_combination.setdefault(tuple(combination_of(item)), []).append(item)
    groups: list[list[Any]] = []
    current: list[Any] = []
    for runs in by_combination.values():
        chunks = [runs[i:i + limit] for i in range(0, len(runs), limit)]
        for chunk in chunks:
            if current and (parallel or len(current) + len(chunk) > limit):
                groups.append(current)
                current = []
            current = current + chunk
    if current:
        groups.append(current)
    return groups + singles


def grouping_enabled() -> bool:
    """False when ``CATSDOGS_GROUPED_FIT=0``: the runner then fits every run by itself."""
    import os

    return os.environ.get(GROUPED_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def predict_group(heads: Sequence[Head], combinations: Sequence[Sequence[str]],
                  blocks: Mapping[str, np.ndarray | None], rows: np.ndarray | None = None,
                  only: Sequence[bool] | None = None) -> list[np.ndarray | None]:
    """P(dog) of fitted grouped heads on ``rows`` of the backbone ``blocks`` (all rows: None),
    without fusing any combination: each head's ``Input -> Dropout -> Dense`` is, at prediction,
    ``activation(sum over its blocks of X_b @ kernel rows of b + bias)``, so every block is
    multiplied once by the kernel slices of all heads that use it. Equal to each head's
    ``predict_proba`` on its fused features up to float32 summation order (~1e-7); a model with
    frozen per-backbone terms (:class:`~catsdogs.components.GroupTerms`) adds them, each computed
    once for all heads. A head whose model is not one of those shapes, or that ``only`` leaves
    out, gets None (predict it with ``predict_proba``)."""
    index = None if rows is None else np.asarray(rows)
    parts: dict[str, list[tuple[int, np.ndarray]]] = {}
    layers: list[Any] = []
    extras: list[GroupTerms | None] = []
    logits: list[np.ndarray | None] = []
    n = None
    for i, (head, combination) in enumerate(zip(heads, combinations, strict=True)):
        wanted = head.can_fit_grouped() and (only is None or only[i])
        shape = terms = None
        widths = _block_widths(blocks, combination)
        if wanted:
            model = head._fitted_model()  # type: ignore[attr-defined]
            terms = head._group_terms(model, widths)  # type: ignore[attr-defined]
            shape = _dropout_dense(model) if terms is None else (terms.dropout, terms.dense)
        extras.append(terms)
        if shape is None:
            layers.append(None)
            logits.append(None)
            continue
        dense = shape[1]
        kernel, bias = (np.asarray(w, np.float32) for w in dense.get_weights())
        offset = 0
        for name, width in widths:
            parts.setdefault(name, []).append((i, kernel[offset:offset + width]))
            offset += width
        if offset != kernel.shape[0]:
            raise ValueError(f"head {i}: kernel has {kernel.shape[0]} rows, its blocks {offset}")
        n = len(blocks[combination[0]]) if index is None else len(index)  # type: ignore[arg-type]
        layers.append(dense)
        logits.append(np.broadcast_to(bias, (n, bias.shape[0])).copy())
    for name, slices in parts.items():
        X = blocks[name] if index is None else blocks[name][index]  # type: ignore[index]
        product = np.asarray(X, np.float32) @ np.concatenate([k for _, k in slices], axis=1)
        column = 0
        for i, k in slices:
            logits[i] += product[:, column:column + k.shape[1]]  # type: ignore[operator]
            column += k.shape[1]
    computed: dict[Any, np.ndarray] = {}
    out: list[np.ndarray | None] = []
    for head, dense, terms, z in zip(heads, layers, extras, logits, strict=True):
        if dense is None or z is None:
            out.append(None)
            continue
        output = np.asarray(dense.activation(z), np.float32)
        if terms is not None:
            output = _with_terms(terms, output, blocks, index, computed)
        out.append(np.asarray(head._dog_probability(output), np.float64))  # type: ignore[attr-defined]
    return out


def _block_widths(blocks: Mapping[str, Any], combination: Sequence[str]) -> list[tuple[str, int]]:
    """``(backbone, width)`` of each block of ``combination``, in its column order: what a head's
    ``_group_model`` / ``_group_terms`` are given."""
    return [(name, int(blocks[name].shape[1])) for name in combination]


def _with_terms(terms: GroupTerms, z: np.ndarray, blocks: Mapping[str, Any], index, computed
                ) -> np.ndarray:
    """``activation(z + term_dense(columns))`` of a head with frozen per-backbone terms, each
    column computed once (``computed``: key -> column) in batches of ``_EVAL_ROWS`` rows."""
    columns = []
    for key, backbone, layer in terms.terms:
        if key not in computed:
            X = blocks[backbone] if index is None else blocks[backbone][index]
            computed[key] = np.concatenate(
                [np.asarray(layer.on_block(np.asarray(X[i:i + _EVAL_ROWS], np.float32)), np.float32)
                 for i in range(0, len(X), _EVAL_ROWS)] or [np.zeros((0, 1), np.float32)])
        columns.append(computed[key])
    kernel, bias = (np.asarray(w, np.float32) for w in terms.term_dense.get_weights())
    return np.asarray(terms.activation(z + np.concatenate(columns, axis=1) @ kernel + bias),
                      np.float32)


@dataclass
class GroupFit:
    """One fold of a grouped run: the fitted head and, when :func:`predict_group` could compute
    them, its P(dog) on the fold's validation rows and on the test rows (flip-averaged when the run
    uses TTA; None without test rows)."""

    head: Head
    val: np.ndarray | None = None
    test: np.ndarray | None = None


def fit_grid(specs: Sequence[Any], experiment: Any, aligned: Any, splits: Sequence[tuple],
             registry: Any, params: Any = None,
             resume: Callable[[int, list[str]], dict[str, Any] | None] | None = None,
             on_fold: Callable[[int, dict[str, GroupFit]], None] | None = None,
             ) -> dict[str, list[Any]]:
    """The runner's seam: fit the planned runs ``specs`` (:class:`catsdogs.runs.runner.RunSpec`)
    that can share passes, one :func:`fit_group` per validation fold, and predict their
    validation rows (from ``aligned.held_out``, the features they are predicted from) and test
    rows together (:func:`predict_group`); returns run id -> one
    :class:`GroupFit` per fold (the runs left out are fitted by the runner as before).

    Fold checkpoints (the runner's, :mod:`catsdogs.runs.folds`): ``resume(fold, run ids)`` gives
    what an earlier try kept of that fold for every run of the group (run id -> it), or None; a
    fold kept for all of them is not trained again, and what was kept stands in its place in the
    lists. ``on_fold(fold, run id -> GroupFit)`` is called as soon as a fold is trained and
    predicted, so that a kill loses at most the fold in training.

    Left out: runs whose head is not :func:`groupable` or is tuned by ``experiment.tuning``, every
    run when grouping is switched off (:func:`grouping_enabled`), when fewer than two runs remain,
    or when a backbone's features are not float32. ``params(spec)`` gives a run's head
    parameters as the runner sets them (:func:`catsdogs.runs.runner.run_head_params`; default:
    the spec's own).
    """
    from catsdogs.runs.features import tta_average
    from catsdogs.runs.tuning import tunable_names
    from catsdogs.util.progress import fold_step

    if not grouping_enabled():
        return {}

    def params_of(spec) -> dict[str, Any]:
        return dict(spec.head.params) if params is None else dict(params(spec))

    chosen = []
    for spec in specs:
        head_cls = registry.head(spec.head.name)
        if experiment.tuning is not None and tunable_names(head_cls, experiment.tuning.params):
            continue
        head = head_cls(**params_of(spec))
        if groupable(head):
            chosen.append(spec)
    blocks = aligned.train.X
    if len(chosen) < 2 or any(np.asarray(split.X[b]).dtype != np.float32
                              for split in (aligned.train, aligned.held_out)
                              for spec in chosen for b in spec.combination):
        return {}
    fitted: dict[str, list[Any]] = {spec.run_id: [] for spec in chosen}
    combinations = [tuple(spec.combination) for spec in chosen]
    uses_flip = [bool(experiment.tta) and aligned.has_flip(c) for c in combinations]
    flip = any(uses_flip)
    for fold, (tr, va) in enumerate(splits):
        kept = resume(fold, list(fitted)) if resume is not None else None
        if kept is not None:
            for run_id in fitted:
                fitted[run_id].append(kept[run_id])
            continue
        fold_step(f"{len(chosen)} runs trained together", fold, len(splits))
        members = [Member(registry.head(spec.head.name)(**params_of(spec)),
                          _optimizer(spec, registry), c) for spec, c in zip(chosen, combinations)]
        heads = fit_group(members, blocks, aligned.train.y, train_rows=tr, val_rows=va,
                          epochs=experiment.epochs, batch_size=experiment.batch_size,
                          seed=experiment.seed)
        val = predict_group(heads, combinations, aligned.held_out.X, va)
        test: list[np.ndarray | None] = [None] * len(heads)
        if len(aligned.test):
            test = predict_group(heads, combinations, aligned.test.X)
        if flip:  # flip TTA for the runs that use it (the others' flipped prediction is None)
            val = [tta_average(p, q) for p, q in zip(val, predict_group(
                heads, combinations, aligned.held_out.X_flip, va, uses_flip), strict=True)]
            if len(aligned.test):
                test = [tta_average(p, q) for p, q in zip(test, predict_group(
                    heads, combinations, aligned.test.X_flip, None, uses_flip), strict=True)]
        trained = {spec.run_id: GroupFit(head, v, t)
                   for spec, head, v, t in zip(chosen, heads, val, test, strict=True)}
        if on_fold is not None:
            on_fold(fold, trained)
        for run_id, group_fit in trained.items():
            fitted[run_id].append(group_fit)
    return fitted


def _optimizer(spec: Any, registry: Any) -> Optimizer | None:
    """The run's optimizer, as the runner makes it."""
    if spec.optimizer is None:
        return None
    return registry.optimizer(spec.optimizer.name)(learning_rate=spec.optimizer.learning_rate)

