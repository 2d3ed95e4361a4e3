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


def _holder_file(lock: Path) -> Path:
    """Where :func:`file_lock` records the holder's pid: ``<lock>.pid``, beside the lock file (not
    in it: a contender's open may truncate the lock file itself, depending on filelock's version)."""
    return lock.with_name(lock.name + ".pid")


def _read_holder(holder: Path) -> str:
    try:
        return holder.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


@contextlib.contextmanager
def file_lock(path: Path, *, timeout: float | None = None,
              waiting: Callable[[str], None] | None = None,
              busy: Callable[[str], BaseException] | None = None,
              unwritable: Callable[[OSError], BaseException] | None = None) -> Iterator[None]:
    """Hold the lock file ``path`` for the block: a :class:`filelock.FileLock` (an advisory lock
    that the OS releases when its holder dies, even by ``kill -9``; two opens in one process
    exclude each other too). The holder's pid is kept in ``<path>.pid`` while it holds it.

    ``timeout``: seconds to wait when another process holds it (None: as long as it takes; 0: not
    at all); ``waiting(pid)`` is called once when this one starts to wait. Failures to take it are
    raised before the block runs, worded by the caller: ``busy(pid)`` when the time is up
    (default: :class:`DataError` naming the lock and the holder's pid), ``unwritable(error)``
    when the lock file cannot be created (default: the :class:`OSError` itself)."""
    from filelock import FileLock, Timeout

    path = Path(path)
    holder = _holder_file(path)
    lock = FileLock(os.fspath(path), timeout=0)

    def give_up(pid: str) -> BaseException:
        return busy(pid) if busy else DataError(f"{path} is held by another process (pid {pid})")

    try:
        try:
            lock.acquire()
        except Timeout:
            pid = _read_holder(holder)
            if timeout == 0:
                raise give_up(pid) from None
            if waiting is not None:
                waiting(pid)
            try:
                lock.acquire(timeout=-1 if timeout is None else timeout)
            except Timeout:
                raise give_up(_read_holder(holder)) from None
    except OSError as exc:
        if unwritable is None:
            raise
        raise unwritable(exc) from None
    try:
        with contextlib.suppress(OSError):  # the pid is for messages only
            write_text(holder, str(os.getpid()))
        yield
    finally:
        with contextlib.suppress(OSError):
            holder.unlink()
        lock.release()


@contextlib.contextmanager
def locked_dir(directory: Path, purpose: str) -> Iterator[None]:
    """Hold ``directory``'s ``.lock`` (:func:`file_lock`) for ``purpose``; a second process gets one
    :class:`DataError` naming the holder's pid at once instead of both doing the same work and
    racing on the same files. Released when the block ends or the process dies."""
    with file_lock(
        Path(directory) / ".lock", timeout=0,
        busy=lambda pid: DataError(f"{directory} is in use by another {purpose} (pid {pid}); wait "
                                   "for it to finish or choose another output directory"),
        unwritable=lambda exc: DataError(f"cannot write to {directory} ({exc.strerror or exc}); "
                                         "make it writable or choose another output directory")):
        yield


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
