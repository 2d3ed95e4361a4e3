"""The experiment file's schema: pydantic v2 models (strict, ``extra="forbid"``) and their errors.

:class:`ExperimentFile` describes the YAML document's *shape*: which fields exist, their types,
choices and bounds. :func:`json_schema` is the JSON Schema of that shape (``catsdogs schema``, for
editors). :func:`validate_document` validates a parsed document and turns the first pydantic error
(the one earliest in the file) into a field path and a message in the loader's words, e.g.
``("epochs", "must be an integer >= 1, got 0")`` — :mod:`catsdogs.experiment.spec` adds the file
and line. What needs the plugin registry or several fields at once (component names, weights per
backbone, combinations, duplicates, paths) is checked by the loader afterwards.

Each field carries a :class:`What` marker: the phrase messages use for the allowed values
("a number in (0, 1)"). Union-typed fields pick their branch from the input's type
(``Discriminator``), so an error names one branch, never a list of alternatives.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    WithJsonSchema,
)

from catsdogs.validation import SEED_MAX

if TYPE_CHECKING:
    from pydantic_core import ErrorDetails

__all__ = ["ExperimentFile", "What", "json_schema", "validate_document", "type_name", "suggest"]

#: feature precisions (int8: post-training quantised backbones, calibrated on training images)
PRECISIONS = ("float32", "bfloat16", "int8")
RESIZE_POLICIES = ("squash", "crop", "pad")
ENGINES = ("local", "ray")
POSTPROCESSES = ("auto", "none", "clip", "temperature")
ENSEMBLE_METHODS = ("mean", "stack")
TRACKING_BACKENDS = ("mlflow",)
VALIDATION_KINDS = ("holdout", "kfold")

#: sane upper bounds: a typo such as ``epochs: 1000000000000`` is an error, not a week of work
MAX_EPOCHS = 10_000
MAX_BATCH_SIZE = 65_536
MAX_FOLDS = 100
MAX_BUDGET = 10_000
MAX_ENSEMBLE = 1_000
MAX_IMAGE_SIZE = 4_096
MAX_CALIBRATION_SIZE = 100_000
MAX_LEARNING_RATE = 1_000.0

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


def suggest(word: str, choices: list[str] | tuple[str, ...]) -> str:
    """`` (did you mean 'x'?)`` for a close match of ``word`` in ``choices``, else ``""``."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _sci_float(value: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` (no dot) as a string: accept such strings as floats."""
    if isinstance(value, str) and _SCI_FLOAT.match(value.strip()):
        return float(value)
    return value


def _by_type(value: Any) -> str | None:
    """The union branch for ``value``: ``_str``, ``_int``, ``_map`` or ``_list`` (None: no branch)."""
    if isinstance(value, bool):
        return None
    for tag, types in (("_str", str), ("_int", int), ("_map", dict), ("_list", list)):
        if isinstance(value, types):
            return tag
    return None


def _branches(*branches: tuple[str, Any], what: str) -> Any:
    """A union whose branch is chosen by the input's type (see :func:`_by_type`)."""
    members = tuple(Annotated[t, Tag(tag)] for tag, t in branches)
    return Annotated[
        members[0] if len(members) == 1 else _union(members),
        Discriminator(_by_type, custom_error_type="wrong_branch",
                      custom_error_message=what),
        What(what),
    ]


def _union(members: tuple[Any, ...]) -> Any:
    from typing import Union

    return Union[members]  # noqa: UP007  (a runtime-built union)


SciFloat = Annotated[float, BeforeValidator(_sci_float)]
Text = Annotated[str, Field(min_length=1, pattern=r"\S")]


class _Model(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)


