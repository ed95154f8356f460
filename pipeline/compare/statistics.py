"""Paired statistics the paper lacks: the reference method against every other method on the same seeds and test
volumes, with the trained network (the seed) as the unit.

A pair is one (seed, test volume): the reference's selected configuration and the other method's selected
configuration, same backbone, trained with the same seed, evaluated on the same volume; only pairs where both runs
finished and both values are finite count. Per metric (per-volume DSC, ECE, CECE; the same with the last epoch's
weights, ``last_*``):

**The verdict** (:mod:`pipeline.compare.seed_statistics`): the mean of the seed-mean differences ``reference −
other``; a two-level bootstrap 95 % interval (seeds, then volumes within seeds); the exact sign-flip p-value over
the seed-mean differences, Holm-corrected over every (backbone, comparison, metric) of the report; equivalence
within a declared margin per metric by TOST on the seed-mean differences, Holm-corrected over the report's
equivalence tests; the seeds a decision would need. Each comparison is *better*, *worse*, *equivalent* or
*inconclusive* (:func:`verdict`).

**Secondary, never the verdict** (``pair_*`` columns): the same mean with a bootstrap interval over the pairs and
the two-sided Wilcoxon signed-rank p-value over the pairs (``scipy.stats.wilcoxon``, zeros dropped), Holm-corrected
likewise. Pairs of one seed share a trained model, so these treat dependent pairs as independent and are
optimistic (``make check-statistics`` measures how much).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats as sps

from pipeline.compare import seed_statistics as ss
from pipeline.compare.data import HIGHER_IS_BETTER, canonical_sort, finite
from pipeline.compare.selection import finished_runs

PAIRED_METRICS = ("dsc", "ece", "cece")
LAST_METRICS = ("last_dsc", "last_ece", "last_cece")  # the same, scored with the last epoch's weights
ALPHA = 0.05
POWER = 0.8
#: practical-equivalence margins per metric (a grid file's ``margins`` and ``MARGINS=`` override them)
DEFAULT_MARGINS = {"dsc": 0.01, "ece": 0.005, "cece": 0.005}
N_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
_CHUNK_ELEMENTS = 4_000_000  # resample indices drawn per block: bounds memory for large pair counts


def bootstrap_ci(diffs, n_resamples: int = N_RESAMPLES, level: float = 0.95,
                 seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``diffs`` (pairs resampled with replacement).

    Args:
        diffs: 1D paired differences; non-finite values are dropped.
        n_resamples: bootstrap resamples (default 10 000).
        level: coverage of the interval (default 0.95).
        seed: seed of ``numpy.random.default_rng`` (default 0): the same input gives the same interval.

    Returns:
        ``(low, high)``; ``(nan, nan)`` without a finite difference.

    >>> bootstrap_ci([1.0, 1.0, 1.0])
    (1.0, 1.0)
    """
    d = np.asarray(diffs, dtype=float).ravel()
    d = d[np.isfinite(d)]
    if d.size == 0:
        return float("nan"), float("nan")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    step = max(1, _CHUNK_ELEMENTS // d.size)
    for start in range(0, n_resamples, step):
        stop = min(n_resamples, start + step)
        idx = rng.integers(0, d.size, size=(stop - start, d.size))
        means[start:stop] = d[idx].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def wilcoxon_p(diffs) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired differences (zeros dropped).

    Returns:
        the p-value; 1.0 when every finite difference is zero; NaN without a finite difference.
    """
    d = np.asarray(diffs, dtype=float).ravel()
    d = d[np.isfinite(d)]
    if d.size == 0:
        return float("nan")
    if not np.any(d != 0):
        return 1.0
    return float(sps.wilcoxon(d, zero_method="wilcox", alternative="two-sided").pvalue)


def holm(pvalues) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error control); NaN entries stay NaN and are not counted.

    With the ``m`` finite p-values sorted ascending, ``p̃_(i) = max_{j ≤ i} min(1, (m − j + 1) p_(j))``.

    >>> holm([0.01, 0.04, 0.03, 0.005]).round(3).tolist()
    [0.03, 0.06, 0.06, 0.02]
    """
    p = np.asarray(pvalues, dtype=float).ravel()
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = ok.size
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="mergesort")]
    adjusted = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out[order] = np.maximum.accumulate(adjusted)
    return out


