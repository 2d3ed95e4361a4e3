"""The experiment file format: parsing, defaults, overrides and located error messages."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest

from catsdogs.errors import ConfigError
from catsdogs.experiment.spec import (
    BackboneSpec,
    Ensemble,
    Experiment,
    ExperimentError,
    HeadSpec,
    OptimizerSpec,
    Tracking,
    Tuning,
    Validation,
    load_experiment,
    parse_experiment,
)
from catsdogs.plugins import Registry, get_registry

REPO = Path(__file__).resolve().parents[1]
SEED = REPO / "experiments" / "seed.yaml"

BASE = """\
data: data
backbones: [resnet50, xception]
heads: [dropout_sigmoid]
optimizers: [adam]
"""

MARK = "#!"  # marks the line an error must point at


def write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def marked_line(text: str) -> int:
    lines = [i for i, line in enumerate(textwrap.dedent(text).splitlines(), 1) if MARK in line]
    assert len(lines) == 1, "mark exactly one line"
    return lines[0]


def load_error(tmp_path: Path, text: str, **kwargs) -> ExperimentError:
    path = write(tmp_path, text)
    with pytest.raises(ExperimentError) as info:
        load_experiment(path, **kwargs)
    return info.value


# -- the seed experiment ------------------------------------------------------------------------
def test_seed_yaml_reproduces_the_write_up_grid(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exp = load_experiment(SEED)
    names = ["resnet50", "inception_v3", "xception", "inception_resnet_v2"]
    assert exp.name == "seed"
    assert exp.source == SEED
    assert exp.backbone_names == names
    assert all(b == BackboneSpec(name=n, weights="imagenet", image_size=None, precision="float32",
                                   resize="squash")
               for b, n in zip(exp.backbones, names))
    assert len(exp.combinations) == 15
    assert [len(c) for c in exp.combinations] == [1] * 4 + [2] * 6 + [3] * 4 + [4]
    assert exp.combinations[:5] == [("resnet50",), ("inception_v3",), ("xception",),
                                    ("inception_resnet_v2",), ("resnet50", "inception_v3")]
    assert exp.combinations[-1] == tuple(names)
    assert exp.heads == [HeadSpec(name="dropout_sigmoid", params={})]
    assert exp.optimizers == [OptimizerSpec(name="adam", learning_rate=None),
                              OptimizerSpec(name="adadelta", learning_rate=1.0),
                              OptimizerSpec(name="radam", learning_rate=None),
                              OptimizerSpec(name="sgd", learning_rate=None)]
    assert len(exp.combinations) * len(exp.heads) * len(exp.optimizers) == 60
    assert (exp.epochs, exp.batch_size, exp.seed) == (8, 128, 2019)
    assert exp.validation == Validation(holdout=0.2)
    assert exp.validation.to_dict() == {"kind": "holdout", "holdout": 0.2, "folds": 5}
    assert exp.clip == (0.005, 0.995)
    assert exp.target == 0.06127
    assert exp.data == Path(os.path.abspath(REPO.parent / "shared" / "data" / "dogs-vs-cats-mini"))
    assert exp.output == Path(os.path.abspath(tmp_path / "runs" / "seed"))
    assert exp.tuning is None and exp.tta is False and exp.exclude == [] and exp.cache_dir is None
    json.dumps(exp.to_dict())


def test_seed_yaml_documents_the_format():
    text = SEED.read_text()
    for key in ("combinations:", "tuning:", "exclude:", "validation:", "weights: none",
                "learning_rate: 1.0"):
        assert key in text


# -- values, defaults and overrides -------------------------------------------------------------
def test_minimal_file_gets_the_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exp = load_experiment(write(tmp_path, BASE, "grid.yaml"))
    assert exp.name == "grid"
    assert exp.combinations == [("resnet50",), ("xception",), ("resnet50", "xception")]
    assert (exp.epochs, exp.batch_size, exp.seed, exp.target) == (8, 128, 2019, 0.06127)
    assert exp.validation == Validation() and exp.clip == (0.005, 0.995)
    assert exp.output == Path(os.path.abspath(tmp_path / "runs" / "grid"))


def test_full_file(tmp_path):
    (tmp_path / "audit").mkdir()
    exp = load_experiment(write(tmp_path, """\
        name: full
        data: /abs/data
        weights: none
        precision: bfloat16
        resize: crop
        backbones:
          - resnet50
          - {name: inception_v3, image_size: 299, weights: imagenet, precision: float32, resize: pad}
        combinations: all
        heads: [dropout_sigmoid, {name: softmax_cam, params: {dropout: 0.3, l2: 1e-3}}]
        optimizers: [adam, {name: adam, learning_rate: 1e-4}, {name: adadelta, learning_rate: 1.0}]
        epochs: 3
        batch_size: 16
        seed: 0
        validation: {kfold: 4}
        clip: [0, 1]
        target: 0.5
        output: out/full
        tuning: {budget: 10, params: [dropout, learning_rate]}
        tta: true
        cache_dir: cache
        """))
    assert exp.name == "full"
    assert exp.data == Path("/abs/data")
    assert exp.backbones == [
        BackboneSpec(name="resnet50", weights="none", image_size=None, precision="bfloat16",
                     resize="crop"),
        BackboneSpec(name="inception_v3", weights="imagenet", image_size=299, precision="float32",
                     resize="pad"),
    ]
    assert exp.heads[1] == HeadSpec(name="softmax_cam", params={"dropout": 0.3, "l2": 0.001})
    assert exp.optimizers[1] == OptimizerSpec(name="adam", learning_rate=1e-4)  # YAML 1.1 reads 1e-4 as a string
    assert (exp.epochs, exp.batch_size, exp.seed) == (3, 16, 0)
    assert exp.validation.kind == "kfold" and exp.validation.folds == 4
    assert exp.clip == (0.0, 1.0) and exp.target == 0.5
    assert exp.output == tmp_path / "out" / "full"
    assert exp.cache_dir == tmp_path / "cache"
    assert exp.tuning == Tuning(budget=10, params=("dropout", "learning_rate"))
    assert exp.tta is True
    d = json.loads(json.dumps(exp.to_dict()))
    assert d["output"] == str(tmp_path / "out" / "full") and d["cache_dir"] == str(tmp_path / "cache")
    assert d["combinations"] == [["resnet50"], ["inception_v3"], ["resnet50", "inception_v3"]]
    assert d["tuning"] == {"budget": 10, "params": ["dropout", "learning_rate"]}
    assert d["validation"] == {"kind": "kfold", "holdout": 0.2, "folds": 4}
    assert d["heads"][1] == {"name": "softmax_cam", "params": {"dropout": 0.3, "l2": 0.001}}


def test_run_settings_fields_default(tmp_path):
    exp = load_experiment(write(tmp_path, BASE))
    assert (exp.engine, exp.ray_address, exp.postprocess, exp.refit) == ("local", None, "auto", False)
    assert exp.ensemble is None and exp.tracking is None
    assert [b.calibration_size for b in exp.backbones] == [64, 64]


def test_run_settings_fields(tmp_path):
    exp = load_experiment(write(tmp_path, BASE.replace("[resnet50, xception]", """
          - {name: resnet50, precision: int8, calibration_size: 64}
          - xception""") + """\
precision: int8
calibration_size: 500
engine: ray
ray_address: 127.0.0.1:6379
postprocess: temperature
refit: true
ensemble: {top: 3, method: stack}
tracking: {backend: mlflow, uri: http://127.0.0.1:5000, required: true}
"""))
    assert [(b.precision, b.calibration_size) for b in exp.backbones] == [("int8", 64), ("int8", 500)]
    assert (exp.engine, exp.ray_address) == ("ray", "127.0.0.1:6379")
    assert (exp.postprocess, exp.refit) == ("temperature", True)
    assert exp.ensemble == Ensemble(top=3, method="stack")
    assert exp.tracking == Tracking(backend="mlflow", uri="http://127.0.0.1:5000", required=True)
    d = json.loads(json.dumps(exp.to_dict()))
    assert d["ensemble"] == {"top": 3, "method": "stack", "submit": "best"}
    assert d["tracking"] == {"backend": "mlflow", "uri": "http://127.0.0.1:5000", "required": True}
    assert load_experiment(write(tmp_path, BASE + "tracking: mlflow\n")).tracking == Tracking()


@pytest.mark.parametrize("extra, postprocess, clip", [
    ("", "auto", (0.005, 0.995)),
    ("clip: [0.01, 0.99]\n", "clip", (0.01, 0.99)),  # an explicit clip keeps its bounds
    ("clip: [0.01, 0.99]\npostprocess: temperature\n", "temperature", (0.01, 0.99)),
    ("postprocess: none\n", "none", (0.005, 0.995)),
    ("clip: [0.01, 0.99]\npostprocess: null\n", "clip", (0.01, 0.99)),  # null = not given
])
def test_explicit_clip_means_postprocess_clip(tmp_path, extra, postprocess, clip):
    exp = load_experiment(write(tmp_path, BASE + extra))
    assert (exp.postprocess, exp.clip) == (postprocess, clip)


def test_seed_yaml_keeps_the_write_up_clip(tmp_path, monkeypatch):
    exp = load_experiment(SEED, data=tmp_path)
    assert (exp.postprocess, exp.clip) == ("clip", (0.005, 0.995))


def test_tuning_defaults_to_all_params(tmp_path):
    exp = load_experiment(write(tmp_path, BASE + "tuning: {budget: 3}\n"))
    assert exp.tuning == Tuning(budget=3, params=("dropout", "learning_rate", "l2"))


def test_relative_paths_are_relative_to_the_yaml_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    path = write(tmp_path, BASE.replace("data: data", "data: ../shared/mini") +
                 "output: ../runs/x\n", "experiments/exp.yaml")
    exp = load_experiment(path)
    assert exp.data == tmp_path / "shared" / "mini"
    assert exp.output == tmp_path / "runs" / "x"
    assert exp.source == path


def test_overrides_win_and_are_relative_to_the_current_directory(tmp_path, monkeypatch):
    path = write(tmp_path, BASE + "output: out\ncache_dir: c\n", "experiments/exp.yaml")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    exp = load_experiment(path, data="mydata", output=Path("myout"), cache_dir="mycache")
    assert exp.data == work / "mydata"
    assert exp.output == work / "myout"
    assert exp.cache_dir == work / "mycache"
    assert load_experiment(path).data == tmp_path / "experiments" / "data"


def test_data_may_come_only_from_the_override(tmp_path):
    path = write(tmp_path, BASE.replace("data: data\n", ""))
    assert load_experiment(path, data=str(tmp_path)).data == tmp_path
    err = load_error(tmp_path, BASE.replace("data: data\n", ""))
    assert "missing required field: data" in str(err) and "command line" in str(err)


def test_explicit_combinations(tmp_path):
    exp = load_experiment(write(tmp_path, BASE.replace(
        "backbones: [resnet50, xception]",
        "backbones: [resnet50, xception, inception_v3]\n"
        "combinations: [[inception_v3, resnet50], xception, [resnet50, xception, inception_v3]]")))
    # members in the backbones' listed order; the list keeps its own order; a bare name = a single
    assert exp.combinations == [("resnet50", "inception_v3"), ("xception",),
                                ("resnet50", "xception", "inception_v3")]


@pytest.mark.parametrize("bounds, expected", [
    ("{min: 2}", [("a", "b"), ("a", "c"), ("b", "c"), ("a", "b", "c")]),
    ("{min: 2, max: 2}", [("a", "b"), ("a", "c"), ("b", "c")]),
    ("{max: 1}", [("a",), ("b",), ("c",)]),
    ("{min: 3, max: 3}", [("a", "b", "c")]),
])
def test_combination_size_bounds(tmp_path, bounds, expected):
    names = {"a": "resnet50", "b": "xception", "c": "inception_v3"}
    exp = load_experiment(write(tmp_path, BASE.replace(
        "backbones: [resnet50, xception]",
        f"backbones: [resnet50, xception, inception_v3]\ncombinations: {bounds}")))
    assert exp.combinations == [tuple(names[x] for x in c) for c in expected]


def test_exclude_as_list(tmp_path):
    exp = load_experiment(write(tmp_path, BASE + textwrap.dedent("""\
        exclude:
          - train/cat.12.jpg
          - ./train/dog.3.jpg
          - train\\cat.12.jpg
        """)))
    assert exp.exclude == ["train/cat.12.jpg", "train/dog.3.jpg"]


def test_exclude_as_file_relative_to_the_yaml_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    (tmp_path / "audit").mkdir()
    (tmp_path / "audit" / "exclude.txt").write_text(
        "# mislabelled\ntrain/cat.12.jpg\n\n  train/dog.7.jpg  \ntrain/cat.12.jpg\n")
    exp = load_experiment(write(tmp_path, BASE + "exclude: audit/exclude.txt\n"))
    assert exp.exclude == ["train/cat.12.jpg", "train/dog.7.jpg"]


def test_parse_experiment_from_a_string(tmp_path):
    exp = parse_experiment(BASE, base_dir=tmp_path)
    assert exp.name == "experiment" and exp.source is None
    assert exp.data == tmp_path / "data"
    with pytest.raises(ExperimentError, match=r"^<string>:3: heads\[0\]: unknown head"):
        parse_experiment(BASE.replace("[dropout_sigmoid]", "[nope]"))


def test_an_explicit_registry_is_used(tmp_path):
    registry = Registry().load(entry_points=False)
    exp = load_experiment(write(tmp_path, BASE), registry=registry)
    assert exp.heads == [HeadSpec(name="dropout_sigmoid", params={})]


def test_experiment_defaults_when_built_directly():
    exp = Experiment(name="x", data="d", backbones=[BackboneSpec(name="resnet50")],
                     combinations=[["resnet50"]], heads=[HeadSpec(name="dropout_sigmoid")],
                     optimizers=[OptimizerSpec(name="adam")])
    assert exp.source is None
    assert exp.output == Path("runs") / "x" and exp.data == Path("d")
    assert exp.combinations == [("resnet50",)]
    json.dumps(exp.to_dict())


# -- the pydantic model and its validation context ---------------------------------------------------
LITE = {"data": "d", "backbones": ["efficientnet_lite0"], "heads": ["dropout_sigmoid"],
        "optimizers": ["adam"]}


def test_the_registry_comes_from_the_validation_context():
    """Names are checked against the context's registry, not the process's: resnet50 is known to
    a registry with every built-in and unknown to one whose Keras-backbone plugin is switched off
    (no installed plugin is assumed: the core env has none)."""
    from pydantic import ValidationError

    from catsdogs.experiment.schema import validate_document

    doc = {**LITE, "backbones": ["resnet50"]}
    full = Experiment.model_validate(doc, context={"registry": Registry().load(entry_points=False)})
    assert full.backbone_names == ["resnet50"]
    without = Registry().load(entry_points=False, disabled=("catsdogs.builtin.keras_backbones",))
    assert "resnet50" not in without.names("backbones")
    with pytest.raises(ValidationError) as info:
        Experiment.model_validate(doc, context={"registry": without})
    (error,) = info.value.errors()
    assert error["loc"] == ("backbones", 0)
    assert error["msg"].startswith("unknown backbone 'resnet50'")
    model, problem = validate_document(doc, {"registry": without})
    assert model is None and problem is not None
    assert problem[0] == "backbones[0]" and problem[1].startswith("unknown backbone")


def test_head_params_and_tuning_are_checked_against_the_context_registry():
    doc = {**LITE, "backbones": ["resnet50"],
           "heads": [{"name": "dropout_sigmoid", "params": {"dropout": "1e-1"}}],
           "tuning": {"budget": 2, "params": "dropout"}}
    exp = Experiment.model_validate(doc, context={"registry": Registry().load(entry_points=False)})
    assert exp.heads == [HeadSpec(name="dropout_sigmoid", params={"dropout": 0.1})]
    assert exp.tuning == Tuning(budget=2, params=("dropout",))
    assert exp.validation.kind == "holdout" and exp.postprocess == "auto"


def test_the_context_resolves_paths_and_gives_the_defaults(tmp_path):
    doc = {**LITE, "backbones": ["resnet50"], "output": "o", "cache_dir": "c"}
    plain = Experiment.model_validate(doc)  # no context: paths as given
    assert (plain.data, plain.output, plain.cache_dir) == (Path("d"), Path("o"), Path("c"))
    assert plain.name == "experiment" and plain.source is None
    exp = Experiment.model_validate({**doc, "output": None}, context={
        "base_dir": tmp_path, "stem": "grid", "cwd": tmp_path / "cwd", "cache_dir": "/abs/cache",
        "source_path": tmp_path / "grid.yaml"})
    assert exp.name == "grid" and exp.source == tmp_path / "grid.yaml"
    assert exp.data == tmp_path / "d" and exp.cache_dir == Path("/abs/cache")
    assert exp.output == tmp_path / "cwd" / "runs" / "grid"


def test_with_tracking_copies_the_model(tmp_path):
    from catsdogs.tracking import with_tracking

    exp = load_experiment(write(tmp_path, BASE))
    tracked = with_tracking(exp, "http://127.0.0.1:5000", True)
    assert tracked.tracking == Tracking(uri="http://127.0.0.1:5000", required=True)
    assert exp.tracking is None and tracked.source == exp.source
    assert tracked.to_dict() == {**exp.to_dict(), "tracking": tracked.tracking.to_dict()}


def test_error_is_a_config_error_with_location(tmp_path):
    err = load_error(tmp_path, BASE + "epochs: 0  #!\n")
    assert isinstance(err, ConfigError)
    assert (err.source, err.line, err.field) == (str(tmp_path / "exp.yaml"), 5, "epochs")


# -- located errors -------------------------------------------------------------------------------
HEADS = ", ".join(get_registry().names("heads"))
OPTIMIZERS = ", ".join(get_registry().names("optimizers"))

ERRORS = [
    # (id, yaml, field path, message fragment)
    ("unknown head", BASE.replace("heads: [dropout_sigmoid]",
                                  "heads: [dropout_sigmoid, dropout_sigmod]  #!"),
     "heads[1]", f"unknown head 'dropout_sigmod' (did you mean 'dropout_sigmoid'?); available: {HEADS}"),
    ("unknown head in mapping", BASE.replace("heads: [dropout_sigmoid]", """\
heads:
  - dropout_sigmoid
  - name: softmax_cma  #!
"""), "heads[1].name", "unknown head 'softmax_cma' (did you mean 'softmax_cam'?)"),
    ("unknown backbone", BASE.replace("backbones: [resnet50, xception]", """\
backbones:
  - resnet50
  - xception
  - resnet5O  #!
"""), "backbones[2]", "unknown backbone 'resnet5O' (did you mean 'resnet50'?)"),
    ("unknown optimizer", BASE.replace("optimizers: [adam]", """\
optimizers:
  - adam
  - {name: rmsprop, learning_rate: 0.1}  #!
"""), "optimizers[1].name", f"unknown optimizer 'rmsprop'; available: {OPTIMIZERS}"),
    ("backbone twice", BASE.replace("backbones: [resnet50, xception]", """\
backbones:
  - resnet50
  - xception
  - {name: resnet50, image_size: 64}  #!
"""), "backbones[2]", "backbone 'resnet50' is listed twice"),
    ("unknown top-level key", BASE + "optimiser: [adam]  #!\n",
     "optimiser", "unknown field (did you mean 'optimizers'?); valid fields: name, data"),
    ("unknown backbone key", BASE.replace("[resnet50, xception]",
                                          "[resnet50, {name: xception, imagesize: 299}]  #!"),
     "backbones[1].imagesize", "unknown field (did you mean 'image_size'?)"),
    ("duplicate key", BASE + "epochs: 3\nepochs: 4  #!\n", "epochs", "duplicate field (first given on line 5)"),
    ("weights per backbone", BASE.replace("[resnet50, xception]",
                                          "[resnet50, {name: xception, weights: random}]  #!"),
     "backbones[1].weights", "does not offer weights 'random'; choose one of: imagenet, none"),
    ("weights default", "weights: imagenet21k  #!\n" + BASE,
     "weights", "backbone 'resnet50' does not offer weights 'imagenet21k'"),
    ("weights not a string", "weights: 3  #!\n" + BASE, "weights", "must be a weights name"),
    ("image_size too small", BASE.replace(" [resnet50, xception]", """
- resnet50
- name: xception
  image_size: 64  #!
"""), "backbones[1].image_size", "too small for backbone 'xception' (minimum 71"),
    ("image_size type", BASE.replace("[resnet50, xception]", "[{name: resnet50, image_size: big}]  #!"),
     "backbones[0].image_size", "must be an integer (pixels), got the string 'big'"),
    ("image_size bool", "image_size: true  #!\n" + BASE, "image_size", "must be an integer"),
    ("precision", BASE.replace("[resnet50, xception]", "[resnet50, {name: xception, precision: float16}]  #!"),
     "backbones[1].precision", "unknown precision 'float16' (did you mean 'bfloat16'?); choose one of: float32, bfloat16"),
    ("precision default", "precision: half  #!\n" + BASE, "precision", "choose one of: float32, bfloat16"),
    ("resize", "resize: stretch  #!\n" + BASE, "resize", "unknown resize policy 'stretch'; choose one of: squash, crop, pad"),
    ("resize per backbone", BASE.replace("[resnet50, xception]", "[{name: resnet50, resize: fit}]  #!"),
     "backbones[0].resize", "unknown resize policy 'fit'"),
    ("head param key", BASE.replace("heads: [dropout_sigmoid]", """\
heads:
  - name: dropout_sigmoid
    params:
      dropot: 0.3  #!
"""), "heads[0].params.dropot", "head 'dropout_sigmoid' has no parameter 'dropot' (did you mean 'dropout'?); valid: dropout"),
    ("head param value", BASE.replace("heads: [dropout_sigmoid]",
                                      "heads: [{name: dropout_sigmoid, params: {dropout: 1.5}}]  #!"),
     "heads[0].params", "invalid params for head 'dropout_sigmoid'"),
    ("head params type", BASE.replace("heads: [dropout_sigmoid]",
                                      "heads: [{name: softmax_cam, params: [0.3]}]  #!"),
     "heads[0].params", "must be a mapping of hyper-parameters (dropout, l2)"),
    ("head without name", BASE.replace("heads: [dropout_sigmoid]", "heads: [{params: {}}]  #!"),
     "heads[0]", "missing field 'name'"),
    ("head not a string", BASE.replace("heads: [dropout_sigmoid]", "heads: [3]  #!"),
     "heads[0]", "must be a head name or a mapping with 'name', got 3"),
    ("learning rate zero", BASE.replace("optimizers: [adam]", "optimizers: [{name: adam, learning_rate: 0}]  #!"),
     "optimizers[0].learning_rate", "must be a number > 0, got 0"),
    ("learning rate negative", BASE.replace("optimizers: [adam]", "optimizers: [{name: adam, learning_rate: -1e-3}]  #!"),
     "optimizers[0].learning_rate", "must be a number > 0"),
    ("learning rate bool", BASE.replace("optimizers: [adam]", "optimizers: [{name: adam, learning_rate: true}]  #!"),
     "optimizers[0].learning_rate", "must be a number > 0, got a boolean"),
    ("learning rate text", BASE.replace("optimizers: [adam]", "optimizers: [{name: adam, learning_rate: fast}]  #!"),
     "optimizers[0].learning_rate", "got the string 'fast'"),
    ("duplicate optimizer", BASE.replace("optimizers: [adam]", "optimizers:\n  - adam\n  - adam  #!\n"),
     "optimizers[1]", "duplicate optimizer 'adam'"),
    ("epochs zero", BASE + "epochs: 0  #!\n", "epochs", "must be an integer >= 1, got 0"),
    ("epochs float", BASE + "epochs: 8.5  #!\n", "epochs", "must be an integer >= 1, got 8.5"),
    ("epochs string", BASE + "epochs: '8'  #!\n", "epochs", "must be an integer >= 1, got the string '8'"),
    ("epochs bool", BASE + "epochs: true  #!\n", "epochs", "got a boolean"),
    ("batch_size", BASE + "batch_size: -4  #!\n", "batch_size", "must be an integer >= 1"),
    ("seed negative", BASE + "seed: -1  #!\n", "seed", "must be an integer >= 0, got -1"),
    ("holdout range", BASE + "validation:\n  holdout: 1.5  #!\n",
     "validation.holdout", "must be a number in (0, 1), got 1.5"),
    ("holdout bool", BASE + "validation: {holdout: true}  #!\n",
     "validation.holdout", "must be a number in (0, 1), got a boolean"),
    ("kfold", BASE + "validation: {kfold: 1}  #!\n", "validation.kfold", "must be an integer >= 2, got 1"),
    ("kfold bool", BASE + "validation: {kfold: true}  #!\n", "validation.kfold", "got a boolean"),
    ("validation both", BASE + "validation: {kfold: 5, holdout: 0.2}  #!\n",
     "validation", "give exactly one of holdout, kfold"),
    ("validation unknown", BASE + "validation: {folds: 5}  #!\n",
     "validation.folds", "unknown field (did you mean 'kfold'?); allowed: holdout, kfold"),
    ("validation type", BASE + "validation: 0.2  #!\n", "validation", "must be {holdout: FRACTION} or {kfold: FOLDS}"),
    ("clip order", BASE + "clip: [0.9, 0.1]  #!\n", "clip", "0 <= lo < hi <= 1, got [0.9, 0.1]"),
    ("clip range", BASE + "clip: [0.0, 1.5]  #!\n", "clip", "0 <= lo < hi <= 1"),
    ("clip length", BASE + "clip: [0.1]  #!\n", "clip", "a list [lo, hi] of two numbers"),
    ("clip bool", BASE + "clip:\n  - 0.01\n  - true  #!\n", "clip[1]", "got a boolean"),
    ("target", BASE + "target: 0  #!\n", "target", "must be a number > 0, got 0"),
    ("target bool", BASE + "target: true  #!\n", "target", "must be a number > 0, got a boolean"),
    ("tuning budget", BASE + "tuning:\n  budget: 0  #!\n", "tuning.budget", "must be an integer >= 1, got 0"),
    ("tuning budget missing", BASE + "tuning: {params: [l2]}  #!\n", "tuning", "missing field 'budget'"),
    ("tuning params", BASE + "tuning:\n  budget: 5\n  params:\n    - dropout\n    - momentum  #!\n",
     "tuning.params[1]", "unknown tunable parameter 'momentum'; choose one of: dropout, learning_rate, l2"),
    ("tuning params twice", BASE + "tuning: {budget: 5, params: [l2, l2]}  #!\n",
     "tuning.params[1]", "'l2' is listed twice"),
    ("tta", BASE + "tta: 1  #!\n", "tta", "must be true or false, got 1"),
    ("exclude entry", BASE + "exclude:\n  - train/cat.1.jpg\n  - 12  #!\n", "exclude[1]",
     "must be a relative file path (string), got 12"),
    ("exclude absolute", BASE + "exclude: [/data/train/cat.1.jpg]  #!\n", "exclude[0]",
     "must be relative to the data directory"),
    ("exclude file missing", BASE + "exclude: audit/missing.txt  #!\n", "exclude", "not found"),
    ("exclude type", BASE + "exclude: {a: 1}  #!\n", "exclude", "must be a list of relative file paths"),
    ("combination unknown", BASE + "combinations: [[resnet50, inception_v3]]  #!\n",
     "combinations[0][1]", "'inception_v3' is not one of the listed backbones: resnet50, xception (add it to backbones"),
    ("combination typo", BASE + "combinations: [[resnet50, xcepton]]  #!\n", "combinations[0][1]",
     "'xcepton' is not one of the listed backbones: resnet50, xception (did you mean 'xception'?)"),
    ("combination repeats", BASE + "combinations:\n  - [resnet50]\n  - [xception, xception]  #!\n",
     "combinations[1]", "backbone 'xception' appears twice in one combination"),
    ("combination duplicate", BASE + "combinations:\n  - [resnet50, xception]\n  - [xception, resnet50]  #!\n",
     "combinations[1]", "duplicate combination ['resnet50', 'xception'] (same as combinations[0])"),
    ("combination empty", BASE + "combinations: [[]]  #!\n", "combinations[0]", "must be a non-empty list"),
    ("combinations empty", BASE + "combinations: []  #!\n", "combinations", "must not be empty"),
    ("combinations min 0", BASE + "combinations: {min: 0}  #!\n", "combinations.min",
     "1 <= min <= max <= 2 (the number of backbones), got min=0, max=2"),
    ("combinations max", BASE + "combinations:\n  min: 1\n  max: 3  #!\n", "combinations.max",
     "1 <= min <= max <= 2"),
    ("combinations min > max", BASE + "combinations: {min: 2, max: 1}  #!\n", "combinations",
     "got min=2, max=1"),
    ("combinations bound type", BASE + "combinations: {min: two}  #!\n", "combinations.min",
     "must be an integer"),
    ("combinations bad word", BASE + "combinations: every  #!\n", "combinations", "must be 'all'"),
    ("backbones type", BASE.replace("backbones: [resnet50, xception]", "backbones: resnet50  #!"),
     "backbones", "must be a non-empty list of backbone names"),
    ("heads empty", BASE.replace("heads: [dropout_sigmoid]", "heads: []  #!"),
     "heads", "must be a non-empty list of head names"),
    ("name", "name: a/b  #!\n" + BASE, "name", "must be usable as a folder name"),
    ("data type", BASE.replace("data: data", "data: [a, b]  #!"), "data", "must be a path (string), got a list"),
    ("engine", BASE + "engine: raay  #!\n", "engine",
     "unknown engine 'raay' (did you mean 'ray'?); choose one of: local, ray"),
    ("ray_address type", BASE + "ray_address: 10001  #!\n", "ray_address", "must be a Ray address"),
    ("precision int8 typo", BASE + "precision: int9  #!\n", "precision",
     "unknown precision 'int9' (did you mean 'int8'?); choose one of: float32, bfloat16, int8"),
    ("calibration_size bound", BASE + "calibration_size: 0  #!\n", "calibration_size",
     "must be an integer >= 1, got 0"),
    ("calibration_size per backbone", BASE.replace(
        "[resnet50, xception]", "[resnet50, {name: xception, calibration_size: 1000001}]  #!"),
     "backbones[1].calibration_size", "must be at most 100000, got 1000001"),
    ("postprocess", BASE + "postprocess: temprature  #!\n", "postprocess",
     "unknown postprocess 'temprature' (did you mean 'temperature'?)"),
    ("refit", BASE + "refit: yes please  #!\n", "refit", "must be true or false"),
    ("ensemble top", BASE + "ensemble: {top: 1}  #!\n", "ensemble.top", "must be an integer >= 2"),
    ("ensemble method", BASE + "ensemble: {top: 2, method: stak}  #!\n", "ensemble.method",
     "unknown ensemble method 'stak' (did you mean 'stack'?)"),
    ("ensemble submit", BASE + "ensemble: {top: 2, submit: allways}  #!\n", "ensemble.submit",
     "unknown ensemble submit rule 'allways' (did you mean 'always'?)"),
    ("ensemble key", BASE + "ensemble: {tops: 2}  #!\n", "ensemble.tops",
     "unknown field (did you mean 'top'?)"),
    ("tracking backend", BASE + "tracking: mlflw  #!\n", "tracking",
     "unknown tracking backend 'mlflw' (did you mean 'mlflow'?)"),
    ("tracking required", BASE + "tracking: {backend: mlflow, required: 1}  #!\n",
     "tracking.required", "must be true or false"),
]


@pytest.mark.parametrize("text, field, fragment", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_errors_name_file_line_and_field(tmp_path, text, field, fragment):
    err = load_error(tmp_path, text)
    message = str(err)
    expected = f"{tmp_path / 'exp.yaml'}:{marked_line(text)}: {field}: "
    assert message.startswith(expected), message
    assert fragment in message, message
    assert err.field == field and err.line == marked_line(text)


@pytest.mark.parametrize("text, line, fragment", [
    ("data: data\nbackbones: resnet50: xception\n", 2, "mapping values are not allowed here"),
    ("data: data\nheads: [a, b\noptimizers: [adam]\n", None, "invalid YAML"),
    ("data: data\n\tbackbones: [resnet50]\n", 2, "invalid YAML"),
    ("--- a\n--- b\n", 2, "expected a single document"),
])
def test_yaml_syntax_errors_give_the_line(tmp_path, text, line, fragment):
    err = load_error(tmp_path, text)
    assert str(err).startswith(f"{tmp_path / 'exp.yaml'}:"), str(err)
    assert "invalid YAML" in str(err) and fragment in str(err)
    if line is not None:
        assert err.line == line and str(err).startswith(f"{tmp_path / 'exp.yaml'}:{line}: ")


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"])
def test_empty_file(tmp_path, text):
    err = load_error(tmp_path, text)
    assert str(err) == (f"{tmp_path / 'exp.yaml'}: the file is empty; an experiment needs at least: "
                        "data, backbones, heads, optimizers")


def test_top_level_must_be_a_mapping(tmp_path):
    err = load_error(tmp_path, "\n- resnet50\n")
    assert str(err).startswith(f"{tmp_path / 'exp.yaml'}:2: the top level must be a mapping")


def test_missing_required_fields_are_all_named(tmp_path):
    err = load_error(tmp_path, "data: d\nbackbones: [resnet50]\n")
    assert str(err) == f"{tmp_path / 'exp.yaml'}: missing required fields: heads, optimizers"
    err = load_error(tmp_path, "data: d\nbackbones: [resnet50]\nheads: [dropout_sigmoid]\n")
    assert "missing required field: optimizers" in str(err)
    err = load_error(tmp_path, "data: d\nbackbones: [resnet50]\nheads:\noptimizers: [adam]\n")
    assert "missing required field: heads" in str(err)  # null counts as missing


def test_exclude_file_with_absolute_entry(tmp_path):
    (tmp_path / "ex.txt").write_text("train/cat.1.jpg\n/abs/dog.2.jpg\n")
    text = BASE + "exclude: ex.txt  #!\n"
    err = load_error(tmp_path, text)
    assert str(err).startswith(f"{tmp_path / 'exp.yaml'}:{marked_line(text)}: exclude: ")
    assert f"{tmp_path / 'ex.txt'}:2: '/abs/dog.2.jpg' must be relative" in str(err)


def test_missing_file(tmp_path):
    with pytest.raises(ExperimentError, match="experiment file not found"):
        load_experiment(tmp_path / "nope.yaml")
    with pytest.raises(ExperimentError, match="not a file"):
        load_experiment(tmp_path)


def test_relative_source_name_is_kept_in_messages(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, BASE.replace("heads: [dropout_sigmoid]", "heads: [dropout_sigmod]"), "experiments/x.yaml")
    with pytest.raises(ExperimentError) as info:
        load_experiment("experiments/x.yaml")
    assert str(info.value).startswith("experiments/x.yaml:3: heads[0]: unknown head 'dropout_sigmod'")


def test_a_name_claimed_by_two_plugins_reports_both(tmp_path):
    registry = Registry().load(entry_points=False)
    registry._conflicts["heads"]["twin"] = ["plugin_a", "plugin_b"]
    path = write(tmp_path, BASE.replace("[dropout_sigmoid]", "[twin]"))
    with pytest.raises(ExperimentError) as info:
        load_experiment(path, registry=registry)
    assert str(info.value).startswith(f"{path}:3: heads[0]: head 'twin' is registered by more than "
                                      "one plugin: 'plugin_a' and 'plugin_b'")


def test_run_settings_fields_do_not_change_run_hashes(tmp_path):
    """engine/ray_address/tracking and the post-training settings must not invalidate finished runs."""
    from catsdogs.runs.runner import _settings, _short_hash, plan_runs

    plain = load_experiment(write(tmp_path, BASE, "plain.yaml"))
    fancy = load_experiment(write(tmp_path, BASE + """\
engine: ray
ray_address: auto
postprocess: temperature
refit: true
ensemble: {top: 2, method: stack}
tracking: {backend: mlflow, uri: http://127.0.0.1:5000}
""", "fancy.yaml"))
    keys = {b: {"config_key": b, "dataset_fingerprint": "f"} for b in plain.backbone_names}
    for a, b in zip(plan_runs(plain), plan_runs(fancy), strict=True):
        assert _short_hash(_settings(a, plain, keys, "s"), 16) == \
            _short_hash(_settings(b, fancy, keys, "s"), 16)


# -- hardening (issue 9 items 5, 7, 9, 12) ----------------------------------------------------------
@pytest.mark.parametrize("text, field, fragment", [
    (BASE + "epochs: 1000000000000  #!\n", "epochs", "must be at most 10000, got 1000000000000"),
    (BASE + "batch_size: 10000000  #!\n", "batch_size", "must be at most 65536"),
    (BASE + "validation: {kfold: 100000}  #!\n", "validation.kfold", "must be at most 100"),
    (BASE + "tuning: {budget: 99999999}  #!\n", "tuning.budget", "must be at most 10000"),
    (BASE + "ensemble: {top: 5000}  #!\n", "ensemble.top", "must be at most 1000"),
    (BASE.replace("[resnet50, xception]", "[resnet50, {name: xception, image_size: 100000}]  #!"),
     "backbones[1].image_size", "must be at most 4096, got 100000"),
    (BASE.replace("optimizers: [adam]", "optimizers: [{name: adam, learning_rate: 1e9}]  #!"),
     "optimizers[0].learning_rate", "must be at most 1000, got 1e9"),
    # item 12: a seed NumPy cannot take is one clear error, not a traceback later
    (BASE + "seed: 4294967296  #!\n", "seed", "must be at most 4294967295, got 4294967296"),
    (BASE + "seed: 99999999999999999999999  #!\n", "seed", "must be at most 4294967295"),
    (BASE.replace("heads: [dropout_sigmoid]",
                  "heads: [{name: lightgbm_stacking, params: {folds: 100000}}]  #!"),
     "heads[0].params", "folds must be an integer >= 2 and <= 100, got 100000"),
], ids=["epochs", "batch_size", "kfold", "budget", "ensemble", "image_size", "learning_rate",
        "seed 2**32", "seed huge", "head params"])
def test_item9_item12_numbers_have_sane_upper_bounds(tmp_path, text, field, fragment):
    err = load_error(tmp_path, text)
    assert str(err).startswith(f"{tmp_path / 'exp.yaml'}:{marked_line(text)}: {field}: "), str(err)
    assert fragment in str(err)


def test_item12_largest_seed_is_accepted(tmp_path):
    assert load_experiment(write(tmp_path, BASE + "seed: 4294967295\n")).seed == 2**32 - 1


def test_item12_seed_cli_is_one_error_line(tmp_path):
    from conftest import run_cli

    path = write(tmp_path, BASE + "seed: 4294967296\n")
    proc = run_cli("run", str(path), "--out", str(tmp_path / "out"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("Error: ") and "seed: must be at most 4294967295" in proc.stderr


def test_item7_alias_bomb_is_refused_fast(tmp_path):
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 13)]
    text = BASE + "\n".join(levels) + "\n"  # 10**13 nodes once expanded: only a guard returns
    err = load_error(tmp_path, text)
    assert "expands to more than 100000 YAML nodes" in str(err)
    # anchors and aliases within reason still work
    ok = BASE.replace("optimizers: [adam]", "optimizers: &opts [adam]") + "x_opts: *opts\n"
    with pytest.raises(ExperimentError, match="x_opts: unknown field"):
        load_experiment(write(tmp_path, ok))


def test_item5_exclude_file_is_recorded_by_digest(tmp_path):
    import hashlib

    (tmp_path / "audit").mkdir()
    listing = "# flagged by the audit\ntrain/cat.1.jpg\n\ntrain/dog.2.jpg\ntrain/cat.1.jpg\n"
    (tmp_path / "audit" / "exclude.txt").write_text(listing)
    exp = load_experiment(write(tmp_path, BASE + "exclude: audit/exclude.txt\n"))
    assert exp.exclude == ["train/cat.1.jpg", "train/dog.2.jpg"]
    summary = exp.to_dict()["exclude"]
    assert summary == {"file": str(tmp_path / "audit" / "exclude.txt"), "entries": 2,
                       "sha256": hashlib.sha256(listing.encode()).hexdigest()}
    assert "flagged" not in json.dumps(exp.to_dict())  # the content is not copied
    assert exp.match_exclude(["train/dog.2.jpg", "train/dog.3.jpg"]) == (
        ["train/dog.2.jpg"], ["train/cat.1.jpg"])
    inline = load_experiment(write(tmp_path, BASE + "exclude: [train/cat.1.jpg]\n"))
    assert inline.to_dict()["exclude"] == ["train/cat.1.jpg"]


@pytest.mark.slow
def test_item5_unmatched_exclude_entries_are_reported(tmp_path, caplog):
    import logging

    import yaml
    from conftest import make_kaggle

    from catsdogs.runs.runner import run_experiment

    data = make_kaggle(tmp_path / "data", n_per_class=8, n_test=2)
    train = sorted(p.name for p in (data / "train").iterdir())
    (tmp_path / "exclude.txt").write_text(f"train/{train[0]}\ntrain/no-such.jpg\ntrain/Cat.1.JPG\n")
    doc = {"data": str(data), "weights": "none", "backbones": [{"name": "resnet50", "image_size": 32}],
           "heads": ["dropout_sigmoid"], "optimizers": ["adam"], "epochs": 1, "batch_size": 8,
           "exclude": "exclude.txt", "output": str(tmp_path / "out"),
           "cache_dir": str(tmp_path / "cache")}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(doc))
    with caplog.at_level(logging.WARNING, logger="catsdogs"):
        run_experiment(load_experiment(tmp_path / "exp.yaml"), progress=False)
    assert "2 of 3 entries match no training image" in caplog.text
    assert "train/no-such.jpg, train/Cat.1.JPG" in caplog.text
    recorded = json.loads((tmp_path / "out" / "experiment.json").read_text())
    assert recorded["exclude_matched"] == [f"train/{train[0]}"]
    assert recorded["exclude"]["entries"] == 3 and len(recorded["exclude"]["sha256"]) == 64


# -- the JSON Schema (catsdogs schema) ----------------------------------------------------------------
def test_cli_schema_prints_the_json_schema_of_experiment_files(tmp_path):
    import yaml
    from conftest import run_cli
    from jsonschema import Draft202012Validator

    from catsdogs.experiment.spec import TOP_LEVEL_FIELDS

    schema = json.loads(run_cli("schema", check=True).stdout)
    Draft202012Validator.check_schema(schema)
    assert tuple(schema["properties"]) == TOP_LEVEL_FIELDS
    assert set(schema["required"]) == {"backbones", "heads", "optimizers"}
    assert schema["additionalProperties"] is False
    validator = Draft202012Validator(schema)
    assert not list(validator.iter_errors(yaml.safe_load(SEED.read_text())))
    short_forms = yaml.safe_load(BASE.replace("[resnet50, xception]",
                                              "[resnet50, {name: xception, weights: null}]")
                                 + "tuning: 3\ntracking: mlflow\nvalidation: kfold\n"
                                 "combinations: [resnet50, [resnet50, xception]]\n")
    assert not list(validator.iter_errors(short_forms))
    bad = {**yaml.safe_load(SEED.read_text()), "epochs": 0, "optimiser": ["adam"]}
    messages = " | ".join(e.message for e in validator.iter_errors(bad))
    assert "0 is less than the minimum of 1" in messages and "'optimiser' was unexpected" in messages