class BackboneItem(_Model):
    """A backbone with per-backbone options (unset: the file's defaults)."""

    name: Annotated[Text, What("a backbone name")]
    weights: Annotated[Text | None, What("a weights name such as 'imagenet' or 'none'")] = None
    image_size: Annotated[int | None, Field(ge=1, le=MAX_IMAGE_SIZE), What("an integer (pixels)")] = None
    precision: Annotated[Literal[PRECISIONS] | None, What("precision")] = None  # type: ignore[valid-type]
    resize: Annotated[Literal[RESIZE_POLICIES] | None, What("resize policy")] = None  # type: ignore[valid-type]
    calibration_size: Annotated[int | None, Field(ge=1, le=MAX_CALIBRATION_SIZE), What("an integer")] = None


class HeadItem(_Model):
    """A head with hyper-parameters (checked against the head's constructor by the loader)."""

    name: Annotated[Text, What("a head name")]
    #: checked by the loader, whose message lists the head's own parameter names
    params: Annotated[Any, WithJsonSchema({"type": ["object", "null"]}),
                      What("a mapping of hyper-parameters")] = None


class OptimizerItem(_Model):
    """An optimizer with its learning rate (unset: the optimizer's default)."""

    name: Annotated[Text, What("an optimizer name")]
    learning_rate: Annotated[SciFloat | None, Field(gt=0, le=MAX_LEARNING_RATE, allow_inf_nan=False),
                             What("a number > 0")] = None


class CombinationBounds(_Model):
    """Subset sizes of the backbones to combine."""

    #: bounds (1 <= min <= max <= number of backbones) are checked by the loader
    min: Annotated[int | None, What("an integer")] = None
    max: Annotated[int | None, What("an integer")] = None


class ValidationSpec(_Model):
    """Exactly one of ``holdout`` (a fraction) or ``kfold`` (a number of folds)."""

    holdout: Annotated[SciFloat | None, Field(gt=0, lt=1, allow_inf_nan=False),
                       What("a number in (0, 1)")] = None
    kfold: Annotated[int | None, Field(ge=2, le=MAX_FOLDS), What("an integer")] = None


class TuningSpec(_Model):
    """Random search: ``budget`` trials over ``params`` (names the heads can tune)."""

    budget: Annotated[int, Field(ge=1, le=MAX_BUDGET), What("an integer")]
    params: Annotated[Text | list[Text] | None, What("a list of tunable parameter names")] = None


class EnsembleSpec(_Model):
    """Combine the ``top`` best runs by ``mean`` or a ``stack`` model."""

    top: Annotated[int, Field(ge=2, le=MAX_ENSEMBLE), What("an integer")] = 3
    method: Annotated[Literal[ENSEMBLE_METHODS], What("ensemble method")] = "mean"  # type: ignore[valid-type]


class TrackingSpec(_Model):
    """Experiment tracking (MLflow) at ``uri``; ``required``: fail when it cannot be reached."""

    backend: Annotated[Literal[TRACKING_BACKENDS], What("tracking backend")] = "mlflow"  # type: ignore[valid-type]
    uri: Annotated[Text | None, What("a tracking URI such as 'http://127.0.0.1:5000'")] = None
    required: Annotated[bool, What("true or false")] = False


_BACKBONE = _branches(("_str", Text), ("_map", BackboneItem),
                      what="a backbone name or a mapping with 'name'")
_HEAD = _branches(("_str", Text), ("_map", HeadItem), what="a head name or a mapping with 'name'")
_OPTIMIZER = _branches(("_str", Text), ("_map", OptimizerItem),
                       what="an optimizer name or a mapping with 'name'")
_COMBO = _branches(("_str", Text), ("_list", list[Text]),
                   what="a non-empty list of backbone names")


