"""The words of a comparison report: the verdict paragraph generated from the paired statistics, and the protocol
line.

A difference is reported as detected only when its Holm-corrected Wilcoxon p-value is below ``alpha`` (0.05) AND
its bootstrap 95 % interval excludes 0; an interval that excludes 0 without the corrected test reaching ``alpha``
is "a difference that the corrected test does not confirm" (with few pairs the smallest attainable p-value, times
the number of tests, may stay above ``alpha``); otherwise the sentence says "no detectable difference". Each gives
the numbers. The verdict never states more than the table it comes from.
"""

from __future__ import annotations

import pandas as pd

from pipeline.compare.data import finite, method_labels
from pipeline.compare.tables import fmt, fmt_p

ALPHA = 0.05
SELECTION_RULE = ("per backbone and method, the setting with the best mean validation DSC over its finished seeds "
                  "(ties: the grid's first), as the paper §5.1.2; its test metrics as mean ± std over seeds (ddof 1)")


def detected(row, alpha: float = ALPHA) -> bool:
    """Holm p < ``alpha`` and the interval excludes 0."""
    return (finite(row.p_holm) and row.p_holm < alpha and finite(row.ci_low) and finite(row.ci_high)
            and (row.ci_low > 0 or row.ci_high < 0))


def clause(row, other_label: str, ref_label: str, alpha: float = ALPHA, n_pairs: int | None = None) -> str:
    """One metric of one comparison in words, e.g. ``lowers ECE by 0.0120 [0.0080, 0.0160] (Holm p = 0.003)``.

    Args:
        row: a row of :func:`pipeline.compare.statistics.compare_methods` (attribute access).
        n_pairs: the comparison's usual pair count; the clause names its own when it differs.
    """
    metric = row.metric.upper()
    own = f"; {row.n_pairs} pairs" if n_pairs is not None and row.n_pairs != n_pairs else ""
    if row.n_pairs == 0:
        return f"no pair with a {metric} value on both sides"
    if detected(row, alpha):
        if row.diff < 0:
            verb, lo, hi = "lowers", -row.ci_high, -row.ci_low
        else:
            verb, lo, hi = "raises", row.ci_low, row.ci_high
        return (f"{verb} {metric} by {fmt(abs(row.diff), 4)} [{fmt(lo, 4)}, {fmt(hi, 4)}] "
                f"(Holm p = {fmt_p(row.p_holm)}{own})")
    numbers = (f"{ref_label} − {other_label} = {row.diff:+.4f} [{row.ci_low:+.4f}, {row.ci_high:+.4f}], "
               f"Holm p = {fmt_p(row.p_holm)}{own}")
    if finite(row.ci_low) and finite(row.ci_high) and (row.ci_low > 0 or row.ci_high < 0):
        # the interval excludes 0 but the corrected test does not reach alpha (e.g. too few pairs for the family)
        article = "an" if metric[:1] in "AEFHILMNORSX" else "a"  # spelt letter by letter: "an ECE", "a DSC"
        return f"{article} {metric} difference that the corrected test does not confirm ({numbers})"
    return f"no detectable difference in {metric} ({numbers})"


def verdict_paragraph(comparison: pd.DataFrame, selection: pd.DataFrame, runs: pd.DataFrame, grid: dict,
                      alpha: float = ALPHA) -> str:
    """The report's first paragraph: per backbone, the reference against every other method, per metric.

    Args:
        comparison: from :func:`pipeline.compare.statistics.compare_methods`.
        selection: from :func:`pipeline.compare.selection.select_settings`.
        runs: from :func:`pipeline.compare.data.prepare_runs` (for the epochs).
    """
    labels = method_labels(grid)
    ref = labels[grid["reference"]]
    head = (f"**Verdict** ({ref} against each other method, {epochs_text(runs, grid)}, augmentation: "
            f"{grid.get('augmentation', 'unspecified')}, seeds {', '.join(str(s) for s in grid['seeds'])}).")
    sentences = []
    for backbone in grid["backbones"]:
        chosen = selection[selection["backbone"] == backbone]
        if grid["reference"] not in set(chosen["method"]):
            sentences.append(f"Backbone `{backbone}`: no verdict, {ref} has no finished run.")
            continue
        part = comparison[comparison["backbone"] == backbone]
        if part.empty:
            sentences.append(f"Backbone `{backbone}`: no verdict, no other method has a finished run on a seed "
                             f"{ref} finished.")
            continue
        parts = []
        for other, g in part.groupby("other", sort=False):
            n = int(g["n_pairs"].max())
            seeds = int(g["n_seeds"].max())
            words = "; ".join(clause(r, labels[other], ref, alpha, n) for r in g.itertuples())
            parts.append(f"against {labels[other]} ({n} pairs, {seeds} seed{'s' if seeds != 1 else ''}): {words}")
        setting = chosen[chosen["method"] == grid["reference"]]["setting"].iloc[0]
        sentences.append(f"Backbone `{backbone}`, {ref}{f' ({setting})' if setting else ''} " + "; ".join(parts)
                         + ".")
    n_tests = int(comparison["p_holm"].notna().sum()) if len(comparison) else 0
    tail = (f"Differences are {ref} − other on the same (seed, test volume); 95 % percentile bootstrap intervals "
            f"of the mean difference; two-sided Wilcoxon signed-rank p-values, Holm-corrected over the {n_tests} "
            f"tests of this report; a difference counts as detected when Holm p < {alpha:g} and the interval "
            f"excludes 0. Pairs of one seed share a trained model, so these intervals and p-values treat dependent "
            f"pairs as independent and are optimistic; 'seeds better' in the statistics table counts the seeds "
            f"whose own mean difference favours {ref}.")
    return " ".join([head] + sentences + ([tail] if n_tests else []))


def epochs_text(runs: pd.DataFrame, grid: dict) -> str:
    """``"100 epochs"``, with ``"(overridden from the grid's 100)"`` when the runs' epochs are not the grid file's
    (``grid["epochs"]``) or ``grid["epochs_overridden"]`` is set; runs with different epochs are all named."""
    values = sorted({int(e) for e in runs["epochs"]}) if len(runs) else []
    text = (f"{values[0]} epochs" if len(values) == 1 else
            f"epochs {', '.join(str(v) for v in values)} (runs differ)" if values else "no run")
    grid_epochs = grid.get("epochs")
    if grid_epochs is None:
        return text
    if len(values) > 1:
        text += f" (the grid's: {grid_epochs})"
    elif grid.get("epochs_overridden") or values != [int(grid_epochs)]:
        text += f" (overridden from the grid's {grid_epochs})"
    return text


def protocol_line(runs: pd.DataFrame, grid: dict) -> str:
    """Dataset, grid, backbones, epochs, seeds, augmentation profile and selection rule in one line."""
    backbones = ("backbones " if len(grid["backbones"]) > 1 else "backbone ") + ", ".join(
        f"`{b}`" for b in grid["backbones"])
    return (f"**Protocol.** Dataset `{grid['dataset']}`, grid `{grid['name']}`; {backbones}; "
            f"{epochs_text(runs, grid)}; seeds {', '.join(str(s) for s in grid['seeds'])}; "
            f"augmentation: {grid.get('augmentation', 'unspecified')}; selection: {SELECTION_RULE}.")
