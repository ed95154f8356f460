"""The inputs of a comparison: checks, canonical order, per-volume means and the count of runs.

``runs``: one row per training of the comparison, with the columns of :data:`RUN_COLUMNS`

- ``key`` (unique str), ``status`` (one of :data:`STATUSES`), ``method`` (a grid method name), ``backbone``,
  ``setting`` (label of the swept hyperparameter value, ``""`` without a sweep), ``hp_value`` (float, NaN without a
  sweep), ``order`` (position of the setting in the grid), ``seed``, ``epochs``, ``val/best_dsc`` (the selection
  score),
- and the test metrics under their MLflow names (NaN where missing): ``test/dsc``, ``test/asd``, ``test/ece``,
  ``test/cece``, ``test/nll``, ``test/brier``, ``test/dsc/<region>``, ``test/asd/<region>``, ``test/ts/ece``,
  ``test/ts/cece``, ``test/lts/ece``, ``test/lts/cece``, ``test/noise_<sigma>/{dsc,ece,cece}``.

``volumes``: one row per (run ``key``, test volume ``id``) with ``dsc_<region>``, ``asd_<region>``, ``ece``,
``cece`` and optionally ``nll``, ``brier``, ``ts_*``, ``lts_*`` and, scored with the last epoch's weights,
``last_dsc_<region>``, ``last_ece``, ``last_cece`` (``last_dsc`` is then added like ``dsc``). The per-volume DSC is
the NaN-mean of its ``dsc_<region>`` columns over the grid's ``region_names``, the ASD likewise.

``grid``: ``name``, ``dataset``, ``class_names``, ``region_names``, ``distance_unit``, ``backbones``, ``methods``
(dicts with ``name``, ``label``, ``hp_name``, ``values``; report order), ``reference``, ``baseline``, ``seeds``,
``epochs`` (the grid file's value), ``epochs_overridden``, ``augmentation``, ``penalties``.

Every function here returns new frames sorted in one canonical order (grid backbone, grid method, setting order,
seed, key), so that the same runs in any row order give the same report.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd

STATUSES = ("FINISHED", "FAILED", "RUNNING", "KILLED")
RUN_COLUMNS = ("key", "status", "method", "backbone", "setting", "hp_value", "order", "seed", "epochs", "val/best_dsc")
SELECTION_SCORE = "val/best_dsc"
# direction of every metric kind: True when higher is better
HIGHER_IS_BETTER = {"dsc": True, "asd": False, "ece": False, "cece": False, "nll": False, "brier": False}
GRID_KEYS = ("name", "dataset", "class_names", "backbones", "methods", "reference", "baseline", "seeds")
_NOISE = re.compile(r"^test/noise_([^/]+)/(dsc|ece|cece)$")


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of ``metric`` is better: ``test/dsc/wm`` → True, ``test/lts/cece`` → False.

    Raises:
        ValueError: a metric whose kind (DSC, ASD, ECE, CECE, NLL, Brier) is not in its name.
    """
    for part in metric.replace("_", "/").split("/"):
        if part in HIGHER_IS_BETTER:
            return HIGHER_IS_BETTER[part]
    raise ValueError(f"metric {metric!r}: unknown direction, expected one of {sorted(HIGHER_IS_BETTER)} in its name")


def check_grid(grid: dict) -> dict:
    """Check the grid description; returns it.

    Raises:
        TypeError: a grid that is not a dict.
        ValueError: a missing key, a method without ``name``/``label``, or a reference/baseline not in the methods.
    """
    if not isinstance(grid, dict):
        raise TypeError(f"grid must be a dict, got {type(grid).__name__}")
    missing = [k for k in GRID_KEYS if k not in grid]
    if missing:
        raise ValueError(f"grid {grid.get('name', '?')!r} lacks {missing}")
    check_methods(grid, f"grid {grid['name']!r}", ("name", "label"))
    return grid


def check_methods(grid: dict, where: str, required: tuple[str, ...]) -> list[str]:
    """Every method of ``grid`` is a mapping with the ``required`` keys, names are unique, and the grid's
    ``reference`` and ``baseline`` are among them; returns the names.

    Raises:
        ValueError: naming ``where`` and what is wrong.
    """
    names = []
    for m in grid["methods"]:
        if not isinstance(m, dict) or not set(required) <= set(m):
            raise ValueError(f"{where}: every method needs {', '.join(required)}, got {m!r}")
        names.append(m["name"])
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: method names repeat: {names}")
    for role in ("reference", "baseline"):
        if grid[role] not in names:
            raise ValueError(f"{where}: {role} {grid[role]!r} is not one of the methods {names}")
    return names


