"""Audit the training images before training: find the ones a person may want to leave out.

The write-up (section 2.1) hunted bad training images by hand; :func:`audit` does the same checks
in one repeatable pass over the training images of a data directory:

``tiny``
    a side shorter than ``min_side`` pixels (default 50).
``colour_outlier``
    the **colour statistic** -- the number of distinct RGB colours per pixel of the image squashed
    to 64x64 (:data:`COLOUR_SIZE`, Pillow's antialiased bilinear filter, as in
    :func:`catsdogs.dataset.images.resize`), so that images of every size are comparable; 1.0 means every
    pixel has its own colour, 1/4096 a flat single-colour image -- lies outside the IQR fences of
    its class: below Q1 - 1.5 IQR or above Q3 + 1.5 IQR of the cats' (or dogs') values. Flat
    graphics, logos, text and blown-up thumbnails fall low. A class with fewer than
    :data:`MIN_IQR_IMAGES` images has no fences and nothing flagged.
``imagenet_mismatch``
    an ImageNet classifier's top-k classes (default k = 10) of a cat photo contain none of the cat
    classes 281-285, or those of a dog photo none of the dog classes 151-268
    (:mod:`catsdogs.audit.imagenet`).
``unreadable``
    the file does not decode (the reader's reason: empty, truncated, not an image ...), or
    :func:`catsdogs.dataset.layout.open_dataset` ignored it (not an image file name).
``label_issue`` (only with ``label_issues=True``)
    confident learning (``cleanlab``) on out-of-fold predictions of a logistic-regression head on
    the cached backbone features says the label is probably wrong; the score (the out-of-fold
    probability of the other class) is kept (:mod:`catsdogs.audit.label_issues`).
``conflicting_duplicate`` (only with ``label_issues=True``)
    a byte-identical copy of the file (same content digest) is filed under the other label; both
    are flagged as such (and not as label issues: no classifier can tell them apart).

Each image is read and decoded **once**: the decoded pixels give the size, the colour statistic and
the classifier's input. The classifier is a backbone's ImageNet model (its
:class:`~catsdogs.components.ImageNetClassifier` capability) built with
``build_classifier(weights, image_size, with_features=True)``; one forward pass gives both the
1000 logits and the backbone's GAP features (``keep_features=True`` returns those features, e.g. to
look for duplicates, without a second pass). Only the contact sheet re-reads its (at most
``max_sheet``) flagged images to draw thumbnails.

A flag never deletes or moves anything. ``write_exclude`` writes the flagged files' paths,
relative to the data directory, one per line (``#`` comments): the format the experiment file's
``exclude:`` accepts, for users who decide to drop them from training.

Outputs in ``out`` (when given): ``audit.csv`` (one row per flagged file), ``audit_all.csv`` (every
file), ``report.md`` (counts per check, size and colour statistics, ImageNet summary, embedded
plots), ``sizes.png`` (width x height by class), ``colour.png`` (the colour statistic with the
fences) and ``flagged.png`` (contact sheet of flagged images, reasons as captions).
"""

from __future__ import annotations

import csv
import functools
import io
import logging
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from catsdogs._version import __version__
from catsdogs.audit.imagenet import CAT_CLASSES, DOG_CLASSES, NUM_CLASSES, short_names
from catsdogs.compute import LOCAL, Engine
from catsdogs.dataset.images import ImageDecodeError, decode_rgb, read_image_file, resize
from catsdogs.dataset.layout import open_dataset
from catsdogs.dataset.payload import payload_bytes
from catsdogs.errors import ConfigError, PluginError
from catsdogs.features.extraction import lower_thread_priority
from catsdogs.util.fileio import atomic_write, write_text
from catsdogs.validation import check_backbone_options, check_int

logger = logging.getLogger("catsdogs")

#: the colour statistic is computed on the image squashed to COLOUR_SIZE x COLOUR_SIZE
COLOUR_SIZE = 64
#: a class needs at least this many readable images for IQR fences
MIN_IQR_IMAGES = 4
#: IQR multiplier of the fences (Tukey's rule)
IQR_FACTOR = 1.5
#: the checks, in the order of the CSV columns
CHECKS = ("tiny", "colour_outlier", "imagenet_mismatch", "unreadable", "label_issue",
          "conflicting_duplicate")
LABEL_NAMES = {0: "cat", 1: "dog"}
TOP_CSV = 3  # top classes written to the CSV


