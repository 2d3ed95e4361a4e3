"""Decoding any image file to 3-channel RGB, and the resize policies.

Decoding goes by content, not by file extension (PNG bytes under ``.jpg`` decode fine). Files that
cannot be used raise :class:`ImageDecodeError` with a short human reason: empty, truncated/corrupt,
not an image (with a hint of what the bytes are, e.g. an HTML page), not a regular file, too big.

Limits (one setting each, read at every call):

* ``CATSDOGS_MAX_PIXELS`` (default :data:`DEFAULT_MAX_PIXELS`, 64 MP): images with more pixels are
  refused from their header, before anything is decoded. It is the only pixel limit: Pillow's own
  decompression-bomb check (which refused anything over 179 MP in its own words, whatever this
  setting said) is switched off, since ours runs first on every decode.
* ``CATSDOGS_MAX_FILE_BYTES`` (default :data:`DEFAULT_MAX_FILE_BYTES`, 256 MiB): larger files are
  not read. Only regular files are read at all: named pipes, devices (``/dev/zero``) and sockets,
  also behind symbolic links, are refused without blocking (the file is opened ``O_NONBLOCK``).

Decoder warnings about corrupt or prematurely ending data make a file unreadable, and so does a
JPEG whose data stops early but carries an end-of-image marker (libjpeg fills the rest grey and
only warns on stderr): see :func:`_grey_filled`.
"""

from __future__ import annotations

import io
import os
import re
import stat
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# never let Pillow paper over a truncated file with grey pixels
ImageFile.LOAD_TRUNCATED_IMAGES = False
# one pixel limit, ours (CATSDOGS_MAX_PIXELS, checked from the header in decode_rgb before any
# pixel is decoded): Pillow's fixed 179 MP refusal would otherwise answer first above it
Image.MAX_IMAGE_PIXELS = None

#: ``squash``: resize to SxS ignoring aspect ratio (what the write-up did with cv2.resize);
#: ``crop``: scale the short side to S and take the centre square;
#: ``pad``: scale the long side to S and pad the rest with black (letterbox).
RESIZE_POLICIES = ("squash", "crop", "pad")

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

#: default of ``CATSDOGS_MAX_PIXELS``: 64 megapixels (a 48 MP phone photo passes; ~190 MB as RGB)
DEFAULT_MAX_PIXELS = 64_000_000
#: default of ``CATSDOGS_MAX_FILE_BYTES``: 256 MiB
DEFAULT_MAX_FILE_BYTES = 256 * 2**20
#: Pillow warnings that mean the pixels are not what the file meant
_CORRUPT_WARNING = re.compile(r"premature|corrupt|truncat|broken|damaged|incomplete", re.IGNORECASE)
#: bytes spliced before a JPEG's end-of-image marker to tell an incomplete scan from a complete one
_PROBE = bytes(range(1, 255, 3)) * 8


