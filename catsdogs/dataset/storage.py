"""Data sets in object storage: ``s3://``, ``gs://``, ``az://`` (any fsspec URL) as DATA_DIR.

The photos stay in the bucket; everything written (the feature cache, run records, exports,
audits) stays on local disk. The pieces:

* :func:`data_location` turns a DATA_DIR value into a local :class:`~pathlib.Path` (plain paths and
  ``file://`` URLs) or a :class:`DataURL` (a ``str`` carrying the ``storage_options``, which never
  appear in its ``str``/``repr`` and so never in a record, a log line or MLflow);
* :class:`ObjectStore` lists a data set once (one recursive, paginated listing: ``fs.find``) and
  reads objects with a bounded number of tries (:data:`READ_TRIES`, exponential backoff with
  jitter) on transient errors -- throttling, 5xx, dropped connections, timeouts, a body shorter
  than the listed size -- on top of what the client library (s3fs, gcsfs, adlfs) already retries.
  A missing object or one that cannot be read is an :class:`ObjectError`, which the reader
  reports as an unreadable image (skipped with one warning line, like a bad local file); a store that cannot be opened or listed
  (no credentials, a wrong bucket) is one :class:`~catsdogs.errors.DataError` before any work, a
  missing client library one line naming the extra to install
  (:class:`~catsdogs.util.extras.MissingExtraError`);
* :class:`ObjectPath` is an image record's path for such a data set: the object's URL plus the
  options to open its store. It is small and picklable, so the Ray engine sends it, not the bytes,
  and each worker reads its own objects (:mod:`catsdogs.engine.ray`).

fsspec and the client libraries are optional extras (``catsdogs[s3]``, ``[gcs]``, ``[azure]``),
imported only here and only when a URL is used: the core never imports them.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from catsdogs.errors import DataError
from catsdogs.util.extras import MissingExtraError, require

logger = logging.getLogger("catsdogs")

#: scheme -> (the extra that provides it, its client package)
SCHEMES: dict[str, tuple[str, str]] = {
    "s3": ("s3", "s3fs"), "s3a": ("s3", "s3fs"),
    "gs": ("gcs", "gcsfs"), "gcs": ("gcs", "gcsfs"),
    "az": ("azure", "adlfs"), "abfs": ("azure", "adlfs"), "abfss": ("azure", "adlfs"),
}
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", re.DOTALL)
#: tries per object read (the first included) before it counts as unreadable
READ_TRIES = 6
#: first backoff pause (seconds), doubled per try up to :data:`MAX_BACKOFF`, with jitter
BACKOFF = 0.2
MAX_BACKOFF = 5.0
#: default number of concurrent object reads (``CATSDOGS_READERS``)
DEFAULT_READERS = 16
#: option names whose values are secrets (never shown; matched as substrings, any case)
SECRET_WORDS = ("secret", "key", "token", "password", "credential", "sas", "signature")

_bytes_lock = threading.Lock()
_bytes_read = 0  # photo bytes read from object storage by this process (see bytes_read)


def bytes_read() -> int:
    """Photo bytes this process has read from object storage so far (listing not included);
    the Ray tests and ``bench/object_storage.py`` check that a Ray driver reads none."""
    return _bytes_read


def _count(n: int) -> None:
    global _bytes_read
    with _bytes_lock:
        _bytes_read += n


def readers() -> int:
    """How many objects are read at once: ``$CATSDOGS_READERS`` or :data:`DEFAULT_READERS`."""
    from catsdogs.errors import ConfigError

    text = os.environ.get("CATSDOGS_READERS", "").strip()
    if not text:
        return DEFAULT_READERS
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise ConfigError(f"CATSDOGS_READERS must be a positive whole number, got {text!r}")
    return int(text)


class ObjectError(Exception):
    """An object cannot be read (``reason`` says why); the reader reports it as an unreadable
    image (:class:`~catsdogs.dataset.images.ImageDecodeError`)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ----------------------------------------------------------------------------------- locations
class DataURL(str):
    """A data set's URL (``s3://bucket/prefix``, no trailing slash); ``storage_options`` travels
    with it but is never part of its text."""

    storage_options: dict[str, Any]

    def __new__(cls, url: str, storage_options: dict[str, Any] | None = None) -> DataURL:
        self = super().__new__(cls, url)
        self.storage_options = dict(storage_options or {})
        return self

    def __repr__(self) -> str:
        return f"DataURL({str(self)!r})"

    def __reduce__(self):
        return (DataURL, (str(self), self.storage_options))

    def __truediv__(self, relpath: str) -> str:
        """The URL of the object ``relpath`` below this one (readable by
        :func:`~catsdogs.dataset.images.read_image_file` once the data set is listed)."""
        return f"{self}/{relpath}"

    @property
    def scheme(self) -> str:
        m = _URL.match(self)
        assert m is not None
        return m.group(1).lower()

    @property
    def name(self) -> str:
        """The last component (the cache folder's name, like a local folder's name)."""
        return PurePosixPath(_URL.match(self).group(2)).name  # type: ignore[union-attr]