def method_names(grid: dict) -> list[str]:
    """The grid's method names in report order."""
    return [m["name"] for m in grid["methods"]]


def method_labels(grid: dict) -> dict[str, str]:
    """Method name → label (``"mbls"`` → ``"MbLS"``)."""
    return {m["name"]: m["label"] for m in grid["methods"]}


def region_names(grid: dict) -> list[str]:
    """The DSC/ASD regions: ``grid["region_names"]``, else the foreground ``class_names``."""
    return list(grid.get("region_names") or grid["class_names"][1:])


def canonical_sort(df: pd.DataFrame, grid: dict, extra: tuple[str, ...] = ()) -> pd.DataFrame:
    """Sort rows by grid backbone, grid method, setting ``order``, ``seed``, ``key`` then ``extra`` columns."""
    bb = {b: i for i, b in enumerate(grid["backbones"])}
    mo = {m: i for i, m in enumerate(method_names(grid))}
    cols = [c for c in ("backbone", "method", "order", "seed", "key", *extra) if c in df.columns]

    def key(col: pd.Series) -> pd.Series:
        if col.name == "backbone":
            return col.map(bb)
        if col.name == "method":
            return col.map(mo)
        return col

    return df.sort_values(cols, key=key, kind="mergesort").reset_index(drop=True)


def prepare_runs(runs: pd.DataFrame, grid: dict) -> pd.DataFrame:
    """Check the runs table against the grid and return a sorted copy with a ``label`` column.

    Raises:
        TypeError: runs that are not a DataFrame.
        ValueError: a missing column, a repeated key, an unknown status, method or backbone, a non-integer seed.
    """
    check_grid(grid)
    if not isinstance(runs, pd.DataFrame):
        raise TypeError(f"runs must be a pandas DataFrame, got {type(runs).__name__}")
    missing = [c for c in RUN_COLUMNS if c not in runs.columns]
    if missing:
        raise ValueError(f"runs table lacks the columns {missing} (has {list(runs.columns)})")
    df = runs.copy()
    dup = df["key"][df["key"].duplicated()].tolist()
    if dup:
        raise ValueError(f"runs table: keys repeat: {dup}")
    bad = sorted(set(df["status"]) - set(STATUSES))
    if bad:
        raise ValueError(f"runs table: unknown status {bad}, expected one of {list(STATUSES)}")
    for col, allowed in (("method", method_names(grid)), ("backbone", list(grid["backbones"]))):
        unknown = sorted(set(df[col]) - set(allowed))
        if unknown:
            raise ValueError(f"runs table: {col} {unknown} not in grid {grid['name']!r} ({allowed})")
    for col in ("seed", "order", "epochs"):
        values = pd.to_numeric(df[col], errors="coerce")
        if values.isna().any() or (values != values.round()).any():
            raise ValueError(f"runs table: column {col!r} must hold integers, got {df[col].tolist()}")
        df[col] = values.astype(int)
    df["setting"] = df["setting"].fillna("").astype(str)
    df["hp_value"] = pd.to_numeric(df["hp_value"], errors="coerce").astype(float)
    df["label"] = df["method"].map(method_labels(grid))
    return canonical_sort(df, grid)


