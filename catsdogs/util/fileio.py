"""Crash-safe file writes and JSON records shared by the cache, the runner and the exporters."""

from __future__ import annotations

import contextlib
import errno
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


def _fsync_tree(path: Path) -> None:
    """fsync every file under ``path`` (a file or a folder) and the folders themselves."""
    path = Path(path)
    if path.is_dir():
        for root, _dirs, names in os.walk(path):
            for name in names:
                with contextlib.suppress(OSError), open(Path(root) / name, "rb") as fh:
                    os.fsync(fh.fileno())
            fsync_dir(Path(root))
    elif path.is_file():
        with contextlib.suppress(OSError), open(path, "rb") as fh:
            os.fsync(fh.fileno())


@contextlib.contextmanager
def staging_dir(path: Path) -> Iterator[Path]:
    """A fresh, empty folder ``.NAME.tmp-PID`` beside ``path`` for building something that is then
    moved into place with :func:`replace_path` (under a name known only at the end, e.g. a content
    hash); removed when the block ends, by :func:`remove_stale_temporaries` after a crash."""
    path = Path(path)
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path with ``path``'s name (a file or a folder, e.g. ``model.keras`` or a
    Core ML ``.mlpackage``) inside ``.NAME.tmp-PID/`` beside it; when the block succeeds, move it
    into place: readers see the old or the new one, never half of one. On failure nothing changes
    (and :func:`remove_stale_temporaries` cleans up after a killed process)."""
    path = Path(path)
    with staging_dir(path) as staging:
        tmp = staging / path.name
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to {tmp}")
        replace_path(tmp, path)


#: renameat2(2) flag: swap two paths atomically (Linux 3.15+; not every file system)
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _rename_exchange(a: Path, b: Path) -> bool:
    """Atomically swap ``a`` and ``b`` (both must exist) with ``renameat2(RENAME_EXCHANGE)``;
    False where the OS or the file system cannot (then nothing happened)."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # no libc, or a glibc older than 2.28
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False  # not supported here: the caller falls back
    raise OSError(err, os.strerror(err), str(b))


def _aside_name(dst: Path) -> Path:
    """Where the fallback of :func:`replace_path` keeps the old folder during the swap: a name that
    :func:`remove_stale_temporaries` *recovers* (moves back) when the new one never arrived."""
    return dst.with_name(f".{dst.name}.old-{os.getpid()}")


def replace_path(src: Path, dst: Path) -> None:
    """Move the finished file or folder ``src`` to ``dst``, replacing what is there (fsynced).

    A file is one ``os.replace``. A folder replacing a folder is swapped in one atomic
    ``renameat2(RENAME_EXCHANGE)`` where the OS allows it (Linux), then the old one (now at
    ``src``) is deleted. Elsewhere it takes two renames: the old one is first moved aside to
    ``.NAME.old-PID``, which a crash between the two renames leaves behind; the next
    :func:`remove_stale_temporaries` of the folder moves it back (nothing is lost), or deletes it
    when the new one is in place."""
    src, dst = Path(src), Path(dst)
    _fsync_tree(src)
    if src.is_dir() and dst.is_dir():
        if _rename_exchange(src, dst):
            fsync_dir(dst.parent)
            shutil.rmtree(src, ignore_errors=True)
            return
        aside = _aside_name(dst)
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(dst, aside)
        os.replace(src, dst)
        fsync_dir(dst.parent)
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


def write_text(path: Path, text: str) -> Path:
    """Atomically write ``text`` (UTF-8) to ``path``; returns ``path``."""
    atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))
    return Path(path)


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
    """Clean up after processes that died (``kill -9``, power loss) in ``directory``: delete their
    ``.NAME.tmp-PID`` files/folders, and recover a folder :func:`replace_path` had moved aside
    (``.NAME.old-PID``): moved back to ``NAME`` when nothing replaced it, deleted otherwise.
    Temporaries of live processes are left alone. Returns the count of entries handled."""
    import re

    temporary = re.compile(r"^\..+\.tmp-(\d+)$")
    aside = re.compile(r"^\.(.+)\.old-(\d+)$")
    handled = 0
    if not Path(directory).is_dir():
        return 0
    for entry in sorted(Path(directory).iterdir()):
        m = aside.match(entry.name)
        if m and not _pid_alive(int(m.group(2))):
            original = entry.with_name(m.group(1))
            if original.exists():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                os.replace(entry, original)
                fsync_dir(entry.parent)
            handled += 1
            continue
        m = temporary.match(entry.name)
        if not m or _pid_alive(int(m.group(1))):
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        handled += 1
    return handled
