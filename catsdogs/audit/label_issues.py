"""Find training images whose label is probably wrong (confident learning with ``cleanlab``).

A cat photo filed as ``dog.123.jpg`` costs a transfer-learning head more than any other bad image:
it is confidently "wrong" in training and teaches the head to hedge. :func:`find_label_issues`
finds such images from cached backbone features:

1. the training images' GAP features come from the normal :func:`catsdogs.features.extraction.extract`
   path (same cache as ``catsdogs run``, so an experiment's features are reused);
2. a logistic-regression head (standardised features, L2 penalty ``C``) predicts every image
   **out of fold** (stratified K-fold, seeded): no image is scored by a model that saw its label;
3. ``cleanlab.filter.find_label_issues`` (confident learning, ``prune_by_noise_rate``) flags the
   images whose given label disagrees confidently with the out-of-fold prediction, given the
   estimated noise rates; ``cleanlab.rank.get_label_quality_scores`` (self-confidence) ranks all
   images. The **score** of an image is ``1 - quality``: the out-of-fold probability of the
   *other* class; near 1 means "almost certainly mislabelled".

**Conflicting duplicates.** Byte-identical training images (the same content digest, which the
feature cache keeps per row) filed under both labels cannot both be right, and no classifier can
tell them apart: they are reported as ``conflict`` (each with the files it duplicates), and left
out of the out-of-fold fit and of confident learning (never an ordinary label issue).

The audit (:func:`catsdogs.audit.checks.audit` with ``label_issues=True``, ``catsdogs audit DATA_DIR
--label-issues``) adds the flagged images to ``audit.csv``, the contact sheet and the exclude list
with their score (``conflicting_duplicate`` for the conflicts). A flag is a suggestion for a
person to look at: nothing is relabelled or moved.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np

from catsdogs.compute import LOCAL, Engine
from catsdogs.errors import DataError
from catsdogs.util.extras import require

logger = logging.getLogger("catsdogs")

__all__ = ["FOLDS", "LabelIssues", "find_label_issues", "label_issues_in"]

#: folds of the out-of-fold predictions
FOLDS = 5


@dataclass
class LabelIssues:
    """Out-of-fold predictions, scores and flags of the training images (rows align with ``files``)."""

    files: list[str]  # relative to the data directory
    labels: np.ndarray  # given labels (dog = 1)
    p_dog: np.ndarray  # out-of-fold P(dog)
    score: np.ndarray  # 1 - cleanlab's self-confidence quality: P(the other class), out of fold
    issue: np.ndarray  # bool: flagged by confident learning
    backbone: str = ""
    #: file -> the byte-identical files filed under the other label (conflicting duplicates; their
    #: p_dog and score are NaN: they are not scored)
    conflicts: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ranked(self) -> list[int]:
        """Row indices of the flagged images, most likely mislabelled first."""
        flagged = np.flatnonzero(self.issue)
        return flagged[np.argsort(-self.score[flagged], kind="stable")].tolist()

    def by_file(self) -> dict[str, tuple[bool, float | None]]:
        """file -> (flagged, score); a conflicting duplicate's score is None."""
        return {f: (bool(i), None if np.isnan(s) else float(s))
                for f, i, s in zip(self.files, self.issue, self.score)}


def conflicting_duplicates(files: list[str], labels, digests: list[str]) -> dict[str, list[str]]:
    """file -> the files with the same content digest and another label (only files that have
    such a twin)."""
    groups: dict[str, list[int]] = {}
    for i, digest in enumerate(digests):
        groups.setdefault(digest, []).append(i)
    out: dict[str, list[str]] = {}
    for rows in groups.values():
        if len({int(labels[i]) for i in rows}) > 1:
            for i in rows:
                out[files[i]] = [files[j] for j in rows if int(labels[j]) != int(labels[i])]
    return out


def find_label_issues(X, y, files: list[str], *, digests: list[str] | None = None,
                      folds: int = FOLDS, seed: int = 0, C: float = 0.1) -> LabelIssues:
    """Out-of-fold logistic regression on features ``X`` (labels ``y``), then cleanlab's filter.
    With the rows' content ``digests``, byte-identical rows under both labels are reported as
    conflicts and left out of the fit (see the module docstring)."""
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=int).ravel()
    if len(y) != len(X) or len(files) != len(y) or (digests is not None and len(digests) != len(y)):
        raise DataError(f"label issues: {len(X)} feature rows, {len(y)} labels, {len(files)} files"
                        + ("" if digests is None else f", {len(digests)} digests"))
    conflicts = conflicting_duplicates(list(files), y, list(digests)) if digests is not None else {}
    if conflicts:
        logger.warning("%d training images are byte-identical copies filed under both labels "
                       "(conflicting duplicates); they are reported as such, not scored",
                       len(conflicts))
    scored = np.array([f not in conflicts for f in files], dtype=bool)
    found = _find(X[scored], y[scored], folds, seed, C)
    p_dog, score, issue = np.full(len(y), np.nan), np.full(len(y), np.nan), np.zeros(len(y), bool)
    p_dog[scored], score[scored], issue[scored] = found
    return LabelIssues(files=list(files), labels=y, p_dog=p_dog, score=score, issue=issue,
                       conflicts=conflicts)


def _find(X: np.ndarray, y: np.ndarray, folds: int, seed: int, C: float
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(out-of-fold P(dog), score, flagged) of every row."""
    cl_find = require("cleanlab.filter", feature="audit --label-issues").find_label_issues
    get_label_quality_scores = require("cleanlab.rank", feature="audit --label-issues").get_label_quality_scores
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    counts = np.bincount(y, minlength=2)
    k = int(min(folds, counts.min()))
    if k < 2:
        raise DataError(f"label issues need at least 2 training images of each class "
                        f"(cats: {counts[0]}, dogs: {counts[1]})")
    model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=5000))
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    probs = cross_val_predict(model, X, y, cv=cv, method="predict_proba")
    issue = cl_find(labels=y, pred_probs=probs, filter_by="prune_by_noise_rate", n_jobs=1)
    quality = get_label_quality_scores(y, probs, method="self_confidence")
    return probs[:, 1], 1.0 - quality, np.asarray(issue, dtype=bool)


def label_issues_in(data_dir: str | os.PathLike, backbone: str, *, weights: str = "imagenet",
                    image_size: int | None = None, cache_dir: str | os.PathLike | None = None, folds: int = FOLDS, seed: int = 0,
                    exclude: set[str] | None = None, progress: bool = True,
                    registry=None, engine: Engine = LOCAL) -> LabelIssues:
    """:func:`find_label_issues` on the training images of ``data_dir`` with ``backbone``'s features.

    The features are extracted (or reused from the cache) by the normal ``extract()`` path, on
    ``engine`` (default: this process).
    ``exclude``: relative paths to leave out (e.g. unreadable files).
    """
    from catsdogs.features.extraction import extract, load_features

    (res,) = extract(data_dir, [backbone], weights=weights, image_size=image_size,
                     cache_dir=cache_dir, progress=progress, registry=registry, engine=engine)
    train = load_features(res.path).train
    keep = np.array([f not in (exclude or set()) for f in train.files], dtype=bool)
    found = find_label_issues(train.X[keep], train.y[keep],
                              [f for f, k in zip(train.files, keep) if k],
                              digests=[d for d, k in zip(train.digests, keep) if k], folds=folds,
                              seed=seed)
    found.backbone = backbone
    logger.info("label issues (%s features, %d-fold logistic regression + cleanlab): %d of %d "
                "training images flagged", backbone, folds, int(found.issue.sum()), len(found.files))
    return found
