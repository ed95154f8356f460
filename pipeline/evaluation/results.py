"""From an evaluator's metrics and per-volume details to the results of a run: the dict behind its tables,
``metrics.json``, ``per_volume.csv`` and the MLflow metric names."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from pipeline.engines import ARGMAX_PRESERVING
from pipeline.tensors import nanmean


def _as_array(details) -> np.ndarray:
    if isinstance(details, torch.Tensor):
        return details.detach().cpu().float().numpy()
    return np.asarray(details, dtype=float)


def _method_results(state, class_names: Sequence[str], p: str, seg_p: str,
                    region_names: Sequence[str] | None = None) -> dict:
    details, m = state.metric_details, state.metrics
    dsc = _as_array(details[f"{seg_p}dsc"])
    asd = _as_array(details[f"{seg_p}asd"])
    cal = details[f"{p}calibration"]
    vols = cal["volumes"]
    ece_pc = np.array([v["ece_per_class"] for v in vols], dtype=float)
    sce_pc = np.array([v["sce_per_class"] for v in vols], dtype=float)
    fg = list(class_names[1:])
    seg = list(region_names) if region_names else fg  # DSC/ASD columns: evaluation regions, else the classes
    per_class = {class_names[0]: {"dsc": math.nan, "asd": math.nan, "ece": math.nan, "sce": nanmean(sce_pc[:, 0])}}
    for j, name in enumerate(fg):
        per_class[name] = {"dsc": math.nan, "asd": math.nan, "ece": nanmean(ece_pc[:, j + 1]),
                           "sce": nanmean(sce_pc[:, j + 1])}
    for j, name in enumerate(seg):
        per_class.setdefault(name, {"ece": math.nan, "sce": math.nan})
        per_class[name].update(dsc=nanmean(dsc[:, j]), asd=nanmean(asd[:, j]))
    mean = {
        "dsc": nanmean([per_class[n]["dsc"] for n in seg]),
        "asd": nanmean([per_class[n]["asd"] for n in seg]),
        **{k: float(m[f"{p}{k}"]) for k in ("ece", "cece", "nll", "brier", "ece_pooled", "cece_pooled")},
    }
    for k in ("aece", "soft/brier", "soft/kl", "soft/ece"):
        if f"{p}{k}" in m:
            mean[k] = float(m[f"{p}{k}"])
    return {"per_class": per_class, "mean": mean, "dsc": dsc, "asd": asd, "ece_pc": ece_pc, "sce_pc": sce_pc,
            "volumes": vols, "extras": details.get(f"{p}extras", []), "stats": cal["pooled"],
            "reliability": cal["pooled"].reliability(), "skipped": int(m.get(f"{p}skipped", 0))}


def summarise(evaluator, class_names: Sequence[str], volume_ids: Sequence[str], prefix: str = "test/",
              methods: Sequence[str] = ("pre",), region_names: Sequence[str] | None = None) -> dict:
    """Turn a test evaluator's metrics and details into the results dict used by reports and MLflow.

    Per foreground class: mean over volumes of DSC, ASD, per-class ECE and SCE (``nan`` entries skipped). The
    ``mean`` entry: DSC and ASD averaged over foreground classes, and ECE, CECE, NLL, Brier, aECE as the mean over
    volumes (the paper's protocol), with the pooled ECE/CECE beside them. The top-level ``per_class``, ``mean`` and
    ``reliability`` are those of the uncalibrated network; ``methods`` holds the same for each method. With
    ``region_names`` (the dataset's evaluation regions, e.g. BraTS ET/TC/WT), DSC and ASD are per region (entries of
    their own in ``per_class``, listed in ``region_names``) and their means are over the regions.
    """
    state = evaluator.state
    out: dict = {}
    for method in methods:
        p = prefix if method == "pre" else f"{prefix}{method}/"
        seg_p = p if f"{p}dsc" in state.metric_details else prefix  # TS keeps the argmax: the DSC/ASD of pre
        out[method] = _method_results(state, class_names, p, seg_p, region_names)
    m = state.metrics
    pre = out["pre"]
    if f"{prefix}monai_calibration_error" in m:
        pre["mean"]["monai_calibration_error"] = float(m[f"{prefix}monai_calibration_error"])
    seg = list(region_names) if region_names else list(class_names[1:])
    rows = []
    for i, vid in enumerate(volume_ids):
        row = {"id": vid}
        row.update({f"dsc_{n}": float(pre["dsc"][i, j]) for j, n in enumerate(seg)})
        row.update({f"asd_{n}": float(pre["asd"][i, j]) for j, n in enumerate(seg)})
        row.update({k: pre["volumes"][i][k] for k in ("ece", "cece", "nll", "brier", "n_kept")})
        row.update({f"ece_{n}": float(pre["ece_pc"][i, j]) for j, n in enumerate(class_names)})
        row.update({f"sce_{n}": float(pre["sce_pc"][i, j]) for j, n in enumerate(class_names)})
        if pre["extras"]:
            row.update({k.replace("/", "_"): v for k, v in pre["extras"][i].items()})
        for method in methods[1:]:
            r = out[method]
            if method not in ARGMAX_PRESERVING:
                row[f"{method}_dsc"] = nanmean(r["dsc"][i])
                row[f"{method}_asd"] = nanmean(r["asd"][i])
            row.update({f"{method}_{k}": r["volumes"][i][k] for k in ("ece", "cece", "nll", "brier")})
            if r["extras"]:
                row.update({f"{method}_{k.replace('/', '_')}": v for k, v in r["extras"][i].items()})
        rows.append(row)

    notes = []
    n_asd_nan = int(np.isnan(pre["asd"]).sum())
    if n_asd_nan:
        notes.append(f"{n_asd_nan} (volume, class) ASD values undefined (one mask empty) and skipped")
    if pre["skipped"]:
        notes.append(f"{pre['skipped']} volume(s) without ground-truth foreground: no calibration value, skipped")
    results = {
        "class_names": list(class_names),
        "region_names": list(region_names or []),
        "n_volumes": len(volume_ids),
        "per_class": pre["per_class"],
        "mean": pre["mean"],
        "per_volume": rows,
        "reliability": pre["reliability"],
        "notes": notes,
        "methods": {k: {"per_class": v["per_class"], "mean": v["mean"], "stats": v["stats"],
                        "reliability": v["reliability"]} for k, v in out.items()},
    }
    if f"{prefix}logit_statistics" in state.metric_details:
        results["logits"] = state.metric_details[f"{prefix}logit_statistics"]
    return results


def sigma_name(sigma: float) -> str:
    """How a noise level appears in metric names: ``0.02`` → ``"0.02"`` (``test/noise_0.02/dsc``)."""
    return f"{sigma:g}"


def mlflow_metrics(results: dict, prefix: str = "test/") -> dict[str, float]:
    """Flat MLflow metric names.

    ``test/dsc``, ``test/ece``, … and per class ``test/dsc/GM``, ``test/sce/CSF``; per post-hoc method
    ``test/ts/ece``, ``test/lts/ece``, ``test/lts/ece/GM``; ``test/aece``, ``test/soft/ece``,
    ``test/monai_calibration_error``, ``test/logits/distance_mean``; per noise level ``test/noise_0.02/dsc``.
    """
    out: dict[str, float] = {}
    methods = results.get("methods") or {"pre": {"mean": results["mean"], "per_class": results["per_class"]}}
    for method, r in methods.items():
        p = prefix if method == "pre" else f"{prefix}{method}/"
        out.update({f"{p}{k}": v for k, v in r["mean"].items()})
        for name, vals in r["per_class"].items():
            for k, v in vals.items():
                if method == "pre" or method not in ARGMAX_PRESERVING or k not in ("dsc", "asd"):
                    out[f"{p}{k}/{name}"] = v
    if results.get("logits"):
        out[f"{prefix}logits/distance_mean"] = results["logits"]["distance_mean"]
        out[f"{prefix}logits/distance_max"] = results["logits"]["distance_max"]
    for row in results.get("noise") or []:
        for k in ("dsc", "ece", "cece"):
            out[f"{prefix}noise_{sigma_name(row['sigma'])}/{k}"] = row[k]
    return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(float(v))}


def jsonable(obj):
    """``obj`` with NumPy values, paths and non-finite floats made JSON-friendly (``nan`` → ``None``); reliability
    statistics and per-volume rows are left out."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items() if k not in ("stats", "reliability", "per_volume")}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        return None if not math.isfinite(float(obj)) else float(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj
