"""Benchmark: the write-up's seed grid on synthetic cached features, grouped vs run by run.

The grid of experiments/seed.yaml: 4 backbones, all 15 non-empty combinations of their GAP
features, the ``dropout_sigmoid`` head (Dropout 0.5 + Dense(1, sigmoid)), ``adam`` (learning rate
0.001) and ``adadelta`` (learning rate 1.0), 8 epochs, batch size 128, a stratified 80/20 holdout:
30 runs. Each run fits on the training rows with the validation rows as validation data and
predicts the validation rows and the test rows.

Features are synthetic, float32, shaped like the real cache: resnet50, inception_v3 and xception
with 2048 columns and inception_resnet_v2 with 1536 (7,680 for the quadruple); ``--rows`` training
images (default 25,000, Kaggle's train set) and ``--test-rows`` test images (12,500). Every column
is standard normal noise plus a weak class signal (a random sign times ``--signal``), so each
backbone alone is a noisy, learnable problem and combinations are easier.

Measured in ONE process (CPU timings are noisy; compare the ratios, not the seconds):

1. the grouped grid (:func:`catsdogs.runs.multifit.fit_group`: all 30 runs in one pass over the
   rows per batch), then each run's predictions: ``N runs in X s``, peak resident memory
   (``resource.getrusage().ru_maxrss``, measured first because it only grows) and peak NumPy /
   Python allocations (``tracemalloc``);
2. the same 30 runs one by one as the runner trained them before (fuse the combination, compiled
   loop, predict), with per-run seconds and each run's largest weight difference to its grouped
   twin; then the speed ratio, the largest weight and validation-P(dog) differences, memory;
3. optionally (``--keras-subset`` / ``--keras-all``) the same runs with ``model.fit``;
4. with ``--group-runs K``: the grid in the runner's bounded groups
   (:func:`catsdogs.runs.multifit.plan_groups`: whole combinations packed into groups of at most K
   runs, one ``fit_group`` + predictions per group, as the runner trains and writes them) against
   the whole grid as one group, alternated ``--repeat`` times in this process; prints each time
   and the ratio of the medians (bounded / one group) and checks the weights are identical.

A tiny fit with each loop runs first, so TensorFlow's start-up is in no measurement.

Usage::

    python bench/grid_speed.py [--rows 25000] [--test-rows 12500] [--epochs 8] [--batch-size 128]
                               [--no-single] [--keras-subset | --keras-all | --no-keras]
                               [--signal 0.03] [--seed 2019] [--group-runs 8 [--repeat 2]]
"""

from __future__ import annotations

import argparse
import itertools
import os
import resource
import statistics
import time
import tracemalloc

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
from catsdogs.util.tf_log import quiet_tensorflow_import  # noqa: E402

quiet_tensorflow_import()  # its absl start-up lines held to that level too (as the CLI does)

import numpy as np  # noqa: E402

from catsdogs.builtin.heads import DropoutSigmoidHead  # noqa: E402
from catsdogs.builtin.optimizers import AdadeltaOptimizer, AdamOptimizer  # noqa: E402

#: the seed grid's backbones and their GAP widths
BACKBONES = {"resnet50": 2048, "inception_v3": 2048, "xception": 2048, "inception_resnet_v2": 1536}
OPTIMIZERS = {"adam": lambda: AdamOptimizer(learning_rate=0.001),
              "adadelta": lambda: AdadeltaOptimizer(learning_rate=1.0)}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def make_features(n: int, y: np.ndarray, signal: float, seed: int) -> dict[str, np.ndarray]:
    """One float32 block per backbone: N(0, 1) noise + ``signal`` * (+-1 per column) * (+-1 per class)."""
    rng = np.random.default_rng(seed)
    sign = np.where(y == 1, 1.0, -1.0).astype(np.float32)[:, None]
    blocks = {}
    for name, width in BACKBONES.items():
        direction = rng.choice(np.array([-signal, signal], np.float32), size=width)
        X = np.empty((n, width), np.float32)
        for start in range(0, n, 4096):  # in chunks: no float64 temporaries
            stop = min(n, start + 4096)
            X[start:stop] = rng.standard_normal((stop - start, width), dtype=np.float32)
            X[start:stop] += sign[start:stop] * direction
        blocks[name] = X
    return blocks


def fuse(blocks: dict[str, np.ndarray], combination: tuple[str, ...]) -> np.ndarray:
    """As catsdogs.features.fusion.fuse: the blocks side by side, in the combination's order."""
    if len(combination) == 1:
        return blocks[combination[0]]
    return np.ascontiguousarray(np.concatenate([blocks[b] for b in combination], axis=1), np.float32)