class ImageDecodeError(Exception):
    """The file is not a usable image; ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _limit(name: str, default: int) -> int:
    from catsdogs.errors import ConfigError

    text = os.environ.get(name, "").strip()
    if not text:
        return default
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise ConfigError(f"{name} must be a positive whole number, got {text!r}")
    return int(text)


def max_pixels() -> int:
    """The pixel limit: ``$CATSDOGS_MAX_PIXELS`` or :data:`DEFAULT_MAX_PIXELS`."""
    return _limit("CATSDOGS_MAX_PIXELS", DEFAULT_MAX_PIXELS)


def max_file_bytes() -> int:
    """The file size cap: ``$CATSDOGS_MAX_FILE_BYTES`` or :data:`DEFAULT_MAX_FILE_BYTES`."""
    return _limit("CATSDOGS_MAX_FILE_BYTES", DEFAULT_MAX_FILE_BYTES)


def file_kind(mode: int) -> str:
    """What a file that is not a regular one is, from its ``st_mode`` ("a named pipe", ...)."""
    for test, name in ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a regular file"


def read_image_file(path: str | os.PathLike) -> bytes:
    """The bytes of a regular file of at most ``max_file_bytes()``; else :class:`ImageDecodeError`.

    Opens with ``O_NONBLOCK`` and checks the opened file (not the name), so a named pipe never
    blocks and a symbolic link to ``/dev/zero`` is refused before a byte is read. An
    :class:`~catsdogs.dataset.storage.ObjectPath` (or its URL) is read from its object store
    (same cap).
    """
    if not isinstance(path, os.PathLike) and (not isinstance(path, str) or "://" in path):
        from catsdogs.dataset.storage import ObjectError, ObjectPath, is_url, object_at, read_object

        # an object, or its URL as text (an engine's payload): listed in this process
        obj = path if isinstance(path, ObjectPath) else object_at(path) if is_url(path) else None
        if obj is not None:
            try:
                return read_object(obj, max_file_bytes())
            except ObjectError as exc:
                raise ImageDecodeError(exc.reason) from None
        if isinstance(path, str) and path.startswith(("file://", "FILE://")):
            path = path.split("://", 1)[1]
    cap = max_file_bytes()
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except IsADirectoryError:
        raise ImageDecodeError("is a directory, not an image file") from None
    except FileNotFoundError as exc:
        what = "dangling symbolic link" if os.path.islink(path) else exc.strerror
        raise ImageDecodeError(f"cannot read file ({what})") from None
    except OSError as exc:
        raise ImageDecodeError(f"cannot read file ({exc.strerror or exc})") from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ImageDecodeError(f"{file_kind(st.st_mode)}, not a regular file: only regular files "
                                   "are read")
        if st.st_size > cap:
            raise ImageDecodeError(f"file too large ({st.st_size / 2**20:.1f} MiB > the cap of "
                                   f"{cap / 2**20:.1f} MiB, CATSDOGS_MAX_FILE_BYTES)")
        try:
            data = fh.read(cap + 1)
        except OSError as exc:
            raise ImageDecodeError(f"cannot read file ({exc.strerror or exc})") from None
    if len(data) > cap:  # grew while being read
        raise ImageDecodeError(f"file too large (> the cap of {cap / 2**20:.1f} MiB, "
                               "CATSDOGS_MAX_FILE_BYTES)")
    return data


def _sniff(data: bytes) -> str:
    head = data[:64].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html", b"<head", b"<?xml")):
        return "an HTML/XML document"
    if head.startswith(b"\xd0\xcf\x11\xe0"):
        return "an OLE container (e.g. Thumbs.db)"
    if head.startswith(b"{") or head.startswith(b"["):
        return "JSON text"
    if all(32 <= c < 127 or c in (9, 10, 13) for c in data[:64]):
        return "text"
    return f"unknown bytes {data[:8].hex(' ')}"


def decode_rgb(data: bytes) -> np.ndarray:
    """Decode image bytes to an ``(H, W, 3)`` uint8 RGB array.

    Grayscale, palette, CMYK (including Adobe's inverted CMYK) and 16-bit images are converted;
    transparency is composited over white; EXIF orientation is applied; animated images give their
    first frame. Images over :func:`max_pixels` are refused before decoding; decoder warnings
    about corrupt data and grey-filled incomplete JPEGs raise :class:`ImageDecodeError`.
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    limit = max_pixels()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            im: Image.Image = Image.open(io.BytesIO(data))
            _check_pixels(im.size, limit)
            im.load()
            _check_warnings(caught)
            if _grey_filled(im, data):
                raise ImageDecodeError("truncated image data (the JPEG data ends early and the "
                                       "decoder filled the rest with grey)")
            im = ImageOps.exif_transpose(im)
            return _to_rgb(im)
    except UnidentifiedImageError:
        raise ImageDecodeError(f"not an image ({_sniff(data)})") from None
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"too large: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        msg = str(exc)
        if "truncated" in msg:
            raise ImageDecodeError(f"truncated image data ({msg})") from None
        raise ImageDecodeError(f"corrupt image data ({type(exc).__name__}: {msg})") from None


def _check_pixels(size: tuple[int, int], limit: int) -> None:
    w, h = size
    if w * h > limit:
        raise ImageDecodeError(
            f"too large: {w} x {h} = {w * h / 1e6:.1f} megapixels exceeds the pixel limit of "
            f"{limit / 1e6:g} MP (set CATSDOGS_MAX_PIXELS to allow more)")


def _check_warnings(caught) -> None:
    """Warnings about corrupt/truncated data make the image unusable; others (palette notices,
    Pillow's decompression-bomb notice, which :func:`max_pixels` governs) are ignored."""
    for w in caught:
        if issubclass(w.category, Image.DecompressionBombWarning):
            continue
        text = str(w.message)
        if _CORRUPT_WARNING.search(text) and "exif" not in text.lower():  # metadata, not pixels
            raise ImageDecodeError(f"corrupt image data (decoder warning: {w.message})")


def _last_block(im: Image.Image) -> np.ndarray:
    w, h = im.size
    return np.asarray(im.crop((max(0, w - 8), max(0, h - 8), w, h)))


def _grey_filled(im: Image.Image, data: bytes) -> bool:
    """True for a JPEG whose entropy-coded data stops before its last block.

    libjpeg decodes the missing blocks as all-zero coefficients (flat grey 128) when it meets the
    end-of-image marker early, and only warns on stderr. A suspicious image (its last 8x8 block
    exactly 128) is decoded again with probe bytes spliced in before the marker: a complete scan
    ignores them, an incomplete one decodes them into the missing blocks, so the pixels change.
    """
    if im.format != "JPEG" or im.mode not in ("L", "RGB", "CMYK"):
        return False
    last = _last_block(im)
    if last.size == 0 or not (last == 128).all():
        return False
    eoi = data.rfind(b"\xff\xd9")
    if eoi < 0:
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            probe = Image.open(io.BytesIO(data[:eoi] + _PROBE + data[eoi:]))
            probe.load()
    except (OSError, SyntaxError, ValueError, EOFError):
        return True
    return probe.size != im.size or not np.array_equal(np.asarray(probe), np.asarray(im))


def _to_rgb(im: Image.Image) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if arr.max() > 255 else 255.0
        gray = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im)
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.uint8)