def prepare_volumes(volumes: pd.DataFrame, runs: pd.DataFrame, grid: dict) -> pd.DataFrame:
    """Check the per-volume table, add the run's ``backbone``, ``method``, ``setting``, ``seed``, and the per-volume
    ``dsc`` and ``asd`` (NaN-mean over the regions); returns a sorted copy.

    Args:
        volumes: one row per (``key``, ``id``).
        runs: from :func:`prepare_runs`.

    Raises:
        TypeError: volumes that are not a DataFrame.
        ValueError: a missing ``key``/``id`` or ``dsc_<region>`` column, a key not in the runs, a repeated
            (key, id).
    """
    if not isinstance(volumes, pd.DataFrame):
        raise TypeError(f"volumes must be a pandas DataFrame, got {type(volumes).__name__}")
    missing = [c for c in ("key", "id") if c not in volumes.columns]
    if missing:
        raise ValueError(f"volumes table lacks the columns {missing} (has {list(volumes.columns)})")
    unknown = sorted(set(volumes["key"]) - set(runs["key"]))
    if unknown:
        raise ValueError(f"volumes table: run keys {unknown} are not in the runs table")
    df = volumes.copy()
    df["id"] = df["id"].astype(str)
    dup = df[df.duplicated(["key", "id"])][["key", "id"]].values.tolist()
    if dup:
        raise ValueError(f"volumes table: (key, id) repeat: {dup}")
    regions = region_names(grid)
    dsc_cols = [f"dsc_{r}" for r in regions]
    asd_cols = [f"asd_{r}" for r in regions]
    if len(df) and any(c not in df.columns for c in dsc_cols):
        raise ValueError(f"volumes table lacks {[c for c in dsc_cols if c not in df.columns]} for the regions "
                         f"{regions} of grid {grid['name']!r}")
    df["dsc"] = df[dsc_cols].mean(axis=1, skipna=True) if len(df) else np.nan
    present_asd = [c for c in asd_cols if c in df.columns]
    df["asd"] = df[present_asd].mean(axis=1, skipna=True) if present_asd else np.nan
    last_dsc = [f"last_{c}" for c in dsc_cols if f"last_{c}" in df.columns]
    if last_dsc:  # the last epoch's weights (pipeline.evaluation.last): the same per-volume DSC
        df["last_dsc"] = df[last_dsc].mean(axis=1, skipna=True)
    info = runs.set_index("key")[["backbone", "method", "setting", "order", "seed", "status"]]
    df = df.drop(columns=[c for c in info.columns if c in df.columns]).join(info, on="key")
    df = canonical_sort(df, grid, extra=("id",))
    head = ["key", "backbone", "method", "setting", "order", "seed", "status", "id", "dsc", "asd"]
    known = [c for c in dsc_cols + asd_cols if c in df.columns]
    rest = sorted(c for c in df.columns if c not in head and c not in known)
    return df[head + known + rest]


def noise_levels(runs: pd.DataFrame) -> list[tuple[float, str]]:
    """The noise levels present in the runs' columns: ``[(sigma, label), ...]`` sorted by sigma, where the label
    is the one in ``test/noise_<label>/…``."""
    found = {}
    for col in runs.columns:
        m = _NOISE.match(str(col))
        if m:
            try:
                found[m.group(1)] = float(m.group(1))
            except ValueError:
                raise ValueError(f"runs column {col!r}: noise level {m.group(1)!r} is not a number") from None
    return sorted(((v, k) for k, v in found.items()))


def setting_label(hp_name: str | None, value) -> str:
    """The label of one hyperparameter value for runs that are absent: ``"margin=5"`` (``""`` without a sweep)."""
    return "" if not hp_name else f"{hp_name}={float(value):g}"


def run_accounting(runs: pd.DataFrame, grid: dict) -> dict:
    """Count the runs: finished, not finished (with every such run named), and expected by the grid but absent.

    A grid cell is (backbone, method, hyperparameter value, seed) over ``grid["backbones"]``, the methods'
    ``values`` (one cell when empty) and ``grid["seeds"]``; a cell is present when some run has its backbone,
    method, seed and ``hp_value`` (both NaN, or equal within 1e-9).

    Returns:
        ``{"expected", "present", "finished", "by_status": {status: n}, "not_finished": [records],
        "missing": [records]}``; records carry ``backbone``, ``method``, ``setting``, ``seed`` (and ``key``,
        ``status`` for runs that exist).
    """
    by_status = {s: int((runs["status"] == s).sum()) for s in STATUSES}
    not_finished = runs[runs["status"] != "FINISHED"][["backbone", "method", "setting", "seed", "key", "status"]]
    missing, expected = [], 0
    for backbone in grid["backbones"]:
        for m in grid["methods"]:
            values = list(m.get("values") or []) or [None]
            for value in values:
                for seed in grid["seeds"]:
                    expected += 1
                    sel = runs[(runs["backbone"] == backbone) & (runs["method"] == m["name"])
                               & (runs["seed"] == int(seed))]
                    hp = sel["hp_value"].to_numpy(dtype=float)
                    hit = np.isnan(hp) if value is None else np.isclose(hp, float(value), rtol=0, atol=1e-9)
                    if not hit.any():
                        missing.append({"backbone": backbone, "method": m["name"],
                                        "setting": setting_label(m.get("hp_name"), value) if value is not None
                                        else "", "seed": int(seed)})
    return {"expected": expected, "present": len(runs), "finished": by_status["FINISHED"],
            "by_status": by_status, "not_finished": not_finished.to_dict("records"), "missing": missing}


def finite(x) -> bool:
    """True for a real, finite number."""
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False
