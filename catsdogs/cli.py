"""The ``catsdogs`` command line: a thin layer over the Python API.

Errors the user can fix (:class:`catsdogs.errors.CatsdogsError`) are printed as one ``Error:`` line
with exit status 1; usage errors exit with 2. Neither prints a traceback.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before anything imports TensorFlow

import click  # noqa: E402

from catsdogs._version import __version__  # noqa: E402
from catsdogs.engine import click_options as engine_options  # noqa: E402
from catsdogs.errors import CatsdogsError  # noqa: E402
from catsdogs.util.tf_log import quiet_tensorflow_import  # noqa: E402

quiet_tensorflow_import()  # TensorFlow's absl start-up lines held to TF_CPP_MIN_LOG_LEVEL too

#: OS errors about a path the user gave (a file where a folder must be, no permission, read-only
#: or full disk): one ``Error:`` line naming the path, not a traceback
_PATH_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST,
                          errno.EISDIR, errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG})


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CatsdogsError as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:
            if exc.errno not in _PATH_ERRNOS or not exc.filename:
                raise
            raise click.ClickException(
                f"{exc.filename}: {exc.strerror}; check that this path (and its --out, --cache-dir "
                "or other folder) is a writable folder, not a file") from None


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
    """List installed plugins and the components they register; components whose extra is
    missing are marked unavailable (with the command that installs it), extras listed last."""
    from catsdogs.plugins import KINDS, get_registry
    from catsdogs.util.extras import extras_status, unavailable_reason

    registry = get_registry()
    unavailable = {(c.kind, c.name): reason for kind in KINDS for c in registry.components(kind)
                   if (reason := unavailable_reason(c.obj, f"{kind[:-1]} {c.name!r}"))}
    extras = extras_status()
    if as_json:
        listing = registry.to_dict()
        for kind in KINDS:
            for entry in listing[kind]:
                if isinstance(entry.get("name"), str) and "error" not in entry:
                    entry["unavailable"] = unavailable.get((kind, entry["name"]))
        listing["extras"] = extras
        click.echo(json.dumps(listing, indent=2))
        return
    for info in registry.plugins:
        version = info.version or "?"
        status = ("  DISABLED (CATSDOGS_DISABLE_PLUGINS)" if info.disabled
                  else f"  FAILED: {info.error}" if info.error else "")
        click.echo(f"{info.name} {version} ({info.source}){status}")
        for kind in KINDS:
            if info.components[kind]:
                names = [n + (" (unavailable)" if (kind, n) in unavailable else "")
                         for n in info.components[kind]]
                click.echo(f"    {kind}: {', '.join(names)}")
    for kind, clashes in registry.conflicts.items():
        for name, owners in clashes.items():
            click.echo(f"CONFLICT: {kind[:-1]} {name!r} registered by {' and '.join(owners)}")
    for reason in unavailable.values():
        click.echo(f"UNAVAILABLE: {reason}")
    backbones = [b for b in registry.to_dict()["backbones"] if "error" not in b]
    for label, chosen in (
            ("own ImageNet classifier (imagenet_prior, audit)", [b for b in backbones if b["classifier"]]),
            ("top split (finetune)", [b for b in backbones if b["top_split"]]),
            ("weights downloaded on first use", [b for b in backbones
                                                 if set(b["weights"]) - set(b["weights_at_hand"])])):
        if chosen:
            click.echo(f"{label}: {', '.join(b['name'] for b in chosen)}")
    click.echo("extras: " + ", ".join(
        f"{extra} ({'installed' if s['installed'] else 'missing'})" for extra, s in extras.items()))


# ------------------------------------------------------------------------------------ schema
@cli.command()
def schema() -> None:
    """Print the JSON Schema of experiment files (for editors: yaml-language-server etc.)."""
    from catsdogs.experiment.schema import json_schema

    click.echo(json.dumps(json_schema(), indent=2))


#: DATA_DIR: a local folder, or an object-store URL (s3://, gs://, az://: the photos are read
#: from the bucket, the cache and every output stay local; see catsdogs.dataset.storage). Kept as
#: text: a pathlib.Path would fold the URL's "//".
DATA_DIR = click.STRING


# ------------------------------------------------------------------------------------ extract
@cli.command()
@click.argument("data_dir", type=DATA_DIR)
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
@click.option("--precision", type=click.Choice(["float32", "bfloat16", "int8"]), default="float32",
              show_default=True,
              help="Compute precision, cached under its own key; int8 (post-training quantised, "
                   "needs `pip install 'catsdogs[int8]'`).")
@click.option("--calibration-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="int8: training images (a fixed seeded sample) the quantisation is calibrated on; "
                   "once per backbone configuration and data set (the quantised model is cached).")
@click.option("--recalibrate", is_flag=True,
              help="int8: calibrate again on the current training images instead of reusing the "
                   "cached quantised model.")
@click.option("--runtime", type=click.Choice(["tensorflow", "openvino"]), default="tensorflow",
              show_default=True,
              help="What computes float32 features: TensorFlow, or the same network converted to "
                   "OpenVINO (faster on CPU, cached under its own key; needs `pip install "
                   "'catsdogs[int8]'`). int8 always runs on OpenVINO.")
@click.option("--resize", type=click.Choice(["squash", "crop", "pad"]), default="squash",
              show_default=True, help="squash to SxS (the write-up), centre-crop, or letterbox.")
@click.option("--chunk-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Images per durable chunk (a kill loses at most one chunk).")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True,
              help="Image decoding threads.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON.")
@engine_options
def extract(data_dir, backbones, weights, image_size, batch_size, cache_dir, flip, precision,
            calibration_size, recalibrate, runtime, resize, chunk_size, workers, no_progress,
            as_json, engine, ray_address, ray_shared_data) -> None:
    """Compute (or reuse) cached GAP features of DATA_DIR's train and test images."""
    from catsdogs.engine import engine_spec, open_engine
    from catsdogs.features.extraction import extract as run_extract

    with open_engine(engine_spec(engine, ray_address, ray_shared_data)) as compute_engine:
        results = run_extract(
            data_dir, list(backbones), weights=weights, image_size=image_size, batch_size=batch_size,
            cache_dir=cache_dir, flip=flip, precision=precision, resize=resize, chunk_size=chunk_size,
            workers=workers, progress=not no_progress, calibration_size=calibration_size,
            recalibrate=recalibrate, runtime=runtime,
            engine=compute_engine,
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
@click.option("--data", type=DATA_DIR, default=None,
              help="Override the data directory (a path or an s3:// gs:// az:// URL).")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None, help="Override the feature cache.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Override the output directory.")
