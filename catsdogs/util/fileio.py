"""Crash-safe file writes and JSON records shared by the cache, the runner and the exporters."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from catsdogs.errors import DataError


def fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (best effort where the OS does not allow it)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Write ``path`` via a temporary file, fsync and rename: readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path with ``path``'s name (a file or a folder, e.g. ``model.keras`` or a
    Core ML ``.mlpackage``) inside ``.NAME.tmp-PID/`` beside it; when the block succeeds, move it
    into place: readers see the old or the new one, never half of one. On failure nothing changes
    (and :func:`remove_stale_temporaries` cleans up after a killed process)."""
    path = Path(path)
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        tmp = staging / path.name
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to {tmp}")
        replace_path(tmp, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def replace_path(src: Path, dst: Path) -> None:
    """Move the finished file or folder ``src`` to ``dst``, replacing what is there. A folder
    replacing a folder takes two renames; the old one is moved aside first, never deleted before
    the new one is in place."""
    src, dst = Path(src), Path(dst)
    if src.is_dir() and dst.is_dir():
        aside = dst.with_name(f".{dst.name}.old.tmp-{os.getpid()}")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(dst, aside)
        os.replace(src, dst)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(src, dst)
    fsync_dir(dst.parent)


@contextlib.contextmanager
def locked_dir(directory: Path, purpose: str) -> Iterator[None]:
    """Hold ``directory``'s ``.lock`` (an advisory lock holding the owner's pid) for ``purpose``;
    a second process gets one :class:`DataError` naming the holder's pid instead of both doing
    the same work and racing on the same files. Released when the block ends or the process dies."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    lock = Path(directory) / ".lock"
    try:
        fh = open(lock, "a+")
    except OSError as exc:
        raise DataError(f"cannot write to {directory} ({exc.strerror or exc}); make it writable "
                        "or choose another output directory") from None
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            raise DataError(f"{directory} is in use by another {purpose} (pid {holder}); wait for it "
                            "to finish or choose another output directory") from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _json_default(obj: Any):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_json(path: Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON (numpy values and paths converted)."""
    atomic_write(path, lambda fh: fh.write(json.dumps(obj, indent=2, default=_json_default).encode()))


def read_json(path: Path, *, missing: str, what: str) -> Any:
    """Read a JSON file; :class:`DataError` with ``missing`` if absent, naming ``what`` if broken."""
    path = Path(path)
    if not path.is_file():
        raise DataError(missing)
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise DataError(f"{path}: unreadable {what} ({exc})") from None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(directory: Path) -> int:
    """Delete ``.NAME.tmp-PID`` files/folders left in ``directory`` by processes that died
    (``kill -9``, power loss). Temporaries of live processes are left alone. Returns the count."""
    import re

    pattern = re.compile(r"^\..+\.tmp-(\d+)$")
    removed = 0
    if not Path(directory).is_dir():
        return 0
    for entry in Path(directory).iterdir():
        m = pattern.match(entry.name)
        if not m or _pid_alive(int(m.group(1))):
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        removed += 1
    return removed
