"""Class activation map pictures: the write-up's heat-map overlay and a grid of test photos.

The overlay: the predicted class's CAM (``(h, w)``, from the CAM model of
:mod:`catsdogs.app.export`) scaled to 0-255, upsampled to the photo with bilinear interpolation,
coloured with ``cv2.applyColorMap(..., COLORMAP_JET)`` and blended over the photo. With the
``squash`` resize policy the map covers the whole photo, so it is drawn over the original; with
``crop`` / ``pad`` it is drawn over the model's input view, where its geometry is exact.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np

from catsdogs.app.predict import LABELS, Predictor, read_photo
from catsdogs.errors import DataError
from catsdogs.util.extras import require

logger = logging.getLogger("catsdogs")

#: weight of the heat map in the blend (the photo gets 1 - ALPHA)
ALPHA = 0.45


def overlay(photo: np.ndarray, cam_map: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """Blend a JET-coloured ``cam_map`` (h, w), upsampled to ``photo`` (H, W, 3 uint8 RGB)."""
    cv2 = require("cv2", feature="class activation map pictures")  # catsdogs[cam]

    m = np.asarray(cam_map, dtype=np.float32)
    m = m - m.min()
    m = m / m.max() if m.max() > 0 else m
    height, width = photo.shape[:2]
    m = cv2.resize(m, (width, height), interpolation=cv2.INTER_LINEAR)
    heat = cv2.applyColorMap(np.clip(m * 255 + 0.5, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)
    heat = cv2.cvtColor(heat, cv2.COLOR_BGR2RGB)
    return cv2.addWeighted(np.ascontiguousarray(photo, np.uint8), 1.0 - alpha, heat, alpha, 0.0)


def cam_picture(predictor: Predictor, photo: np.ndarray, image: np.ndarray | None = None):
    """``(overlay RGB uint8, predicted label, its probability)`` for one decoded photo."""
    image = predictor.prepare(photo) if image is None else image
    maps, probs = predictor.cam(image)
    cls = int(np.argmax(probs))
    base = photo if predictor.policy == "squash" else image
    return overlay(base, maps[..., cls]), LABELS[cls], float(probs[cls])


def save_png(path: str | os.PathLike, rgb: np.ndarray) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, "PNG")
    return path


def title(label: str, prob: float) -> str:
    return f"{label} {100 * prob:.2f}%"


def sample_photos(data_dir: str | os.PathLike, n: int, seed: int = 2019) -> list[Path]:
    """``n`` random test photos of a data directory (train photos when it has no test/), seeded."""
    from catsdogs.dataset.layout import open_dataset

    ds = open_dataset(data_dir)
    pool = ds.test or ds.train
    if not pool:
        raise DataError(f"{data_dir} has no images to draw")
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(pool), size=min(n, len(pool)), replace=False)
    return [pool[i].path for i in sorted(picks)]


def cam_grid(predictor: Predictor, paths, out: str | os.PathLike) -> tuple[Path, list[str]]:
    """A grid of CAM overlays titled like ``dog 98.20%``; returns the PNG and skipped messages."""
    from catsdogs.evaluation.plots import pyplot, save_png

    tiles, skipped = [], []
    for path in paths:
        try:
            photo = read_photo(path)
        except Exception as exc:  # ImageDecodeError
            skipped.append(f"skipped {Path(path).name}: {getattr(exc, 'reason', exc)}")
            continue
        picture, label, prob = cam_picture(predictor, photo)
        tiles.append((Path(path).name, picture, title(label, prob)))
    if not tiles:
        raise DataError("none of the sampled images could be read")
    cols = math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / cols)
    plt = pyplot()
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (name, picture, text) in zip(axes.ravel(), tiles):
        ax.imshow(picture)
        ax.set_title(text, fontsize=10)
        ax.text(0.02, 0.02, name, transform=ax.transAxes, fontsize=6, color="white",
                bbox={"facecolor": "black", "alpha": 0.5, "pad": 1, "linewidth": 0})
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_png(fig, out, dpi=100)
    return out, skipped
