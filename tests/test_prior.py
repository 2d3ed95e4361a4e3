"""The ``imagenet_prior`` head: dropout_sigmoid plus each backbone's own ImageNet classifier's
dog-vs-cat log-odds, read from the cached GAP features.

A real tiny network with an ImageNet-style 1000-way classifier (:class:`catsdogs.testing.
TinyClassifier`, seeded random weights) and one without a classifier feed real experiments on
generated JPEGs: the prior the head computes is the classifier's own, frozen; the runner plans
the head where every backbone has a classifier and gives it their weights; the ranked run is
refitted, and its export (Keras and TFLite) predicts the submission photo by photo.
"""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from export_fixtures import predict_photos, submitted_vs_ranked, tiny_env, tiny_experiment

from catsdogs.audit.imagenet import CAT_CLASSES, DOG_CLASSES
from catsdogs.errors import CatsdogsError, ConfigError
from catsdogs.testing import TinyClassifier, TinyTopSplit

TOL = 1e-3
CLS = TinyClassifier.name


class OtherClassifier(TinyClassifier):
    """A second classifier backbone: the same network, other seeded weights."""

    name = "catsdogs_testing_classifier2"
    seed = 7


class TwoWeightsClassifier(TinyClassifier):
    """A classifier backbone offering two weights: ``none`` and ``alt`` (other seeded weights)."""

    name = "catsdogs_testing_classifier_two_weights"
    weights_options = ("none", "alt")

    def _seeded(self, weights):
        self.check_weights(weights)
        self.seed = TinyClassifier.seed + (100 if weights == "alt" else 0)

    def build_model(self, weights, image_size):
        from catsdogs.components import seeded_initializers

        self._seeded(weights)
        with seeded_initializers(self.seed):
            return self._build(image_size, False, features_only=True)

    def build_classifier(self, weights="none", image_size=None, with_features=False):
        self._seeded(weights)
        return super().build_classifier("none", image_size, with_features)

    def weights_id(self, weights):
        self._seeded(weights)
        return f"{weights}-seed{self.seed}"


class UnreachableClassifier(TinyClassifier):
    """Its features are at hand, its classifier's weights are not and cannot be had: building the
    classifier fails as a Keras download does offline (and says so in ``built``)."""

    name = "catsdogs_testing_classifier_unreachable"
    built: list[str] = []

    def weights_at_hand(self, weights, classifier=False):
        return not classifier

    def build_classifier(self, weights="none", image_size=None, with_features=False):
        self.built.append(weights)
        raise CatsdogsError(f"could not load {weights!r} weights for backbone {self.name!r} "
                            "(test: no network)")


class OfflineLaterClassifier(TinyClassifier):
    """Its classifier's weights are never at hand: they are downloaded on each first use, which
    works while ``online`` and fails as a Keras download does offline once it is not."""

    name = "catsdogs_testing_classifier_offline_later"
    online = True
    built: list[str] = []

    def weights_at_hand(self, weights, classifier=False):
        return not classifier

    def build_classifier(self, weights="none", image_size=None, with_features=False):
        self.built.append(weights)
        if not self.online:
            raise CatsdogsError(f"could not load {weights!r} weights for backbone {self.name!r} "
                                "(test: no network)")
        return super().build_classifier(weights, image_size, with_features)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    backbones = [TinyClassifier(), OtherClassifier(), TinyTopSplit(), TwoWeightsClassifier(),
                 UnreachableClassifier(), OfflineLaterClassifier()]
    with tiny_env(tmp_path_factory, "prior", backbones) as env:
        yield env


def _pixels(n=24, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 255, (n, 32, 32, 3)).astype(np.float32)


def _features_and_log_odds(backbone, pixels):
    """The backbone's GAP features and its classifier's log(dog mass / cat mass), by the full
    classifier network on the photos (not by the head's own code)."""
    out = backbone.build_classifier("none", with_features=True)(pixels)
    logits = np.asarray(out["logits"], np.float64)
    softmax = np.exp(logits - logits.max(axis=1, keepdims=True))
    softmax /= softmax.sum(axis=1, keepdims=True)
    dog = softmax[:, list(DOG_CLASSES)].sum(axis=1)
    cat = softmax[:, list(CAT_CLASSES)].sum(axis=1)
    return np.asarray(out["features"], np.float32), np.log(dog / cat)


