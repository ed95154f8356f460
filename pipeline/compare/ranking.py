"""Rankings of the methods (paper Fig. 3), after the challenge ranking schemes (ISLES 2015, Maier et al. 2017;
BraTS, Bakas et al. 2018).

- **Sum-rank**: rank the methods on each metric's mean over seeds (DSC higher is better; ASD, ECE, CECE lower),
  then the global score is the sum of the per-metric ranks (lower is better).
- **Mean of case-specific ranks**: for every case (seed, test volume) rank the methods on each metric, average the
  ranks over the cases → a methods × metrics matrix (the heat map); the global score is its mean over metrics.

Rank 1 is the best; ties share the average of their ranks; a missing value (NaN) ranks after every finite value
(the NaNs of one metric tie among themselves). A case counts only when every method has a finished run for its
seed and a row for its volume, so a failed training does not move the other methods' ranks.
"""

from __future__ import annotations

import pandas as pd

from pipeline.compare.data import higher_is_better

RANK_METRICS = ("dsc", "asd", "ece", "cece")


def rank_columns(values: pd.DataFrame) -> pd.DataFrame:
    """Rank the rows of every column: 1 = best by the column's direction (:func:`higher_is_better` of its name),
    average ranks for ties, NaN after all finite values.

    Args:
        values: rows = methods, columns = metric names (``dsc``, ``test/ece``, …).

    >>> rank_columns(pd.DataFrame({"dsc": [0.8, 0.9, 0.8]}))["dsc"].tolist()
    [2.5, 1.0, 2.5]
    """
    ranks = {c: values[c].astype(float).rank(method="average", ascending=not higher_is_better(str(c)),
                                              na_option="bottom") for c in values.columns}
    return pd.DataFrame(ranks, index=values.index, columns=values.columns)


def sum_rank(means: pd.DataFrame) -> pd.DataFrame:
    """Sum-rank of methods on their means over seeds.

    Args:
        means: rows = methods (in report order), columns = metric names, values = means over seeds.

    Returns:
        the per-metric ranks, ``sum`` (the global score) and ``position`` (rank of ``sum``, ties averaged).
    """
    ranks = rank_columns(means)
    ranks["sum"] = ranks[list(means.columns)].sum(axis=1)
    ranks["position"] = ranks["sum"].rank(method="average")
    return ranks


def case_ranks(cases: pd.DataFrame, methods: list[str], metrics: tuple[str, ...] = RANK_METRICS
               ) -> tuple[pd.DataFrame, int]:
    """Mean of case-specific ranks.

    Args:
        cases: one row per (method, seed, volume) of the selected configurations' finished runs, with columns
            ``key`` (the run), ``method``, ``seed``, ``id`` and the metric columns (per-volume values; a metric
            column that is absent ranks every method equal).
        methods: the methods to rank, in report order.
        metrics: the metric columns (default DSC, ASD, ECE, CECE).

    Returns:
        ``(ranks, n_cases)``: ranks has rows = methods, columns = metrics (mean rank over the cases) and ``mean``
        (the global score: the mean over metrics); NaN everywhere when no case has every method.
    """
    present = cases[cases["method"].isin(methods)]
    table = present.pivot_table(index=["seed", "id"], columns="method", values="key", aggfunc="count")
    table = table.reindex(columns=methods)
    complete = table.index[table.notna().all(axis=1)] if len(table) else pd.Index([])
    out = pd.DataFrame(index=pd.Index(methods, name="method"), columns=list(metrics), dtype=float)
    if len(complete):
        keep = present.set_index(["seed", "id"]).loc[complete].reset_index()
        for metric in metrics:
            if metric not in keep.columns:
                out[metric] = (len(methods) + 1) / 2
                continue
            wide = keep.pivot(index=["seed", "id"], columns="method", values=metric).reindex(columns=methods)
            ranks = wide.astype(float).rank(axis=1, method="average", ascending=not higher_is_better(metric),
                                            na_option="bottom")
            out[metric] = ranks.mean(axis=0)
    out["mean"] = out[list(metrics)].mean(axis=1)
    return out, len(complete)