def paired_differences(runs: pd.DataFrame, volumes: pd.DataFrame, selection: pd.DataFrame, grid: dict,
                       metrics: tuple[str, ...] = PAIRED_METRICS) -> pd.DataFrame:
    """Every (seed, volume) pair of the reference's selected configuration with each other method's.

    Args:
        runs: from :func:`pipeline.compare.data.prepare_runs`.
        volumes: from :func:`pipeline.compare.data.prepare_volumes` (with per-volume ``dsc``).
        selection: from :func:`pipeline.compare.selection.select_settings`.
        metrics: per-volume columns to pair (default DSC, ECE, CECE).

    Returns:
        long table: ``backbone``, ``other``, ``metric``, ``seed``, ``id``, ``reference_key``, ``other_key``,
        ``reference_value``, ``other_value``, ``diff`` (reference − other; NaN where a volume lacks a value on one
        side, absent on the other, or the metric column is missing). Runs paired only where both finished.

    Raises:
        ValueError: two finished runs of one selected configuration with the same seed.
    """
    cols = ["backbone", "other", "metric", "seed", "id", "reference_key", "other_key", "reference_value",
            "other_value", "diff"]
    ref = grid["reference"]
    fin = finished_runs(runs)
    chosen = {(r.backbone, r.method): r.setting for r in selection.itertuples()}
    frames = []
    for backbone in grid["backbones"]:
        if (backbone, ref) not in chosen:
            continue
        ref_runs = _one_per_seed(fin, backbone, ref, chosen[(backbone, ref)])
        for m in grid["methods"]:
            other = m["name"]
            if other == ref or (backbone, other) not in chosen:
                continue
            other_runs = _one_per_seed(fin, backbone, other, chosen[(backbone, other)])
            for seed in sorted(set(ref_runs) & set(other_runs)):
                a = volumes[volumes["key"] == ref_runs[seed]].set_index("id")
                b = volumes[volumes["key"] == other_runs[seed]].set_index("id")
                ids = sorted(set(a.index) | set(b.index))
                for metric in metrics:
                    va = a[metric].reindex(ids).astype(float) if metric in a else pd.Series(np.nan, index=ids)
                    vb = b[metric].reindex(ids).astype(float) if metric in b else pd.Series(np.nan, index=ids)
                    frames.append(pd.DataFrame({
                        "backbone": backbone, "other": other, "metric": metric, "seed": seed, "id": ids,
                        "reference_key": ref_runs[seed], "other_key": other_runs[seed],
                        "reference_value": va.to_numpy(), "other_value": vb.to_numpy(),
                        "diff": va.to_numpy() - vb.to_numpy()}))
    if not frames:
        return pd.DataFrame(columns=cols)
    out = pd.concat(frames, ignore_index=True)[cols]
    order = {m: i for i, m in enumerate(metrics)}
    out["_m"] = out["metric"].map(order)
    out = canonical_sort(out.rename(columns={"other": "method"}), grid, extra=("_m", "id"))
    return out.drop(columns="_m").rename(columns={"method": "other"})[cols]


def _one_per_seed(fin: pd.DataFrame, backbone: str, method: str, setting: str) -> dict[int, str]:
    g = fin[(fin["backbone"] == backbone) & (fin["method"] == method) & (fin["setting"] == setting)]
    dup = g[g["seed"].duplicated(keep=False)]
    if len(dup):
        raise ValueError(f"{backbone}/{method} {setting!r}: several finished runs per seed: "
                         f"{dup[['seed', 'key']].values.tolist()}")
    return dict(zip(g["seed"].astype(int), g["key"]))


