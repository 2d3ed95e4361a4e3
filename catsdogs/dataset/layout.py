"""Finding the images of a data directory: Kaggle layout or class folders, in a fixed order.

Supported layouts (detected automatically):

* **kaggle**: ``ROOT/train/cat.N.jpg`` and ``ROOT/train/dog.N.jpg`` (or those files directly in
  ``ROOT``), plus optional ``ROOT/test/N.jpg`` (or ``test1/``) whose test id is ``N``;
* **folders**: ``ROOT/cat/*`` and ``ROOT/dog/*`` (or ``ROOT/train/cat/*`` ...; ``cats``/``dogs`` and
  any capitalisation accepted, sub-folders searched), plus an optional flat ``ROOT/test/``.

Labels: dog = 1, cat = 0, unknown (test) = -1. Order: cats, then dogs, each by numeric id then
name; test images by id. Test ids are never invented: a test file whose name is not an id (ASCII
digits, at most 2**63 - 1) is ignored with its reason. Files that are not images by name
(``Thumbs.db``), that are not regular files (named pipes, devices, sockets), dangling symbolic
links, files without read permission and sub-folders that cannot be listed are listed in
``Dataset.ignored`` (the caller warns once per entry); whether an image *decodes* is found out
later, when it is read. :func:`file_digest` never blocks or fails on a file that changed since it
was listed: such a file gets a digest of its error, and reading it later skips it with the reason.

``root`` may also be an object-store URL (``s3://bucket/prefix``, see
:mod:`catsdogs.dataset.storage`): it is listed once, and the same rules run over the listing (a
:class:`_Node` tree stands in for the folders), so the records, their order and their relpaths are
those of the same files in a local folder; each record's ``path`` is then an
:class:`~catsdogs.dataset.storage.ObjectPath`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from catsdogs.dataset.images import IMAGE_EXTENSIONS
from catsdogs.errors import DataError

LABELS = {"cat": 0, "dog": 1}
CLASS_DIRS = {"cat": 0, "cats": 0, "dog": 1, "dogs": 1}
KAGGLE_TRAIN_RE = re.compile(r"^(cat|dog)\.(.+)\.([a-z0-9]+)$", re.IGNORECASE)
TEST_DIR_NAMES = ("test", "test1")
ID_RE = re.compile(r"[0-9]+")
INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class ImageRecord:
    split: str  # "train" or "test"
    relpath: str  # path relative to the data root, with forward slashes
    path: Path  # an ObjectPath for a data set in object storage
    label: int  # dog = 1, cat = 0, unknown = -1
    id: int


@dataclass
class Dataset:
    root: Path  # a DataURL (a str) for a data set in object storage
    layout: str
    train: list[ImageRecord]
    test: list[ImageRecord]
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (relpath, reason)

    @property
    def records(self) -> list[ImageRecord]:
        return self.train + self.test

    def summary(self) -> str:
        cats = sum(r.label == 0 for r in self.train)
        dogs = sum(r.label == 1 for r in self.train)
        return (f"{self.root} ({self.layout} layout): {len(self.train)} train images "
                f"({cats} cats, {dogs} dogs), {len(self.test)} test images")


def _int_or_none(text: str) -> int | None:
    """``text`` as an id: ASCII digits only (no ``²`` or Arabic-Indic digits), within int64."""
    if not ID_RE.fullmatch(text):
        return None
    value = int(text)
    return value if value <= INT64_MAX else None


def _unusable(path: Path) -> str | None:
    """Why ``path`` (a directory entry) cannot be read as an image file, or None when it can."""
    if isinstance(path, _Node):  # an object: what can go wrong shows when it is read
        return None
    try:
        st = path.stat()
    except FileNotFoundError:
        return "dangling symbolic link" if path.is_symlink() else "vanished while listed"
    except OSError as exc:
        return f"cannot stat ({exc.strerror or exc})"
    if not stat.S_ISREG(st.st_mode):
        from catsdogs.dataset.images import file_kind

        return f"{file_kind(st.st_mode)}, not a regular file: only regular files are read"
    if not os.access(path, os.R_OK):
        return "no read permission"
    return None


def _entries(directory: Path, root: Path, ignored) -> list[Path]:
    """The sorted entries of ``directory``; an unlistable one is ignored with its reason."""
    try:
        return sorted(directory.iterdir())
    except OSError as exc:
        ignored.append((_rel(directory, root) + "/", f"cannot list folder ({exc.strerror or exc})"))
        return []


def _files(directory: Path, root: Path, ignored) -> list[Path]:
    """Regular readable files of ``directory`` (not hidden); the others go to ``ignored``."""
    out: list[Path] = []
    for path in _entries(directory, root, ignored):
        if not _is_hidden(path) and not path.is_dir():
            _keep(path, root, ignored, out)
    return out


def _keep(path: Path, root: Path, ignored, out: list[Path]) -> None:
    """``path`` into ``out`` when usable, else into ``ignored`` with the reason."""
    reason = _unusable(path)
    if reason is not None:
        ignored.append((_rel(path, root), reason))
    else:
        out.append(path)


def _walk(folder: Path, root: Path, ignored, seen: set | None = None) -> list[Path]:
    """Every usable file below ``folder`` (not in hidden folders), sorted; each folder once, so
    symbolic links that loop are followed only once."""
    seen = set() if seen is None else seen
    real = folder.resolve()
    if real in seen:
        return []
    seen.add(real)
    out: list[Path] = []
    for path in _entries(folder, root, ignored):
        if _is_hidden(path):
            continue
        if path.is_dir():
            out.extend(_walk(path, root, ignored, seen))
        else:
            _keep(path, root, ignored, out)
    return out


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".")


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _class_dirs(directory: Path) -> dict[int, list[Path]]:
    found: dict[int, list[Path]] = {}
    try:
        children = sorted(directory.iterdir())
    except OSError as exc:
        raise DataError(f"cannot list {str(directory)!r} ({exc.strerror or exc}); "
                        "check its permissions") from None
    for child in children:
        if child.is_dir() and child.name.lower() in CLASS_DIRS:
            found.setdefault(CLASS_DIRS[child.name.lower()], []).append(child)
    return found


def _sort_key(label: int, ident: int | None, relpath: str):
    return (label, ident is None, ident or 0, relpath)


def _scan_kaggle_train(directory: Path, root: Path, ignored) -> list[ImageRecord]:
    records = []
    for path in _files(directory, root, ignored):
        m = KAGGLE_TRAIN_RE.match(path.name)
        if not m or path.suffix.lower() not in IMAGE_EXTENSIONS:
            ignored.append((_rel(path, root), "not an image file name (expected cat.N.jpg or dog.N.jpg)"))
            continue
        label = LABELS[m.group(1).lower()]
        ident = _int_or_none(m.group(2))
        records.append((label, ident, path))
    records.sort(key=lambda t: _sort_key(t[0], t[1], t[2].name))
    out = []
    for i, (label, ident, path) in enumerate(records):
        out.append(ImageRecord("train", _rel(path, root), path, label, ident if ident is not None else i))
    return out


def _scan_class_folders(dirs: dict[int, list[Path]], root: Path, ignored) -> list[ImageRecord]:
    rows = []
    for label, folders in sorted(dirs.items()):
        for folder in folders:
            for path in _walk(folder, root, ignored):
                if path.suffix.lower() not in IMAGE_EXTENSIONS:
                    ignored.append((_rel(path, root), "not an image file name (unknown extension)"))
                    continue
                rows.append((label, _int_or_none(path.stem.split(".")[-1]), path))
    rows.sort(key=lambda t: _sort_key(t[0], t[1], _rel(t[2], root)))
    return [ImageRecord("train", _rel(p, root), p, label, i) for i, (label, _, p) in enumerate(rows)]


def _scan_test(directory: Path, root: Path, ignored) -> list[ImageRecord]:
    """Test images by id (``N.jpg``); names that are not ids are ignored, never renumbered."""
    rows = []
    for path in _files(directory, root, ignored):
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            ignored.append((_rel(path, root), "not an image file name (expected N.jpg)"))
            continue
        ident = _int_or_none(path.stem)
        if ident is None:
            ignored.append((_rel(path, root), "test file name is not a numeric id (expected N.jpg "
                                              "with N in ASCII digits 0-9, at most 2**63 - 1); "
                                              "rename it to its id to include it"))
            continue
        rows.append((ident, path))
    rows.sort(key=lambda t: (t[0], t[1].name))
    seen: dict[int, Path] = {}
    for ident, path in rows:
        if ident in seen:
            raise DataError(
                f"test id {ident} appears twice: {_rel(seen[ident], root)} and {_rel(path, root)}; "
                "test file names must be unique ids (N.jpg)"
            )
        seen[ident] = path
    return [ImageRecord("test", _rel(p, root), p, -1, ident) for ident, p in rows]


class _Node:
    """A folder or object of an object-store listing, with the few ``Path`` methods the layout
    rules use (``name``, ``suffix``, ``stem``, ``/``, ``iterdir``, ``is_dir`` ...)."""

    def __init__(self, tree: dict[str, Any], parts: tuple[str, ...]):
        self.tree, self.parts = tree, parts  # tree: nested dicts for folders, sizes for objects

    def _entry(self) -> Any:
        node: Any = self.tree
        for part in self.parts:
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node

    @property
    def name(self) -> str:
        return self.parts[-1] if self.parts else ""

    @property
    def suffix(self) -> str:  # pathlib's rule, without building a PurePosixPath (100,000s of them)
        name = self.name
        i = name.rfind(".")
        return name[i:] if 0 < i < len(name) - 1 else ""

    @property
    def stem(self) -> str:
        name = self.name
        i = name.rfind(".")
        return name[:i] if 0 < i < len(name) - 1 else name

    def __truediv__(self, name: str) -> _Node:
        return _Node(self.tree, (*self.parts, name))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Node) and self.parts == other.parts

    def __hash__(self) -> int:
        return hash(self.parts)

    def __lt__(self, other: _Node) -> bool:
        return self.parts < other.parts

    def exists(self) -> bool:
        return self._entry() is not None

    def is_dir(self) -> bool:
        return isinstance(self._entry(), dict)

    def is_symlink(self) -> bool:
        return False

    def resolve(self) -> _Node:
        return self

    def iterdir(self) -> list[_Node]:
        entry = self._entry()
        if not isinstance(entry, dict):
            raise NotADirectoryError(20, "not a folder", "/".join(self.parts))
        return [self / name for name in entry]

    def relative_to(self, root: _Node) -> _Relpath:
        return _Relpath("/".join(self.parts[len(root.parts):]))

    @property
    def size(self) -> int:
        entry = self._entry()
        return entry if isinstance(entry, int) else -1


class _Relpath(str):
    def as_posix(self) -> str:
        return str(self)


def _tree(listing: dict[str, int]) -> dict[str, Any]:
    """Nested folders of an object listing (``a/b/c.jpg`` -> {"a": {"b": {"c.jpg": size}}})."""
    tree: dict[str, Any] = {}
    for rel, size in listing.items():
        *folders, name = rel.split("/")
        node = tree
        for folder in folders:
            child = node.setdefault(folder, {})
            if not isinstance(child, dict):  # an object and a "folder" of the same name
                child = node[folder] = {}
            node = child
        if name and not isinstance(node.get(name), dict):
            node[name] = size
    return tree


def _open_remote(url) -> Dataset:
    """:func:`open_dataset` of an object-store URL: one listing, the same rules."""
    from catsdogs.dataset.storage import ObjectStore, remember

    store = ObjectStore(url)
    root = _Node(_tree(store.listing()), ())
    ds = _scan(root, url)
    for rec in ds.records:
        assert isinstance(rec.path, _Node)
    ds.train = [dataclasses.replace(r, path=store.object(r.relpath, r.path.size))  # type: ignore[arg-type,attr-defined]
                for r in ds.train]
    ds.test = [dataclasses.replace(r, path=store.object(r.relpath, r.path.size))  # type: ignore[arg-type,attr-defined]
               for r in ds.test]
    remember([r.path for r in ds.records])  # type: ignore[misc]
    return ds


def open_dataset(root: str | os.PathLike[str]) -> Dataset:
    """Detect the layout of ``root`` and list its images (see the module docstring). ``root``
    may be a local path, a ``file://`` URL or an object-store URL (a
    :class:`~catsdogs.dataset.storage.DataURL` carries its storage options)."""
    from catsdogs.dataset.storage import DataURL, data_location

    where = data_location(root)
    if isinstance(where, DataURL):
        return _open_remote(where)
    root = where.expanduser()
    if not root.exists():
        raise DataError(f"data directory {str(root)!r} does not exist")
    if not root.is_dir():
        raise DataError(f"data directory {str(root)!r} is not a directory")
    return _scan(root.resolve(), root.resolve())


def _scan(root: Any, shown: Any) -> Dataset:
    """The layout rules over ``root`` (a local folder or a :class:`_Node` tree); ``name`` is what
    the dataset's ``root`` says (the path, or the URL)."""
    ignored: list[tuple[str, str]] = []
    train_dir = root / "train" if (root / "train").is_dir() else root
    class_dirs = _class_dirs(train_dir)
    if class_dirs:
        layout = "folders"
        train = _scan_class_folders(class_dirs, root, ignored)
    else:
        layout = "kaggle"
        train = _scan_kaggle_train(train_dir, root, ignored)
        if not train:
            ignored.clear()
    if not train:
        raise DataError(
            f"no training images found in {str(shown)!r}: expected the Kaggle layout "
            "(train/cat.N.jpg, train/dog.N.jpg, optional test/N.jpg) or class folders "
            "(cat/ and dog/ with images inside)"
        )
    test: list[ImageRecord] = []
    for name in TEST_DIR_NAMES:
        if (root / name).is_dir() and root / name != train_dir:
            test = _scan_test(root / name, root, ignored)
            break
    return Dataset(root=shown, layout=layout, train=train, test=test, ignored=ignored)


