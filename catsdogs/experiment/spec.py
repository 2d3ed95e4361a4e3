"""The experiment file: one YAML file describes a whole grid of runs.

A grid is *backbones* (cached GAP features) × *combinations* of them (fused features) × *heads* ×
*optimizers*. :func:`load_experiment` reads and validates a file and returns an
:class:`Experiment`; every problem is an :class:`ExperimentError` whose message names the file,
the line, the field path and what is allowed, e.g.::

    experiments/x.yaml:7: heads[1]: unknown head 'dropout_sigmod' (did you mean 'dropout_sigmoid'?); available: dropout_sigmoid, softmax_cam
    experiments/x.yaml:12: validation.holdout: must be a number in (0, 1), got 1.5

The format (only ``data``, ``backbones``, ``heads`` and ``optimizers`` are required; ``data`` may
also come from the command line)::

    name: seed                     # optional; default: the file name without .yaml
    data: ../../shared/data/dogs-vs-cats-mini    # relative paths are relative to the YAML file's folder
    weights: imagenet              # default for all backbones (imagenet | none)
    precision: float32             # default for all backbones (float32 | bfloat16 | int8)
    calibration_size: 300          # default for all backbones: int8 calibration images (1..100000)
    resize: squash                 # default for all backbones (squash | crop | pad)
    image_size: null               # default for all backbones (null = each backbone's own size)
    backbones:                     # names, or mappings with per-backbone options
      - resnet50
      - {name: inception_v3, image_size: 299, weights: none, precision: bfloat16, resize: squash}
      - {name: xception, precision: int8, calibration_size: 500}
    combinations: all              # all non-empty subsets | {min: 2, max: 4} (subset sizes)
                                   # | explicit list of lists of backbone names
    heads: [dropout_sigmoid, {name: softmax_cam, params: {dropout: 0.3}}]
    optimizers: [adam, {name: adadelta, learning_rate: 1.0}]
    epochs: 8
    batch_size: 128
    seed: 2019
    validation: {holdout: 0.2}     # or {kfold: 5}
    clip: [0.005, 0.995]           # predictions are clipped to [lo, hi] before scoring
    postprocess: auto              # auto | none | clip | temperature (how probabilities are
                                   # calibrated before scoring; an explicit clip without
                                   # postprocess means `postprocess: clip` with those bounds)
    target: 0.06127                # the log loss to beat (Kaggle top 10%)
    output: ../runs/seed           # default: runs/<name> relative to the current directory
    tuning: {budget: 10, params: [dropout, learning_rate]}   # optional; params default: all of
                                   # dropout, learning_rate, l2 (l2 only for heads that have it);
                                   # heads declare more (Head.search_space), e.g. lightgbm_stacking:
                                   # num_leaves, gbm_learning_rate, reg_lambda, min_child_samples
    tta: false                     # average original + horizontally-flipped features' predictions
    exclude: [train/cat.12.jpg]    # optional; or a path to a text file with one relative path per
                                   # line (`exclude: audit/exclude.txt`; blank lines and # comments
                                   # are ignored)
    cache_dir: null                # optional feature-cache dir
    storage_options: null          # data in object storage (data: s3://bucket/prefix, gs://, az://):
                                   # the client's options, e.g. {endpoint_url: 'http://minio:9000'};
                                   # credentials best from the environment; never written anywhere
    engine: local                  # local | ray (run the grid on a Ray cluster)
    ray_address: null              # Ray cluster address for engine: ray (null = start a local one)
    refit: false                   # refit the winner on all training images for the submission
    ensemble: null                 # optional: {top: 3, method: mean | stack} over the best runs
    tracking: null                 # optional: mlflow | {backend: mlflow, uri: URI, required: false}

Details:

* **Validation** is in two steps: the document's shape (fields, types, choices, bounds) is the
  pydantic model :class:`catsdogs.experiment.schema.ExperimentFile` (strict,
  ``extra="forbid"``; ``catsdogs schema`` prints its JSON Schema), whose first error is reported
  with the file's line; then this module checks what needs the plugin registry or several
  fields (names, weights per backbone, image sizes, head params, combinations, duplicates,
  paths, the exclude list).
* **Combinations** are tuples of backbone names in the order the backbones are listed. ``all`` and
  ``{min, max}`` enumerate by subset size ascending, then in listed order
  (:func:`itertools.combinations`); the default is ``all``. An explicit list keeps its own order;
  an item may be a single name (a one-backbone combination). Every name must be a listed
  backbone; duplicates inside a combination and duplicate combinations are errors.
* **Names** of backbones, heads and optimizers are checked against the plugin registry
  (``catsdogs plugins`` lists them); per-backbone weights against the backbone's weights options,
  ``image_size`` against its minimum input size; head ``params`` against the head class's
  constructor parameters.
* **Numbers**: booleans are never accepted as numbers. YAML 1.1 reads ``1e-3`` (no dot) as a
  string; such scientific-notation strings are accepted wherever a float is expected.
* **Run settings**: ``engine``, ``ray_address`` and ``tracking`` never change a run's result, so
  finished runs are reused whichever engine or tracker computed them; ``postprocess``, ``refit``
  and ``ensemble`` act after the per-run training and do not invalidate finished runs either.
  ``precision`` and ``calibration_size`` (int8 only) select cached features.
* **Paths** in the file (``data``, ``output``, ``cache_dir``, an ``exclude`` file) are relative to
  the YAML file's folder; the ``data``/``output``/``cache_dir`` overrides of
  :func:`load_experiment` (the command line) win over the file and are relative to the current
  directory. All paths of a loaded experiment are absolute.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
import numbers
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from catsdogs.dataset.storage import DataURL, data_location, is_url
from catsdogs.errors import ConfigError, DataError, PluginError
from catsdogs.experiment.schema import (  # noqa: F401  (the bounds and choices: public here too)
    ENGINES,
    ENSEMBLE_METHODS,
    MAX_BATCH_SIZE,
    MAX_BUDGET,
    MAX_CALIBRATION_SIZE,
    MAX_ENSEMBLE,
    MAX_EPOCHS,
    MAX_FOLDS,
    MAX_IMAGE_SIZE,
    MAX_LEARNING_RATE,
    POSTPROCESSES,
    PRECISIONS,
    TRACKING_BACKENDS,
    ExperimentFile,
    TrackingSpec,
    TuningSpec,
    ValidationSpec,
    validate_document,
)
from catsdogs.experiment.schema import suggest as _suggest
from catsdogs.experiment.schema import type_name as _type_name

if TYPE_CHECKING:  # pragma: no cover
    from catsdogs.plugins import Registry

__all__ = [
    "BackboneSpec",
    "HeadSpec",
    "OptimizerSpec",
    "Validation",
    "Tuning",
    "Ensemble",
    "Tracking",
    "Experiment",
    "ExperimentError",
    "load_experiment",
    "parse_experiment",
    "TOP_LEVEL_FIELDS",
    "REQUIRED_FIELDS",
    "TUNABLE_PARAMS",
]

#: every field the top level of an experiment file may have (the schema's fields)
TOP_LEVEL_FIELDS: tuple[str, ...] = tuple(ExperimentFile.model_fields)
#: fields a file must have (``data`` may come from the override instead)
REQUIRED_FIELDS: tuple[str, ...] = ("data", "backbones", "heads", "optimizers")
#: hyper-parameters the tuner can search
TUNABLE_PARAMS: tuple[str, ...] = ("dropout", "learning_rate", "l2")

DEFAULT_WEIGHTS = "imagenet"
DEFAULT_PRECISION = "float32"
DEFAULT_RESIZE = "squash"
DEFAULT_CALIBRATION_SIZE = 300
#: YAML nodes a document may expand to (aliases included): a guard against alias bombs
MAX_YAML_NODES = 100_000


class ExperimentError(ConfigError):
    """An experiment file (or override) is invalid. ``str(exc)`` is the full message.

    Attributes: ``source`` (file name as given), ``line`` (1-based, or None), ``field`` (field path
    such as ``heads[1].params``, or None).
    """

    def __init__(self, message: str, *, source: str | None = None, line: int | None = None,
                 field: str | None = None):
        super().__init__(message)
        self.source = source
        self.line = line
        self.field = field


# -- the specification objects ----------------------------------------------------------------------
@dataclass(frozen=True)
class BackboneSpec:
    """One backbone configuration: which cached features to use (``image_size`` None = default)."""

    name: str
    weights: str = DEFAULT_WEIGHTS
    image_size: int | None = None
    precision: str = DEFAULT_PRECISION
    resize: str = DEFAULT_RESIZE
    calibration_size: int = DEFAULT_CALIBRATION_SIZE  # int8 only: calibration images

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "weights": self.weights, "image_size": self.image_size,
                "precision": self.precision, "resize": self.resize,
                "calibration_size": self.calibration_size}


@dataclass(frozen=True)
class HeadSpec:
    """A head plugin name and the hyper-parameters passed to its class."""

    name: str
    params: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "params": dict(self.params)}


@dataclass(frozen=True)
class OptimizerSpec:
    """An optimizer plugin name and its learning rate (None = the optimizer's default)."""

    name: str
    learning_rate: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "learning_rate": self.learning_rate}


