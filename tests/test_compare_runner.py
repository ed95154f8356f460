"""`make compare` end to end on tiny data, in-process: a 2-method × 2-value × 2-seed grid, one epoch per run.

One comparison trained in one process; the same grid trained as two shards into another store, the second shard
killed after its first run and started again; then: the same selection and report, nothing retrained on a rerun,
and the report's numbers equal the metrics logged in MLflow.
"""

from __future__ import annotations

import json
import re

import mlflow
import numpy as np
import pytest

import pipeline.compare.runner as runner
from pipeline.compare.collect import child_runs
from pipeline.compare.grid import expand, load_grid, parse_shard, shard
from pipeline.registry import UnknownNameError
from tests.helpers import make_config_dir, tiny_unet_overrides, write_blob_volumes

GRID = """
name: tiny
backbones: [unet]
seeds: [0, 1]
reference: mbls
baseline: ls
augmentation: none
profile: {epochs: 1, augment: [], val_interval: 1}
methods:
  - {name: ls, label: LS, loss: ls, grid: {alpha: [0.1, 0.2]}}
  - {name: mbls, label: MbLS, loss: mbls, grid: {margin: [5, 10]}}
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    cfg = make_config_dir(tmp)
    (tmp / "grid.yaml").write_text(GRID)
    data = write_blob_volumes(tmp / "data")
    over = {"data_dir": str(data), **tiny_unet_overrides(), "evaluation::lts::iterations": 5,
            "evaluation::noise::sigmas": [0.0, 0.02], "evaluation::maps::volumes": 0}
    return tmp, cfg, over


def compare(setup, store: str, monkeypatch, **kw):
    tmp, cfg, over = setup
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp}/{store}.db")
    return runner.run_comparison("blobs", str(tmp / "grid.yaml"), overrides={**over, "output_dir": str(tmp / store)},
                                 config_dir=cfg, reports_root=tmp / f"reports-{store}", quiet=True, **kw)


def report_text(out) -> str:
    return out["report"].read_text()


@pytest.fixture(scope="module")
def single(setup):
    mp = pytest.MonkeyPatch()
    try:
        first = compare(setup, "single", mp)
        again = compare(setup, "single", mp)
    finally:
        mp.undo()
    return first, again


def test_grid_expansion_keys_and_shards(setup):
    tmp, cfg, _ = setup
    grid = load_grid(str(tmp / "grid.yaml"), cfg)
    specs = expand(grid)
    assert [(s.method, s.setting, s.seed) for s in specs][:3] == [("ls", "alpha=0.1", 0), ("ls", "alpha=0.1", 1),
                                                                  ("ls", "alpha=0.2", 0)]
    assert len(specs) == 8 and specs[-1].overrides["loss::margin"] == 10 and specs[-1].overrides["augment"] == []
    halves = shard(specs, *parse_shard("1/2")), shard(specs, *parse_shard("2/2"))
    assert sorted(id(s) for h in halves for s in h) == sorted(id(s) for s in specs) and len(halves[0]) == 4
    with pytest.raises(ValueError, match=r"SHARD must be i/n with 1 <= i <= n \(e\.g\. 2/4\), got '3/2'"):
        parse_shard("3/2")
    with pytest.raises(UnknownNameError, match="unknown comparison grid 'papr'. Did you mean 'paper'"):
        load_grid("papr")
    bad = tmp / "bad.yaml"
    bad.write_text(GRID.replace("grid: {margin: [5, 10]}", "grid: {margn: [5, 10]}"))
    with pytest.raises(ValueError, match="loss 'mbls' of method 'mbls' has no parameter 'margn'"):
        load_grid(str(bad), cfg)


def test_every_shipped_grid_loads():
    sizes = {name: len(expand(load_grid(name))) for name in ("paper", "augmented", "penalties", "backbones")}
    assert sizes == {"paper": 150, "augmented": 90, "penalties": 110, "backbones": 24}
    assert load_grid("augmented")["profile"].get("augment") is None  # the base config's augmentation applies
    assert load_grid("paper")["profile"]["augment"] == [] and load_grid("paper")["profile"]["epochs"] == 100


def test_selection_and_rerun_skips(setup, single):
    first, again = single
    assert len(first["trained"]) == 8 and not first["failed"] and not first["skipped"]
    assert again["trained"] == [] and len(again["skipped"]) == 8  # found in the store, not retrained
    assert report_text(first) == report_text(again)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{setup[0]}/single.db")
    assert client.get_run(first["parent_run_id"]).info.status == "FINISHED"  # every run of the grid finished
    summary = json.loads((first["report"].parent / "summary.json").read_text())
    chosen = {(r["method"], r["setting"]) for r in summary["selection"]}
    scores = {(r["method"], r["setting"]): r["val_mean"] for r in summary["settings"]}
    for method in ("ls", "mbls"):
        best = max(v for (m, _), v in scores.items() if m == method)
        picked = [s for (m, s) in chosen if m == method]
        assert len(picked) == 1 and scores[(method, picked[0])] == best


def test_report_tables_equal_the_mlflow_metrics(setup, single):
    first, _ = single
    summary = json.loads((first["report"].parent / "summary.json").read_text())
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{setup[0]}/single.db")
    rows = {(r["method"], r["setting"], r["metric"]): r for r in summary["seed_summary"]}
    for method, setting in {(r["method"], r["setting"]) for r in summary["selection"]}:
        parent = client.get_run(first["parent_run_id"])
        runs = [r for r in client.search_runs([parent.info.experiment_id],
                                              filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
                if r.data.tags["compare.method"] == method and r.data.tags["compare.setting"] == setting]
        assert len(runs) == 2
        for metric in ("test/dsc", "test/ece", "test/cece", "test/lts/ece"):
            values = [r.data.metrics[metric] for r in runs]
            assert rows[(method, setting, metric)]["mean"] == pytest.approx(np.mean(values), abs=1e-12)
            assert rows[(method, setting, metric)]["std"] == pytest.approx(np.std(values, ddof=1), abs=1e-12)
        table = report_text(first)
        label = {"ls": "LS", "mbls": "MbLS"}[method]
        ece = [r.data.metrics["test/ece"] for r in runs]
        assert re.search(rf"\| {label} \| 2 \| .*{np.mean(ece):.3f} ± {np.std(ece, ddof=1):.3f}", table)


def test_two_shards_and_a_killed_shard_give_the_same_report(setup, single, monkeypatch):
    first, _ = single
    one = compare(setup, "sharded", monkeypatch, shard_spec="1/2")
    assert len(one["trained"]) == 4
    client = mlflow.MlflowClient()
    assert client.get_run(one["parent_run_id"]).info.status == "RUNNING"  # the other shard's runs are missing

    calls = {"n": 0}
    real = runner.run_training

    def dies_on_second_run(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # the job is killed in the middle of its second training
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "run_training", dies_on_second_run)
    with pytest.raises(KeyboardInterrupt):
        compare(setup, "sharded", monkeypatch, shard_spec="2/2")
    monkeypatch.setattr(runner, "run_training", real)
    exp = client.get_experiment_by_name(runner.EXPERIMENT)
    statuses = sorted(r.info.status for rs in child_runs(client, exp.experiment_id, one["parent_run_id"]).values()
                      for r in rs)
    assert statuses == ["FINISHED"] * 5  # the killed training had not started its MLflow run yet

    # a child left RUNNING by a dead process (another host) is marked KILLED and trained again
    spec = [s for s in one["specs"] if s.key not in one["trained"]][-1]
    stale = client.create_run(exp.experiment_id, tags={"mlflow.parentRunId": one["parent_run_id"], **spec.tags(),
                                                       "compare.host": "elsewhere", "compare.pid": "1"})
    two = compare(setup, "sharded", monkeypatch, shard_spec="2/2")
    assert len(two["trained"]) == 3 and len(two["skipped"]) == 1
    assert client.get_run(stale.info.run_id).info.status == "KILLED"
    assert report_text(two) == report_text(first)
    only = compare(setup, "sharded", monkeypatch, report_only=True)
    assert only["trained"] == [] and report_text(only) == report_text(first)


def test_the_parent_run_carries_the_verdict_and_the_selected_children_are_tagged(setup, single):
    first, _ = single
    folder = first["report"].parent
    summary = json.loads((folder / "summary.json").read_text())
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{setup[0]}/single.db")
    parent = client.get_run(first["parent_run_id"])
    note = parent.data.tags["mlflow.note.content"]
    assert note.startswith("**Verdict**") and "Checkpoint sensitivity: tested with the last epoch's weights" in note
    assert note in report_text(first) and "**Protocol.**" not in note
    for row in summary["statistics"]:
        name = f"verdict/{row['other']}/{row['metric']}"
        assert parent.data.tags[name] == row["verdict"]
        assert parent.data.metrics[f"{name}/diff"] == pytest.approx(row["diff"])
        assert parent.data.metrics[f"{name}/ci_low"] == pytest.approx(row["ci_low"])
    chosen = {(r["method"], r["setting"]) for r in summary["selection"]}
    children = [r for rs in child_runs(client, parent.info.experiment_id, parent.info.run_id).values() for r in rs]
    assert len(children) == 8
    for r in children:
        selected = (r.data.tags["compare.method"], r.data.tags["compare.setting"]) in chosen
        assert r.data.tags["compare.selected"] == ("true" if selected else "false")
        assert {"test_last/dsc", "test_last/ece", "test_last/cece"} <= set(r.data.metrics)  # checkpoint sensitivity
    assert len(summary["statistics_last"]) == 3


def test_another_comparison_reuses_finished_runs_of_the_same_key(setup, single, monkeypatch):
    tmp = setup[0]
    (tmp / "subset.yaml").write_text(f"extends: {tmp / 'grid.yaml'}\nname: subset\nmethods:\n"
                                     "  - {name: ls, label: LS, loss: ls, grid: {alpha: [0.1, 0.2]}}\n"
                                     "  - {name: mbls, label: MbLS, loss: mbls, grid: {margin: [10]}}\n")
    _, cfg, over = setup
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp}/single.db")
    out = runner.run_comparison("blobs", str(tmp / "subset.yaml"), config_dir=cfg, quiet=True, seeds=[0, 1],
                                overrides={**over, "output_dir": str(tmp / "single")},
                                reports_root=tmp / "reports-subset")
    assert out["trained"] == [] and len(out["skipped"]) == 6
    assert "6 runs expected by the grid, 6 present: 6 finished" in report_text(out)