# --------------------------------------------------------------------------------------- results
@dataclass
class ImageAudit:
    """The audit of one file."""

    file: str  # relative to the data directory, forward slashes (the exclude-list format)
    label: str  # "cat", "dog", or "" for a file the reader ignored
    width: int | None = None
    height: int | None = None
    colour_stat: float | None = None  # distinct colours per pixel at COLOUR_SIZE x COLOUR_SIZE
    tiny: bool = False
    colour_outlier: bool = False
    imagenet_mismatch: bool = False
    unreadable: bool = False
    reason: str = ""  # why unreadable
    top: list[tuple[int, float]] = field(default_factory=list)  # top-k (ImageNet class, probability)
    p_cat: float | None = None  # probability mass on the cat classes 281-285
    p_dog: float | None = None  # probability mass on the dog classes 151-268
    label_issue: bool = False  # confident learning says the label is probably wrong
    label_issue_score: float | None = None  # out-of-fold P(the other class) (label_issues=True)
    conflicting_duplicate: bool = False  # byte-identical to a file of the other label
    duplicates: list[str] = field(default_factory=list)  # those files (label_issues=True)

    @property
    def flagged(self) -> bool:
        return any(getattr(self, check) for check in CHECKS)

    @property
    def flags(self) -> list[str]:
        return [check for check in CHECKS if getattr(self, check)]

    def reasons(self) -> list[str]:
        """Short human reasons, e.g. ``["tiny 32x40", "ImageNet top-1: tabby 41%"]``."""
        out = []
        if self.unreadable:
            out.append(f"unreadable: {self.reason}")
        if self.tiny:
            out.append(f"tiny {self.width}x{self.height}")
        if self.colour_outlier:
            out.append(f"colour {self.colour_stat:.3f}")
        if self.imagenet_mismatch and self.top:
            idx, prob = self.top[0]
            out.append(f"ImageNet: {short_names()[idx]} {prob:.0%}")
        if self.label_issue:
            out.append(f"label? P(other class) {self.label_issue_score:.2f}")
        if self.conflicting_duplicate:
            out.append("same bytes as " + ", ".join(f.rsplit("/", 1)[-1] for f in self.duplicates))
        return out


@dataclass
class AuditResult:
    """What :func:`audit` found. ``images`` holds every training image and every ignored file."""

    data_dir: Path
    images: list[ImageAudit]
    classifier: str
    weights: str
    image_size: int
    top_k: int
    min_side: int
    colour_fences: dict[str, tuple[float, float, float, float] | None]  # class -> (Q1, Q3, lo, hi)
    size_stats: dict[str, dict[str, float]]
    seconds: float = 0.0
    classifier_seconds: float = 0.0  # wall time of the decode + classify pass
    out_dir: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)  # csv, csv_all, report, sizes, colour, sheet, exclude
    features: np.ndarray | None = None  # (n, d) GAP features from the same pass (keep_features=True)
    feature_files: list[str] = field(default_factory=list)  # the rows of ``features``
    label_backbone: str | None = None  # whose features the label-issue finder used (if it ran)

    @property
    def flagged(self) -> list[ImageAudit]:
        return [a for a in self.images if a.flagged]

    @property
    def counts(self) -> dict[str, int]:
        """Number of files each check flags, plus ``any`` (flagged by at least one)."""
        out = {check: sum(getattr(a, check) for a in self.images) for check in CHECKS}
        out["any"] = len(self.flagged)
        return out

    def exclude_paths(self) -> list[str]:
        return [a.file for a in self.flagged]

    def write_exclude(self, path: str | os.PathLike) -> Path:
        """Write the flagged files, one relative path a line (``exclude:`` of an experiment file)."""
        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [
            f"# written by catsdogs audit {__version__} for {self.data_dir}",
            f"# {len(self.flagged)} flagged files, paths relative to the data directory; delete the",
            "# lines of files you want to keep, then use this file as `exclude:` in an experiment",
        ]
        for a in self.flagged:
            lines.append(a.file)
        write_text(path, "\n".join(lines) + "\n")
        self.files["exclude"] = path
        return path


# --------------------------------------------------------------------------------------- checks
def colour_statistic(image: np.ndarray, size: int = COLOUR_SIZE) -> float:
    """Distinct RGB colours per pixel of ``image`` squashed to ``size`` x ``size`` (in (0, 1])."""
    small = resize(image, size, "squash").astype(np.uint32)
    packed = (small[..., 0] << 16) | (small[..., 1] << 8) | small[..., 2]
    return float(np.unique(packed).size) / float(size * size)