class ExperimentFile(_Model):
    """An experiment file: a grid of backbones x combinations x heads x optimizers (see
    :mod:`catsdogs.experiment.spec` for the meaning of every field)."""

    model_config = ConfigDict(title="catsdogs experiment", strict=True, extra="forbid")

    name: Annotated[Text | int | None, What("a non-empty string")] = None
    data: Annotated[Text | None, What("a path (string)")] = None
    storage_options: Annotated[dict[Text, str | int | float | bool | None] | None,
                               What("a mapping of the object store's options (e.g. "
                                    "{endpoint_url: 'http://minio:9000'})")] = None
    weights: Annotated[Text | None, What("a weights name such as 'imagenet' or 'none'")] = None
    precision: Annotated[Literal[PRECISIONS] | None, What("precision")] = None  # type: ignore[valid-type]
    resize: Annotated[Literal[RESIZE_POLICIES] | None, What("resize policy")] = None  # type: ignore[valid-type]
    image_size: Annotated[int | None, Field(ge=1, le=MAX_IMAGE_SIZE), What("an integer (pixels)")] = None
    calibration_size: Annotated[int | None, Field(ge=1, le=MAX_CALIBRATION_SIZE), What("an integer")] = None
    backbones: Annotated[list[_BACKBONE], Field(min_length=1),  # type: ignore[valid-type]
                         What("a non-empty list of backbone names or mappings "
                              "({name: ..., weights: ...})")]
    combinations: Annotated[
        _branches(("_str", Literal["all"]), ("_map", CombinationBounds),  # type: ignore[valid-type]
                  ("_list", list[_COMBO]),  # type: ignore[valid-type]
                  what="'all', {min: K, max: M} (subset sizes) or a list of lists of backbone names")
        | None, What("'all', {min: K, max: M} (subset sizes) or a list of lists of backbone names"),
    ] = None
    heads: Annotated[list[_HEAD], Field(min_length=1),  # type: ignore[valid-type]
                     What("a non-empty list of head names or mappings ({name: ..., params: {...}})")]
    optimizers: Annotated[list[_OPTIMIZER], Field(min_length=1),  # type: ignore[valid-type]
                          What("a non-empty list of optimizer names or mappings "
                               "({name: ..., learning_rate: ...})")]
    epochs: Annotated[int, Field(ge=1, le=MAX_EPOCHS), What("an integer")] = 8
    batch_size: Annotated[int, Field(ge=1, le=MAX_BATCH_SIZE), What("an integer")] = 128
    seed: Annotated[int, Field(ge=0, le=SEED_MAX), What("an integer")] = 2019
    validation: Annotated[
        _branches(("_str", Literal[VALIDATION_KINDS]), ("_map", ValidationSpec),  # type: ignore[valid-type]
                  what="{holdout: FRACTION} or {kfold: FOLDS}") | None,
        What("{holdout: FRACTION} or {kfold: FOLDS}")] = None
    clip: Annotated[list[SciFloat], Field(min_length=2, max_length=2),
                    What("a list [lo, hi] of two numbers with 0 <= lo < hi <= 1")] = [0.005, 0.995]
    target: Annotated[SciFloat, Field(gt=0, allow_inf_nan=False), What("a number > 0")] = 0.06127
    output: Annotated[Text | None, What("a path (string)")] = None
    tuning: Annotated[
        _branches(("_int", Annotated[int, Field(ge=1, le=MAX_BUDGET)]), ("_map", TuningSpec),  # type: ignore[valid-type]
                  what="a mapping {budget: TRIALS, params: [...]}") | None,
        What("a mapping {budget: TRIALS, params: [...]}")] = None
    tta: Annotated[bool, What("true or false")] = False
    exclude: Annotated[
        _branches(("_str", Text), ("_list", list[Any]),  # type: ignore[valid-type]
                  what="a list of relative file paths or the path of a text file listing them")
        | None, What("a list of relative file paths or the path of a text file listing them")] = None
    cache_dir: Annotated[Text | None, What("a path (string)")] = None
    engine: Annotated[Literal[ENGINES], What("engine")] = "local"  # type: ignore[valid-type]
    ray_address: Annotated[Text | None, What("a Ray address such as 'ray://127.0.0.1:10001' or "
                                              "'auto'")] = None
    postprocess: Annotated[Literal[POSTPROCESSES] | None, What("postprocess")] = None  # type: ignore[valid-type]
    refit: Annotated[bool, What("true or false")] = False
    ensemble: Annotated[EnsembleSpec | None, What("a mapping {top: RUNS, method: mean | stack}")] = None
    tracking: Annotated[
        _branches(("_str", Literal[TRACKING_BACKENDS]), ("_map", TrackingSpec),  # type: ignore[valid-type]
                  what="a backend name (mlflow) or a mapping {backend: mlflow, uri: ..., "
                       "required: ...}") | None,
        What("a backend name (mlflow) or a mapping {backend: mlflow, uri: ..., required: ...}")] = None


