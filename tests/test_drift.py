"""Drift statistics, their edge cases, and the policy that confirms drift (seeded, exact)."""

import doctest
import math

import numpy as np
import pytest
from scipy.stats import ks_2samp

from churn_stream.drift import (
    REGISTRY,
    DriftPolicy,
    DriftResult,
    DriftWindow,
    ReferenceProfile,
    Thresholds,
    Verdict,
    score_drift,
)
from churn_stream.drift import ks as ks_module
from churn_stream.drift import psi as psi_module
from churn_stream.drift.ks import ks
from churn_stream.drift.psi import EPSILON, Bins, psi

pytestmark = pytest.mark.timeout(30)
FEATURES = ["duration", "amount", "plan_code", "always_one"]


def test_doctests_pass() -> None:
    for module in (psi_module, ks_module):
        assert doctest.testmod(module).failed == 0


def test_registry_holds_every_statistic_with_one_shape() -> None:
    rng = np.random.default_rng(1)
    reference, current = rng.normal(size=1000), rng.normal(size=800)
    assert sorted(REGISTRY) == ["ks", "psi"]
    for name, statistic in REGISTRY.items():
        result = statistic(reference, current, 0.5)
        assert isinstance(result, DriftResult)
        assert (result.statistic, result.threshold, result.drifted) == (name, 0.5, False)
        assert (result.n_reference, result.n_current) == (1000, 800)


def test_psi_of_the_same_sample_is_zero_and_of_a_shift_is_large() -> None:
    rng = np.random.default_rng(2)
    reference = rng.normal(size=5000)
    assert psi(reference, reference).score == pytest.approx(0.0, abs=1e-12)
    shifted = psi(reference, reference + 1.0)
    assert shifted.drifted and shifted.score > 0.5


def test_psi_bins_at_reference_quantiles() -> None:
    bins = Bins.fit(np.arange(100.0), max_bins=4)
    assert bins.categories is None
    assert bins.edges.tolist() == [24.75, 49.5, 74.25]
    assert bins.index(np.array([-5.0, 30.0, 99.0, 1e9])).tolist() == [0, 1, 3, 3]


def test_psi_with_every_current_value_in_one_bin_stays_finite() -> None:
    reference = np.arange(1000.0)
    result = psi(reference, np.full(200, 5.0))
    expected = (1 - 0.1) * math.log(1 / 0.1) + 9 * (EPSILON - 0.1) * math.log(EPSILON / 0.1)
    assert result.score == pytest.approx(expected)
    assert result.drifted


def test_a_category_never_seen_in_training_lands_in_its_own_bin() -> None:
    reference = np.repeat([0.0, 1.0, 2.0], [500, 300, 200])
    bins = Bins.fit(reference)
    assert bins.categories.tolist() == [0.0, 1.0, 2.0]
    assert bins.index(np.array([2.0, 7.0, 0.0, -1.0])).tolist() == [2, 3, 0, 3]
    current = np.concatenate([np.repeat([0.0, 1.0, 2.0], [495, 300, 200]), np.full(5, 7.0)])
    result = psi(reference, current)
    assert math.isfinite(result.score) and not result.drifted
    assert result.score == pytest.approx(
        (0.495 - 0.5) * math.log(0.495 / 0.5) + (0.005 - EPSILON) * math.log(0.005 / EPSILON)
    )


def test_a_feature_constant_in_the_reference_is_reported_but_never_drifts() -> None:
    reference = np.ones(1000)
    current = np.random.default_rng(3).normal(size=500)
    for result in (psi(reference, current), ks(reference, current)):
        assert math.isfinite(result.score) and result.score > result.threshold
        assert not result.drifted


@pytest.mark.parametrize("statistic", ["psi", "ks"])
def test_an_empty_current_window_scores_zero(statistic: str) -> None:
    result = REGISTRY[statistic](np.arange(10.0), np.array([]), 0.1)
    assert (result.score, result.drifted, result.n_current) == (0.0, False, 0)


