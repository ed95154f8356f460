"""The words of a comparison report: the verdict paragraph generated from the seed-level statistics, the
checkpoint-sensitivity sentence, and the protocol line.

Each (comparison, metric) is one of (:func:`pipeline.compare.statistics.verdict`):

- *better* / *worse*: the Holm-corrected exact sign-flip p over the seed-mean differences is below ``alpha`` (0.05)
  AND the two-level bootstrap 95 % interval excludes 0;
- *equivalent within ±margin*: the Holm-corrected TOST p (two one-sided paired t-tests on the seed means) is below
  ``alpha``;
- *inconclusive*: neither; the sentence then says how many seeds would decide it.

Each clause gives the numbers; the verdict never states more than the table it comes from.
"""

from __future__ import annotations

import pandas as pd

from pipeline.compare.data import finite, method_labels
from pipeline.compare.seed_statistics import smallest_p
from pipeline.compare.statistics import ALPHA, POWER, base_metric
from pipeline.compare.tables import fmt, fmt_p

SELECTION_RULE = ("per backbone and method, the setting with the best mean validation DSC over its finished seeds "
                  "(ties: the grid's first), as the paper §5.1.2; its test metrics as mean ± std over seeds (ddof 1)")


def _seeds(n) -> str:
    if not finite(n):
        return "more seeds than can be estimated"
    return "over 1000 seeds" if n > 1000 else f"about {int(n)} seeds"


def clause(row, other_label: str, ref_label: str, n_seeds: int | None = None) -> str:
    """One metric of one comparison in words, e.g. ``ECE better: lower by 0.0120 [0.0080, 0.0160] (sign-flip Holm
    p = 0.004, 10/10 seeds)``.

    Args:
        row: a row of :func:`pipeline.compare.statistics.compare_methods` (attribute access).
        n_seeds: the comparison's usual seed count; the clause names its own when it differs.
    """
    metric = base_metric(row.metric).upper()
    if row.n_seeds == 0:
        return f"{metric}: no seed with a value on both sides"
    own = f", {row.n_seeds} seeds" if n_seeds is not None and row.n_seeds != n_seeds else ""
    interval = f"[{row.ci_low:+.4f}, {row.ci_high:+.4f}]"
    numbers = f"{ref_label} − {other_label} = {row.diff:+.4f} {interval}"
    margin = f"±{row.margin:g}" if finite(row.margin) else "no margin"
    if row.verdict.startswith(("better", "worse")):
        word = row.verdict.split(",")[0]
        lo, hi = (-row.ci_high, -row.ci_low) if row.diff < 0 else (row.ci_low, row.ci_high)
        size = f"{'lower' if row.diff < 0 else 'higher'} by {fmt(abs(row.diff), 4)} [{fmt(lo, 4)}, {fmt(hi, 4)}]"
        within = f", yet within {margin} (TOST Holm p = {fmt_p(row.p_tost_holm)})" if "margin" in row.verdict else ""
        return (f"{metric} {word}: {size} (sign-flip Holm p = {fmt_p(row.p_holm)}, {row.seeds_better}/{row.n_seeds} "
                f"seeds{own}){within}")
    if row.verdict == "equivalent":
        return f"{metric} equivalent within {margin} ({numbers}; TOST Holm p = {fmt_p(row.p_tost_holm)}{own})"
    need = [f"{_seeds(row.seeds_detect)} would detect a difference of this size" if row.diff != 0 else ""]
    if finite(row.margin):
        need.append(f"{_seeds(row.seeds_equivalence)} would show equivalence within {margin}"
                    if finite(row.seeds_equivalence) else f"equivalence within {margin} is not to be expected")
    need = [n for n in need if n]
    return (f"{metric} inconclusive ({numbers}, sign-flip Holm p = {fmt_p(row.p_holm)}, TOST Holm p = "
            f"{fmt_p(row.p_tost_holm)}{own}; " + " and ".join(need) + ")")


