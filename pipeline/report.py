"""Reports of an evaluation: tables, the per-volume CSV, the markdown summary and every figure (PNG) and map
(NIfTI) of a run.

Every file is written to a temporary name in its folder and then renamed, so a report that fails half-way never
replaces a good file with a broken one.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.io import atomic_path, write_with
from pipeline.metrics.calibration import bin_edges


def _fmt(v: float, digits: int = 3) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _distance_unit(results: dict) -> str:
    """The unit of ASD: ``mm``, or the dataset's ``dataset::distance_unit`` (e.g. ``px`` for BUSI)."""
    return results.get("distance_unit", "mm")


def _asd_label(results: dict) -> str:
    return f"ASD({_distance_unit(results)})"


def results_table(results: dict) -> str:
    """The test table: per foreground class DSC, ASD, ECE and SCE, then the mean row.

    ``results`` is what :func:`pipeline.evaluation.results.summarise` returns. Per class, ECE is the top-label ECE on
    the voxels of that ground-truth class and SCE the classwise calibration error of that class's probability; the mean
    row holds the mean DSC and ASD over foreground classes, the foreground ECE and the CECE (mean SCE over all
    channels, background included), each averaged over test volumes.
    """
    names = results["class_names"]
    pc = results["per_class"]
    header = f"{'class':<14}{'DSC':>8}{_asd_label(results):>10}{'ECE':>8}{'SCE':>8}"
    lines = [header, "-" * len(header)]
    for name in names[1:] + list(results.get("region_names") or []):  # evaluation regions after the classes
        c = pc[name]
        lines.append(f"{name:<14}{_fmt(c['dsc']):>8}{_fmt(c['asd'], 2):>10}{_fmt(c['ece']):>8}{_fmt(c['sce']):>8}")
    m = results["mean"]
    lines.append("-" * len(header))
    lines.append(f"{'mean':<14}{_fmt(m['dsc']):>8}{_fmt(m['asd'], 2):>10}{_fmt(m['ece']):>8}{_fmt(m['cece']):>8}")
    lines.append(
        f"(mean row: ECE = foreground ECE, last column = CECE; NLL {_fmt(m['nll'])}, Brier {_fmt(m['brier'])}; "
        f"{results['n_volumes']} test volumes)"
    )
    for note in results.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def write_per_volume_csv(path: str | os.PathLike, rows: Sequence[dict]) -> None:
    """One row per test volume with every per-volume metric."""
    path = Path(path)
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def reliability_diagram(curve: dict, path: str | os.PathLike, title: str = "", ece_value: float | None = None) -> Path:
    """Plot accuracy against confidence per bin, with the diagonal and the calibration gap shaded (paper Fig. 8).

    Args:
        curve: ``CalibrationStats.reliability()``: ``edges``, ``count``, ``confidence``, ``accuracy``.
        path: the PNG to write.
        title: figure title; the ECE is appended when given.
    """
    plt = _pyplot()
    edges = np.asarray(curve["edges"])
    centers = (edges[:-1] + edges[1:]) / 2
    width = edges[1] - edges[0]
    acc = np.nan_to_num(np.asarray(curve["accuracy"], dtype=float))
    conf = np.asarray(curve["confidence"], dtype=float)
    count = np.asarray(curve["count"], dtype=float)
    filled = count > 0

    fig, (ax, axh) = plt.subplots(2, 1, figsize=(4.8, 6), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    ax.bar(centers[filled], acc[filled], width=width, edgecolor="black", color="#3b75af", label="accuracy")
    gap_lo = np.minimum(acc, conf)[filled]
    gap_hi = np.maximum(acc, conf)[filled]
    ax.bar(centers[filled], gap_hi - gap_lo, bottom=gap_lo, width=width, color="#d62728", alpha=0.35,
           edgecolor="#d62728", hatch="//", label="gap")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    full_title = title + (f"\nECE = {ece_value:.4f}" if ece_value is not None and math.isfinite(ece_value) else "")
    ax.set_title(full_title, fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    axh.bar(centers, count / max(count.sum(), 1), width=width, color="grey", edgecolor="black")
    axh.set_xlabel("confidence (max softmax probability)")
    axh.set_ylabel("fraction")
    fig.tight_layout()
    return save_figure(fig, path)


def draw_reliability(ax, curve: dict, fontsize: int = 8) -> None:
    """Draw one reliability diagram on the matplotlib axes ``ax``: accuracy bars of the filled bins, the gap to
    their mean confidence shaded, and the diagonal (for figures with several diagrams side by side).

    Args:
        curve: ``edges`` (n_bins + 1), ``count``, ``confidence``, ``accuracy`` (n_bins each; NaN for empty bins).
    """
    edges = np.asarray(curve["edges"], dtype=float)
    centers, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
    filled = np.asarray(curve["count"], dtype=float) > 0
    acc = np.nan_to_num(np.asarray(curve["accuracy"], dtype=float))
    conf = np.nan_to_num(np.asarray(curve["confidence"], dtype=float))
    ax.bar(centers[filled], acc[filled], width=width, edgecolor="black", color="#3b75af", lw=0.5)
    lo, hi = np.minimum(acc, conf)[filled], np.maximum(acc, conf)[filled]
    ax.bar(centers[filled], hi - lo, bottom=lo, width=width, color="#d62728", alpha=0.35, hatch="//",
           edgecolor="#d62728", lw=0.5)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.tick_params(labelsize=fontsize - 1)
    ax.set_xlabel("confidence", fontsize=fontsize)
    ax.set_ylabel("accuracy", fontsize=fontsize)


# ------------------------------------------------------------------------------------------------------------------
# files
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Save a matplotlib figure as PNG atomically, close it, return the path."""
    plt = _pyplot()
    try:
        return write_with(lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"), path)
    finally:
        plt.close(fig)


# ------------------------------------------------------------------------------------------------------------------
# reliability per class
def class_reliability(stats, j: int) -> dict[str, np.ndarray]:
    """Top-label reliability curve of the kept voxels of ground-truth class ``j``, from
    ``pipeline.metrics.calibration.CalibrationStats`` (the same bins as the ECE)."""
    top = stats.top[j].cpu().numpy()
    count = top[:, 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "edges": bin_edges(top.shape[0]).numpy(),
            "count": count,
            "confidence": np.where(count > 0, top[:, 1] / count, np.nan),
            "accuracy": np.where(count > 0, top[:, 2] / count, np.nan),
        }


def curve_ece(curve: dict) -> float:
    """ECE from a reliability curve: ``Σ_b (n_b / N) |conf_b − acc_b|`` (``nan`` when empty)."""
    count = np.asarray(curve["count"], dtype=float)
    n = count.sum()
    if n == 0:
        return math.nan
    gap = np.nan_to_num(np.abs(np.asarray(curve["confidence"]) - np.asarray(curve["accuracy"])))
    return float((count * gap).sum() / n)


def reliability_per_class(stats_by_method: dict, class_names: Sequence[str], path: str | os.PathLike,
                          title: str = "") -> Path:
    """A grid of reliability diagrams: one row per method (e.g. pre / TS / LTS), one column per foreground class,
    each on the voxels of that ground-truth class, with its per-class ECE."""
    plt = _pyplot()
    methods = list(stats_by_method)
    fg = list(range(1, len(class_names)))
    fig, axes = plt.subplots(len(methods), len(fg), figsize=(2.6 * len(fg), 2.6 * len(methods)), squeeze=False)
    for r, method in enumerate(methods):
        for c, j in enumerate(fg):
            ax = axes[r][c]
            curve = class_reliability(stats_by_method[method], j)
            draw_reliability(ax, curve, fontsize=8)
            ax.set_title(f"{method} · {class_names[j]}\nECE {_fmt(curve_ece(curve), 4)}", fontsize=8)
            if c > 0:
                ax.set_ylabel("")
            if r < len(methods) - 1:
                ax.set_xlabel("")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


# ------------------------------------------------------------------------------------------------------------------
# confidence maps
def confidence_maps(rows: Sequence[dict], class_names: Sequence[str], path: str | os.PathLike, title: str = "") -> Path:
    """Test slices side by side: image, ground truth, prediction, max-probability map, error map (one row each).

    Args:
        rows: dicts with ``id``, ``slice`` and 2D arrays ``image``, ``label``, ``pred`` (class indices) and
            ``maxprob``.
    """
    if not rows:
        raise ValueError("no slice to draw")
    plt = _pyplot()
    k = len(class_names)
    fig, axes = plt.subplots(len(rows), 5, figsize=(12.5, 2.8 * len(rows)), squeeze=False)
    cmap = plt.get_cmap("tab10", k)
    for r, row in enumerate(rows):
        panels = [
            ("image", row["image"], {"cmap": "gray"}),
            ("ground truth", row["label"], {"cmap": cmap, "vmin": -0.5, "vmax": k - 0.5, "interpolation": "nearest"}),
            ("prediction", row["pred"], {"cmap": cmap, "vmin": -0.5, "vmax": k - 0.5, "interpolation": "nearest"}),
            ("max probability", row["maxprob"], {"cmap": "viridis", "vmin": 0.0, "vmax": 1.0}),
            ("error (prediction ≠ truth)", (np.asarray(row["pred"]) != np.asarray(row["label"])).astype(float),
             {"cmap": "Reds", "vmin": 0, "vmax": 1, "interpolation": "nearest"}),
        ]
        for c, (name, data, kw) in enumerate(panels):
            ax = axes[r][c]
            im = ax.imshow(np.asarray(data, dtype=float).T, origin="lower", **kw)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(name if r == 0 else "", fontsize=9)
            if c == 0:
                ax.set_ylabel(f"{row['id']}\nslice {row['slice']}", fontsize=8)
            if c == 3:
                fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
        if r == 0:
            handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(j)) for j in range(k)]
            axes[r][2].legend(handles, class_names, fontsize=6, loc="upper right", framealpha=0.6)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


# ------------------------------------------------------------------------------------------------------------------
# logits and noise
def logit_plot(mean_logits, class_names: Sequence[str], path: str | os.PathLike, title: str = "") -> Path:
    """The mean logit vector of the voxels of each ground-truth class (paper Fig. 4): one group of bars per
    ground-truth class, one bar per logit channel."""
    plt = _pyplot()
    m = np.asarray(mean_logits, dtype=float)
    k = len(class_names)
    if m.shape != (k, k):
        raise ValueError(f"mean logits must be {k}×{k} for {k} classes, got shape {m.shape}")
    fig, ax = plt.subplots(figsize=(1.6 * k + 2.5, 3.6))
    width = 0.8 / k
    x = np.arange(k)
    for c in range(k):
        ax.bar(x + (c - (k - 1) / 2) * width, np.nan_to_num(m[:, c]), width=width, label=f"logit {class_names[c]}")
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xticks(x)
    ax.set_xticklabels([f"{n}\n(ground truth)" for n in class_names], fontsize=8)
    ax.set_ylabel("mean logit")
    ax.legend(fontsize=7, ncol=min(k, 4))
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def noise_plot(rows: Sequence[dict], path: str | os.PathLike, title: str = "") -> Path:
    """DSC and foreground ECE against the standard deviation of the added Gaussian noise (paper Fig. 5)."""
    if not rows:
        raise ValueError("no noise level to plot")
    plt = _pyplot()
    s = [r["sigma"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3.2))
    a1.plot(s, [r["dsc"] for r in rows], "o-", color="#3b75af")
    a1.set_xlabel("noise σ")
    a1.set_ylabel("DSC")
    a2.plot(s, [r["ece"] for r in rows], "o-", color="#d62728")
    a2.set_xlabel("noise σ")
    a2.set_ylabel("ECE (foreground)")
    for a in (a1, a2):
        a.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


# ------------------------------------------------------------------------------------------------------------------
# tables and summary
METHOD_LABELS = {"pre": "pre", "ts": "TS", "lts": "LTS"}


def posthoc_table(results: dict) -> str:
    """Pre / TS / LTS on the test volumes: DSC, ASD, ECE, CECE, adaptive ECE, NLL, Brier (and the soft-label ECE
    when the dataset has soft labels)."""
    methods = results["methods"]
    soft = any("soft/ece" in m["mean"] for m in methods.values())
    cols = [("DSC", "dsc", 3), (_asd_label(results), "asd", 2), ("ECE", "ece", 4), ("CECE", "cece", 4),
            ("aECE", "aece", 4), ("NLL", "nll", 3), ("Brier", "brier", 3)]
    if soft:
        cols.append(("softECE", "soft/ece", 4))
    header = f"{'method':<8}" + "".join(f"{c:>9}" for c, _, _ in cols)
    lines = [header, "-" * len(header)]
    for name, m in methods.items():
        lines.append(f"{METHOD_LABELS.get(name, name):<8}" + "".join(
            f"{_fmt(m['mean'].get(k, math.nan), d):>9}" for _, k, d in cols))
    return "\n".join(lines)


def noise_table(rows: Sequence[dict]) -> str:
    header = f"{'sigma':>6}{'DSC':>8}{'ECE':>9}{'CECE':>9}"
    return "\n".join([header, "-" * len(header)] + [
        f"{r['sigma']:>6.2f}{_fmt(r['dsc']):>8}{_fmt(r['ece'], 4):>9}{_fmt(r['cece'], 4):>9}" for r in rows])


def summary_markdown(info: dict, results: dict, figures: Sequence[str]) -> str:
    """A short markdown report of an evaluation.

    Args:
        info: ``run_name``, ``run_id``, ``dataset``, ``loss``, ``backbone``, ``checkpoint``, ``posthoc`` (fit
            details per method), ``timings``.
        results: from :func:`pipeline.evaluation.evaluate_trained`.
        figures: the figure file names.
    """
    lines = [f"# Evaluation of {info.get('run_name', '?')}", ""]
    lines.append(f"- MLflow run: `{info.get('run_id', '?')}`; dataset `{info.get('dataset')}`, loss "
                 f"`{info.get('loss')}`, backbone `{info.get('backbone')}`")
    lines.append(f"- weights: `{info.get('checkpoint')}`")
    lines.append(f"- {results['n_volumes']} test volumes; calibration on ground-truth foreground voxels, "
                 f"{info.get('n_bins', 15)} bins, per volume then averaged")
    unit = _distance_unit(results)
    lines += ["", "## Test results (mean over volumes)", "",
              f"| method | DSC | ASD ({unit}) | ECE | CECE | aECE | NLL | Brier |",
              "|---|---|---|---|---|---|---|---|"]
    for name, m in results["methods"].items():
        v = m["mean"]
        lines.append(f"| {METHOD_LABELS.get(name, name)} | {_fmt(v.get('dsc'))} | {_fmt(v.get('asd'), 2)} | "
                     f"{_fmt(v.get('ece'), 4)} | {_fmt(v.get('cece'), 4)} | {_fmt(v.get('aece', math.nan), 4)} | "
                     f"{_fmt(v.get('nll'))} | {_fmt(v.get('brier'))} |")
    ph = info.get("posthoc") or {}
    if ph:
        lines += ["", "## Post-hoc calibration (fitted on the validation slices)", ""]
        if "ts" in ph:
            t = ph["ts"]
            lines.append(f"- TS: T = {t['temperature']:.4f}; validation NLL {t['val_nll_before']:.4f} → "
                         f"{t['val_nll_after']:.4f}, validation ECE {_fmt(t.get('val_ece_before'), 4)} → "
                         f"{_fmt(t.get('val_ece_after'), 4)} ({t['seconds']:.1f} s)")
        if "lts" in ph:
            t = ph["lts"]
            lines.append(f"- LTS: validation NLL {t['val_nll_before']:.4f} → {t['val_nll_after']:.4f}, validation "
                         f"ECE {_fmt(t.get('val_ece_before'), 4)} → {_fmt(t.get('val_ece_after'), 4)}; best at step "
                         f"{t['best_iteration']} of {t['iterations']} ({t['seconds']:.1f} s)")
        lines.append("- (NLL over the voxels the calibrators were fitted on; ECE on ground-truth foreground voxels)")
    pre = results["methods"]["pre"]["mean"]
    extra = []
    if "monai_calibration_error" in pre:
        extra.append(f"- MONAI `CalibrationErrorMetric` (per image and class, one-vs-rest, all voxels, "
                     f"`[left, right)` bins; not the paper's ECE): {_fmt(pre['monai_calibration_error'], 4)}")
    if "soft/ece" in pre:
        extra.append(f"- against the soft reference labels (pre): Brier {_fmt(pre['soft/brier'], 4)}, KL "
                     f"{_fmt(pre['soft/kl'], 4)}, soft-label ECE {_fmt(pre['soft/ece'], 4)}")
    lg = results.get("logits")
    if lg:
        extra.append(f"- logit distances `max_j l_j − l_k` (all voxels, non-winning classes): mean "
                     f"{lg['distance_mean']:.3f}, max {lg['distance_max']:.3f}")
    if extra:
        lines += ["", "## Further measures", ""] + extra
    if results.get("noise"):
        lines += ["", "## Gaussian noise on the test images", "", "| σ | DSC | ECE | CECE |", "|---|---|---|---|"]
        lines += [f"| {r['sigma']:.2f} | {_fmt(r['dsc'])} | {_fmt(r['ece'], 4)} | {_fmt(r['cece'], 4)} |"
                  for r in results["noise"]]
    for note in results.get("notes", []):
        lines.append(f"\nNote: {note}")
    timings = info.get("timings") or {}
    if timings:
        lines += ["", "## Time (s)", "", ", ".join(f"{k} {v:.1f}" for k, v in timings.items())]
    if figures:
        lines += ["", "## Figures", ""] + [f"- `{f}`" for f in figures]
    return "\n".join(lines) + "\n"
