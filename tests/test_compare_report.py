"""The whole report on a small synthetic grid: 2 methods × 2 values × 2 seeds × 3 volumes."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest

from pipeline.compare import write_report
from pipeline.compare.data import prepare_runs, prepare_volumes
from pipeline.compare.reanalyse import reanalyse
from pipeline.compare.selection import select_settings
from pipeline.compare.statistics import compare_methods, paired_differences
from pipeline.compare.verdict import verdict_paragraph
from tests.compare_synthetic import make_data, make_extras, make_grid

FAILED = (("ls", "alpha=0.2", 1),)
FIGURES = ["fig2_radar_unet.png", "fig3_ranking_unet.png", "fig4_logits_unet.png", "fig5_noise_unet.png",
           "fig6_sensitivity.png", "fig8_reliability_unet.png", "fig8_confidence_unet.png"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    grid = make_grid(penalties=True)
    runs, vols = make_data(grid, failed=FAILED)
    folder = tmp_path_factory.mktemp("report")
    path = write_report(folder, runs, vols, grid, make_extras(runs))
    return {"grid": grid, "runs": runs, "volumes": vols, "folder": folder, "md": path.read_text(),
            "summary": json.loads((folder / "summary.json").read_text())}


def _row(md: str, section: str, label: str) -> list[str]:
    """The cells of the row starting with ``label`` in the section headed ``section``, marks removed."""
    part = md.split(section, 1)[1].split("\n## ", 1)[0]
    for line in part.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == label:
            return [re.sub(r"\*\*|</?u>", "", c) for c in cells]
    raise AssertionError(f"no row {label!r} in {section!r}")


def _mean_std(values, digits):
    values = np.asarray(values, dtype=float)
    if values.size == 1:
        return f"{values[0]:.{digits}f}"
    return f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}"


def test_every_file_is_written_and_linked(report):
    folder, md = report["folder"], report["md"]
    for name in FIGURES:
        assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"]({name})" in md
    assert not (folder / "fig7_backbones.png").exists()  # one backbone: no Fig. 7
    blocks = md.split("\n\n")
    assert blocks[1].startswith("**Verdict**") and blocks[2].startswith("- `unet`, MbLS")
    assert blocks[3].startswith("Differences are MbLS − other")
    assert blocks[4].startswith("Checkpoint sensitivity: tested with the last epoch's weights")
    assert blocks[5].startswith("**Protocol.**") and "2 epochs" in blocks[5]
    for heading in ("Table 1", "Table 2", "Table 3", "Table 4", "Paired statistics", "Checkpoint sensitivity",
                    "Rankings", "## Runs"):
        assert heading in md


def test_report_html_is_one_page_with_the_figures_inlined(report):
    page = (report["folder"] / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<h2>Table 1: segmentation" in page
    assert page.count("src=\"data:image/png;base64,") == len(FIGURES)
    assert "<table><tr><th>Method</th>" in page and "<b>Verdict</b>" in page
    assert "**" not in page and "![" not in page and "&lt;u&gt;" not in page  # no markdown left raw


def test_selection_matches_the_best_mean_validation_dsc(report):
    runs = report["runs"]
    fin = runs[runs["status"] == "FINISHED"]
    expected = {m: g.groupby("setting")["val/best_dsc"].mean().idxmax() for m, g in fin.groupby("method")}
    got = {r["method"]: r["setting"] for r in report["summary"]["selection"]}
    assert got == expected


def test_tables_equal_the_input_metrics(report):
    runs, md = report["runs"], report["md"]
    fin = runs[runs["status"] == "FINISHED"]
    selected = {r["method"]: r["setting"] for r in report["summary"]["selection"]}
    for method, label in (("ls", "LS"), ("mbls", "MbLS")):
        g = fin[(fin["method"] == method) & (fin["setting"] == selected[method])]
        t1 = _row(md, "## Table 1", label)
        assert t1[1] == str(len(g))
        assert t1[2:] == [_mean_std(g[c], 3) for c in ("test/dsc/a", "test/dsc/b", "test/dsc")] + [
            _mean_std(g[c], 2) for c in ("test/asd/a", "test/asd/b", "test/asd")]
        t2 = _row(md, "## Table 2", label)
        assert t2[2:] == [_mean_std(g[c], 3) for c in ("test/ece", "test/cece", "test/nll", "test/brier")]
        t3 = _row(md, "## Table 3", label)
        assert t3[2:] == [_mean_std(g[c], 3) for c in ("test/ece", "test/ts/ece", "test/lts/ece", "test/cece",
                                                         "test/ts/cece", "test/lts/cece")]
    lone = fin[(fin["method"] == "ls") & (fin["setting"] == "alpha=0.2")]
    assert _row(md, "## Table 4", "LS (alpha=0.2)")[1:3] == ["1", f"{lone['test/dsc'].iloc[0]:.3f}"]


def test_statistics_equal_the_per_volume_differences(report):
    runs, vols = report["runs"], report["volumes"]
    sel = {r["method"]: r["setting"] for r in report["summary"]["selection"]}
    keys = {m: runs[(runs["method"] == m) & (runs["setting"] == s) & (runs["status"] == "FINISHED")]
            .set_index("seed")["key"] for m, s in sel.items()}
    seeds = sorted(set(keys["mbls"].index) & set(keys["ls"].index))
    diffs = []
    for s in seeds:
        a = vols[vols["key"] == keys["mbls"][s]].set_index("id")["ece"]
        b = vols[vols["key"] == keys["ls"][s]].set_index("id")["ece"]
        diffs += list(a - b.reindex(a.index))
    stats = {r["metric"]: r for r in report["summary"]["statistics"]}
    assert stats["ece"]["n_pairs"] == len(diffs) == 6 and stats["ece"]["n_seeds"] == 2
    seed_means = [np.mean(diffs[:3]), np.mean(diffs[3:])]
    assert stats["ece"]["diff"] == pytest.approx(np.mean(seed_means))
    assert stats["ece"]["seed_sd"] == pytest.approx(np.std(seed_means, ddof=1))
    assert stats["ece"]["ci_low"] <= stats["ece"]["diff"] <= stats["ece"]["ci_high"]
    assert stats["ece"]["p"] >= 0.5 and stats["ece"]["p_floor"] == 0.5  # 2 seeds: the smallest p is 2/4
    assert stats["ece"]["verdict"] == "inconclusive"
    row = _row(report["md"], "## Paired statistics", "MbLS vs LS")
    assert row[1] == "DSC" and row[2] == "2" and row[11] == "inconclusive"


def test_best_vs_last_table_equals_the_logged_metrics(report):
    runs, md = report["runs"], report["md"]
    fin = runs[runs["status"] == "FINISHED"]
    selected = {r["method"]: r["setting"] for r in report["summary"]["selection"]}
    for method, label in (("ls", "LS"), ("mbls", "MbLS")):
        g = fin[(fin["method"] == method) & (fin["setting"] == selected[method])]
        row = _row(md, "## Checkpoint sensitivity", label)
        assert row[2:] == [_mean_std(g[f"{prefix}/{m}"], 3) for m in ("dsc", "ece", "cece")
                           for prefix in ("test", "test_last")]
    last = {r["metric"]: r for r in report["summary"]["statistics_last"]}
    assert set(last) == {"last_dsc", "last_ece", "last_cece"} and last["last_ece"]["n_seeds"] == 2


def test_failed_runs_are_listed_and_per_volume_csv_is_complete(report):
    md, folder, vols = report["md"], report["folder"], report["volumes"]
    assert "| FAILED | `unet` | LS | alpha=0.2 | 1 | `unet-ls-1-1` |" in md
    assert "8 runs expected by the grid, 8 present: 7 finished, 1 failed" in md
    csv = pd.read_csv(folder / "per_volume.csv")
    assert len(csv) == len(vols) == 7 * 3
    for col in ("key", "backbone", "method", "setting", "seed", "id", "dsc", "asd", "ece", "dsc_a", "lts_cece"):
        assert col in csv.columns
    merged = csv.merge(vols, on=["key", "id"], suffixes=("", "_in"))
    assert np.allclose(merged["ece"], merged["ece_in"]) and np.allclose(merged["dsc_b"], merged["dsc_b_in"])
    assert np.allclose(csv["dsc"], (csv["dsc_a"] + csv["dsc_b"]) / 2)


def test_same_input_in_another_order_gives_identical_files(report, tmp_path):
    runs, vols, grid = report["runs"], report["volumes"], report["grid"]
    shuffled = runs.sample(frac=1, random_state=3)
    shuffled = shuffled[list(reversed(shuffled.columns))]
    write_report(tmp_path, shuffled, vols.sample(frac=1, random_state=4), grid, make_extras(runs))
    for name in ("report.md", "summary.json", "per_volume.csv"):
        assert (tmp_path / name).read_bytes() == (report["folder"] / name).read_bytes(), name


def test_fig4_caption_gives_the_logit_distances_of_the_selected_runs(report):
    runs, md = report["runs"], report["md"]
    fin = runs[runs["status"] == "FINISHED"]
    selected = {r["method"]: r["setting"] for r in report["summary"]["selection"]}
    caption = next(line for line in md.splitlines() if line.startswith("**Fig. 4"))
    for method, label in (("ls", "LS"), ("mbls", "MbLS")):
        g = fin[(fin["method"] == method) & (fin["setting"] == selected[method])]
        expected = " / ".join(_mean_std(g[f"test/logits/distance_{k}"], 1) for k in ("mean", "max"))
        assert f"{label} {expected}" in caption


def test_two_backbones_without_extras_say_which_figures_are_skipped(tmp_path):
    grid = make_grid(backbones=("unet", "attunet"))
    runs, vols = make_data(grid, seed=1)
    md = write_report(tmp_path, runs, vols, grid).read_text()
    assert "**Backbone `attunet`**" in md and "**Backbone `unet`**" in md
    for name in ("fig2_radar_unet.png", "fig2_radar_attunet.png", "fig3_ranking_attunet.png",
                 "fig6_sensitivity.png", "fig7_backbones.png"):
        assert (tmp_path / name).is_file()
    assert not (tmp_path / "fig4_logits_unet.png").exists()
    assert md.index("fig6_sensitivity.png") < md.index("fig7_backbones.png")  # figures in the paper's order
    assert "Fig. 4 — `unet`: needs the mean logits" in md
    assert "Fig. 8 — `attunet`: no confidence map given" in md
    assert "Table 4" not in md


def test_verdict_states_a_clear_effect_and_an_inconclusive_one():
    grid = make_grid(seeds=tuple(range(10)))
    runs, vols = make_data(grid, n_volumes=3, ece_shift=0.05, seed=2)
    runs = prepare_runs(runs, grid)
    vols = prepare_volumes(vols, runs, grid)
    sel = select_settings(runs, grid)
    cmp = compare_methods(paired_differences(runs, vols, sel, grid), grid).set_index("metric")
    text = verdict_paragraph(cmp.reset_index(), sel, runs, grid)
    ece = cmp.loc["ece"]
    assert ece["p"] == pytest.approx(2 / 2 ** 10) and ece["p_holm"] == pytest.approx(3 * 2 / 2 ** 10)
    assert ece["verdict"] == "better" and ece["ci_high"] < 0
    assert f"ECE better: lower by {-ece['diff']:.4f} [{-ece['ci_high']:.4f}, {-ece['ci_low']:.4f}]" in text
    dsc = cmp.loc["dsc"]
    assert dsc["ci_low"] < 0 < dsc["ci_high"] and dsc["verdict"] == "inconclusive"  # no DSC effect was built in
    assert f"DSC inconclusive (MbLS − LS = {dsc['diff']:+.4f}" in text
    assert "2/2^10 = 0.00195" in text and "Holm over the 3 tests" in text
    assert "against LS (10 seeds)" in text and "seeds 0, 1, 2" in text and "augmentation: none" in text


def test_a_comparison_where_nothing_finished_still_reports_every_run(tmp_path):
    grid = make_grid()
    runs, vols = make_data(grid)
    runs["status"] = "FAILED"
    md = write_report(tmp_path, runs, vols.iloc[0:0][["key", "id"]], grid).read_text()
    assert "- Backbone `unet`: no verdict, MbLS has no finished run." in md
    assert "Holm" not in md.split("**Protocol.**")[0]
    assert "0 finished, 8 failed" in md
    assert all(f"`{k}`" in md for k in runs["key"])
    assert not list(tmp_path.glob("*.png"))
    assert json.loads((tmp_path / "summary.json").read_text())["selection"] == []


def test_reanalysis_from_the_report_folder_alone_gives_the_report_statistics(report, tmp_path):
    folder = tmp_path / "copy"
    folder.mkdir()
    for name in ("per_volume.csv", "summary.json"):
        shutil.copy(report["folder"] / name, folder / name)
    out = reanalyse(folder)
    got = out["statistics"].set_index("metric")
    for row in report["summary"]["statistics"]:
        assert got.loc[row["metric"], "verdict"] == row["verdict"]
        for k in ("n_seeds", "n_pairs", "diff", "ci_low", "ci_high", "p", "p_tost"):
            assert got.loc[row["metric"], k] == pytest.approx(row[k])
    assert (folder / "reanalysis.md").read_text().startswith("# Seed-level reanalysis of `tiny` on `blobs`")
    with pytest.raises(FileNotFoundError, match="per_volume.csv is missing"):
        reanalyse(tmp_path)
