"""Seed-level statistics: the trained network (the seed) is the unit of a comparison.

Two losses are compared on networks trained with the same seeds and scored on the same test volumes. The volumes of
one seed share one trained network, so the (seed, volume) pairs are not independent: the question "does the loss
change calibration?" is answered by trained networks. Per comparison and metric:

- ``d_s``: the seed-mean difference (reference − other, averaged over the test volumes of seed ``s``); the estimate
  is the mean of the ``d_s``;
- :func:`hierarchical_bootstrap`: a two-level percentile interval (seeds resampled with replacement, then the
  volumes within each resampled seed);
- :func:`sign_flip_p`: the exact two-sided sign-flip permutation p-value of the mean of the ``d_s`` (all ``2^n``
  sign patterns up to :data:`MAX_EXACT_SEEDS` seeds, a seeded Monte-Carlo draw of them beyond); with ``n`` seeds it
  cannot go below ``2 / 2^n`` (:func:`smallest_p`);
- :func:`tost_p`: equivalence within ``±margin`` by two one-sided paired t-tests on the ``d_s`` (Schuirmann's TOST,
  each at level α: the same as the (1 − 2α) t-interval lying inside the margin);
- :func:`seeds_to_detect` / :func:`seeds_for_equivalence`: how many seeds a decision would need at 80 % power,
  from the observed seed-level spread (normal approximation; for a family of ``m`` tests at α/m, Holm's strictest
  step).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as sps

MAX_EXACT_SEEDS = 16
MONTE_CARLO_PATTERNS = 100_000
_CHUNK = 2_000_000  # bootstrap elements drawn per block: bounds memory


def _clean(groups) -> list[np.ndarray]:
    out = []
    for g in groups:
        a = np.asarray(g, dtype=float).ravel()
        a = a[np.isfinite(a)]
        if a.size:
            out.append(a)
    return out


def seed_means(groups) -> np.ndarray:
    """The mean of each seed's finite per-volume differences (seeds without one are dropped).

    >>> seed_means([[1.0, 3.0], [2.0], [float("nan")]]).tolist()
    [2.0, 2.0]
    """
    return np.array([g.mean() for g in _clean(groups)], dtype=float)


def bootstrap_means(groups, n_resamples: int = 10_000, seed: int = 0) -> np.ndarray:
    """The two-level bootstrap distribution of the mean of seed means.

    Each resample draws ``n`` seeds with replacement from the ``n`` seeds, then, for each drawn seed, as many
    volumes with replacement as that seed has; its statistic is the mean over the drawn seeds of the mean of their
    drawn volumes (every seed weighs the same, as in the estimate).

    Args:
        groups: one sequence of per-volume differences per seed (non-finite values dropped; empty seeds dropped).
        n_resamples: resamples (default 10 000).
        seed: seed of ``numpy.random.default_rng``: the same input gives the same draw.

    Returns:
        ``n_resamples`` means; empty without a finite value.
    """
    groups = _clean(groups)
    if not groups:
        return np.empty(0)
    n = len(groups)
    counts = np.array([g.size for g in groups])
    width = int(counts.max())
    table = np.full((n, width), np.nan)
    for i, g in enumerate(groups):
        table[i, :g.size] = g
    rng = np.random.default_rng(seed)
    out = np.empty(n_resamples)
    step = max(1, _CHUNK // (n * width))
    for start in range(0, n_resamples, step):
        b = min(n_resamples, start + step) - start
        drawn = rng.integers(0, n, size=(b, n))                              # seeds
        k = counts[drawn]                                                    # their volume counts
        cols = (rng.random((b, n, width)) * k[..., None]).astype(np.int64)  # volumes within each drawn seed
        keep = np.arange(width)[None, None, :] < k[..., None]                # the first k draws of each seed
        values = np.where(keep, table[drawn[..., None], cols], 0.0)
        out[start:start + b] = (values.sum(axis=2) / k).mean(axis=1)
    return out


def hierarchical_bootstrap(groups, n_resamples: int = 10_000, level: float = 0.95,
                           seed: int = 0) -> tuple[float, float]:
    """Percentile interval of :func:`bootstrap_means`; ``(nan, nan)`` without a finite value.

    >>> hierarchical_bootstrap([[0.5, 0.5], [0.5]])
    (0.5, 0.5)
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    means = bootstrap_means(groups, n_resamples, seed)
    if means.size == 0:
        return math.nan, math.nan
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_variance(groups) -> float:
    """The exact variance of :func:`bootstrap_means`' statistic (what the resamples estimate):
    ``(1/n) [Var_s(μ_s) + mean_s(σ²_s / m_s)]`` with population variances (``ddof 0``) over the ``n`` seeds and over
    the ``m_s`` volumes of seed ``s``."""
    groups = _clean(groups)
    if not groups:
        return math.nan
    mu = np.array([g.mean() for g in groups])
    within = np.array([g.var() / g.size for g in groups])
    return float((mu.var() + within.mean()) / len(groups))


def _sign_patterns(n: int) -> np.ndarray:
    return 1 - 2 * ((np.arange(2 ** n)[:, None] >> np.arange(n)[None, :]) & 1)


