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

The audit (:func:`catsdogs.audit.checks.audit` with ``label_issues=True``, ``catsdogs audit DATA_DIR
--label-issues``) adds the flagged images to ``audit.csv``, the contact sheet and the exclude list
with their score. A flag is a suggestion for a person to look at: nothing is relabelled or moved.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np

from catsdogs.errors import DataError

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

    @property
    def ranked(self) -> list[int]:
        """Row indices of the flagged images, most likely mislabelled first."""
        flagged = np.flatnonzero(self.issue)
        return flagged[np.argsort(-self.score[flagged], kind="stable")].tolist()

    def by_file(self) -> dict[str, tuple[bool, float]]:
        return {f: (bool(i), float(s)) for f, i, s in zip(self.files, self.issue, self.score)}


def find_label_issues(X, y, files: list[str], *, folds: int = FOLDS, seed: int = 0,
                      C: float = 0.1) -> LabelIssues:
    """Out-of-fold logistic regression on features ``X`` (labels ``y``), then cleanlab's filter."""
    from cleanlab.filter import find_label_issues as cl_find
    from cleanlab.rank import get_label_quality_scores
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=int).ravel()
    if len(y) != len(X) or len(files) != len(y):
        raise DataError(f"label issues: {len(X)} feature rows, {len(y)} labels, {len(files)} files")
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
    return LabelIssues(files=list(files), labels=y, p_dog=probs[:, 1], score=1.0 - quality,
                       issue=np.asarray(issue, dtype=bool))


def label_issues_in(data_dir: str | os.PathLike, backbone: str, *, weights: str = "imagenet",
                    image_size: int | None = None, cache_dir: str | os.PathLike | None = None, folds: int = FOLDS, seed: int = 0,
                    exclude: set[str] | None = None, progress: bool = True,
                    registry=None) -> LabelIssues:
    """:func:`find_label_issues` on the training images of ``data_dir`` with ``backbone``'s features.

    The features are extracted (or reused from the cache) by the normal ``extract()`` path.
    ``exclude``: relative paths to leave out (e.g. unreadable files).
    """
    from catsdogs.features.extraction import extract, load_features

    (res,) = extract(data_dir, [backbone], weights=weights, image_size=image_size,
                     cache_dir=cache_dir, progress=progress, registry=registry)
    train = load_features(res.path).train
    keep = np.array([f not in (exclude or set()) for f in train.files], dtype=bool)
    found = find_label_issues(train.X[keep], train.y[keep],
                              [f for f, k in zip(train.files, keep) if k], folds=folds, seed=seed)
    found.backbone = backbone
    logger.info("label issues (%s features, %d-fold logistic regression + cleanlab): %d of %d "
                "training images flagged", backbone, folds, int(found.issue.sum()), len(found.files))
    return found