@dataclass(frozen=True)
class Validation:
    """How runs are validated: ``holdout`` (fraction ``holdout``) or ``kfold`` (``folds`` folds)."""

    kind: str = "holdout"
    holdout: float = 0.2
    folds: int = 5

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "holdout": self.holdout, "folds": self.folds}


@dataclass(frozen=True)
class Tuning:
    """Hyper-parameter search: ``budget`` trials over ``params`` (names the heads can tune)."""

    budget: int
    params: tuple[str, ...] = TUNABLE_PARAMS

    def to_dict(self) -> dict[str, Any]:
        return {"budget": self.budget, "params": list(self.params)}


@dataclass(frozen=True)
class Ensemble:
    """Combine the ``top`` best runs: ``mean`` of their probabilities or a ``stack`` model."""

    top: int = 3
    method: str = "mean"

    def to_dict(self) -> dict[str, Any]:
        return {"top": self.top, "method": self.method}


@dataclass(frozen=True)
class Tracking:
    """Experiment tracking: ``backend`` (mlflow) at ``uri`` (None = the backend's default).

    ``required``: fail when the tracker cannot be reached (else warn and run untracked).
    """

    backend: str = "mlflow"
    uri: str | None = None
    required: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "uri": self.uri, "required": self.required}


@dataclass
class Experiment:
    """A validated experiment grid. Build it with :func:`load_experiment` or :func:`parse_experiment`."""

    name: str
    source: Path | None
    data: Path  # a DataURL (a str carrying its storage options) for data in object storage
    backbones: list[BackboneSpec]
    combinations: list[tuple[str, ...]]
    heads: list[HeadSpec]
    optimizers: list[OptimizerSpec]
    epochs: int = 8
    batch_size: int = 128
    seed: int = 2019
    validation: Validation = field(default_factory=Validation)
    clip: tuple[float, float] = (0.005, 0.995)
    target: float = 0.06127
    output: Path | None = None  # None: runs/<name>
    tuning: Tuning | None = None
    tta: bool = False
    exclude: list[str] = field(default_factory=list)
    cache_dir: Path | None = None
    #: the exclude list's file (when ``exclude:`` named one) and its SHA-256, for the run records
    exclude_file: Path | None = None
    exclude_sha256: str | None = None
    engine: str = "local"
    ray_address: str | None = None
    postprocess: str = "auto"
    refit: bool = False
    ensemble: Ensemble | None = None
    tracking: Tracking | None = None

    def __post_init__(self) -> None:
        self.source = None if self.source is None else Path(self.source)
        if not isinstance(self.data, DataURL):
            self.data = Path(self.data)
        self.output = Path("runs") / self.name if self.output is None else Path(self.output)
        self.cache_dir = None if self.cache_dir is None else Path(self.cache_dir)
        self.backbones = list(self.backbones)
        self.combinations = [tuple(c) for c in self.combinations]
        self.heads = list(self.heads)
        self.optimizers = list(self.optimizers)
        self.clip = (float(self.clip[0]), float(self.clip[1]))
        self.exclude = list(self.exclude)

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
        return {
            "name": self.name,
            "source": None if self.source is None else str(self.source),
            "data": str(self.data),
            "backbones": [b.to_dict() for b in self.backbones],
            "combinations": [list(c) for c in self.combinations],
            "heads": [h.to_dict() for h in self.heads],
            "optimizers": [o.to_dict() for o in self.optimizers],
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "validation": self.validation.to_dict(),
            "clip": list(self.clip),
            "target": self.target,
            "output": str(self.output),
            "tuning": None if self.tuning is None else self.tuning.to_dict(),
            "tta": self.tta,
            "exclude": self.exclude_summary(),
            "cache_dir": None if self.cache_dir is None else str(self.cache_dir),
            "engine": self.engine,
            "ray_address": self.ray_address,
            "postprocess": self.postprocess,
            "refit": self.refit,
            "ensemble": None if self.ensemble is None else self.ensemble.to_dict(),
            "tracking": None if self.tracking is None else self.tracking.to_dict(),
        }


