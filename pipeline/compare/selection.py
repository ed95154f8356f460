"""Model selection as the paper (§5.1.2) and the summary over seeds.

"We have chosen the commonly used hyper-parameters and considered the values which provided the best DSC on the
validation dataset": per (backbone, method), the setting with the best mean validation DSC over its finished
seeds; the test metrics of that configuration are reported.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.compare.data import SELECTION_SCORE, canonical_sort

CONFIG = ["backbone", "method", "setting"]
TIE_TOLERANCE = 1e-12


def finished_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The rows with status ``FINISHED``."""
    return runs[runs["status"] == "FINISHED"]


def setting_scores(runs: pd.DataFrame, grid: dict) -> pd.DataFrame:
    """The validation score of every configuration (backbone, method, setting).

    Args:
        runs: from :func:`pipeline.compare.data.prepare_runs`.

    Returns:
        one row per configuration: ``backbone``, ``method``, ``setting``, ``order``, ``hp_value``, ``n_runs`` (all
        statuses), ``n_finished`` (finished with a finite validation score), ``val_mean``, ``val_std`` (ddof 1; NaN
        for fewer than 2 seeds).
    """
    rows = []
    for (bb, method, setting), g in runs.groupby(CONFIG, sort=False):
        ok = finished_runs(g)[SELECTION_SCORE].astype(float)
        ok = ok[np.isfinite(ok)]
        rows.append({"backbone": bb, "method": method, "setting": setting, "order": int(g["order"].min()),
                     "hp_value": float(g["hp_value"].iloc[0]), "n_runs": len(g), "n_finished": len(ok),
                     "val_mean": float(ok.mean()) if len(ok) else np.nan,
                     "val_std": float(ok.std(ddof=1)) if len(ok) > 1 else np.nan})
    cols = ["backbone", "method", "setting", "order", "hp_value", "n_runs", "n_finished", "val_mean", "val_std"]
    return canonical_sort(pd.DataFrame(rows, columns=cols), grid)


def select_settings(runs: pd.DataFrame, grid: dict) -> pd.DataFrame:
    """The selected configuration per (backbone, method): the best mean validation DSC over finished seeds.

    Means within ``TIE_TOLERANCE`` (1e-12) of the best are ties, broken by the lowest ``order`` (the grid's first
    value). A method none of whose runs finished with a validation score has no row.

    Returns:
        :func:`setting_scores` rows of the selected configurations, plus ``n_settings`` (candidates with a score).
    """
    scores = setting_scores(runs, grid)
    scored = scores[scores["n_finished"] > 0]
    rows = []
    for (_, _), g in scored.groupby(["backbone", "method"], sort=False):
        best = g["val_mean"].max()
        tied = g[g["val_mean"] >= best - TIE_TOLERANCE]
        row = tied.sort_values("order", kind="mergesort").iloc[0].to_dict()
        row["n_settings"] = len(g)
        rows.append(row)
    cols = list(scores.columns) + ["n_settings"]
    return canonical_sort(pd.DataFrame(rows, columns=cols), grid)


def selected_runs(runs: pd.DataFrame, selection: pd.DataFrame) -> pd.DataFrame:
    """The finished runs of the selected configurations (every seed), in the runs' order."""
    chosen = selection[CONFIG].drop_duplicates()
    fin = finished_runs(runs)
    return fin.merge(chosen, on=CONFIG, how="inner").reset_index(drop=True)


def metric_columns(runs: pd.DataFrame) -> list[str]:
    """The score and test metric columns: ``val/best_dsc`` then every ``test/…`` column sorted by name (an order
    that does not depend on the order of the runs' columns), then the ``test_last/…`` columns (the last epoch's
    weights) likewise."""
    return [SELECTION_SCORE] + sorted(str(c) for c in runs.columns if str(c).startswith(("test/", "test_last/")))


def seed_summary(runs: pd.DataFrame, grid: dict, metrics: list[str] | None = None) -> pd.DataFrame:
    """Mean ± std over seeds of every metric, per configuration, on the finished runs.

    Args:
        runs: from :func:`pipeline.compare.data.prepare_runs`.
        metrics: the columns to summarise; default :func:`metric_columns`.

    Returns:
        long table: ``backbone``, ``method``, ``setting``, ``order``, ``metric``, ``mean``, ``std`` (ddof 1, NaN when
        ``n`` < 2), ``n`` (finished runs with a finite value); metrics in the order given.
    """
    metrics = metric_columns(runs) if metrics is None else list(metrics)
    fin = finished_runs(runs)
    rows = []
    for (bb, method, setting), g in fin.groupby(CONFIG, sort=False):
        for metric in metrics:
            v = pd.to_numeric(g[metric], errors="coerce").astype(float) if metric in g else pd.Series(dtype=float)
            v = v[np.isfinite(v)]
            rows.append({"backbone": bb, "method": method, "setting": setting, "order": int(g["order"].min()),
                         "metric": metric, "mean": float(v.mean()) if len(v) else np.nan,
                         "std": float(v.std(ddof=1)) if len(v) > 1 else np.nan, "n": len(v)})
    cols = ["backbone", "method", "setting", "order", "metric", "mean", "std", "n"]
    return canonical_sort(pd.DataFrame(rows, columns=cols), grid)


def summary_lookup(summary: pd.DataFrame) -> dict[tuple[str, str, str, str], tuple[float, float, int]]:
    """``(backbone, method, setting, metric) → (mean, std, n)`` from :func:`seed_summary`."""
    return {(r.backbone, r.method, r.setting, r.metric): (r.mean, r.std, r.n) for r in summary.itertuples()}
