"""pytest fixtures for plugin test suites, registered through the ``pytest11`` entry point.

Installing catsdogs makes these fixtures available in every pytest run, so a plugin repository
needs no copied ``conftest.py``::

    def test_my_backbone_extracts(catsdogs_kaggle_dir, catsdogs_cache_dir, catsdogs_run_cli):
        proc = catsdogs_run_cli("extract", str(catsdogs_kaggle_dir), "-b", "my_backbone",
                                "--weights", "none", "--json")
        assert proc.returncode == 0, proc.stderr

* ``catsdogs_cache_dir`` – a fresh feature cache (``CATSDOGS_CACHE_DIR`` points at it);
* ``catsdogs_kaggle_dir`` – a tiny Kaggle-layout data set of generated JPEGs
  (:func:`catsdogs.testing.make_kaggle_dataset`);
* ``catsdogs_separable_features`` – ``(X, y)`` from :func:`catsdogs.testing.make_separable_features`;
* ``catsdogs_registry`` – a freshly loaded :class:`~catsdogs.plugins.Registry` (built-ins and every
  installed entry point, the plugin under test included);
* ``catsdogs_run_cli`` – runs the real ``catsdogs`` CLI in a subprocess.

Importing this module is cheap (no TensorFlow): pytest loads it in every run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture
def catsdogs_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh, private feature cache for the test (``CATSDOGS_CACHE_DIR``)."""
    path = tmp_path / "catsdogs-cache"
    monkeypatch.setenv("CATSDOGS_CACHE_DIR", str(path))
    return path


@pytest.fixture
def catsdogs_kaggle_dir(tmp_path: Path) -> Path:
    """``train/cat.N.jpg``, ``train/dog.N.jpg`` (6 each) and ``test/N.jpg`` (4), real JPEGs."""
    from catsdogs.testing import make_kaggle_dataset

    return make_kaggle_dataset(tmp_path / "catsdogs-data")


@pytest.fixture
def catsdogs_separable_features() -> tuple[Any, Any]:
    """A small linearly separable problem ``(X, y)`` for head tests."""
    from catsdogs.testing import make_separable_features

    return make_separable_features()


@pytest.fixture
def catsdogs_registry() -> Any:
    """A registry loaded now (not the process-wide one), with every installed plugin."""
    from catsdogs.plugins import Registry, strict_from_env

    return Registry().load(strict=strict_from_env())


@pytest.fixture
def catsdogs_run_cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    """``run(*args, env=None, timeout=300)``: the real ``catsdogs`` CLI in a subprocess."""

    def run(*args: str, env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "catsdogs", *args], capture_output=True,
                              text=True, env={**os.environ, **(env or {})}, timeout=timeout)

    return run
