"""Selection as the paper (best mean validation DSC over seeds), seed summaries, input checks and run counts."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from pipeline.compare.data import higher_is_better, prepare_runs, prepare_volumes, run_accounting
from pipeline.compare.selection import seed_summary, select_settings, selected_runs, setting_scores

GRID = {"name": "g", "dataset": "d", "class_names": ["bg", "a"], "backbones": ["unet"], "reference": "m",
        "baseline": "c", "seeds": [0, 1],
        "methods": [{"name": "c", "label": "C", "hp_name": None, "values": []},
                    {"name": "m", "label": "M", "hp_name": "margin", "values": [5, 8, 10]}]}


def run(key, method, setting, order, seed, val, status="FINISHED", hp=np.nan, **metrics):
    return {"key": key, "status": status, "method": method, "backbone": "unet", "setting": setting,
            "hp_value": hp, "order": order, "seed": seed, "epochs": 3, "val/best_dsc": val, **metrics}


def test_selection_best_mean_validation_dsc_and_tie_to_lowest_order():
    rows = [
        # margin=5 (order 0): mean exactly 0.85; margin=8 (order 1): mean 0.8500000000000001 in floating point
        run("a", "m", "margin=5", 0, 0, 0.85, hp=5), run("b", "m", "margin=5", 0, 1, 0.85, hp=5),
        run("c", "m", "margin=8", 1, 0, 0.8, hp=8), run("d", "m", "margin=8", 1, 1, 0.9, hp=8),
        # a failed run with a high validation score must not count
        run("e", "m", "margin=10", 2, 0, 0.99, status="FAILED", hp=10),
        run("f", "c", "", 0, 0, 0.7), run("g", "c", "", 0, 1, 0.75),
    ]
    runs = prepare_runs(pd.DataFrame(rows), GRID)
    sel = select_settings(runs, GRID).set_index("method")
    assert sel.loc["m", "setting"] == "margin=5"
    assert sel.loc["m", "n_settings"] == 2
    assert sel.loc["c", "setting"] == ""
    assert sel.loc["c", "val_mean"] == pytest.approx(0.725)
    # the tie is broken by the grid order, not by the row order: swap the orders and margin=8 wins
    swapped = pd.DataFrame(rows)
    swapped.loc[swapped["setting"] == "margin=5", "order"] = 1
    swapped.loc[swapped["setting"] == "margin=8", "order"] = 0
    sel2 = select_settings(prepare_runs(swapped, GRID), GRID).set_index("method")
    assert sel2.loc["m", "setting"] == "margin=8"
    # a clear winner is chosen whatever its order
    clear = pd.DataFrame(rows + [run("h", "m", "margin=10", 2, 1, 0.95, hp=10)])
    sel3 = select_settings(prepare_runs(clear, GRID), GRID).set_index("method")
    assert sel3.loc["m", "setting"] == "margin=10"
    assert sel3.loc["m", "n_finished"] == 1
    chosen = selected_runs(prepare_runs(clear, GRID), select_settings(prepare_runs(clear, GRID), GRID))
    assert sorted(chosen["key"]) == ["f", "g", "h"]


def test_setting_scores_counts_and_method_without_finished_run():
    rows = [run("a", "m", "margin=5", 0, 0, 0.8, hp=5), run("b", "m", "margin=5", 0, 1, np.nan, status="FAILED",
                                                             hp=5),
            run("c", "c", "", 0, 0, np.nan, status="RUNNING")]
    runs = prepare_runs(pd.DataFrame(rows), GRID)
    scores = setting_scores(runs, GRID).set_index("method")
    assert scores.loc["m", "n_runs"] == 2 and scores.loc["m", "n_finished"] == 1
    assert math.isnan(scores.loc["m", "val_std"])
    sel = select_settings(runs, GRID)
    assert list(sel["method"]) == ["m"]


def test_seed_summary_mean_std_ddof1_and_single_seed():
    rows = [run("a", "m", "margin=5", 0, 0, 0.8, hp=5, **{"test/ece": 0.1}),
            run("b", "m", "margin=5", 0, 1, 0.8, hp=5, **{"test/ece": 0.3}),
            run("x", "m", "margin=5", 0, 2, 0.8, hp=5, status="FAILED", **{"test/ece": 9.0}),
            run("c", "c", "", 0, 0, 0.7, **{"test/ece": 0.2})]
    runs = prepare_runs(pd.DataFrame(rows), GRID)
    s = seed_summary(runs, GRID).set_index(["method", "metric"])
    assert s.loc[("m", "test/ece"), "mean"] == pytest.approx(0.2)
    assert s.loc[("m", "test/ece"), "std"] == pytest.approx(np.std([0.1, 0.3], ddof=1))
    assert s.loc[("m", "test/ece"), "n"] == 2
    assert s.loc[("c", "test/ece"), "n"] == 1 and math.isnan(s.loc[("c", "test/ece"), "std"])


def test_prepare_runs_rejects_bad_input_with_named_values():
    good = pd.DataFrame([run("a", "m", "margin=5", 0, 0, 0.8, hp=5)])
    with pytest.raises(ValueError, match="lacks the columns.*seed"):
        prepare_runs(good.drop(columns=["seed"]), GRID)
    with pytest.raises(ValueError, match="keys repeat.*'a'"):
        prepare_runs(pd.concat([good, good]), GRID)
    with pytest.raises(ValueError, match="unknown status.*DONE"):
        prepare_runs(good.assign(status="DONE"), GRID)
    with pytest.raises(ValueError, match="method.*'focal'"):
        prepare_runs(good.assign(method="focal"), GRID)
    with pytest.raises(ValueError, match="reference 'x'"):
        prepare_runs(good, {**GRID, "reference": "x"})
    runs = prepare_runs(good, GRID)
    with pytest.raises(ValueError, match="keys.*'zz'.*not in the runs"):
        prepare_volumes(pd.DataFrame({"key": ["zz"], "id": ["v"], "dsc_a": [0.5]}), runs, GRID)
    with pytest.raises(ValueError, match="lacks.*dsc_a"):
        prepare_volumes(pd.DataFrame({"key": ["a"], "id": ["v"], "dsc_b": [0.5]}), runs, GRID)


def test_volume_dsc_is_nan_mean_over_regions():
    grid = {**GRID, "region_names": ["a", "b"]}
    runs = prepare_runs(pd.DataFrame([run("a", "m", "margin=5", 0, 0, 0.8, hp=5)]), grid)
    v = prepare_volumes(pd.DataFrame({"key": ["a", "a"], "id": ["v1", "v2"], "dsc_a": [0.6, np.nan],
                                      "dsc_b": [0.8, 0.5], "asd_a": [1.0, 2.0], "asd_b": [3.0, 4.0]}), runs, grid)
    assert v["dsc"].tolist() == pytest.approx([0.7, 0.5])
    assert v["asd"].tolist() == pytest.approx([2.0, 3.0])
    assert v["method"].tolist() == ["m", "m"] and v["seed"].tolist() == [0, 0]


def test_run_accounting_names_missing_and_unfinished():
    rows = [run("a", "m", "margin=5", 0, 0, 0.8, hp=5), run("b", "m", "margin=5", 0, 1, np.nan, "FAILED", hp=5),
            run("c", "c", "", 0, 0, 0.7), run("d", "c", "", 0, 1, np.nan, "KILLED")]
    acc = run_accounting(prepare_runs(pd.DataFrame(rows), GRID), GRID)
    assert acc["expected"] == 2 + 3 * 2
    assert acc["by_status"] == {"FINISHED": 2, "FAILED": 1, "RUNNING": 0, "KILLED": 1}
    assert {r["key"] for r in acc["not_finished"]} == {"b", "d"}
    assert sorted((r["setting"], r["seed"]) for r in acc["missing"]) == [
        ("margin=10", 0), ("margin=10", 1), ("margin=8", 0), ("margin=8", 1)]


@pytest.mark.parametrize("metric,expected", [("test/dsc/wm", True), ("test/lts/cece", False), ("asd_gm", False),
                                             ("test/noise_0.02/dsc", True), ("val/best_dsc", True)])
def test_metric_direction(metric, expected):
    assert higher_is_better(metric) is expected