# -- public entry points --------------------------------------------------------------------------
def load_experiment(path: str | os.PathLike, *, data: str | os.PathLike | None = None,
                    output: str | os.PathLike | None = None,
                    cache_dir: str | os.PathLike | None = None,
                    weights: str | None = None,
                    registry: Registry | None = None) -> Experiment:
    """Read and validate the experiment file ``path``.

    ``data``, ``output`` and ``cache_dir`` (the command line's overrides, relative to the current
    directory) win over the file's values; ``weights`` (e.g. ``"none"`` offline) replaces the
    weights of every backbone. ``registry`` defaults to :func:`catsdogs.get_registry`.
    """
    source = str(path)
    p = Path(os.path.expanduser(source))
    if not p.exists():
        raise ExperimentError(f"{source}: experiment file not found", source=source)
    if not p.is_file():
        raise ExperimentError(f"{source}: not a file (expected an experiment .yaml file)",
                              source=source)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ExperimentError(f"{source}: not a UTF-8 text file ({exc.reason})", source=source) from None
    except OSError as exc:
        raise ExperimentError(f"{source}: cannot read the file: {exc.strerror or exc}",
                              source=source) from None
    return _Parser(text, source, base_dir=_absolute(p).parent, stem=p.stem,
                   source_path=_absolute(p), registry=registry).parse(
        data=data, output=output, cache_dir=cache_dir, weights=weights)


