"""Markdown tables of a comparison: the paper's Tables 1-4 (mean ± std over seeds, best in **bold**, second best
<u>underlined</u>), the selection, the paired statistics and the rankings.

Marks are given per column on the mean, by the metric's direction (DSC higher is better; ASD, ECE, CECE, NLL,
Brier lower), on the values as printed: means equal at the printed precision tie (every tied cell gets the mark),
and "second best" is the next distinct printed value. A column with one method marks only the best.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

from pipeline.compare.data import finite, higher_is_better, method_labels, region_names
from pipeline.compare.selection import summary_lookup

Column = tuple[str, str, int]  # (header, metric column, digits)


def fmt(value, digits: int = 3) -> str:
    """``value`` with ``digits`` decimals; ``—`` for NaN or None."""
    return f"{float(value):.{digits}f}" if finite(value) else "—"


def mean_std(mean, std, n: int, digits: int = 3) -> str:
    """``"0.812 ± 0.010"``; the mean alone for one seed; ``—`` without a value."""
    if not n or not finite(mean):
        return "—"
    return f"{fmt(mean, digits)} ± {fmt(std, digits)}" if n > 1 and finite(std) else fmt(mean, digits)


def best_marks(values: Sequence[float], higher_better: bool, digits: int) -> list[str]:
    """``"best"``, ``"second"`` or ``""`` per value, on the values rounded to ``digits`` (NaN never marked).

    >>> best_marks([0.80, 0.90, 0.85, float("nan")], True, 2)
    ['', 'best', 'second', '']
    """
    rounded = [round(float(v), digits) if finite(v) else None for v in values]
    distinct = sorted({v for v in rounded if v is not None}, reverse=higher_better)
    rank = {v: i for i, v in enumerate(distinct[:2])}
    return [{0: "best", 1: "second"}.get(rank.get(v), "") if v is not None else "" for v in rounded]


def decorate(text: str, mark: str) -> str:
    """Markdown for a mark: ``**bold**`` for the best, ``<u>underlined</u>`` for the second best."""
    return f"**{text}**" if mark == "best" else f"<u>{text}</u>" if mark == "second" else text


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str = "l") -> str:
    """A markdown table; the first column left-aligned, the others right-aligned unless ``align="l"``."""
    sep = ["---"] + (["---"] * (len(header) - 1) if align == "l" else ["---:"] * (len(header) - 1))
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def config_table(summary: pd.DataFrame, configs: Sequence[tuple[str, str, str]], labels: Sequence[str],
                 columns: Sequence[Column]) -> str:
    """One block: a row per configuration, a column per metric, ``mean ± std`` with the best two marked.

    Args:
        summary: from :func:`pipeline.compare.selection.seed_summary`.
        configs: ``(backbone, method, setting)`` per row.
        labels: the first cell per row.
        columns: ``(header, metric, digits)``.

    A ``seeds`` column gives the most finished seeds of the row over the metrics; a cell computed on fewer seeds
    says so (``(n=2)``).
    """
    look = summary_lookup(summary)
    cells = [[look.get((*c, m), (math.nan, math.nan, 0)) for _, m, _ in columns] for c in configs]
    marks = [best_marks([row[j][0] for row in cells], higher_is_better(m), d)
             for j, (_, m, d) in enumerate(columns)]
    rows = []
    for i, (label, row) in enumerate(zip(labels, cells)):
        seeds = max((n for _, _, n in row), default=0)
        out = [label, str(seeds)]
        for j, ((mean, std, n), (_, _, d)) in enumerate(zip(row, columns)):
            text = decorate(mean_std(mean, std, n, d), marks[j][i])
            out.append(text + (f" (n={n})" if 0 < n < seeds else ""))
        rows.append(out)
    return markdown_table(["Method", "seeds"] + [h for h, _, _ in columns], rows)


def _present(summary: pd.DataFrame, columns: Sequence[Column]) -> list[Column]:
    has = summary[summary["n"] > 0]["metric"].unique()
    return [c for c in columns if c[1] in has]


def table_columns(grid: dict, which: str) -> list[Column]:
    """The columns of Table ``which`` (``"1"``, ``"2"``, ``"3"``, ``"4"``)."""
    unit = grid.get("distance_unit", "mm")
    regions = region_names(grid)
    if which == "1":
        return ([(f"DSC {r}", f"test/dsc/{r}", 3) for r in regions] + [("DSC mean", "test/dsc", 3)]
                + [(f"ASD {r} ({unit})", f"test/asd/{r}", 2) for r in regions]
                + [(f"ASD mean ({unit})", "test/asd", 2)])
    if which == "2":
        return [("ECE", "test/ece", 3), ("CECE", "test/cece", 3), ("NLL", "test/nll", 3), ("Brier", "test/brier", 3)]
    if which == "3":
        return [("ECE pre", "test/ece", 3), ("ECE TS", "test/ts/ece", 3), ("ECE LTS", "test/lts/ece", 3),
                ("CECE pre", "test/cece", 3), ("CECE TS", "test/ts/cece", 3), ("CECE LTS", "test/lts/cece", 3)]
    if which == "4":
        return [("DSC", "test/dsc", 3), (f"ASD ({unit})", "test/asd", 2), ("ECE", "test/ece", 3),
                ("CECE", "test/cece", 3)]
    if which == "5":  # checkpoint sensitivity: best checkpoint vs the last epoch's weights
        return [(f"{name} {kind}", f"{prefix}/{m}", 3) for m, name in (("dsc", "DSC"), ("ece", "ECE"), ("cece", "CECE"))
                for kind, prefix in (("best", "test"), ("last", "test_last"))]
    raise ValueError(f"unknown table {which!r}, expected '1', '2', '3', '4' or '5'")


def paper_table(which: str, summary: pd.DataFrame, selection: pd.DataFrame, grid: dict,
                configurations: pd.DataFrame | None = None) -> str:
    """Table 1 (DSC, ASD per region and mean), 2 (ECE, CECE; NLL, Brier beyond the paper), 3 (ECE, CECE pre / TS /
    LTS), 5 (DSC, ECE, CECE of the best checkpoint and of the last epoch's weights) on the selected configurations,
    or 4 (DSC, ASD, ECE, CECE of every configuration, from
    ``configurations``: :func:`pipeline.compare.selection.setting_scores`); one block per backbone.

    Columns no run has a value for are left out (e.g. Table 3 without post-hoc calibration; NLL when not logged).
    """
    columns = _present(summary, table_columns(grid, which))
    if not columns:
        return "_No run has these metrics._"
    labels = method_labels(grid)
    rows_from = configurations if which == "4" else selection
    if rows_from is None:
        raise ValueError("Table 4 needs the configurations (setting_scores)")
    blocks = []
    for backbone in grid["backbones"]:
        part = rows_from[rows_from["backbone"] == backbone]
        if which == "4":
            part = part[part["n_finished"] > 0]
        if part.empty:
            continue
        configs = list(zip(part["backbone"], part["method"], part["setting"]))
        names = [labels[m] + (f" ({s})" if s and which == "4" else "") for _, m, s in configs]
        head = f"**Backbone `{backbone}`**\n\n" if len(grid["backbones"]) > 1 else ""
        blocks.append(head + config_table(summary, configs, names, columns))
    return "\n\n".join(blocks) if blocks else "_No finished run._"


def selection_table(scores: pd.DataFrame, selection: pd.DataFrame, grid: dict) -> str:
    """Every configuration's validation DSC (mean ± std over finished seeds), the selected ones marked ✓."""
    labels = method_labels(grid)
    chosen = set(zip(selection["backbone"], selection["method"], selection["setting"]))
    multi = len(grid["backbones"]) > 1
    rows = []
    for r in scores.itertuples():
        row = [labels[r.method], r.setting or "—", f"{r.n_finished}/{r.n_runs}",
               mean_std(r.val_mean, r.val_std, r.n_finished, 4),
               "✓" if (r.backbone, r.method, r.setting) in chosen else ""]
        rows.append(([f"`{r.backbone}`"] if multi else []) + row)
    header = (["Backbone"] if multi else []) + ["Method", "setting", "finished/runs", "val DSC", "selected"]
    return markdown_table(header, rows)


def statistics_table(comparison: pd.DataFrame, grid: dict) -> str:
    """The seed-level statistics and verdict, one row per (backbone, other method, metric), with the (seed,
    volume)-pair statistics in the last two columns (secondary: they treat one network's volumes as independent)."""
    if comparison.empty:
        return "_No pair of finished runs to compare._"
    labels = method_labels(grid)
    ref = labels[grid["reference"]]
    multi = len(grid["backbones"]) > 1
    rows = []
    for r in comparison.itertuples():
        ci = f"{fmt(r.diff, 4)} [{fmt(r.ci_low, 4)}, {fmt(r.ci_high, 4)}]"
        need = f"{fmt_seeds(r.seeds_detect)} / {fmt_seeds(r.seeds_equivalence)}" if r.verdict == "inconclusive" else ""
        pair = f"{fmt(r.pair_ci_low, 4)}, {fmt(r.pair_ci_high, 4)}"
        row = [f"{ref} vs {labels[r.other]}", r.metric.removeprefix("last_").upper(), str(r.n_seeds),
               f"{r.seeds_better}/{r.n_seeds}", fmt(r.reference_mean, 4), fmt(r.other_mean, 4), ci, fmt_p(r.p),
               fmt_p(r.p_holm), f"±{r.margin:g}" if finite(r.margin) else "—", fmt_p(r.p_tost_holm),
               f"**{r.verdict}**", need, f"[{pair}]", fmt_p(r.pair_p_holm)]
        rows.append(([f"`{r.backbone}`"] if multi else []) + row)
    header = (["Backbone"] if multi else []) + [
        "Comparison", "metric", "seeds", "seeds better", ref, "other", f"{ref} − other [95 % two-level CI]",
        "sign-flip p", "Holm p", "margin", "TOST Holm p", "verdict", "seeds needed (detect / equivalence)",
        "pairs: 95 % CI (secondary)", "pairs: Wilcoxon Holm p (secondary)"]
    return markdown_table(header, rows)


def fmt_seeds(n) -> str:
    """A seeds-needed number: ``12``, or ``∞`` when no number of seeds is expected to decide."""
    return str(int(n)) if finite(n) else "∞"


def fmt_p(p) -> str:
    """A p-value: three significant digits, ``< 0.0001`` below that, ``—`` for NaN."""
    if not finite(p):
        return "—"
    return "< 0.0001" if p < 1e-4 else f"{p:.3g}"


def ranking_table(sums: pd.DataFrame, cases: pd.DataFrame, n_cases: int, grid: dict) -> str:
    """Sum-rank (per-metric ranks of the means, their sum) and mean case-specific ranks, one row per method."""
    labels = method_labels(grid)
    metrics = [c for c in cases.columns if c != "mean"]
    header = (["Method"] + [f"rank {m.upper()}" for m in metrics] + ["sum-rank", "position"]
              + [f"case {m.upper()}" for m in metrics] + [f"case mean ({n_cases} cases)"])
    rows = []
    for method in sums.index:
        s, c = sums.loc[method], cases.loc[method]
        rows.append([labels[method]] + [fmt(s[m], 1) for m in metrics] + [fmt(s["sum"], 1), fmt(s["position"], 1)]
                    + [fmt(c[m], 2) for m in metrics] + [fmt(c["mean"], 2)])
    return markdown_table(header, rows)
