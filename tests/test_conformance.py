"""The conformance suite (catsdogs.testing) on the built-in components, and proof that it can fail."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from catsdogs.builtin.heads import DropoutSigmoidHead  # noqa: E402
from catsdogs.components import Backbone, Head, Optimizer  # noqa: E402
from catsdogs.plugins import get_registry  # noqa: E402
from catsdogs.testing import (  # noqa: E402
    check_backbone,
    check_head,
    check_head_keras_model,
    check_head_not_fitted,
    check_optimizer,
    checks_for,
    make_separable_features,
    parametrize_with_checks,
)
from catsdogs.validation import NotFittedError  # noqa: E402

REGISTRY = get_registry()


# -- the built-in components pass ------------------------------------------------------------------
@pytest.mark.parametrize("name", REGISTRY.names("heads"))
def test_builtin_head_conforms(name):
    check_head(REGISTRY.head(name))


@pytest.mark.parametrize("name", REGISTRY.names("optimizers"))
def test_builtin_optimizer_conforms(name):
    check_optimizer(REGISTRY.optimizer(name))


@pytest.mark.slow
@pytest.mark.parametrize("name", REGISTRY.names("backbones"))
def test_builtin_backbone_conforms(name):
    check_backbone(REGISTRY.backbone(name))


def test_builtins_are_all_checked():
    assert set(REGISTRY.names("heads")) >= {"dropout_sigmoid", "softmax_cam"}
    assert set(REGISTRY.names("optimizers")) >= {"adam", "adadelta"}
    assert len(REGISTRY.names("backbones")) >= 4
    assert not REGISTRY.failures


# -- backbones ---------------------------------------------------------------------------------------
class TinyBackbone(Backbone):
    """A conforming toy backbone: rescale -> conv -> gap."""

    name = "tiny"
    input_size = 16
    min_input_size = 8
    feature_dim = 6
    preprocessing = "x / 255"
    filters = 6
    input_name = "image"
    gap_name = "gap"

    def build_model(self, weights, image_size):
        import keras

        image = keras.Input((image_size, image_size, 3), name=self.input_name)
        x = keras.layers.Rescaling(1 / 255)(image)
        x = keras.layers.Conv2D(self.filters, 3, activation="tanh", name="conv")(x)
        x = self.extra(x)
        return keras.Model(image, keras.layers.GlobalAveragePooling2D(name=self.gap_name)(x))

    def extra(self, x):
        return x


class WrongDimension(TinyBackbone):
    filters = 7


class NoGap(TinyBackbone):
    gap_name = "pool"


class WrongInputName(TinyBackbone):
    input_name = "pixels"


class Unseeded(TinyBackbone):
    def build(self, weights="none", image_size=None):
        return self.build_model(weights, image_size or self.input_size)


class AcceptsTooSmall(TinyBackbone):
    def check_image_size(self, image_size):
        pass


class BatchDependent(TinyBackbone):
    def extra(self, x):
        import keras

        return keras.layers.Lambda(lambda t: t - keras.ops.mean(t, axis=0, keepdims=True))(x)


class BadName(TinyBackbone):
    name = "Tiny-Net"


class NoNoneWeights(TinyBackbone):
    weights_options = ("imagenet",)


def test_tiny_backbone_conforms():
    check_backbone(TinyBackbone())
    check_backbone(TinyBackbone(), image_size=12)


@pytest.mark.parametrize(
    "backbone, message",
    [
        (WrongDimension(), r"output shape must be \(None, feature_dim=6\), got \(None, 7\)"),
        (NoGap(), "no layer named 'gap'"),
        (WrongInputName(), "input must be named 'image', got 'pixels'"),
        (Unseeded(), "different weights"),
        (AcceptsTooSmall(), r"check_image_size\(min_input_size - 1 = 7\) must raise ConfigError"),
        (BatchDependent(), "depend on the rest of the batch"),
        (BadName(), "invalid name"),
        (NoNoneWeights(), "must include 'none'"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Backbone) else "",
)
def test_check_backbone_catches(backbone, message):
    with pytest.raises(AssertionError, match=message) as info:
        check_backbone(backbone)
    assert "backbone" in str(info.value) and type(backbone).__name__ in str(info.value)


# -- heads ---------------------------------------------------------------------------------------------
class CentroidHead(Head):
    """A conforming non-Keras head: logistic function of the nearest-centroid margin."""

    name = "centroid"
    uses_optimizer = False

    def __init__(self, scale=1.0):
        self.scale = scale

    def fit(self, X, y, *, validation=None, optimizer=None, epochs=8, batch_size=128,
            seed=2019, verbose=0, blocks=None):
        X, y = np.asarray(X, np.float64), np.asarray(y)
        c0, c1 = X[y == 0].mean(axis=0), X[y == 1].mean(axis=0)
        self.w_ = (c1 - c0) * self.scale
        self.b_ = -(c1 @ c1 - c0 @ c0) / 2 * self.scale
        self.history_ = {}
        return self

    def predict_proba(self, X):
        if not hasattr(self, "w_"):
            raise NotFittedError("head not fitted; call fit() first")
        return 1.0 / (1.0 + np.exp(-(np.asarray(X, np.float64) @ self.w_ + self.b_)))


class CentroidKerasHead(CentroidHead):
    """Also exports a Keras model."""

    name = "centroid_keras"
    bias_error = 0.0

    def keras_model(self):
        import keras

        features = keras.Input((len(self.w_),), name="features")
        dense = keras.layers.Dense(1, activation="sigmoid", name="prediction")
        model = keras.Model(features, dense(features))
        dense.set_weights([self.w_[:, None], np.array([self.b_ + self.bias_error])])
        return model


class ColumnShaped(CentroidHead):
    def predict_proba(self, X):
        return super().predict_proba(X)[:, None]


class OutOfRange(CentroidHead):
    def predict_proba(self, X):
        return super().predict_proba(X) * 2


class Unreproducible(CentroidHead):
    def fit(self, X, y, **kwargs):
        super().fit(X, y, **kwargs)
        self.w_ = self.w_ * np.random.default_rng().uniform(0.5, 2.0)
        return self


class ChangesArguments(CentroidHead):
    def __init__(self, scale=1.0):
        self.scale = float(scale) * 2


class FitReturnsNone(CentroidHead):
    def fit(self, X, y, **kwargs):
        super().fit(X, y, **kwargs)


class PredictsBeforeFit(CentroidHead):
    w_ = np.zeros(16)
    b_ = 0.0


class WrongNotFittedError(CentroidHead):
    def predict_proba(self, X):
        if not hasattr(self, "w_"):
            raise RuntimeError("not fitted")
        return super().predict_proba(X)


def _predicts_anyway(self, X):
    return np.full(len(X), 0.5)


class PatchedAfterDefinition(CentroidHead):
    """predict_proba replaced after the class was made, past Head.__init_subclass__'s guard."""


