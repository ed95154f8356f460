"""The comparison report: ``report.md`` (verdict first, protocol, Tables 1-4, statistics, rankings, figures, runs),
the figures as PNG, ``per_volume.csv``, ``summary.json`` and ``report.html`` (the same page with the figures inlined,
which the MLflow UI shows as a page).

Every file is written atomically. The same inputs in any row order give byte-identical ``report.md``,
``per_volume.csv`` and ``summary.json``: rows are put in one canonical order first, the bootstrap has a fixed seed,
and nothing depends on time or on the machine.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.compare import figures, html
from pipeline.compare.data import finite, method_labels, noise_levels, prepare_runs, prepare_volumes, run_accounting
from pipeline.compare.ranking import RANK_METRICS, case_ranks, sum_rank
from pipeline.compare.selection import (
    finished_runs,
    seed_summary,
    select_settings,
    selected_runs,
    setting_scores,
    summary_lookup,
)
from pipeline.compare.statistics import LAST_METRICS, N_RESAMPLES, compare_methods, paired_differences
from pipeline.compare.tables import (
    markdown_table,
    mean_std,
    paper_table,
    ranking_table,
    selection_table,
    statistics_table,
)
from pipeline.compare.verdict import checkpoint_sentence, protocol_line, verdict_paragraph
from pipeline.io import write_json_atomic, write_text_atomic, write_with
from pipeline.report import confidence_maps

RANK_COLUMNS = {"dsc": "test/dsc", "asd": "test/asd", "ece": "test/ece", "cece": "test/cece"}
STATISTICS_NOTE = ("Per seed, the difference averaged over its test volumes; the verdict rests on these seed means "
                   "(sign-flip and TOST tests, two-level bootstrap). *Seeds needed* (for inconclusive rows): to "
                   "detect a difference of the observed size, and to show equivalence within the margin, at 80 % "
                   "power. The last two columns treat every (seed, volume) pair as independent: shown for "
                   "comparison with the usual practice, never used for the verdict.")
CHECKPOINT_NOTE = ("Every run is tested twice: with its best checkpoint by validation DSC (the paper's protocol, the "
                   "tables above) and with the weights of its last epoch (`test_last/…`, no post-hoc calibration); "
                   "mean ± std over seeds of the selected configurations.")


def write_report(folder: str | os.PathLike, runs: pd.DataFrame, volumes: pd.DataFrame, grid: dict,
                 extras: dict | None = None, n_resamples: int = N_RESAMPLES) -> Path:
    """Write the comparison report into ``folder``; returns the path of ``report.md``.

    Args:
        folder: the report folder (created if needed).
        runs: one row per training (:mod:`pipeline.compare.data`).
        volumes: one row per (run key, test volume).
        grid: the grid description.
        extras: optional run key → ``{"reliability": {"pre": curve, …}, "confidence_map": {…}, "mean_logits":
            K×K}`` for Figs 4 and 8; what is missing is skipped and said in the report.
        n_resamples: bootstrap resamples (default 10 000).

    Raises:
        ValueError: inputs that break the data contract (named in the message).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    runs = prepare_runs(runs, grid)
    volumes = prepare_volumes(volumes, runs, grid)
    extras = extras or {}
    labels = method_labels(grid)

    scores = setting_scores(runs, grid)
    selection = select_settings(runs, grid)
    summary = seed_summary(runs, grid)
    pairs = paired_differences(runs, volumes, selection, grid)
    comparison = compare_methods(pairs, grid, n_resamples=n_resamples)
    last_metrics = tuple(m for m in LAST_METRICS if m in volumes.columns)
    last = (compare_methods(paired_differences(runs, volumes, selection, grid, last_metrics), grid,
                            n_resamples=n_resamples) if last_metrics else comparison.iloc[0:0])
    accounting = run_accounting(runs, grid)
    chosen = selected_runs(runs, selection)
    cases = volumes.merge(chosen[["key"]], on="key", how="inner")

    rankings, rank_md = {}, []
    for backbone in grid["backbones"]:
        methods = list(selection[selection["backbone"] == backbone]["method"])
        if not methods:
            continue
        look = summary_lookup(summary)
        setting = dict(zip(selection["method"][selection["backbone"] == backbone],
                           selection["setting"][selection["backbone"] == backbone]))
        means = pd.DataFrame({k: [look.get((backbone, m, setting[m], col), (math.nan,))[0] for m in methods]
                              for k, col in RANK_COLUMNS.items()}, index=methods)
        sums = sum_rank(means)
        cr, n_cases = case_ranks(cases[cases["backbone"] == backbone], methods, RANK_METRICS)
        rankings[backbone] = {"means": means, "sum_rank": sums, "case_ranks": cr, "n_cases": n_cases}
        head = f"**Backbone `{backbone}`**\n\n" if len(grid["backbones"]) > 1 else ""
        rank_md.append(head + ranking_table(sums, cr, n_cases, grid))

    made, skipped = draw_figures(folder, runs, summary, scores, selection, rankings, grid, extras)

    table2_note = ("ECE and CECE on the ground-truth foreground voxels, 15 bins (paper §5.1.1); NLL and Brier "
                   "beyond the paper.")
    marks_note = ("Mean ± std over seeds (ddof 1; one seed: the value alone); **best**, <u>second best</u> per "
                  "column on the printed mean; `seeds`: finished runs of the configuration.")
    rank_note = ("Sum-rank: per metric, rank of the mean over seeds (1 = best; ties averaged), summed. "
                 "Case-specific: for every (seed, test volume) with a finished run of every method, rank the "
                 "methods per metric, then average over the cases; a missing value ranks last.")
    lines = [f"# Comparison `{grid['name']}` on `{grid['dataset']}`", "",
             verdict_paragraph(comparison, selection, runs, grid), "", checkpoint_sentence(comparison, last, grid), "",
             protocol_line(runs, grid), "",
             "## Selection (validation DSC per configuration)", "", selection_table(scores, selection, grid), "",
             "## Table 1: segmentation (test, selected configurations)", "",
             paper_table("1", summary, selection, grid), "",
             "## Table 2: calibration (test, selected configurations)", "", table2_note, "",
             paper_table("2", summary, selection, grid), "",
             "## Table 3: post-hoc calibration (pre / TS / LTS)", "", paper_table("3", summary, selection, grid), ""]
    if grid.get("penalties"):
        lines += ["## Table 4: every configuration", "", paper_table("4", summary, selection, grid, scores), ""]
    lines += [marks_note, "", "## Paired statistics (the seed is the unit)", "", STATISTICS_NOTE, "",
              statistics_table(comparison, grid), "", "## Checkpoint sensitivity: best vs last epoch", "",
              CHECKPOINT_NOTE, "", paper_table("5", summary, selection, grid), ""]
    if len(last):
        lines += ["The paired statistics with the last epoch's weights (a family of its own for Holm):", "",
                  statistics_table(last, grid), ""]
    lines += ["## Rankings (paper Fig. 3)", "", rank_note, "",
              "\n\n".join(rank_md) or "_No finished run._", "", "## Figures", ""]
    lines += [f"**{caption}**\n\n![{caption}]({name})\n" for caption, name in made]
    lines += [f"- {s}" for s in skipped] + ([""] if skipped else [])
    lines += ["## Runs", "", runs_section(accounting, grid), ""]
    report = folder / "report.md"
    write_text_atomic(report, "\n".join(lines).rstrip() + "\n")
    write_text_atomic(folder / "report.html", html.render(report.read_text(), folder))  # for the MLflow UI

    out = volumes.drop(columns=["order"])
    write_with(lambda tmp: out.to_csv(tmp, index=False), folder / "per_volume.csv")
    write_json_atomic(folder / "summary.json", jsonable({
        "grid": {k: grid.get(k) for k in ("name", "dataset", "reference", "baseline", "backbones", "seeds",
                                          "epochs", "epochs_overridden", "augmentation", "penalties")},
        "epochs": sorted({int(e) for e in runs["epochs"]}),
        "selection": selection.to_dict("records"), "settings": scores.to_dict("records"),
        "seed_summary": summary.to_dict("records"), "statistics": comparison.to_dict("records"),
        "statistics_last": last.to_dict("records"),
        "rankings": {b: {"means": r["means"].to_dict("index"), "sum_rank": r["sum_rank"].to_dict("index"),
                         "case_ranks": r["case_ranks"].to_dict("index"), "n_cases": r["n_cases"]}
                     for b, r in rankings.items()},
        "runs": accounting, "figures": [name for _, name in made], "skipped_figures": skipped,
        "labels": labels}))
    return report