def iqr_fences(values: Sequence[float], factor: float = IQR_FACTOR) -> tuple[float, float, float, float]:
    """``(Q1, Q3, Q1 - factor*IQR, Q3 + factor*IQR)`` (numpy's linear percentiles)."""
    q1, q3 = (float(v) for v in np.percentile(np.asarray(values, dtype=np.float64), [25, 75]))
    iqr = q3 - q1
    return q1, q3, q1 - factor * iqr, q3 + factor * iqr


def find_classifier(registry, name: str | None = None, weights: str = "imagenet"):
    """The backbone whose ImageNet classifier the audit uses: ``name``, or by default the first
    installed backbone (in name order) with a classifier whose ``weights`` are at hand
    (:meth:`~catsdogs.components.Backbone.weights_at_hand`: no download), else the first with a
    classifier (Keras then downloads its weights on first use)."""
    from catsdogs.components import has_imagenet_classifier, weights_at_hand

    with_classifier = [n for n in registry.names("backbones")
                       if has_imagenet_classifier(registry.backbone(n))]
    if name is None:
        if not with_classifier:
            raise PluginError(
                "no installed backbone has an ImageNet classifier (has_classifier), which the "
                "ImageNet check needs; install one, e.g. pip install -e plugins/catsdogs-efficientnet-lite")
        at_hand = [n for n in with_classifier
                   if weights_at_hand(registry.backbone(n), weights, classifier=True)]
        return registry.backbone((at_hand or with_classifier)[0])
    backbone = registry.backbone(name)  # unknown name: PluginError listing the available ones
    if not has_imagenet_classifier(backbone):
        offer = ", ".join(with_classifier) or "none installed (pip install -e plugins/catsdogs-efficientnet-lite)"
        raise PluginError(f"backbone {name!r} has no ImageNet classifier; backbones with one: {offer}")
    return backbone


class _Classifier:
    """One compiled forward pass: uint8 pixels -> (softmax probabilities, GAP features)."""

    def __init__(self, backbone, weights: str, image_size: int, batch_size: int):
        import tensorflow as tf

        model = backbone.build_classifier(weights, image_size, with_features=True)
        self.batch_size = batch_size
        spec = tf.TensorSpec([None, image_size, image_size, 3], tf.uint8)

        @tf.function(input_signature=[spec])
        def _call(x):
            out = model(tf.cast(x, tf.float32), training=False)
            logits = tf.cast(out["logits"], tf.float32)
            return tf.nn.softmax(logits, axis=-1), tf.cast(out["features"], tf.float32)

        self._call = _call

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        probs, feats = [], []
        for start in range(0, len(images), self.batch_size):
            p, f = self._call(images[start:start + self.batch_size])
            probs.append(p.numpy())
            feats.append(f.numpy())
        return np.concatenate(probs), np.concatenate(feats)


@dataclass
class _Decoded:
    width: int
    height: int
    colour_stat: float
    pixels: np.ndarray | None  # classifier input, (S, S, 3) uint8; None once classified


def _decode_bytes(data: bytes | ImageDecodeError, image_size: int) -> _Decoded | ImageDecodeError:
    if isinstance(data, ImageDecodeError):
        return data
    try:
        image = decode_rgb(data)
    except ImageDecodeError as exc:
        return exc
    height, width = image.shape[:2]
    return _Decoded(width, height, colour_statistic(image), resize(image, image_size, "squash"))


def _classify(model: _Classifier, decoded: list) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Probabilities and features of a chunk's decodable images (None when there are none)."""
    pixels = [d.pixels for d in decoded if not isinstance(d, ImageDecodeError)]
    return model(np.stack(pixels)) if pixels else (None, None)


class _AuditWorker:
    """The decode + classify pass of one chunk where the classifier lives (an engine's worker:
    this process or a Ray actor): built once per worker; takes the chunk's payload (image bytes
    or paths, :func:`~catsdogs.dataset.payload.payload_bytes`), returns what :func:`audit`
    records (the pixels stay in the worker)."""

    def __init__(self, backbone, weights: str, image_size: int, batch_size: int, workers: int):
        self.model = _Classifier(backbone, weights, image_size, batch_size)
        self.pool = ThreadPoolExecutor(max_workers=workers, initializer=lower_thread_priority)
        self.image_size = image_size

    def __call__(self, payload: list) -> tuple[list, np.ndarray | None, np.ndarray | None]:
        decoded = list(self.pool.map(lambda item: _decode_bytes(payload_bytes(item), self.image_size),
                                     payload))
        probs, feats = _classify(self.model, decoded)
        for d in decoded:  # the pixels stay here
            if not isinstance(d, ImageDecodeError):
                d.pixels = None
        return decoded, probs, feats


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _check_options(top_k, min_side, batch_size, image_size, weights, workers, max_sheet) -> None:
    for name, value, low in (("top-k", top_k, 1), ("min-side", min_side, 1), ("batch size", batch_size, 1),
                             ("workers", workers, 1), ("max-sheet", max_sheet, 0)):
        check_int(value, name, low)
    if top_k > NUM_CLASSES:
        raise ConfigError(f"top-k must be at most {NUM_CLASSES} (the ImageNet classes), got {top_k}")
    check_backbone_options(image_size, weights)


