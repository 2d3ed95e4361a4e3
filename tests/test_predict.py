"""`catsdogs predict` / `catsdogs cam` and the neither-cat-nor-dog score, on real exported models."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import run_cli, write_jpeg
from export_fixtures import session_runs
from PIL import Image

from catsdogs.app.cam import overlay, title
from catsdogs.app.export import load_run
from catsdogs.app.neither import NeitherStats, fit_stats
from catsdogs.app.predict import open_predictor
from catsdogs.dataset.images import load_image


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    return session_runs(tmp_path_factory)


def test_the_cli_offers_the_predictors_backends():
    from catsdogs import cli
    from catsdogs.app.predict import BACKENDS

    assert tuple(cli.BACKENDS) == BACKENDS


@pytest.mark.slow  # uses the session's exported runs (about a minute to build)
def test_cli_predict_json_cam_and_unreadable_files(runs, tmp_path):
    test = runs["data"] / "test"
    good = [test / "1.jpg", test / "2.jpg"]
    empty = tmp_path / "x.jpg"
    empty.write_bytes(b"")
    html = tmp_path / "page.jpg"
    html.write_text("<!DOCTYPE html><html><body>404</body></html>")
    proc = run_cli("predict", *map(str, good), str(empty), str(html), str(tmp_path / "gone.jpg"),
                   "--model", str(runs["cam_export"]), "--json", "--cam", str(tmp_path / "cam.png"))
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"skipped {empty}: empty file (0 bytes)" in proc.stderr
    assert f"skipped {html}: not an image (an HTML/XML document)" in proc.stderr
    assert f"skipped {tmp_path / 'gone.jpg'}: cannot read file (No such file or directory)" in proc.stderr
    assert "3 of 5 images could not be read" in proc.stderr
    rows = json.loads(proc.stdout)
    assert [r["error"] is None for r in rows] == [True, True, False, False, False]
    expected = pd.read_csv(runs["cam"] / "test_predictions.csv").set_index("file")["p_dog"]
    transform = load_run(runs["cam"]).transform  # the run's post-processing, in the graph
    for row, path in zip(rows, good):
        assert abs(row["p_dog"] - transform.apply(expected[f"test/{path.name}"])) <= 1e-4  # == the run
        assert row["label"] == ("dog" if row["p_dog"] >= 0.5 else "cat")
        assert isinstance(row["neither"], bool) and row["neither_threshold"] > 0
        assert isinstance(row["neither_score"], float)
        with Image.open(row["cam"]) as im:  # the overlay has the photo's size
            assert im.size == Image.open(path).size and im.mode == "RGB"
    assert rows[2]["error"] == "empty file (0 bytes)"


@pytest.mark.slow  # uses the session's exported runs (about a minute to build)
def test_cli_predict_text_and_cam_errors(runs, tmp_path):
    photo = write_jpeg(tmp_path / "pet.jpg", 3, size=(90, 60), label=1)
    out = tmp_path / "overlay.png"
    proc = run_cli("predict", str(photo), "--model", str(runs["cam_export"]), "--cam", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{photo}: ") and "% (P(dog) = " in proc.stdout
    assert f"-> CAM {out}" in proc.stdout
    assert Image.open(out).size == (90, 60)

    no_cam = run_cli("predict", str(photo), "--model", str(runs["mixed_export"]), "--cam", str(out))
    assert no_cam.returncode == 1 and "Traceback" not in no_cam.stderr
    assert "CAM-capable" in no_cam.stderr
    missing = run_cli("predict", str(photo), "--model", str(tmp_path))
    assert missing.returncode == 1 and "neither an export directory" in missing.stderr


@pytest.mark.slow  # uses the session's exported runs (about a minute to build)
def test_cli_cam_grid(runs, tmp_path):
    out = tmp_path / "grid.png"
    proc = run_cli("cam", str(runs["cam"]), "--grid", "4", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and "(4 images)" in proc.stdout
    with Image.open(out) as im:
        assert im.size[0] > 300 and im.size[1] > 300
    bad = run_cli("cam", str(runs["mixed"]), "--out", str(out))
    assert bad.returncode == 1 and "not CAM-capable" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow  # uses the session's exported runs (about a minute to build)
def test_run_dir_and_export_agree(runs):
    """The in-memory Keras rebuild of a run and its exported TFLite model give the same answers."""
    from_run = open_predictor(runs["cam"])
    exported = open_predictor(runs["cam_export"], "tflite")
    assert from_run.backend == "keras" and exported.backend == "tflite"
    assert from_run.threshold == pytest.approx(exported.threshold)
    for path in sorted((runs["data"] / "test").glob("*.jpg"))[:3]:
        image = load_image(path, 64)
        a, b = from_run.predict_image(image), exported.predict_image(image)
        assert abs(a.p_dog - b.p_dog) <= 1e-4 and abs(a.neither_score - b.neither_score) <= 1e-4
        (ma, pa), (mb, pb) = from_run.cam(image), exported.cam(image)
        assert np.abs(ma - mb).max() <= 1e-4 and np.abs(pa - pb).max() <= 1e-4


def test_overlay_and_title():
    photo = np.full((60, 90, 3), 128, np.uint8)
    cam = np.zeros((3, 3), np.float32)
    cam[0, 2] = 5.0  # hot top-right
    out = overlay(photo, cam)
    assert out.shape == photo.shape and out.dtype == np.uint8
    assert out[5, 85, 0] > out[55, 5, 0] and out[55, 5, 2] > out[5, 85, 2]  # red vs blue (JET)
    assert title("dog", 0.982) == "dog 98.20%" and title("cat", 0.5) == "cat 50.00%"


def test_neither_stats(tmp_path):
    import keras

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 32)) + 3
    pets = np.abs(centres[rng.integers(0, 4, 600)] + 0.2 * rng.normal(size=(600, 32)))
    stats = fit_stats(pets[:500], pets[500:], centroids=8, quantile=0.99)
    assert stats.centroids.shape == (8, 32)
    assert stats.calibration_flagged <= 0.02
    others = np.abs(rng.normal(size=(50, 32)) * 3)
    assert np.mean(stats.score(others) > stats.threshold) > 0.9
    assert np.mean(stats.score(pets[:500]) > stats.threshold) < 0.05
    # the in-graph score (exported as `neither_score`) is the same number
    inp = keras.Input((32,))
    model = keras.Model(inp, stats.score_layer(inp))
    np.testing.assert_allclose(np.asarray(model(others.astype(np.float32)))[:, 0], stats.score(others),
                               atol=1e-5)
    stats.save(tmp_path / "n.npz")
    again = NeitherStats.load(tmp_path / "n.npz")
    assert again.threshold == stats.threshold and np.array_equal(again.centroids, stats.centroids)