def sign_flip_p(diffs, max_exact: int = MAX_EXACT_SEEDS, n_patterns: int = MONTE_CARLO_PATTERNS,
                seed: int = 0) -> float:
    """Two-sided sign-flip permutation p-value of the mean of ``diffs`` (the seed-mean differences).

    Under the null hypothesis (no method effect, differences symmetric about 0) every sign pattern is as likely as
    the observed one: p is the share of patterns whose ``|Σ ε_i d_i|`` reaches the observed ``|Σ d_i|``. Exact (all
    ``2^n`` patterns) up to ``max_exact`` seeds; beyond, ``(1 + hits) / (1 + n_patterns)`` over seeded random
    patterns.

    Returns:
        p in ``[2 / 2^n, 1]`` (exact); 1.0 when every difference is zero; NaN without a finite difference.

    >>> sign_flip_p([0.1, 0.2, 0.3])    # all 3 positive: 2 of 8 patterns are as extreme
    0.25
    """
    d = np.asarray(diffs, dtype=float).ravel()
    d = d[np.isfinite(d)]
    if d.size == 0:
        return math.nan
    if not np.any(d != 0):
        return 1.0
    observed = abs(d.sum())
    tol = 1e-12 * np.abs(d).sum()
    if d.size <= max_exact:
        sums = np.abs(_sign_patterns(d.size) @ d)
        return float(np.mean(sums >= observed - tol))
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, n_patterns, 10_000):
        b = min(n_patterns, start + 10_000) - start
        signs = rng.choice(np.array([-1.0, 1.0]), size=(b, d.size))
        hits += int(np.sum(np.abs(signs @ d) >= observed - tol))
    return float((1 + hits) / (1 + n_patterns))


def smallest_p(n_seeds: int) -> float:
    """The smallest two-sided exact sign-flip p-value ``n_seeds`` seeds can give: ``2 / 2^n``.

    >>> smallest_p(5)
    0.0625
    """
    return 2.0 / 2 ** int(n_seeds) if n_seeds > 0 else math.nan


def tost_p(diffs, margin: float) -> float:
    """Equivalence p-value within ``±margin``: the larger of the two one-sided paired t-test p-values of
    ``H0: Δ ≤ −margin`` and ``H0: Δ ≥ margin`` on the seed-mean differences (``n − 1`` degrees of freedom).

    ``p < α`` exactly when the (1 − 2α) t-interval of the mean lies inside ``(−margin, margin)``.

    Returns:
        the p-value; with zero spread 0.0 when the mean is inside the margin, else 1.0; NaN for fewer than 2 seeds
        or a margin that is not positive.

    >>> round(tost_p([0.001, -0.001, 0.002, 0.0], 0.005), 4)   # t = (0.0005 − 0.005) / 0.000645 = −6.97, 3 df
    0.003
    """
    d = np.asarray(diffs, dtype=float).ravel()
    d = d[np.isfinite(d)]
    if d.size < 2 or not margin > 0:
        return math.nan
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    if sd == 0:
        return 0.0 if abs(mean) < margin else 1.0
    se = sd / math.sqrt(d.size)
    df = d.size - 1
    p_lower = float(sps.t.sf((mean + margin) / se, df))   # H0: Δ ≤ −margin
    p_upper = float(sps.t.cdf((mean - margin) / se, df))  # H0: Δ ≥ +margin
    return max(p_lower, p_upper)


def seeds_to_detect(mean: float, sd: float, alpha: float = 0.05, power: float = 0.8, family: int = 1) -> float:
    """Seeds needed to detect a true seed-level difference ``mean`` with seed-level spread ``sd`` (two-sided,
    level ``alpha / family``, normal approximation), and at least the seeds whose smallest exact sign-flip p-value
    ``2 / 2^n`` is below that level: ``max(⌈((z_{1−a/2} + z_power) · sd / |mean|)²⌉, n_min)``.

    Returns:
        a whole number of seeds; ``inf`` for a zero mean or a non-finite input.

    >>> seeds_to_detect(0.01, 0.01)   # ((1.960 + 0.842) · 1)² = 7.85 → 8 seeds
    8
    """
    if not (math.isfinite(mean) and math.isfinite(sd)) or mean == 0:
        return math.inf
    a = alpha / family
    z = sps.norm.ppf(1 - a / 2) + sps.norm.ppf(power)
    n_min = math.floor(math.log2(2 / a)) + 1  # 2 / 2^n < a
    return max(math.ceil((z * sd / abs(mean)) ** 2 - 1e-9), n_min, 2)


def seeds_for_equivalence(mean: float, sd: float, margin: float, alpha: float = 0.05, power: float = 0.8,
                          family: int = 1) -> float:
    """Seeds needed for TOST to show equivalence within ``±margin`` when the true seed-level difference is
    ``mean``: ``⌈((z_{1−a} + z_power) · sd / (margin − |mean|))²⌉`` at level ``a = alpha / family`` (normal
    approximation; at least 2).

    Returns:
        a whole number of seeds; ``inf`` when ``|mean| ≥ margin`` (equivalence is not to be expected).

    >>> seeds_for_equivalence(0.0, 0.005, 0.005)   # ((1.645 + 0.842) · 1)² = 6.18 → 7 seeds
    7
    """
    if not (math.isfinite(mean) and math.isfinite(sd)) or abs(mean) >= margin:
        return math.inf
    a = alpha / family
    z = sps.norm.ppf(1 - a) + sps.norm.ppf(power)
    return max(math.ceil((z * sd / (margin - abs(mean))) ** 2 - 1e-9), 2)