def resize(image: np.ndarray, size: int, policy: str = "squash") -> np.ndarray:
    """Resize an RGB uint8 array to ``(size, size, 3)`` with Pillow's antialiased bilinear filter."""
    if policy not in RESIZE_POLICIES:
        raise ValueError(f"unknown resize policy {policy!r}; choose one of {', '.join(RESIZE_POLICIES)}")
    im = Image.fromarray(image)
    w, h = im.size
    if policy == "squash":
        out = im.resize((size, size), Image.Resampling.BILINEAR)
    elif policy == "crop":
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        im = im.resize((nw, nh), Image.Resampling.BILINEAR)
        left, top = (nw - size) // 2, (nh - size) // 2
        out = im.crop((left, top, left + size, top + size))
    else:  # pad
        scale = size / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        im = im.resize((nw, nh), Image.Resampling.BILINEAR)
        out = Image.new("RGB", (size, size))
        out.paste(im, ((size - nw) // 2, (size - nh) // 2))
    return np.asarray(out, dtype=np.uint8)


def load_image(path: str | os.PathLike, size: int | None = None, policy: str = "squash") -> np.ndarray:
    """Read (:func:`read_image_file`), decode and (optionally) resize one image file; raises
    :class:`ImageDecodeError`."""
    data = read_image_file(path)
    image = decode_rgb(data)
    return image if size is None else resize(image, size, policy)
