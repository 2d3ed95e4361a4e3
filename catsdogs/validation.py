"""Input checks shared by the core and the plugins: numbers, feature matrices, labels.

One place for the checks every head, the tuner and the experiment loader need, so core modules
never import :mod:`catsdogs.builtin`:

* :func:`is_int` / :func:`check_int` / :func:`check_real` / :func:`check_bool` – the one
  integer / number / boolean validator (booleans are never numbers);
* :func:`check_features`, :func:`check_labels`, :func:`check_validation` – what
  :meth:`~catsdogs.components.Head.fit` and ``predict_proba`` accept;
* :class:`NotFittedError` – raised by a head used before ``fit``.

numpy is imported inside the array checks, so importing this module stays cheap.
"""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING, Any

from catsdogs.errors import CatsdogsError, ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

__all__ = [
    "NotFittedError",
    "SEED_MAX",
    "is_int",
    "check_int",
    "check_positive_int",
    "check_real",
    "check_bool",
    "check_features",
    "check_labels",
    "check_validation",
]

#: the largest seed NumPy (and therefore every head) accepts
SEED_MAX = 2**32 - 1


class NotFittedError(CatsdogsError, RuntimeError):
    """A head was used for prediction or export before :meth:`~catsdogs.components.Head.fit`."""


# -- scalars --------------------------------------------------------------------------------------
def is_int(value: Any) -> bool:
    """True for integers (Python or NumPy), False for booleans and everything else."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(value: Any, what: str, minimum: int = 1, maximum: int | None = None) -> int:
    """``value`` as an ``int`` in ``[minimum, maximum]``, else :class:`ConfigError` naming ``what``."""
    if not is_int(value) or value < minimum or (maximum is not None and value > maximum):
        upper = "" if maximum is None else f" and <= {maximum}"
        raise ConfigError(f"{what} must be an integer >= {minimum}{upper}, got {value!r}")
    return int(value)


def check_schedule(epochs: Any, batch_size: Any, seed: Any) -> tuple[int, int, int]:
    """``(epochs, batch_size, seed)`` as ints (``seed`` in NumPy's range), or :class:`ConfigError`."""
    return (check_int(epochs, "epochs"), check_int(batch_size, "batch_size"),
            check_int(seed, "seed", minimum=0, maximum=2**32 - 1))


def check_backbone_options(image_size: Any, weights: Any) -> None:
    """An optional positive ``image_size`` and a ``weights`` name (what extraction and the audit
    take for their backbones); :class:`ConfigError` otherwise."""
    if image_size is not None:
        check_positive_int(image_size, "image size")
    if not isinstance(weights, str):
        raise ConfigError(f"weights must be a string such as 'imagenet' or 'none', got {weights!r}")


def check_positive_int(value: Any, what: str) -> int:
    """``value`` as an ``int`` >= 1, else :class:`ConfigError` ("<what> must be a positive integer")."""
    if not is_int(value) or value < 1:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def check_real(value: Any, what: str, low: float, high: float | None = None,
               high_inclusive: bool = False) -> float:
    """A finite number (not a bool) in ``[low, high)`` (``[low, high]`` with ``high_inclusive``)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and value >= low
    if ok and high is not None:
        ok = value <= high if high_inclusive else value < high
    if not ok:
        upper = "" if high is None else f" and {'<=' if high_inclusive else '<'} {high}"
        raise ConfigError(f"{what} must be a number >= {low}{upper}, got {value!r}")
    return float(value)


def check_bool(value: Any, what: str) -> bool:
    """``value`` if it is ``True`` or ``False`` (not 0/1, not a string), else :class:`ConfigError`."""
    if not isinstance(value, bool):
        raise ConfigError(f"{what} must be true or false, got {value!r}")
    return value


# -- arrays -----------------------------------------------------------------------------------------
def check_features(X: Any, what: str = "X", n_features: int | None = None,
                   allow_empty: bool = False) -> np.ndarray:
    """``X`` as a C-contiguous float32 ``(n, d)`` array, or :class:`ConfigError`."""
    import numpy as np

    try:
        arr = np.asarray(X)
    except Exception as exc:  # ragged lists and the like
        raise ConfigError(f"{what} must be a 2-D array of numbers ({exc})") from None
    if arr.dtype.kind not in "fiu":
        raise ConfigError(f"{what} must be a 2-D array of real numbers, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ConfigError(f"{what} must be 2-D (samples, features), got shape {arr.shape}")
    if arr.shape[0] == 0 and not allow_empty:
        raise ConfigError(f"{what} has no rows")
    if arr.shape[1] == 0:
        raise ConfigError(f"{what} has no feature columns")
    if n_features is not None and arr.shape[1] != n_features:
        raise ConfigError(
            f"{what} has {arr.shape[1]} features per row, but the head was fitted on {n_features}"
        )
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise ConfigError(f"{what} contains NaN or infinite values (or values too large for float32)")
    return arr


def check_labels(y: Any, n: int, what: str = "y") -> np.ndarray:
    """``y`` as an int32 ``(n,)`` array of 0 (cat) / 1 (dog), or :class:`ConfigError`."""
    import numpy as np

    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ConfigError(f"{what} must be 1-D (one label per row), got shape {arr.shape}")
    if arr.shape[0] != n:
        raise ConfigError(f"{what} has {arr.shape[0]} labels but the features have {n} rows")
    if arr.dtype.kind not in "biuf":
        raise ConfigError(f"{what} must hold 0 (cat) / 1 (dog) labels, got dtype {arr.dtype}")
    bad = ~np.isin(arr, (0, 1))
    if bad.any():
        examples = ", ".join(repr(v) for v in np.unique(arr[bad])[:5].tolist())
        raise ConfigError(f"{what} must hold only 0 (cat) and 1 (dog); found {examples}")
    return arr.astype(np.int32)


def check_validation(validation: Any, n_features: int) -> tuple[np.ndarray, np.ndarray] | None:
    """``(X_val, y_val)`` checked like the training data (same width), or None when not given."""
    if validation is None:
        return None
    if not isinstance(validation, (tuple, list)) or len(validation) != 2:
        raise ConfigError("validation must be a pair (X_val, y_val)")
    X_val = check_features(validation[0], "validation X", n_features=n_features)
    return X_val, check_labels(validation[1], X_val.shape[0], "validation y")
