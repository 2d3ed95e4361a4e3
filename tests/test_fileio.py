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


# a writer that dies (kill -9) between the two renames of a folder swap: the old folder has been
# moved aside, the new one not yet moved in (the two-rename path, forced with RENAME_EXCHANGE off)
CRASH_IN_THE_GAP = '''
import os, sys
from pathlib import Path
from catsdogs.util import fileio

fileio._rename_exchange = lambda a, b: False  # the fallback: two renames
real_replace = os.replace

def replace(src, dst):
    if Path(dst).name == "model.mlpackage" and Path(src).parent.name.startswith(".model"):
        os._exit(9)  # the new folder is about to move in: die here
    real_replace(src, dst)

os.replace = replace
with fileio.atomic_path(Path(sys.argv[1])) as tmp:
    (tmp / "Data").mkdir(parents=True)
    (tmp / "Data" / "new.bin").write_bytes(b"new")
'''


def test_a_crash_between_the_two_renames_of_a_folder_swap_loses_nothing(tmp_path):
    """Issue 21 item 3: the old folder, moved aside, is recovered by the next cleanup (it was a
    temporary that remove_stale_temporaries deleted: the folder was gone)."""
    import subprocess
    import sys

    pkg = tmp_path / "model.mlpackage"
    (pkg / "Data").mkdir(parents=True)
    (pkg / "Data" / "old.bin").write_bytes(b"old")
    proc = subprocess.run([sys.executable, "-c", CRASH_IN_THE_GAP, str(pkg)], timeout=120)
    assert proc.returncode == 9 and not pkg.exists(), "the writer died in the gap"
    remove_stale_temporaries(tmp_path)
    assert _tree(pkg) == ["Data", "Data/old.bin"] and (pkg / "Data" / "old.bin").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.mlpackage"]


def test_a_folder_set_aside_by_a_finished_swap_is_deleted(tmp_path):
    """A dead writer's set-aside copy whose replacement is in place is just removed."""
    (tmp_path / "model.mlpackage").mkdir()
    (tmp_path / ".model.mlpackage.old-999999999").mkdir()
    assert remove_stale_temporaries(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.mlpackage"]


def test_folder_swap_is_one_atomic_exchange_where_the_os_has_one(tmp_path, monkeypatch):
    """On Linux the old folder is never moved aside: renameat2(RENAME_EXCHANGE) swaps both."""
    from catsdogs.util import fileio

    probe_a, probe_b = tmp_path / "a", tmp_path / "b"
    probe_a.mkdir()
    probe_b.mkdir()
    if not fileio._rename_exchange(probe_a, probe_b):
        pytest.skip("no RENAME_EXCHANGE on this OS / file system")
    moves = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (moves.append((a, b)), real(a, b)))
    pkg = tmp_path / "model.mlpackage"
    (pkg / "Data").mkdir(parents=True)
    (pkg / "Data" / "old.bin").write_bytes(b"old")
    with atomic_path(pkg) as tmp:
        (tmp / "Data").mkdir(parents=True)
        (tmp / "Data" / "new.bin").write_bytes(b"new")
    assert moves == [] and _tree(pkg) == ["Data", "Data/new.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "model.mlpackage"]


# --- the one file lock (issue 22 §2): filelock underneath, the holder's pid in the messages -------
def test_file_lock_refuses_a_second_holder_naming_the_first_and_is_reusable(tmp_path):
    """Two opens exclude each other even in one process; ``timeout=0`` refuses at once with the
    holder's pid, ``busy`` words the error; after release the lock (and its pid file) is free."""
    from catsdogs.errors import DataError
    from catsdogs.util.fileio import file_lock

    lock = tmp_path / "x.lock"
    with file_lock(lock):
        assert (tmp_path / "x.lock.pid").read_text() == str(os.getpid())
        with pytest.raises(DataError, match=rf"x.lock is held by another process \(pid {os.getpid()}\)"):
            with file_lock(lock, timeout=0):
                pass
        with pytest.raises(KeyError, match=f"busy {os.getpid()}"):
            with file_lock(lock, timeout=0, busy=lambda pid: KeyError(f"busy {pid}")):
                pass
    assert not (tmp_path / "x.lock.pid").exists()
    with file_lock(lock, timeout=0):
        pass


def test_file_lock_waits_for_the_holder_and_says_so_once(tmp_path):
    """Without a timeout a second taker waits (``waiting(pid)`` once) and gets the lock when the
    first releases it; gated on events, not on time."""
    import threading

    from catsdogs.util.fileio import file_lock

    lock = tmp_path / "x.lock"
    waiting: list[str] = []
    started, got = threading.Event(), threading.Event()

    def second():
        with file_lock(lock, waiting=lambda pid: (waiting.append(pid), started.set())):
            got.set()

    with file_lock(lock):
        thread = threading.Thread(target=second)
        thread.start()
        assert started.wait(60)
        assert not got.is_set()  # it waits for us
    thread.join(60)
    assert got.is_set() and waiting == [str(os.getpid())]


def test_file_lock_that_cannot_be_created_is_worded_by_the_caller(tmp_path):
    from catsdogs.util.fileio import file_lock

    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    with pytest.raises(OSError):
        with file_lock(afile / "x.lock"):
            pass
    with pytest.raises(ValueError, match="cannot lock"):
        with file_lock(afile / "x.lock", unwritable=lambda exc: ValueError(f"cannot lock ({exc})")):
            pass
