"""The label-issue finder (cleanlab on out-of-fold predictions) and `catsdogs audit --label-issues`.

Planted label swaps: images of one class saved under the other class's Kaggle name
(``cat.N.jpg`` holding a dog pattern / a dog photo). Precision = planted among the flagged.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from conftest import MINI, run_cli, write_jpeg
from test_audit import TINY_CLASSIFIER  # the tiny ImageNet-style classifier plugin (fake dist)

from catsdogs.audit.checks import audit
from catsdogs.audit.label_issues import find_label_issues
from catsdogs.errors import DataError
from catsdogs.plugins import Registry

pytest.importorskip("cleanlab")


def _precision_recall(flagged: set[str], planted: set[str]) -> tuple[float, float]:
    hits = len(flagged & planted)
    return hits / max(len(flagged), 1), hits / len(planted)


def test_finder_on_synthetic_features_with_flipped_labels(record_property):
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 2, 400)
    X = rng.normal(0, 1, (400, 16))
    X[:, :2] += 3.0 * y_true[:, None]  # two informative axes: classes 4.2 sd apart, ~2% overlap
    flipped = rng.choice(400, 20, replace=False)
    y = y_true.copy()
    y[flipped] = 1 - y[flipped]
    files = [f"train/{i}.jpg" for i in range(400)]
    found = find_label_issues(X, y, files)
    precision, recall = _precision_recall({files[i] for i in found.ranked},
                                          {files[i] for i in flipped})
    record_property("measured", f"20 flips in 400 rows: precision {precision:.2f}, recall {recall:.2f}")
    assert precision >= 0.6 and recall >= 0.6
    assert np.median(found.score[flipped]) > 0.5 > np.median(np.delete(found.score, flipped))
    ranked_scores = found.score[found.ranked]
    assert np.all(np.diff(ranked_scores) <= 0)  # most likely mislabelled first


def test_finder_on_shuffled_labels_finds_no_structure():
    """Control: labels unrelated to the features; the out-of-fold head is no better than chance,
    so the scores carry no information about which rows were flipped."""
    rng = np.random.default_rng(1)
    X = rng.normal(0, 1, (300, 8))
    y = rng.integers(0, 2, 300)
    found = find_label_issues(X, y, [str(i) for i in range(300)])
    assert abs(np.mean((found.p_dog > 0.5) == y) - 0.5) < 0.1


def test_finder_needs_both_classes():
    with pytest.raises(DataError, match="at least 2 training images of each class"):
        find_label_issues(np.zeros((5, 2)), np.array([0, 0, 0, 0, 1]), list("abcde"))


def test_byte_identical_rows_under_both_labels_are_conflicts_not_label_issues():
    """Issue 21 item 11: the same content filed as a cat and as a dog is reported as conflicting
    duplicates (naming each other), left out of the fit, and flagged as no label issue."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    X = rng.normal(0, 1, (200, 8))
    X[:, :2] += 3.0 * y[:, None]
    X = np.vstack([X, X[[0, 0, 1]]])  # row 0 copied twice (once under the other label), row 1 once
    y = np.concatenate([y, [1 - y[0], y[0], y[1]]])
    files = [f"train/{i}.jpg" for i in range(len(y))]
    digests = [f"d{i}" for i in range(200)] + ["d0", "d0", "d1"]
    found = find_label_issues(X, y, files, digests=digests)
    assert found.conflicts == {"train/0.jpg": ["train/200.jpg"], "train/200.jpg": ["train/0.jpg", "train/201.jpg"],
                               "train/201.jpg": ["train/200.jpg"]}
    for f in found.conflicts:  # not scored: neither flagged nor given a score
        row = files.index(f)
        assert not found.issue[row] and np.isnan(found.score[row]) and found.by_file()[f] == (False, None)
    assert "train/1.jpg" not in found.conflicts and "train/202.jpg" not in found.conflicts  # same label
    assert not np.isnan(found.score[[1, 202]]).any()
    assert find_label_issues(X, y, files).conflicts == {}  # no digests, no conflicts known


@pytest.mark.slow
def test_audit_reports_conflicting_duplicates(tmp_path, registry):
    """A photo copied byte for byte under the other class's name: both files are flagged
    ``conflicting_duplicate`` (naming the other) in audit.csv and the report, not ``label_issue``."""
    import shutil

    data = tmp_path / "data"
    _planted_dataset(data, swaps=0)
    shutil.copy(data / "train" / "cat.5.jpg", data / "train" / "dog.99.jpg")
    out = tmp_path / "audit"
    result = audit(data, out, classifier="tiny_classifier", weights="none", image_size=32,
                   batch_size=8, label_issues=True, cache_dir=tmp_path / "cache", progress=False,
                   registry=registry)
    by_file = {a.file: a for a in result.images}
    for f, other in (("train/cat.5.jpg", "train/dog.99.jpg"), ("train/dog.99.jpg", "train/cat.5.jpg")):
        assert by_file[f].conflicting_duplicate and by_file[f].duplicates == [other]
        assert not by_file[f].label_issue and by_file[f].label_issue_score is None
    assert result.counts["conflicting_duplicate"] == 2
    rows = {r["file"]: r for r in csv.DictReader(open(out / "audit.csv", encoding="utf-8"))}
    assert rows["train/cat.5.jpg"]["conflicting_duplicate"] == "True"
    assert rows["train/cat.5.jpg"]["reason"] == "same bytes as train/dog.99.jpg"
    assert rows["train/cat.5.jpg"]["label_issue"] == "False"
    assert "| `conflicting_duplicate` |" in (out / "report.md").read_text()


