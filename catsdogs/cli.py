"""The ``catsdogs`` command line: a thin layer over the Python API.

Errors the user can fix (:class:`catsdogs.errors.CatsdogsError`) are printed as one ``Error:`` line
with exit status 1; usage errors exit with 2. Neither prints a traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before anything imports TensorFlow

import click  # noqa: E402

from . import __version__  # noqa: E402
from .errors import CatsdogsError  # noqa: E402


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CatsdogsError as exc:
            raise click.ClickException(str(exc)) from None


def _setup_logging(verbose: bool) -> None:
    logger = logging.getLogger("catsdogs")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="catsdogs")
@click.option("-v", "--verbose", is_flag=True, help="More log output.")
def cli(verbose: bool) -> None:
    """Transfer-learning ensembles for Dogs vs. Cats: cached backbone features, fused heads."""
    _setup_logging(verbose)


# ------------------------------------------------------------------------------------ plugins
@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins(as_json: bool) -> None:
    """List installed plugins and the components they register."""
    from .plugins import KINDS, get_registry

    registry = get_registry()
    if as_json:
        click.echo(json.dumps(registry.to_dict(), indent=2))
        return
    for info in registry.plugins:
        version = info.version or "?"
        status = f"  FAILED: {info.error}" if info.error else ""
        click.echo(f"{info.name} {version} ({info.source}){status}")
        for kind in KINDS:
            if info.components[kind]:
                click.echo(f"    {kind}: {', '.join(info.components[kind])}")
    for kind, clashes in registry.conflicts.items():
        for name, owners in clashes.items():
            click.echo(f"CONFLICT: {kind[:-1]} {name!r} registered by {' and '.join(owners)}")


# ------------------------------------------------------------------------------------ extract
@cli.command()
@click.argument("data_dir", type=click.Path(path_type=Path))
@click.option("--backbone", "-b", "backbones", multiple=True, required=True,
              help="Backbone name (repeatable); see `catsdogs plugins`.")
@click.option("--weights", default="imagenet", show_default=True,
              help="'imagenet' (pretrained; downloads once) or 'none' (seeded random, offline).")
@click.option("--image-size", type=click.IntRange(min=1), default=None,
              help="Square input size [default: the backbone's own].")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
              help="Feature cache [default: $CATSDOGS_CACHE_DIR or ~/.cache/catsdogs].")
@click.option("--flip", is_flag=True, help="Also store features of horizontally flipped images (TTA).")
@click.option("--precision", type=click.Choice(["float32", "bfloat16"]), default="float32",
              show_default=True, help="Compute precision; bfloat16 is cached under its own key.")
@click.option("--resize", type=click.Choice(["squash", "crop", "pad"]), default="squash",
              show_default=True, help="squash to SxS (the write-up), centre-crop, or letterbox.")
@click.option("--chunk-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Images per durable chunk (a kill loses at most one chunk).")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True,
              help="Image decoding threads.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON.")
def extract(data_dir, backbones, weights, image_size, batch_size, cache_dir, flip, precision, resize,
            chunk_size, workers, no_progress, as_json) -> None:
    """Compute (or reuse) cached GAP features of DATA_DIR's train and test images."""
    from .features import extract as run_extract

    results = run_extract(
        data_dir, list(backbones), weights=weights, image_size=image_size, batch_size=batch_size,
        cache_dir=cache_dir, flip=flip, precision=precision, resize=resize, chunk_size=chunk_size,
        workers=workers, progress=not no_progress,
    )
    if as_json:
        click.echo(json.dumps([
            {
                "backbone": r.backbone, "path": str(r.path), "n_train": r.n_train, "n_test": r.n_test,
                "computed": r.computed, "reused": r.reused, "seconds": round(r.seconds, 3),
                "images_per_second": r.images_per_second,
                "skipped": [{"file": f, "reason": why} for f, why in r.skipped],
                "config": {k: getattr(r.config, k) for k in r.config.__dataclass_fields__},
            }
            for r in results
        ], indent=2))
        return
    for r in results:
        speed = f", {r.images_per_second:.1f} images/s" if r.images_per_second else ""
        click.echo(
            f"{r.backbone}: {r.n_train} train + {r.n_test} test rows "
            f"({r.computed} computed, {r.reused} cached{speed}; {r.seconds:.1f}s) -> {r.path}"
        )


# ------------------------------------------------------------------------------------ run
@cli.command()
@click.argument("experiment_file", type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(path_type=Path), default=None, help="Override the data directory.")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None, help="Override the feature cache.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Override the output directory.")
@click.option("--weights", default=None,
              help="Override every backbone's weights (e.g. 'none' on a machine without internet).")
@click.option("--no-submit", is_flag=True, help="Do not write submission.csv for the winner.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def run(experiment_file, data, cache_dir, out, weights, no_submit, no_progress) -> None:
    """Run (or resume) every run of an experiment grid and rank them by validation log loss."""
    from .experiment import load_experiment
    from .runner import run_experiment

    experiment = load_experiment(experiment_file, data=data, output=out, cache_dir=cache_dir,
                                 weights=weights)
    result = run_experiment(experiment, progress=not no_progress, submit=not no_submit, echo=click.echo)
    click.echo(f"{result.computed} runs trained, {result.reused} reused -> {result.out_dir}")
    click.echo(f"leaderboard: {result.out_dir / 'leaderboard.csv'}, summary: {result.out_dir / 'summary.md'}")
    if result.submission is not None:
        click.echo(f"submission ({result.winner['run_id']}): {result.submission}")


@cli.command("predict-test")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--out", "out_file", type=click.Path(path_type=Path), default=Path("submission.csv"),
              show_default=True, help="Where to write the submission.")
@click.option("--clip", nargs=2, type=float, default=None, metavar="LO HI",
              help="Clip bounds [default: the run's experiment's].")
def predict_test(run_dir, out_file, clip) -> None:
    """Write Kaggle's submission.csv (id,label) from a finished run's test predictions."""
    from .runner import write_run_submission

    path = write_run_submission(run_dir, out_file, clip=clip)
    click.echo(f"wrote {path}")


@cli.command()
@click.argument("submission", type=click.Path(path_type=Path))
@click.option("--labels", type=click.Path(path_type=Path), required=True,
              help="CSV with id,label (the true labels; e.g. test_labels.csv of the mini data).")
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON.")
def score(submission, labels, as_json) -> None:
    """Score a submission against true labels: log loss and accuracy."""
    from .submission import score_submission

    result = score_submission(submission, labels)
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"log loss {result['logloss']:.5f}  accuracy {result['accuracy']:.4f}  (n = {result['n']})")


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="catsdogs")


if __name__ == "__main__":  # pragma: no cover
    main()
