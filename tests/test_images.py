"""Decoding whatever a file holds to RGB, clear reasons for unusable files, resize policies."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from catsdogs.dataset.images import ImageDecodeError, decode_rgb, load_image, resize


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _rgb(h=20, w=30, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _smooth(h=20, w=30):
    """Smooth colour gradients: JPEG keeps them nearly exactly (unlike noise)."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 255 // (h + w)], -1).astype(np.uint8)


@pytest.mark.parametrize("mode", ["L", "RGB", "CMYK", "P"])
def test_jpeg_and_png_modes_become_rgb(mode):
    src = Image.fromarray(_smooth()).convert(mode)
    fmt = "PNG" if mode == "P" else "JPEG"
    out = decode_rgb(_encode(src, fmt))
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    expected = np.asarray(src.convert("RGB"), dtype=float)
    assert np.abs(out.astype(float) - expected).mean() < 12  # JPEG loss only


def test_grayscale_gives_equal_channels():
    out = decode_rgb(_encode(Image.fromarray(_rgb()[..., 0]), "PNG"))
    assert out.shape == (20, 30, 3) and (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_rgba_is_composited_over_white():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top half opaque red-ish, bottom half fully transparent
    out = decode_rgb(_encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert (out[:2] == [200, 0, 0]).all()
    assert (out[2:] == 255).all()


def test_png_bytes_under_any_name(tmp_path):
    path = tmp_path / "cat.1.jpg"
    path.write_bytes(_encode(Image.fromarray(_rgb()), "PNG"))
    assert (load_image(path) == _rgb()).all()  # PNG is lossless: exact pixels


def test_sixteen_bit_png():
    arr = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    out = decode_rgb(_encode(Image.fromarray(arr), "PNG"))
    assert out.shape == (8, 8, 3) and out.max() > 200


def test_exif_orientation_is_applied():
    img = Image.fromarray(_rgb(10, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise
    out = decode_rgb(_encode(img, "JPEG", exif=exif.tobytes()))
    assert out.shape == (30, 10, 3)


def test_empty_file():
    with pytest.raises(ImageDecodeError, match="empty"):
        decode_rgb(b"")


def test_truncated_jpeg_is_rejected_not_greyed():
    data = _encode(Image.fromarray(_rgb(200, 200)), "JPEG")
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_rgb(data[: len(data) // 2])


def test_html_page_is_named():
    with pytest.raises(ImageDecodeError, match="HTML"):
        decode_rgb(b"<!DOCTYPE html><html><body>404 Not Found</body></html>")


def test_random_bytes():
    with pytest.raises(ImageDecodeError, match="not an image"):
        decode_rgb(bytes(range(256)) * 4)


def test_faults_folder(faults):
    """Every decodable file reads as RGB; every broken one fails with a reason; nothing crashes."""
    expect_bad = {"cat.90001.jpg": "empty", "cat.90002.jpg": "truncated", "dog.90004.jpg": "HTML",
                  "Thumbs.db": "not an image"}
    good = 0
    for path in sorted(faults.iterdir()):
        if path.name in expect_bad:
            with pytest.raises(ImageDecodeError, match=expect_bad[path.name]):
                load_image(path)
        else:
            img = load_image(path, 64)
            assert img.shape == (64, 64, 3) and img.dtype == np.uint8, path.name
            good += 1
    assert good == 5
    # the CMYK JPEG decodes to the same picture as its RGB twin (correct Adobe inversion)
    cmyk, rgb = load_image(faults / "dog.90006.jpg"), load_image(faults / "dog.90003.jpg")
    assert np.abs(cmyk.astype(float) - rgb).mean() < 3


def test_resize_policies():
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, :20] = 255  # left half white
    squash = resize(img, 10, "squash")
    assert squash.shape == (10, 10, 3) and squash[:, :4].min() == 255 and squash[:, 6:].max() == 0
    crop = resize(img, 10, "crop")  # centre 20x20 of the (10x20 scaled) picture: half white
    assert crop.shape == (10, 10, 3) and crop[:, :4].min() > 200 and crop[:, 6:].max() < 50
    pad = resize(img, 10, "pad")  # scaled to 10x5 and letterboxed: black bars top and bottom
    assert pad.shape == (10, 10, 3) and pad[:2].max() == 0 and pad[-2:].max() == 0 and pad[4, 1].min() > 200
    with pytest.raises(ValueError, match="unknown resize policy"):
        resize(img, 10, "stretch")


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` RGB pixels and whose data is a few bytes:
    what a limit refuses from the header, without allocating the pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))


def test_max_pixels_is_the_only_pixel_limit(monkeypatch):
    """CATSDOGS_MAX_PIXELS above Pillow's own 179 MP bomb limit takes effect: a 200 MP header is
    no longer refused as too large (it fails later, as the truncated file it is); below it, the
    refusal is ours, in our words (issue 21 item 10: Pillow's message answered first)."""
    data = _png_header(20_000, 10_000)  # 200 MP
    monkeypatch.setenv("CATSDOGS_MAX_PIXELS", "300000000")
    with pytest.raises(ImageDecodeError) as allowed:
        decode_rgb(data)
    assert "too large" not in allowed.value.reason and "truncated" in allowed.value.reason
    monkeypatch.setenv("CATSDOGS_MAX_PIXELS", "150000000")
    with pytest.raises(ImageDecodeError, match=r"200\.0 megapixels exceeds the pixel limit of "
                                               r"150 MP \(set CATSDOGS_MAX_PIXELS"):
        decode_rgb(data)
    monkeypatch.delenv("CATSDOGS_MAX_PIXELS")
    with pytest.raises(ImageDecodeError, match="pixel limit of 64 MP"):
        decode_rgb(data)