# --------------------------------------------------------------------------------------- API
def audit(
    data_dir: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    classifier: str | None = None,
    top_k: int = 10,
    min_side: int = 50,
    weights: str = "imagenet",
    image_size: int | None = None,
    batch_size: int = 32,
    workers: int = 2,
    write_exclude: str | os.PathLike | None = None,
    max_sheet: int = 64,
    keep_features: bool = False,
    label_issues: bool = False,
    label_backbone: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    registry=None,
    engine: Engine = LOCAL,
) -> AuditResult:
    """Run every check on the training images of ``data_dir`` (see the module docstring).

    ``classifier`` names a backbone with an ImageNet classifier (default: the first installed one,
    ``efficientnet_lite0`` with the EfficientNet-Lite plugin); ``weights="none"`` builds its seeded
    random network (for tests: the ImageNet check is then meaningless). ``image_size`` defaults to
    the backbone's own. With ``out`` the CSVs, plots and ``report.md`` are written there;
    ``write_exclude`` writes the exclude list. ``label_issues`` also runs the label-issue finder
    on the cached features (``cache_dir``) of ``label_backbone`` (default: the classifier's
    backbone; same weights, and ``image_size`` if given). Nothing in ``data_dir`` is changed.
    ``engine`` (a :class:`catsdogs.compute.Engine`, from :func:`catsdogs.engine.open_engine`;
    default: this process) runs the decode + classify pass in its workers (on Ray, image bytes
    shipped from here) and computes the label-issue finder's features; the checks and outputs
    are the same.
    """
    from catsdogs.plugins import get_registry
    from catsdogs.util.progress import progress_bar

    t0 = time.perf_counter()
    _check_options(top_k, min_side, batch_size, image_size, weights, workers, max_sheet)
    ds = open_dataset(data_dir)
    registry = registry or get_registry()
    backbone = find_classifier(registry, classifier, weights)
    size = backbone.checked_size(weights, image_size)

    records = ds.train
    audits = [ImageAudit(r.relpath, LABEL_NAMES[r.label]) for r in records]
    cat_set, dog_set = set(CAT_CLASSES), set(DOG_CLASSES)
    cat_idx, dog_idx = np.asarray(CAT_CLASSES), np.asarray(DOG_CLASSES)
    feature_rows: list[np.ndarray] = []
    feature_files: list[str] = []
    chunk_size = max(batch_size, -(-256 // batch_size) * batch_size)
    chunks = list(_chunks(list(range(len(records))), chunk_size))

    bar = progress_bar(total=len(records), desc=f"{backbone.name} ImageNet audit", unit="img",
                       enabled=progress)

    def record_chunk(chunk: list[int], out: tuple) -> None:
        decoded, probs, feats = out
        ok = []
        for i, d in zip(chunk, decoded):
            a = audits[i]
            if isinstance(d, ImageDecodeError):
                a.unreadable, a.reason = True, d.reason
                continue
            a.width, a.height, a.colour_stat = d.width, d.height, d.colour_stat
            a.tiny = min(d.width, d.height) < min_side
            ok.append(i)
        if ok:
            top = np.argsort(-probs, axis=1)[:, :top_k]
            for row, i in enumerate(ok):
                a = audits[i]
                a.top = [(int(c), float(probs[row, c])) for c in top[row]]
                a.p_cat = float(probs[row, cat_idx].sum())
                a.p_dog = float(probs[row, dog_idx].sum())
                wanted = cat_set if a.label == "cat" else dog_set
                a.imagenet_mismatch = not any(int(c) in wanted for c in top[row])
            if keep_features:
                feature_rows.append(feats)
                feature_files.extend(records[i].relpath for i in ok)
        bar.update(len(chunk))

    t_pass = time.perf_counter()
    try:
        engine.map_chunks(  # decode + classify in the engine's workers, recorded here
            functools.partial(_AuditWorker, backbone, weights, size, batch_size, workers), chunks,
            lambda chunk: (engine.payload([records[i].path for i in chunk]),),
            lambda chunk, out, node, pid: record_chunk(chunk, out),
            lambda chunk: f"the chunk of {len(chunk)} images {records[chunk[0]].relpath} .. "
                          f"{records[chunk[-1]].relpath}")
    finally:
        bar.close()
    classifier_seconds = time.perf_counter() - t_pass

    # colour IQR rule, per class
    fences: dict[str, tuple[float, float, float, float] | None] = {}
    for label in ("cat", "dog"):
        members = [a for a in audits if a.label == label and a.colour_stat is not None]
        if len(members) < MIN_IQR_IMAGES:
            fences[label] = None
            continue
        stats = [a.colour_stat for a in members if a.colour_stat is not None]  # all of them
        fences[label] = q1, q3, lo, hi = iqr_fences(stats)
        for a, stat in zip(members, stats, strict=True):
            a.colour_outlier = stat < lo or stat > hi

    if label_issues:
        _mark_label_issues(audits, ds.root, label_backbone or backbone.name, weights,
                           image_size, cache_dir, progress, registry, engine)

    for relpath, reason in ds.ignored:
        audits.append(ImageAudit(relpath, "", unreadable=True, reason=f"ignored by the reader: {reason}"))

    result = AuditResult(
        data_dir=ds.root, images=audits, classifier=backbone.name, weights=weights, image_size=size,
        top_k=top_k, min_side=min_side, colour_fences=fences, size_stats=_size_stats(audits),
        classifier_seconds=classifier_seconds,
        features=(np.concatenate(feature_rows) if feature_rows else
                  np.zeros((0, getattr(backbone, "feature_dim", 0)), np.float32)) if keep_features else None,
        feature_files=feature_files,
        label_backbone=(label_backbone or backbone.name) if label_issues else None,
    )
    for a in result.flagged:
        if a.unreadable:
            logger.warning("unreadable %s: %s", a.file, a.reason)
    if write_exclude is not None:
        result.write_exclude(write_exclude)
    if out is not None:
        write_outputs(result, out, max_sheet=max_sheet, elapsed=time.perf_counter() - t0)
    result.seconds = time.perf_counter() - t0
    return result


def _mark_label_issues(audits: list[ImageAudit], data_dir: Path, backbone: str, weights: str,
                       image_size: int | None, cache_dir, progress: bool, registry,
                       engine: Engine = LOCAL) -> None:
    """Set ``label_issue`` and ``label_issue_score``, and ``conflicting_duplicate`` with the
    ``duplicates``, from :mod:`catsdogs.audit.label_issues`."""
    from catsdogs.audit.label_issues import label_issues_in

    issues = label_issues_in(data_dir, backbone, weights=weights, image_size=image_size,
                             cache_dir=cache_dir, progress=progress, registry=registry,
                             engine=engine)
    found = issues.by_file()
    for a in audits:
        if a.file in found:
            a.label_issue, a.label_issue_score = found[a.file]
        if a.file in issues.conflicts:
            a.conflicting_duplicate, a.duplicates = True, issues.conflicts[a.file]


def _size_stats(audits: list[ImageAudit]) -> dict[str, dict[str, float]]:
    stats = {}
    for label in ("cat", "dog"):
        rows = [a for a in audits if a.label == label and a.width is not None]
        if not rows:
            continue
        w = np.array([a.width for a in rows])
        h = np.array([a.height for a in rows])
        stats[label] = {"n": len(rows),
                        "width_min": int(w.min()), "width_median": float(np.median(w)), "width_max": int(w.max()),
                        "height_min": int(h.min()), "height_median": float(np.median(h)),
                        "height_max": int(h.max())}
    return stats


# --------------------------------------------------------------------------------------- outputs
def csv_columns() -> list[str]:
    cols = ["file", "label", *CHECKS, "width", "height", "colour_stat", "p_cat_classes", "p_dog_classes",
            "label_issue_score"]
    for k in range(1, TOP_CSV + 1):
        cols += [f"top{k}_class", f"top{k}_name", f"top{k}_prob"]
    return cols + ["reason"]


def _csv_row(a: ImageAudit) -> list:
    def num(x, fmt):
        return "" if x is None else format(x, fmt)

    row = [a.file, a.label, *(getattr(a, c) for c in CHECKS), num(a.width, "d"), num(a.height, "d"),
           num(a.colour_stat, ".5f"), num(a.p_cat, ".5f"), num(a.p_dog, ".5f"), num(a.label_issue_score, ".5f")]
    names = short_names()
    for k in range(TOP_CSV):
        if k < len(a.top):
            idx, prob = a.top[k]
            row += [idx, names[idx], f"{prob:.5f}"]
        else:
            row += ["", "", ""]
    return row + [_detail(a)]


def _detail(a: ImageAudit) -> str:
    """The CSV's ``reason``: why unreadable, or which files a conflicting duplicate copies."""
    duplicates = "same bytes as " + " ".join(a.duplicates) if a.conflicting_duplicate else ""
    return "; ".join(x for x in (a.reason, duplicates) if x)


def write_csv(images: Sequence[ImageAudit], path: Path) -> Path:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(csv_columns())
    for a in images:
        writer.writerow(_csv_row(a))
    return write_text(path, buffer.getvalue())


def save_figure(fig, path: Path, dpi: int) -> Path:
    """Save a Matplotlib figure as PNG atomically (:func:`catsdogs.util.fileio.atomic_write`)."""
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=dpi))
    return path


