"""The experiment model: pydantic v2 models (strict, ``extra="forbid"``) that validate an experiment
document *and* are the objects the rest of the package uses.

:class:`Experiment` validates a parsed YAML document (``Experiment.model_validate(doc,
context=...)``) and holds the result: backbones with the file's defaults filled in, combinations
expanded, paths absolute. Checks that need the plugin registry (component names, weights per
backbone, image sizes, head parameters, tunable parameters) are validators that take the registry
from the validation *context* (``context={"registry": registry, ...}``; default:
:func:`catsdogs.get_registry`); the other context keys are the loader's (``base_dir`` for relative
paths, ``stem`` for the default name, ``source_path``, ``cwd`` and the command line's ``data`` /
``output`` / ``cache_dir`` overrides). Built without a context (``Experiment(name=..., ...)``)
paths stay as given.

:func:`validate_document` turns the first pydantic error (the one earliest in the file) into a
field path and a message in the loader's words, e.g. ``("epochs", "must be an integer >= 1, got
0")``; :mod:`catsdogs.experiment.spec` adds the file and line. :func:`json_schema` is the JSON
Schema of the document (``catsdogs schema``): fields that accept a short form (``heads:
[dropout_sigmoid]``) declare it with ``json_schema_input_type``.

Each field carries a :class:`What` marker: the phrase messages use for the allowed values
("a number in (0, 1)"). Validators report with :func:`problem` (a message at a field path).
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import math
import numbers
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from typing_extensions import TypedDict

from catsdogs.components import DEFAULT_CROP_FRACTION, FEATURE_VIEWS, VIEW_MERGES, check_views
from catsdogs.dataset.storage import data_location, is_url
from catsdogs.errors import ConfigError, DataError, PluginError
from catsdogs.features.cache import PRECISIONS, RUNTIMES, runtime_of
from catsdogs.validation import SEED_MAX

if TYPE_CHECKING:
    from collections.abc import Iterable

    from pydantic_core import ErrorDetails

    from catsdogs.plugins import Registry

__all__ = ["Experiment", "BackboneSpec", "HeadSpec", "OptimizerSpec", "Validation", "Tuning",
           "Ensemble", "Tracking", "What", "json_schema", "validate_document", "problem",
           "type_name", "suggest"]

RESIZE_POLICIES = ("squash", "crop", "pad")
ENGINES = ("local", "ray")
POSTPROCESSES = ("auto", "none", "clip", "temperature")
ENSEMBLE_METHODS = ("mean", "stack")
#: which run is submitted when an ensemble is formed: the best-ranked run, or the ensemble always
ENSEMBLE_SUBMIT = ("best", "always")
#: parameters of a head trained on maps that the runner sets from the run's backbone
MAPS_HEAD_INJECTED = ("weights", "image_size")
TRACKING_BACKENDS = ("mlflow",)
VALIDATION_KINDS = ("holdout", "kfold")
#: hyper-parameters the tuner can search (heads declare more: Head.search_space)
TUNABLE_PARAMS: tuple[str, ...] = ("dropout", "learning_rate", "l2")

DEFAULT_WEIGHTS = "imagenet"
DEFAULT_PRECISION = "float32"
DEFAULT_RESIZE = "squash"
DEFAULT_CALIBRATION_SIZE = 64

#: sane upper bounds: a typo such as ``epochs: 1000000000000`` is an error, not a week of work
MAX_EPOCHS = 10_000
MAX_BATCH_SIZE = 65_536
MAX_FOLDS = 100
MAX_BUDGET = 10_000
MAX_ENSEMBLE = 1_000
MAX_IMAGE_SIZE = 4_096
MAX_CALIBRATION_SIZE = 100_000
MAX_LEARNING_RATE = 1_000.0


def maps_combination(head: Any, combination: tuple[str, ...] | list[str], registry: Any) -> bool:
    """Whether a head trained on maps (``input = "maps"``) runs on ``combination``: a single
    backbone that offers ``split_top``, and the head's ``backbone`` parameter's when it is set.
    The loader (every such head gets one) and :func:`catsdogs.runs.runner.plan_runs` ask this."""
    from catsdogs.components import has_top_split

    return (len(combination) == 1 and head.params.get("backbone") in (None, combination[0])
            and has_top_split(registry.backbone(combination[0])))


def classifier_combination(combination: tuple[str, ...] | list[str], backbones: Any,
                           registry: Any) -> bool:
    """Whether a head that reads the backbones' own ImageNet classifiers (``uses_classifier``,
    e.g. ``imagenet_prior``) runs on ``combination``: every backbone offers the classifier and
    gives its plain GAP features (no ``layers:``, views merged by ``mean``), the columns the
    classifier reads. ``backbones``: the experiment's backbone entries by name."""
    from catsdogs.components import has_imagenet_classifier

    return all(has_imagenet_classifier(registry.backbone(name)) and not backbones[name].layers
               and backbones[name].merge == "mean" for name in combination)


def head_runs_on(head: Any, combination: tuple[str, ...] | list[str], backbones: Any,
                 registry: Any) -> bool:
    """Whether the experiment's ``head`` entry runs on ``combination`` (:func:`maps_combination`
    for a head trained on maps, :func:`classifier_combination` for one that reads the ImageNet
    classifiers, every combination otherwise)."""
    from catsdogs.components import trains_on_maps, uses_classifier

    head_cls = registry.head(head.name)
    if trains_on_maps(head_cls):
        return maps_combination(head, combination, registry)
    if uses_classifier(head_cls):
        return classifier_combination(combination, backbones, registry)
    return True


_SCI_FLOAT = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)[eE][-+]?\d+$")


@dataclass(frozen=True)
class What:
    """The allowed values of a field in words, used in error messages ("must be <phrase>")."""

    phrase: str


def type_name(value: Any) -> str:
    """How a value is shown in messages: ``null``, ``a boolean``, ``the string 'x'``, ``a list``..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{value!r}"


def suggest(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for a close match of ``word`` in ``choices``, else ``""``."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


def problem(message: str, at: str | None = None, sub: str = "") -> PydanticCustomError:
    """A validation error with the loader's ``message`` at field path ``at`` (absolute), or at the
    validated value's own path followed by ``sub`` (``.params.dropout``, ``[2]``)."""
    return PydanticCustomError("catsdogs", "{message}", {"message": message, "at": at, "sub": sub})