@click.option("--weights", default=None,
              help="Override every backbone's weights (e.g. 'none' on a machine without internet).")
@click.option("--no-submit", is_flag=True, help="Do not write submission.csv for the winner.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@click.option("--track", default=None, is_flag=False, flag_value="", metavar="[URI]",
              help="Log the grid to MLflow (needs catsdogs[tracking]) at URI, or without URI in a "
                   "SQLite store next to the output directory.")
@click.option("--track-required", is_flag=True,
              help="Fail when MLflow cannot be used (default: warn and run untracked).")
@click.option("--reuse-from", "reuse_from", multiple=True, metavar="OUT_DIR",
              type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="Another experiment's output folder (repeatable): a run finished there with the "
                   "same settings is copied, not trained again.")
@engine_options
def run(experiment_file, data, cache_dir, out, weights, no_submit, no_progress, track, track_required,
        reuse_from, engine, ray_address, ray_shared_data) -> None:
    """Run (or resume) every run of an experiment grid and rank them by validation log loss."""
    from catsdogs.engine import engine_spec
    from catsdogs.experiment.spec import load_experiment
    from catsdogs.runs.runner import run_experiment
    from catsdogs.tracking import with_tracking

    experiment = load_experiment(experiment_file, data=data, output=out, cache_dir=cache_dir,
                                 weights=weights)
    experiment = with_tracking(experiment, track, track_required)
    compute = engine_spec(engine, ray_address, ray_shared_data, experiment.engine,
                          experiment.ray_address)
    result = run_experiment(experiment, progress=not no_progress, submit=not no_submit, echo=click.echo,
                            engine=compute, reuse_from=reuse_from)
    click.echo(f"{result.computed} runs trained, {result.reused} reused -> {result.out_dir}")
    click.echo(f"leaderboard: {result.out_dir / 'leaderboard.csv'}, summary: {result.out_dir / 'summary.md'}")
    if result.submission is not None:
        click.echo(f"submission ({result.winner.run_id}): {result.submission}")