def runs_section(accounting: dict, grid: dict) -> str:
    """Counts of the runs and every run that did not finish or is missing, by method, setting, seed and key."""
    labels = method_labels(grid)
    st = accounting["by_status"]
    lines = [(f"{accounting['expected']} runs expected by the grid, {accounting['present']} present: "
              f"{st['FINISHED']} finished, {st['FAILED']} failed, {st['RUNNING']} running, {st['KILLED']} killed; "
              f"{len(accounting['missing'])} missing. Only finished runs enter the tables and statistics.")]
    if accounting["not_finished"]:
        lines += ["", "Not finished:", "", markdown_table(
            ["status", "backbone", "method", "setting", "seed", "key"],
            [[r["status"], f"`{r['backbone']}`", labels[r["method"]], r["setting"] or "—", str(r["seed"]),
              f"`{r['key']}`"] for r in accounting["not_finished"]])]
    if accounting["missing"]:
        lines += ["", "Missing (in the grid, no run):", "", markdown_table(
            ["backbone", "method", "setting", "seed"],
            [[f"`{r['backbone']}`", labels[r["method"]], r["setting"] or "—", str(r["seed"])]
             for r in accounting["missing"]])]
    return "\n".join(lines)


def draw_figures(folder: Path, runs: pd.DataFrame, summary: pd.DataFrame, scores: pd.DataFrame,
                 selection: pd.DataFrame, rankings: dict, grid: dict, extras: dict
                 ) -> tuple[list[tuple[str, str]], list[str]]:
    """Draw every figure the inputs allow; returns ``[(caption, file name)]`` and the reasons for those skipped."""
    labels = method_labels(grid)
    look = summary_lookup(summary)
    made, skipped = [], []
    multi = len(grid["backbones"]) > 1
    fin = finished_runs(runs)
    for backbone in grid["backbones"]:
        sel = selection[selection["backbone"] == backbone]
        if sel.empty:
            skipped.append(f"backbone `{backbone}`: no finished run, no figure")
            continue
        tag, on = safe_name(backbone), (f" — `{backbone}`" if multi else "")
        methods, settings = list(sel["method"]), dict(zip(sel["method"], sel["setting"]))
        names = [labels[m] for m in methods]
        r = rankings[backbone]
        name = f"fig2_radar_{tag}.png"
        figures.radar(r["means"][["dsc", "ece", "cece"]], names, folder / name)
        made.append((f"Fig. 2: DSC, ECE and CECE of the selected models{on}", name))
        name = f"fig3_ranking_{tag}.png"
        figures.ranking_figure(r["case_ranks"], r["sum_rank"], names, r["n_cases"], folder / name)
        made.append((f"Fig. 3: rankings{on}", name))

        by_method = {m: fin[(fin["backbone"] == backbone) & (fin["method"] == m) & (fin["setting"] == settings[m])]
                     for m in methods}
        pair = [m for m in dict.fromkeys([grid["baseline"], grid["reference"]]) if m in methods]
        logits = []
        for m in pair:
            mats = [np.asarray(extras[k]["mean_logits"], dtype=float) for k in by_method[m]["key"]
                    if "mean_logits" in extras.get(k, {})]
            if mats:
                logits.append((f"{labels[m]} ({len(mats)} seed{'s' if len(mats) != 1 else ''})",
                               np.nanmean(np.stack(mats), axis=0)))
        if len(logits) == 2:
            name = f"fig4_logits_{tag}.png"
            figures.logits_figure(logits, grid["class_names"], folder / name)
            distances = distance_text([(labels[m], (backbone, m, settings[m])) for m in pair], look)
            made.append((f"Fig. 4: mean logits per ground-truth class, averaged over seeds{distances}{on}", name))
        else:
            skipped.append(f"Fig. 4{on}: needs the mean logits of {labels[grid['baseline']]} and "
                           f"{labels[grid['reference']]} (found for {len(logits)} of them)")

        levels = noise_levels(runs)
        if levels:
            rows = ([] if any(s == 0 for s, _ in levels) else [(0.0, None)]) + levels
            series = {}
            for m in methods:
                key = (backbone, m, settings[m])
                cols = {s: (f"test/noise_{lab}" if lab is not None else "test") for s, lab in rows}
                df = pd.DataFrame([{"sigma": s, **{f"{k}_{x}": look.get((*key, f"{c}/{k}"), (math.nan,) * 3)[i]
                                                   for k in ("dsc", "ece") for i, x in enumerate(("mean", "std"))}}
                                   for s, c in cols.items()])
                series[labels[m]] = df
            name = f"fig5_noise_{tag}.png"
            figures.noise_figure(series, folder / name)
            clean = "; σ = 0 is the clean test set" if rows[0][1] is None else ""
            made.append((f"Fig. 5: robustness to Gaussian noise, mean ± std over seeds{clean}{on}", name))
        else:
            skipped.append(f"Fig. 5{on}: no test/noise_<σ>/… metric in the runs")

        rel, n_missing = [], []
        for m in methods:
            curves = [extras[k]["reliability"]["pre"] for k in by_method[m]["key"]
                      if "pre" in (extras.get(k, {}).get("reliability") or {})]
            if curves:
                rel.append((labels[m], figures.pool_curves(curves), len(curves)))
            if len(curves) < len(by_method[m]):
                n_missing.append(f"{labels[m]} {len(by_method[m]) - len(curves)}")
        if rel:
            name = f"fig8_reliability_{tag}.png"
            figures.reliability_figure(rel, folder / name)
            made.append((f"Fig. 8: reliability diagrams of the selected models, bins pooled over seeds{on}", name))
        if n_missing:
            skipped.append(f"Fig. 8{on}: runs without a reliability curve: {', '.join(n_missing)}")

        maps = []
        for m in methods:
            keys = [k for k in by_method[m]["key"] if "confidence_map" in extras.get(k, {})]
            if keys:
                row = dict(extras[keys[0]]["confidence_map"])
                seed = int(by_method[m][by_method[m]["key"] == keys[0]]["seed"].iloc[0])
                maps.append({**row, "id": f"{labels[m]} (seed {seed})\n{row.get('id', '?')}",
                             "volume": (str(row.get("id")), row.get("slice"))})
        if maps:
            name = f"fig8_confidence_{tag}.png"
            confidence_maps(maps, grid["class_names"], folder / name)
            places = sorted({f"{v} slice {s}" for v, s in (m["volume"] for m in maps)})
            note = "" if len(places) == 1 else " (NOT the same slice for every method)"
            made.append((f"Fig. 8: confidence maps of the selected models, {'; '.join(places)}{note}{on}", name))
        else:
            skipped.append(f"Fig. 8{on}: no confidence map given")

    if multi:
        rows = [{"backbone": r.backbone, "label": labels[r.method],
                 **{f"{k}_{x}": look.get((r.backbone, r.method, r.setting, f"test/{k}"), (math.nan,) * 3)[i]
                    for k in ("dsc", "ece", "cece") for i, x in enumerate(("mean", "std"))}}
                for r in selection.itertuples()]
        if rows:
            figures.backbone_figure(pd.DataFrame(rows), folder / "fig7_backbones.png")
            made.append(("Fig. 7: the selected models on every backbone", "fig7_backbones.png"))
    panels = sensitivity_panels(scores, summary, selection, grid)
    if panels:
        figures.sensitivity_figure(panels, folder / "fig6_sensitivity.png")
        made.append(("Fig. 6: sensitivity to the hyperparameter (DSC top, ECE bottom)", "fig6_sensitivity.png"))
    else:
        skipped.append("Fig. 6: no method with finished runs at two or more hyperparameter values")
    return sorted(made, key=lambda m: figure_number(m[0])), sorted(skipped, key=figure_number)