def verdict_paragraph(comparison: pd.DataFrame, selection: pd.DataFrame, runs: pd.DataFrame, grid: dict,
                      alpha: float = ALPHA) -> str:
    """The report's verdict: a head line, one list item per (backbone, other method) with a clause per metric, and
    the paragraph that says how the verdict was reached.

    Args:
        comparison: from :func:`pipeline.compare.statistics.compare_methods` (best checkpoints).
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
            sentences.append(f"- Backbone `{backbone}`: no verdict, {ref} has no finished run.")
            continue
        part = comparison[comparison["backbone"] == backbone]
        if part.empty:
            sentences.append(f"- Backbone `{backbone}`: no verdict, no other method has a finished run on a seed "
                             f"{ref} finished.")
            continue
        setting = chosen[chosen["method"] == grid["reference"]]["setting"].iloc[0]
        what = f"`{backbone}`, {ref}{f' ({setting})' if setting else ''}"
        for other, g in part.groupby("other", sort=False):
            seeds = int(g["n_seeds"].max())
            words = "; ".join(clause(r, labels[other], ref, seeds) for r in g.itertuples())
            sentences.append(f"- {what} against {labels[other]} ({seeds} seed{'s' if seeds != 1 else ''}): {words}.")
    blocks = [head, "\n".join(sentences)]
    if len(comparison):
        blocks.append(method_note(comparison, grid, alpha))
    return "\n\n".join(blocks)


def method_note(comparison: pd.DataFrame, grid: dict, alpha: float = ALPHA) -> str:
    """How the verdict was reached, with the family size, the margins and the smallest attainable p."""
    ref = method_labels(grid)[grid["reference"]]
    n_tests = int(comparison["p"].notna().sum())
    n_seeds = int(comparison["n_seeds"].max())
    margins = ", ".join(f"{base_metric(m).upper()} ±{v:g}" for m, v in
                        comparison.drop_duplicates("metric")[["metric", "margin"]].itertuples(index=False)
                        if finite(v))
    floor = smallest_p(n_seeds)
    reach = ("so no difference can be confirmed after the correction" if floor * n_tests >= alpha else
             "below the corrected level")
    return (f"Differences are {ref} − other, averaged over the test volumes of each seed: the trained network is the "
            f"unit. 95 % two-level bootstrap intervals (seeds resampled, then volumes within each seed); exact "
            f"two-sided sign-flip p-values over the seed means (with {n_seeds} seeds the smallest attainable is "
            f"2/2^{n_seeds} = {fmt_p(floor)}; Holm over the {n_tests} tests of this report makes it "
            f"{fmt_p(min(1.0, floor * n_tests))}, {reach}); a difference counts when Holm p < {alpha:g} and the "
            f"interval excludes 0. Equivalence: TOST (two one-sided paired t-tests on the seed means at {alpha:g} "
            f"each, i.e. the {100 * (1 - 2 * alpha):g} % t-interval inside the margin), Holm over the report's "
            f"{n_tests} equivalence tests; margins {margins}. Seeds needed: {100 * POWER:g} % power at {alpha:g}/"
            f"{n_tests}, normal approximation, from the observed seed-level spread. The (seed, volume)-pair "
            f"statistics of the table treat the volumes of one network as independent and are never the verdict.")


def checkpoint_sentence(best: pd.DataFrame, last: pd.DataFrame, grid: dict) -> str:
    """Whether the verdict holds when every run is tested with its last epoch's weights instead of its best
    checkpoint by validation DSC: how many (comparison, metric) keep their verdict, and each one that changes."""
    if best.empty:
        return "Checkpoint sensitivity: no comparison to test (no pair of finished runs)."
    if last.empty:
        return ("Checkpoint sensitivity: no run scored its last epoch's weights (runs made before this was "
                "measured), so the verdict is for the best checkpoints only.")
    labels = method_labels(grid)
    merged = best.assign(metric=best["metric"].map(base_metric)).merge(
        last.assign(metric=last["metric"].map(base_metric)), on=["backbone", "other", "metric"],
        suffixes=("", "_last"))
    same = merged[merged["verdict"] == merged["verdict_last"]]
    changed = [f"{labels[r.other]} {r.metric.upper()}: {r.verdict} → {r.verdict_last}"
               for r in merged.itertuples() if r.verdict != r.verdict_last]
    multi = len(grid["backbones"]) > 1
    if multi:
        changed = [f"`{b}` {c}" for b, c in zip(merged[merged["verdict"] != merged["verdict_last"]]["backbone"],
                                                 changed)]
    text = (f"Checkpoint sensitivity: tested with the last epoch's weights instead of the best checkpoint by "
            f"validation DSC, {len(same)} of {len(merged)} verdicts hold")
    return text + (f"; changed: {'; '.join(changed)}." if changed else ".")


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