@cli.command("predict-test")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--out", "out_file", type=click.Path(path_type=Path), default=Path("submission.csv"),
              show_default=True, help="Where to write the submission.")
@click.option("--clip", nargs=2, type=float, default=None, metavar="LO HI",
              help="Clip bounds instead of the run's post-processing [default: the transform "
                   "recorded with the run (learned clip, temperature, none, or the fixed clip)].")
def predict_test(run_dir, out_file, clip) -> None:
    """Write Kaggle's submission.csv (id,label) from a finished run's test predictions."""
    from catsdogs.runs.submission import write_run_submission

    path = write_run_submission(run_dir, out_file, clip=clip)
    click.echo(f"wrote {path}")


@cli.command()
@click.argument("submission", type=click.Path(path_type=Path))
@click.option("--labels", type=click.Path(path_type=Path), required=True,
              help="CSV with id,label (the true labels; e.g. test_labels.csv of the mini data).")
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON.")
def score(submission, labels, as_json) -> None:
    """Score a submission against true labels: log loss and accuracy."""
    from catsdogs.runs.submission import score_submission

    result = score_submission(submission, labels)
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"log loss {result['logloss']:.5f}  accuracy {result['accuracy']:.4f}  (n = {result['n']})")



# ------------------------------------------------------------------------------------ export / predict
#: ``catsdogs.app.predict.BACKENDS``, written here so that ``--help`` imports no app module
#: (tests/test_predict.py checks that they agree)
BACKENDS = ["auto", "openvino", "tflite", "tflite-int8", "keras"]

@cli.command("export")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--format", "formats", default=None,
              help="Comma-separated formats: keras, coreml, tflite, tflite-int8 (full-integer), "
                   "openvino (an int8 run's own quantised networks + its heads: what it submitted) "
                   "[default: keras,coreml,tflite, and openvino for a run extracted in int8].")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output directory [default: RUN_DIR/export].")
@click.option("--coreml-precision", type=click.Choice(["float16", "float32"]), default="float16",
              show_default=True, help="Core ML compute precision (float16 runs on the Neural Engine).")
@click.option("--no-neither", is_flag=True, help="Leave out the neither-cat-nor-dog score.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def export_cmd(run_dir, formats, out, coreml_precision, no_neither, as_json) -> None:
    """Export a finished run as one end-to-end model (image -> P(dog)): Keras, Core ML, TFLite."""
    from catsdogs.app.export import export_run

    manifest = export_run(run_dir, formats, out, coreml_precision=coreml_precision,
                          neither=not no_neither)
    if as_json:
        click.echo(json.dumps(manifest, indent=2))
        return
    out_dir = Path(out) if out is not None else Path(run_dir) / "export"
    images = ", ".join(f"{i['name']} {i['size']}x{i['size']}" for i in manifest["inputs"])
    click.echo(f"{manifest['run_id']}: input {images} RGB 0-255 ({manifest['input']['resize']}), "
               f"output P(dog) = the run's submitted prediction ({manifest['postprocess']['describe']}"
               f"{', TTA' if manifest['tta'] else ''}{', refitted head' if manifest['refit'] else ''}"
               f"{', ensemble of ' + str(len(manifest['members'])) if manifest['blend'] else ''}); "
               f"ranking validation log loss {manifest['ranking_logloss']:.5f}")
    for kind, files in manifest["models"].items():
        for fmt, entry in files.items():
            click.echo(f"  {kind:<10} {fmt:<7} {out_dir / entry['file']}  ({entry['bytes'] / 1e6:.1f} MB)")
    if manifest.get("neither"):
        click.echo(f"  neither-cat-nor-dog threshold {manifest['neither']['threshold']:.4f}")
    for note in manifest["notes"]:
        click.echo(f"  note: {note}")
    vs = manifest.get("float32_vs_run") or {}
    if vs.get("n"):
        click.echo(f"  float32 graph vs the run on {vs['n']} validation photos: max |dP(dog)| "
                   f"{vs['max_abs_dp']:.4f}, mean {vs['mean_abs_dp']:.4f}, labels agree "
                   f"{100 * vs['label_agreement']:.1f} %")
    click.echo(f"manifest: {out_dir / 'export.json'}")


@cli.command("predict")
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--model", "model_path", required=True, type=click.Path(path_type=Path),
              help="An export directory or a finished run directory.")
