"""Fold checkpoints: a k-fold run trained fold by fold keeps each finished fold until the run is
written, so a run that is killed (``kill -9``, a lost Ray worker, a power cut) resumes at its
first unfinished fold instead of its first fold.

A ``finetune`` run of Lite2 on 20,000 photos trains five folds of several minutes each, and a run
is written only when its last fold is done: without this, a kill in the fifth fold lost four.

The driver keeps the folds on its own disk, in the experiment's output folder::

    <out>/folds/<run id>/<settings hash>/fold-<k>/state.json  arrays.npz  [head*.keras]

* ``state.json``: the fold's training history, tuning result, parameters, learning rate and what a
  refit must fix (the same values the run's record takes from its first fold), and its seconds
  (a resumed run's ``seconds`` adds those of the folds it kept);
* ``arrays.npz``: its held-out predictions (``val``) and, when the experiment has test photos, its
  test predictions (``test``);
* the fold head's model file, as the run folder names it.

Each fold folder is written atomically (:func:`catsdogs.util.fileio.atomic_path`): a fold is kept
whole or not at all. The settings hash is the run's (the one its record carries), so a fold is
resumed only into a run with the same settings (the same rows, split, head, optimizer, features,
epochs and seed); the folds of other settings and of runs not trained in this call are deleted
when the store opens, and a run's folds once its folder is written
(:meth:`FoldStore.drop`). A resumed fold is the fold that was trained, so a resumed run equals
the run trained in one go: each fold's fit is seeded with the experiment's seed and reads only
its own rows.

Runs whose folds are trained together (the grouped grid, :mod:`catsdogs.runs.multifit`) keep
their folds the same way, each run's under its own key, as soon as the group has trained and
predicted that fold; a fold is resumed for the group when it is kept for every run of it (the
group trains its folds together, so they are all there or the fold is trained again). Holdout
runs (one fold) keep none.
On Ray the tasks reach the store through the engine (:meth:`catsdogs.compute.Engine.map_runs`'s
``checkpoints``), and the driver still writes every file.
"""

from __future__ import annotations

import json
import logging
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from catsdogs.util.fileio import atomic_path, remove_stale_temporaries, write_json

logger = logging.getLogger("catsdogs")

#: the folder of the output folder that holds the fold checkpoints
FOLDS_DIR = "folds"

#: what a fold's ``state.json`` holds
STATE_KEYS = ("history", "tuning", "params", "learning_rate", "refit_params")

#: a fold's key: (run id, settings hash, fold index from 0)
FoldKey = tuple[str, str, int]


def fold_state(seconds: float, **values: Any) -> dict[str, Any]:
    """A fold's ``state.json``: each of :data:`STATE_KEYS`, by name, and its ``seconds``."""
    if set(values) != set(STATE_KEYS):
        raise TypeError(f"a fold's state takes {', '.join(STATE_KEYS)}, not {', '.join(values)}")
    return {**values, "seconds": float(seconds)}


@dataclass
class FoldCheckpoint:
    """What a finished fold leaves for its run (see the module docstring)."""

    state: dict[str, Any]
    arrays: dict[str, np.ndarray]
    files: dict[str, bytes] = field(default_factory=dict)


class FoldStore:
    """The fold checkpoints of the runs one call trains (``runs``: run id -> settings hash), in
    ``root`` (``<out>/folds``); see the module docstring. Opening it deletes what no run of
    ``runs`` can resume (other runs, other settings, half-written folds of dead processes)."""

    def __init__(self, root: str | Path, runs: dict[str, str]) -> None:
        self.root = Path(root)
        self.runs = dict(runs)
        if not self.root.is_dir():
            return
        remove_stale_temporaries(self.root)
        for run in self.root.iterdir():
            keep = self.runs.get(run.name)
            if keep is None or not run.is_dir():
                _remove(run)
                continue
            for kept in run.iterdir():
                if kept.name != keep:
                    _remove(kept)
            if (run / keep).is_dir():
                remove_stale_temporaries(run / keep)
        self.close()

    def _folder(self, key: FoldKey) -> Path:
        run_id, settings_hash, fold = key
        return self.root / run_id / settings_hash / f"fold-{int(fold)}"

    def get(self, key: FoldKey) -> FoldCheckpoint | None:
        """The checkpoint kept for ``key``, or None (never written, or unreadable: then it is
        deleted, said in the log, and the fold is trained again)."""
        folder = self._folder(key)
        if not folder.is_dir():
            return None
        try:
            state = json.loads((folder / "state.json").read_text())
            with np.load(folder / "arrays.npz", allow_pickle=False) as npz:
                arrays = {name: npz[name] for name in npz.files}
            files = {p.name: p.read_bytes() for p in sorted(folder.iterdir())
                     if p.is_file() and p.name not in ("state.json", "arrays.npz")}
            missing = sorted({*STATE_KEYS} - set(state)) + ([] if "val" in arrays else ["val"])
            if missing:
                raise ValueError(f"no {', '.join(missing)}")
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            logger.warning("training fold %d of run %s again: its checkpoint %s is unreadable (%s)",
                           key[2] + 1, key[0], folder, exc)
            _remove(folder)
            return None
        return FoldCheckpoint(state, arrays, files)

    def put(self, key: FoldKey, checkpoint: FoldCheckpoint) -> None:
        """Keep ``checkpoint`` as ``key``'s, atomically."""
        folder = self._folder(key)
        folder.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder) as tmp:
            tmp.mkdir()
            write_json(tmp / "state.json", checkpoint.state)
            arrays: dict[str, Any] = dict(checkpoint.arrays)
            with open(tmp / "arrays.npz", "wb") as fh:
                np.savez(fh, **arrays)
            for name, data in checkpoint.files.items():
                (tmp / name).write_bytes(data)

    def saved(self) -> dict[FoldKey, FoldCheckpoint]:
        """Every checkpoint kept for the runs of this store (an engine whose tasks cannot read
        this disk sends them along)."""
        found: dict[FoldKey, FoldCheckpoint] = {}
        for run_id, settings_hash in self.runs.items():
            folder = self.root / run_id / settings_hash
            if not folder.is_dir():
                continue
            for entry in sorted(folder.glob("fold-*")):
                number = entry.name.removeprefix("fold-")
                if not number.isdigit():
                    continue
                key = (run_id, settings_hash, int(number))
                checkpoint = self.get(key)
                if checkpoint is not None:
                    found[key] = checkpoint
        return found

    def drop(self, run_id: str) -> None:
        """Delete ``run_id``'s folds (its folder is written)."""
        _remove(self.root / run_id)

    def close(self) -> None:
        """Remove the store's folder when it holds nothing."""
        if self.root.is_dir() and not any(self.root.iterdir()):
            self.root.rmdir()


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


__all__ = ["FOLDS_DIR", "FoldCheckpoint", "FoldKey", "FoldStore", "fold_state"]