def test_the_prior_is_each_classifiers_own_frozen_dog_vs_cat_log_odds(env):
    """Two backbones fused: each prior reads its own columns with its own classifier (the
    classifier network's softmax, summed over the 118 dog and the 5 cat classes), before and
    after training; only the first Dense, the prior weights and the bias are trained."""
    import keras

    from catsdogs.builtin.prior import ImageNetPriorHead

    registry = env["registry"]
    pixels = _pixels()
    Xa, la = _features_and_log_odds(registry.backbone(CLS), pixels)
    Xb, lb = _features_and_log_odds(registry.backbone(OtherClassifier.name), pixels)
    assert np.abs(la - lb).max() > 1e-3  # two different classifiers
    X, y = np.hstack([Xa, Xb]), np.tile([0, 1], 12)
    head = ImageNetPriorHead(weights="none").fit(
        X, y, epochs=5, batch_size=8, blocks=[(CLS, 8), (OtherClassifier.name, 8)])
    model = head.keras_model()
    for i, want in enumerate((la, lb)):
        prior = keras.Model(model.input, model.get_layer(f"prior_{i}").output)
        np.testing.assert_allclose(np.asarray(prior(X)).reshape(-1), want, rtol=1e-4, atol=1e-4)
    trained = sorted(w.path.split("/")[0] for w in model.trainable_weights)
    assert trained == ["logit", "logit", "prior_weight", "prior_weight"]
    assert head.predict_proba(X).shape == (24,)


