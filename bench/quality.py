"""Benchmark: submitted test log loss on ~25,000 real photos (Microsoft PetImages), with a paired
bootstrap standard error against a baseline.

The shared mini set (1,000 train / 300 test) cannot tell 0.001 apart (its paired standard error
is 0.002-0.003). This script builds a seeded split of the public PetImages photos (the Kaggle
"Cats and Dogs" data, ``PetImages/{Cat,Dog}/*.jpg``; never commit them): ``--n-test`` photos
(default 5,000, half cats, half dogs) for test, the rest (~20,000) for training, laid out as the
project reads Kaggle data, as symbolic links under ``--work`` (``--n-train`` takes fewer
training photos: SPLIT = ``split-s<seed>-<n_train>-<n_test>``)::

    WORK/SPLIT/train/cat.N.jpg, dog.N.jpg  -> PetImages/Cat/N.jpg, PetImages/Dog/N.jpg
    WORK/SPLIT/test/K.jpg                  (K = 1..n_test, shuffled)
    WORK/SPLIT/test_labels.csv             id,label (dog = 1)
    WORK/SPLIT/split.json                  seed, sizes, the photos left out and why

Photos the project's reader cannot decode are left out of the split (checked once, remembered in
``WORK/unreadable.json``; ``split.json`` lists them), so every test id gets a prediction.

Then it runs EXPERIMENT.yaml on that data through the Python API (``catsdogs.run_experiment``,
as ``catsdogs run`` does: ranking, post-processing, refit, ensembles exactly as configured), with
the data, output and feature cache overridden: output ``WORK/runs/SPLIT/<file stem>-<hash of the
file>``, cache ``WORK/cache`` (``--cache-dir``), shared by every experiment run here, so features
are extracted once per backbone configuration. It prints the submission's test log loss (the
same number as ``catsdogs score``), and, given a baseline (``--baseline OTHER.yaml``, run the same
way, or ``--baseline-predictions submission.csv``), the paired difference with its bootstrap
standard error over the test photos (``--bootstrap`` resamples of the photos; both submissions are
scored on the same resampled photos). Test labels are used for these report numbers only.

Finished runs are shared between the experiment files measured on a split: a file's planned run
that another output folder of the split has finished with the same settings hash is copied from
there, not trained (``run_experiment(reuse_from=...)``, ``catsdogs run --reuse-from``;
``--no-share-runs``: none). The hash covers everything a run's result depends on, so sharing
changes no number: a variant that only adds an ensemble or post-processing to a measured grid
costs seconds, not the grid.

``--seed 2019,2020,2021`` measures on several splits, one after the other, and adds the mean of
the paired differences over the splits (its standard error combines the splits' as if they were
independent; they share photos, so it is a lower bound). Decide on a lever by a rule written down
before the splits are measured.

Usage::

    python bench/quality.py EXPERIMENT.yaml [--baseline BASE.yaml | --baseline-predictions CSV]
        [--work ~/.cache/catsdogs-bench] [--cache-dir DIR] [--photos /work/data/PetImages]
        [--seed 2019[,2020,...]] [--n-test 5000] [--n-train N] [--bootstrap 2000] [--top 5] [--json]
        [--only-backbones A,B] [--no-share-runs] [--no-progress] [--prepare-only]

The experiment file's ``data:`` is ignored (any valid directory will do); use ``precision:
int8`` for the backbones on a CPU machine (it costs no accuracy here, see the README).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
from catsdogs.util.tf_log import quiet_tensorflow_import  # noqa: E402

quiet_tensorflow_import()  # its absl start-up lines held to that level too (as the CLI does)

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_PHOTOS = Path(os.environ.get("CATSDOGS_PETIMAGES", "/work/data/PetImages"))
DEFAULT_WORK = Path("~/.cache/catsdogs-bench")
SPLIT_VERSION = 1


# ------------------------------------------------------------------------------------ the split
def _photos(root: Path, folder: str) -> list[Path]:
    d = root / folder
    if not d.is_dir():
        sys.exit(f"Error: {d} not found; pass --photos PetImages (with Cat/ and Dog/ inside)")
    files = [p for p in d.iterdir() if p.suffix.lower() == ".jpg" and p.stem.isdigit()]
    return sorted(files, key=lambda p: int(p.stem))


def _unreadable(paths: list[Path], workers: int = 2) -> dict[str, str]:
    """``{path: reason}`` for the photos the project's reader refuses (full decode)."""
    from catsdogs.dataset.images import ImageDecodeError, decode_rgb, read_image_file

    def check(p: Path) -> str | None:
        try:
            decode_rgb(read_image_file(p))
        except (ImageDecodeError, OSError) as exc:
            return str(exc) or type(exc).__name__
        return None

    with ThreadPoolExecutor(workers) as pool:
        reasons = list(pool.map(check, paths, chunksize=64))
    return {str(p): r for p, r in zip(paths, reasons) if r is not None}


