"""Test-set evaluation of a trained network: every metric per volume, their means, the table and the plots."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from pipeline.engines import create_evaluator


def _nanmean(values) -> float:
    arr = np.asarray(values, dtype=float)
    return float(np.nanmean(arr)) if arr.size and not np.all(np.isnan(arr)) else math.nan


def _as_array(details) -> np.ndarray:
    if isinstance(details, torch.Tensor):
        return details.detach().cpu().float().numpy()
    return np.asarray(details, dtype=float)


def run_evaluation(
    network: torch.nn.Module,
    loader,
    device: torch.device,
    class_names: Sequence[str],
    slice_axis: int = 2,
    n_bins: int = 15,
    prefix: str = "test/",
    amp: bool = False,
    regions=None,
):
    """Evaluate ``network`` on the volumes of ``loader``; return the finished evaluator engine.

    ``regions`` (``{name: [training classes]}``, the dataset's ``eval_regions``): DSC and ASD per region.
    """
    evaluator = create_evaluator(
        network, loader, device, len(class_names), slice_axis, prefix=prefix, surface_distance=True,
        n_bins=n_bins, amp=amp, regions=list(regions.values()) if regions else None,
    )
    evaluator.run()
    return evaluator


def summarise(evaluator, class_names: Sequence[str], volume_ids: Sequence[str], prefix: str = "test/",
              region_names: Sequence[str] | None = None) -> dict:
    """Turn an evaluator's metrics and details into the results dict used by reports and MLflow.

    Per foreground class: mean over volumes of DSC, ASD, per-class ECE and SCE (``nan`` entries skipped). The
    ``mean`` entry: DSC and ASD averaged over foreground classes, and ECE, CECE, NLL, Brier as the mean over volumes
    (the paper's protocol), with the pooled ECE/CECE beside them. With ``region_names`` (evaluation regions), DSC
    and ASD are per region (entries of their own in ``per_class``; ``region_names`` in the result).
    """
    state = evaluator.state
    details = state.metric_details
    dsc = _as_array(details[f"{prefix}dsc"])
    asd = _as_array(details[f"{prefix}asd"])
    cal = details[f"{prefix}calibration"]
    vols = cal["volumes"]
    ece_pc = np.array([v["ece_per_class"] for v in vols], dtype=float)
    sce_pc = np.array([v["sce_per_class"] for v in vols], dtype=float)
    fg = list(class_names[1:])
    seg = list(region_names) if region_names else fg

    per_class = {class_names[0]: {"dsc": math.nan, "asd": math.nan, "ece": math.nan, "sce": _nanmean(sce_pc[:, 0])}}
    for j, name in enumerate(fg):
        per_class[name] = {
            "dsc": math.nan if region_names else _nanmean(dsc[:, j]),
            "asd": math.nan if region_names else _nanmean(asd[:, j]),
            "ece": _nanmean(ece_pc[:, j + 1]),
            "sce": _nanmean(sce_pc[:, j + 1]),
        }
    for j, name in enumerate(region_names or []):
        per_class[name] = {"dsc": _nanmean(dsc[:, j]), "asd": _nanmean(asd[:, j]), "ece": math.nan, "sce": math.nan}
    m = state.metrics
    mean = {
        "dsc": _nanmean([per_class[n]["dsc"] for n in seg]),
        "asd": _nanmean([per_class[n]["asd"] for n in seg]),
        **{k: float(m[f"{prefix}{k}"]) for k in ("ece", "cece", "nll", "brier", "ece_pooled", "cece_pooled")},
    }
    rows = []
    for i, vid in enumerate(volume_ids):
        row = {"id": vid}
        row.update({f"dsc_{n}": float(dsc[i, j]) for j, n in enumerate(seg)})
        row.update({f"asd_{n}": float(asd[i, j]) for j, n in enumerate(seg)})
        row.update({k: vols[i][k] for k in ("ece", "cece", "nll", "brier", "n_kept")})
        row.update({f"ece_{n}": float(ece_pc[i, j]) for j, n in enumerate(class_names)})
        row.update({f"sce_{n}": float(sce_pc[i, j]) for j, n in enumerate(class_names)})
        rows.append(row)

    notes = []
    n_asd_nan = int(np.isnan(asd).sum())
    if n_asd_nan:
        notes.append(f"{n_asd_nan} (volume, class) ASD values undefined (one mask empty) and skipped")
    skipped = int(m.get(f"{prefix}skipped", 0))
    if skipped:
        notes.append(f"{skipped} volume(s) without ground-truth foreground: no calibration value, skipped")
    return {
        "class_names": list(class_names),
        "region_names": list(region_names or []),
        "n_volumes": len(volume_ids),
        "per_class": per_class,
        "mean": mean,
        "per_volume": rows,
        "reliability": cal["pooled"].reliability(),
        "notes": notes,
    }


def mlflow_metrics(results: dict, prefix: str = "test/") -> dict[str, float]:
    """Flat MLflow metric names: ``test/dsc``, ``test/ece``, …, and per class ``test/dsc/GM``, ``test/sce/CSF``, …"""
    out = {f"{prefix}{k}": v for k, v in results["mean"].items()}
    for name, vals in results["per_class"].items():
        for k, v in vals.items():
            out[f"{prefix}{k}/{name}"] = v
    return {k: v for k, v in out.items() if v is not None and math.isfinite(v)}