def parse_experiment(text: str, source: str = "<string>", *, base_dir: Path | None = None,
                     data: str | os.PathLike | None = None,
                     output: str | os.PathLike | None = None,
                     cache_dir: str | os.PathLike | None = None,
                     registry: Registry | None = None) -> Experiment:
    """Validate experiment YAML ``text``; ``source`` names it in messages.

    Relative paths in the text are resolved against ``base_dir`` (default: the current directory).
    The default name is the stem of ``source`` (``experiment`` for ``<string>``-like sources).
    """
    pseudo = source.startswith("<")
    stem = "experiment" if pseudo else Path(source).stem
    base = _absolute(Path(base_dir)) if base_dir is not None else _absolute(Path.cwd())
    source_path = None if pseudo else _absolute(Path(source))
    return _Parser(text, source, base_dir=base, stem=stem, source_path=source_path,
                   registry=registry).parse(data=data, output=output, cache_dir=cache_dir)


# -- helpers ------------------------------------------------------------------------------------------
_SCI_FLOAT = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)[eE][-+]?\d+$")
_PARENT = re.compile(r"(\.[^.\[\]]+|\[\d+\])$")
_MISSING = object()


def _absolute(path: Path) -> Path:
    return Path(os.path.abspath(os.path.expanduser(str(path))))


