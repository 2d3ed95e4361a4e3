"""Fixtures: a private catsdogs cache, the shared mini data, ImageNet classifiers built once."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

HERE = Path(__file__).resolve().parent
#: ``<repo>/plugins/catsdogs-efficientnet-lite/tests`` -> the shared data beside ``<repo>``
SHARED_DATA = Path(os.environ.get("CATSDOGS_SHARED_DATA", HERE.parents[3] / "shared" / "data"))
MINI_TRAIN = SHARED_DATA / "dogs-vs-cats-mini" / "train"

VARIANT_NAMES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")

#: (section, line) pairs printed at the end of the run (parity differences, ImageNet rates)
REPORT: list[tuple[str, str]] = []


def pytest_terminal_summary(terminalreporter):
    if REPORT:
        terminalreporter.section("EfficientNet-Lite measurements")
        for section, line in REPORT:
            terminalreporter.write_line(f"{section}: {line}")


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Converted weights go to a fresh cache for the session, never the user's."""
    path = tmp_path_factory.mktemp("catsdogs-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("CATSDOGS_CACHE_DIR", str(path))
    yield path
    mp.undo()


def mini_files(kind: str, n: int) -> list[Path]:
    """The first ``n`` of ``kind.<id>.jpg`` in the mini train set, by numeric id."""
    if not MINI_TRAIN.is_dir():
        pytest.skip(f"shared mini data not present at {MINI_TRAIN}")
    files = sorted(MINI_TRAIN.glob(f"{kind}.*.jpg"), key=lambda p: int(p.name.split(".")[1]))
    if len(files) < n:
        pytest.skip(f"need {n} {kind} images in {MINI_TRAIN}, found {len(files)}")
    return files[:n]


@pytest.fixture(scope="session")
def mini_images():
    """``(size, kind, n) -> float32 (n, size, size, 3)`` raw RGB, squashed like the pipeline does."""
    from catsdogs.dataset.images import load_image, resize

    decoded: dict[Path, np.ndarray] = {}
    cache: dict[tuple[int, str, int], np.ndarray] = {}

    def get(size: int, kind: str, n: int) -> np.ndarray:
        key = (size, kind, n)
        if key not in cache:
            arrays = []
            for path in mini_files(kind, n):
                if path not in decoded:
                    decoded[path] = load_image(path)
                arrays.append(resize(decoded[path], size, "squash"))
            cache[key] = np.stack(arrays).astype(np.float32)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def imagenet_classifier():
    """``name -> model`` with outputs {"features", "logits"}, ImageNet weights, native size; built once."""
    from catsdogs_efficientnet_lite import get_backbone

    models = {}

    def get(name: str):
        if name not in models:
            models[name] = get_backbone(name).build_classifier("imagenet", with_features=True)
        return models[name]

    return get
