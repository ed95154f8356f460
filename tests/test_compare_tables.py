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


def _stat(**kw):
    base = dict(metric="ece", n_seeds=10, seeds_better=10, diff=-0.012, ci_low=-0.016, ci_high=-0.008, p_holm=0.003,
                p_tost_holm=0.4, margin=0.005, verdict="better", seeds_detect=math.inf, seeds_equivalence=math.inf)
    return SimpleNamespace(**{**base, **kw})


def test_clause_wording_follows_the_verdict():
    assert clause(_stat(), "CE", "MbLS") == (
        "ECE better: lower by 0.0120 [0.0080, 0.0160] (sign-flip Holm p = 0.003, 10/10 seeds)")
    raised = _stat(metric="dsc", diff=0.02, ci_low=0.01, ci_high=0.03, p_holm=0.01, seeds_better=7, n_seeds=8,
                   verdict="better, within the margin", p_tost_holm=0.02, margin=0.05)
    assert clause(raised, "CE", "MbLS", n_seeds=10) == (
        "DSC better: higher by 0.0200 [0.0100, 0.0300] (sign-flip Holm p = 0.01, 7/8 seeds, 8 seeds), yet within "
        "±0.05 (TOST Holm p = 0.02)")
    same = _stat(diff=0.0008, ci_low=-0.002, ci_high=0.003, p_holm=1.0, p_tost_holm=0.01, verdict="equivalent")
    assert clause(same, "CE", "MbLS") == (
        "ECE equivalent within ±0.005 (MbLS − CE = +0.0008 [-0.0020, +0.0030]; TOST Holm p = 0.01)")
    open_ = _stat(metric="cece", diff=-0.003, ci_low=-0.006, ci_high=0.001, p_holm=0.3, p_tost_holm=0.2,
                  verdict="inconclusive", seeds_detect=23, seeds_equivalence=41)
    assert clause(open_, "CE", "MbLS") == (
        "CECE inconclusive (MbLS − CE = -0.0030 [-0.0060, +0.0010], sign-flip Holm p = 0.3, TOST Holm p = 0.2; "
        "about 23 seeds would detect a difference of this size and about 41 seeds would show equivalence within "
        "±0.005)")
    beyond = _stat(diff=0.008, ci_low=-0.001, ci_high=0.02, p_holm=0.2, verdict="inconclusive", seeds_detect=12)
    assert clause(beyond, "CE", "MbLS").endswith(
        "about 12 seeds would detect a difference of this size and equivalence within ±0.005 is not to be expected)")
    assert clause(_stat(n_seeds=0), "CE", "MbLS") == "ECE: no seed with a value on both sides"


def test_statistics_table_and_p_format():
    cmp = pd.DataFrame([{"backbone": "unet", "reference": "mbls", "other": "ce", "metric": "ece",
                         "higher_is_better": False, "n_pairs": 15, "n_dropped": 0, "n_seeds": 3, "seeds_better": 3,
                         "reference_mean": 0.05, "other_mean": 0.062, "diff": -0.012, "seed_sd": 0.002,
                         "ci_low": -0.016, "ci_high": -0.008, "p": 0.25, "p_holm": 0.75, "p_floor": 0.25,
                         "margin": 0.005, "p_tost": 0.9, "p_tost_holm": 1.0, "verdict": "inconclusive",
                         "seeds_detect": 10, "seeds_equivalence": math.inf, "pair_ci_low": -0.014,
                         "pair_ci_high": -0.010, "pair_p": 0.00001, "pair_p_holm": 0.00003}])
    grid = {"backbones": ["unet"], "reference": "mbls",
            "methods": [{"name": "ce", "label": "CE"}, {"name": "mbls", "label": "MbLS"}]}
    row = statistics_table(cmp, grid).splitlines()[2]
    assert row == ("| MbLS vs CE | ECE | 3 | 3/3 | 0.0500 | 0.0620 | -0.0120 [-0.0160, -0.0080] | 0.25 | 0.75 | "
                   "±0.005 | 1 | **inconclusive** | 10 / ∞ | [-0.0140, -0.0100] | < 0.0001 |")
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
