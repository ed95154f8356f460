"""Sum-rank and mean of case-specific ranks on hand-computed examples with ties and missing values."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.compare.ranking import case_ranks, sum_rank


def test_sum_rank_with_ties_and_a_missing_value():
    means = pd.DataFrame({"dsc": [0.8, 0.9, 0.8], "asd": [2.0, 1.0, 3.0], "ece": [0.1, 0.1, 0.05],
                          "cece": [0.2, np.nan, 0.1]}, index=["A", "B", "C"])
    r = sum_rank(means)
    assert r["dsc"].tolist() == [2.5, 1.0, 2.5]
    assert r["asd"].tolist() == [2.0, 1.0, 3.0]
    assert r["ece"].tolist() == [2.5, 2.5, 1.0]
    assert r["cece"].tolist() == [2.0, 3.0, 1.0]  # NaN ranks last
    assert r["sum"].tolist() == [9.0, 7.5, 7.5]
    assert r["position"].tolist() == [3.0, 1.5, 1.5]


def test_mean_of_case_specific_ranks_hand_computed():
    rows = []

    def add(method, seed, vid, dsc, ece):
        rows.append({"key": f"{method}{seed}", "method": method, "seed": seed, "id": vid, "dsc": dsc, "asd": 1.0,
                     "ece": ece, "cece": 0.1})

    # seed 0, two volumes, every method
    add("A", 0, "v0", 0.8, np.nan), add("B", 0, "v0", 0.8, 0.1), add("C", 0, "v0", 0.7, 0.2)
    add("A", 0, "v1", 0.6, 0.1), add("B", 0, "v1", 0.9, 0.1), add("C", 0, "v1", 0.7, 0.1)
    # seed 1: C has no run, so these cases must not count (A would otherwise win them)
    add("A", 1, "v0", 0.99, 0.0), add("B", 1, "v0", 0.1, 0.9)
    add("A", 1, "v1", 0.99, 0.0), add("B", 1, "v1", 0.1, 0.9)
    ranks, n = case_ranks(pd.DataFrame(rows), ["A", "B", "C"])
    assert n == 2
    # DSC: v0 → A 1.5, B 1.5, C 3; v1 → B 1, C 2, A 3
    assert ranks["dsc"].tolist() == pytest.approx([2.25, 1.25, 2.5])
    # ECE (lower better): v0 → B 1, C 2, A (NaN) 3; v1 → all tie at 2
    assert ranks["ece"].tolist() == pytest.approx([2.5, 1.5, 2.0])
    assert ranks["asd"].tolist() == pytest.approx([2.0, 2.0, 2.0])
    assert ranks["mean"].tolist() == pytest.approx([(2.25 + 2 + 2.5 + 2) / 4, (1.25 + 2 + 1.5 + 2) / 4,
                                                    (2.5 + 2 + 2 + 2) / 4])
    assert list(ranks.index) == ["A", "B", "C"]


def test_case_ranks_without_a_complete_case():
    df = pd.DataFrame([{"key": "a", "method": "A", "seed": 0, "id": "v", "dsc": 0.5, "asd": 1.0, "ece": 0.1,
                        "cece": 0.1}])
    ranks, n = case_ranks(df, ["A", "B"])
    assert n == 0 and ranks.isna().all().all()