def _wrong(what: str) -> PydanticCustomError:
    """``must be <what>, got <the input>``."""
    return PydanticCustomError("wrong_branch", what)


def _choice(value: str, choices: Iterable[str], what: str, at: str | None = None,
            sub: str = "") -> str:
    choices = tuple(choices)
    if value not in choices:
        raise problem(f"unknown {what} {value!r}{suggest(value, choices)}; "
                      f"choose one of: {', '.join(choices)}", at, sub)
    return value


def _sci_float(value: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` (no dot) as a string: accept such strings as floats."""
    if isinstance(value, str) and _SCI_FLOAT.match(value.strip()):
        return float(value)
    return value


def _json_compatible(value: Any) -> bool:
    if value is None or isinstance(value, (bool, str)):
        return True
    if isinstance(value, numbers.Real):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_json_compatible(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _json_compatible(v) for k, v in value.items())
    return False


def _context(info: ValidationInfo) -> dict[str, Any]:
    return info.context if isinstance(info.context, dict) else {}


def _registry(info: ValidationInfo) -> Registry:
    """The registry of the validation context (default: :func:`catsdogs.get_registry`)."""
    registry = _context(info).get("registry")
    if registry is None:
        from catsdogs.plugins import get_registry

        registry = get_registry()
    return registry


def _component(registry: Registry, kind: str, name: str, sub: str = "") -> Any:
    """The plugin class ``name`` of ``kind``, or a problem naming what is installed."""
    names = registry.names(kind)
    if name not in names:
        try:  # a name claimed by two plugins: the registry's own message says which
            registry.get(kind, name)
        except PluginError as exc:
            if name in registry.conflicts.get(kind, {}):
                raise problem(str(exc), sub=sub) from None
        available = ", ".join(names) or "(none installed)"
        raise problem(f"unknown {kind[:-1]} {name!r}{suggest(name, names)}; available: "
                      f"{available} (`catsdogs plugins` lists what is installed)", sub=sub)
    return registry.get(kind, name)


def _named(kind: str, what: str) -> Any:
    """A list item's validator: a name or a mapping with ``name``; the name must be a registered
    component of ``kind`` (the registry comes from the validation context)."""

    def check(value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, BaseModel):
            return value
        if isinstance(value, str) and value.strip():
            _component(_registry(info), kind, value.strip())
            return {"name": value.strip()}
        if isinstance(value, dict):
            name = value.get("name")
            if isinstance(name, str) and name.strip():
                _component(_registry(info), kind, name.strip(), ".name")
                return {**value, "name": name.strip()}
            return value
        raise _wrong(what)

    return check


def _as_is(value: Any) -> Any:
    """For fields whose JSON Schema input (``json_schema_input_type``) is all a validator adds."""
    return value


SciFloat = Annotated[float, BeforeValidator(_sci_float)]
Text = Annotated[str, Field(min_length=1, pattern=r"\S")]


class _Model(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable description, for run records."""
        return self.model_dump()


# -- the parts --------------------------------------------------------------------------------------
def _options_may_be_null(schema: dict[str, Any]) -> None:
    """JSON Schema: a backbone's options may be null (= the file's default, as the loader reads)."""
    for key, prop in schema["properties"].items():
        if key != "name" and "anyOf" not in prop:
            default = prop.pop("default", None)
            schema["properties"][key] = {"anyOf": [prop, {"type": "null"}], "default": default}


class BackboneSpec(_Model):
    """One backbone configuration: which cached features to use (``image_size`` None = default).

    In the file: a name, or a mapping whose unset (or null) options take the file's defaults."""

    model_config = ConfigDict(json_schema_extra=_options_may_be_null)

    name: Annotated[Text, What("a backbone name")]
    weights: Annotated[Text, What("a weights name such as 'imagenet' or 'none'")] = DEFAULT_WEIGHTS
    image_size: Annotated[int | None, Field(ge=1, le=MAX_IMAGE_SIZE), What("an integer (pixels)")] = None
    precision: Annotated[Literal[PRECISIONS], What("precision")] = DEFAULT_PRECISION  # type: ignore[valid-type]
    #: the precision of the features every held-out and test row is predicted from (the ranking
    #: number, the submission, predict, serve and export); None: ``precision``. The heads are
    #: trained on ``precision``'s features either way (:attr:`predicts_in`).
    predict_precision: Annotated[Literal[PRECISIONS] | None,  # type: ignore[valid-type]
                                 What("precision")] = None
    resize: Annotated[Literal[RESIZE_POLICIES], What("resize policy")] = DEFAULT_RESIZE  # type: ignore[valid-type]
    #: what computes the backbone's float32 features (``precision`` or ``predict_precision``
    #: float32): ``tensorflow`` (the network itself, as the export's graph computes it) or
    #: ``openvino`` (the same network converted, in float32: faster on CPU; catsdogs[int8])
    runtime: Annotated[Literal[RUNTIMES], What("runtime")] = "tensorflow"  # type: ignore[valid-type]
    #: what computes the float16 maps a ``finetune`` head trains on (its bottom's output):
    #: ``tensorflow`` or ``openvino`` (the same bottom converted, in float32; catsdogs[int8]);
    #: the export's graph computes them with TensorFlow either way
    maps_runtime: Annotated[Literal[RUNTIMES], What("runtime")] = "tensorflow"  # type: ignore[valid-type]
    #: int8 only: calibration images
    calibration_size: Annotated[int, Field(ge=1, le=MAX_CALIBRATION_SIZE),
                                What("an integer")] = DEFAULT_CALIBRATION_SIZE
    #: earlier layers whose global-average-pooled features follow the last (the backbone's
    #: ``feature_layers``, listed by ``catsdogs plugins --json``); kept in network order
    layers: Annotated[list[Text], What("a list of the backbone's feature layer names")] = Field(
        default_factory=list)
    #: views of each photo whose features are merged into one vector, and how
    views: Annotated[list[Literal[FEATURE_VIEWS]], Field(min_length=1),  # type: ignore[valid-type]
                     What(f"a non-empty list of views ({', '.join(FEATURE_VIEWS)})")] = Field(
        default_factory=lambda: ["orig"])
    merge: Annotated[Literal[VIEW_MERGES], What("view merge")] = "mean"  # type: ignore[valid-type]
    #: the crop views' side as a fraction of the prepared image's (used only by crop views)
    crop_fraction: Annotated[SciFloat, Field(gt=0, lt=1, allow_inf_nan=False),
                             What("a number in (0, 1)")] = DEFAULT_CROP_FRACTION

    @field_validator("views", mode="before")
    @classmethod
    def _canonical_views(cls, views: Any) -> Any:
        """Known, unrepeated names in canonical order (one message: the unknown or repeated view,
        a close match, the choices); anything but a non-empty list is left to the type's own
        message."""
        if not isinstance(views, list) or not views:
            return views
        for i, view in enumerate(views):
            if not isinstance(view, str):
                raise problem(f"must be a view name ({', '.join(FEATURE_VIEWS)}), got "
                              f"{type_name(view)}", sub=f"[{i}]")
        try:
            return list(check_views(views))
        except ConfigError as exc:
            raise problem(str(exc)) from None

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_unset(cls, data: Any) -> Any:
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    @property
    def predicts_in(self) -> str:
        """The precision of the features the backbone's held-out and test rows are predicted
        from: ``predict_precision``, else ``precision`` (the one its heads are trained on)."""
        return self.predict_precision or self.precision

    def runtime_for(self, precision: str) -> str:
        """What computes this backbone's features of ``precision``: :attr:`runtime` for float32;
        int8 always runs on OpenVINO and bfloat16 on TensorFlow, whatever it says."""
        return runtime_of(precision, self.runtime)

    @property
    def predicts_apart(self) -> bool:
        """Whether the rows are predicted from other features than the heads are trained on
        (a second extraction of every photo, at :attr:`predicts_in`)."""
        return self.predicts_in != self.precision


class HeadSpec(_Model):
    """A head plugin name and the hyper-parameters passed to its class (checked against the head's
    constructor and its ``validate_params``)."""

    name: Annotated[Text, What("a head name")]
    params: Annotated[dict[str, Any], WithJsonSchema({"type": ["object", "null"]}),
                      What("a mapping of hyper-parameters")] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _check_params(cls, data: Any, info: ValidationInfo) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            return data
        raw, name = data.get("params"), data["name"]
        registry = _registry(info)
        if raw is None or name not in registry.names("heads"):
            return {k: v for k, v in data.items() if k != "params" or v is not None}
        head_cls = registry.get("heads", name)
        valid = tuple(head_cls.param_names())
        if not isinstance(raw, dict):  # by hand: the message names the head's parameters
            raise problem(f"must be a mapping of hyper-parameters ({', '.join(valid) or 'none'}), "
                          f"got {type_name(raw)}", sub=".params")
        params: dict[str, Any] = {}
        for key, value in raw.items():
            if key not in valid:
                raise problem(f"head {name!r} has no parameter {key!r}{suggest(str(key), valid)}; "
                              f"valid: {', '.join(valid) or '(none)'}", sub=f".params.{key}")
            value = _sci_float(value)
            if not _json_compatible(value):
                raise problem("must be a number, string, boolean, null, list or mapping, "
                              f"got {value!r}", sub=f".params.{key}")
            params[key] = value
        try:
            head_cls(**params).validate_params()
        except (ConfigError, TypeError, ValueError) as exc:
            raise problem(f"invalid params for head {name!r}: {exc}", sub=".params") from None
        return {**data, "params": params}


class OptimizerSpec(_Model):
    """An optimizer plugin name and its learning rate (None = the optimizer's default)."""

    name: Annotated[Text, What("an optimizer name")]
    learning_rate: Annotated[SciFloat | None, Field(gt=0, le=MAX_LEARNING_RATE, allow_inf_nan=False),
                             What("a number > 0")] = None


class Validation(_Model):
    """How runs are validated: ``holdout`` (a fraction) or ``kfold`` (folds); give exactly one.

    ``kind`` is the one given (``holdout`` by default), ``folds`` the number of folds."""

    holdout: Annotated[SciFloat, Field(gt=0, lt=1, allow_inf_nan=False),
                       What("a number in (0, 1)")] = 0.2
    kfold: Annotated[int, Field(ge=2, le=MAX_FOLDS), What("an integer")] = 5
    _kind: str = PrivateAttr("holdout")

    @model_validator(mode="after")
    def _set_kind(self) -> Validation:
        self._kind = "kfold" if "kfold" in self.model_fields_set else "holdout"
        return self

    @property
    def kind(self) -> str:
        return self._kind

    @property
    def folds(self) -> int:
        return self.kfold

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "holdout": self.holdout, "folds": self.folds}


def _validation_input(value: Any) -> Any:
    if isinstance(value, str):
        _choice(value, VALIDATION_KINDS, "validation kind")
        return {} if value == "holdout" else {"kfold": 5}
    if isinstance(value, dict) and len(value) != 1:
        raise problem("give exactly one of holdout, kfold ({holdout: FRACTION} or "
                      f"{{kfold: FOLDS}}), got {len(value)} fields")
    return value


class Tuning(_Model):
    """Random search: ``budget`` trials over ``params`` (names the heads can tune; default: all
    of dropout, learning_rate, l2)."""

    budget: Annotated[int, Field(ge=1, le=MAX_BUDGET), What("an integer")]
    params: Annotated[tuple[Text, ...], What("a list of tunable parameter names")] = TUNABLE_PARAMS

    @model_validator(mode="before")
    @classmethod
    def _short_forms(cls, data: Any) -> Any:
        if isinstance(data, int) and not isinstance(data, bool):
            return {"budget": data}
        if isinstance(data, dict):
            params = data.get("params")
            if params is None:
                return {k: v for k, v in data.items() if k != "params"}
            if isinstance(params, (str, list)):
                return {**data, "params": (params,) if isinstance(params, str) else tuple(params)}
        return data

    def to_dict(self) -> dict[str, Any]:
        return {"budget": self.budget, "params": list(self.params)}


class Ensemble(_Model):
    """Combine the ``top`` best runs: ``mean`` of their probabilities or a ``stack`` model.

    ``submit``: ``best`` submits whichever run ranks first (the ensemble only when its ranking
    number is the lowest); ``always`` submits the ensemble whatever its rank, a choice made before
    seeing any number, for grids whose top runs are statistically tied."""

    top: Annotated[int, Field(ge=2, le=MAX_ENSEMBLE), What("an integer")] = 3
    method: Annotated[Literal[ENSEMBLE_METHODS], What("ensemble method")] = "mean"  # type: ignore[valid-type]
    submit: Annotated[Literal[ENSEMBLE_SUBMIT], What("ensemble submit rule")] = "best"  # type: ignore[valid-type]


class Tracking(_Model):
    """Experiment tracking: ``backend`` (mlflow) at ``uri`` (None = the backend's default).

    ``required``: fail when the tracker cannot be reached (else warn and run untracked)."""

    backend: Annotated[Literal[TRACKING_BACKENDS], What("tracking backend")] = "mlflow"  # type: ignore[valid-type]
    uri: Annotated[Text | None, What("a tracking URI such as 'http://127.0.0.1:5000'")] = None
    required: Annotated[bool, What("true or false")] = False


def _tracking_input(value: Any) -> Any:
    if isinstance(value, str):
        return {"backend": _choice(value, TRACKING_BACKENDS, "tracking backend")}
    return value


class CombinationBounds(TypedDict, total=False):
    """Subset sizes of the backbones to combine (1 <= min <= max <= number of backbones)."""

    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]
    min: int
    max: int


class ExcludeList(list[str]):
    """The exclude entries; for an exclude *file* also its path and SHA-256 (for run records)."""

    def __init__(self, entries: Iterable[str] = (), file: Path | None = None,
                 sha256: str | None = None):
        super().__init__(entries)
        self.file = file
        self.sha256 = sha256


# -- field validators (the context gives the folders) ----------------------------------------------
def _absolute(path: Path) -> Path:
    return Path(os.path.abspath(os.path.expanduser(str(path))))


def resolve_path(value: Any, base: Path | None, at: str | None = None) -> Path:
    """``value`` (a string or PathLike) as a path; relative ones joined to ``base`` (None: kept)."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        raise problem(f"must be a path (string), got {type_name(value)}", at)
    p = Path(os.path.expanduser(value.strip()))
    if base is None:
        return p
    return _absolute(p if p.is_absolute() else base / p)


def _base(info: ValidationInfo) -> Path | None:
    base = _context(info).get("base_dir")
    return None if base is None else Path(base)


def _path_field(value: Any, info: ValidationInfo) -> Path | None:
    return None if value is None else resolve_path(value, _base(info))


def _data_field(value: Any, info: ValidationInfo) -> Any:
    """A local path (absolute with a context), or an object-store URL kept as text: the model
    attaches ``storage_options`` (:meth:`Experiment._resolve`)."""
    if value is None:
        return None
    if isinstance(value, str) and is_url(value.strip()):
        return value.strip()
    return resolve_path(value, _base(info))


def _name_field(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        raise _wrong("a non-empty string")
    name = str(value).strip()
    if "/" in name or "\\" in name or name in {".", ".."}:
        raise problem(f"must be usable as a folder name (no '/' or '\\'), got {name!r}")
    return name


def _clip_input(value: Any) -> Any:
    if isinstance(value, list):
        if len(value) != 2:
            raise _wrong("a list [lo, hi] of two numbers with 0 <= lo < hi <= 1")
        return tuple(value)
    return value


def _combinations_field(raw: Any, info: ValidationInfo) -> list[tuple[str, ...]]:
    """Expand ``all`` / ``{min, max}`` or check an explicit list against the listed backbones."""
    backbones = info.data.get("backbones")
    names = [b.name for b in backbones] if backbones else []
    if not names:  # the backbones are invalid: reported there
        return []
    n = len(names)
    if raw is None or raw == "all":
        lo, hi = 1, n
    elif isinstance(raw, dict):
        for key, value in raw.items():
            if key not in ("min", "max"):
                raise problem(f"unknown field{suggest(str(key), ['min', 'max'])}; allowed: min, max",
                              sub=f".{key}")
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise problem(f"must be an integer, got {type_name(value)}", sub=f".{key}")
        lo = 1 if raw.get("min") is None else raw["min"]
        hi = n if raw.get("max") is None else raw["max"]
        if not 1 <= lo <= hi <= n:
            raise problem(f"subset sizes must satisfy 1 <= min <= max <= {n} (the number of "
                          f"backbones), got min={lo}, max={hi}",
                          sub=".min" if lo < 1 else ".max" if hi > n else "")
    elif isinstance(raw, list):
        return _explicit_combinations(raw, names, info)
    else:
        raise _wrong("'all', {min: K, max: M} (subset sizes) or a list of lists of backbone names")
    return [c for size in range(lo, hi + 1) for c in itertools.combinations(names, size)]


def _explicit_combinations(raw: list[Any], names: list[str],
                           info: ValidationInfo) -> list[tuple[str, ...]]:
    if not raw:
        raise problem("must not be empty; use 'all', {min: K, max: M} (subset sizes) or a list "
                      "of lists of backbone names")
    result: list[tuple[str, ...]] = []
    seen: dict[tuple[str, ...], int] = {}
    order = {name: k for k, name in enumerate(names)}
    for i, combo in enumerate(raw):
        members = [combo] if isinstance(combo, str) else combo
        if not isinstance(members, (list, tuple)) or not members:
            raise problem(f"must be a non-empty list of backbone names, got {type_name(combo)}",
                          sub=f"[{i}]")
        for j, member in enumerate(members):
            sub = f"[{i}]" if isinstance(combo, str) else f"[{i}][{j}]"
            if not isinstance(member, str):
                raise problem(f"must be a backbone name, got {type_name(member)}", sub=sub)
            if member not in order:
                hint = suggest(member, names)
                if member in _registry(info).names("backbones"):
                    hint += " (add it to backbones to use it in a combination)"
                raise problem(f"{member!r} is not one of the listed backbones: "
                              f"{', '.join(names)}{hint}", sub=sub)
        if len(set(members)) != len(members):
            dup = next(m for m in members if members.count(m) > 1)
            raise problem(f"backbone {dup!r} appears twice in one combination", sub=f"[{i}]")
        key = tuple(sorted(members, key=order.__getitem__))
        if key in seen:
            raise problem(f"duplicate combination {list(key)} (same as combinations[{seen[key]}])",
                          sub=f"[{i}]")
        seen[key] = i
        result.append(key)
    return result


def _exclude_field(raw: Any, info: ValidationInfo) -> ExcludeList:
    """The entries (relative paths, deduplicated), from a list or a text file listing them."""
    if raw is None:
        return ExcludeList()
    entries: list[tuple[str, str]] = []  # (relative path, where it came from)
    list_path: Path | None = None
    digest: str | None = None
    if isinstance(raw, str):
        list_path = resolve_path(raw, _base(info) or _absolute(Path.cwd()))
        if not list_path.is_file():
            raise problem(f"exclude list {str(list_path)!r} not found (a text file with one "
                          "relative image path per line, or give a list of paths)")
        try:
            content = list_path.read_bytes()
            digest = hashlib.sha256(content).hexdigest()
            text = content.decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise problem(f"cannot read exclude list {str(list_path)!r}: {exc}") from None
        for k, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if line and not line.startswith("#"):
                entries.append((line, f"{list_path}:{k}"))
    elif isinstance(raw, list):
        for j, item in enumerate(raw):
            if not isinstance(item, str) or not item.strip():
                raise problem(f"must be a relative file path (string), got {type_name(item)}",
                              sub=f"[{j}]")
            entries.append((item.strip(), f"[{j}]"))
    else:
        raise _wrong("a list of relative file paths or the path of a text file listing them")
    result: list[str] = []
    for entry, where in entries:
        rel = entry.replace("\\", "/")
        while rel.startswith("./"):
            rel = rel[2:]
        if rel.startswith("/") or re.match(r"^[A-Za-z]:/", rel):
            message = f"{entry!r} must be relative to the data directory (e.g. train/cat.12.jpg)"
            if where.startswith("["):
                raise problem(message, sub=where)
            raise problem(f"{where}: {message}")
        if rel not in result:
            result.append(rel)
    return ExcludeList(result, list_path, digest)


def _items(kind: str, what: str, model: type[BaseModel]) -> Any:
    """A list item: a name or a mapping (the JSON Schema says both)."""
    return Annotated[model, BeforeValidator(_named(kind, what),
                                            json_schema_input_type=Text | model)]  # type: ignore[operator]


_PATH = What("a path (string)")


# -- the experiment ---------------------------------------------------------------------------------
class Experiment(BaseModel):
    """A validated experiment grid: backbones x combinations x heads x optimizers.

    Build it with :func:`catsdogs.experiment.spec.load_experiment` (a file; errors name its
    lines) or ``Experiment.model_validate(doc, context={"registry": ...})``."""

    model_config = ConfigDict(title="catsdogs experiment", strict=True, extra="forbid")

    #: default: the file name without .yaml (the context's ``stem``), else ``experiment``
    name: Annotated[str, PlainValidator(_name_field, json_schema_input_type=Text | int | None),
                    What("a non-empty string")] = Field(default_factory=str)
    #: a path; a DataURL (a str carrying its storage options) for data in object storage.
    #: Required unless the loader's context overrides it (checked by :meth:`_resolve`).
    data: Annotated[Path, PlainValidator(_data_field, json_schema_input_type=Text | None),
                    _PATH] = None  # type: ignore[assignment]
    #: the object store's options (may hold secrets: never in repr, to_dict or any record)
    storage_options: Annotated[dict[Text, str | int | float | bool | None] | None,
                               Field(repr=False),
                               What("a mapping of the object store's options (e.g. "
                                    "{endpoint_url: 'http://minio:9000'})")] = None
    #: defaults for every backbone
    weights: Annotated[Text | None, What("a weights name such as 'imagenet' or 'none'")] = None
    precision: Annotated[Literal[PRECISIONS] | None, What("precision")] = None  # type: ignore[valid-type]
    predict_precision: Annotated[Literal[PRECISIONS] | None, What("precision")] = None  # type: ignore[valid-type]
    resize: Annotated[Literal[RESIZE_POLICIES] | None, What("resize policy")] = None  # type: ignore[valid-type]
    runtime: Annotated[Literal[RUNTIMES] | None, What("runtime")] = None  # type: ignore[valid-type]
    maps_runtime: Annotated[Literal[RUNTIMES] | None, What("runtime")] = None  # type: ignore[valid-type]
    image_size: Annotated[int | None, Field(ge=1, le=MAX_IMAGE_SIZE), What("an integer (pixels)")] = None
    calibration_size: Annotated[int | None, Field(ge=1, le=MAX_CALIBRATION_SIZE), What("an integer")] = None
    backbones: Annotated[list[_items("backbones", "a backbone name or a mapping with 'name'",  # type: ignore[valid-type]
                                     BackboneSpec)],
                         Field(min_length=1),
                         What("a non-empty list of backbone names or mappings "
                              "({name: ..., weights: ...})")]
    #: tuples of backbone names in the backbones' listed order (default: all non-empty subsets)
    combinations: Annotated[
        list[tuple[str, ...]],
        PlainValidator(_combinations_field,
                       json_schema_input_type=Literal["all"] | CombinationBounds | list[Text | list[Text]] | None),
        What("'all', {min: K, max: M} (subset sizes) or a list of lists of backbone names")] = Field(
        default_factory=list)
    heads: Annotated[list[_items("heads", "a head name or a mapping with 'name'", HeadSpec)],  # type: ignore[valid-type]
                     Field(min_length=1),
                     What("a non-empty list of head names or mappings ({name: ..., params: {...}})")]
    optimizers: Annotated[list[_items("optimizers", "an optimizer name or a mapping with 'name'",  # type: ignore[valid-type]
                                      OptimizerSpec)],
                          Field(min_length=1),
                          What("a non-empty list of optimizer names or mappings "
                               "({name: ..., learning_rate: ...})")]
    epochs: Annotated[int, Field(ge=1, le=MAX_EPOCHS), What("an integer")] = 8
    batch_size: Annotated[int, Field(ge=1, le=MAX_BATCH_SIZE), What("an integer")] = 128
    seed: Annotated[int, Field(ge=0, le=SEED_MAX), What("an integer")] = 2019
    validation: Annotated[
        Validation,
        BeforeValidator(_validation_input,
                        json_schema_input_type=Literal[VALIDATION_KINDS] | Validation | None),  # type: ignore[valid-type]
        What("{holdout: FRACTION} or {kfold: FOLDS}")] = Field(default_factory=Validation)
    #: predictions are clipped to [lo, hi] before scoring
    clip: Annotated[tuple[SciFloat, SciFloat],
                    BeforeValidator(_clip_input, json_schema_input_type=Annotated[
                        list[float], Field(min_length=2, max_length=2)]),
                    What("a list [lo, hi] of two numbers with 0 <= lo < hi <= 1")] = (0.005, 0.995)
    target: Annotated[SciFloat, Field(gt=0, allow_inf_nan=False), What("a number > 0")] = 0.06127
    #: default: runs/<name> (relative to the current directory)
    output: Annotated[Path | None, PlainValidator(_path_field, json_schema_input_type=Text | None),
                      _PATH] = None
    #: a number of trials, or a mapping (the short form is read by Tuning's own validator)
    tuning: Annotated[Tuning | None, BeforeValidator(_as_is, json_schema_input_type=Annotated[
                          int, Field(ge=1, le=MAX_BUDGET)] | Tuning | None),
                      What("a mapping {budget: TRIALS, params: [...]}")] = None
    tta: Annotated[bool, What("true or false")] = False
    exclude: Annotated[list[str], PlainValidator(_exclude_field,
                                                 json_schema_input_type=Text | list[Text] | None),
                       What("a list of relative file paths or the path of a text file listing "
                            "them")] = Field(default_factory=ExcludeList)
    cache_dir: Annotated[Path | None, PlainValidator(_path_field, json_schema_input_type=Text | None),
                         _PATH] = None
    engine: Annotated[Literal[ENGINES], What("engine")] = "local"  # type: ignore[valid-type]
    ray_address: Annotated[Text | None, What("a Ray address such as 'ray://127.0.0.1:10001' or "
                                              "'auto'")] = None
    #: auto | none | clip | temperature; an explicit clip without postprocess means ``clip``
    postprocess: Annotated[Literal[POSTPROCESSES],  # type: ignore[valid-type]
                           BeforeValidator(_as_is,
                                           json_schema_input_type=Literal[POSTPROCESSES] | None),  # type: ignore[valid-type]
                           What("postprocess")] = "auto"
    refit: Annotated[bool, What("true or false")] = False
    ensemble: Annotated[Ensemble | None, What("a mapping {top: RUNS, method: mean | stack}")] = None
    tracking: Annotated[
        Tracking | None,
        BeforeValidator(_tracking_input,
                        json_schema_input_type=Literal[TRACKING_BACKENDS] | Tracking | None),  # type: ignore[valid-type]
        What("a backend name (mlflow) or a mapping {backend: mlflow, uri: ..., required: ...}")] = None

    _source: Path | None = PrivateAttr(None)

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data: Any) -> Any:
        """``validation: null`` / ``postprocess: null`` mean the default (as if not given)."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items()
                    if v is not None or k not in ("validation", "postprocess")}
        return data

    # -- checks across fields and against the registry --------------------------------------------
    @field_validator("backbones")
    @classmethod
    def _fill_and_check_backbones(cls, specs: list[BackboneSpec],
                                  info: ValidationInfo) -> list[BackboneSpec]:
        """Fill unset options from the file's defaults; check weights and image sizes."""
        defaults = {key: info.data.get(key) for key in
                    ("weights", "image_size", "precision", "predict_precision", "resize",
                     "calibration_size", "runtime", "maps_runtime")}
        registry = _registry(info)
        first: dict[str, int] = {}
        result = []
        for i, spec in enumerate(specs):
            if spec.name in first:
                raise problem(f"backbone {spec.name!r} is listed twice (also backbones"
                              f"[{first[spec.name]}]); list each backbone once", sub=f"[{i}]")
            first[spec.name] = i
            own = spec.model_fields_set
            update = {k: v for k, v in defaults.items() if v is not None and k not in own}
            spec = spec.model_copy(update={**update, "weights": update.get("weights",
                                                                            spec.weights).strip()})

            def at(key: str, i: int = i, own: set[str] = own) -> str:
                return f"backbones[{i}].{key}" if key in own else key if key in defaults and \
                    defaults[key] is not None else "backbones"

            backbone = registry.backbone(spec.name)
            try:
                backbone.check_weights(spec.weights)
            except ConfigError as exc:
                raise problem(str(exc), at("weights")) from None
            if spec.image_size is not None:
                try:
                    backbone.check_image_size(spec.image_size)
                except ConfigError as exc:
                    raise problem(str(exc), at("image_size")) from None
            if spec.layers:
                try:
                    spec = spec.model_copy(update={"layers": list(backbone.check_layers(spec.layers))})
                except ConfigError as exc:
                    raise problem(str(exc), f"backbones[{i}].layers") from None
            if spec.runtime == "openvino" and "runtime" in own \
                    and "float32" not in (spec.precision, spec.predicts_in):
                raise problem(f"runtime openvino computes float32 features, and backbone "
                              f"{spec.name!r} has none (precision {spec.precision}, "
                              f"predict_precision {spec.predict_precision}); remove it",
                              at("runtime"))
            result.append(spec)
        if defaults["runtime"] == "openvino" and not any(
                "float32" in (s.precision, s.predicts_in) for s in result if s.runtime == "openvino"):
            raise problem("runtime openvino computes float32 features, and no backbone of the "
                          "file has any (precision or predict_precision float32); remove it",
                          "runtime")
        return result

    @field_validator("heads", "optimizers")
    @classmethod
    def _no_duplicates(cls, specs: list[Any], info: ValidationInfo) -> list[Any]:
        what = {"heads": "head {!r} with the same params",
                "optimizers": "optimizer {!r} with the same learning rate"}[str(info.field_name)]
        for i, spec in enumerate(specs):
            if spec in specs[:i]:
                raise problem(f"duplicate {what.format(spec.name)} "
                              f"(same as {info.field_name}[{specs.index(spec)}])", sub=f"[{i}]")
        return specs

    @model_validator(mode="after")
    def _resolve(self, info: ValidationInfo) -> Experiment:
        """Defaults that depend on other fields, the overrides, and checks across fields."""
        ctx = _context(info)
        cwd = ctx.get("cwd")
        if not self.name:  # the file name without .yaml
            self.name = str(ctx.get("stem") or "experiment")
        data, at = (ctx["data"], "data (override)") if ctx.get("data") is not None else (self.data, "data")
        if data is None:
            raise problem("missing required field: data (or pass the data directory on the "
                          "command line)", "")
        if at != "data" and not (isinstance(data, str) and is_url(data.strip())):
            data = resolve_path(data, cwd, at)
        try:
            self.data = data_location(data, self.storage_options)  # type: ignore[assignment]
        except DataError as exc:
            raise problem(str(exc), at) from None
        for key in ("output", "cache_dir"):
            if ctx.get(key) is not None:
                setattr(self, key, resolve_path(ctx[key], cwd, f"{key} (override)"))
        if self.output is None:
            self.output = Path("runs") / self.name if cwd is None else Path(cwd) / "runs" / self.name
        if not self.combinations:
            self.combinations = [c for size in range(1, len(self.backbones) + 1)
                                 for c in itertools.combinations(self.backbone_names, size)]
        lo, hi = self.clip
        if not 0 <= lo < hi <= 1:
            raise problem(f"must be a list [lo, hi] of two numbers with 0 <= lo < hi <= 1, got "
                          f"{[lo, hi]!r}", "clip")
        if "postprocess" not in self.model_fields_set and "clip" in self.model_fields_set:
            self.postprocess = "clip"
        if not isinstance(self.exclude, ExcludeList):
            self.exclude = ExcludeList(self.exclude)
        if self.tuning is not None and "params" in self.tuning.model_fields_set:
            self._check_tuning(self.tuning, _registry(info))
        self._check_maps_heads(_registry(info))
        self._check_classifier_heads(_registry(info))
        source = ctx.get("source_path")
        self._source = None if source is None else Path(source)
        return self

    def _check_maps_heads(self, registry: Registry) -> None:
        """A head trained on maps (``input = "maps"``, e.g. ``finetune``) gets at least one
        single-backbone combination whose backbone offers ``split_top``, and none of the
        parameters the runner sets from the run's backbone (:data:`MAPS_HEAD_INJECTED`)."""
        from catsdogs.components import has_top_split, trains_on_maps

        for i, head in enumerate(self.heads):
            if not trains_on_maps(registry.head(head.name)):
                continue
            for key in MAPS_HEAD_INJECTED:
                if key in head.params:
                    raise problem(f"do not set {key!r} for head {head.name!r}: it is the {key} of "
                                  "the run's backbone (set it under backbones:)",
                                  f"heads[{i}].params.{key}")
            wanted = head.params.get("backbone")
            if not any(maps_combination(head, c, registry) for c in self.combinations):
                split = [b for b in self.backbone_names if has_top_split(registry.backbone(b))]
                raise problem(
                    f"head {head.name!r} is trained on one backbone's feature maps, but no "
                    "combination of the experiment is a single backbone that offers split_top"
                    + (f" and is {wanted!r}" if wanted else "")
                    + f" (backbones that do: {', '.join(split) or 'none'}); add such a backbone "
                    "alone to combinations (e.g. combinations: all), or remove the head",
                    f"heads[{i}]")

    def _check_classifier_heads(self, registry: Registry) -> None:
        """A head that reads the backbones' ImageNet classifiers (``uses_classifier``, e.g.
        ``imagenet_prior``) gets at least one combination where it can (see
        :func:`classifier_combination`), and no ``weights`` (the runner sets the backbones')."""
        from catsdogs.components import has_imagenet_classifier, uses_classifier

        backbones = {b.name: b for b in self.backbones}
        for i, head in enumerate(self.heads):
            if not uses_classifier(registry.head(head.name)):
                continue
            if "weights" in head.params:
                raise problem(f"do not set 'weights' for head {head.name!r}: it is the weights "
                              "of the run's backbones (set it under backbones:)",
                              f"heads[{i}].params.weights")
            if not any(classifier_combination(c, backbones, registry) for c in self.combinations):
                able = [b for b in self.backbone_names if has_imagenet_classifier(registry.backbone(b))]
                raise problem(
                    f"head {head.name!r} reads the backbones' own ImageNet classifiers, but no "
                    "combination of the experiment has only backbones that offer one, with their "
                    f"plain features (no layers:, merge: mean) (backbones that offer one: "
                    f"{', '.join(able) or 'none'}); use such backbones, or remove the head",
                    f"heads[{i}]")

    def _check_tuning(self, tuning: Tuning, registry: Registry) -> None:
        # the common names, then what the listed heads declare (Head.search_space)
        tunable = dict.fromkeys(TUNABLE_PARAMS)
        for head in self.heads:
            tunable.update(dict.fromkeys(registry.head(head.name).tuning_space().entries))
        if not tuning.params:
            raise problem(f"must be a non-empty list of: {', '.join(tunable)}; got a list",
                          "tuning.params")
        for j, param in enumerate(tuning.params):
            _choice(param, tunable, "tunable parameter", f"tuning.params[{j}]")
            if param in tuning.params[:j]:
                raise problem(f"{param!r} is listed twice", f"tuning.params[{j}]")

    # -- what the rest of the package reads ---------------------------------------------------------
    @property
    def source(self) -> Path | None:
        """The experiment file (absolute; None for text without a file)."""
        return self._source

    @property
    def exclude_file(self) -> Path | None:
        """The exclude list's file when ``exclude:`` named one (for the run records)."""
        return getattr(self.exclude, "file", None)

    @property
    def exclude_sha256(self) -> str | None:
        return getattr(self.exclude, "sha256", None)

    @property
    def backbone_names(self) -> list[str]:
        return [b.name for b in self.backbones]

    def backbone(self, name: str) -> BackboneSpec:
        """The :class:`BackboneSpec` called ``name`` (KeyError if it is not listed)."""
        for spec in self.backbones:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def exclude_summary(self) -> list[str] | dict[str, Any]:
        """The exclude list as recorded: the entries given in the experiment file, or for an
        exclude *file* its path, SHA-256 and entry count (not its whole content)."""
        if self.exclude_file is None:
            return list(self.exclude)
        return {"file": str(self.exclude_file), "sha256": self.exclude_sha256,
                "entries": len(self.exclude)}

    def match_exclude(self, files: Iterable[str]) -> tuple[list[str], list[str]]:
        """``(matched, unmatched)``: the exclude entries that are / are not among ``files``."""
        present = set(files)
        matched = [e for e in self.exclude if e in present]
        return matched, [e for e in self.exclude if e not in present]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable description (paths as strings), for run records."""
        def text(p: Path | None) -> str | None:
            return None if p is None else str(p)

        return {
            "name": self.name, "source": text(self.source), "data": str(self.data),
            "backbones": [b.to_dict() for b in self.backbones],
            "combinations": [list(c) for c in self.combinations],
            "heads": [h.to_dict() for h in self.heads],
            "optimizers": [o.to_dict() for o in self.optimizers],
            "epochs": self.epochs, "batch_size": self.batch_size, "seed": self.seed,
            "validation": self.validation.to_dict(), "clip": list(self.clip),
            "target": self.target, "output": str(self.output),
            "tuning": None if self.tuning is None else self.tuning.to_dict(),
            "tta": self.tta, "exclude": self.exclude_summary(), "cache_dir": text(self.cache_dir),
            "engine": self.engine, "ray_address": self.ray_address,
            "postprocess": self.postprocess, "refit": self.refit,
            "ensemble": None if self.ensemble is None else self.ensemble.to_dict(),
            "tracking": None if self.tracking is None else self.tracking.to_dict(),
        }


#: every field the top level of an experiment file may have
TOP_LEVEL_FIELDS: tuple[str, ...] = tuple(Experiment.model_fields)


def json_schema() -> dict[str, Any]:
    """The JSON Schema of an experiment file (draft 2020-12), for editors and validators."""
    schema = Experiment.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["description"] = ("A catsdogs experiment: backbones x combinations x heads x "
                             "optimizers, validated by `catsdogs run`. Required: backbones, heads, "
                             "optimizers and data (data may come from the command line).")
    return schema


# -- errors --------------------------------------------------------------------------------------------
def _path(loc: tuple[Any, ...]) -> str:
    """pydantic's ``loc`` as the loader's field path (``heads[1].params``)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not part.startswith("function-"):
            out += f".{part}" if out else part
    return out


def _field_info(loc: tuple[Any, ...]) -> tuple[type[BaseModel] | None, Any]:
    """The model owning the last field of ``loc`` and that field's FieldInfo (None if unknown)."""
    model: type[BaseModel] | None = Experiment
    info = None
    for part in loc:
        if isinstance(part, int):
            continue
        if info is not None:  # descend into the model the previous field holds
            model = _model_in(info.annotation)
        if model is None or part not in model.model_fields:
            return model, None
        info = model.model_fields[part]
    return model, info


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The first BaseModel class inside an annotation (through unions, lists, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _what(info: Any) -> str | None:
    for meta in getattr(info, "metadata", ()) or ():
        if isinstance(meta, What):
            return meta.phrase
    return None


def _message(error: ErrorDetails) -> tuple[str, str]:
    """``(field path, message)`` for one pydantic error."""
    loc = tuple(error["loc"])
    kind = error["type"]
    value = error.get("input")
    ctx = error.get("ctx") or {}
    path = _path(loc)
    if kind == "catsdogs":
        at = ctx.get("at")
        return (at if at is not None else (path + ctx.get("sub", "")).lstrip(".")), ctx["message"]
    if kind == "wrong_branch":
        return path, f"must be {error['msg']}, got {type_name(value)}"
    if kind == "extra_forbidden":
        parent = _field_info(loc[:-1])[1] if len(loc) > 1 else None
        owner = Experiment if parent is None else _model_in(parent.annotation)
        fields = list(owner.model_fields) if owner is not None else []
        label = "valid fields" if owner is Experiment else "allowed"
        return path, f"unknown field{suggest(str(loc[-1]), fields)}; {label}: {', '.join(fields)}"
    owner, info = _field_info(loc)
    if kind == "missing":
        allowed = ", ".join(owner.model_fields) if owner is not None else ""
        return _path(loc[:-1]), f"missing field {str(loc[-1])!r} (allowed: {allowed})"
    what = _what(info) or "valid"
    if kind == "literal_error":
        choices = [str(c).strip("'") for c in re.findall(r"'[^']*'", ctx.get("expected", ""))]
        hint = suggest(value, choices) if isinstance(value, str) else ""
        return path, f"unknown {what} {value!r}{hint}; choose one of: {', '.join(choices)}"
    if kind == "less_than_equal":
        limit = ctx["le"]
        shown = f"{limit:g}" if isinstance(limit, float) and not limit.is_integer() else int(limit)
        return path, f"must be at most {shown}, got {value}"
    if what == "an integer" and kind in ("int_type", "greater_than_equal", "greater_than"):
        minimum = ctx.get("ge", ctx.get("gt", 0) + 1 if "gt" in ctx else None)
        if minimum is None:
            minimum = _int_minimum(info)
        return path, f"must be an integer >= {minimum}, got {type_name(value)}"
    return path, f"must be {what}, got {type_name(value)}"


def _int_minimum(info: Any) -> int:
    for meta in getattr(info, "metadata", ()) or ():
        ge = getattr(meta, "ge", None)
        if ge is not None:
            return int(ge)
    return 0


def validate_document(doc: dict[str, Any], context: dict[str, Any] | None = None,
                      line_of: Any = None) -> tuple[Experiment | None, tuple[str, str] | None]:
    """Validate ``doc`` with ``context`` (see :class:`Experiment`): ``(experiment, None)``, or
    ``(None, (field path, message))`` for the error that comes first in the file
    (``line_of(path)`` gives a path's line; default: pydantic's order)."""
    try:
        return Experiment.model_validate(doc, context=context), None
    except ValidationError as exc:
        messages = [_message(e) for e in exc.errors(include_url=False)]
    if line_of is not None:
        order = {m: i for i, m in enumerate(messages)}
        messages.sort(key=lambda m: (line_of(m[0]) or 0, order[m]))
    return None, messages[0]