def test_non_finite_values_are_left_out() -> None:
    reference = np.arange(100.0)
    current = np.concatenate([np.arange(100.0), [np.nan, np.inf, -np.inf]])
    result = psi(reference, current)
    assert (result.score, result.n_current) == (pytest.approx(0.0, abs=1e-12), 100)


def test_ks_is_the_largest_gap_between_the_distribution_functions() -> None:
    result = ks(np.array([0.0, 1.0, 2.0, 3.0]), np.array([2.0, 3.0, 4.0, 5.0]), 0.4)
    assert (result.statistic, result.score, result.drifted) == ("ks", 0.5, True)


@pytest.mark.parametrize("seed", range(6))
def test_ks_distance_equals_scipys_statistic(seed: int) -> None:
    # Counts with many ties, continuous values, unequal sizes, shifted and unshifted.
    rng = np.random.default_rng(seed)
    size = int(rng.integers(1, 3000))
    samples = [
        (rng.poisson(3, 2000).astype(float), rng.poisson(3 + seed % 2, size).astype(float)),
        (rng.normal(size=1500), rng.normal(seed / 10, size=size)),
        (rng.choice([0.0, 1.0], 40), rng.choice([0.0, 1.0], size)),
    ]
    for reference, current in samples:
        expected = ks_2samp(reference, current, method="asymp").statistic
        assert ks(reference, current).score == pytest.approx(expected, abs=1e-12)


def test_score_drift_is_psi_of_the_scores() -> None:
    rng = np.random.default_rng(4)
    reference = rng.beta(2, 5, size=4000)
    result = score_drift(reference, rng.beta(5, 2, size=1000))
    assert result.statistic == "score_psi" and result.drifted
    assert not score_drift(reference, rng.beta(2, 5, size=1000)).drifted


def _reference(rng: np.random.Generator, rows: int) -> np.ndarray:
    return np.column_stack([
        rng.lognormal(5, 0.5, rows),
        rng.gamma(2.0, 10.0, rows),
        rng.choice(3, rows, p=[0.5, 0.35, 0.15]).astype(float),
        np.ones(rows),
    ])


def _profile(seed: int = 7) -> ReferenceProfile:
    rng = np.random.default_rng(seed)
    reference = _reference(rng, 5000)
    scores = rng.beta(2, 5, 5000)
    return ReferenceProfile("v1", FEATURES, reference, scores, Thresholds())


def _live_windows(seed: int, shift_from: int, windows: int, rows: int = 500):
    """Windows of live rows; from ``shift_from`` on, sessions shorten and purchases grow."""
    rng = np.random.default_rng(seed)
    for index in range(windows):
        window = _reference(rng, rows)
        if index >= shift_from:
            window[:, 0] *= 0.5
            window[:, 1] *= 1.8
        yield window, rng.beta(2, 5, rows)


def test_profile_reports_psi_for_every_feature_and_ks_for_numeric_ones() -> None:
    window, scores = next(_live_windows(seed=8, shift_from=99, windows=1))
    report = _profile().compare(window, scores)
    pairs = [(f.feature, f.result.statistic) for f in report.features]
    assert pairs == [("duration", "psi"), ("duration", "ks"), ("amount", "psi"),
                     ("amount", "ks"), ("plan_code", "psi"), ("always_one", "psi")]
    assert report.exempt_features == frozenset({"always_one"})
    assert report.drifted_features == [] and report.drifted_share == 0.0
    assert all(math.isfinite(f.result.score) for f in report.features)


def test_policy_confirms_drift_at_the_exact_window_and_respects_the_cooldown() -> None:
    profile = _profile()
    policy = DriftPolicy(min_features=2, persistence=3, min_rows=400, cooldown_s=300.0)
    verdicts = []
    for index, (window, scores) in enumerate(_live_windows(9, shift_from=6, windows=16)):
        verdicts.append(policy.observe(profile.compare(window, scores), now_s=60.0 * index))
    confirmed = [i for i, v in enumerate(verdicts) if v is Verdict.CONFIRMED]
    # Drift from window 6; three drifted windows in a row confirm it at 8; the next streak
    # of three ends at 11, still within 300 s of the retrain at 8 (480 s), so 13 (780 s).
    assert confirmed == [8, 13]
    assert verdicts[:6] == [Verdict.STABLE] * 6
    assert verdicts[6:8] == [Verdict.DRIFTING] * 2
    assert verdicts[9:13] == [Verdict.DRIFTING, Verdict.DRIFTING, Verdict.COOLING_DOWN,
                              Verdict.COOLING_DOWN]