def _readable(cats: list[Path], dogs: list[Path], work: Path) -> tuple[list[Path], list[Path], dict]:
    """The photos the project's reader decodes, and ``{path: reason}`` of the others (checked once
    per listing, remembered in ``work/unreadable.json``)."""
    listing = hashlib.sha256(json.dumps([[str(p) for p in cats], [str(p) for p in dogs]])
                             .encode()).hexdigest()[:16]
    memo = work / "unreadable.json"
    bad = None
    if memo.exists():
        saved = json.loads(memo.read_text())
        if saved.get("listing") == listing:
            bad = saved["unreadable"]
    if bad is None:
        t0 = time.perf_counter()
        print(f"checking {len(cats) + len(dogs)} photos with the project's reader ...",
              file=sys.stderr, flush=True)
        bad = _unreadable(cats + dogs)
        work.mkdir(parents=True, exist_ok=True)
        memo.write_text(json.dumps({"listing": listing, "unreadable": bad}, indent=1))
        print(f"  {len(bad)} unreadable ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    return ([p for p in cats if str(p) not in bad], [p for p in dogs if str(p) not in bad], bad)


def prepare(photos: Path, work: Path, seed: int, n_test: int, n_train: int | None = None) -> Path:
    """Create (or check) the split ``work/split-s<seed>-<n_train>-<n_test>``; return it.

    Per class, a seeded permutation of the readable photos: the first ``n_test / 2`` are test
    photos, the next ``n_train / 2`` (None: all the rest) training photos.
    """
    cats, dogs = _photos(photos, "Cat"), _photos(photos, "Dog")
    cats, dogs, bad = _readable(cats, dogs, work)
    rng = np.random.default_rng(seed)
    test, train = [], []
    for label, files in ((0, cats), (1, dogs)):
        order = rng.permutation(len(files))
        k = n_test // 2 if label == 0 else n_test - n_test // 2
        rest = order[k:] if n_train is None else \
            order[k:k + (n_train // 2 if label == 0 else n_train - n_train // 2)]
        test += [(files[i], label) for i in order[:k]]
        train += [(files[i], label) for i in rest]
    test = [test[i] for i in rng.permutation(len(test))]
    if len(train) < 20 or len(test) < 2:
        sys.exit(f"Error: {photos}: too few readable photos for {n_test} test and "
                 f"{n_train} training photos")
    data = work / f"split-s{seed}-{len(train)}-{len(test)}"
    listing = hashlib.sha256(json.dumps([[str(p) for p, _ in train], [str(p) for p, _ in test]])
                             .encode()).hexdigest()[:16]
    want = {"version": SPLIT_VERSION, "photos": str(photos.resolve()), "seed": seed,
            "n_train": len(train), "n_test": len(test), "listing": listing}
    marker = data / "split.json"
    if marker.exists():
        have = json.loads(marker.read_text())
        if {k: have.get(k) for k in want} == want:
            return data
        sys.exit(f"Error: {data} holds another split ({ {k: have.get(k) for k in want} }); "
                 "choose another --work or delete that folder")
    if data.exists() and any(data.iterdir()):
        sys.exit(f"Error: {data} exists without a finished split.json; delete it or choose another --work")
    (data / "train").mkdir(parents=True, exist_ok=True)
    (data / "test").mkdir(parents=True, exist_ok=True)
    for path, label in train:
        (data / "train" / f"{'dog' if label else 'cat'}.{path.stem}.jpg").symlink_to(path.resolve())
    rows = ["id,label"]
    for i, (path, label) in enumerate(test, start=1):
        (data / "test" / f"{i}.jpg").symlink_to(path.resolve())
        rows.append(f"{i},{label}")
    (data / "test_labels.csv").write_text("\n".join(rows) + "\n")
    marker.write_text(json.dumps({**want, "left_out": bad, "test_sources": [str(p) for p, _ in test]},
                                 indent=1))
    print(f"split: {len(train)} train, {len(test)} test, {len(bad)} unreadable left out, in {data}",
          file=sys.stderr, flush=True)
    return data


# ------------------------------------------------------------------------------------ scoring
def _losses(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Per-photo log loss, clipped at 1e-15 as ``catsdogs score`` (and Kaggle) does: the
    package's one per-row log loss."""
    from catsdogs.evaluation.metrics import row_log_losses

    return row_log_losses(y, p)


def worst_photos(y: np.ndarray, p: np.ndarray, ids: np.ndarray, data: Path, k: int) -> dict:
    """The ``k`` test photos with the largest log loss: what share of the total they carry, the
    mean over the others, and each one's id, label, P(dog), loss and source photo (from
    ``split.json``), so a reader can look at what the number is made of (label noise, placeholder
    images) instead of trusting the mean."""
    losses = _losses(y, p)
    order = np.argsort(-losses, kind="stable")[:k]
    sources = json.loads((data / "split.json").read_text()).get("test_sources", [])
    rows = [{"id": int(ids[i]), "label": int(y[i]), "p_dog": float(p[i]), "loss": float(losses[i]),
             "source": sources[int(ids[i]) - 1] if 0 < int(ids[i]) <= len(sources) else None}
            for i in order]
    rest = np.delete(losses, order)
    return {"k": int(order.size), "share": float(losses[order].sum() / losses.sum()),
            "mean_without": float(rest.mean()) if rest.size else float("nan"), "photos": rows}


def plot_worst(worst: dict, path: Path, thumb: int = 160) -> Path:
    """A contact sheet (PNG) of :func:`worst_photos`, each captioned with label, P(dog), loss."""
    from PIL import Image

    from catsdogs.dataset.images import decode_rgb, read_image_file
    from catsdogs.evaluation.plots import pyplot, save_png

    plt = pyplot()
    photos = worst["photos"]
    cols = min(5, max(1, len(photos)))
    rows = -(-len(photos) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 3.1 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, ph in zip(axes.flat, photos):
        im = Image.fromarray(decode_rgb(read_image_file(ph["source"])))
        im.thumbnail((thumb, thumb))
        ax.imshow(np.asarray(im))
        name = "/".join(Path(ph["source"]).parts[-2:])
        ax.set_title(f"{name}\nlabel {'dog' if ph['label'] else 'cat'}, P(dog) {ph['p_dog']:.4f}\n"
                     f"loss {ph['loss']:.2f}", fontsize=7, loc="left")
    fig.suptitle(f"the {worst['k']} worst test photos: {100 * worst['share']:.0f}% of the total loss "
                 f"(mean without them {worst['mean_without']:.4f})", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    save_png(fig, path, dpi=90)
    return path


def read_predictions(path: Path, ids: np.ndarray) -> np.ndarray:
    """P(dog) of ``path`` (a submission CSV ``id,label``) for ``ids``, in that order."""
    import pandas as pd

    df = pd.read_csv(path)
    series = pd.Series(df["label"].to_numpy(float), index=df["id"].to_numpy(np.int64))
    missing = np.setdiff1d(ids, series.index.to_numpy())
    if missing.size:
        sys.exit(f"Error: {path}: no prediction for {missing.size} test ids (e.g. {missing[:5].tolist()})")
    return series.reindex(ids).to_numpy()


def paired(y: np.ndarray, p: np.ndarray, p_base: np.ndarray, n_boot: int, seed: int) -> dict:
    """Mean loss difference ``p - p_base`` and its bootstrap standard error over the photos."""
    d = _losses(y, p) - _losses(y, p_base)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, d.size, size=(n_boot, d.size))
    boots = d[idx].mean(axis=1)
    return {"diff": float(d.mean()), "se": float(boots.std(ddof=1)),
            "ci95": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))],
            "se_analytic": float(d.std(ddof=1) / np.sqrt(d.size))}


def bootstrap_se(losses: np.ndarray, n_boot: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    return float(losses[rng.integers(0, losses.size, size=(n_boot, losses.size))].mean(axis=1).std(ddof=1))


# ------------------------------------------------------------------------------------ running
def output_dir(work: Path, data: Path, experiment_file: Path, only: list[str] | None) -> Path:
    digest = hashlib.sha256(experiment_file.read_bytes()).hexdigest()[:8]
    tag = "" if not only else "-only-" + "+".join(only)
    return work / "runs" / data.name / f"{experiment_file.stem}-{digest}{tag}"


def run(experiment_file: Path, data: Path, work: Path, cache_dir: Path, top: int,
        only: list[str] | None = None, share: bool = True, progress: bool = True) -> dict:
    import catsdogs

    out = output_dir(work, data, experiment_file, only)
    others = sorted(p for p in out.parent.iterdir() if p.is_dir() and p != out) \
        if share and out.parent.is_dir() else []
    experiment = catsdogs.load_experiment(experiment_file, data=data, output=out, cache_dir=cache_dir)
    if only:  # the experiment's grid restricted to these backbones
        unknown = set(only) - set(experiment.backbone_names)
        if unknown:
            sys.exit(f"Error: --only-backbones: {', '.join(sorted(unknown))} not in {experiment_file}")
        experiment.backbones = [b for b in experiment.backbones if b.name in only]
        experiment.combinations = [c for c in experiment.combinations if set(c) <= set(only)]
    t0, c0 = time.perf_counter(), time.process_time()
    import contextlib

    with contextlib.redirect_stdout(sys.stderr):  # the run's own report: stdout stays this one's
        result = catsdogs.run_experiment(experiment, progress=progress, reuse_from=others,
                                         echo=lambda s: print(s, file=sys.stderr, flush=True))
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    if result.submission is None:
        sys.exit(f"Error: {experiment_file}: the run wrote no submission")
    board = result.leaderboard()
    cols = [c for c in ("run_id", "val_logloss_post", "test_logloss", "test_logloss_raw")
            if c in board.columns]
    groups = {}
    if "test_logloss_raw" in board.columns:  # each head / optimizer: its runs' raw test losses
        for (head, opt), rows in board.groupby(["head", "optimizer"], sort=False):
            losses = rows["test_logloss_raw"].astype(float)
            groups[f"{head}/{opt or '-'}"] = {"runs": int(len(rows)), "mean": float(losses.mean()),
                                               "best": float(losses.min())}
    return {"experiment": str(experiment_file), "out": str(out), "submission": str(result.submission),
            "by_head_optimizer": groups,
            "winner": result.winner.run_id, "runs": len(result.records),
            "trained_now": result.computed, "reused": result.reused, "seconds": round(seconds, 1),
            "cpu_seconds": round(cpu_seconds, 1),  # this process, all its threads
            "training_seconds": round(sum(r.seconds for r in result.records), 1),
            "features": result.feature_files,
            **({"predicting_features": result.predicting_files} if result.predicting_files else {}),
            "top": board[cols].head(top).to_dict(orient="records")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiment", type=Path, nargs="?")
    base = ap.add_mutually_exclusive_group()
    base.add_argument("--baseline", type=Path, help="baseline experiment file, run the same way")
    base.add_argument("--baseline-predictions", type=Path, help="baseline submission CSV (id,label)")
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK)
    ap.add_argument("--cache-dir", type=Path, default=None, help="feature cache (default WORK/cache)")
    ap.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS)
    ap.add_argument("--seed", default="2019",
                    help="the split's seed, or several, comma-separated (each split measured)")
    ap.add_argument("--n-test", type=int, default=5000)
    ap.add_argument("--n-train", type=int, default=None,
                    help="training photos (default: all the others, ~20,000)")
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--top", type=int, default=5, help="leaderboard rows to report")
    ap.add_argument("--only-backbones", default=None,
                    help="comma-separated: run the experiments' grids on these backbones only")
    ap.add_argument("--worst", type=int, default=10,
                    help="report the K test photos with the largest loss and draw them in "
                         "OUT/worst-test-photos.png (0: neither)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--no-progress", action="store_true",
                    help="no progress on stderr (a bar on a terminal; in a file, a line at most "
                         "every CATSDOGS_PROGRESS_INTERVAL seconds, 30 unless set)")
    ap.add_argument("--prepare-only", action="store_true")
    ap.add_argument("--no-share-runs", action="store_true",
                    help="train every run here, copying none from the split's other outputs")
    args = ap.parse_args(argv)
    try:
        seeds = [int(v) for v in str(args.seed).split(",") if v.strip()]
    except ValueError:
        ap.error(f"--seed: comma-separated integers, got {args.seed!r}")
    if not seeds:
        ap.error("--seed: at least one seed")

    work = args.work.expanduser().resolve()
    cache = (args.cache_dir or work / "cache").expanduser().resolve()
    splits = [prepare(args.photos.expanduser(), work, seed, args.n_test, args.n_train) for seed in seeds]
    if args.prepare_only:
        return 0
    if args.experiment is None:
        ap.error("EXPERIMENT.yaml is required (or --prepare-only)")
    if args.baseline_predictions is not None and len(seeds) > 1:
        ap.error("--baseline-predictions: one split's submission; with several --seed values "
                 "use --baseline")
    reports = [measure(args, seed, data, work, cache) for seed, data in zip(seeds, splits)]
    if len(reports) == 1:
        report = reports[0]
    else:
        report = {"splits": reports, "seeds": seeds}
        if all("paired" in r for r in reports):
            diffs = [r["paired"]["diff"] for r in reports]
            report["pooled"] = {"diff": float(np.mean(diffs)),
                                "se": float(np.sqrt(sum(r["paired"]["se"] ** 2 for r in reports))
                                            / len(reports)),
                                "note": "mean of the splits' paired differences; its SE treats "
                                        "the splits as independent (they share photos: a lower "
                                        "bound)"}
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    for seed, r in zip(seeds, reports):
        if len(reports) > 1:
            print(f"split seed {seed}: {r['data']}")
        print_report(args, r)
    if "pooled" in report:
        d = report["pooled"]
        print(f"over the {len(seeds)} splits: mean paired difference {d['diff']:+.5f} ± {d['se']:.5f} "
              "(SE as if the splits were independent: a lower bound)")
    return 0


def measure(args, seed: int, data: Path, work: Path, cache: Path) -> dict:
    """The report of one split: the experiment's submission scored, and the baseline's."""
    import pandas as pd

    truth = pd.read_csv(data / "test_labels.csv")
    ids, y = truth["id"].to_numpy(np.int64), truth["label"].to_numpy(float)
    report: dict = {"data": str(data), "seed": seed, "n_test": int(y.size), "cache": str(cache)}
    only = args.only_backbones.split(",") if args.only_backbones else None
    share = not args.no_share_runs
    report["run"] = run(args.experiment.resolve(), data, work, cache, args.top, only, share,
                        not args.no_progress)
    p = read_predictions(Path(report["run"]["submission"]), ids)
    losses = _losses(y, p)
    report["run"].update(test_logloss=float(losses.mean()),
                         test_logloss_se=bootstrap_se(losses, args.bootstrap, seed),
                         test_accuracy=float(np.mean((p > 0.5) == (y == 1))))
    if args.worst > 0:
        worst = worst_photos(y, p, ids, data, args.worst)
        worst["png"] = str(plot_worst(worst, Path(report["run"]["out"]) / "worst-test-photos.png"))
        report["run"]["worst"] = worst
    base_path = args.baseline_predictions
    if args.baseline is not None:
        report["baseline"] = run(args.baseline.resolve(), data, work, cache, args.top, only,
                                 share, not args.no_progress)
        base_path = Path(report["baseline"]["submission"])
    if base_path is not None:
        pb = read_predictions(base_path, ids)
        report.setdefault("baseline", {"submission": str(base_path)})
        report["baseline"]["test_logloss"] = float(_losses(y, pb).mean())
        report["paired"] = paired(y, p, pb, args.bootstrap, seed)
    return report


def print_report(args, report: dict) -> None:
    r, n = report["run"], report["n_test"]
    print(f"{args.experiment}: winner {r['winner']} ({r['runs']} runs, {r['trained_now']} trained now, "
          f"{r['seconds']:.0f} s, {r['cpu_seconds']:.0f} CPU s)")
    print(f"  submitted test log loss {r['test_logloss']:.5f} ± {r['test_logloss_se']:.5f} "
          f"(bootstrap SE), accuracy {r['test_accuracy']:.4f}, {n} photos")
    if "worst" in r:
        w = r["worst"]
        print(f"  the {w['k']} worst photos carry {100 * w['share']:.0f}% of it (mean without them "
              f"{w['mean_without']:.5f}); see {w['png']}")
    for group, g in r["by_head_optimizer"].items():
        print(f"    {group}: {g['runs']} runs, raw test log loss mean {g['mean']:.5f}, best {g['best']:.5f}")
    for row in r["top"]:
        print("   ", "  ".join(f"{k}={v:.5f}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in row.items()))
    if "paired" in report:
        d = report["paired"]
        print(f"  baseline {report['baseline']['submission']}: {report['baseline']['test_logloss']:.5f}; "
              f"difference {d['diff']:+.5f} ± {d['se']:.5f} (paired bootstrap SE, "
              f"95% [{d['ci95'][0]:+.5f}, {d['ci95'][1]:+.5f}])")


if __name__ == "__main__":
    raise SystemExit(main())
