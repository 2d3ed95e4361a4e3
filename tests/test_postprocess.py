"""Learned post-processing: the choice on synthetic predictions whose right answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from catsdogs.errors import ConfigError
from catsdogs.evaluation.metrics import PROB_EPS, log_loss, logit, sigmoid
from catsdogs.runs.postprocess import Transform, choose, fit


def _draw(n: int, scale: float, seed: int, spread: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from true probabilities q = sigmoid(z), z ~ N(0, spread); predictions
    sigmoid(scale * z). scale > 1: over-confident, scale < 1: under-confident, 1: calibrated.
    """
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, spread, n)
    y = (rng.random(n) < sigmoid(z)).astype(float)
    return y, sigmoid(scale * z)


def test_overconfident_predictions_are_softened_and_that_helps_on_fresh_data():
    y, p = _draw(800, 2.5, seed=1)
    choice = choose(y, p)
    assert choice.transform.kind == "temperature"
    assert 1.8 < choice.transform.temperature < 3.5  # the true answer is 2.5
    assert choice.logloss_post < choice.logloss_raw
    y_test, p_test = _draw(800, 2.5, seed=2)
    assert log_loss(y_test, choice.transform.apply(p_test)) < log_loss(y_test, p_test) - 0.02


def test_underconfident_predictions_are_sharpened():
    y, p = _draw(800, 0.5, seed=3)
    choice = choose(y, p)
    assert choice.transform.kind == "temperature"
    assert 0.35 < choice.transform.temperature < 0.7  # the true answer is 0.5


def test_confident_mistakes_are_clipped_when_clip_is_asked_for():
    rng = np.random.default_rng(4)
    y = (rng.random(600) < 0.5).astype(float)
    p = np.where(y == 1, 0.9999, 0.0001)
    wrong = rng.choice(600, 12, replace=False)
    p[wrong] = 1 - p[wrong]  # 2% confident mistakes: each costs ln(1e4) = 9.2 unclipped
    choice = choose(y, p, "clip")
    assert choice.transform.kind == "clip" and choice.transform.learned
    assert 0.005 < choice.transform.lo < 0.1 and choice.transform.hi == pytest.approx(1 - choice.transform.lo)
    assert choice.logloss_post < 0.7 * choice.logloss_raw
    auto = choose(y, p)
    assert auto.transform.kind in ("clip", "temperature") and auto.logloss_post < 0.7 * auto.logloss_raw


def test_calibrated_predictions_keep_none_and_false_choices_gain_nothing():
    """Null control: labels drawn from the predictions themselves; anything learned fits noise."""
    kept, gains = 0, []
    for seed in range(12):
        y, p = _draw(400, 1.0, seed=100 + seed, spread=1.5)
        choice = choose(y, p, seed=seed)
        kept += choice.transform.kind == "none"
        y_test, p_test = _draw(4000, 1.0, seed=200 + seed, spread=1.5)
        gains.append(log_loss(y_test, p_test) - log_loss(y_test, choice.transform.apply(p_test)))
    assert kept >= 10  # the one-standard-error rule keeps `none` on noise
    assert abs(np.mean(gains)) < 0.002  # and what it rarely picks changes nothing real


def test_the_small_sample_prior_regularises_the_fit_of_an_asked_for_clip():
    """200 validation rows, every one right at p = 1e-6 or 1 - 1e-6: no mistake is seen, yet one in
    a few hundred test photos may be (mislabelled, two animals). A clip that is asked for is fitted
    against Platt's targets, so it lands near 1/N instead of at the extreme."""
    y = np.repeat([0.0, 1.0], 100)
    p = np.where(y == 1, 1 - 1e-6, 1e-6)
    choice = choose(y, p, "clip")
    assert choice.transform.kind == "clip"
    assert 0.003 < choice.transform.apply([1e-6])[0] < 0.03
    assert 0.97 < choice.transform.apply([1 - 1e-6])[0] < 0.997
    assert choice.logloss_raw < 1e-5 < choice.logloss_post  # reported against the real labels


def test_auto_never_makes_the_ranking_worse_than_none_on_held_out_rows():
    """Issue 20 item 6: ``auto`` used to choose against the smoothed targets, so on confident,
    correct validation predictions it chose a clip near 1/N ("gain 0.023, z 4.9") although the
    clip's real cross-fitted log loss was far worse than the raw one, and the run was demoted.
    The choice is now made on the real log loss of held-out predictions."""
    y = np.repeat([0.0, 1.0], 20)  # 40 validation photos, as the bundled sample's demo
    p = np.where(y == 1, 1 - 1e-4, 1e-4)
    p[[0, 25]] = [0.3, 0.6]  # two hesitant but right
    choice = choose(y, p)
    assert choice.cv["clip"]["logloss"] > choice.cv["none"]["logloss"]  # the clip hurts held-out rows
    assert choice.transform.kind == "none"
    assert choice.logloss_post == choice.logloss_raw == pytest.approx(log_loss(y, p))
    # in general: the ranking number is never above the raw loss, whatever the predictions
    for seed in range(8):
        for scale in (0.7, 1.0, 3.0):
            yy, pp = _draw(120, scale, seed=500 + seed)
            c = choose(yy, pp, seed=seed)
            assert c.logloss_post <= c.logloss_raw + 1e-12
            assert c.cv[c.transform.kind]["logloss"] == c.logloss_post
            if c.transform.kind != "none":
                assert c.cv[c.transform.kind]["z"] > 1.0 and c.cv[c.transform.kind]["gain"] > 0