def json_schema() -> dict[str, Any]:
    """The JSON Schema of an experiment file (draft 2020-12), for editors and validators."""
    schema = ExperimentFile.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["description"] = ("A catsdogs experiment: backbones x combinations x heads x "
                             "optimizers, validated by `catsdogs run`. Required: backbones, heads, "
                             "optimizers and data (data may come from the command line).")
    return schema


# -- errors --------------------------------------------------------------------------------------------
def _path(loc: tuple[Any, ...]) -> str:
    """pydantic's ``loc`` as the loader's field path (``heads[1].params``), union tags dropped."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not part.startswith("_"):
            out += f".{part}" if out else part
    return out


def _field_info(loc: tuple[Any, ...]) -> tuple[type[BaseModel] | None, Any]:
    """The model owning the last field of ``loc`` and that field's FieldInfo (None if unknown)."""
    model: type[BaseModel] | None = ExperimentFile
    info = None
    for part in loc:
        if isinstance(part, int) or part.startswith("_"):
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
    for meta in getattr(annotation, "__metadata__", ()) or ():
        found = _model_in(meta)
        if found is not None:
            return found
    origin = getattr(annotation, "__origin__", None)
    return _model_in(origin) if origin is not None and origin is not annotation else None


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
    if kind == "extra_forbidden":
        parent = _field_info(loc[:-1])[1] if len(loc) > 1 else None
        owner = ExperimentFile if parent is None else _model_in(parent.annotation)
        fields = list(owner.model_fields) if owner is not None else []
        label = "valid fields" if owner is ExperimentFile else "allowed"
        key = str(loc[-1])
        return path, f"unknown field{suggest(key, fields)}; {label}: {', '.join(fields)}"
    owner, info = _field_info(loc)
    if kind == "missing":
        allowed = ", ".join(owner.model_fields) if owner is not None else ""
        return _path(loc[:-1]), f"missing field {str(loc[-1])!r} (allowed: {allowed})"
    what = _what(info) or "valid"
    if kind == "literal_error" and isinstance(loc[-1], str) and loc[-1].startswith("_"):
        # a word in a union field (``validation: holdoutt``): name the word's kind if it has one
        word = _BRANCH_WORDS.get(path)
        if word is None:
            return path, f"must be {what}, got {type_name(value)}"
        what = word
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
    if kind == "wrong_branch":
        return path, f"must be {error['msg']}, got {type_name(value)}"
    return path, f"must be {what}, got {type_name(value)}"


#: what the single words of union fields are called in messages
_BRANCH_WORDS = {"validation": "validation kind", "tracking": "tracking backend"}


def _int_minimum(info: Any) -> int:
    for meta in getattr(info, "metadata", ()) or ():
        ge = getattr(meta, "ge", None)
        if ge is not None:
            return int(ge)
    return 0


def validate_document(doc: dict[str, Any], line_of: Any = None) -> tuple[ExperimentFile | None,
                                                                          tuple[str, str] | None]:
    """Validate ``doc``: ``(model, None)``, or ``(None, (field path, message))`` for the error
    that comes first in the file (``line_of(path)`` gives a path's line; default: pydantic's
    order)."""
    try:
        return ExperimentFile.model_validate(doc), None
    except ValidationError as exc:
        messages = [_message(e) for e in exc.errors(include_url=False)]
    if line_of is not None:
        order = {m: i for i, m in enumerate(messages)}
        messages.sort(key=lambda m: (line_of(m[0]) or 0, order[m]))
    return None, messages[0]
