"""Paired statistics: bootstrap interval, Wilcoxon, Holm, and the pairing of runs on (seed, volume)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from pipeline.compare.data import prepare_runs, prepare_volumes
from pipeline.compare.selection import select_settings
from pipeline.compare.statistics import bootstrap_ci, compare_methods, holm, paired_differences, wilcoxon_p

GRID = {"name": "g", "dataset": "d", "class_names": ["bg", "a"], "backbones": ["unet"], "reference": "mbls",
        "baseline": "ce", "seeds": [0, 1, 2],
        "methods": [{"name": "ce", "label": "CE", "hp_name": None, "values": []},
                    {"name": "mbls", "label": "MbLS", "hp_name": None, "values": []}]}


def test_bootstrap_interval_covers_true_shift_and_wilcoxon_detects_it():
    rng = np.random.default_rng(1)
    d = 0.02 + rng.normal(0, 0.01, 150)
    low, high = bootstrap_ci(d)
    assert low < 0.02 < high
    assert low > 0.015 and high < 0.025  # ± about 2 standard errors (0.01 / sqrt(150) ≈ 0.0008)
    assert wilcoxon_p(d) < 1e-10
    assert bootstrap_ci(d) == (low, high)  # fixed seed: the same interval again
    assert bootstrap_ci(d, seed=5) != (low, high)


def test_no_effect_gives_interval_around_zero_and_large_p():
    rng = np.random.default_rng(2)
    d = rng.normal(0, 0.01, 150)
    low, high = bootstrap_ci(d)
    assert low < 0 < high
    assert wilcoxon_p(d) > 0.2


def test_bootstrap_chunks_match_the_resample_count_and_level():
    d = np.arange(10.0)
    low, high = bootstrap_ci(d, n_resamples=2000, level=0.5)
    low95, high95 = bootstrap_ci(d, n_resamples=2000, level=0.95)
    assert low95 < low < 4.5 < high < high95
    assert all(math.isnan(x) for x in bootstrap_ci([np.nan]))
    assert all(math.isnan(x) for x in bootstrap_ci([]))


def test_wilcoxon_edge_cases():
    assert wilcoxon_p([0.0, 0.0, 0.0]) == 1.0
    assert math.isnan(wilcoxon_p([]))
    assert wilcoxon_p([0.3]) == 1.0  # one non-zero pair cannot show anything
    assert wilcoxon_p([0.1, 0.2, 0.3, 0.4, 0.5]) == pytest.approx(2 / 32)  # exact: both all-positive tails of 2^5
    assert wilcoxon_p([0.1, 0.2, 0.0, 0.4, 0.5, np.nan]) == pytest.approx(2 / 16)  # zero and NaN dropped


def test_holm_on_a_known_vector():
    assert holm([0.01, 0.04, 0.03, 0.005]).tolist() == pytest.approx([0.03, 0.06, 0.06, 0.02])
    out = holm([0.01, np.nan, 0.02])
    assert out[0] == pytest.approx(0.02) and out[2] == pytest.approx(0.02) and math.isnan(out[1])
    assert holm([0.5, 0.9]).tolist() == pytest.approx([1.0, 1.0])  # capped at 1, monotone
    assert holm([]).size == 0


def _runs_and_volumes():
    def run(key, method, seed, status="FINISHED"):
        return {"key": key, "status": status, "method": method, "backbone": "unet", "setting": "",
                "hp_value": np.nan, "order": 0, "seed": seed, "epochs": 1, "val/best_dsc": 0.8}

    runs = pd.DataFrame([run("r0", "mbls", 0), run("r1", "mbls", 1), run("r2", "mbls", 2),
                         run("o0", "ce", 0), run("o1", "ce", 1, "FAILED")])  # ce seed 2 absent
    vol = []
    for key, base, ids in (("r0", 0.9, ["v0", "v1", "v2"]), ("r1", 0.9, ["v0", "v1", "v2"]),
                           ("r2", 0.9, ["v0", "v1", "v2"]), ("o0", 0.8, ["v0", "v1"])):
        for i, v in enumerate(ids):
            vol.append({"key": key, "id": v, "dsc_a": base - 0.01 * i, "ece": 0.1 + 0.01 * i, "cece": 0.2})
    return runs, pd.DataFrame(vol)


def test_pairing_drops_failed_missing_and_unmatched_volumes():
    runs, vols = _runs_and_volumes()
    runs = prepare_runs(runs, GRID)
    vols = prepare_volumes(vols, runs, GRID)
    sel = select_settings(runs, GRID)
    pairs = paired_differences(runs, vols, sel, GRID)
    assert set(pairs["seed"]) == {0}  # seed 1: ce failed; seed 2: no ce run
    dsc = pairs[pairs["metric"] == "dsc"].set_index("id")
    assert dsc.loc["v0", "diff"] == pytest.approx(0.1) and dsc.loc["v1", "diff"] == pytest.approx(0.1)
    assert math.isnan(dsc.loc["v2", "diff"])  # the ce run has no v2
    assert set(dsc["reference_key"]) == {"r0"} and set(dsc["other_key"]) == {"o0"}
    cmp = compare_methods(pairs, GRID, n_resamples=500).set_index("metric")
    assert cmp.loc["dsc", "n_pairs"] == 2 and cmp.loc["dsc", "n_dropped"] == 1 and cmp.loc["dsc", "n_seeds"] == 1
    assert cmp.loc["dsc", "diff"] == pytest.approx(0.1)
    assert cmp.loc["dsc", "seeds_better"] == 1  # higher DSC is better
    assert cmp.loc["ece", "diff"] == pytest.approx(0.0) and cmp.loc["ece", "p"] == 1.0
    assert cmp.loc["ece", "seeds_better"] == 0
    assert list(cmp.index) == ["dsc", "ece", "cece"]
    assert cmp["p_holm"].tolist() == pytest.approx(holm(cmp["p"]).tolist())


def test_two_finished_runs_of_one_seed_are_an_error():
    runs, vols = _runs_and_volumes()
    runs.loc[runs["key"] == "r1", "seed"] = 0
    runs = prepare_runs(runs, GRID)
    with pytest.raises(ValueError, match="several finished runs per seed"):
        paired_differences(runs, prepare_volumes(vols, runs, GRID), select_settings(runs, GRID), GRID)
