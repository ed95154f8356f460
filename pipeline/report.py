"""Reports of an evaluation: the console table, the per-volume CSV and the reliability diagram."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _fmt(v: float, digits: int = 3) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def results_table(results: dict) -> str:
    """The test table: per foreground class DSC, ASD, ECE and SCE, then the mean row.

    ``results`` is what :func:`pipeline.evaluate.summarise` returns. Per class, ECE is the top-label ECE on the
    voxels of that ground-truth class and SCE the classwise calibration error of that class's probability; the mean
    row holds the mean DSC and ASD over foreground classes, the foreground ECE and the CECE (mean SCE over all
    channels, background included), each averaged over test volumes.
    """
    names = results["class_names"]
    pc = results["per_class"]
    header = f"{'class':<14}{'DSC':>8}{'ASD(mm)':>10}{'ECE':>8}{'SCE':>8}"
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
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def reliability_diagram(curve: dict, path: str | os.PathLike, title: str = "", ece_value: float | None = None) -> Path:
    """Plot accuracy against confidence per bin, with the diagonal and the calibration gap shaded (paper Fig. 8).

    Args:
        curve: ``CalibrationStats.reliability()``: ``edges``, ``count``, ``confidence``, ``accuracy``.
        path: the PNG to write.
        title: figure title; the ECE is appended when given.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