PatchedAfterDefinition.predict_proba = _predicts_anyway


class BadSearchSpace(CentroidHead):
    @classmethod
    def search_space(cls, hp):
        hp.Float("scael", 0.5, 2.0)


class LambdaKerasHead(CentroidKerasHead):
    """Its Keras model holds a Lambda layer, which Keras' safe mode refuses to load."""

    def keras_model(self):
        import keras

        model = super().keras_model()
        out = keras.layers.Lambda(lambda t: t * 1.0, name="identity")(model.outputs[0])
        return keras.Model(model.inputs, out)


class Constant(CentroidHead):
    def predict_proba(self, X):
        super().predict_proba(X)
        return np.full(len(X), 0.5)


class KerasMismatch(CentroidKerasHead):
    bias_error = 0.5


class KerasColumnShaped(DropoutSigmoidHead):
    name = "broken_sigmoid"

    def predict_proba(self, X):
        return super().predict_proba(X)[:, None]


@pytest.mark.parametrize("head_cls", [CentroidHead, CentroidKerasHead])
def test_non_keras_heads_conform(head_cls):
    check_head(head_cls)


@pytest.mark.parametrize(
    "head_cls, message",
    [
        (ColumnShaped, r"must return shape \(n,\) = \(200,\), got \(200, 1\)"),
        (OutOfRange, r"probabilities in \[0, 1\]"),
        (Unreproducible, "same seed give different predictions"),
        (ChangesArguments, "must store argument 'scale' unchanged"),
        (FitReturnsNone, "fit\\(\\) must return self"),
        (PatchedAfterDefinition, "before fit\\(\\) must raise catsdogs.validation.NotFittedError; "
                                 "nothing was raised"),
        (Constant, "training accuracy on a linearly separable problem is 0.5"),
        (KerasMismatch, "keras_model\\(\\) output differs from predict_proba"),
        (KerasColumnShaped, r"must return shape \(n,\)"),
        (BadSearchSpace, "search_space\\(\\): head 'centroid' declares the tunable hyper-parameter "
                         "'scael', which is not one of its parameters"),
        (LambdaKerasHead, "does not survive a .keras save/load round trip"),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else "",
)
def test_check_head_catches(head_cls, message):
    with pytest.raises(AssertionError, match=message) as info:
        check_head(head_cls)
    assert str(info.value).startswith(f"head {head_cls.name!r}")


def test_make_separable_features():
    X, y = make_separable_features(n=50, d=5, seed=1)
    assert X.shape == (50, 5) and X.dtype == np.float32
    assert set(np.unique(y)) == {0, 1}
    X2, y2 = make_separable_features(n=50, d=5, seed=1)
    assert np.array_equal(X, X2) and np.array_equal(y, y2)


# -- optimizers ----------------------------------------------------------------------------------------
class SGDOptimizer(Optimizer):
    name = "sgd_test"
    default_learning_rate = 0.01

    def build(self):
        import keras

        return keras.optimizers.SGD(learning_rate=self.effective_learning_rate)


class CachesOptimizer(SGDOptimizer):
    def build(self):
        if not hasattr(self, "_built"):
            self._built = super().build()
        return self._built


class IgnoresLearningRate(SGDOptimizer):
    def build(self):
        import keras

        return keras.optimizers.SGD()


class NoDefault(SGDOptimizer):
    default_learning_rate = 0.0


class Frozen(SGDOptimizer):
    def build(self):
        import keras

        class FrozenSGD(keras.optimizers.SGD):
            def update_step(self, gradient, variable, learning_rate):
                pass

        return FrozenSGD(learning_rate=self.effective_learning_rate)


class NotKeras(SGDOptimizer):
    def build(self):
        return object()


def test_custom_optimizer_conforms():
    check_optimizer(SGDOptimizer)


@pytest.mark.parametrize(
    "optimizer_cls, message",
    [
        (CachesOptimizer, "must return a new optimizer on every call"),
        (IgnoresLearningRate, "build\\(\\) has learning_rate 0.01, expected 0.05$"),
        (NoDefault, "default_learning_rate must be a positive number"),
        (Frozen, "did not change the weights"),
        (NotKeras, "must return a keras.optimizers.Optimizer"),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else "",
)
def test_check_optimizer_catches(optimizer_cls, message):
    with pytest.raises(AssertionError, match=message) as info:
        check_optimizer(optimizer_cls)
    assert str(info.value).startswith("optimizer 'sgd_test'")


# -- scikit-learn-grained: one named check per property --------------------------------------------
@parametrize_with_checks([CentroidHead, CentroidKerasHead, SGDOptimizer, TinyBackbone()], epochs=5)
def test_parametrize_with_checks(component, check):
    check(component)


def test_parametrize_with_checks_names_one_test_per_property():
    mark = parametrize_with_checks([TinyBackbone(), CentroidHead, SGDOptimizer], image_size=8)
    ids = [p.id for p in mark.args[1]]
    assert ids[:6] == ["tiny-check_backbone_attributes", "tiny-check_backbone_weights_ids",
                       "tiny-check_backbone_rejects_bad_arguments", "tiny-check_backbone_model",
                       "tiny-check_backbone_deterministic", "tiny-check_backbone_classifier"]
    assert "centroid-check_head_not_fitted" in ids and "centroid-check_head_keras_model" in ids
    assert "sgd_test-check_optimizer_trains" in ids and len(ids) == 6 + 7 + 4
    with pytest.raises(TypeError, match="unknown check options"):
        list(checks_for(CentroidHead, epoch=3))
    with pytest.raises(TypeError, match="not a Backbone instance"):
        list(checks_for(TinyBackbone))  # the class, not an instance


def test_one_check_fails_alone():
    check_head_keras_model(PatchedAfterDefinition)  # its Keras side is fine (it has none)
    with pytest.raises(AssertionError, match="must raise catsdogs.validation.NotFittedError"):
        check_head_not_fitted(PatchedAfterDefinition)


# -- the contract is enforced by Head, and old plugins keep working (docs/plugins.md) ------------
class LastMonthHead(Head):
    """A third-party head written from the contract-1 README: scikit-learn style, ``fit`` sets
    ``self.model_`` and ``predict_proba`` uses it with no check of its own (before fit that is an
    AttributeError inside), and ``fit`` predates the ``blocks`` argument."""

    name = "last_month_logreg"
    uses_optimizer = False

    def __init__(self, C=1.0):
        self.C = C

    def fit(self, X, y, *, validation=None, optimizer=None, epochs=8, batch_size=128,
            seed=2019, verbose=0):
        from sklearn.linear_model import LogisticRegression

        self.model_ = LogisticRegression(C=self.C).fit(X, y)
        self.history_ = {}
        return self

    def predict_proba(self, X):
        return self.model_.predict_proba(X)[:, 1]


def test_a_contract_1_head_passes_the_checks():
    check_head(LastMonthHead)
    with pytest.raises(NotFittedError, match=r"head 'last_month_logreg' \(.*LastMonthHead\): "
                                             r"predict_proba\(\) before fit\(\)"):
        LastMonthHead().predict_proba(np.zeros((2, 16)))


def test_heads_that_check_fitted_state_badly_are_guarded_too():
    """Whatever a head does before fit (answers from class attributes, raises RuntimeError), the
    base class answers NotFittedError first, so the check passes."""
    for head_cls in (PredictsBeforeFit, WrongNotFittedError):
        check_head_not_fitted(head_cls)
        with pytest.raises(NotFittedError):
            head_cls().predict_proba(np.zeros((2, 16)))


def test_a_contract_1_fit_without_blocks_warns_naming_the_plugin_and_still_trains():
    from catsdogs.components import CONTRACT_VERSION, PluginContractWarning

    with pytest.warns(PluginContractWarning) as caught:
        class OldFit(LastMonthHead):
            def fit(self, X, y, *, validation=None, optimizer=None, epochs=8, batch_size=128,
                    seed=2019, verbose=0):
                return super().fit(X, y)
    message = str(caught[0].message)
    assert f"plugin module {__name__!r}" in message and "OldFit" in message
    assert "`blocks`" in message and f"contract {CONTRACT_VERSION + 1}" in message
    X, y = make_separable_features(n=60, d=4)
    head = OldFit().fit(X, y, blocks=[("a", 2), ("b", 2)])  # what the runner passes
    assert head.predict_proba(X).shape == (60,)


def test_grouped_training_and_pickling_keep_a_head_fitted():
    """Fitted state set without fit() (multifit's _set_fitted) or restored by pickle counts."""
    import pickle

    X, y = make_separable_features(n=60, d=4)
    head = CentroidHead().fit(X, y)
    again = pickle.loads(pickle.dumps(head))
    assert np.allclose(again.predict_proba(X), head.predict_proba(X))
    bare = CentroidHead()
    bare.w_, bare.b_ = head.w_, head.b_
    assert np.allclose(bare.predict_proba(X), head.predict_proba(X))


def test_keras_heads_survive_a_save_load_round_trip():
    for name in ("dropout_sigmoid", "softmax_cam"):
        check_head_keras_model(REGISTRY.head(name), epochs=2)


class ClaimsClassifier(TinyBackbone):
    has_classifier = True


def test_check_backbone_catches_a_missing_classifier():
    with pytest.raises(AssertionError, match="has_classifier is True but there is no build_classifier"):
        check_backbone(ClaimsClassifier())


class OwnFeaturesClassifier(TinyBackbone):
    """A classifier whose network is not build()'s (other filters, other seed): its logits would
    not be a function of the cached features."""

    has_classifier = True

    def build_classifier(self, weights="none", image_size=None, with_features=False):
        import keras

        size = self.input_size if image_size is None else image_size
        image = keras.Input((size, size, 3), name="image")
        x = keras.layers.Rescaling(1 / 255)(image)
        x = keras.layers.Conv2D(self.filters, 3, activation="tanh", name="other_conv")(x)
        gap = keras.layers.GlobalAveragePooling2D(name="gap")(x)
        logits = keras.layers.Dense(1000, name="logits")(gap)
        return keras.Model(image, {"features": gap, "logits": logits} if with_features else logits)


def test_check_backbone_catches_a_classifier_on_other_features():
    from catsdogs.testing import TinyClassifier, check_backbone_classifier

    check_backbone_classifier(TinyClassifier())
    check_backbone_classifier(TinyBackbone())  # no capability: nothing to check
    with pytest.raises(AssertionError, match="the classifier's features must be build"):
        check_backbone_classifier(OwnFeaturesClassifier())


def test_check_backbone_catches_a_classifier_that_skips_the_size_check():
    """A classifier must refuse what build() refuses (Backbone.checked_size), before building."""
    from catsdogs.testing import TinyClassifier, check_backbone_rejects_bad_arguments

    class UncheckedSize(TinyClassifier):
        def build_classifier(self, weights="none", image_size=None, with_features=False):
            self.check_weights(weights)
            with self.seeded_for(weights):
                return self._build(image_size or self.input_size, with_features)

    check_backbone_rejects_bad_arguments(TinyClassifier())
    with pytest.raises(AssertionError, match=r"build_classifier\('none', min_input_size - 1 = 7\) "
                                             "must raise ConfigError"):
        check_backbone_rejects_bad_arguments(UncheckedSize())


PLUGIN_REPO_TEST = """
import numpy as np
from catsdogs.components import Head
from catsdogs.testing import parametrize_with_checks
from catsdogs.validation import NotFittedError


class Centroid(Head):
    name = "centroid"
    uses_optimizer = False

    def __init__(self, scale=1.0):
        self.scale = scale

    def fit(self, X, y, **kwargs):
        X, y = np.asarray(X, np.float64), np.asarray(y)
        self.w_ = (X[y == 1].mean(0) - X[y == 0].mean(0)) * self.scale
        self.b_ = -(self.w_ @ (X[y == 1].mean(0) + X[y == 0].mean(0))) / 2
        self.history_ = {}
        return self

    def predict_proba(self, X):
        if not hasattr(self, "w_"):
            raise NotFittedError("fit first")
        return 1 / (1 + np.exp(-(np.asarray(X, np.float64) @ self.w_ + self.b_)))


@parametrize_with_checks([Centroid])
def test_conformance(component, check):
    check(component)


def test_fixtures(catsdogs_kaggle_dir, catsdogs_cache_dir, catsdogs_separable_features,
                  catsdogs_registry, catsdogs_run_cli):
    import os

    assert len(list((catsdogs_kaggle_dir / "train").glob("*.jpg"))) == 12
    assert os.environ["CATSDOGS_CACHE_DIR"] == str(catsdogs_cache_dir)
    X, y = catsdogs_separable_features
    assert X.shape[0] == len(y)
    assert "dropout_sigmoid" in catsdogs_registry.names("heads")
    proc = catsdogs_run_cli("plugins", "--json")
    assert proc.returncode == 0 and '"heads"' in proc.stdout
"""


@pytest.mark.slow
def test_fixtures_ship_as_a_pytest_plugin(tmp_path):
    """A plugin repository with no conftest.py gets the fixtures through the pytest11 entry point."""
    import subprocess
    import sys

    (tmp_path / "test_plugin_repo.py").write_text(PLUGIN_REPO_TEST)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "test_plugin_repo.py"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "8 passed" in proc.stdout, proc.stdout  # 7 head checks + the fixtures test
