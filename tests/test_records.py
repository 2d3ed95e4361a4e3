"""Typed, versioned run records: today's record.json loads, round-trips, and bad ones are refused clearly."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

from catsdogs.errors import DataError
from catsdogs.runs.record import RECORD_VERSION, RunRecord, load_record

#: a record.json as `catsdogs run` wrote it before RunRecord existed (keys and value types)
LEGACY = {
    "record_version": 1,
    "run_id": "resnet50__dropout_sigmoid__adam",
    "combination": ["resnet50"],
    "head": {"name": "dropout_sigmoid", "params": {"dropout": 0.5}},
    "optimizer": {"name": "adam", "learning_rate": 0.01},
    "params": {"dropout": 0.5},
    "learning_rate": 0.01,
    "settings": {"features": {"resnet50": {"config_key": "abc", "dataset_fingerprint": "fp"}},
                 "epochs": 3, "record_version": 1},
    "settings_hash": "0123456789abcdef",
    "metrics": {"logloss": 0.3, "logloss_clipped": 0.29, "accuracy": 0.9, "best_clip_lo": 0.01,
                "best_clip_hi": 0.99, "best_clip_logloss": 0.28, "n": 8},
    "tta": False,
    "tuning": None,
    "history": [{"loss": [0.7, 0.5], "val_loss": [0.6, 0.4]}],
    "n_train": 24,
    "n_val": 8,
    "n_test": 6,
    "validation": {"kind": "holdout", "holdout": 0.25, "folds": 5},
    "clip": [0.005, 0.995],
    "under_target": False,
    "target": 0.06127,
    "seconds": 1.5,
    "created": "2026-11-27T10:00:00+0000",
    "catsdogs_version": "0.1.0",
}


def _write(run_dir, doc):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "record.json").write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
    return run_dir


def test_legacy_record_loads_typed_and_round_trips(tmp_path):
    rec = load_record(_write(tmp_path / "run", LEGACY))
    assert rec.head.name == "dropout_sigmoid" and rec.optimizer.learning_rate == 0.01
    assert rec.metrics.logloss_clipped == 0.29 and rec.validation.kind == "holdout"
    assert rec.feature_keys["resnet50"]["config_key"] == "abc"
    # same keys, same values (plus the derived ranking number): finished run dirs keep working
    assert rec.to_dict() == {**LEGACY, "ranking_logloss": 0.29}
    (tmp_path / "again").mkdir()
    rec.save(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "record.json").read_text()) == rec.to_dict()


def test_unknown_keys_survive_and_new_optional_fields_default(tmp_path):
    doc = {**LEGACY, "written_by_plugin": {"x": 1},
           "metrics": {**LEGACY["metrics"], "temperature": 1.3}}
    rec = load_record(_write(tmp_path / "run", doc))
    assert rec.extra == {"written_by_plugin": {"x": 1}} and rec.metrics.extra == {"temperature": 1.3}
    assert rec.aligned_on is None and rec.test_metrics is None
    rec.save(tmp_path / "run")
    again = json.loads((tmp_path / "run" / "record.json").read_text())
    assert again["written_by_plugin"] == {"x": 1} and again["metrics"]["temperature"] == 1.3
    assert "test_metrics" not in again  # computed per call, never stored


def test_under_target_follows_the_current_target(tmp_path):
    rec = load_record(_write(tmp_path / "run", {**LEGACY, "under_target": True}))
    assert rec.under_target is False  # 0.29 is not under 0.06127, whatever the file claimed
    rec.target = 0.5
    assert rec.under_target is True and rec.to_dict()["under_target"] is True


def test_one_ranking_number_drives_under_target(tmp_path):
    """Issue 20 item 5: ✓ / under_target used the fixed-clip loss while the ranking used the
    post-processed one. Both now read :attr:`RunRecord.ranking_logloss`."""
    post = {"method": "auto", "transform": {"kind": "none", "learned": False}, "logloss_raw": 0.3,
            "logloss_post": 0.05, "logloss_post_insample": 0.05, "cv": {}, "folds": 5}
    rec = load_record(_write(tmp_path / "run", {**LEGACY, "postprocess": post}))
    assert rec.metrics.logloss_clipped == 0.29 and rec.ranking_logloss == 0.05
    assert rec.under_target is True  # 0.05 < 0.06127, although the fixed clip's 0.29 is not
    saved = rec.to_dict()
    assert saved["ranking_logloss"] == 0.05 and saved["under_target"] is True
    assert "ranking_logloss" not in load_record(_write(tmp_path / "again", saved)).extra  # derived


@pytest.mark.parametrize("doc, message", [
    ({**LEGACY, "record_version": RECORD_VERSION + 1},
     f"record version {RECORD_VERSION + 1} was written by a newer catsdogs"),
    ({k: v for k, v in LEGACY.items() if k != "record_version"}, "record_version is missing"),
    ({**LEGACY, "record_version": "1"}, "record_version is missing or not an integer"),
    ([1, 2, 3], "expected a JSON object, found an array"),
    ("\"a string\"", "expected a JSON object, found a string"),
    ({k: v for k, v in LEGACY.items() if k not in ("metrics", "run_id")}, "missing run_id, metrics"),
    ({**LEGACY, "metrics": 3}, "record.json.metrics: expected a JSON object, found a number"),
    ({**LEGACY, "metrics": {"logloss": 0.3}}, "record.json.metrics: missing logloss_clipped"),
    ("{not json", "unreadable run record"),
    ({**LEGACY, "n_train": "800"}, "record.json.n_train: expected an integer, found a string"),
    ({**LEGACY, "tta": 1}, "record.json.tta: expected a boolean, found a number"),
    ({**LEGACY, "combination": "resnet50"}, "record.json.combination: expected an array, found a"),
    ({**LEGACY, "metrics": {**LEGACY["metrics"], "logloss": None}},
     "record.json.metrics.logloss: expected a number, found null"),
])
def test_bad_records_are_refused_naming_the_file(tmp_path, doc, message):
    run_dir = _write(tmp_path / "run", doc)
    with pytest.raises(DataError, match="record") as info:
        RunRecord.load(run_dir)
    assert message in str(info.value) and str(run_dir / "record.json") in str(info.value)


def test_cli_reports_a_bad_record_as_one_error_line(tmp_path):
    """Issue 9 item 12: a record.json that is JSON but not an object is one `Error:` line."""
    run_dir = _write(tmp_path / "out" / "runs" / "r", [1, 2])
    (tmp_path / "out" / "experiment.json").write_text("{}")
    for args in (["export", str(run_dir)], ["predict-test", str(run_dir)]):
        proc = run_cli(*args, timeout=120)
        assert proc.returncode == 1, proc.stderr
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert lines[-1].startswith("Error: ") and "expected a JSON object, found an array" in lines[-1]
        assert "Traceback" not in proc.stderr
    future = _write(tmp_path / "out" / "runs" / "f", {**LEGACY, "record_version": 99})
    proc = run_cli("export", str(future), timeout=120)
    assert proc.returncode == 1 and "written by a newer catsdogs" in proc.stderr
    assert "Traceback" not in proc.stderr