# --------------------------------------------------------------------------- audit on images
def _planted_dataset(root, n=24, swaps=3):
    """n cats + n dogs of generated patterns; the first ``swaps`` of each class carry the other
    class's pattern (a swapped file name). Returns the planted relative paths."""
    planted = set()
    for label, cls in enumerate(("cat", "dog")):
        for i in range(1, n + 1):
            swapped = i <= swaps
            write_jpeg(root / "train" / f"{cls}.{i}.jpg", 100 * label + i, size=(48, 40),
                       label=1 - label if swapped else label)
            if swapped:
                planted.add(f"train/{cls}.{i}.jpg")
    for i in (1, 2):
        write_jpeg(root / "test" / f"{i}.jpg", 900 + i)
    return planted


@pytest.fixture(scope="module")
def tiny_site(tmp_path_factory):
    from conftest import install_fake_dist

    site = tmp_path_factory.mktemp("site")
    install_fake_dist(site, "catsdogs-tiny-classifier", "0.1",
                      {"catsdogs_tiny_classifier": TINY_CLASSIFIER},
                      {"tiny_classifier": "catsdogs_tiny_classifier"})
    return site


@pytest.fixture(scope="module")
def registry(tiny_site):
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(tiny_site))
        return Registry().load()


@pytest.mark.slow
def test_audit_adds_planted_swaps_to_csv_sheet_and_exclude_list(tmp_path, registry, record_property):
    data = tmp_path / "data"
    planted = _planted_dataset(data)
    out = tmp_path / "audit"
    result = audit(data, out, classifier="tiny_classifier", weights="none", image_size=32,
                   batch_size=8, label_issues=True,
                   cache_dir=tmp_path / "cache", write_exclude=tmp_path / "exclude.txt",
                   progress=False, registry=registry)
    flagged = {a.file for a in result.images if a.label_issue}
    precision, recall = _precision_recall(flagged, planted)
    record_property("measured", f"{len(planted)} planted swaps: {len(flagged)} flagged, "
                                f"precision {precision:.2f}, recall {recall:.2f}")
    assert precision >= 0.8 and recall >= 0.8, (flagged, planted)
    rows = {r["file"]: r for r in csv.DictReader(open(out / "audit.csv", encoding="utf-8"))}
    for f in flagged:
        assert rows[f]["label_issue"] == "True" and float(rows[f]["label_issue_score"]) > 0.5
    excluded = (tmp_path / "exclude.txt").read_text().splitlines()
    assert flagged <= set(excluded)
    assert (out / "flagged.png").is_file() and "label_issue" in (out / "report.md").read_text()
    assert result.counts["label_issue"] == len(flagged)


@pytest.mark.slow
def test_cli_label_issues(tmp_path, tiny_site):
    data = tmp_path / "data"
    planted = _planted_dataset(data)
    proc = run_cli("audit", str(data), "--out", str(tmp_path / "a"), "--classifier", "tiny_classifier",
                   "--weights", "none", "--image-size", "32", "--label-issues", "--backbone", "resnet50",
                   "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--json",
                   env={"PYTHONPATH": str(tiny_site)}, check=True)
    counts = json.loads(proc.stdout)["counts"]
    assert len(planted) * 0.8 <= counts["label_issue"] <= len(planted) * 1.25
    bad = run_cli("audit", str(data), "--out", str(tmp_path / "b"), "--classifier", "tiny_classifier",
                  "--weights", "none", "--label-issues", "--backbone", "nope", "--no-progress",
                  env={"PYTHONPATH": str(tiny_site)})
    assert bad.returncode == 1 and "Error:" in bad.stderr and "nope" in bad.stderr


@pytest.mark.slow
def test_planted_swaps_in_real_photos(tmp_path, record_property):
    """100 cats + 100 dogs of the mini set, 5 of each renamed to the other class: EfficientNet-Lite0
    ImageNet features + the finder flag the planted swaps."""
    if not (MINI / "train").is_dir():
        pytest.skip(f"shared mini data not present at {MINI}")
    reg = Registry().load()
    if "efficientnet_lite0" not in reg.names("backbones"):
        pytest.skip("the EfficientNet-Lite plugin is not installed")
    from catsdogs.audit.label_issues import label_issues_in

    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    planted = set()
    for cls, other in (("cat", "dog"), ("dog", "cat")):
        files = sorted((MINI / "train").glob(f"{cls}.*.jpg"))[:100]
        for k, src in enumerate(files):
            name = src.name if k >= 5 else f"{other}.{90000 + k}.jpg"
            (data / "train" / name).symlink_to(src)
            if k < 5:
                planted.add(f"train/{name}")
    (data / "test").mkdir()
    for src in sorted((MINI / "test").glob("*.jpg"))[:2]:  # a test split (an empty one fails to load)
        (data / "test" / src.name).symlink_to(src)
    found = label_issues_in(data, "efficientnet_lite0", cache_dir=tmp_path / "cache", progress=False,
                            registry=reg)
    precision, recall = _precision_recall({found.files[i] for i in found.ranked}, planted)
    record_property("measured", f"{len(planted)} swaps planted in 200 real photos: {len(found.ranked)} "
                                f"flagged, precision {precision:.2f}, recall {recall:.2f}")
    assert recall >= 0.8 and precision >= 0.5, ([found.files[i] for i in found.ranked], planted)
