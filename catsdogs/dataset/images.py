"""Decoding any image file to 3-channel RGB, and the resize policies.

Decoding goes by content, not by file extension (PNG bytes under ``.jpg`` decode fine). Files that
cannot be used raise :class:`ImageDecodeError` with a short human reason: empty, truncated/corrupt,
not an image (with a hint of what the bytes are, e.g. an HTML page).
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# never let Pillow paper over a truncated file with grey pixels
ImageFile.LOAD_TRUNCATED_IMAGES = False

#: ``squash``: resize to SxS ignoring aspect ratio (what the write-up did with cv2.resize);
#: ``crop``: scale the short side to S and take the centre square;
#: ``pad``: scale the long side to S and pad the rest with black (letterbox).
RESIZE_POLICIES = ("squash", "crop", "pad")

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


class ImageDecodeError(Exception):
    """The file is not a usable image; ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


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
    first frame.
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. Pillow's palette-transparency notices
            im = Image.open(io.BytesIO(data))
            im.load()
            im = ImageOps.exif_transpose(im)
            return _to_rgb(im)
    except UnidentifiedImageError:
        raise ImageDecodeError(f"not an image ({_sniff(data)})") from None
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"refused: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        msg = str(exc)
        if "truncated" in msg:
            raise ImageDecodeError(f"truncated image data ({msg})") from None
        raise ImageDecodeError(f"corrupt image data ({type(exc).__name__}: {msg})") from None


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
        out = im.resize((size, size), Image.BILINEAR)
    elif policy == "crop":
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        im = im.resize((nw, nh), Image.BILINEAR)
        left, top = (nw - size) // 2, (nh - size) // 2
        out = im.crop((left, top, left + size, top + size))
    else:  # pad
        scale = size / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        im = im.resize((nw, nh), Image.BILINEAR)
        out = Image.new("RGB", (size, size))
        out.paste(im, ((size - nw) // 2, (size - nh) // 2))
    return np.asarray(out, dtype=np.uint8)


def load_image(path: str | os.PathLike, size: int | None = None, policy: str = "squash") -> np.ndarray:
    """Read, decode and (optionally) resize one image file; raises :class:`ImageDecodeError`."""
    data = Path(path).read_bytes()
    image = decode_rgb(data)
    return image if size is None else resize(image, size, policy)