def distance_text(configs: list[tuple[str, tuple]], look: dict) -> str:
    """The logit distances ``max_j l_j − l_k`` of each configuration on the test volumes, mean and largest, as
    ``"; logit distances … : CE 6.2 ± 0.3 / 18.1 ± 1.0, …"``; empty when the runs did not log them."""
    parts = []
    for label, key in configs:
        found = [look.get((*key, f"test/logits/distance_{k}")) for k in ("mean", "max")]
        if all(f is not None and finite(f[0]) for f in found):
            parts.append(f"{label} {' / '.join(mean_std(*f, digits=1) for f in found)}")
    if not parts:
        return ""
    return ("; logit distances max_j l_j − l_k on the test volumes, mean / largest (mean ± std over seeds): "
            + ", ".join(parts))


def figure_number(caption: str) -> int:
    """The paper's figure number at the start of a caption (``"Fig. 5: …"`` → 5; 0 when there is none)."""
    m = re.match(r"Fig\. (\d+)", caption)
    return int(m.group(1)) if m else 0


def sensitivity_panels(scores: pd.DataFrame, summary: pd.DataFrame, selection: pd.DataFrame, grid: dict
                       ) -> list[dict]:
    """The data of Fig. 6: per swept method with at least two finished settings on some backbone."""
    look = summary_lookup(summary)
    chosen = {(r.backbone, r.method): r.hp_value for r in selection.itertuples()}
    panels = []
    for m in grid["methods"]:
        if not m.get("hp_name"):
            continue
        lines = []
        for backbone in grid["backbones"]:
            s = scores[(scores["backbone"] == backbone) & (scores["method"] == m["name"]) & (scores["n_finished"] > 0)]
            if len(s) < 2:
                continue
            rows = [{"hp_value": r.hp_value, **{f"{k}_{x}": look.get((backbone, r.method, r.setting, f"test/{k}"),
                                                                     (math.nan,) * 3)[i]
                                                for k in ("dsc", "ece") for i, x in enumerate(("mean", "std"))}}
                    for r in s.itertuples()]
            lines.append({"backbone": backbone, "values": pd.DataFrame(rows).sort_values("hp_value"),
                          "selected": chosen.get((backbone, m["name"]), math.nan)})
        if lines:
            panels.append({"label": m["label"], "hp_name": m["hp_name"], "lines": lines})
    return panels


def safe_name(text: str) -> str:
    """``text`` reduced to letters, digits, ``-``, ``_`` and ``.`` for a file name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)) or "_"


def jsonable(obj):
    """``obj`` with NaN/inf as ``None`` and numpy scalars and arrays as Python values (valid JSON)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer, int)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    return obj

