"""catsdogs: plugin-based ensemble experimentation for transfer learning on images.

The Python API the CLI is built on::

    import catsdogs
    results = catsdogs.extract("data/", backbones=["resnet50"], weights="none")
    feats = catsdogs.load_features(results[0].path)
    result = catsdogs.run_experiment(catsdogs.load_experiment("experiments/demo.yaml"))
    result.leaderboard()          # a pandas DataFrame, best first

Heavy dependencies (TensorFlow) are imported only when a function needs them.
"""

from __future__ import annotations

from catsdogs._version import __version__  # noqa: E402
from catsdogs.errors import CatsdogsError, ConfigError, DataError, PluginError  # noqa: E402
from catsdogs.hookspecs import hookimpl  # noqa: E402  (plugins: ``@catsdogs.hookimpl``)
from catsdogs.plugins import get_registry  # noqa: E402


def __getattr__(name: str):
    # lazy re-exports, so `import catsdogs` stays light
    if name in {"extract", "load_features", "FeatureSet", "ExtractResult"}:
        from catsdogs.features import extraction as features

        return getattr(features, name)
    if name in {"open_dataset", "Dataset", "ImageRecord"}:
        from catsdogs.dataset import layout as data

        return getattr(data, name)
    if name in {"load_experiment", "parse_experiment", "Experiment"}:
        from catsdogs.experiment import spec as experiment

        return getattr(experiment, name)
    if name in {"run_experiment", "plan_runs", "load_record", "write_run_submission"}:
        from catsdogs.runs import runner

        return getattr(runner, name)
    if name in {"score_submission", "write_submission"}:
        from catsdogs.runs import submission

        return getattr(submission, name)
    if name == "export_run":
        from catsdogs.app.export import export_run

        return export_run
    raise AttributeError(f"module 'catsdogs' has no attribute {name!r}")


__all__ = [
    "CatsdogsError",
    "ConfigError",
    "DataError",
    "PluginError",
    "hookimpl",
    "get_registry",
    "extract",
    "load_features",
    "FeatureSet",
    "ExtractResult",
    "open_dataset",
    "Dataset",
    "ImageRecord",
    "load_experiment",
    "parse_experiment",
    "Experiment",
    "run_experiment",
    "plan_runs",
    "load_record",
    "write_run_submission",
    "score_submission",
    "write_submission",
    "export_run",
    "__version__",
]