def write_outputs(result: AuditResult, out: str | os.PathLike, *, max_sheet: int = 64,
                  elapsed: float | None = None) -> dict[str, Path]:
    """Write the CSVs, plots and ``report.md`` of ``result`` into ``out``."""
    from catsdogs.evaluation.plots import pyplot

    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    result.out_dir = out
    plt = pyplot()
    files = result.files
    files["csv"] = write_csv(result.flagged, out / "audit.csv")
    files["csv_all"] = write_csv(result.images, out / "audit_all.csv")
    files["sizes"] = plot_sizes(result, out / "sizes.png", plt)
    files["colour"] = plot_colour(result, out / "colour.png", plt)
    sheet = plot_contact_sheet(result, out / "flagged.png", plt, max_sheet)
    files.pop("sheet", None)
    if sheet is not None:
        files["sheet"] = sheet
    files["report"] = write_report(result, out / "report.md", max_sheet, elapsed)
    return files


def plot_sizes(result: AuditResult, path: Path, plt) -> Path:
    """Scatter of width x height per class, with the min-side lines and tiny images marked."""
    fig, ax = plt.subplots(figsize=(7, 6))
    for label, colour in (("cat", "#e65100"), ("dog", "#1565c0")):
        rows = [a for a in result.images if a.label == label and a.width is not None]
        if rows:
            ax.scatter([a.width for a in rows], [a.height for a in rows], s=9, alpha=0.45, c=colour,
                       label=f"{label} ({len(rows)})", edgecolors="none")
    tiny = [a for a in result.images if a.tiny]
    if tiny:
        ax.scatter([a.width for a in tiny], [a.height for a in tiny], s=40, marker="x", c="#c62828",
                   label=f"tiny (side < {result.min_side} px): {len(tiny)}")
    ax.axvline(result.min_side, color="#c62828", ls="--", lw=0.8)
    ax.axhline(result.min_side, color="#c62828", ls="--", lw=0.8)
    ax.set_xlabel("width (px)")
    ax.set_ylabel("height (px)")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(f"training image sizes: {result.data_dir.name}", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=90)
    plt.close(fig)
    return path