def compare_methods(pairs: pd.DataFrame, grid: dict, n_resamples: int = N_RESAMPLES, level: float = 0.95,
                    seed: int = BOOTSTRAP_SEED, margins: dict | None = None, alpha: float = ALPHA,
                    power: float = POWER) -> pd.DataFrame:
    """Summarise :func:`paired_differences` per (backbone, other method, metric): the seed-level verdict
    statistics (:mod:`pipeline.compare.seed_statistics`), Holm-corrected over all rows, and the (seed, volume)-pair
    statistics as a secondary, labelled set of columns (``pair_*``).

    Args:
        margins: metric → practical-equivalence margin (default :data:`DEFAULT_MARGINS`, then ``grid["margins"]``).
        alpha: the level of the tests (default 0.05); power: of the seeds-needed estimates (default 0.8).

    Returns:
        ``backbone``, ``reference``, ``other``, ``metric``, ``higher_is_better``, ``n_seeds``, ``n_pairs`` (finite
        pairs), ``n_dropped``, ``seeds_better`` (seeds whose mean difference favours the reference),
        ``reference_mean``, ``other_mean``, ``diff`` (mean of the seed-mean differences reference − other),
        ``seed_sd`` (their standard deviation, ddof 1), ``ci_low``, ``ci_high`` (two-level bootstrap), ``p``
        (exact sign-flip), ``p_holm``, ``p_floor`` (2 / 2^n), ``margin``, ``p_tost``, ``p_tost_holm`` (Holm over
        the equivalence tests), ``verdict`` (:func:`verdict`), ``seeds_detect``, ``seeds_equivalence`` (at
        ``power``, level α / the family size), and ``pair_ci_low``, ``pair_ci_high``, ``pair_p`` (Wilcoxon),
        ``pair_p_holm`` from the (seed, volume) pairs treated as independent.
    """
    margins = resolve_margins(grid, margins)
    rows = []
    for (backbone, other, metric), g in pairs.groupby(["backbone", "other", "metric"], sort=False):
        ok = g[np.isfinite(g["diff"].astype(float))]
        d = ok["diff"].to_numpy(dtype=float)
        hib = HIGHER_IS_BETTER[base_metric(metric)]
        groups = [x["diff"].to_numpy(dtype=float) for _, x in ok.groupby("seed", sort=True)]
        per_seed = ss.seed_means(groups)
        low, high = ss.hierarchical_bootstrap(groups, n_resamples=n_resamples, level=level, seed=seed)
        pair_low, pair_high = bootstrap_ci(d, n_resamples=n_resamples, level=level, seed=seed)
        margin = float(margins.get(base_metric(metric), np.nan))
        rows.append({"backbone": backbone, "reference": grid["reference"], "other": other, "metric": metric,
                     "higher_is_better": hib, "n_seeds": int(per_seed.size), "n_pairs": int(d.size),
                     "n_dropped": int(len(g) - len(ok)),
                     "seeds_better": int(((per_seed > 0) if hib else (per_seed < 0)).sum()),
                     "reference_mean": float(ok["reference_value"].mean()) if d.size else np.nan,
                     "other_mean": float(ok["other_value"].mean()) if d.size else np.nan,
                     "diff": float(per_seed.mean()) if per_seed.size else np.nan,
                     "seed_sd": float(per_seed.std(ddof=1)) if per_seed.size > 1 else np.nan,
                     "ci_low": low, "ci_high": high, "p": ss.sign_flip_p(per_seed),
                     "p_floor": ss.smallest_p(per_seed.size), "margin": margin,
                     "p_tost": ss.tost_p(per_seed, margin) if np.isfinite(margin) else np.nan,
                     "pair_ci_low": pair_low, "pair_ci_high": pair_high, "pair_p": wilcoxon_p(d)})
    cols = ["backbone", "reference", "other", "metric", "higher_is_better", "n_seeds", "n_pairs", "n_dropped",
            "seeds_better", "reference_mean", "other_mean", "diff", "seed_sd", "ci_low", "ci_high", "p", "p_holm",
            "p_floor", "margin", "p_tost", "p_tost_holm", "verdict", "seeds_detect", "seeds_equivalence",
            "pair_ci_low", "pair_ci_high", "pair_p", "pair_p_holm"]
    out = pd.DataFrame(rows, columns=cols)
    if out.empty:
        return out
    for p in ("p", "p_tost", "pair_p"):
        out[f"{p}_holm"] = holm(out[p].to_numpy(dtype=float))
    family = max(1, int(out["p"].notna().sum()))
    out["verdict"] = [verdict(r, alpha) for r in out.itertuples()]
    out["seeds_detect"] = [ss.seeds_to_detect(r.diff, r.seed_sd, alpha, power, family) for r in out.itertuples()]
    out["seeds_equivalence"] = [ss.seeds_for_equivalence(r.diff, r.seed_sd, r.margin, alpha, power, family)
                                if np.isfinite(r.margin) else np.nan for r in out.itertuples()]
    return out


def base_metric(metric: str) -> str:
    """``last_ece`` → ``ece``: the metric kind of a per-volume column."""
    return metric.removeprefix("last_")


def resolve_margins(grid: dict, margins: dict | None = None) -> dict[str, float]:
    """The practical-equivalence margins: :data:`DEFAULT_MARGINS`, then the grid file's ``margins``, then
    ``margins`` (e.g. from the command line).

    Raises:
        ValueError: a margin that is not a positive number, or for a metric the comparison does not test.
    """
    out = dict(DEFAULT_MARGINS)
    for where, given in (("the grid's margins", grid.get("margins")), ("MARGINS", margins)):
        for k, v in (given or {}).items():
            if k not in DEFAULT_MARGINS:
                raise ValueError(f"{where}: no margin for {k!r}; the paired metrics are {', '.join(DEFAULT_MARGINS)}")
            try:
                value = float(v)
            except (TypeError, ValueError):
                value = math.nan
            if not value > 0:
                raise ValueError(f"{where}: the margin of {k!r} must be a positive number, got {v!r}")
            out[k] = value
    return out


def detected(row, alpha: float = ALPHA) -> bool:
    """A difference is detected when the Holm-corrected seed-level sign-flip p is below ``alpha`` AND the
    two-level bootstrap interval excludes 0."""
    return (finite(row.p_holm) and row.p_holm < alpha and finite(row.ci_low) and finite(row.ci_high)
            and (row.ci_low > 0 or row.ci_high < 0))


def equivalent(row, alpha: float = ALPHA) -> bool:
    """Equivalence is shown when the Holm-corrected TOST p (over the report's equivalence tests) is below
    ``alpha``."""
    return finite(row.p_tost_holm) and row.p_tost_holm < alpha


def verdict(row, alpha: float = ALPHA) -> str:
    """``better`` / ``worse`` (a detected difference, in the reference's favour or not; ``better, within the
    margin`` when equivalence is shown as well), ``equivalent`` (within ±margin), or ``inconclusive``."""
    if row.n_seeds == 0:
        return "no data"
    if detected(row, alpha):
        favours = (row.diff > 0) == bool(row.higher_is_better)
        word = "better" if favours else "worse"
        return f"{word}, within the margin" if equivalent(row, alpha) else word
    return "equivalent" if equivalent(row, alpha) else "inconclusive"
