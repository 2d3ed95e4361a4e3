"""Kaggle submission files (``id,label`` with P(dog) per test image): write, validate, score.

A valid submission has the header ``id,label`` exactly, one row per test id (integers, unique,
sorted ascending) and finite labels in ``[0, 1]``. :func:`write_submission` clips the
probabilities, validates the table *before* writing and writes it atomically, so a failed call
never leaves a half-written or invalid file behind. :func:`score_submission` computes the
competition metric against a labels file such as ``dogs-vs-cats-mini/test_labels.csv``.

Every problem raises :class:`~catsdogs.errors.DataError` with a message that names the file (or
the ``source`` given) and shows example ids, e.g.
``submission.csv: 3 test ids missing (e.g. 17, 42, 99)``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import cast

import numpy as np
import pandas as pd

from catsdogs.errors import ConfigError, DataError
from catsdogs.evaluation.metrics import accuracy, check_clip_bounds, log_loss
from catsdogs.runs.postprocess import apply_to_test, transform_of
from catsdogs.runs.record import load_record
from catsdogs.util.fileio import atomic_write
from catsdogs.validation import is_int

__all__ = [
    "read_labels",
    "read_submission",
    "score_submission",
    "validate_submission",
    "write_run_submission",
    "write_submission",
]

logger = logging.getLogger("catsdogs")

HEADER = ("id", "label")
#: how many example ids an error message shows
_SHOW = 5
#: slack when checking labels against the clip bounds (they went through decimal text)
_TOL = 1e-12
#: ids are stored as int64
_ID_MIN, _ID_MAX = -(2**63), 2**63 - 1


# ----------------------------------------------------------------------------------- helpers
def _show(values, limit: int = _SHOW) -> str:
    values = list(values)
    text = ", ".join(str(v) for v in values[:limit])
    return text + (", ..." if len(values) > limit else "")


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else (plural or word + 's')}"


_is_int = is_int  # Python and NumPy integers, never booleans


def _out_of_range(source: str, row: int, v) -> DataError:
    return DataError(f"{source}: id {v} (data row {row}) is out of range: ids must fit in 64 bits "
                     f"({_ID_MIN} to {_ID_MAX})")


def _id_array(col: pd.Series, source: str) -> np.ndarray:
    """The id column as int64, or a DataError naming the first id that is not an integer or does
    not fit in int64 (pandas reads those as uint64 or Python ints)."""
    na = col.isna().to_numpy()
    if na.any():
        raise DataError(f"{source}: data row {int(np.argmax(na)) + 1} has no id")
    if pd.api.types.is_integer_dtype(col) and not pd.api.types.is_bool_dtype(col):
        if col.dtype.kind == "u":
            big = col.to_numpy() > _ID_MAX
            if big.any():
                i = int(np.argmax(big))
                raise _out_of_range(source, i + 1, col.iloc[i])
        return col.to_numpy(dtype=np.int64)
    for row, v in enumerate(col.tolist(), start=1):
        if not _is_int(v):
            raise DataError(f"{source}: ids must be integers; data row {row} has {v!r}")
        if not _ID_MIN <= int(v) <= _ID_MAX:
            raise _out_of_range(source, row, v)
    return col.to_numpy(dtype=np.int64)  # an object column holding only ints


def _value_array(col: pd.Series, ids: np.ndarray, source: str, noun: str = "label") -> np.ndarray:
    """A column of numbers as float64, or a DataError naming the first id whose value is not one."""
    if pd.api.types.is_bool_dtype(col):
        raise DataError(f"{source}: {noun}s must be numbers, got booleans")
    values = col if pd.api.types.is_numeric_dtype(col) else pd.to_numeric(col, errors="coerce")
    bad = (values.isna() & col.notna()).to_numpy()
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(f"{source}: {noun} of id {ids[i]} is not a number: {col.iloc[i]!r}")
    return values.to_numpy(dtype=np.float64, na_value=np.nan)


def _check_values(ids: np.ndarray, values: np.ndarray, source: str, noun: str = "label",
                  bounds: tuple[float, float] | None = None) -> None:
    """Finite, in [0, 1] and, when ``bounds`` are given, within them (up to ``_TOL``)."""
    def fail(mask: np.ndarray, what: Callable[[float], str], kind: str) -> None:
        i = int(np.argmax(mask))
        n = int(mask.sum())
        more = f" (and {n - 1} more {kind})" if n > 1 else ""
        raise DataError(f"{source}: {noun} of id {ids[i]} is {what(float(values[i]))}{more}")

    nan = np.isnan(values)
    if nan.any():
        fail(nan, lambda v: "NaN", f"NaN {noun}s")
    inf = np.isinf(values)
    if inf.any():
        fail(inf, lambda v: "inf" if v > 0 else "-inf", f"infinite {noun}s")
    out = (values < 0.0) | (values > 1.0)
    if out.any():
        fail(out, lambda v: f"{v!r}, outside [0, 1]", f"{noun}s outside [0, 1]")
    if bounds is not None:
        lo, hi = bounds
        out = (values < lo - _TOL) | (values > hi + _TOL)
        if out.any():
            fail(out, lambda v: f"{v!r}, outside the clip bounds [{lo:g}, {hi:g}]",
                 f"{noun}s outside the clip bounds")


def _id_set_problems(ids: np.ndarray, expected: np.ndarray | None) -> list[str]:
    problems = []
    uniq, counts = np.unique(ids, return_counts=True)
    dup = counts > 1
    if dup.any():
        shown = [f"{i} (x{c})" for i, c in zip(uniq[dup], counts[dup])]
        extra = f" ({int(dup.sum())} ids repeated)" if len(shown) > _SHOW else ""
        problems.append(f"duplicate ids: {_show(shown)}{extra}")
    if expected is not None:
        missing = np.setdiff1d(expected, uniq)
        if missing.size:
            problems.append(f"{_plural(missing.size, 'test id')} missing (e.g. {_show(missing)})")
        unknown = np.setdiff1d(uniq, expected)
        if unknown.size:
            problems.append(
                f"{_plural(unknown.size, 'extra id')} not in the test set: {_show(unknown)}")
    return problems


def _expected_array(expected_ids: Iterable[int]) -> np.ndarray:
    values = list(expected_ids)
    bad = [v for v in values if not _is_int(v)]
    if bad:
        raise DataError(f"expected test ids must be integers, got {bad[0]!r}")
    return np.unique(np.asarray(values, dtype=np.int64))


def _check(df: pd.DataFrame, *, expected_ids, clip_bounds, source: str,
           require_sorted: bool) -> tuple[np.ndarray, np.ndarray]:
    """Every check of :func:`validate_submission`; returns (ids, labels) as arrays."""
    if not isinstance(df, pd.DataFrame):
        raise DataError(f"{source}: expected a pandas DataFrame, got {type(df).__name__}")
    header = [str(c) for c in df.columns]
    if tuple(header) != HEADER:
        raise DataError(f"{source}: header must be 'id,label', got '{','.join(header)}'")
    expected = None if expected_ids is None else _expected_array(expected_ids)
    if clip_bounds is not None:
        clip_bounds = check_clip_bounds(*clip_bounds)
    if len(df) == 0:
        wanted = "" if expected is None else f" (expected {_plural(expected.size, 'test id')})"
        raise DataError(f"{source}: no rows{wanted}")
    ids = _id_array(df["id"], source)
    labels = _value_array(df["label"], ids, source)
    problems = _id_set_problems(ids, expected)
    if problems:
        raise DataError(f"{source}: " + "; ".join(problems))
    if require_sorted:
        step = np.diff(ids)
        if (step < 0).any():
            i = int(np.argmax(step < 0)) + 1
            raise DataError(f"{source}: ids must be sorted ascending; id {ids[i]} comes after id "
                            f"{ids[i - 1]} (data row {i + 1})")
    _check_values(ids, labels, source, "label", clip_bounds)
    return ids, labels


def _read_csv(path: Path, what: str) -> pd.DataFrame:
    if not path.exists():
        raise DataError(f"{what} not found: {path}")
    if not path.is_file():
        raise DataError(f"{what} is not a file: {path}")
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: file is empty (expected a CSV with header 'id,label')") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable CSV file ({exc})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None


def _coerce_ids(ids, source: str) -> np.ndarray:
    """Ids given as ints, integral floats or digit strings (e.g. file stems) as int64."""
    arr = np.asarray(ids)
    if arr.ndim != 1:
        arr = arr.ravel()
    if arr.dtype.kind == "i" or (arr.dtype.kind == "u" and (arr.size == 0 or arr.max() <= _ID_MAX)):
        return arr.astype(np.int64)
    out = np.empty(arr.size, dtype=np.int64)
    for i, v in enumerate(arr.tolist()):
        if _is_int(v):
            value = int(v)
        elif isinstance(v, float) and np.isfinite(v) and v.is_integer():
            value = int(v)
        elif isinstance(v, str) and re.fullmatch(r"[+-]?[0-9]+", v.strip()):  # ASCII digits only
            value = int(v.strip())
        else:
            raise DataError(f"{source}: id at position {i} is not an integer: {v!r}")
        if not _ID_MIN <= value <= _ID_MAX:
            raise DataError(f"{source}: id at position {i} is out of range: {v!r} does not fit in "
                            "64 bits")
        out[i] = value
    return out


def _float_format(bounds: tuple[float, float] | None) -> str | None:
    """'%.6f', or more decimals when the clip bounds need them; exact text when not clipping.

    With bounds that are exact at ``d`` decimals, rounding a value inside them to ``d`` decimals
    keeps it inside them, so the written file passes the same validation as the table.
    """
    if bounds is None:
        return None  # shortest text that reads back as the same float
    for decimals in range(6, 16):
        if all(round(b, decimals) == b for b in bounds):
            return f"%.{decimals}f"
    return None


# ------------------------------------------------------------------------------------- API
def validate_submission(df: pd.DataFrame, *, expected_ids: Iterable[int] | None = None,
                        clip_bounds: tuple[float, float] | None = None,
                        source: str = "submission") -> None:
    """Raise :class:`DataError` unless ``df`` is a valid submission table.

    Checks: the columns are exactly ``id,label``; ids are integers, unique and sorted ascending;
    labels are finite numbers in ``[0, 1]`` and, when ``clip_bounds`` is given, within them
    (tolerance 1e-12); when ``expected_ids`` is given, every expected id occurs exactly once and
    no other id occurs. Messages start with ``source``.
    """
    _check(df, expected_ids=expected_ids, clip_bounds=clip_bounds, source=source,
           require_sorted=True)


def write_submission(path: str | os.PathLike, ids, probabilities, *,
                     clip_bounds: tuple[float, float] | None = (0.005, 0.995),
                     expected_ids: Iterable[int] | None = None) -> Path:
    """Write a submission CSV and return its path.

    ``probabilities`` (P(dog), one per id, in ``[0, 1]``) are clipped to ``clip_bounds`` (None:
    not clipped), the rows sorted by id, and the table validated with
    :func:`validate_submission` before anything is written. The file is written atomically
    (temporary file, fsync, rename), with header ``id,label`` and labels as ``%.6f`` (more
    decimals when the clip bounds need them; exact text when not clipping).
    """
    path = Path(path)
    source = str(path)
    id_arr = _coerce_ids(ids, source)
    try:
        probs = np.asarray(probabilities, dtype=np.float64).ravel()
    except (TypeError, ValueError) as exc:
        raise DataError(f"{source}: probabilities must be numbers ({exc})") from None
    if probs.size != id_arr.size:
        raise DataError(f"{source}: {_plural(id_arr.size, 'id')} but "
                        f"{_plural(probs.size, 'probability', 'probabilities')}")
    bounds = None if clip_bounds is None else check_clip_bounds(*clip_bounds)
    # check before clipping: clipping would hide NaN-free garbage such as inf or logits
    _check_values(id_arr, probs, source, "probability")
    if bounds is not None:
        probs = np.clip(probs, *bounds)
    order = np.argsort(id_arr, kind="stable")
    df = pd.DataFrame({"id": id_arr[order], "label": probs[order]})
    validate_submission(df, expected_ids=expected_ids, clip_bounds=bounds, source=source)
    text = df.to_csv(index=False, float_format=_float_format(bounds), lineterminator="\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))
    return path


def read_submission(path: str | os.PathLike, *,
                    expected_ids: Iterable[int] | None = None) -> pd.DataFrame:
    """Read a submission CSV and validate it with :func:`validate_submission`."""
    path = Path(path)
    df = _read_csv(path, "submission file")
    validate_submission(df, expected_ids=expected_ids, source=str(path))
    return df


def read_labels(path: str | os.PathLike) -> pd.Series:
    """True labels from an ``id,label`` CSV (extra columns are ignored).

    Returns a Series named ``label`` of 0/1 ints (1 = dog), indexed by integer ``id``, sorted
    by id. Raises :class:`DataError` for a missing or unreadable file, missing columns, ids that
    are not unique integers and labels other than 0/1.
    """
    path = Path(path)
    source = str(path)
    df = _read_csv(path, "labels file")
    missing = [c for c in HEADER if c not in df.columns]
    if missing:
        found = ", ".join(str(c) for c in df.columns)
        raise DataError(f"{source}: missing column{'s' if len(missing) > 1 else ''} "
                        f"{', '.join(repr(c) for c in missing)} (found: {found})")
    if len(df) == 0:
        raise DataError(f"{source}: no rows")
    ids = _id_array(df["id"], source)
    values = _value_array(df["label"], ids, source)
    bad = ~np.isin(values, (0.0, 1.0))
    if bad.any():
        i = int(np.argmax(bad))
        n = int(bad.sum())
        raise DataError(f"{source}: labels must be 0 or 1; {_plural(n, 'label')} "
                        f"{'is' if n == 1 else 'are'} not (e.g. id {ids[i]}: {float(values[i])!r})")
    problems = _id_set_problems(ids, None)
    if problems:
        raise DataError(f"{source}: " + "; ".join(problems))
    series = pd.Series(values.astype(np.int64), index=pd.Index(ids, name="id"), name="label")
    return series.sort_index()


def score_submission(submission_path: str | os.PathLike,
                     labels_path: str | os.PathLike) -> dict:
    """Score a submission file against a labels file: ``{"logloss", "accuracy", "n"}``.

    The submission must pass :func:`validate_submission` with the labels' ids as the expected
    ids, except that its rows may come in any order. The log loss is that of the labels as
    submitted, clipped only at 1e-15 against log(0), as Kaggle does.
    """
    truth = read_labels(labels_path)
    path = Path(submission_path)
    df = _read_csv(path, "submission file")
    ids, labels = _check(df, expected_ids=truth.index.to_numpy(), clip_bounds=None,
                         source=str(path), require_sorted=False)
    p = pd.Series(labels, index=ids).reindex(truth.index).to_numpy()
    y = truth.to_numpy()
    return {"logloss": log_loss(y, p, eps=1e-15), "accuracy": accuracy(y, p), "n": int(y.size)}


def write_run_submission(run_dir: str | os.PathLike, path: str | os.PathLike, *,
                         clip: tuple[float, float] | None = None,
                         expected_ids: list[int] | None = None) -> Path:
    """Write Kaggle's ``submission.csv`` from a finished run's test predictions (its
    ``test_predictions.csv``), post-processed as the run chose, or clipped to ``clip``.

    Test images that could not be read have no prediction; they get 0.5 (with a warning), since
    Kaggle needs every id. ``expected_ids`` defaults to the experiment's ``test_ids.json``.
    """
    run_dir = Path(run_dir)
    record = load_record(run_dir)
    preds_path = run_dir / "test_predictions.csv"
    if not preds_path.is_file():
        raise DataError(f"run {record.run_id!r} has no test predictions (the data had no test/ images)")
    preds = pd.read_csv(preds_path)
    if expected_ids is None:
        ids_file = run_dir.parent.parent / "test_ids.json"
        expected_ids = json.loads(ids_file.read_text()) if ids_file.is_file() else preds["id"].tolist()
    probs = dict(zip(preds["id"].astype(int).tolist(), preds["p_dog"].astype(float).tolist()))
    missing = [i for i in expected_ids if i not in probs]
    if missing:
        logger.warning("%d test images had no prediction (unreadable); submitting 0.5 for ids %s",
                       len(missing), ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else ""))
    ids = list(expected_ids)
    values = [probs.get(i, 0.5) for i in ids]
    if clip is None:  # the run's chosen post-processing (a fixed clip for older records), applied
        # as it was chosen: to each fold head's predictions of a k-fold run, then averaged
        post = dict(zip(preds["id"].astype(int).tolist(), apply_to_test(transform_of(record), preds).tolist()))
        return write_submission(Path(path), ids, [post.get(i, 0.5) for i in ids],
                                clip_bounds=None, expected_ids=ids)
    bounds = cast("tuple[float, float]", tuple(clip))  # the pair; tuple() widens it to tuple[float, ...]
    if not (0 <= bounds[0] < bounds[1] <= 1):
        raise ConfigError(f"clip bounds must satisfy 0 <= lo < hi <= 1, got {list(bounds)}")
    return write_submission(Path(path), ids, values, clip_bounds=bounds, expected_ids=ids)