def test_val_post_are_the_rows_behind_the_ranking_number():
    y, p = _draw(300, 2.5, seed=14)
    choice = choose(y, p)
    assert choice.transform.kind == "temperature"
    assert log_loss(y, choice.val_post) == pytest.approx(choice.logloss_post, abs=1e-12)
    assert not np.allclose(choice.val_post, choice.transform.apply(p))  # cross-fitted, not in-sample


def test_auto_costs_next_to_nothing_on_calibrated_extreme_predictions():
    costs = []
    for seed in range(6):
        y_val, p_val = _draw(400, 1.0, seed=300 + seed, spread=4.0)
        t = choose(y_val, p_val, seed=seed).transform
        y_new, p_new = _draw(4000, 1.0, seed=400 + seed, spread=4.0)
        costs.append(log_loss(y_new, t.apply(p_new)) - log_loss(y_new, p_new))
    assert np.mean(costs) < 0.003  # calibrated extreme predictions: auto costs next to nothing


def test_label_shuffled_control_gains_nothing_on_true_labels():
    """A transform chosen on shuffled validation labels carries no label information: applied to a
    fresh test set with its true labels it must not beat the raw predictions."""
    y, p = _draw(600, 1.6, seed=7)  # mildly over-confident: a real gain exists with real labels
    y_test, p_test = _draw(3000, 1.6, seed=8)
    real = choose(y, p)
    assert log_loss(y_test, real.transform.apply(p_test)) < log_loss(y_test, p_test)
    shuffled = choose(np.random.default_rng(9).permutation(y), p)
    assert log_loss(y_test, shuffled.transform.apply(p_test)) >= log_loss(y_test, p_test)


def test_ranking_loss_is_cross_fitted_not_in_sample():
    y, p = _draw(300, 2.0, seed=11)
    choice = choose(y, p, "temperature")
    assert choice.cv["temperature"]["logloss"] == choice.logloss_post
    # the loss of the transform on the rows it was fitted on is optimistic; it is recorded, not ranked
    assert choice.logloss_post_insample <= choice.logloss_post


def test_fixed_clip_means_exactly_that_clip_and_is_deterministic():
    y, p = _draw(300, 2.0, seed=12)
    choice = choose(y, p, "clip", clip_bounds=(0.005, 0.995))
    assert choice.transform == Transform("clip", lo=0.005, hi=0.995, learned=False)
    assert choice.logloss_post == pytest.approx(log_loss(y, np.clip(p, 0.005, 0.995)))
    assert choose(y, p, seed=3).to_dict() == choose(y, p, seed=3).to_dict()


def test_none_and_roundtrip_and_errors():
    y, p = _draw(200, 3.0, seed=13)
    assert choose(y, p, "none").transform.kind == "none"
    t = fit("temperature", y, p)
    assert Transform.from_dict(t.to_dict()) == t
    np.testing.assert_allclose(t.apply(p), sigmoid(logit(p) / t.temperature))
    with pytest.raises(ConfigError, match="postprocess"):
        choose(y, p, "platt")
    with pytest.raises(ConfigError, match="clip bounds"):
        fit("clip", y, p, (0.9, 0.1))


def test_too_few_rows_of_a_class_learns_nothing():
    y = np.array([0, 1, 1, 1, 1, 1.0])
    p = np.array([0.01, 0.99, 0.99, 0.99, 0.99, 0.2])
    assert choose(y, p).transform.kind == "none"
    assert choose(y, p, "temperature").transform.kind == "none"


def test_the_exported_graph_takes_the_same_logit_as_numpy():
    """The export's logit clips with the same constant and gives a saturated P(dog) of 1.0
    NumPy's float64 logit (it took logit(1 - 1e-12) in exact arithmetic before, 2e-5 off)."""
    pytest.importorskip("keras")
    from keras import ops

    from catsdogs.app.graph import PostProcess
    from catsdogs.app.graph import logit as graph_logit

    p = np.array([1.0, 0.0, 0.5, 0.9, 1e-13], dtype=np.float32)
    z = np.asarray(ops.convert_to_numpy(graph_logit(ops.convert_to_tensor(p))))
    assert z[0] == np.float32(logit(1.0))  # the float64 value, rounded once
    np.testing.assert_allclose(z[1:], logit(p[1:].astype(np.float64)), rtol=1e-6)
    t = Transform("temperature", temperature=1.7)
    out = ops.convert_to_numpy(PostProcess("temperature", temperature=1.7)(p[:, None]))[:, 0]
    np.testing.assert_allclose(out, t.apply(p.astype(np.float64)), rtol=1e-6)


