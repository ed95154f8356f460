"""Markdown tables (mean ± std, best/second marks) and the verdict wording."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pandas as pd
import pytest

from pipeline.compare.tables import best_marks, config_table, fmt_p, mean_std, statistics_table
from pipeline.compare.verdict import clause, epochs_text


def test_mean_std_formats():
    assert mean_std(0.81234, 0.0104, 3) == "0.812 ± 0.010"
    assert mean_std(0.81234, math.nan, 1) == "0.812"
    assert mean_std(1.5, 0.25, 2, digits=2) == "1.50 ± 0.25"
    assert mean_std(math.nan, math.nan, 0) == "—"


def test_best_marks_direction_ties_and_nan():
    assert best_marks([0.80, 0.90, 0.85], True, 3) == ["", "best", "second"]
    assert best_marks([0.10, 0.05, 0.05], False, 3) == ["second", "best", "best"]
    assert best_marks([0.1001, 0.1004, 0.2], False, 3) == ["best", "best", "second"]  # equal when printed
    assert best_marks([0.3, math.nan], False, 3) == ["best", ""]
    assert best_marks([0.3], True, 3) == ["best"]


def _summary(rows):
    return pd.DataFrame([{"backbone": "unet", "method": m, "setting": "", "order": 0, "metric": k, "mean": mu,
                          "std": sd, "n": n} for m, k, mu, sd, n in rows])


def test_config_table_marks_and_numbers():
    summary = _summary([("a", "test/dsc", 0.80, 0.01, 3), ("b", "test/dsc", 0.90, 0.02, 3),
                        ("c", "test/dsc", 0.85, 0.03, 3),
                        ("a", "test/ece", 0.10, 0.01, 3), ("b", "test/ece", 0.05, 0.01, 2),
                        ("c", "test/ece", 0.05, 0.02, 3)])
    md = config_table(summary, [("unet", m, "") for m in "abc"], ["A", "B", "C"],
                      [("DSC", "test/dsc", 3), ("ECE", "test/ece", 3)])
    lines = md.splitlines()
    assert lines[0] == "| Method | seeds | DSC | ECE |"
    assert lines[2] == "| A | 3 | 0.800 ± 0.010 | <u>0.100 ± 0.010</u> |"
    assert lines[3] == "| B | 3 | **0.900 ± 0.020** | **0.050 ± 0.010** (n=2) |"
    assert lines[4] == "| C | 3 | <u>0.850 ± 0.030</u> | **0.050 ± 0.020** |"


def test_clause_wording_follows_the_numbers():
    detected = SimpleNamespace(metric="ece", n_pairs=15, diff=-0.012, ci_low=-0.016, ci_high=-0.008, p_holm=0.003)
    assert clause(detected, "CE", "MbLS") == "lowers ECE by 0.0120 [0.0080, 0.0160] (Holm p = 0.003)"
    raised = SimpleNamespace(metric="dsc", n_pairs=15, diff=0.02, ci_low=0.01, ci_high=0.03, p_holm=0.01)
    assert clause(raised, "CE", "MbLS", n_pairs=20) == (
        "raises DSC by 0.0200 [0.0100, 0.0300] (Holm p = 0.01; 15 pairs)")
    covers = SimpleNamespace(metric="dsc", n_pairs=15, diff=-0.001, ci_low=-0.004, ci_high=0.002, p_holm=0.001)
    assert clause(covers, "CE", "MbLS").startswith("no detectable difference in DSC (MbLS − CE = -0.0010 "
                                                   "[-0.0040, +0.0020], Holm p = 0.001")
    not_significant = SimpleNamespace(metric="cece", n_pairs=15, diff=-0.01, ci_low=-0.02, ci_high=-0.001,
                                      p_holm=0.2)
    assert clause(not_significant, "CE", "MbLS") == (  # the interval excludes 0, the corrected test does not agree
        "a CECE difference that the corrected test does not confirm (MbLS − CE = -0.0100 [-0.0200, -0.0010], "
        "Holm p = 0.2)")
    empty = SimpleNamespace(metric="ece", n_pairs=0, diff=math.nan, ci_low=math.nan, ci_high=math.nan,
                            p_holm=math.nan)
    assert "no pair" in clause(empty, "CE", "MbLS")


def test_statistics_table_and_p_format():
    cmp = pd.DataFrame([{"backbone": "unet", "reference": "mbls", "other": "ce", "metric": "ece",
                         "higher_is_better": False, "n_pairs": 15, "n_dropped": 0, "n_seeds": 3, "seeds_better": 3,
                         "reference_mean": 0.05, "other_mean": 0.062, "diff": -0.012, "ci_low": -0.016,
                         "ci_high": -0.008, "p": 0.00001, "p_holm": 0.00003}])
    grid = {"backbones": ["unet"], "reference": "mbls",
            "methods": [{"name": "ce", "label": "CE"}, {"name": "mbls", "label": "MbLS"}]}
    row = statistics_table(cmp, grid).splitlines()[2]
    assert row == ("| MbLS vs CE | ECE | 15 | 3/3 | 0.0500 | 0.0620 | -0.0120 [-0.0160, -0.0080] | < 0.0001 | "
                   "< 0.0001 |")
    assert fmt_p(0.0312) == "0.0312" and fmt_p(math.nan) == "—"


@pytest.mark.parametrize("epochs,grid_epochs,flag,expected", [
    ([100, 100], 100, False, "100 epochs"),
    ([2, 2], 100, True, "2 epochs (overridden from the grid's 100)"),
    ([2], 100, False, "2 epochs (overridden from the grid's 100)"),
    ([2, 5], 5, False, "epochs 2, 5 (runs differ) (the grid's: 5)"),
])
def test_epochs_text(epochs, grid_epochs, flag, expected):
    runs = pd.DataFrame({"epochs": epochs})
    assert epochs_text(runs, {"epochs": grid_epochs, "epochs_overridden": flag}) == expected