@click.option("--cam", "cam_out", type=click.Path(path_type=Path), default=None,
              help="Write the CAM overlay PNG here (several images: OUT-<image name>.png).")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
              help="auto: openvino when exported (an int8 run's own networks), else TFLite when "
                   "exported, else Keras (a run directory of an int8 run: its own networks).")
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON.")
def predict_cmd(images, model_path, cam_out, backend, as_json) -> None:
    """Print P(dog), the label and the neither-cat-nor-dog flag for each IMAGE."""
    from catsdogs.app.cam import cam_picture, save_png
    from catsdogs.app.predict import open_predictor, predict_files

    predictor = open_predictor(model_path, backend)
    if cam_out is not None and not predictor.cam_capable:
        raise click.ClickException(
            f"--cam needs a CAM-capable model (a softmax_cam head on one backbone); {model_path} "
            "has none")
    written = {}

    def draw(pred, photo, image):
        if cam_out is None:
            return
        path = cam_out if len(images) == 1 else \
            cam_out.with_name(f"{cam_out.stem}-{Path(pred.file).stem}{cam_out.suffix or '.png'}")
        picture, _, _ = cam_picture(predictor, photo, image)
        written[pred.file] = str(save_png(path, picture))

    results = predict_files(predictor, images, on_photo=draw)
    for r in results:
        if r.error:
            click.echo(r.describe(), err=True)
    if as_json:
        rows = [{**r.to_dict(), **({"cam": written[r.file]} if r.file in written else {})}
                for r in results]
        click.echo(json.dumps(rows, indent=2))
    else:
        for r in results:
            if not r.error:
                click.echo(r.describe() + (f" -> CAM {written[r.file]}" if r.file in written else ""))
    failed = sum(1 for r in results if r.error)
    if failed:
        raise click.ClickException(f"{failed} of {len(results)} images could not be read (each "
                                   "is named above with the reason)")


@cli.command("cam")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--grid", type=click.IntRange(min=1, max=100), default=16, show_default=True,
              help="Number of random test images.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("cam_grid.png"), show_default=True)
@click.option("--seed", type=int, default=2019, show_default=True)
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True)
def cam_cmd(run_dir, grid, out, seed, backend) -> None:
    """Draw a grid of CAM overlays on random test images of RUN_DIR's data, titled 'dog 98.20%'."""
    from catsdogs.app.cam import cam_grid, sample_photos
    from catsdogs.app.export import load_manifest, load_run
    from catsdogs.app.predict import open_predictor
    from catsdogs.errors import DataError

    run = run_dir
    if not (Path(run_dir) / "record.json").is_file() and (Path(run_dir) / "export.json").is_file():
        run = Path(load_manifest(run_dir)["run_dir"])
    info = load_run(run)
    if not info.cam_capable:
        raise DataError(f"run {info.run_id!r} is not CAM-capable: class activation maps need a "
                        "softmax_cam head on one backbone")
    predictor = open_predictor(run_dir, backend)
    paths = sample_photos(info.experiment["data"], grid, seed)
    path, skipped = cam_grid(predictor, paths, out)
    for line in skipped:
        click.echo(line, err=True)
    click.echo(f"wrote {path} ({len(paths) - len(skipped)} images)")
    if skipped:
        sys.exit(1)

# ------------------------------------------------------------------------------------ serve
@cli.command("serve")
@click.argument("model", metavar="RUN_OR_EXPORT", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--max-upload-mb", type=click.FloatRange(min=0, min_open=True), default=10.0,
              show_default=True, help="Largest photo accepted (bigger: HTTP 413).")
@click.option("--max-files", type=click.IntRange(min=1), default=16, show_default=True,
              help="Most photos in one request.")
@click.option("--concurrency", "--workers", "concurrency", type=click.IntRange(min=1), default=2,
              show_default=True, help="Photos predicted at once (model copies, threads of one "
                                      "process).")
