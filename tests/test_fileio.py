"""The one atomic-write helper behind every writer (issue 10 §4): files and folders (a Core ML
.mlpackage, a run directory) appear whole or not at all, and a failed write changes nothing."""

from __future__ import annotations

import os

import pytest

from catsdogs.util.fileio import atomic_path, remove_stale_temporaries


def _tree(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_folder_is_swapped_in_whole(tmp_path):
    pkg = tmp_path / "model.mlpackage"
    (pkg / "Data").mkdir(parents=True)
    (pkg / "Data" / "old.bin").write_bytes(b"old")
    with atomic_path(pkg) as tmp:
        assert tmp.name == "model.mlpackage" and tmp.parent != tmp_path  # same name, elsewhere
        assert _tree(pkg) == ["Data", "Data/old.bin"]  # readers still see the old one
        (tmp / "Data").mkdir(parents=True)
        (tmp / "Data" / "new.bin").write_bytes(b"new")
    assert _tree(pkg) == ["Data", "Data/new.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.mlpackage"]  # nothing left over


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "model.tflite"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="converter"):
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("converter crashed")
    assert path.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["model.tflite"]
    with pytest.raises(FileNotFoundError, match="nothing was written"):
        with atomic_path(path):
            pass
    assert path.read_bytes() == b"old"


def test_keras_model_written_through_the_helper(tmp_path):
    """Keras needs the real suffix: the temporary keeps the file name."""
    import keras

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    with atomic_path(tmp_path / "head.keras") as tmp:
        model.save(tmp)
    assert keras.saving.load_model(tmp_path / "head.keras").count_params() == 4


def test_temporaries_of_dead_writers_are_removed(tmp_path):
    dead = tmp_path / ".model.mlpackage.tmp-999999999"
    (dead / "model.mlpackage").mkdir(parents=True)
    live = tmp_path / f".x.tmp-{os.getpid()}"
    live.mkdir()
    assert remove_stale_temporaries(tmp_path) == 1 and not dead.exists() and live.exists()
