"""Optional dependencies: which extra installs what, and one error when it is missing.

``pip install catsdogs`` installs the core (extract, run, the Keras heads, predict, score); each
feature that needs a heavy library names it in an extra of ``pyproject.toml``, and imports it
through :func:`require`, so a missing extra is one line naming the feature and the command that
installs it, e.g. ``lightgbm_stacking needs lightgbm, which is not installed: pip install
'catsdogs[stacking]'``. :data:`EXTRAS` is the one table of module -> (distribution, extra);
:func:`available` answers without importing (``catsdogs plugins`` uses it to show unavailable
components and why).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType

from catsdogs.errors import CatsdogsError

#: top-level module -> (the distribution that provides it, the catsdogs extra that installs it)
EXTRAS: dict[str, tuple[str, str]] = {
    "lightgbm": ("lightgbm", "stacking"),
    "keras_tuner": ("keras-tuner", "tuning"),
    "coremltools": ("coremltools", "export"),
    "ai_edge_litert": ("ai-edge-litert", "export"),
    "cleanlab": ("cleanlab", "audit"),
    "cv2": ("opencv-python-headless", "cam"),
    "ray": ("ray", "ray"),
    "openvino": ("openvino", "int8"),
    "nncf": ("nncf", "int8"),
    "mlflow": ("mlflow", "tracking"),
    "fastapi": ("fastapi", "serve"),
    "uvicorn": ("uvicorn", "serve"),
    "python_multipart": ("python-multipart", "serve"),
    # object storage: fsspec and one client library per cloud (fsspec is in all three extras:
    # its import site names the extra of the URL's scheme)
    "s3fs": ("s3fs", "s3"),
    "gcsfs": ("gcsfs", "gcs"),
    "adlfs": ("adlfs", "azure"),
}


#: each extra and what it enables (``catsdogs plugins`` lists them with what is installed)
ENABLES: dict[str, str] = {
    "export": "export to Core ML and TFLite, the LiteRT runtime",
    "stacking": "the lightgbm_stacking head",
    "tuning": "hyper-parameter search (tuning:)",
    "audit": "the label-issue finder (audit --label-issues)",
    "cam": "class activation map pictures (cam, predict --cam)",
    "ray": "--engine ray",
    "int8": "--precision int8, tflite-int8 export",
    "tracking": "MLflow tracking (run --track)",
    "serve": "the web app (serve)",
    "s3": "data sets in S3 (DATA_DIR s3://)",
    "gcs": "data sets in Google Cloud Storage (DATA_DIR gs://)",
    "azure": "data sets in Azure storage (DATA_DIR az://)",
}


def extras_status() -> dict[str, dict[str, object]]:
    """``{extra: {"enables": ..., "installed": bool, "missing": [distributions]}}`` for the extras
    of :data:`ENABLES`, found without importing anything."""
    out: dict[str, dict[str, object]] = {}
    for extra, enables in ENABLES.items():
        missing = [dist for module, (dist, e) in EXTRAS.items() if e == extra and not available(module)]
        out[extra] = {"enables": enables, "installed": not missing, "missing": missing}
    return out


def unavailable_reason(component: object, what: str) -> str | None:
    """Why ``component`` (a backbone, head or optimizer declaring ``requires``) cannot be used
    here, as :func:`missing_message` for its first missing module; None when it can."""
    for module in getattr(component, "requires", ()) or ():
        if not available(module):
            return missing_message(module, feature=what)
    return None


class MissingExtraError(CatsdogsError, ImportError):
    """A feature's optional dependency is not installed (an :class:`ImportError` too, so code that
    falls back when a module is missing keeps working)."""


def available(module: str) -> bool:
    """Whether ``module`` can be imported here, found without importing it."""
    top = module.split(".")[0]
    if top in sys.modules:
        return sys.modules[top] is not None
    try:
        return importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        return False


def install_hint(module: str, extra: str | None = None) -> str:
    """``pip install 'catsdogs[EXTRA]'`` for ``module`` (``extra`` defaults to :data:`EXTRAS`')."""
    extra = extra or EXTRAS.get(module.split(".")[0], (None, None))[1]
    if extra is None:
        return f"pip install {module.split('.')[0]}"
    return f"pip install 'catsdogs[{extra}]'"


def missing_message(module: str, extra: str | None = None, feature: str | None = None) -> str:
    """The one line :func:`require` raises: what needs what, and the command that installs it."""
    top = module.split(".")[0]
    dist = EXTRAS.get(top, (top, None))[0]
    return (f"{feature or 'this feature'} needs {dist}, which is not installed: "
            f"{install_hint(module, extra)}")


def require(module: str, extra: str | None = None, feature: str | None = None) -> ModuleType:
    """Import and return ``module``; when it (or the distribution behind it) is missing, raise
    :class:`MissingExtraError` with :func:`missing_message` (the extra defaults to the one
    :data:`EXTRAS` lists for the top-level module)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        name = getattr(exc, "name", None)
        if name is not None and name.split(".")[0] != top and available(top):
            raise  # the module is there but one of ITS dependencies is broken: not ours to hide
        raise MissingExtraError(missing_message(module, extra, feature)) from exc


__all__ = ["ENABLES", "EXTRAS", "MissingExtraError", "available", "extras_status",
           "install_hint", "missing_message", "require", "unavailable_reason"]
