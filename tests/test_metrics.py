"""Log loss, accuracy, clipping, the choice of clip bounds, logit / sigmoid (catsdogs.evaluation.metrics)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import log_loss as sk_log_loss

from catsdogs.errors import ConfigError, DataError
from catsdogs.evaluation.metrics import (
    DEFAULT_CLIP_GRID,
    LOGIT_EPS,
    accuracy,
    best_clip,
    clip,
    cross_entropy,
    log_loss,
    logit,
    logit_cross_entropy,
    row_log_losses,
    sigmoid,
    summarize,
)


def test_log_loss_hand_computed():
    assert log_loss([1, 0], [0.9, 0.2]) == pytest.approx(-(math.log(0.9) + math.log(0.8)) / 2)
    assert log_loss([1], [0.5]) == pytest.approx(math.log(2))
    assert log_loss([0, 0, 1], [0.5, 0.5, 0.5]) == pytest.approx(math.log(2))


def test_log_loss_matches_sklearn():
    rng = np.random.default_rng(0)
    for n in (1, 7, 500):
        y = rng.integers(0, 2, n)
        p = rng.uniform(0.001, 0.999, n)
        assert log_loss(y, p) == pytest.approx(sk_log_loss(y, p, labels=[0, 1]), rel=1e-12)
    y = np.array([1, 0, 1, 0])
    p = np.array([1e-9, 1 - 1e-9, 0.3, 0.7])  # confident mistakes, still above the clip
    assert log_loss(y, p) == pytest.approx(sk_log_loss(y, p), rel=1e-9)


def test_log_loss_extremes_are_clipped_at_eps():
    # a certain mistake costs -ln(1e-15), not infinity; a certain hit costs ~0
    assert log_loss([1], [0.0]) == pytest.approx(-math.log(1e-15))
    assert log_loss([0], [1.0]) == pytest.approx(-math.log(1e-15), rel=1e-3)
    assert log_loss([1, 0], [1.0, 0.0]) == pytest.approx(0.0, abs=1e-14)
    assert log_loss([1, 0], [1.0, 0.0], eps=0) == 0.0
    assert math.isinf(log_loss([1], [0.0], eps=0))
    assert log_loss([1], [0.0], eps=0.01) == pytest.approx(-math.log(0.01))


@pytest.mark.parametrize(
    ("y", "p", "match"),
    [
        ([], [], "empty"),
        ([1, 0], [0.5], "2 labels but 1 probabilities"),
        ([1, 2], [0.5, 0.5], "labels must be 0 or 1"),
        ([1, 0], [0.5, np.nan], "finite"),
        ([1, 0], [0.5, 1.5], r"in \[0, 1\]"),
        ([1, 0], [-0.1, 0.5], r"in \[0, 1\]"),
    ],
)
def test_log_loss_rejects_bad_input(y, p, match):
    with pytest.raises(DataError, match=match):
        log_loss(y, p)


def test_accuracy():
    assert accuracy([1, 0, 1, 0], [0.9, 0.2, 0.4, 0.6]) == 0.5
    assert accuracy([1, 0], [0.9, 0.1]) == 1.0
    assert accuracy([1, 0], [0.5, 0.5]) == 0.5  # 0.5 is not above the threshold: a cat
    assert accuracy([1, 0], [0.7, 0.7], threshold=0.8) == 0.5


def test_clip():
    out = clip([0.0, 0.3, 1.0], 0.05, 0.95)
    assert out.dtype == np.float64 and out.tolist() == [0.05, 0.3, 0.95]
    with pytest.raises(ConfigError, match="0 <= lo < hi <= 1"):
        clip([0.5], 0.6, 0.4)
    with pytest.raises(ConfigError):
        clip([0.5], -0.1, 0.9)


def test_default_grid():
    assert DEFAULT_CLIP_GRID[0] == 0.0 and len(DEFAULT_CLIP_GRID) == 61
    assert DEFAULT_CLIP_GRID[1] == pytest.approx(1e-5) and DEFAULT_CLIP_GRID[-1] == pytest.approx(0.1)


def test_best_clip_prefers_larger_eps_with_confident_mistakes():
    # 90 confident hits at 0.999 / 0.001 and 10 confident mistakes at 0.999 for a cat.
    # With clipping at eps, loss(eps) = (90 * -ln(1 - eps) + 10 * -ln(eps)) / 100, minimised
    # at eps = 10 / 100 = 0.1 (the mistake rate).
    y = np.array([1] * 45 + [0] * 45 + [0] * 10)
    p = np.array([0.999] * 45 + [0.001] * 45 + [0.999] * 10)
    lo, hi, loss = best_clip(y, p, grid=[0.0, 0.001, 0.01, 0.05, 0.1, 0.2, 0.3])
    assert (lo, hi) == (0.1, 0.9)
    assert loss == pytest.approx(-(90 * math.log(0.9) + 10 * math.log(0.1)) / 100)
    assert loss < log_loss(y, p)
    # the default grid reaches close to the optimum too
    lo, hi, loss_default = best_clip(y, p)
    assert lo == pytest.approx(0.1) and hi == pytest.approx(0.9)
    assert loss_default == pytest.approx(loss)


def test_best_clip_never_worse_than_no_clipping():
    rng = np.random.default_rng(1)
    for _ in range(20):
        y = rng.integers(0, 2, 50)
        p = rng.uniform(0, 1, 50) ** rng.uniform(0.2, 5)
        lo, hi, loss = best_clip(y, p)
        assert hi == pytest.approx(1 - lo)
        assert loss <= log_loss(y, p) + 1e-15
        assert loss == pytest.approx(log_loss(y, clip(p, lo, hi)))
    # well-calibrated, never-wrong predictions are best left alone; 0 is tried even if not given
    y = np.array([1, 0, 1, 0])
    p = np.array([0.99999, 0.00001, 0.99999, 0.00001])
    assert best_clip(y, p, grid=[0.01, 0.1])[0] == 0.0


def test_best_clip_rejects_bad_grid():
    with pytest.raises(ConfigError, match="grid"):
        best_clip([1, 0], [0.5, 0.5], grid=[0.6])
    with pytest.raises(ConfigError, match="grid"):
        best_clip([1, 0], [0.5, 0.5], grid=[-0.01])


def test_summarize():
    y = [1, 0, 1, 0]
    p = [0.9, 0.2, 0.001, 0.6]
    s = summarize(y, p, (0.05, 0.95))
    assert set(s) == {"logloss", "logloss_clipped", "accuracy", "best_clip_lo", "best_clip_hi",
                      "best_clip_logloss", "n"}
    assert s["n"] == 4 and s["accuracy"] == 0.5
    assert s["logloss"] == pytest.approx(log_loss(y, p))
    assert s["logloss_clipped"] == pytest.approx(log_loss(y, [0.9, 0.2, 0.05, 0.6]))
    assert s["best_clip_logloss"] <= s["logloss"]
    assert s["best_clip_hi"] == pytest.approx(1 - s["best_clip_lo"])
    assert all(isinstance(v, float) for k, v in s.items() if k != "n")
    assert summarize(y, p, None)["logloss_clipped"] == s["logloss"]


# ------------------------------------------------------------------------------------ item 8
def test_paired_bootstrap_is_deterministic_and_matches_the_textbook_standard_error():
    from catsdogs.evaluation.metrics import paired_bootstrap

    rng = np.random.default_rng(0)
    base = rng.exponential(0.1, 2000)  # per-photo losses of the leader
    losses = np.stack([base, base + rng.normal(0.0001, 0.01, 2000), base + 0.05 + rng.normal(0, 0.01, 2000)])
    stats = paired_bootstrap(losses, seed=3)
    assert stats == paired_bootstrap(losses, seed=3)  # seeded: the same numbers every call
    analytic = losses.std(axis=1, ddof=1) / np.sqrt(2000)
    for s, a in zip(stats, analytic):
        assert s.se == pytest.approx(a, rel=0.1)
    assert stats[0].diff == 0 and stats[0].tied
    # paired: the difference's SE is that of the difference, far below either run's own SE
    assert stats[1].diff_se == pytest.approx((losses[1] - base).std(ddof=1) / np.sqrt(2000), rel=0.1)
    assert stats[1].diff_se < 0.2 * stats[1].se
    assert stats[1].tied and not stats[2].tied  # +0.0001 is within noise (0.5 SE), +0.05 is not
    assert stats[2].diff == pytest.approx(losses[2].mean() - base.mean())


def test_a_run_clearly_better_than_the_leader_is_not_tied_with_it():
    """The leader is the submitted run, not always the lowest (``ensemble: {submit: always}``): a
    run below it by many standard errors is not "tied", one below it within noise is."""
    from catsdogs.evaluation.metrics import paired_bootstrap

    rng = np.random.default_rng(1)
    leader = rng.exponential(0.1, 2000) + 0.05
    losses = np.stack([leader, leader - 0.05 + rng.normal(0, 0.01, 2000),
                       leader - 0.0001 + rng.normal(0, 0.01, 2000)])
    stats = paired_bootstrap(losses, leader=0, seed=3)
    assert stats[1].diff < -0.04 and not stats[1].tied
    assert stats[2].diff < 0 and stats[2].tied


def test_paired_bootstrap_refuses_non_finite_losses():
    from catsdogs.evaluation.metrics import paired_bootstrap

    with pytest.raises(DataError, match="paired_bootstrap"):
        paired_bootstrap(np.array([[0.1, np.inf]]))


# ------------------------------------------------------------------ one log loss, one logit
def test_row_log_losses_average_to_the_log_loss_and_check_their_input():
    y, p = [1, 0, 1, 0], [0.9, 0.2, 0.0, 1.0]
    rows = row_log_losses(y, p)
    assert rows.tolist() == pytest.approx([-math.log(0.9), -math.log(0.8), -math.log(1e-15),
                                           -math.log(1e-15)], rel=1e-3)
    assert float(rows.mean()) == log_loss(y, p)
    with pytest.raises(DataError, match="labels must be 0 or 1"):
        row_log_losses([0.5], [0.5])
    with pytest.raises(ConfigError, match="eps"):
        row_log_losses([1], [0.5], eps=0.5)


def test_cross_entropy_takes_soft_targets_and_any_shape():
    t = np.array([0.9, 0.1, 0.5])
    p = np.array([[0.8, 0.3], [0.0, 0.6], [1.0, 0.5]])
    expected = -(t[:, None] * np.log(np.clip(p, 1e-15, 1 - 1e-15))
                 + (1 - t[:, None]) * np.log(1 - np.clip(p, 1e-15, 1 - 1e-15)))
    np.testing.assert_allclose(cross_entropy(t[:, None], p), expected, rtol=1e-12)
    # 0 * log 0 is 0: hard targets met with certainty cost nothing without clipping
    assert cross_entropy(np.array([1.0, 0.0]), np.array([1.0, 0.0]), eps=0.0).tolist() == [0.0, 0.0]


def test_logit_cross_entropy_is_the_cross_entropy_of_the_sigmoid_without_saturating():
    t = np.array([1.0, 0.0, 0.7, 1.0])
    z = np.array([2.0, -3.0, 0.4, -50.0])
    np.testing.assert_allclose(logit_cross_entropy(t[:3], z[:3]), cross_entropy(t[:3], sigmoid(z[:3])),
                               rtol=1e-12)
    assert logit_cross_entropy(t, z)[3] == pytest.approx(50.0)  # sigmoid(-50) would be clipped


def test_logit_and_sigmoid_invert_each_other_and_clip():
    p = np.array([0.5, 0.1, 0.9, 1e-6])
    np.testing.assert_allclose(sigmoid(logit(p)), p, rtol=1e-12)
    np.testing.assert_allclose(logit(p), np.log(p / (1 - p)), rtol=1e-12)
    hi = 1.0 - LOGIT_EPS  # in float64, 1 - 1e-12 is 1 - 1.000089e-12
    assert logit([0.0, 1.0]).tolist() == pytest.approx(
        [math.log(LOGIT_EPS / (1 - LOGIT_EPS)), math.log(hi / (1 - hi))], rel=1e-12)
    assert logit([0.0], eps=1e-7)[0] == pytest.approx(math.log(1e-7), rel=1e-6)
    with np.errstate(all="raise"):  # no overflow on large logits
        assert sigmoid([-800.0, 800.0]).tolist() == [0.0, 1.0]


def test_the_old_import_path_re_exports_the_same_functions():
    import catsdogs.evaluation.metrics as new
    import catsdogs.runs.metrics as old

    assert old.__all__ == new.__all__
    assert all(getattr(old, name) is getattr(new, name) for name in new.__all__)