def is_url(value: Any) -> bool:
    """True for a ``scheme://...`` string other than ``file://``."""
    if not isinstance(value, str):
        return False
    m = _URL.match(value)
    return m is not None and m.group(1).lower() != "file"


def data_location(value: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
                  ) -> Path | DataURL:
    """DATA_DIR as given: a :class:`DataURL` for an object-store URL, else a local path
    (``file://`` URLs included). Unknown schemes are refused here, before any work."""
    if isinstance(value, DataURL) and storage_options is None:
        return value
    if isinstance(value, os.PathLike):
        return Path(value)
    text = str(value).strip()
    m = _URL.match(text)
    if m is None:
        return Path(os.path.expanduser(text))
    scheme = m.group(1).lower()
    if scheme == "file":
        return Path(m.group(2) or "/")
    if scheme not in SCHEMES and scheme != "memory":  # memory://: fsspec's in-process store
        raise DataError(f"data directory {text!r}: unsupported URL scheme {scheme!r}; use a local "
                        "path, file://, s3://, gs:// or az://")
    rest = m.group(2).strip("/")
    if not rest:
        raise DataError(f"data directory {text!r} names no bucket; use {scheme}://BUCKET/PREFIX")
    return DataURL(f"{scheme}://{rest}", storage_options)


def redacted(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with the value of every secret-looking name replaced by ``"***"``."""
    return {k: ("***" if any(w in k.lower() for w in SECRET_WORDS) else v)
            for k, v in options.items()}


@dataclass(frozen=True)
class ObjectPath:
    """One object of a data set in object storage: what an image record's ``path`` is there.

    Picklable (the Ray engine sends it to the worker that reads the object); the storage options
    are left out of its text, ``repr`` and comparisons."""

    url: str
    size: int = -1  # from the listing; -1: unknown
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __str__(self) -> str:
        return self.url

    @property
    def name(self) -> str:
        return PurePosixPath(self.url).name

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.url).suffix


_objects_lock = threading.Lock()
_objects: dict[str, ObjectPath] = {}  # URL -> object, for every data set listed in this process


def remember(objects: list[ObjectPath]) -> None:
    """Make ``objects`` readable by their URL alone in this process (:func:`object_at`): an
    engine that passes paths as text (the local engine) still reads them with their options."""
    with _objects_lock:
        _objects.update((o.url, o) for o in objects)


def object_at(url: str) -> ObjectPath:
    """The object listed at ``url`` in this process; else one with no size and the options of
    no data set (the environment's credentials)."""
    with _objects_lock:
        return _objects.get(url) or ObjectPath(url)


# ----------------------------------------------------------------------------------- file systems
_fs_lock = threading.Lock()
_filesystems: dict[tuple[str, str], Any] = {}


def _filesystem(scheme: str, options: dict[str, Any]):
    """The fsspec file system of ``scheme`` (one per process and options); a missing client
    library is one :class:`~catsdogs.util.extras.MissingExtraError` line naming the extra to
    install (:func:`~catsdogs.util.extras.require`)."""
    key = (scheme, json.dumps(options, sort_keys=True, default=str))
    with _fs_lock:
        if key in _filesystems:
            return _filesystems[key]
        extra, package = SCHEMES.get(scheme, ("s3", "fsspec"))
        fsspec = require("fsspec", extra, feature=f"{scheme}:// data")
        require(package, extra, feature=f"{scheme}:// data")
        try:
            fs = fsspec.filesystem(scheme, **options)
        except (TypeError, ValueError) as exc:
            raise DataError(f"{scheme}:// storage options not accepted by {package} "
                            f"({type(exc).__name__}: {_first_line(exc)}); options given: "
                            f"{sorted(options)}") from None
        _filesystems[key] = fs
        return fs


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _permanent(exc: BaseException) -> bool:
    """Errors that trying again does not cure: missing object, access denied, bad request."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return True
    name = type(exc).__name__
    return name in {"NoCredentialsError", "PartialCredentialsError", "ParamValidationError",
                    "InvalidAccessKeyId", "SignatureDoesNotMatch", "NoSuchBucket"}


def _backoff(attempt: int) -> float:
    return min(MAX_BACKOFF, BACKOFF * 2 ** attempt) * (0.5 + random.random() / 2)


def _no_credentials(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return any(w in text for w in ("credential", "invalidaccesskeyid", "signaturedoesnotmatch",
                                   "unable to locate", "access key"))


class ObjectStore:
    """A data set's store: lists it once (:meth:`listing`) and reads objects (:func:`read_object`)."""

    def __init__(self, url: DataURL):
        self.url = url
        self.scheme = url.scheme
        self.options = url.storage_options
        self.root = url.split("://", 1)[1]  # bucket/prefix, as fsspec names it
        self.fs = _filesystem(self.scheme, self.options)

    def listing(self) -> dict[str, int]:
        """Every object below the root: key relative to the root -> size in bytes. One recursive
        listing (paginated by the client); retried like reads; its failures are one DataError."""
        what = f"data directory {str(self.url)!r}"
        for attempt in range(READ_TRIES):
            try:
                found = self.fs.find(self.root, detail=True, withdirs=False)
                break
            except Exception as exc:  # noqa: BLE001 - every client error becomes one clear line
                if _no_credentials(exc):
                    raise DataError(
                        f"{what}: no usable credentials ({_first_line(exc)}); give them the way "
                        f"{SCHEMES.get(self.scheme, ('', 'the client'))[1]} reads them (environment "
                        "variables, a profile, or storage_options: in the experiment file)"
                    ) from None
                if isinstance(exc, PermissionError):
                    raise DataError(f"{what}: access denied ({_first_line(exc)}); check the "
                                    "credentials' permissions to list it") from None
                if isinstance(exc, FileNotFoundError):
                    raise DataError(f"{what}: the bucket does not exist ({_first_line(exc)}); "
                                    "check its name") from None
                if _permanent(exc) or attempt + 1 == READ_TRIES:
                    raise DataError(f"{what}: cannot list it ({type(exc).__name__}: "
                                    f"{_first_line(exc)}); check the URL, the endpoint and the "
                                    "network") from None
                time.sleep(_backoff(attempt))
        out: dict[str, int] = {}
        prefix = self.root.rstrip("/") + "/"
        for name, info in found.items():
            if info.get("type", "file") != "file" or not name.startswith(prefix):
                continue
            rel = name[len(prefix):]
            if rel and not rel.endswith("/"):  # "folder/" marker objects are not files
                out[rel] = int(info.get("size") or 0)
        if not out:
            raise DataError(f"{what} does not exist or holds no objects; check the URL")
        return out

    def object(self, rel: str, size: int) -> ObjectPath:
        return ObjectPath(f"{self.url}/{rel}", size, self.options)


def read_object(obj: ObjectPath, cap: int) -> bytes:
    """The bytes of ``obj`` (at most ``cap``, ``CATSDOGS_MAX_FILE_BYTES``), tried up to
    :data:`READ_TRIES` times on transient errors; else an :class:`ObjectError` with the reason."""
    if obj.size > cap:
        raise ObjectError(f"file too large ({obj.size / 2**20:.1f} MiB > the cap of "
                               f"{cap / 2**20:.1f} MiB, CATSDOGS_MAX_FILE_BYTES)")
    scheme, path = obj.url.split("://", 1)
    try:
        fs = _filesystem(scheme, obj.storage_options)
    except (DataError, MissingExtraError) as exc:
        raise ObjectError(f"cannot read object ({exc})") from None
    error = ""
    for attempt in range(READ_TRIES):
        try:
            data = fs.cat_file(path)
        except Exception as exc:  # noqa: BLE001 - reported as the object's reason
            error = f"{type(exc).__name__}: {_first_line(exc)}"
            if isinstance(exc, FileNotFoundError):
                raise ObjectError("cannot read object (it no longer exists)") from None
            if _permanent(exc):
                raise ObjectError(f"cannot read object ({error})") from None
        else:
            if len(data) > cap:
                raise ObjectError(f"file too large (> the cap of {cap / 2**20:.1f} MiB, "
                                       "CATSDOGS_MAX_FILE_BYTES)")
            if obj.size < 0 or len(data) == obj.size:
                _count(len(data))
                return data
            error = f"got {len(data)} of its {obj.size} bytes"  # a cut connection
        if attempt + 1 < READ_TRIES:
            logger.debug("reading %s: %s; trying again", obj.url, error)
            time.sleep(_backoff(attempt))
    raise ObjectError(f"cannot read object ({error}; {READ_TRIES} tries)")