def _as_float(value: Any) -> float | None:
    """``value`` as a finite float, or None. Accepts YAML-1.1 strings such as ``1e-3``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and _SCI_FLOAT.match(value.strip()):
        value = float(value)
    if isinstance(value, numbers.Real) and math.isfinite(value):
        return float(value)
    return None


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


def _expanded_size(node: yaml.Node, limit: int) -> int:
    """How many nodes ``node`` becomes once every alias is expanded (stops counting past ``limit``).

    Each distinct node is sized once (memoised by identity), so a billion-laughs document of a few
    hundred bytes is measured in microseconds instead of being expanded.
    """
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(n: yaml.Node) -> int:
        key = id(n)
        if key in sizes:
            return sizes[key]
        if key in active:  # a recursive alias: counted once
            return 1
        active.add(key)
        total = 1
        children: list[yaml.Node] = []
        if isinstance(n, yaml.MappingNode):
            children = [c for pair in n.value for c in pair]
        elif isinstance(n, yaml.SequenceNode):
            children = list(n.value)
        for child in children:
            total += size(child)
            if total > limit:
                break
        active.discard(key)
        sizes[key] = total
        return total

    return size(node)


def _index_lines(node: yaml.Node, path: str, lines: dict[str, int],
                 duplicates: list[tuple[str, int, int]], active: set[int]) -> None:
    """Record the 1-based line of every field path below ``node``; collect duplicate keys."""
    if id(node) in active:  # recursive alias
        return
    active.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = key_node.value
            child = f"{path}.{key}" if path else key
            line = key_node.start_mark.line + 1
            if key in seen:
                duplicates.append((child, line, seen[key]))
            else:
                seen[key] = line
                lines[child] = line
            _index_lines(value_node, child, lines, duplicates, active)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            child = f"{path}[{i}]"
            lines[child] = item.start_mark.line + 1
            _index_lines(item, child, lines, duplicates, active)
    active.discard(id(node))


class _Parser:
    """Validates one document; ``self.lines`` maps field paths to line numbers."""

    def __init__(self, text: str, source: str, *, base_dir: Path, stem: str,
                 source_path: Path | None, registry: Registry | None):
        self.text = text
        self.source = source
        self.base_dir = base_dir
        self.stem = stem
        self.source_path = source_path
        self._registry = registry
        self.lines: dict[str, int] = {}

    # -- errors ------------------------------------------------------------------------------------
    def line(self, path: str) -> int | None:
        """The line of ``path``, else of its nearest ancestor given in the file; None if none is."""
        while path:
            if path in self.lines:
                return self.lines[path]
            parent = _PARENT.sub("", path)
            if parent == path:
                return None
            path = parent
        return None

    def error(self, path: str, message: str, line: int | None = None) -> ExperimentError:
        if line is None and path:
            line = self.line(path)
        where = f"{self.source}:{line}" if line is not None else self.source
        what = f"{path}: {message}" if path else message
        return ExperimentError(f"{where}: {what}", source=self.source, line=line, field=path or None)

    # -- registry ---------------------------------------------------------------------------------
    @property
    def registry(self) -> Registry:
        if self._registry is None:
            from catsdogs.plugins import get_registry

            self._registry = get_registry()
        return self._registry

    def component(self, kind: str, name: str, path: str) -> Any:
        singular = kind[:-1]
        names = self.registry.names(kind)
        if name not in names:
            try:  # a name claimed by two plugins: the registry's own message says which
                self.registry.get(kind, name)
            except PluginError as exc:
                if name in self.registry.conflicts.get(kind, {}):
                    raise self.error(path, str(exc)) from None
            available = ", ".join(names) or "(none installed)"
            raise self.error(
                path,
                f"unknown {singular} {name!r}{_suggest(name, names)}; available: {available} "
                "(`catsdogs plugins` lists what is installed)",
            )
        return self.registry.get(kind, name)

    # -- checks the schema cannot make -----------------------------------------------------------
    def choice(self, value: str, path: str, choices: tuple[str, ...], what: str) -> str:
        if value not in choices:
            raise self.error(path, f"unknown {what} {value!r}{_suggest(value, choices)}; "
                                   f"choose one of: {', '.join(choices)}")
        return value

    def data_path(self, value: Any, path: str, base: Path, options: dict[str, Any] | None) -> Path:
        """``data``: a path, or an object-store URL kept as a :class:`DataURL` that carries the
        file's ``storage_options`` (which never appear in the experiment's text or records)."""
        if isinstance(value, str) and is_url(value.strip()):
            try:
                return data_location(value, options)  # type: ignore[return-value]
            except DataError as exc:
                raise self.error(path, str(exc)) from None
        return self.path(value, path, base)

    def path(self, value: Any, path: str, base: Path) -> Path:
        """An absolute path; ``value`` is a validated string (or an override: str / PathLike)."""
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str) or not value.strip():
            raise self.error(path, f"must be a path (string), got {_type_name(value)}")
        p = Path(os.path.expanduser(value.strip()))
        return _absolute(p if p.is_absolute() else base / p)

    # -- the document -----------------------------------------------------------------------------
    def compose(self) -> Any:
        loader = yaml.SafeLoader(self.text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            if _expanded_size(node, MAX_YAML_NODES) > MAX_YAML_NODES:
                raise ExperimentError(
                    f"{self.source}: the document expands to more than {MAX_YAML_NODES} YAML nodes "
                    "(nested anchors and aliases?); an experiment file is far smaller",
                    source=self.source)
            duplicates: list[tuple[str, int, int]] = []
            self.lines[""] = node.start_mark.line + 1
            _index_lines(node, "", self.lines, duplicates, set())
            if duplicates:
                field_path, line, first = duplicates[0]
                raise ExperimentError(
                    f"{self.source}:{line}: {field_path}: duplicate field (first given on line {first})",
                    source=self.source, line=line, field=field_path,
                )
            return loader.construct_document(node)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
            yaml_line = None if mark is None else mark.line + 1
            problem = getattr(exc, "problem", None) or str(exc)
            context = getattr(exc, "context", None)
            detail = f"{context}: {problem}" if context else problem
            where = f"{self.source}:{yaml_line}" if yaml_line is not None else self.source
            raise ExperimentError(f"{where}: invalid YAML: {detail}", source=self.source,
                                  line=yaml_line) from None
        finally:
            loader.dispose()

    def parse(self, *, data=None, output=None, cache_dir=None, weights=None) -> Experiment:
        doc = self.compose()
        if doc is None:
            raise self.error("", "the file is empty; an experiment needs at least: "
                                 + ", ".join(REQUIRED_FIELDS))
        if not isinstance(doc, dict):
            raise self.error("", f"the top level must be a mapping of fields "
                                 f"({', '.join(REQUIRED_FIELDS)}, ...), got {_type_name(doc)}",
                             line=self.lines.get(""))
        for key in doc:
            if not isinstance(key, str):
                raise self.error("", f"field names must be strings, got {key!r}",
                                 line=self.lines.get(str(key)))
        missing = [f for f in REQUIRED_FIELDS
                   if doc.get(f) is None and not (f == "data" and data is not None)
                   and not (f in doc and doc[f] is not None)]
        unknown = [k for k in doc if k not in TOP_LEVEL_FIELDS]
        if missing and not unknown:  # a misspelled field is the better message
            hint = " (or pass the data directory on the command line)" if "data" in missing else ""
            raise self.error("", f"missing required field{'s' if len(missing) > 1 else ''}: "
                                 f"{', '.join(missing)}{hint}")
        model, problem = validate_document(doc, self.line)
        if problem is not None:
            raise self.error(*problem)
        assert model is not None

        name = self.parse_name(model.name)
        cwd = _absolute(Path.cwd())
        data_path = (self.data_path(data, "data (override)", cwd, model.storage_options)
                     if data is not None else
                     self.data_path(model.data, "data", self.base_dir, model.storage_options))
        if output is not None:
            output_path = self.path(output, "output (override)", cwd)
        elif model.output is not None:
            output_path = self.path(model.output, "output", self.base_dir)
        else:
            output_path = _absolute(cwd / "runs" / name)
        if cache_dir is not None:
            cache_path = self.path(cache_dir, "cache_dir (override)", cwd)
        elif model.cache_dir is not None:
            cache_path = self.path(model.cache_dir, "cache_dir", self.base_dir)
        else:
            cache_path = None

        backbones = self.parse_backbones(doc)
        if weights is not None:  # the command line's --weights replaces every backbone's weights
            for spec in backbones:
                try:
                    self.registry.backbone(spec.name).check_weights(weights)
                except ConfigError as exc:
                    raise ExperimentError(f"--weights: {exc}", source=self.source) from None
            backbones = [dataclasses.replace(spec, weights=weights) for spec in backbones]
        names = [b.name for b in backbones]
        combinations = self.parse_combinations(doc.get("combinations"), names)
        heads = self.parse_heads(doc["heads"])
        optimizers = self.parse_optimizers(doc["optimizers"])
        lo, hi = model.clip
        if not 0 <= lo < hi <= 1:
            raise self.error("clip", "must be a list [lo, hi] of two numbers with "
                                     f"0 <= lo < hi <= 1, got {doc['clip']!r}")
        exclude, exclude_file, exclude_sha256 = self.parse_exclude(doc.get("exclude"))
        postprocess = model.postprocess or ("clip" if "clip" in doc else "auto")
        return Experiment(
            name=name, source=self.source_path, data=data_path, backbones=backbones,
            combinations=combinations, heads=heads, optimizers=optimizers, epochs=model.epochs,
            batch_size=model.batch_size, seed=model.seed,
            validation=self.parse_validation(model.validation), clip=(lo, hi),
            target=model.target, output=output_path, tuning=self.parse_tuning(model.tuning, heads),
            tta=model.tta, exclude=exclude, cache_dir=cache_path, exclude_file=exclude_file,
            exclude_sha256=exclude_sha256, engine=model.engine, ray_address=model.ray_address,
            postprocess=postprocess, refit=model.refit,
            ensemble=None if model.ensemble is None else
            Ensemble(top=model.ensemble.top, method=model.ensemble.method),
            tracking=self.parse_tracking(model.tracking),
        )

    # -- fields (their types and bounds are checked by the schema already) -----------------------
    def parse_name(self, value: str | int | None) -> str:
        if value is None:
            return self.stem
        name = str(value).strip()
        if "/" in name or "\\" in name or name in {".", ".."}:
            raise self.error("name", f"must be usable as a folder name (no '/' or '\\'), got {name!r}")
        return name

    def parse_backbones(self, doc: dict[str, Any]) -> list[BackboneSpec]:
        # top-level defaults: (value, path to blame)
        defaults: dict[str, tuple[Any, str]] = {
            "weights": (DEFAULT_WEIGHTS, "backbones"),
            "image_size": (None, "backbones"),
            "precision": (DEFAULT_PRECISION, "backbones"),
            "resize": (DEFAULT_RESIZE, "backbones"),
            "calibration_size": (DEFAULT_CALIBRATION_SIZE, "backbones"),
        }
        for key in defaults:
            if doc.get(key) is not None:
                defaults[key] = (doc[key], key)

        specs: list[BackboneSpec] = []
        first: dict[str, int] = {}
        for i, item in enumerate(doc["backbones"]):
            p = f"backbones[{i}]"
            if isinstance(item, dict):
                name, name_path = item["name"].strip(), f"{p}.name"
            else:
                name, name_path, item = item.strip(), p, {}
            backbone = self.component("backbones", name, name_path)
            if name in first:
                raise self.error(p, f"backbone {name!r} is listed twice (also backbones[{first[name]}]); "
                                    "list each backbone once")
            first[name] = i

            def option(key: str, item: dict[str, Any] = item, p: str = p) -> tuple[Any, str]:
                if item.get(key) is not None:
                    return item[key], f"{p}.{key}"
                return defaults[key]

            weights, wpath = option("weights")
            size, spath = option("image_size")
            try:
                backbone.check_weights(weights.strip())
            except ConfigError as exc:
                raise self.error(wpath, str(exc)) from None
            if size is not None:
                try:
                    backbone.check_image_size(size)
                except ConfigError as exc:
                    raise self.error(spath, str(exc)) from None
            specs.append(BackboneSpec(name=name, weights=weights.strip(), image_size=size,
                                      precision=option("precision")[0],
                                      resize=option("resize")[0],
                                      calibration_size=option("calibration_size")[0]))
        return specs

    def parse_combinations(self, raw: Any, names: list[str]) -> list[tuple[str, ...]]:
        n = len(names)
        if raw is None or raw == "all":
            lo, hi = 1, n
        elif isinstance(raw, dict):
            lo = 1 if raw.get("min") is None else raw["min"]
            hi = n if raw.get("max") is None else raw["max"]
            if not 1 <= lo <= hi <= n:
                where = ".min" if lo < 1 else ".max" if hi > n else ""
                raise self.error(f"combinations{where}",
                                 f"subset sizes must satisfy 1 <= min <= max <= {n} (the number of "
                                 f"backbones), got min={lo}, max={hi}")
        else:
            result: list[tuple[str, ...]] = []
            seen: dict[tuple[str, ...], int] = {}
            order = {name: k for k, name in enumerate(names)}
            if not raw:
                raise self.error("combinations", "must not be empty; use 'all', {min: K, max: M} "
                                                 "(subset sizes) or a list of lists of backbone names")
            for i, combo in enumerate(raw):
                p = f"combinations[{i}]"
                members = [combo] if isinstance(combo, str) else combo
                if not members:
                    raise self.error(p, "must be a non-empty list of backbone names, got a list")
                for j, member in enumerate(members):
                    mpath = p if isinstance(combo, str) else f"{p}[{j}]"
                    if member not in order:
                        hint = _suggest(member, names)
                        if member in self.registry.names("backbones"):
                            hint += " (add it to backbones to use it in a combination)"
                        raise self.error(mpath, f"{member!r} is not one of the listed backbones: "
                                                f"{', '.join(names)}{hint}")
                if len(set(members)) != len(members):
                    dup = next(m for m in members if members.count(m) > 1)
                    raise self.error(p, f"backbone {dup!r} appears twice in one combination")
                key = tuple(sorted(members, key=order.__getitem__))
                if key in seen:
                    raise self.error(p, f"duplicate combination {list(key)} "
                                        f"(same as combinations[{seen[key]}])")
                seen[key] = i
                result.append(key)
            return result
        return [c for size in range(lo, hi + 1) for c in itertools.combinations(names, size)]

    def parse_heads(self, raw: list[Any]) -> list[HeadSpec]:
        specs: list[HeadSpec] = []
        for i, item in enumerate(raw):
            p = f"heads[{i}]"
            if isinstance(item, dict):
                name = item["name"].strip()
                head_cls = self.component("heads", name, f"{p}.name")
                params = self.parse_head_params(item.get("params"), f"{p}.params", name, head_cls)
            else:
                name = item.strip()
                head_cls = self.component("heads", name, p)
                params = {}
            spec = HeadSpec(name=name, params=params)
            if spec in specs:
                raise self.error(p, f"duplicate head {name!r} with the same params "
                                    f"(same as heads[{specs.index(spec)}])")
            specs.append(spec)
        return specs

    def parse_head_params(self, raw: Any, path: str, name: str,
                          head_cls: Any) -> dict[str, Any]:
        if raw is None:
            return {}
        valid = tuple(head_cls.param_names())
        if not isinstance(raw, dict):  # kept by hand: the message names the head's parameters
            raise self.error(path, f"must be a mapping of hyper-parameters "
                                   f"({', '.join(valid) or 'none'}), got {_type_name(raw)}")
        params: dict[str, Any] = {}
        for key, value in raw.items():
            if key not in valid:
                raise self.error(f"{path}.{key}", f"head {name!r} has no parameter {key!r}"
                                                  f"{_suggest(key, valid)}; "
                                                  f"valid: {', '.join(valid) or '(none)'}")
            if isinstance(value, str) and _SCI_FLOAT.match(value.strip()):
                value = float(value)
            if not _json_compatible(value):
                raise self.error(f"{path}.{key}", "must be a number, string, boolean, null, list "
                                                  f"or mapping, got {value!r}")
            params[key] = value
        try:
            head_cls(**params).validate_params()
        except (ConfigError, TypeError, ValueError) as exc:
            raise self.error(path, f"invalid params for head {name!r}: {exc}") from None
        return params

    def parse_optimizers(self, raw: list[Any]) -> list[OptimizerSpec]:
        specs: list[OptimizerSpec] = []
        for i, item in enumerate(raw):
            p = f"optimizers[{i}]"
            lr: float | None = None
            if isinstance(item, dict):
                name = item["name"].strip()
                self.component("optimizers", name, f"{p}.name")
                if item.get("learning_rate") is not None:
                    lr = _as_float(item["learning_rate"])
            else:
                name = item.strip()
                self.component("optimizers", name, p)
            spec = OptimizerSpec(name=name, learning_rate=lr)
            if spec in specs:
                raise self.error(p, f"duplicate optimizer {name!r} with the same learning rate "
                                    f"(same as optimizers[{specs.index(spec)}])")
            specs.append(spec)
        return specs

    def parse_validation(self, raw: str | ValidationSpec | None) -> Validation:
        if raw is None:
            return Validation()
        if isinstance(raw, str):
            return Validation(kind=raw)
        given = raw.model_fields_set
        if len(given) != 1:
            raise self.error("validation", "give exactly one of holdout, kfold ({holdout: FRACTION} "
                                           f"or {{kfold: FOLDS}}), got {len(given)} fields")
        if raw.holdout is not None:
            return Validation(kind="holdout", holdout=raw.holdout)
        if raw.kfold is None:
            raise self.error("validation", "must be {holdout: FRACTION} or {kfold: FOLDS}, got null")
        return Validation(kind="kfold", folds=raw.kfold)

    def parse_tuning(self, raw: int | TuningSpec | None, heads: list[HeadSpec]) -> Tuning | None:
        if raw is None:
            return None
        if isinstance(raw, int):
            return Tuning(budget=raw)
        if raw.params is None:
            return Tuning(budget=raw.budget)
        params = [raw.params] if isinstance(raw.params, str) else raw.params
        # the common names, then what the listed heads declare (Head.search_space)
        tunable = dict.fromkeys(TUNABLE_PARAMS)
        for head in heads:
            tunable.update(dict.fromkeys(self.registry.head(head.name).tuning_space().entries))
        choices = tuple(tunable)
        if not params:
            raise self.error("tuning.params", f"must be a non-empty list of: {', '.join(choices)}; "
                                              "got a list")
        for j, param in enumerate(params):
            p = f"tuning.params[{j}]"
            self.choice(param, p, choices, "tunable parameter")
            if param in params[:j]:
                raise self.error(p, f"{param!r} is listed twice")
        return Tuning(budget=raw.budget, params=tuple(params))

    def parse_tracking(self, raw: str | TrackingSpec | None) -> Tracking | None:
        if raw is None:
            return None
        if isinstance(raw, str):
            return Tracking(backend=raw)
        return Tracking(backend=raw.backend, uri=raw.uri, required=raw.required)

    def parse_exclude(self, raw: Any) -> tuple[list[str], Path | None, str | None]:
        """The entries, and for an exclude file its path and SHA-256."""
        if raw is None:
            return [], None, None
        entries: list[tuple[str, str]] = []  # (relative path, where it came from)
        list_path: Path | None = None
        digest: str | None = None
        if isinstance(raw, str):
            list_path = self.path(raw, "exclude", self.base_dir)
            if not list_path.is_file():
                raise self.error("exclude", f"exclude list {str(list_path)!r} not found (a text file "
                                            "with one relative image path per line, or give a "
                                            "list of paths)")
            try:
                content = list_path.read_bytes()
                digest = hashlib.sha256(content).hexdigest()
                text = content.decode("utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise self.error("exclude", f"cannot read exclude list {str(list_path)!r}: {exc}") from None
            for k, line in enumerate(text.splitlines(), 1):
                line = line.strip()
                if line and not line.startswith("#"):
                    entries.append((line, f"{list_path}:{k}"))
        elif isinstance(raw, list):
            for j, item in enumerate(raw):
                if not isinstance(item, str) or not item.strip():
                    raise self.error(f"exclude[{j}]", "must be a relative file path (string), "
                                                      f"got {_type_name(item)}")
                entries.append((item.strip(), f"exclude[{j}]"))
        else:
            raise self.error("exclude", "must be a list of relative file paths or the path of a text "
                                        f"file listing them, got {_type_name(raw)}")
        result: list[str] = []
        for entry, where in entries:
            rel = entry.replace("\\", "/")
            while rel.startswith("./"):
                rel = rel[2:]
            if rel.startswith("/") or re.match(r"^[A-Za-z]:/", rel):
                message = (f"{entry!r} must be relative to the data directory "
                           "(e.g. train/cat.12.jpg)")
                if where.startswith("exclude["):
                    raise self.error(where, message)
                raise self.error("exclude", f"{where}: {message}")
            if rel not in result:
                result.append(rel)
        return result, list_path, digest