def test_edge_cases_alone_never_confirm_drift() -> None:
    profile = _profile()
    policy = DriftPolicy(min_features=1, persistence=2, min_rows=400, cooldown_s=0.0)
    rng = np.random.default_rng(10)
    verdicts = []
    for index in range(10):
        window = _reference(rng, 500)
        window[:, 3] = rng.normal(size=500)  # the feature constant in training now varies
        window[:5, 2] = 9.0  # a plan code never seen in training
        verdicts.append(policy.observe(profile.compare(window, rng.beta(2, 5, 500)), index))
    verdicts.append(policy.observe(profile.compare(np.empty((0, 4)), np.empty(0)), 11))
    small = _reference(rng, 50) * 3
    verdicts.append(policy.observe(profile.compare(small, rng.beta(5, 2, 50)), 12))
    assert Verdict.CONFIRMED not in verdicts
    assert verdicts[-2:] == [Verdict.INSUFFICIENT, Verdict.INSUFFICIENT]


def test_a_window_with_too_few_rows_neither_counts_nor_breaks_a_streak() -> None:
    profile = _profile()
    policy = DriftPolicy(min_features=2, persistence=2, min_rows=400, cooldown_s=0.0)
    shifted = list(_live_windows(11, shift_from=0, windows=2))
    small_window, small_scores = shifted[0][0][:100], shifted[0][1][:100]
    verdicts = [
        policy.observe(profile.compare(*shifted[0]), 0.0),
        policy.observe(profile.compare(small_window, small_scores), 1.0),
        policy.observe(profile.compare(*shifted[1]), 2.0),
    ]
    assert verdicts == [Verdict.DRIFTING, Verdict.INSUFFICIENT, Verdict.CONFIRMED]


def test_score_drift_alone_makes_a_window_drifted() -> None:
    profile = _profile()
    window, _ = next(_live_windows(12, shift_from=99, windows=1))
    report = profile.compare(window, np.random.default_rng(12).beta(6, 2, 500))
    assert report.drifted_share == 0.0 and report.score.drifted
    assert DriftPolicy().window_drifted(report)


def test_window_closes_by_rows_or_by_age() -> None:
    now = [0.0]
    window = DriftWindow(max_rows=100, max_age_s=30.0, clock=lambda: now[0])
    window.add(np.zeros((60, 2)), np.zeros(60))
    assert not window.closed()
    window.add(np.ones((40, 2)), np.ones(40))
    assert window.closed() and len(window) == 100
    rows, scores = window.take()
    assert rows.shape == (100, 2) and scores.shape == (100,) and len(window) == 0
    window.add(np.zeros((5, 2)), np.zeros(5))
    now[0] = 29.9
    assert not window.closed()
    now[0] = 30.0
    assert window.closed()


def test_reference_of_the_wrong_width_is_refused() -> None:
    with pytest.raises(ValueError, match="expected"):
        ReferenceProfile("v1", FEATURES, np.zeros((10, 3)), np.zeros(10))


def test_an_exempt_feature_is_reported_but_not_counted() -> None:
    rng = np.random.default_rng(7)
    profile = ReferenceProfile("v1", FEATURES, _reference(rng, 5000), rng.beta(2, 5, 5000),
                               exempt=lambda name: name == "duration")
    policy = DriftPolicy(min_features=2, persistence=1, min_rows=400, cooldown_s=0.0)
    for window, scores in _live_windows(13, shift_from=0, windows=3):
        report = profile.compare(window, scores)
        psi_of = {f.feature: f.result for f in report.psi_results()}
        assert psi_of["duration"].drifted and report.drifted_features == ["amount"]
        assert report.drifted_share == pytest.approx(1 / 2)
        assert policy.observe(report, 0.0) is Verdict.STABLE
