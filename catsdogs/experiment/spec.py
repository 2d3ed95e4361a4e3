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
    predict_precision: null        # default for all backbones: the features every held-out and
                                   # test row is predicted from (null: precision's; the heads are
                                   # trained on precision's), e.g. int8 to train, float32 to predict
    calibration_size: 64           # default for all backbones: int8 calibration images (1..100000)
    runtime: tensorflow            # default for all backbones: what computes float32 features
                                   # (tensorflow | openvino: the same network, faster on CPU;
                                   # catsdogs[int8]); int8 always runs on OpenVINO
    maps_runtime: tensorflow       # default for all backbones: what computes the maps a finetune
                                   # head trains on (tensorflow | openvino, as runtime)
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
    ray_address: null              # Ray cluster for engine: ray (null: a private instance; auto: the running one)
    refit: false                   # refit the winner on all training images for the submission
    ensemble: null                 # optional: {top: 3, method: mean | stack, submit: best | always}
                                   # over the best runs; always: submit the ensemble whatever its rank
    tracking: null                 # optional: mlflow | {backend: mlflow, uri: URI, required: false}

Details:

* **Validation** is one pydantic model, :class:`Experiment` (strict, ``extra="forbid"``;
  ``catsdogs schema`` prints its JSON Schema; defined in :mod:`catsdogs.experiment.schema`).
  Its validators also check what needs the plugin registry, which they get from the validation
  context (names, weights per backbone, image sizes, head params, tunable params), and what
  needs several fields (combinations, duplicates, paths, the exclude list). This module reads
  the YAML, keeps every field's line and reports the error that comes first in the file.
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
  ``precision``, ``calibration_size`` (int8 only) and ``runtime`` (float32 only) select cached
  features, ``maps_runtime`` a ``finetune`` head's cached maps; a ``predict_precision`` other than ``precision`` selects a second set to predict from.
* **Paths** in the file (``data``, ``output``, ``cache_dir``, an ``exclude`` file) are relative to
  the YAML file's folder; the ``data``/``output``/``cache_dir`` overrides of
  :func:`load_experiment` (the command line) win over the file and are relative to the current
  directory. All paths of a loaded experiment are absolute.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from catsdogs.errors import ConfigError
from catsdogs.experiment.schema import (  # noqa: F401  (the model, bounds and choices: public here)
    DEFAULT_CALIBRATION_SIZE,
    DEFAULT_PRECISION,
    DEFAULT_RESIZE,
    DEFAULT_WEIGHTS,
    ENGINES,
    ENSEMBLE_METHODS,
    ENSEMBLE_SUBMIT,
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
    TOP_LEVEL_FIELDS,
    TRACKING_BACKENDS,
    TUNABLE_PARAMS,
    BackboneSpec,
    Ensemble,
    Experiment,
    HeadSpec,
    OptimizerSpec,
    Tracking,
    Tuning,
    Validation,
    type_name,
    validate_document,
)

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

#: fields a file must have (``data`` may come from the override instead)
REQUIRED_FIELDS: tuple[str, ...] = ("data", "backbones", "heads", "optimizers")
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
_PARENT = re.compile(r"(\.[^.\[\]]+|\[\d+\])$")


def _absolute(path: Path) -> Path:
    return Path(os.path.abspath(os.path.expanduser(str(path))))


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
                                 f"({', '.join(REQUIRED_FIELDS)}, ...), got {type_name(doc)}",
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
        context = {"registry": self._registry, "base_dir": self.base_dir, "stem": self.stem,
                   "source_path": self.source_path, "cwd": _absolute(Path.cwd()),
                   "data": data, "output": output, "cache_dir": cache_dir}
        experiment, problem = validate_document(doc, context, self.line)
        if problem is not None:
            raise self.error(*problem)
        assert experiment is not None
        if weights is not None:  # the command line's --weights replaces every backbone's weights
            from catsdogs.plugins import get_registry

            registry = self._registry or get_registry()
            for spec in experiment.backbones:
                try:
                    registry.backbone(spec.name).check_weights(weights)
                except ConfigError as exc:
                    raise ExperimentError(f"--weights: {exc}", source=self.source) from None
            experiment.backbones = [spec.model_copy(update={"weights": weights})
                                    for spec in experiment.backbones]
        return experiment
