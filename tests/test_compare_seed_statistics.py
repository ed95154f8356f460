"""Seed-level statistics of the verdict: the two-level bootstrap, the exact sign-flip test, TOST, the seeds needed,
the three-way verdict, and the procedure's error rates on simulated comparisons."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import stats as sps

from pipeline.compare import seed_statistics as ss
from pipeline.compare.simulation import check_procedure
from pipeline.compare.statistics import DEFAULT_MARGINS, resolve_margins, verdict

# --- two-level bootstrap ---------------------------------------------------------------------------------------

def test_bootstrap_of_two_single_volume_seeds_has_the_hand_computed_distribution():
    # seeds {a}, {b}: two seeds drawn with replacement -> a (1/4), (a+b)/2 (1/2), b (1/4)
    means = ss.bootstrap_means([[1.0], [3.0]], n_resamples=40_000, seed=1)
    values, counts = np.unique(means, return_counts=True)
    assert values.tolist() == [1.0, 2.0, 3.0]
    assert counts / counts.sum() == pytest.approx([0.25, 0.5, 0.25], abs=0.01)
    assert ss.hierarchical_bootstrap([[1.0], [3.0]], n_resamples=40_000) == (1.0, 3.0)


def test_bootstrap_resamples_volumes_within_the_drawn_seed():
    # one seed with volumes {0, 1}: only the volume draw varies -> 0 (1/4), 0.5 (1/2), 1 (1/4)
    means = ss.bootstrap_means([[0.0, 1.0]], n_resamples=40_000, seed=2)
    values, counts = np.unique(means, return_counts=True)
    assert values.tolist() == [0.0, 0.5, 1.0]
    assert counts / counts.sum() == pytest.approx([0.25, 0.5, 0.25], abs=0.01)


def test_bootstrap_variance_matches_the_closed_form_and_seeds_weigh_equally():
    groups = [[0.1, 0.3, 0.2], [0.5], [-0.2, 0.0], [0.4, 0.4, 0.1, 0.3]]
    means = ss.bootstrap_means(groups, n_resamples=200_000, seed=3)
    mu = np.array([np.mean(g) for g in groups])
    expected = (mu.var() + np.mean([np.var(g) / len(g) for g in groups])) / len(groups)
    assert ss.bootstrap_variance(groups) == pytest.approx(expected)
    assert means.var() == pytest.approx(expected, rel=0.02)
    assert means.mean() == pytest.approx(mu.mean(), abs=0.002)  # the mean of seed means, not of all volumes
    assert ss.seed_means([[1.0, float("nan"), 3.0], [], [float("inf")]]).tolist() == [2.0]


def test_bootstrap_is_seeded_and_empty_input_gives_nan():
    g = [[0.1, 0.2], [0.3, 0.0]]
    assert ss.hierarchical_bootstrap(g, seed=5) == ss.hierarchical_bootstrap(g, seed=5)
    assert all(math.isnan(v) for v in ss.hierarchical_bootstrap([[float("nan")]]))
    with pytest.raises(ValueError, match="level"):
        ss.hierarchical_bootstrap(g, level=1.5)


# --- exact sign-flip permutation p --------------------------------------------------------------------------------

def _enumerated_p(d):
    d = np.asarray(d, dtype=float)
    observed = abs(d.sum())
    hits = [abs(np.dot(signs, d)) >= observed - 1e-12 for signs in itertools.product((-1, 1), repeat=d.size)]
    return sum(hits) / len(hits)


@pytest.mark.parametrize("d", [[0.3], [0.1, -0.2], [0.01, 0.02, -0.005, 0.03, 0.002],
                               [0.2, 0.2, -0.2, 0.0, 0.1, -0.1, 0.05], list(np.linspace(-0.5, 1.0, 11))])
def test_sign_flip_p_equals_full_enumeration(d):
    assert ss.sign_flip_p(d) == pytest.approx(_enumerated_p(d))


def test_sign_flip_floor_is_two_over_two_to_the_n():
    for n in (3, 5, 10):
        assert ss.sign_flip_p(np.arange(1, n + 1) * 0.01) == pytest.approx(2 / 2 ** n) == ss.smallest_p(n)
    assert ss.smallest_p(5) == 0.0625  # 5 seeds can never reach p < 0.05
    assert ss.sign_flip_p([0.0, 0.0]) == 1.0 and math.isnan(ss.sign_flip_p([]))


def test_sign_flip_monte_carlo_beyond_sixteen_seeds_is_close_to_exact():
    d = np.random.default_rng(0).normal(0.1, 1.0, 18)
    exact = _enumerated_p(d)
    assert ss.sign_flip_p(d, n_patterns=100_000) == pytest.approx(exact, abs=0.01)
    assert ss.sign_flip_p(d, max_exact=18) == pytest.approx(exact)


# --- TOST and seeds needed -------------------------------------------------------------------------------------

def test_tost_hand_example():
    d = [0.001, -0.001, 0.002, 0.0]          # mean 0.0005, sd 0.0012910, se 0.00064550, 3 df
    se = math.sqrt(((0.0005 ** 2 + 0.0015 ** 2) * 2) / 3) / 2
    t_upper = (0.0005 - 0.005) / se            # -6.9714: H0 Δ >= +0.005
    t_lower = (0.0005 + 0.005) / se            # +8.5206: H0 Δ <= -0.005
    assert ss.tost_p(d, 0.005) == pytest.approx(max(sps.t.cdf(t_upper, 3), sps.t.sf(t_lower, 3)))
    assert ss.tost_p(d, 0.005) == pytest.approx(0.00303, abs=1e-5)
    assert ss.tost_p(d, 0.0006) > 0.05        # a margin just above the mean: not shown
    assert ss.tost_p([0.001, 0.001], 0.005) == 0.0 and ss.tost_p([0.01, 0.01], 0.005) == 1.0
    assert math.isnan(ss.tost_p([0.001], 0.005)) and math.isnan(ss.tost_p([0.0, 0.1], 0.0))


def test_tost_below_alpha_exactly_when_the_90_percent_interval_is_inside_the_margin():
    rng = np.random.default_rng(4)
    for _ in range(200):
        d = rng.normal(rng.uniform(-0.006, 0.006), 0.004, size=rng.integers(3, 12))
        margin = 0.005
        se = d.std(ddof=1) / math.sqrt(d.size)
        half = sps.t.ppf(0.95, d.size - 1) * se
        inside = -margin < d.mean() - half and d.mean() + half < margin
        assert (ss.tost_p(d, margin) < 0.05) == inside


def test_seeds_needed_closed_form():
    z = sps.norm.ppf(0.975) + sps.norm.ppf(0.8)          # 2.8016
    assert ss.seeds_to_detect(0.01, 0.01) == math.ceil(z ** 2) == 8
    assert ss.seeds_to_detect(-0.002, 0.01) == math.ceil((z * 5) ** 2) == 197
    a = 0.05 / 18                                        # Holm's strictest step over 18 tests
    z18 = sps.norm.ppf(1 - a / 2) + sps.norm.ppf(0.8)
    assert ss.seeds_to_detect(0.01, 0.01, family=18) == math.ceil(z18 ** 2) == 15
    assert ss.seeds_to_detect(0.05, 0.001, family=18) == 10  # tiny spread: the exact test's floor 2/2^n < a
    assert ss.seeds_to_detect(0.0, 0.01) == math.inf
    ze = sps.norm.ppf(0.95) + sps.norm.ppf(0.8)           # 2.4865
    assert ss.seeds_for_equivalence(0.0, 0.005, 0.005) == math.ceil(ze ** 2) == 7
    assert ss.seeds_for_equivalence(0.002, 0.003, 0.005) == math.ceil(ze ** 2) == 7
    assert ss.seeds_for_equivalence(0.006, 0.003, 0.005) == math.inf


# --- the verdict -----------------------------------------------------------------------------------------------

def _row(**kw):
    base = dict(n_seeds=10, diff=-0.01, higher_is_better=False, p_holm=0.01, ci_low=-0.015, ci_high=-0.005,
                p_tost_holm=0.5)
    return SimpleNamespace(**{**base, **kw})


def test_verdict_has_three_outcomes_and_follows_the_metric_direction():
    assert verdict(_row()) == "better"                                    # lower ECE, detected
    assert verdict(_row(diff=0.01, ci_low=0.005, ci_high=0.015)) == "worse"
    assert verdict(_row(higher_is_better=True, diff=0.01, ci_low=0.005, ci_high=0.015)) == "better"
    assert verdict(_row(p_tost_holm=0.01)) == "better, within the margin"
    assert verdict(_row(p_holm=0.2, p_tost_holm=0.01)) == "equivalent"
    assert verdict(_row(p_holm=0.01, ci_low=-0.015, ci_high=0.001)) == "inconclusive"  # interval covers 0
    assert verdict(_row(p_holm=0.2)) == "inconclusive"
    assert verdict(_row(n_seeds=0)) == "no data"


def test_margins_default_grid_and_command_line():
    assert resolve_margins({}) == DEFAULT_MARGINS
    assert resolve_margins({"margins": {"ece": 0.002}}, {"dsc": "0.02"}) == {"dsc": 0.02, "ece": 0.002, "cece": 0.005}
    with pytest.raises(ValueError, match="no margin for 'asd'"):
        resolve_margins({}, {"asd": 0.1})
    with pytest.raises(ValueError, match="positive number, got 'abc'"):
        resolve_margins({"margins": {"ece": "abc"}})


# --- the procedure, checked on simulated comparisons -------------------------------------------------------------

def test_the_seed_level_procedure_keeps_its_error_rates_and_the_pair_level_one_does_not():
    r = check_procedure(n_sims=500, n_seeds=10, n_volumes=3, n_resamples=1000, seed=0)
    tolerance = 3 * r["mc_se"]                                         # 3 Monte-Carlo standard errors
    assert r["seed_false_positive"] <= 0.05 + tolerance
    assert r["pair_false_positive"] > 0.05 + tolerance                  # treating pairs as independent inflates it
    assert 0.95 - 3 * math.sqrt(0.95 * 0.05 / 500) - 0.02 <= r["seed_coverage"] <= 1.0
    assert r["pair_coverage"] < r["seed_coverage"]
    assert r["seed_false_equivalence"] <= 0.05 + tolerance             # TOST at the margin: at most α
