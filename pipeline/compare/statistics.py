"""Paired statistics the paper lacks: the reference method against every other method on the same seeds and test
volumes.

A pair is one (seed, test volume): the reference's selected configuration and the other method's selected
configuration, same backbone, trained with the same seed, evaluated on the same volume; only pairs where both runs
finished and both values are finite count. Per metric (per-volume DSC, ECE, CECE):

- the mean difference ``reference − other``;
- a bootstrap 95 % percentile interval of that mean (pairs resampled with replacement, 10 000 resamples, a fixed
  generator seed);
- the two-sided Wilcoxon signed-rank p-value (``scipy.stats.wilcoxon``, zero differences dropped — Wilcoxon's
  original rule — exact null distribution up to 50 non-zero pairs without ties, normal approximation beyond);
  every difference zero gives p = 1 (no evidence of a difference), no pair gives NaN;
- Holm's step-down correction over every (backbone, comparison, metric) of the report, NaN p-values left out of
  the family.

Pairs share a trained model within a seed and a volume across seeds, so they are not independent: the intervals
and p-values treat them as if they were and are optimistic; the count of seeds whose own mean difference favours
the reference (``seeds_better``) is given beside them as a check that does not rest on that assumption.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats as sps

from pipeline.compare.data import HIGHER_IS_BETTER, canonical_sort
from pipeline.compare.selection import finished_runs

PAIRED_METRICS = ("dsc", "ece", "cece")
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
                    seed: int = BOOTSTRAP_SEED) -> pd.DataFrame:
    """Summarise :func:`paired_differences` per (backbone, other method, metric), Holm-corrected over all rows.

    Returns:
        ``backbone``, ``reference``, ``other``, ``metric``, ``higher_is_better``, ``n_pairs`` (finite pairs),
        ``n_dropped`` (pairs without a value on both sides), ``n_seeds``, ``seeds_better`` (seeds whose mean
        difference favours the reference), ``reference_mean``, ``other_mean``, ``diff`` (mean of reference −
        other), ``ci_low``, ``ci_high``, ``p`` (Wilcoxon), ``p_holm``.
    """
    rows = []
    for (backbone, other, metric), g in pairs.groupby(["backbone", "other", "metric"], sort=False):
        ok = g[np.isfinite(g["diff"].astype(float))]
        d = ok["diff"].to_numpy(dtype=float)
        hib = HIGHER_IS_BETTER[metric]
        per_seed = ok.groupby("seed")["diff"].mean()
        low, high = bootstrap_ci(d, n_resamples=n_resamples, level=level, seed=seed)
        rows.append({"backbone": backbone, "reference": grid["reference"], "other": other, "metric": metric,
                     "higher_is_better": hib, "n_pairs": int(d.size), "n_dropped": int(len(g) - len(ok)),
                     "n_seeds": int(per_seed.size),
                     "seeds_better": int(((per_seed > 0) if hib else (per_seed < 0)).sum()),
                     "reference_mean": float(ok["reference_value"].mean()) if d.size else np.nan,
                     "other_mean": float(ok["other_value"].mean()) if d.size else np.nan,
                     "diff": float(d.mean()) if d.size else np.nan, "ci_low": low, "ci_high": high,
                     "p": wilcoxon_p(d)})
    cols = ["backbone", "reference", "other", "metric", "higher_is_better", "n_pairs", "n_dropped", "n_seeds",
            "seeds_better", "reference_mean", "other_mean", "diff", "ci_low", "ci_high", "p", "p_holm"]
    out = pd.DataFrame(rows, columns=cols)
    out["p_holm"] = holm(out["p"].to_numpy(dtype=float)) if len(out) else []
    return out