def file_digest(path: Path) -> str:
    """Content digest of a file (BLAKE2b, 128 bits, hex).

    Reads only regular files within the size cap, without blocking (see
    :func:`catsdogs.dataset.images.read_image_file`). A file that cannot be read gets a digest of
    its path and error instead, so hashing never fails; reading it later skips it with the reason.
    """
    from catsdogs.dataset.images import ImageDecodeError, read_image_file

    h = hashlib.blake2b(digest_size=16)
    try:
        h.update(read_image_file(path))
    except ImageDecodeError as exc:
        h.update(f"unreadable\0{path}\0{exc.reason}".encode())
    return h.hexdigest()


def digest_all(records: list[ImageRecord], workers: int = 4, engine=None) -> list[str]:
    """Digests of all records' files, in order (reads files in parallel threads).

    Objects in object storage are read :func:`~catsdogs.dataset.storage.readers` at a time; with
    an ``engine`` (Ray) they are hashed by its workers, which read them from the store themselves,
    so the driver reads no photo bytes."""
    from catsdogs.dataset.storage import ObjectPath, readers

    remote = bool(records) and isinstance(records[0].path, ObjectPath)
    if remote and engine is not None and getattr(engine, "name", "local") != "local":
        return _digest_on(engine, [r.path for r in records])
    with ThreadPoolExecutor(max_workers=readers() if remote else workers) as pool:
        return list(pool.map(lambda r: file_digest(r.path), records))


class ObjectDigests:
    """What an engine's worker holds to hash objects: ``self(paths)`` -> their digests."""

    def __init__(self, threads: int):
        self.threads = threads

    def __call__(self, paths: list) -> list[str]:
        with ThreadPoolExecutor(max_workers=self.threads) as pool:
            return list(pool.map(file_digest, paths))


def _digest_on(engine, paths: list, chunk: int = 256) -> list[str]:
    import functools

    from catsdogs.dataset.storage import readers

    out: list[str] = [""] * len(paths)
    jobs = [range(start, min(len(paths), start + chunk)) for start in range(0, len(paths), chunk)]

    def on_result(job, digests, node, pid) -> None:
        for i, dig in zip(job, digests):
            out[i] = dig

    engine.map_chunks(functools.partial(ObjectDigests, readers()), jobs,
                      lambda job: ([paths[i] for i in job],), on_result)
    return out


def fingerprint(records: list[ImageRecord], digests: list[str]) -> str:
    """One digest for a list of (split, relpath, content digest) rows."""
    h = hashlib.blake2b(digest_size=16)
    for rec, dig in zip(records, digests):
        h.update(f"{rec.split}\0{rec.relpath}\0{dig}\n".encode())
    return h.hexdigest()
