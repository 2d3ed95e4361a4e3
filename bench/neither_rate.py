"""How often the neither-cat-nor-dog flag fires: on real cats and dogs, and on pictures that are neither.

    python bench/neither_rate.py MODEL [--test DIR] [--nonpet DIR] [--json results.json]

MODEL is an export directory or a run directory (as for `catsdogs predict`). ``--test`` defaults to
``../shared/data/dogs-vs-cats-mini/test`` (every photo there is a cat or a dog: each flag is a
false alarm). ``--nonpet`` defaults to a set built offline from pictures that ship inside installed
packages (``pip install scikit-image`` for most of them): scikit-image's sample images (astronaut,
coffee, rocket, motorcycle, coins, moon, text, ...; ``chelsea`` is a cat and is counted
separately, as a pet), scikit-learn's ``china.jpg`` / ``flower.jpg`` and matplotlib's sample photos.
With ``--weights none`` runs the numbers mean nothing: measure a run with ImageNet weights.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
from catsdogs.util.tf_log import quiet_tensorflow_import  # noqa: E402

quiet_tensorflow_import()  # its absl start-up lines held to that level too (as the CLI does)

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MINI_TEST = REPO.parent / "shared" / "data" / "dogs-vs-cats-mini" / "test"
SKIMAGE = ("astronaut", "binary_blobs", "brick", "camera", "cell", "checkerboard", "clock", "coffee",
           "coins", "colorwheel", "grass", "gravel", "horse", "hubble_deep_field",
           "immunohistochemistry", "logo", "microaneurysms", "moon", "page", "retina", "rocket",
           "shepp_logan_phantom", "text")
PETS = ("chelsea",)


def _save(array, path: Path) -> None:
    from PIL import Image

    a = np.asarray(array)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.dtype != np.uint8:
        a = (255 * (a - a.min()) / max(float(a.max() - a.min()), 1e-9)).astype(np.uint8)
    Image.fromarray(a).save(path)


def build_nonpet_set(directory: Path) -> tuple[list[Path], list[Path]]:
    """(non-pet pictures, pet pictures) written to ``directory`` from installed packages."""
    directory.mkdir(parents=True, exist_ok=True)
    nonpet, pets = [], []
    try:
        import skimage.data as skd
    except ImportError:
        print("scikit-image is not installed: its sample images are left out", file=sys.stderr)
        skd = None
    if skd is not None:
        for name in SKIMAGE + PETS:
            try:
                picture = getattr(skd, name)()
            except Exception as exc:  # an image that needs a download
                print(f"skimage.data.{name} unavailable offline ({type(exc).__name__})", file=sys.stderr)
                continue
            path = directory / f"skimage_{name}.png"
            _save(picture, path)
            (pets if name in PETS else nonpet).append(path)
        left, right, _ = skd.stereo_motorcycle()
        for side, picture in (("left", left), ("right", right)):
            _save(picture, directory / f"skimage_motorcycle_{side}.png")
            nonpet.append(directory / f"skimage_motorcycle_{side}.png")
    try:
        from sklearn.datasets import load_sample_images

        for f in load_sample_images().filenames:
            nonpet.append(Path(shutil.copy(f, directory / f"sklearn_{Path(f).name}")))
    except Exception as exc:  # pragma: no cover
        print(f"scikit-learn sample images unavailable ({exc})", file=sys.stderr)
    import matplotlib

    sample = Path(matplotlib.get_data_path()) / "sample_data"
    for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png"):
        if (sample / name).is_file():
            nonpet.append(Path(shutil.copy(sample / name, directory / f"mpl_{name}")))
    return nonpet, pets


def _flags(predictor, paths) -> list[dict]:
    from catsdogs.app.predict import predict_files

    rows = []
    for pred in predict_files(predictor, paths):
        if pred.error:
            print(pred.describe(), file=sys.stderr)
            continue
        rows.append({"file": Path(pred.file).name, "score": pred.neither_score,
                     "flagged": pred.neither, "label": pred.label})
    return rows


def main(argv: list[str] | None = None) -> int:
    from catsdogs.app.predict import open_predictor
    from catsdogs.dataset.images import IMAGE_EXTENSIONS

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--test", type=Path, default=MINI_TEST)
    parser.add_argument("--nonpet", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    predictor = open_predictor(args.model)
    if predictor.threshold is None:
        print(f"{args.model} has no neither-cat-nor-dog score", file=sys.stderr)
        return 1
    tmp = None
    if args.nonpet is None:
        tmp = Path(tempfile.mkdtemp(prefix="nonpet-"))
        nonpet, pets = build_nonpet_set(tmp)
    else:
        nonpet = sorted(p for p in args.nonpet.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        pets = []
    test = sorted(p for p in args.test.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    results = {"model": str(args.model), "threshold": predictor.threshold,
               "test": _flags(predictor, test), "nonpet": _flags(predictor, nonpet),
               "pets": _flags(predictor, pets)}
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)

    def share(rows):
        return sum(r["flagged"] for r in rows), len(rows)

    f, n = share(results["test"])
    print(f"threshold {predictor.threshold:.4f}")
    print(f"cats and dogs wrongly flagged: {f}/{n} = {f / max(n, 1):.1%} ({args.test})")
    f, n = share(results["nonpet"])
    print(f"non-pet pictures correctly flagged: {f}/{n} = {f / max(n, 1):.1%}")
    for r in sorted(results["nonpet"], key=lambda r: r["score"]):
        print(f"  {'FLAGGED' if r['flagged'] else 'missed '}  {r['score']:.3f}  {r['file']} "
              f"(the head says {r['label']})")
    for r in results["pets"]:
        print(f"pet outside the data: {r['file']} score {r['score']:.3f} "
              f"{'FLAGGED (wrong)' if r['flagged'] else 'not flagged (right)'}; {r['label']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
