"""Synthetic inputs of a comparison report: a grid, its runs table, per-volume table and extras, built from seeded
random numbers (no training), with the run-level test metrics the means of the per-volume ones."""

from __future__ import annotations

import numpy as np
import pandas as pd

REGIONS = ["a", "b"]
NOISE = [0.01, 0.02]


def make_grid(penalties: bool = False, backbones=("unet",), seeds=(0, 1)) -> dict:
    """Two swept methods (LS α ∈ {0.1, 0.2}, MbLS margin ∈ {5, 10}); MbLS the reference, LS the baseline."""
    return {"name": "tiny", "dataset": "blobs", "class_names": ["background", *REGIONS], "region_names": REGIONS,
            "distance_unit": "mm", "backbones": list(backbones),
            "methods": [{"name": "ls", "label": "LS", "loss": "ls", "hp_name": "alpha", "values": [0.1, 0.2]},
                        {"name": "mbls", "label": "MbLS", "loss": "mbls", "hp_name": "margin", "values": [5, 10]}],
            "reference": "mbls", "baseline": "ls", "seeds": list(seeds), "epochs": 2, "epochs_overridden": False,
            "augmentation": "none", "penalties": penalties}


def make_data(grid: dict, n_volumes: int = 3, ece_shift: float = 0.0, seed: int = 0, failed: tuple = (),
              last: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(runs, volumes)`` for every cell of ``grid``; the reference's ECE is lowered by ``ece_shift``.

    Args:
        failed: ``(method, setting, seed)`` cells whose run is FAILED (NaN metrics, no volumes).
        last: give every run the metrics of its last epoch's weights too (``last_*``, ``test_last/*``).
    """
    rng = np.random.default_rng(seed)
    rng_last = np.random.default_rng(seed + 1000)  # its own stream: the other values do not depend on `last`
    runs, vols = [], []
    for backbone in grid["backbones"]:
        for m in grid["methods"]:
            for order, value in enumerate(m["values"] or [None]):
                setting = f"{m['hp_name']}={value:g}" if value is not None else ""
                for s in grid["seeds"]:
                    key = f"{backbone}-{m['name']}-{order}-{s}"
                    row = {"key": key, "status": "FINISHED", "method": m["name"], "backbone": backbone,
                           "setting": setting, "hp_value": np.nan if value is None else float(value),
                           "order": order, "seed": s, "epochs": grid["epochs"],
                           "val/best_dsc": round(float(rng.uniform(0.6, 0.9)), 6)}
                    if (m["name"], setting, s) in failed:
                        row["status"] = "FAILED"
                        row["val/best_dsc"] = np.nan
                        runs.append(row)
                        continue
                    v = pd.DataFrame({"key": key, "id": [f"case{i}" for i in range(n_volumes)]})
                    for r in REGIONS:
                        v[f"dsc_{r}"] = rng.uniform(0.7, 0.95, n_volumes)
                        v[f"asd_{r}"] = rng.uniform(0.5, 3.0, n_volumes)
                    shift = ece_shift if m["name"] == grid["reference"] else 0.0
                    for c in ("ece", "cece", "nll", "brier"):
                        v[c] = rng.uniform(0.05, 0.15, n_volumes) - (shift if c == "ece" else 0.0)
                    for c in ("ts_ece", "ts_cece", "lts_ece", "lts_cece"):
                        v[c] = rng.uniform(0.03, 0.12, n_volumes)
                    if last:  # the last epoch's weights: the same metrics, a little off
                        for c in [*(f"dsc_{r}" for r in REGIONS), *(f"asd_{r}" for r in REGIONS), "ece", "cece"]:
                            v[f"last_{c}"] = v[c] + rng_last.normal(0, 0.01, n_volumes)
                        row["test_last/dsc"] = float(v[[f"last_dsc_{r}" for r in REGIONS]].mean(axis=1).mean())
                        row["test_last/ece"] = float(v["last_ece"].mean())
                        row["test_last/cece"] = float(v["last_cece"].mean())
                    for r in REGIONS:
                        row[f"test/dsc/{r}"] = float(v[f"dsc_{r}"].mean())
                        row[f"test/asd/{r}"] = float(v[f"asd_{r}"].mean())
                    row["test/dsc"] = float(v[[f"dsc_{r}" for r in REGIONS]].mean(axis=1).mean())
                    row["test/asd"] = float(v[[f"asd_{r}" for r in REGIONS]].mean(axis=1).mean())
                    for c in ("ece", "cece", "nll", "brier"):
                        row[f"test/{c}"] = float(v[c].mean())
                    for c in ("ts_ece", "ts_cece", "lts_ece", "lts_cece"):
                        row["test/" + c.replace("_", "/")] = float(v[c].mean())
                    for sigma in NOISE:
                        row[f"test/noise_{sigma:g}/dsc"] = row["test/dsc"] - 2 * sigma
                        row[f"test/noise_{sigma:g}/ece"] = row["test/ece"] + sigma
                        row[f"test/noise_{sigma:g}/cece"] = row["test/cece"] + sigma
                    row["test/logits/distance_mean"] = 4 + 20 * row["test/ece"]
                    row["test/logits/distance_max"] = 10 + 10 * row["test/dsc"]
                    runs.append(row)
                    vols.append(v)
    return pd.DataFrame(runs), pd.concat(vols, ignore_index=True)


def make_extras(runs: pd.DataFrame, n_classes: int = 3, n_bins: int = 5, seed: int = 0) -> dict:
    """Reliability curves, a confidence map and mean logits for every finished run."""
    rng = np.random.default_rng(seed)
    edges = np.linspace(0, 1, n_bins + 1).tolist()
    out = {}
    label = np.zeros((16, 12), dtype=int)
    label[4:12, 3:9] = 1
    label[6:10, 5:7] = 2
    for r in runs[runs["status"] == "FINISHED"].itertuples():
        count = rng.integers(0, 50, n_bins).astype(float)
        count[0] = 0
        conf = np.where(count > 0, (np.array(edges[:-1]) + np.array(edges[1:])) / 2, np.nan)
        acc = np.where(count > 0, np.clip(conf + rng.normal(0, 0.05, n_bins), 0, 1), np.nan)
        curve = {"edges": edges, "count": count.tolist(), "confidence": conf.tolist(), "accuracy": acc.tolist()}
        out[r.key] = {"reliability": {"pre": curve, "ts": curve, "lts": curve},
                      "confidence_map": {"image": rng.normal(size=label.shape), "label": label, "pred": label,
                                         "maxprob": rng.uniform(0.4, 1.0, label.shape), "id": "case0",
                                         "slice": 3},
                      "mean_logits": rng.normal(size=(n_classes, n_classes))}
    return out