def log_loss(y: np.ndarray, p: np.ndarray, clip: tuple[float, float] = (0.005, 0.995)) -> float:
    p = np.clip(p, *clip)  # the seed experiment's clip
    return float(-np.mean(np.where(y == 1, np.log(p), np.log(1 - p))))


def one_run(loop, combination, optimizer_name, train_blocks, test_blocks, y, tr, va, args):
    """One run alone, as the runner trains it: fuse, fit, predict validation and test rows."""
    t0 = time.perf_counter()
    X = fuse(train_blocks, combination)
    X_test = fuse(test_blocks, combination)
    head = DropoutSigmoidHead()
    head.training_loop = loop
    t1 = time.perf_counter()
    head.fit(X[tr], y[tr], validation=(X[va], y[va]), optimizer=OPTIMIZERS[optimizer_name](),
             epochs=args.epochs, batch_size=args.batch_size, seed=args.seed)
    t2 = time.perf_counter()
    p_val = head.predict_proba(X[va])
    p_test = head.predict_proba(X_test)
    t3 = time.perf_counter()
    assert p_test.shape == (len(X_test),)
    return {"fuse": t1 - t0, "fit": t2 - t1, "predict": t3 - t2, "total": t3 - t0,
            "val_logloss": log_loss(y[va], p_val), "width": X.shape[1],
            "weights": head.model_.get_weights(), "p_val": p_val}


def grouped_grid(runs, train_blocks, test_blocks, y, tr, va, args, group_runs=None):
    """All runs by catsdogs.runs.multifit.fit_group (one pass over the rows per batch for the
    whole grid, or per group of :func:`plan_groups` with ``group_runs``), then every run's
    validation and test predictions by predict_group (each block multiplied once by all runs'
    kernel slices, no combination fused), as the runner does."""
    from catsdogs.runs.multifit import Member, fit_group, plan_groups, predict_group

    groups = [list(runs)] if group_runs is None else \
        plan_groups(runs, lambda run: run[0], max_runs=group_runs)
    results = {}
    fit_s = predict_s = 0.0
    for group in groups:
        t0 = time.perf_counter()
        members = [Member(DropoutSigmoidHead(), OPTIMIZERS[o](), c) for c, o in group]
        heads = fit_group(members, train_blocks, y, train_rows=tr, val_rows=va, epochs=args.epochs,
                          batch_size=args.batch_size, seed=args.seed)
        t1 = time.perf_counter()
        combinations = [c for c, _ in group]
        vals = predict_group(heads, combinations, train_blocks, va)
        tests = predict_group(heads, combinations, test_blocks)
        for (c, o), head, p_val, p_test in zip(group, heads, vals, tests, strict=True):
            assert p_val is not None and p_test is not None
            assert p_test.shape == (len(next(iter(test_blocks.values()))),)
            results[(c, o)] = {"val_logloss": log_loss(y[va], p_val), "p_val": p_val,
                               "weights": head.model_.get_weights(), "width": head.n_features_in_}
        fit_s += t1 - t0
        predict_s += time.perf_counter() - t1
    return results, fit_s, predict_s


def bounded_comparison(runs, train_blocks, test_blocks, y, tr, va, args) -> None:
    """The runner's bounded groups against one group for the whole grid, alternated."""
    from catsdogs.runs.multifit import plan_groups

    sizes = [len(g) for g in plan_groups(runs, lambda run: run[0], max_runs=args.group_runs)]
    print(f"\n-- bounded groups (at most {args.group_runs} runs: {len(sizes)} groups of "
          f"{'/'.join(map(str, sizes))}) vs one group of {len(runs)}, alternated "
          f"{args.repeat} times --")
    times: dict[str, list[float]] = {"one group": [], "bounded": []}
    worst_w = 0.0
    for i in range(args.repeat):
        out = {}
        for label, k in (("one group", None), ("bounded", args.group_runs)):
            t0 = time.perf_counter()
            out[label], _, _ = grouped_grid(runs, train_blocks, test_blocks, y, tr, va, args, k)
            times[label].append(time.perf_counter() - t0)
            print(f"  {i + 1}. {label:<9} {times[label][-1]:6.1f} s", flush=True)
        for key, r in out["one group"].items():
            worst_w = max(worst_w, max(float(np.abs(a - b).max()) for a, b in
                                       zip(r["weights"], out["bounded"][key]["weights"], strict=True)))
    one, bounded = (statistics.median(times[k]) for k in ("one group", "bounded"))
    print(f"bounded groups of <= {args.group_runs} vs one group: {bounded:.1f} s vs {one:.1f} s "
          f"(medians), {bounded / one:.3f}x the time; max |weight difference| {worst_w:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=25000, help="training images (default 25000)")
    parser.add_argument("--test-rows", type=int, default=12500, help="test images (default 12500)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--signal", type=float, default=0.03, help="class signal per column")
    parser.add_argument("--seed", type=int, default=2019)
    parser.add_argument("--no-single", action="store_true",
                        help="grouped grid only (no run-by-run comparison)")
    keras_group = parser.add_mutually_exclusive_group()
    keras_group.add_argument("--keras-subset", dest="keras", action="store_const", const="subset",
                             help="also model.fit on the 4 singles + the quadruple")
    keras_group.add_argument("--keras-all", dest="keras", action="store_const", const="all",
                             help="also model.fit on all 30 runs")
    keras_group.add_argument("--no-keras", dest="keras", action="store_const", const="none",
                             help="no model.fit runs (default)")
    parser.set_defaults(keras="none")
    parser.add_argument("--group-runs", type=int, default=None,
                        help="also time the runner's bounded groups of at most this many runs "
                             "against one group (catsdogs.runs.multifit.GROUP_RUNS is the default "
                             "bound)")
    parser.add_argument("--repeat", type=int, default=2,
                        help="alternations of one group / bounded groups (default 2)")
    args = parser.parse_args()

    import tensorflow as tf
    from sklearn.model_selection import train_test_split

    print(f"TensorFlow {tf.__version__}, {os.cpu_count()} CPUs; backbones "
          + ", ".join(f"{k} ({v})" for k, v in BACKBONES.items()))
    t0 = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    y = rng.integers(0, 2, args.rows)
    y_test = rng.integers(0, 2, args.test_rows)
    train_blocks = make_features(args.rows, y, args.signal, args.seed + 1)
    test_blocks = make_features(args.test_rows, y_test, args.signal, args.seed + 2)
    tr, va = train_test_split(np.arange(args.rows), test_size=0.2, stratify=y, random_state=args.seed)
    tr, va = np.sort(tr), np.sort(va)
    feature_mib = sum(b.nbytes for b in (*train_blocks.values(), *test_blocks.values())) / 2**20
    print(f"features: {args.rows} train rows ({len(tr)} fit / {len(va)} validation) + "
          f"{args.test_rows} test rows, {feature_mib:.0f} MiB, made in {time.perf_counter() - t0:.1f}s")

    names = list(BACKBONES)
    combinations = [c for k in range(1, len(names) + 1) for c in itertools.combinations(names, k)]
    runs = [(c, o) for c in combinations for o in OPTIMIZERS]
    if args.keras == "subset":
        keras_runs = [(c, o) for c, o in runs if len(c) in (1, len(names))]
    else:
        keras_runs = runs if args.keras == "all" else []

    # warm-up: TensorFlow start-up, first traces
    Xw, yw = train_blocks[names[0]][:300], y[:300]
    for loop in ("compiled", "keras"):
        head = DropoutSigmoidHead()
        head.training_loop = loop
        head.fit(Xw, yw, validation=(Xw[:50], yw[:50]), epochs=1, batch_size=args.batch_size)
    rss_start = peak_rss_mib()
    print(f"peak RSS after data + warm-up: {rss_start:.0f} MiB\n")

    # the grouped grid first: ru_maxrss only grows, so its peak is measured before the others
    print(f"-- grouped (catsdogs.runs.multifit), {len(runs)} runs ({args.epochs} epochs, "
          f"batch {args.batch_size}) --")
    tracemalloc.start()
    t_grid = time.perf_counter()
    grouped, fit_s, predict_s = grouped_grid(runs, train_blocks, test_blocks, y, tr, va, args)
    grouped_wall = time.perf_counter() - t_grid
    traced_grouped = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    rss_grouped = peak_rss_mib()
    print(f"grouped grid: {len(runs)} runs in {grouped_wall:.1f} s wall (fit {fit_s:.1f} s, "
          f"predict {predict_s:.1f} s); peak RSS {rss_grouped:.0f} MiB (+{rss_grouped - rss_start:.0f} "
          f"over data + warm-up), peak NumPy/Python allocations {traced_grouped:.0f} MiB")
    if args.group_runs:
        bounded_comparison(runs, train_blocks, test_blocks, y, tr, va, args)
    if args.no_single:
        return

    header = f"{'run':>3}  {'combination':<55} {'opt':<8} {'width':>5}  {'fit s':>6} " \
             f"{'pred s':>6} {'total s':>7}  {'val logloss':>11}  {'|dw| grouped':>12}"
    print(f"\n-- run by run (compiled loop), {len(runs)} runs, same process --")
    print(header)
    compiled = {}
    worst_w = worst_p = 0.0
    tracemalloc.start()
    t_grid = time.perf_counter()
    for i, (c, o) in enumerate(runs, 1):
        r = compiled[(c, o)] = one_run("compiled", c, o, train_blocks, test_blocks, y, tr, va, args)
        g = grouped[(c, o)]
        dw = max(float(np.abs(a - b).max()) for a, b in zip(r["weights"], g["weights"], strict=True))
        worst_w = max(worst_w, dw)
        worst_p = max(worst_p, float(np.abs(r["p_val"] - g["p_val"]).max()))
        print(f"{i:>3}  {'+'.join(c):<55} {o:<8} {r['width']:>5}  {r['fit']:>6.2f} {r['predict']:>6.2f} "
              f"{r['total']:>7.2f}  {r['val_logloss']:>11.4f}  {dw:>12.2e}", flush=True)
    grid_wall = time.perf_counter() - t_grid
    traced_single = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    rss_compiled = peak_rss_mib()
    print(f"run-by-run grid: {len(runs)} runs in {grid_wall:.1f} s wall "
          f"(fit {sum(r['fit'] for r in compiled.values()):.1f} s, "
          f"predict {sum(r['predict'] for r in compiled.values()):.1f} s); peak RSS "
          f"{rss_compiled:.0f} MiB, peak NumPy/Python allocations {traced_single:.0f} MiB")
    print(f"\ngrouped vs run by run: {grid_wall / grouped_wall:.2f}x faster "
          f"({grouped_wall:.1f} s vs {grid_wall:.1f} s, same process); max |weight difference| "
          f"{worst_w:.2e}, max |P(dog) difference| on validation {worst_p:.2e}; peak NumPy/Python "
          f"allocations {traced_grouped:.0f} vs {traced_single:.0f} MiB")
    if keras_runs:
        keras_comparison(keras_runs, compiled, train_blocks, test_blocks, y, tr, va, args)


def keras_comparison(keras_runs, compiled, train_blocks, test_blocks, y, tr, va, args) -> None:
    """The same runs with ``model.fit``, against the run-by-run compiled loop."""
    header = f"{'run':>3}  {'combination':<55} {'opt':<8} {'width':>5}  {'fit s':>6} " \
             f"{'pred s':>6} {'total s':>7}  {'val logloss':>11}"
    print(f"\n-- model.fit loop, {len(keras_runs)} of the runs, same process --")
    print(header + f"  {'fit ratio':>9} {'total ratio':>11}  {'d logloss':>9}")
    fit_ratios, total_ratios, keras_total, compiled_total = [], [], 0.0, 0.0
    t_keras = time.perf_counter()
    for i, (c, o) in enumerate(keras_runs, 1):
        r = one_run("keras", c, o, train_blocks, test_blocks, y, tr, va, args)
        ref = compiled[(c, o)]
        fit_ratios.append(r["fit"] / ref["fit"])
        total_ratios.append(r["total"] / ref["total"])
        keras_total += r["total"]
        compiled_total += ref["total"]
        print(f"{i:>3}  {'+'.join(c):<55} {o:<8} {r['width']:>5}  {r['fit']:>6.2f} {r['predict']:>6.2f} "
              f"{r['total']:>7.2f}  {r['val_logloss']:>11.4f}  {fit_ratios[-1]:>8.2f}x "
              f"{total_ratios[-1]:>10.2f}x  {r['val_logloss'] - ref['val_logloss']:>+9.4f}", flush=True)
    keras_wall = time.perf_counter() - t_keras

    def geomean(values):
        return float(np.exp(np.mean(np.log(values))))

    print(f"model.fit runs: {keras_wall:.1f}s wall; the same {len(keras_runs)} runs took "
          f"{compiled_total:.1f}s with the compiled loop")
    print(f"speed-up keras/compiled per run: fit time geomean {geomean(fit_ratios):.2f}x "
          f"(median {statistics.median(fit_ratios):.2f}x, min {min(fit_ratios):.2f}x, "
          f"max {max(fit_ratios):.2f}x); run total geomean {geomean(total_ratios):.2f}x; "
          f"summed totals {keras_total / compiled_total:.2f}x")


if __name__ == "__main__":
    main()