def serve_cmd(model, host, port, max_upload_mb, max_files, concurrency) -> None:
    """Serve RUN_OR_EXPORT as a web page and an HTTP API (needs catsdogs[serve]). A run directory
    without an export is exported to RUN/export first (TFLite; and openvino for an int8 run)."""
    from catsdogs.app.serve import Limits, serve

    limits = Limits.from_mb(max_upload_mb, max_files)
    serve(model, host, port, concurrency, limits, echo=click.echo)


# ------------------------------------------------------------------------------------ audit
@cli.command("audit")
@click.argument("data_dir", type=DATA_DIR)
@click.option("--out", type=click.Path(path_type=Path), default=Path("audit"), show_default=True,
              help="Output folder: audit.csv, audit_all.csv, report.md, sizes/colour/flagged PNGs.")
@click.option("--classifier", default=None,
              help="Backbone with an ImageNet classifier [default: the first installed whose "
                   "classifier weights need no download, e.g. efficientnet_lite0; else the first].")
@click.option("--top-k", type=click.IntRange(1, 1000), default=10, show_default=True,
              help="Flag a cat (dog) photo with no cat (dog) ImageNet class among its top k.")
@click.option("--min-side", type=click.IntRange(min=1), default=50, show_default=True,
              help="Flag images with a side shorter than this (px).")
@click.option("--write-exclude", type=click.Path(path_type=Path), default=None,
              help="Also write the flagged files' relative paths here (for `exclude:` in an experiment).")
@click.option("--weights", default="imagenet", show_default=True,
              help="Classifier weights: 'imagenet', or 'none' (seeded random; tests only).")
@click.option("--image-size", type=click.IntRange(min=1), default=None,
              help="Classifier input size [default: the backbone's own].")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--label-issues", is_flag=True,
              help="Also rank images by how likely their label is wrong (cleanlab on out-of-fold "
                   "predictions of a logistic regression on cached features).")
@click.option("--backbone", "label_backbone", default=None,
              help="Features for --label-issues [default: the classifier's backbone].")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
              help="Feature cache for --label-issues [default: $CATSDOGS_CACHE_DIR or ~/.cache/catsdogs].")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print counts and files as JSON.")
@engine_options
def audit_cmd(data_dir, out, classifier, top_k, min_side, write_exclude, weights, image_size,
              batch_size, label_issues, label_backbone, cache_dir, no_progress, as_json, engine,
              ray_address, ray_shared_data) -> None:
    """Flag suspicious training images of DATA_DIR (tiny, colour outliers, not a cat/dog to
    ImageNet, unreadable; with --label-issues, probably mislabelled). Nothing is deleted."""
    from catsdogs.audit.checks import audit
    from catsdogs.engine import engine_spec, open_engine

    with open_engine(engine_spec(engine, ray_address, ray_shared_data)) as compute_engine:
        result = audit(data_dir, out, classifier=classifier, top_k=top_k, min_side=min_side,
                       weights=weights, image_size=image_size, batch_size=batch_size,
                       write_exclude=write_exclude, label_issues=label_issues,
                       label_backbone=label_backbone, cache_dir=cache_dir, progress=not no_progress,
                       engine=compute_engine)
    n_train = sum(1 for a in result.images if a.label)
    if as_json:
        click.echo(json.dumps({
            "data_dir": str(result.data_dir), "n_train": n_train, "classifier": result.classifier,
            "weights": result.weights, "image_size": result.image_size, "top_k": result.top_k,
            "min_side": result.min_side, "counts": result.counts, "seconds": round(result.seconds, 3),
            "classifier_seconds": round(result.classifier_seconds, 3),
            "files": {k: str(v) for k, v in result.files.items()},
        }, indent=2))
        return
    counts = result.counts
    click.echo(f"{result.data_dir}: {n_train} training images audited with {result.classifier} "
               f"({result.weights}, top-{result.top_k}) in {result.seconds:.1f}s")
    shown = ("tiny", "colour_outlier", "imagenet_mismatch", "unreadable") + \
        (("label_issue",) if label_issues else ()) + ("any",)
    for check in shown:
        click.echo(f"  {check:<18} {counts[check]}")
    click.echo(f"report: {result.files['report']}, flagged: {result.files['csv']}")
    if "exclude" in result.files:
        click.echo(f"exclude list ({counts['any']} files): {result.files['exclude']}")


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="catsdogs")


if __name__ == "__main__":  # pragma: no cover
    main()