def plot_colour(result: AuditResult, path: Path, plt) -> Path:
    """The colour statistic per class (jittered strip) with the IQR fences; outliers in red."""
    fig, ax = plt.subplots(figsize=(7, 4))
    rng = np.random.default_rng(0)
    labelled = False
    for x, label in enumerate(("cat", "dog")):
        rows = [a for a in result.images if a.label == label and a.colour_stat is not None]
        if not rows:
            continue
        vals = np.array([a.colour_stat for a in rows])
        out = np.array([a.colour_outlier for a in rows])
        jitter = x + rng.uniform(-0.25, 0.25, len(rows))
        ax.scatter(jitter[~out], vals[~out], s=7, alpha=0.4, c="#607d8b", edgecolors="none")
        if out.any():
            ax.scatter(jitter[out], vals[out], s=20, c="#c62828", marker="x",
                       label=None if labelled else "outlier")
            labelled = True
        fence = result.colour_fences.get(label)
        if fence is not None:
            q1, q3, lo, hi = fence
            for y, style in ((q1, "-"), (q3, "-"), (lo, "--"), (hi, "--")):
                ax.plot([x - 0.35, x + 0.35], [y, y], style, color="#37474f", lw=0.9)
    ax.set_xticks([0, 1])
    ax.set_xticklabels(["cat", "dog"])
    ax.set_ylabel(f"distinct colours per pixel ({COLOUR_SIZE}x{COLOUR_SIZE})")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3, axis="y")
    if labelled:
        ax.legend(fontsize=8, loc="lower right")
    ax.set_title("colour statistic: Q1/Q3 (solid), fences Q1-1.5 IQR / Q3+1.5 IQR (dashed)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=90)
    plt.close(fig)
    return path


def _sheet_order(result: AuditResult) -> list[ImageAudit]:
    flagged = result.flagged
    order = {id(a): i for i, a in enumerate(flagged)}
    return sorted(flagged, key=lambda a: (-len(a.flags), -(a.label_issue_score or 0.0) * a.label_issue,
                                          order[id(a)]))


def plot_contact_sheet(result: AuditResult, path: Path, plt, max_images: int = 64,
                       thumb: int = 128) -> Path | None:
    """Thumbnails of (at most ``max_images``) flagged files, captioned with file and reasons."""
    from PIL import Image

    chosen = _sheet_order(result)[:max_images]
    if not chosen:
        path.unlink(missing_ok=True)  # no stale sheet from an earlier audit
        return None
    cols = min(8, len(chosen))
    rows = -(-len(chosen) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.0 * cols, 2.45 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, a in zip(axes.flat, chosen):
        picture = None
        if not a.unreadable:
            try:
                im = Image.fromarray(decode_rgb(read_image_file(result.data_dir / a.file)))
                im.thumbnail((thumb, thumb))
                picture = np.asarray(im)
            except (ImageDecodeError, OSError):
                picture = None
        if picture is None:
            ax.imshow(np.full((thumb, thumb, 3), 200, np.uint8))
            ax.text(thumb / 2, thumb / 2, "unreadable", ha="center", va="center", fontsize=8,
                    color="#b71c1c")
        else:
            ax.imshow(picture)
        caption = [f"{a.file.rsplit('/', 1)[-1][:24]} ({a.label or '?'})"]
        caption += [r[:38] for r in a.reasons()]
        ax.set_title("\n".join(caption), fontsize=6.5, loc="left")
    more = len(result.flagged) - len(chosen)
    title = f"{len(result.flagged)} flagged files" + (f" ({more} more not shown)" if more else "")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))  # room for the title
    save_figure(fig, path, dpi=80)
    plt.close(fig)
    return path


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def write_report(result: AuditResult, path: Path, max_sheet: int = 64, elapsed: float | None = None) -> Path:
    counts = result.counts
    n_train = sum(1 for a in result.images if a.label)
    n_cat = sum(1 for a in result.images if a.label == "cat")
    lines = [
        f"# Data audit: `{result.data_dir}`",
        "",
        f"{n_train} training images ({n_cat} cats, {n_train - n_cat} dogs). Classifier "
        f"`{result.classifier}` (weights `{result.weights}`, {result.image_size} px), top-{result.top_k}; "
        f"minimum side {result.min_side} px. catsdogs {__version__}"
        + (f", {elapsed:.1f} s." if elapsed is not None else "."),
        "",
    ]
    if result.weights != "imagenet":
        lines += [f"> Weights `{result.weights}` are not ImageNet weights: the ImageNet check below is "
                  "meaningless (use `--weights imagenet`).", ""]
    lines += [
        "## Flags",
        "",
        "| check | rule | flagged |",
        "|---|---|---:|",
        f"| `tiny` | a side shorter than {result.min_side} px | {counts['tiny']} |",
        f"| `colour_outlier` | distinct colours per pixel at {COLOUR_SIZE}x{COLOUR_SIZE} below Q1 - 1.5 IQR "
        f"or above Q3 + 1.5 IQR of its class | {counts['colour_outlier']} |",
        f"| `imagenet_mismatch` | a cat photo without a cat class (281-285) in its top-{result.top_k}, "
        f"a dog photo without a dog class (151-268) | {counts['imagenet_mismatch']} |",
        f"| `unreadable` | does not decode, or ignored by the reader | {counts['unreadable']} |",
        *([f"| `label_issue` | cleanlab (confident learning) on out-of-fold predictions of a "
           f"logistic regression on `{result.label_backbone}` features: label probably wrong "
           f"| {counts['label_issue']} |",
           f"| `conflicting_duplicate` | a byte-identical copy is filed under the other label "
           f"(not scored as a label issue) | {counts['conflicting_duplicate']} |"]
          if result.label_backbone else []),
        f"| **any** | | **{counts['any']}** |",
        "",
        "Nothing was deleted or moved. `audit.csv` lists the flagged files (`audit_all.csv` every "
        "file). To leave them out of training, write an exclude list (`catsdogs audit DATA_DIR "
        "--write-exclude exclude.txt`), delete the lines of the files you want to keep, and set "
        "`exclude: exclude.txt` in the experiment file (relative to the YAML file's folder).",
        "",
        "## Image sizes",
        "",
        "![image sizes](sizes.png)",
        "",
        "| class | n | width min | width median | width max | height min | height median | height max |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, s in result.size_stats.items():
        lines.append(f"| {label} | {s['n']} | {s['width_min']} | {s['width_median']:g} | {s['width_max']} | "
                     f"{s['height_min']} | {s['height_median']:g} | {s['height_max']} |")
    lines += [
        "",
        "## Colour statistic",
        "",
        f"Distinct RGB colours per pixel of the image squashed to {COLOUR_SIZE}x{COLOUR_SIZE} (1.0: every "
        f"pixel its own colour; {1 / COLOUR_SIZE ** 2:.5f}: a single colour). Flat graphics, text, logos "
        "and blown-up thumbnails fall low.",
        "",
        "![colour statistic](colour.png)",
        "",
        "| class | Q1 | Q3 | lower fence | upper fence | outliers |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label in ("cat", "dog"):
        fence = result.colour_fences.get(label)
        n_out = sum(1 for a in result.images if a.label == label and a.colour_outlier)
        if fence is None:
            lines.append(f"| {label} | | | | | (fewer than {MIN_IQR_IMAGES} images: no fences) |")
        else:
            q1, q3, lo, hi = fence
            lines.append(f"| {label} | {q1:.4f} | {q3:.4f} | {lo:.4f} | {hi:.4f} | {n_out} |")
    lines += ["", "## ImageNet sanity check", ""]
    names = short_names()
    for label, classes, span in (("cat", CAT_CLASSES, "281-285"), ("dog", DOG_CLASSES, "151-268")):
        rows = [a for a in result.images if a.label == label and a.top]
        if not rows:
            continue
        top1 = sum(1 for a in rows if a.top[0][0] in classes)
        topk = sum(1 for a in rows if not a.imagenet_mismatch)
        lines.append(f"- {label}s: top-1 in the {label} classes {span} for {top1} of {len(rows)} "
                     f"({top1 / len(rows):.1%}), in the top-{result.top_k} for {topk} ({topk / len(rows):.1%}); "
                     f"flagged {len(rows) - topk}.")
    mism = [a for a in result.images if a.imagenet_mismatch]
    if mism:
        common: dict[int, int] = {}
        for a in mism:
            common[a.top[0][0]] = common.get(a.top[0][0], 0) + 1
        best = sorted(common.items(), key=lambda kv: -kv[1])[:8]
        lines.append("- most common top-1 class of the flagged: "
                     + ", ".join(f"{names[c]} ({n})" for c, n in best) + ".")
    lines += ["", "## Flagged files", ""]
    if result.files.get("sheet"):
        shown = min(max_sheet, counts["any"])
        lines += [f"Contact sheet of {shown} of {counts['any']} flagged files (most flags first):", "",
                  "![flagged images](flagged.png)", ""]
    if not result.flagged:
        lines.append("No file was flagged.")
    else:
        limit = 200
        lines += ["| file | label | flags | size | colour | ImageNet top-3 |", "|---|---|---|---|---:|---|"]
        for a in result.flagged[:limit]:
            size = f"{a.width}x{a.height}" if a.width is not None else ""
            colour = f"{a.colour_stat:.3f}" if a.colour_stat is not None else ""
            top = ", ".join(f"{names[c]} {p:.0%}" for c, p in a.top[:3])
            flags = ", ".join(a.flags) + (f" ({_detail(a)})" if _detail(a) else "")
            lines.append(f"| `{_md_escape(a.file)}` | {a.label} | {_md_escape(flags)} | {size} | {colour} | "
                         f"{_md_escape(top)} |")
        if len(result.flagged) > limit:
            lines.append(f"\n... and {len(result.flagged) - limit} more in `audit.csv`.")
    return write_text(path, "\n".join(lines) + "\n")
