"""Run records: the typed, versioned ``record.json`` of a finished run.

:class:`RunRecord` is what the runner writes into ``<out>/runs/<run id>/record.json`` and what
every reader (export, predict, CAM, neither, submission, tracking) loads back. The JSON keys are
the dataclass field names (plus ``under_target`` and ``ranking_logloss``, derived; see
:attr:`RunRecord.ranking_logloss`, the one number a run is ranked and reported by), so
record directories written before this module existed still load.

* **Adding a field** is one line: an optional field with a default (``postprocess: dict | None =
  None``); older records load with the default, and an optional field left at None is not
  written, so older readers see the record they know. Keys this version does not know (written by a
  plugin or a newer minor version) are kept in ``extra`` and written back unchanged.
* **Versions**: ``record_version`` is checked on load; a record from a newer catsdogs (a higher
  version) is refused with a clear :class:`~catsdogs.errors.DataError`, as is a ``record.json``
  that is not a JSON object or lacks required fields.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from catsdogs.errors import DataError
from catsdogs.util.fileio import read_json, write_json
from catsdogs.validation import is_int

RECORD_VERSION = 1
RECORD = "record.json"


def fold_head_file(fold: int) -> str:
    """The file a run's head of fold ``fold`` is saved to in its run directory: ``head.keras``
    (fold 0, the only one of a holdout run), ``head-fold1.keras``, ... (a k-fold run's others)."""
    return "head.keras" if fold == 0 else f"head-fold{fold}.keras"

#: keys written for readers (spreadsheets, older tools) but recomputed on load
_DERIVED = ("under_target", "ranking_logloss")


class _Part:
    """JSON (de)serialisation shared by the record and its parts: fields by name, nested parts
    built from their type hints, unknown keys kept in ``extra``."""

    extra: dict[str, Any]

    @classmethod
    def from_dict(cls, data: Any, where: str):
        if not isinstance(data, dict):
            raise DataError(f"{where}: expected a JSON object, found {_json_type(data)}")
        hints = typing.get_type_hints(cls)
        fields = dataclasses.fields(typing.cast(Any, cls))
        names = [f.name for f in fields if f.name != "extra"]
        missing = [f.name for f in fields if f.name in names and f.name not in data
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise DataError(f"{where}: missing {', '.join(missing)}; not a record written by "
                            "`catsdogs run` (rerun the experiment to rewrite it)")
        kwargs = {name: _convert(hints[name], data[name], f"{where}.{name}")
                  for name in names if name in data}
        extra = {k: v for k, v in data.items() if k not in names and k not in _DERIVED}
        return typing.cast(Any, cls)(**kwargs, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if f.name == "extra" or not f.metadata.get("persist", True):
                continue
            value = getattr(self, f.name)
            if value is None and f.default is None:  # an optional field that was not set
                continue
            out[f.name] = value.to_dict() if isinstance(value, _Part) else value
        return {**out, **self.extra}


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


#: JSON types accepted for a field's (outer) Python type; a float field takes integers too
_JSON_TYPES: dict[type, tuple[type, ...]] = {str: (str,), int: (int,), float: (int, float),
                                             bool: (bool,), list: (list,), dict: (dict,)}
_TYPE_WORDS = {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
               list: "an array", dict: "an object"}


def _convert(hint: Any, value: Any, where: str) -> Any:
    """Build a nested part when ``hint`` (possibly ``Part | None``) names one; check that a scalar,
    list or object field holds that JSON type (:class:`DataError` naming the field if not)."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for option in options:
        if isinstance(option, type) and issubclass(option, _Part):
            return None if value is None and type(None) in options else option.from_dict(value, where)
    if value is None and type(None) in options:
        return value
    outer = [typing.get_origin(o) or o for o in options if o is not type(None)]
    allowed = [t for o in outer for t in _JSON_TYPES.get(o, ())]
    if len(allowed) and not (isinstance(value, tuple(allowed)) and not (
            isinstance(value, bool) and bool not in outer)):
        wanted = " or ".join(_TYPE_WORDS[o] for o in outer if o in _TYPE_WORDS)
        raise DataError(f"{where}: expected {wanted}, found {_json_type(value)}; not a record "
                        "written by `catsdogs run` (rerun the experiment to rewrite it)")
    return value


@dataclass
class HeadRef(_Part):
    name: str
    params: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class OptimizerRef(_Part):
    name: str
    learning_rate: float | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class ValidationRef(_Part):
    kind: str
    holdout: float | None = None
    folds: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class Metrics(_Part):
    """Validation metrics of a run's raw predictions (:func:`catsdogs.runs.metrics.summarize`).

    None of these is the number the run is ranked by (that is :attr:`RunRecord.ranking_logloss`).
    ``best_clip_*`` are IN-SAMPLE: the clip that minimises the log loss of these very rows, scored
    on them; kept for reference, never reported beside the honest numbers.
    """

    logloss: float
    logloss_clipped: float
    accuracy: float
    best_clip_lo: float
    best_clip_hi: float
    best_clip_logloss: float
    n: int
    extra: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class TestMetrics(_Part):
    """The submitted (clipped) test predictions scored against ``test_labels.csv``."""

    logloss: float
    accuracy: float
    n: int
    extra: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class RunRecord(_Part):
    """One finished run (see the module docstring)."""

    run_id: str
    combination: list[str]
    head: HeadRef
    optimizer: OptimizerRef | None
    params: dict[str, Any]
    settings: dict[str, Any]
    settings_hash: str
    metrics: Metrics
    clip: list[float]
    target: float
    n_train: int
    n_val: int
    n_test: int
    validation: ValidationRef
    learning_rate: float | None
    tuning: dict[str, Any] | None
    tta: bool = False
    history: list[dict[str, list[float]]] = field(default_factory=list)
    seconds: float = 0.0
    created: str = ""
    catsdogs_version: str = ""
    record_version: int = RECORD_VERSION
    #: feature keys of every backbone the runner aligned rows on (not just this combination's)
    aligned_on: dict[str, dict[str, str]] | None = None
    #: feature keys of the predicting features of every backbone predicted from other features
    #: than it is trained on (``predict_precision``), aligned on with ``aligned_on``
    predicted_on: dict[str, dict[str, str]] | None = None
    #: where it was computed when not in this process: {"name": "ray", "node_id": ...}
    engine: dict[str, Any] | None = None
    #: the chosen post-processing (:meth:`catsdogs.runs.postprocess.Choice.to_dict`)
    postprocess: dict[str, Any] | None = None
    #: head parameters a refit on all rows must override to reproduce the ranked fit (the head's
    #: ``refit_params()``, e.g. the stacker's early-stopped tree count); None: refit with ``params``
    refit_params: dict[str, Any] | None = None
    #: an ensemble of runs (:meth:`catsdogs.runs.ensemble.EnsembleFit.to_dict`); None: a single run
    ensemble: dict[str, Any] | None = None
    #: keys this version does not know, kept and written back
    extra: dict[str, Any] = field(default_factory=dict, repr=False)
    #: computed per call against the data's test labels; not stored in record.json
    test_metrics: TestMetrics | None = field(default=None, metadata={"persist": False})

    @property
    def ranking_logloss(self) -> float:
        """THE number of this run: the validation log loss it is ranked by, everywhere (leaderboard,
        ✓, summary, plots, MLflow, export manifest, ``/model``).

        It is the cross-fitted log loss of the run's post-processed validation predictions
        (``postprocess["logloss_post"]``: every validation row scored by a transform fitted on
        other rows); for a record written before post-processing existed, its fixed-clip loss.
        The raw (``metrics.logloss``) and fixed-clip (``metrics.logloss_clipped``) losses stay in
        ``record.json`` for reference only.
        """
        chosen = self.postprocess
        if chosen and chosen.get("logloss_post") is not None:
            return float(chosen["logloss_post"])
        return float(self.metrics.logloss_clipped)

    @property
    def rank_key(self) -> tuple[float, float, str]:
        """The order runs are ranked in: :attr:`ranking_logloss`, then the raw loss, then the id."""
        return self.ranking_logloss, float(self.metrics.logloss), self.run_id

    @property
    def under_target(self) -> bool:
        """Whether :attr:`ranking_logloss` beats ``target`` (the current target: readers set
        :attr:`target` to their experiment's before reporting)."""
        return self.ranking_logloss < self.target

    @property
    def feature_keys(self) -> dict[str, dict[str, str]]:
        """Backbone -> ``{"config_key", "dataset_fingerprint"}`` of the cached features this run's
        heads were trained on."""
        return self.settings.get("features", {})

    @property
    def predicting_keys(self) -> dict[str, dict[str, str]]:
        """Backbone -> the key of the cached features this run's held-out and test rows were
        predicted from (what its submission, predict, serve and export compute): the trained-on
        ones (:attr:`feature_keys`) unless the backbone has ``predict_precision``."""
        return {**self.feature_keys, **self.settings.get("predicting", {})}

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "ranking_logloss": self.ranking_logloss,
                "under_target": self.under_target}

    @classmethod
    def from_dict(cls, data: Any, where: str = RECORD) -> RunRecord:
        if isinstance(data, dict):
            version = data.get("record_version")
            if not is_int(version):
                raise DataError(f"{where}: record_version is missing or not an integer "
                                f"({version!r}); not a record written by `catsdogs run`")
            if typing.cast(int, version) > RECORD_VERSION:
                raise DataError(f"{where}: record version {version} was written by a newer catsdogs "
                                f"(this one reads versions up to {RECORD_VERSION}); upgrade catsdogs "
                                "to read it")
        return super().from_dict(data, where)

    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> RunRecord:
        """The record of the finished run in ``run_dir`` (``<out>/runs/<run id>``)."""
        path = Path(run_dir) / RECORD
        data = read_json(path, what="run record",
                         missing=f"{run_dir} is not a finished run directory (no {RECORD}); "
                                 "pass a directory under <out>/runs/ written by `catsdogs run`")
        return cls.from_dict(data, str(path))

    def save(self, run_dir: str | os.PathLike) -> Path:
        """Write ``record.json`` into ``run_dir`` atomically."""
        path = Path(run_dir) / RECORD
        write_json(path, self.to_dict())
        return path


def load_record(run_dir: str | os.PathLike) -> RunRecord:
    """The record of a finished run (``<out>/runs/<run id>``); see :meth:`RunRecord.load`."""
    return RunRecord.load(run_dir)