#: float32 P(dog) of a saturated head: exactly 1.0 and 0.0, a float32 denormal-free tiny value,
#: values a float32 sigmoid does give, and the largest float32 below 1
SATURATED = np.array([1.0, 0.0, 1e-30, 0.5, 0.9, 1e-6, np.float32(1.0 - 2.0 ** -24)],
                     dtype=np.float32)


def _transforms() -> list[Transform]:
    return [Transform("none"), Transform("clip", lo=0.0, hi=1.0, learned=True),
            Transform("clip", lo=0.005, hi=0.995),
            Transform("temperature", temperature=1.37, learned=True),
            Transform("temperature", temperature=0.5, learned=True)]


def test_every_transform_keeps_p_within_float32_resolution_of_0_and_1():
    """A float32 sigmoid is exactly 1.0 above a logit of about 17, and a log loss clipped at 1e-15
    scores that 1.0 on a cat at 34.5 nats, while a dog's P can go down to 1e-30 (69 nats) or stop
    anywhere: every transform, none included, bounds its output to [2^-24, 1 - 2^-24], so one
    confident mistake costs at most 24 ln 2 = 16.6 nats on either side."""
    p = SATURATED.astype(np.float64)
    cat_at_one = log_loss([0.0], [1.0])
    assert cat_at_one == pytest.approx(-np.log(1e-15), rel=1e-4)
    for t in _transforms():
        out = t.apply(p)
        assert out.min() >= PROB_EPS and out.max() <= 1.0 - PROB_EPS, t
        assert log_loss([0.0], t.apply([1.0])) <= 24 * np.log(2.0) + 1e-9 < cat_at_one / 2, t
        assert log_loss([1.0], t.apply([0.0])) <= 24 * np.log(2.0) + 1e-9, t
    none = Transform("none").apply(p)
    assert none[0] == 1.0 - 2.0 ** -24 and none[1] == none[2] == 2.0 ** -24
    np.testing.assert_array_equal(none[3:], p[3:])  # inside the bound: unchanged


def test_the_bound_is_recorded_and_old_records_keep_their_unbounded_transform():
    """A transform recorded before the bound existed (no ``bound`` key) applies none, so an old
    run's export still gives its old submission; new ones record and reload theirs."""
    for t in _transforms():
        d = t.to_dict()
        assert d["bound"] == PROB_EPS and Transform.from_dict(d) == t
        old = Transform.from_dict({k: v for k, v in d.items() if k != "bound"})
        assert old.bound == 0.0
        if t.kind == "none" or t.learned and t.kind == "clip":
            assert old.apply([1.0, 0.0]).tolist() == [1.0, 0.0]
    assert Transform.from_dict({"kind": "none"}).apply([1.0, 0.0]).tolist() == [1.0, 0.0]
    with pytest.raises(ConfigError, match="bound"):
        Transform.from_dict({"kind": "none", "bound": 0.5})


def test_auto_and_the_ranking_number_see_the_bounded_none():
    """The ranking number of ``none`` is the loss of the bounded predictions (a saturated cat
    scores 16.6 nats, not 34.5), and a learned transform is judged against that, not the raw."""
    y, p = _draw(400, 4.0, seed=21)
    p = p.astype(np.float32).astype(np.float64)
    p[0], y[0] = 1.0, 0.0  # one saturated mistake
    choice = choose(y, p, "none")
    assert choice.logloss_post == pytest.approx(log_loss(y, np.clip(p, PROB_EPS, 1 - PROB_EPS)))
    assert choice.logloss_raw == pytest.approx(log_loss(y, p))
    assert choice.logloss_raw - choice.logloss_post == pytest.approx(
        (log_loss([0.0], [1.0]) - 24 * np.log(2.0)) / len(y), rel=1e-3)
    auto = choose(y, p)
    assert auto.cv["none"]["logloss"] == pytest.approx(choice.logloss_post)
    assert auto.cv["none"]["gain"] == 0.0


def test_the_exported_layer_bounds_exactly_as_the_runner_does():
    """PostProcess in float32 gives the bounded numbers NumPy gives in float64, bit for bit at the
    bound (2^-24 and 1 - 2^-24 are float32 numbers); a layer saved before the bound loads
    without one."""
    pytest.importorskip("keras")
    from keras import ops

    from catsdogs.app.graph import PostProcess

    for t in _transforms():
        layer = PostProcess(t.kind, t.lo, t.hi, t.temperature, t.bound)
        out = ops.convert_to_numpy(layer(SATURATED[:, None]))[:, 0].astype(np.float64)
        expected = t.apply(SATURATED.astype(np.float64))
        at_bound = (expected == PROB_EPS) | (expected == 1.0 - PROB_EPS)
        assert at_bound.any() or t.lo == 0.005, t
        np.testing.assert_array_equal(out[at_bound], expected[at_bound])
        np.testing.assert_allclose(out, expected, rtol=1e-6)
        config = layer.get_config()
        assert PostProcess.from_config(config).bound == PROB_EPS
    old = PostProcess.from_config({k: v for k, v in PostProcess("none").get_config().items()
                                   if k != "bound"})
    assert old.bound == 0.0
    assert ops.convert_to_numpy(old(SATURATED[:2, None]))[:, 0].tolist() == [1.0, 0.0]
