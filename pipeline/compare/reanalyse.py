"""``make reanalyse REPORT_DIR=reports/<dataset>/<grid>``: the seed-level verdict of an existing report, recomputed
from the report folder alone (its ``per_volume.csv`` and ``summary.json``), without the MLflow store that made it.

For a report whose store is gone or elsewhere, or one made before the verdict treated the seed as the unit: the
selection is the report's own, the statistics and words are today's (:mod:`pipeline.compare.statistics`,
:mod:`pipeline.compare.verdict`). Writes ``reanalysis.md`` (verdict paragraph and statistics table) and
``reanalysis.json`` into the folder; the report itself is left as it was.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from pipeline.compare.statistics import N_RESAMPLES, compare_methods, paired_differences, resolve_margins
from pipeline.compare.tables import statistics_table
from pipeline.compare.verdict import verdict_paragraph
from pipeline.config import parse_assignments
from pipeline.io import write_json_atomic, write_text_atomic

RUN_KEYS = ["key", "backbone", "method", "setting", "seed", "status"]


def reanalyse(folder: str | Path, margins: dict | None = None, n_resamples: int = N_RESAMPLES) -> dict:
    """Recompute the verdict of the report in ``folder``; returns ``{"markdown", "statistics", "path"}``.

    Raises:
        FileNotFoundError: a folder without ``per_volume.csv`` or ``summary.json`` (named).
    """
    folder = Path(folder)
    for name in ("per_volume.csv", "summary.json"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} is missing: a report folder of `make compare` holds it")
    summary = json.loads((folder / "summary.json").read_text())
    volumes = pd.read_csv(folder / "per_volume.csv", dtype={"id": str, "key": str})
    volumes["setting"] = volumes["setting"].astype(object).fillna("")
    grid = {**summary["grid"], "methods": [{"name": n, "label": label} for n, label in summary["labels"].items()]}
    grid["margins"] = resolve_margins(grid, margins)
    runs = volumes[RUN_KEYS].drop_duplicates("key").assign(epochs=(summary.get("epochs") or [0])[0])
    selection = pd.DataFrame(summary["selection"], columns=["backbone", "method", "setting"])
    selection["setting"] = selection["setting"].fillna("")
    comparison = compare_methods(paired_differences(runs, volumes, selection, grid), grid, n_resamples=n_resamples)
    text = verdict_paragraph(comparison, selection, runs, grid)
    md = "\n".join([
        f"# Seed-level reanalysis of `{grid['name']}` on `{grid['dataset']}`", "",
        f"Recomputed from this folder's `per_volume.csv` and `summary.json` by `make reanalyse REPORT_DIR={folder}` "
        "(the report's own selection; today's statistics).", "", text, "",
        "## Paired statistics (the seed is the unit)", "", statistics_table(comparison, grid), ""])
    path = write_text_atomic(folder / "reanalysis.md", md)
    write_json_atomic(folder / "reanalysis.json", json.loads(comparison.to_json(orient="records")))
    return {"markdown": md, "statistics": comparison, "path": path}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make reanalyse", description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="a report folder, e.g. reports/mni/penalties")
    p.add_argument("--margins", default=None, help="equivalence margins, e.g. ece=0.003,dsc=0.02")
    args = p.parse_args(argv)
    out = reanalyse(args.folder, parse_assignments(args.margins) if args.margins else None)
    print(out["markdown"].split("## Paired statistics")[0].split("\n\n", 2)[2].strip())
    print(f"written: {out['path']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