def test_lite0_prior_is_its_imagenet_classifiers_own():
    """EfficientNet-Lite0 (seeded weights, 64 px): the prior read from its cached-feature model's
    output is its classifier network's own dog/cat mass ratio (the classifier is a Dense layer on
    exactly those features; its dropout is off at inference)."""
    lite = pytest.importorskip("catsdogs_efficientnet_lite")
    from catsdogs.builtin.prior import log_odds, species_weights

    backbone = lite.get_backbone("efficientnet_lite0")
    pixels = _pixels(4)[:, :, :, :].repeat(2, axis=1).repeat(2, axis=2)  # 64 px
    features = np.asarray(backbone.build("none", 64)(pixels))
    kernel, bias = species_weights(backbone, "none")
    logits = np.asarray(backbone.build_classifier("none", 64)(pixels), np.float64)
    softmax = np.exp(logits - logits.max(axis=1, keepdims=True))
    want = np.log(softmax[:, list(DOG_CLASSES)].sum(axis=1) / softmax[:, list(CAT_CLASSES)].sum(axis=1))
    np.testing.assert_allclose(log_odds(features, kernel, bias, len(CAT_CLASSES)), want,
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name, size", [("resnet50", 32), ("inception_v3", 75)])
def test_a_keras_application_prior_is_its_imagenet_classifiers_own(env, name, size):
    """The write-up's Keras backbones offer their own classifier (GAP -> Dense(1000), seeded at
    weights none): the prior read from the cached-feature model's output is the classifier
    network's own dog/cat mass ratio, and the runner plans the head on them."""
    from catsdogs.builtin.prior import log_odds, species_weights
    from catsdogs.runs.runner import plan_runs

    backbone = env["registry"].backbone(name)
    pixels = np.random.default_rng(1).uniform(0, 255, (4, size, size, 3)).astype(np.float32)
    features = np.asarray(backbone.build("none", size)(pixels))
    kernel, bias = species_weights(backbone, "none")
    logits = np.asarray(backbone.build_classifier("none", size)(pixels), np.float64)
    softmax = np.exp(logits - logits.max(axis=1, keepdims=True))
    want = np.log(softmax[:, list(DOG_CLASSES)].sum(axis=1) / softmax[:, list(CAT_CLASSES)].sum(axis=1))
    np.testing.assert_allclose(log_odds(features, kernel, bias, len(CAT_CLASSES)), want,
                               rtol=1e-4, atol=1e-4)

    exp = _experiment(env, f"plan-{name}", heads=["dropout_sigmoid", "imagenet_prior"],
                      backbones=[{"name": name, "image_size": size}, TinyTopSplit.name])
    prior = [list(r.combination) for r in plan_runs(exp) if r.head.name == "imagenet_prior"]
    assert prior == [[name]]


def test_the_prior_term_starts_centred_with_weight_one_over_the_backbones(env):
    """Before training, the prior term is the backbones' mean log-odds minus its mean over the
    training rows (the constant of 118 dog classes against 5 cat ones is not learned first)."""
    from catsdogs.builtin.prior import ImageNetPriorHead

    registry = env["registry"]
    Xa, la = _features_and_log_odds(registry.backbone(CLS), _pixels())
    still = registry.optimizer("adam")(learning_rate=1e-9)  # one epoch that moves nothing
    head = ImageNetPriorHead(weights="none").fit(Xa, np.tile([0, 1], 12), epochs=1,
                                                 optimizer=still, blocks=[(CLS, 8)])
    kernel, bias = head.keras_model().get_layer("prior_weight").get_weights()
    assert kernel.reshape(-1) == pytest.approx([1.0], abs=1e-6)
    assert bias[0] == pytest.approx(-la.mean(), abs=1e-4) and abs(la.mean()) > 1  # log(118 / 5) ~ 3


@pytest.mark.parametrize("blocks, message", [
    (None, "fit needs blocks"),
    ([(TinyTopSplit.name, 8)], "has no ImageNet classifier"),
    ([(CLS, 4), (OtherClassifier.name, 4)], "classifier reads 8"),
])
def test_features_it_cannot_read_are_one_clear_error(env, blocks, message):
    from catsdogs.builtin.prior import ImageNetPriorHead

    with pytest.raises(ConfigError, match=message):
        ImageNetPriorHead(weights="none").fit(np.zeros((4, 8), np.float32), np.array([0, 1, 0, 1]),
                                              epochs=1, blocks=blocks)


def _experiment(env, name: str, **fields):
    return tiny_experiment(env["root"], env["data"], name, **{
        "backbones": [CLS], "heads": ["imagenet_prior"], **fields})


def test_plan_gives_the_head_the_combinations_with_classifiers_and_their_weights(env):
    from catsdogs.runs.runner import plan_runs, run_head_params

    exp = _experiment(env, "plan", backbones=[CLS, OtherClassifier.name, TinyTopSplit.name],
                      heads=["dropout_sigmoid", "imagenet_prior"])
    runs = plan_runs(exp)
    prior = [list(r.combination) for r in runs if r.head.name == "imagenet_prior"]
    assert prior == [[CLS], [OtherClassifier.name], [CLS, OtherClassifier.name]]
    assert sum(r.head.name == "dropout_sigmoid" for r in runs) == 7
    for spec in runs:
        if spec.head.name == "imagenet_prior":
            assert run_head_params(spec, exp, env["registry"]) == {"weights": "none"}


@pytest.mark.parametrize("fields, message", [
    ({"backbones": [TinyTopSplit.name]}, "no combination of the experiment has only backbones "
                                         "that offer one"),
    ({"heads": [{"name": "imagenet_prior", "params": {"weights": "none"}}]},
     "do not set 'weights'"),
    ({"backbones": [{"name": CLS, "views": ["orig", "flip"], "merge": "concat"}]},
     "no combination"),
])
def test_a_prior_head_that_cannot_run_is_one_clear_error_on_load(env, fields, message):
    with pytest.raises(ConfigError, match=message) as info:
        _experiment(env, "bad", **fields)
    assert "bad.yaml" in str(info.value) and "heads[0]" in str(info.value)


@pytest.mark.slow
def test_kfold_prior_run_is_ranked_out_of_fold_and_exports_its_submission(env):
    """k-fold on two classifier backbones fused: the prior run is ranked on every training row
    out of fold, and its three fold heads, each carrying both classifiers' columns, export
    (Keras, TFLite) to the submitted P(dog), post-processing included."""
    from catsdogs.app.export import export_run, load_head_file

    result = _run(env, "kfold", backbones=[CLS, OtherClassifier.name],
                  combinations=[[CLS, OtherClassifier.name]], validation={"kfold": 3},
                  postprocess="temperature")
    out = result.out_dir
    (record,) = result.records
    assert record.head.name == "imagenet_prior" and record.params["weights"] == "none"
    assert record.n_val == 32  # every training row, out of fold
    run_dir = out / "runs" / record.run_id
    assert sorted(p.name for p in run_dir.glob("head*.keras")) == [
        "head-fold1.keras", "head-fold2.keras", "head.keras"]
    fold = load_head_file(run_dir / "head-fold1.keras")
    assert [layer.name for layer in fold.layers if layer.name.startswith("prior_")] == [
        "prior_0", "prior_1", "prior_weight"]
    submitted = pd.read_csv(out / "submission.csv").set_index("id")["label"]
    photos = sorted((env["data"] / "test").glob("*.jpg"))
    export_run(run_dir, ["keras", "tflite"], out / "export", neither=False)
    for model, backend in ((out / "export", "keras"), (out / "export", "tflite")):
        got = predict_photos(model, photos, backend)
        diff = np.abs(got.sort_index().to_numpy() - submitted.sort_index().to_numpy()).max()
        assert diff <= TOL, (backend, diff)


@pytest.mark.slow
def test_refitted_prior_run_exports_the_submission(env):
    """Holdout with ``refit: true``: the winner is retrained on every row, and the export is the
    refitted head, not the ranked one."""
    from catsdogs.app.export import export_run

    result = _run(env, "refit", refit=True, optimizers=[{"name": "adam", "learning_rate": 0.01}])
    out = result.out_dir
    (record,) = result.records
    submitted = submitted_vs_ranked(result, record, 2 * TOL)
    manifest = export_run(out / "runs" / record.run_id, ["tflite"], out / "export", neither=False)
    assert manifest["refit"]
    got = predict_photos(out / "export", sorted((env["data"] / "test").glob("*.jpg")), "tflite")
    assert np.abs(got.sort_index().to_numpy() - submitted.to_numpy()).max() <= TOL


def _run(env, name: str, **fields):
    from catsdogs.runs.runner import run_experiment

    return run_experiment(_experiment(env, name, **fields), progress=False)


@pytest.mark.slow
def test_grouped_prior_runs_equal_runs_alone(env, monkeypatch):
    """``imagenet_prior`` runs join the grouped loop (never their own ``fit``) with
    ``dropout_sigmoid`` runs of the same blocks, each classifier's log-odds computed once per
    batch: every run ends with the weights, optimizer state and history of its fit alone, and
    ``predict_group`` gives its ``predict_proba``."""
    from catsdogs.builtin.heads import DropoutSigmoidHead
    from catsdogs.builtin.optimizers import AdadeltaOptimizer, AdamOptimizer
    from catsdogs.builtin.prior import ImageNetPriorHead
    from catsdogs.runs.multifit import Member, fit_group, predict_group

    other = OtherClassifier.name
    registry = env["registry"]
    pixels = _pixels(n=60, seed=3)
    Xa, la = _features_and_log_odds(registry.backbone(CLS), pixels)
    Xb, _ = _features_and_log_odds(registry.backbone(other), pixels)
    blocks = {CLS: Xa, other: Xb}
    y = (la > np.median(la)).astype(int)
    rows = np.random.default_rng(5).permutation(60)
    tr, va = np.sort(rows[:45]), np.sort(rows[45:])  # 45 rows at batch 8: the last one partial

    def members():
        return [Member(ImageNetPriorHead(weights="none"), AdamOptimizer(0.01), (CLS,)),
                Member(ImageNetPriorHead(weights="none"), AdadeltaOptimizer(1.0), (CLS, other)),
                Member(ImageNetPriorHead(dropout=0.3, weights="none"), AdamOptimizer(0.01),
                       (other, CLS)),
                Member(DropoutSigmoidHead(), AdamOptimizer(0.01), (CLS, other))]

    def fit_alone(member):
        fused = np.concatenate([blocks[b] for b in member.combination], axis=1)
        head = type(member.head)(**member.head.get_params())
        optimizer = type(member.optimizer)(learning_rate=member.optimizer.learning_rate)
        return head.fit(fused[tr], y[tr], validation=(fused[va], y[va]), optimizer=optimizer,
                        epochs=6, batch_size=8, seed=4,
                        blocks=[(b, blocks[b].shape[1]) for b in member.combination]), fused

    alone = [fit_alone(m) for m in members()]

    def not_here(*args, **kwargs):
        raise AssertionError("a grouped run was fitted alone")

    monkeypatch.setattr(ImageNetPriorHead, "fit", not_here)
    group = members()
    heads = fit_group(group, blocks, y, train_rows=tr, val_rows=va, epochs=6, batch_size=8, seed=4)
    monkeypatch.undo()
    predicted = predict_group(heads, [m.combination for m in group], blocks, va)
    for head, (single, fused), p in zip(heads, alone, predicted, strict=True):
        assert list(head.history_) == list(single.history_)
        for key in single.history_:
            np.testing.assert_allclose(head.history_[key], single.history_[key], atol=1e-6,
                                       rtol=1e-6, err_msg=key)
        for wa, wb in zip(head.model_.get_weights(), single.model_.get_weights(), strict=True):
            np.testing.assert_allclose(wa, wb, atol=1e-6, rtol=0)
        want = single.predict_proba(fused[va])
        np.testing.assert_allclose(head.predict_proba(fused[va]), want, atol=1e-6, rtol=0)
        np.testing.assert_allclose(p, want, atol=1e-6, rtol=0)
    prior = heads[1].model_.get_layer("prior_weight").get_weights()[0]
    assert not np.allclose(prior, 0.5, atol=1e-3)  # trained, not the initial 1 / 2 backbones


@pytest.mark.slow
def test_runner_ranks_prior_runs_the_same_grouped_or_not(env, monkeypatch):
    """A k-fold grid of ``imagenet_prior`` and ``dropout_sigmoid`` runs: the prior runs are
    trained in the group, and the leaderboard and test predictions equal those of every run
    fitted alone (``CATSDOGS_GROUPED_FIT=0``)."""
    import catsdogs.runs.multifit as multifit
    from catsdogs.runs.runner import run_experiment

    fields = dict(backbones=[CLS, OtherClassifier.name], heads=["dropout_sigmoid", "imagenet_prior"],
                  optimizers=[{"name": "adam", "learning_rate": 0.01},
                              {"name": "adadelta", "learning_rate": 1.0}],
                  validation={"kfold": 2}, tta=True)
    monkeypatch.setenv(multifit.GROUPED_ENV, "0")
    alone = run_experiment(_experiment(env, "prior-alone", **fields), progress=False)
    monkeypatch.delenv(multifit.GROUPED_ENV)
    grouped_ids: list[str] = []
    fit_grid = multifit.fit_grid

    def spy(*args, **kwargs):
        fitted = fit_grid(*args, **kwargs)
        grouped_ids.extend(fitted)
        return fitted

    monkeypatch.setattr(multifit, "fit_grid", spy)
    grouped = run_experiment(_experiment(env, "prior-grouped", **fields), progress=False)
    assert sum("imagenet_prior" in r for r in grouped_ids) == 6 and len(grouped_ids) == 12
    a, g = (pd.read_csv(r.out_dir / "leaderboard.csv") for r in (alone, grouped))
    assert a["run_id"].tolist() == g["run_id"].tolist()
    for column in ("val_logloss", "val_accuracy"):
        np.testing.assert_allclose(g[column], a[column], atol=1e-6, rtol=0, err_msg=column)
    for run_id in a["run_id"]:
        pa, pg = (pd.read_csv(r.out_dir / "runs" / run_id / "test_predictions.csv")
                  for r in (alone, grouped))
        np.testing.assert_allclose(pg["p_dog"], pa["p_dog"], atol=1e-6, rtol=0)


@pytest.mark.slow
def test_backbones_with_other_weights_each_give_their_own_classifier(env):
    """Backbones extracted with different weights: the runner gives the head ``weights`` as
    ``{backbone: weights}``, and each prior reads the classifier of its backbone's weights."""
    from catsdogs.app.export import load_head_file
    from catsdogs.builtin.prior import species_weights

    two = TwoWeightsClassifier.name
    result = _run(env, "two-weights", backbones=[{"name": CLS, "weights": "none"},
                                                 {"name": two, "weights": "alt"}],
                  combinations=[[CLS, two]], epochs=2)
    (record,) = result.records
    assert record.params["weights"] == {CLS: "none", two: "alt"}
    model = load_head_file(result.out_dir / "runs" / record.run_id / "head.keras")
    registry = env["registry"]
    for i, (name, weights) in enumerate(((CLS, "none"), (two, "alt"))):
        kernel, _ = model.get_layer(f"prior_{i}").get_weights()
        np.testing.assert_array_equal(kernel, species_weights(registry.backbone(name), weights)[0])
    assert not np.allclose(species_weights(registry.backbone(two), "alt")[0],
                           species_weights(registry.backbone(two), "none")[0])


def test_classifier_weights_that_cannot_be_had_fail_before_extraction(env):
    """A prior run's classifier whose weights are not at hand is built before any feature is
    extracted: a download that fails stops the experiment in seconds, with its message, and no
    feature file is written; classifiers at hand are left to the runs."""
    from catsdogs.runs.runner import fetch_classifiers, plan_runs, run_experiment

    cache = env["root"] / "cache-unreachable"
    exp = _experiment(env, "unreachable", cache_dir=str(cache),
                      backbones=[CLS, UnreachableClassifier.name],
                      heads=["dropout_sigmoid", "imagenet_prior"])
    UnreachableClassifier.built.clear()
    with pytest.raises(CatsdogsError, match="could not load 'none' weights for backbone "
                                            f"'{UnreachableClassifier.name}'"):
        run_experiment(exp, progress=False)
    assert UnreachableClassifier.built == ["none"]
    assert not [p for p in cache.rglob("*") if p.is_file()], "extraction began before the check"
    # at hand (TinyClassifier): nothing is built ahead of the runs
    at_hand = _experiment(env, "at-hand")
    assert fetch_classifiers(plan_runs(at_hand), at_hand, env["registry"]) == []


def test_a_finished_experiment_reruns_where_its_classifiers_cannot_be_had(env, monkeypatch):
    """Every prior run finished: rerun where the classifier's download fails (offline), the
    experiment resumes every run and fetches nothing; a run that must train still fetches its
    classifier before extraction."""
    from catsdogs.runs.runner import run_experiment

    offline = OfflineLaterClassifier.name
    exp = _experiment(env, "offline-later", backbones=[offline],
                      heads=["dropout_sigmoid", "imagenet_prior"])
    OfflineLaterClassifier.built.clear()
    first = run_experiment(exp, progress=False)
    assert OfflineLaterClassifier.built[:1] == ["none"]  # fetched before extraction, online
    monkeypatch.setattr(OfflineLaterClassifier, "online", False)
    OfflineLaterClassifier.built.clear()
    again = run_experiment(exp, progress=False)
    assert OfflineLaterClassifier.built == []
    assert [r.run_id for r in again.records] == [r.run_id for r in first.records]
    assert again.submission is not None
    (prior,) = [r for r in first.records if r.head.name == "imagenet_prior"]
    shutil.rmtree(first.out_dir / "runs" / prior.run_id)  # this one must train again
    with pytest.raises(CatsdogsError, match=f"could not load 'none' weights for backbone '{offline}'"):
        run_experiment(exp, progress=False)
    assert OfflineLaterClassifier.built == ["none"]
