"""The default local tracking store, next to the output directory: the SQLite file and the
artifact folder (names shared by :mod:`catsdogs.tracking` and its MLflow tracker), and what a
SQLite store needs before MLflow touches it: a writable folder (checked at once, instead of
minutes of MLflow's retries) and a lock file beside the database, held while the store is
created or written, so two grids starting at once do not both create its tables."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from catsdogs.errors import CatsdogsError
from catsdogs.util.fileio import file_lock

STORE_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
SQLITE_PREFIX = "sqlite:///"
#: seconds a second process waits for the store's lock before giving up
LOCK_TIMEOUT_S = 600.0


class StoreError(CatsdogsError):
    """The local tracking store cannot be written (read-only folder or file)."""


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, else None."""
    return Path(uri[len(SQLITE_PREFIX):]) if uri.startswith(SQLITE_PREFIX) else None


def check_writable(db: Path) -> None:
    """Fail fast, in one line, when the SQLite store ``db`` (or its folder) cannot be written."""
    folder = db.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
        if db.exists():
            with open(db, "r+b"):
                pass
    except OSError as exc:
        what = f"the folder {folder}" if not db.exists() or exc.filename != str(db) else str(db)
        raise StoreError(f"the MLflow store {db} cannot be written ({what}: "
                         f"{exc.strerror or exc}); pass a writable store with --track URI or "
                         "tracking.uri") from None


@contextlib.contextmanager
def store_lock(db: Path | None) -> Iterator[None]:
    """Hold ``<db>.lock`` (a lock file beside the database; nothing for a server URI)."""
    if db is None:
        yield
        return
    with file_lock(Path(os.fspath(db) + ".lock"), timeout=LOCK_TIMEOUT_S,
                   busy=lambda pid: StoreError(
                       f"the MLflow store {db} stayed locked for {LOCK_TIMEOUT_S:g} s by another "
                       f"process (pid {pid}, {db}.lock)")):
        yield
