"""Writing, validating, reading and scoring submission files."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from conftest import MINI

from catsdogs.errors import ConfigError, DataError
from catsdogs.runs.submission import (
    read_labels,
    read_submission,
    score_submission,
    validate_submission,
    write_submission,
)


def _df(ids, labels, columns=("id", "label")):
    return pd.DataFrame({columns[0]: ids, columns[1]: labels})


def _write(path, text):
    path.write_text(text)
    return path


# -------------------------------------------------------------------------------- writing
def test_round_trip(tmp_path):
    ids = [3, 1, 2, 10]
    probs = [0.7, 0.0001, 1.0, 0.123456789]
    out = write_submission(tmp_path / "sub" / "submission.csv", ids, probs,
                           expected_ids=[1, 2, 3, 10])
    assert out == tmp_path / "sub" / "submission.csv"
    lines = out.read_text().splitlines()
    assert lines == ["id,label", "1,0.005000", "2,0.995000", "3,0.700000", "10,0.123457"]
    df = read_submission(out, expected_ids=[1, 2, 3, 10])
    assert df["id"].tolist() == [1, 2, 3, 10]
    assert df["label"].tolist() == pytest.approx([0.005, 0.995, 0.7, 0.123457])
    validate_submission(df, clip_bounds=(0.005, 0.995))
    assert not [p for p in out.parent.iterdir() if p.name != "submission.csv"]  # no temp files


def test_write_without_clipping_keeps_exact_values(tmp_path):
    probs = [1e-9, 0.123456789012, 1.0]
    out = write_submission(tmp_path / "s.csv", [1, 2, 3], probs, clip_bounds=None)
    assert pd.read_csv(out)["label"].tolist() == probs


def test_write_with_fine_clip_bounds_stays_within_them(tmp_path):
    bounds = (1.5e-7, 1 - 1.5e-7)
    out = write_submission(tmp_path / "s.csv", [1, 2, 3], [0.0, 0.5, 1.0], clip_bounds=bounds)
    df = pd.read_csv(out)
    assert df["label"].min() > 0 and df["label"].max() < 1
    validate_submission(df, clip_bounds=bounds)


def test_write_accepts_string_and_float_ids(tmp_path):
    out = write_submission(tmp_path / "s.csv", np.array(["2", "1"]), [0.4, 0.6])
    assert pd.read_csv(out)["id"].tolist() == [1, 2]
    out = write_submission(tmp_path / "s.csv", np.array([2.0, 1.0]), [0.4, 0.6])
    assert pd.read_csv(out)["id"].tolist() == [1, 2]


@pytest.mark.parametrize(
    ("ids", "probs", "kwargs", "error", "match"),
    [
        ([1, 2], [0.5], {}, DataError, "2 ids but 1 probability"),
        ([1, 2], [0.5, np.nan], {}, DataError, "probability of id 2 is NaN"),
        ([1, 2], [np.inf, 0.5], {}, DataError, "probability of id 1 is inf"),
        ([1, 2], [0.5, 3.2], {}, DataError, r"probability of id 2 is 3.2, outside \[0, 1\]"),
        ([1, 1], [0.5, 0.5], {}, DataError, r"duplicate ids: 1 \(x2\)"),
        ([1, "x"], [0.5, 0.5], {}, DataError, "id at position 1 is not an integer: 'x'"),
        ([1, 2.5], [0.5, 0.5], {}, DataError, "not an integer: 2.5"),
        ([1, 2], [0.5, 0.5], {"expected_ids": [1, 2, 3]}, DataError, r"1 test id missing \(e.g. 3\)"),
        ([1, 2], [0.5, 0.5], {"clip_bounds": (0.9, 0.1)}, ConfigError, "clip bounds"),
    ],
)
def test_write_rejects_bad_input_and_writes_nothing(tmp_path, ids, probs, kwargs, error, match):
    path = tmp_path / "submission.csv"
    with pytest.raises(error, match=match):
        write_submission(path, ids, probs, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_previous_file(tmp_path):
    path = write_submission(tmp_path / "submission.csv", [1, 2], [0.3, 0.6])
    before = path.read_text()
    with pytest.raises(DataError, match="missing"):
        write_submission(path, [1, 2], [0.9, 0.9], expected_ids=[1, 2, 3])
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["submission.csv"]


# ----------------------------------------------------------------------------- validation
def test_validate_accepts_a_good_table():
    validate_submission(_df([1, 2, 3], [0.0, 0.5, 1.0]), expected_ids=[3, 2, 1])
    validate_submission(_df([1, 2], [0.005, 0.995 + 1e-13]), clip_bounds=(0.005, 0.995))


@pytest.mark.parametrize(
    ("df", "kwargs", "match"),
    [
        (_df([1], [0.5], ("id", "prob")), {}, "^submission.csv: header must be 'id,label', got 'id,prob'$"),
        (_df([1], [0.5], ("label", "id")), {}, "header must be 'id,label', got 'label,id'"),
        (pd.DataFrame({"id": [1], "label": [0.5], "x": [1]}), {}, "got 'id,label,x'"),
        (_df([], []), {}, "^submission.csv: no rows$"),
        (_df([], []), {"expected_ids": [1, 2]}, r"no rows \(expected 2 test ids\)"),
        (_df([1.0, np.nan], [0.5, 0.5]), {}, "data row 2 has no id"),
        (_df([1.0, 2.5], [0.5, 0.5]), {}, "ids must be integers; data row 1 has 1.0"),
        (_df(["a", "b"], [0.5, 0.5]), {}, "ids must be integers; data row 1 has 'a'"),
        (_df([True, False], [0.5, 0.5]), {}, "ids must be integers"),
        (_df([1, 2], [0.5, "abc"]), {}, "label of id 2 is not a number: 'abc'"),
        (_df([1, 2], [True, False]), {}, "labels must be numbers, got booleans"),
        (_df([1, 5, 5, 7, 7, 7], [0.5] * 6), {}, r"^submission.csv: duplicate ids: 5 \(x2\), 7 \(x3\)$"),
        (_df([2, 1, 3], [0.5] * 3), {}, "ids must be sorted ascending; id 1 comes after id 2 "
                                        r"\(data row 2\)"),
        (_df([1, 12, 13], [0.5, np.nan, np.nan]), {}, r"label of id 12 is NaN \(and 1 more NaN labels\)"),
        (_df([1, 12], [0.5, -np.inf]), {}, "label of id 12 is -inf"),
        (_df([1, 12], [1.2, 0.5]), {}, r"label of id 1 is 1.2, outside \[0, 1\]"),
        (_df([1, 12], [-0.0001, 0.5]), {}, r"outside \[0, 1\]"),
        (_df([1, 2], [0.001, 0.5]), {"clip_bounds": (0.005, 0.995)},
         r"label of id 1 is 0.001, outside the clip bounds \[0.005, 0.995\]"),
        (_df([1, 2], [0.5, 0.995 + 1e-9]), {"clip_bounds": (0.005, 0.995)}, "outside the clip bounds"),
        (_df([1, 2, 3], [0.5] * 3), {"expected_ids": [1, 2, 3, 17, 42, 99]},
         r"^submission.csv: 3 test ids missing \(e.g. 17, 42, 99\)$"),
        (_df(list(range(1, 11)), [0.5] * 10), {"expected_ids": [1]},
         "^submission.csv: 9 extra ids not in the test set: 2, 3, 4, 5, 6, ...$"),
        (_df([1, 2, 301], [0.5] * 3), {"expected_ids": [1, 2]},
         "^submission.csv: 1 extra id not in the test set: 301$"),
        (_df([1, 1, 301], [0.5] * 3), {"expected_ids": [1, 2]},
         r"duplicate ids: 1 \(x2\); 1 test id missing \(e.g. 2\); 1 extra id not in the test set: 301"),
        (_df([1, 2], [0.5] * 2), {"clip_bounds": (0.5, 0.5)}, None),
    ],
)
def test_validate_errors(df, kwargs, match):
    if match is None:  # bad parameters, not bad data
        with pytest.raises(ConfigError):
            validate_submission(df, source="submission.csv", **kwargs)
        return
    with pytest.raises(DataError, match=match):
        validate_submission(df, source="submission.csv", **kwargs)


def test_validate_reads_messages_from_a_file(tmp_path):
    path = _write(tmp_path / "submission.csv", "id,label\n1,0.5\n2,\n")
    with pytest.raises(DataError, match=f"^{path}: label of id 2 is NaN$"):
        read_submission(path)
    with pytest.raises(DataError, match="submission file not found"):
        read_submission(tmp_path / "nope.csv")
    with pytest.raises(DataError, match="file is empty"):
        read_submission(_write(tmp_path / "empty.csv", ""))


# --------------------------------------------------------------------------------- labels
def test_read_labels(tmp_path):
    path = _write(tmp_path / "labels.csv", "id,label,extra\n3,1,a\n1,0,b\n2,1,c\n")
    labels = read_labels(path)
    assert labels.index.tolist() == [1, 2, 3] and labels.tolist() == [0, 1, 1]
    assert labels.index.name == "id" and labels.name == "label"
    assert labels.dtype == np.int64


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("id,prob\n1,0\n", r"missing column 'label' \(found: id, prob\)"),
        ("x,y\n1,0\n", "missing columns 'id', 'label'"),
        ("id,label\n", "no rows"),
        ("id,label\n1,0\n2,0.5\n", r"labels must be 0 or 1; 1 label is not \(e.g. id 2: 0.5\)"),
        ("id,label\n1,0\n2,\n", r"labels must be 0 or 1.*id 2: nan"),
        ("id,label\n1,dog\n", "label of id 1 is not a number: 'dog'"),
        ("id,label\n1,0\n1,1\n", r"duplicate ids: 1 \(x2\)"),
        ("id,label\na,0\n", "ids must be integers"),
        ("", "file is empty"),
    ],
)
def test_read_labels_errors(tmp_path, text, match):
    path = _write(tmp_path / "labels.csv", text)
    with pytest.raises(DataError, match=match) as info:
        read_labels(path)
    assert str(path) in str(info.value)


def test_read_labels_missing_file(tmp_path):
    with pytest.raises(DataError, match="labels file not found: .*nope.csv"):
        read_labels(tmp_path / "nope.csv")
    with pytest.raises(DataError, match="labels file is not a file"):
        read_labels(tmp_path)


# -------------------------------------------------------------------------------- scoring
def test_score_hand_computed(tmp_path):
    labels = _write(tmp_path / "labels.csv", "id,label\n1,1\n2,0\n3,1\n")
    # any row order is accepted when scoring
    sub = _write(tmp_path / "sub.csv", "id,label\n3,0.4\n1,0.9\n2,0.2\n")
    s = score_submission(sub, labels)
    assert s["logloss"] == pytest.approx(-(math.log(0.9) + math.log(0.8) + math.log(0.4)) / 3)
    assert s["accuracy"] == pytest.approx(2 / 3) and s["n"] == 3


def test_score_uses_labels_as_submitted_with_kaggle_eps(tmp_path):
    labels = _write(tmp_path / "labels.csv", "id,label\n1,1\n2,0\n")
    sub = _write(tmp_path / "sub.csv", "id,label\n1,0\n2,0\n")
    assert score_submission(sub, labels)["logloss"] == pytest.approx(-math.log(1e-15) / 2)
    out = write_submission(tmp_path / "w.csv", [1, 2], [0.0, 0.0])  # clipped to 0.005
    assert score_submission(out, labels)["logloss"] == pytest.approx(
        -(math.log(0.005) + math.log(0.995)) / 2)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("id,label\n1,0.5\n", r"1 test id missing \(e.g. 2\)"),
        ("id,label\n1,0.5\n2,0.5\n3,0.5\n", "1 extra id not in the test set: 3"),
        ("id,label\n1,0.5\n1,0.5\n2,0.5\n", r"duplicate ids: 1 \(x2\)"),
        ("id,prob\n1,0.5\n2,0.5\n", "header must be 'id,label', got 'id,prob'"),
        ("id,label\n1,0.5\n2,1.5\n", r"label of id 2 is 1.5, outside \[0, 1\]"),
    ],
)
def test_score_errors_name_the_submission(tmp_path, text, match):
    labels = _write(tmp_path / "labels.csv", "id,label\n1,1\n2,0\n")
    sub = _write(tmp_path / "sub.csv", text)
    with pytest.raises(DataError, match=match) as info:
        score_submission(sub, labels)
    assert str(info.value).startswith(f"{sub}: ")


def test_score_missing_files(tmp_path):
    labels = _write(tmp_path / "labels.csv", "id,label\n1,1\n")
    with pytest.raises(DataError, match="submission file not found"):
        score_submission(tmp_path / "nope.csv", labels)
    with pytest.raises(DataError, match="labels file not found"):
        score_submission(labels, tmp_path / "nope.csv")


# -------------------------------------------------------------------- the shared mini data
@pytest.fixture
def mini_labels():
    path = MINI / "test_labels.csv"
    if not path.is_file():
        pytest.skip(f"shared mini labels not present at {path}")
    return path


def test_constant_half_on_mini_scores_ln2(tmp_path, mini_labels):
    labels = read_labels(mini_labels)
    assert len(labels) > 0 and set(labels.unique()) <= {0, 1}
    sub = write_submission(tmp_path / "submission.csv", labels.index, np.full(len(labels), 0.5),
                           expected_ids=labels.index)
    s = score_submission(sub, mini_labels)
    assert s["logloss"] == pytest.approx(math.log(2)) and round(s["logloss"], 4) == 0.6931
    assert s["n"] == len(labels)


def test_perfect_submission_on_mini_scores_the_clip_floor(tmp_path, mini_labels):
    labels = read_labels(mini_labels)
    sub = write_submission(tmp_path / "submission.csv", labels.index, labels.to_numpy(float))
    s = score_submission(sub, mini_labels)
    assert s["accuracy"] == 1.0
    assert s["logloss"] == pytest.approx(-math.log(0.995))
