"""Figures of a comparison (PNG through :func:`pipeline.report.save_figure`, written atomically): radar plot
(paper Fig. 2), ranking heat map (Fig. 3), mean logits (Fig. 4), noise robustness (Fig. 5), hyperparameter
sensitivity (Fig. 6), backbones (Fig. 7) and pooled reliability diagrams (Fig. 8). Each function takes plain
numbers; the report gathers them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.report import curve_ece, draw_reliability, save_figure

GREEN, BLUE, LIGHT_BLUE = "#2ca02c", "#1f4e9c", "#5fa8e8"
METRIC_COLOURS = {"dsc": GREEN, "ece": BLUE, "cece": LIGHT_BLUE}


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def radar(means: pd.DataFrame, labels: Sequence[str], path: str | os.PathLike, title: str = "") -> Path:
    """Radar plot (paper Fig. 2): one axis per method, one closed line per metric — DSC green, ECE and CECE blue.

    The radius is the metric's value on a linear 0-1 scale, the same for every metric (DSC, ECE and CECE all lie
    in [0, 1]), so distances between the lines are comparable; a large gap between green and blue is a good
    compromise between segmentation and calibration.

    Args:
        means: rows = methods, columns among ``dsc``, ``ece``, ``cece`` (means over seeds).
        labels: one per row.
    """
    plt = pyplot()
    n = len(means)
    angles = np.linspace(0, 2 * np.pi, n, endpoint=False)
    fig, ax = plt.subplots(figsize=(5.2, 5.2), subplot_kw={"projection": "polar"})
    for metric in [c for c in ("dsc", "ece", "cece") if c in means.columns]:
        v = means[metric].to_numpy(dtype=float)
        closed = np.append(v, v[:1])
        ax.plot(np.append(angles, angles[:1]), closed, "o-", color=METRIC_COLOURS[metric], lw=1.6, ms=4,
                label=metric.upper())
        ax.fill(np.append(angles, angles[:1]), np.nan_to_num(closed), color=METRIC_COLOURS[metric], alpha=0.08)
    ax.set_xticks(angles)
    ax.set_xticklabels(labels, fontsize=9)
    ax.set_ylim(0, 1)
    ax.set_yticks([0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_yticklabels(["0.2", "0.4", "0.6", "0.8", "1.0"], fontsize=7)
    ax.set_rlabel_position(90 / max(n, 1))
    ax.legend(loc="upper right", bbox_to_anchor=(1.25, 1.12), fontsize=8)
    ax.set_title((title + "\n" if title else "") + "radius: metric value, linear 0-1", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def ranking_figure(cases: pd.DataFrame, sums: pd.DataFrame, labels: Sequence[str], n_cases: int,
                   path: str | os.PathLike, title: str = "") -> Path:
    """Paper Fig. 3: heat map of the mean case-specific ranks (methods × metrics, plus their mean), annotated, and
    the sum-rank per method as bars (lower is better).

    Args:
        cases: from :func:`pipeline.compare.ranking.case_ranks` (rows = methods; metric columns and ``mean``).
        sums: from :func:`pipeline.compare.ranking.sum_rank` (its ``sum`` column), same rows.
        labels: one per row.
    """
    plt = pyplot()
    k = len(cases)
    cols = list(cases.columns)
    values = cases.to_numpy(dtype=float)
    fig, (ax, axb) = plt.subplots(1, 2, figsize=(4.5 + 1.0 * len(cols), 1.2 + 0.45 * k),
                                  gridspec_kw={"width_ratios": [len(cols), 2.2]})
    im = ax.imshow(values, cmap="viridis_r", vmin=1, vmax=max(k, 2), aspect="auto")
    for i in range(k):
        for j in range(len(cols)):
            if np.isfinite(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if values[i, j] < (k + 1) / 2 else "black")
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels([c.upper() if c != "mean" else "global\n(mean)" for c in cols], fontsize=8)
    ax.set_yticks(range(k))
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_title(f"mean of case-specific ranks ({n_cases} cases)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, label="rank (1 = best)")
    s = sums["sum"].to_numpy(dtype=float)
    axb.barh(range(k), s, color="#7f7f7f")
    for i, v in enumerate(s):
        axb.text(v, i, f" {v:g}", va="center", fontsize=8)
    axb.set_yticks(range(k))
    axb.set_yticklabels([])
    axb.invert_yaxis()
    axb.set_xlim(0, max(float(np.nanmax(s)) * 1.25, 1) if s.size else 1)
    axb.set_title("sum-rank (lower = better)", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def noise_figure(series: dict[str, pd.DataFrame], path: str | os.PathLike, title: str = "") -> Path:
    """Paper Fig. 5: DSC and ECE against the noise σ, one line per method, mean ± std over seeds as error bars.

    Args:
        series: method label → frame with ``sigma``, ``dsc_mean``, ``dsc_std``, ``ece_mean``, ``ece_std``.
    """
    if not series:
        raise ValueError("no noise series to plot")
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for label, df in series.items():
        for ax, m in zip(axes, ("dsc", "ece")):
            ax.errorbar(df["sigma"], df[f"{m}_mean"], yerr=np.nan_to_num(df[f"{m}_std"]), marker="o", ms=4,
                        capsize=3, lw=1.2, label=label)
    for ax, name in zip(axes, ("DSC", "ECE")):
        ax.set_xlabel("noise σ")
        ax.set_ylabel(f"{name} (mean ± std over seeds)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="upper left")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def sensitivity_figure(panels: Sequence[dict], path: str | os.PathLike, title: str = "") -> Path:
    """Paper Fig. 6: per swept method, DSC (top row) and ECE (bottom row) against the hyperparameter value, mean
    over seeds with the seed std as error bars; one line per backbone, the selected value circled.

    Args:
        panels: one per method: ``label``, ``hp_name`` and ``lines``: a list of dicts with ``backbone``,
            ``values`` (frame with ``hp_value``, ``dsc_mean``, ``dsc_std``, ``ece_mean``, ``ece_std``) and
            ``selected`` (the selected hp value or NaN).
    """
    if not panels:
        raise ValueError("no method with a hyperparameter sweep")
    plt = pyplot()
    n = len(panels)
    fig, axes = plt.subplots(2, n, figsize=(3.2 * n + 0.5, 5.4), squeeze=False)
    for j, panel in enumerate(panels):
        for i, m in enumerate(("dsc", "ece")):
            ax = axes[i][j]
            for line in panel["lines"]:
                v = line["values"]
                ax.errorbar(v["hp_value"], v[f"{m}_mean"], yerr=np.nan_to_num(v[f"{m}_std"]), marker="o", ms=4,
                            capsize=3, lw=1.2, label=line["backbone"])
                sel = v[np.isclose(v["hp_value"], line["selected"])]
                ax.plot(sel["hp_value"], sel[f"{m}_mean"], "o", ms=11, mfc="none", mec="black", mew=1.2)
            ax.set_xlabel(panel["hp_name"], fontsize=8)
            ax.set_ylabel(m.upper(), fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            if i == 0:
                ax.set_title(panel["label"], fontsize=9)
    if any(len(p["lines"]) > 1 for p in panels):
        axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle((title + " — " if title else "") + "mean ± std over seeds; circled: selected value", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def backbone_figure(table: pd.DataFrame, path: str | os.PathLike, title: str = "") -> Path:
    """Paper Fig. 7: DSC, ECE and CECE of the selected models on every backbone, bars grouped by backbone, one bar
    per method, the seed std as error bars.

    Args:
        table: one row per (backbone, method label) with ``backbone``, ``label`` and ``<metric>_mean``,
            ``<metric>_std`` for ``dsc``, ``ece``, ``cece``; rows in plotting order.
    """
    if table.empty:
        raise ValueError("no backbone to plot")
    plt = pyplot()
    backbones = list(dict.fromkeys(table["backbone"]))
    methods = list(dict.fromkeys(table["label"]))
    width = 0.8 / len(methods)
    x = np.arange(len(backbones))
    fig, axes = plt.subplots(1, 3, figsize=(3.3 * 3 + 0.3 * len(backbones), 3.4))
    for ax, m in zip(axes, ("dsc", "ece", "cece")):
        for i, label in enumerate(methods):
            part = table[table["label"] == label].set_index("backbone").reindex(backbones)
            ax.bar(x + (i - (len(methods) - 1) / 2) * width, part[f"{m}_mean"].to_numpy(dtype=float), width=width,
                   yerr=np.nan_to_num(part[f"{m}_std"].to_numpy(dtype=float)), capsize=2, label=label)
        ax.set_xticks(x)
        ax.set_xticklabels(backbones, fontsize=8, rotation=20)
        ax.set_ylabel(f"{m.upper()} (mean ± std over seeds)", fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=7, loc="lower left")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def pool_curves(curves: Sequence[dict]) -> dict:
    """Pool reliability curves of several runs: bin counts summed, mean confidence and accuracy per bin weighted
    by the counts.

    Args:
        curves: dicts with ``edges`` (n_bins + 1), ``count``, ``confidence``, ``accuracy`` (n_bins; NaN when the
            bin is empty), all with the same edges.

    Raises:
        ValueError: no curve, or curves with different bin edges.
    """
    if not curves:
        raise ValueError("no reliability curve to pool")
    edges = np.asarray(curves[0]["edges"], dtype=float)
    count = np.zeros(edges.size - 1)
    conf_sum, acc_sum = np.zeros_like(count), np.zeros_like(count)
    for c in curves:
        e = np.asarray(c["edges"], dtype=float)
        if e.shape != edges.shape or not np.allclose(e, edges):
            raise ValueError(f"reliability curves with different bin edges: {edges.tolist()} and {e.tolist()}")
        n = np.asarray(c["count"], dtype=float)
        count += n
        conf_sum += n * np.nan_to_num(np.asarray(c["confidence"], dtype=float))
        acc_sum += n * np.nan_to_num(np.asarray(c["accuracy"], dtype=float))
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.where(count > 0, conf_sum / count, np.nan)
        acc = np.where(count > 0, acc_sum / count, np.nan)
    return {"edges": edges, "count": count, "confidence": conf, "accuracy": acc}


def reliability_figure(items: Sequence[tuple[str, dict, int]], path: str | os.PathLike, title: str = "") -> Path:
    """Paper Fig. 8 (bottom): the pooled reliability diagram of each selected model side by side.

    Args:
        items: ``(method label, pooled curve, number of runs pooled)`` per panel.
    """
    if not items:
        raise ValueError("no reliability curve to draw")
    plt = pyplot()
    fig, axes = plt.subplots(1, len(items), figsize=(2.7 * len(items) + 0.4, 3.1), squeeze=False)
    for ax, (label, curve, n) in zip(axes[0], items):
        draw_reliability(ax, curve)
        ax.set_title(f"{label} ({n} run{'s' if n != 1 else ''})\npooled ECE {curve_ece(curve):.4f}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def logits_figure(panels: Sequence[tuple[str, np.ndarray]], class_names: Sequence[str],
                  path: str | os.PathLike, title: str = "") -> Path:
    """Paper Fig. 4: per method the mean logit vector of each ground-truth class (bar groups), on one y scale.

    Args:
        panels: ``(method label, K×K mean logits)``; row j = the mean logits of the voxels of ground-truth class j.
    """
    k = len(class_names)
    for label, m in panels:
        if np.asarray(m).shape != (k, k):
            raise ValueError(f"{label}: mean logits must be {k}×{k} for {k} classes, got {np.asarray(m).shape}")
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=((1.4 * k + 1.5) * len(panels), 3.4), sharey=True,
                             squeeze=False)
    width = 0.8 / k
    x = np.arange(k)
    for ax, (label, m) in zip(axes[0], panels):
        m = np.asarray(m, dtype=float)
        for c in range(k):
            ax.bar(x + (c - (k - 1) / 2) * width, np.nan_to_num(m[:, c]), width=width,
                   label=f"logit {class_names[c]}")
        ax.axhline(0, color="black", lw=0.6)
        ax.set_xticks(x)
        ax.set_xticklabels(class_names, fontsize=8)
        ax.set_xlabel("ground-truth class", fontsize=8)
        ax.set_title(label, fontsize=9)
    axes[0][0].set_ylabel("mean logit")
    axes[0][-1].legend(fontsize=7, ncol=min(k, 3), loc="lower right")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)
