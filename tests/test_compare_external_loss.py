"""A loss class defined outside the repository joins a comparison: a grid method names it by import path on the
PYTHONPATH (``loss: {_target_: …}``) with its parameters and a sweep; a tiny grid runs in-process with it.
Also: the shipped ``sota`` grid loads with the methods since the paper."""

from __future__ import annotations

import mlflow
import pytest

import pipeline.compare.runner as runner
from pipeline.compare.grid import expand, load_grid
from tests.helpers import make_config_dir, tiny_unet_overrides, write_blob_volumes

PACKAGE = '''
import torch
import torch.nn.functional as F


class WeightedCE(torch.nn.Module):
    """CE times a weight: a loss the pipeline does not know."""

    def __init__(self, weight: float = 1.0, smoothing: float = 0.0):
        super().__init__()
        self.weight, self.smoothing = weight, smoothing

    def forward(self, logits, labels):
        return self.weight * F.cross_entropy(logits, labels[:, 0].long(), label_smoothing=self.smoothing)
'''

GRID = """
name: external
backbones: [unet]
seeds: [0, 1]
reference: mine
baseline: ce
augmentation: none
profile: {epochs: 1, augment: [], val_interval: 1}
methods:
  - {name: ce, label: CE, loss: ce}
  - {name: mine, label: Mine, loss: {_target_: extlosses.losses.WeightedCE, smoothing: 0.05},
     grid: {weight: [0.5, 1.0]}}
"""


@pytest.fixture
def package(tmp_path, monkeypatch):
    (tmp_path / "pkg" / "extlosses").mkdir(parents=True)
    (tmp_path / "pkg" / "extlosses" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "extlosses" / "losses.py").write_text(PACKAGE)
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))
    (tmp_path / "grid.yaml").write_text(GRID)
    return tmp_path


def test_a_grid_runs_a_loss_class_named_by_import_path(package, monkeypatch):
    tmp = package
    cfg = make_config_dir(tmp)
    grid = load_grid(str(tmp / "grid.yaml"), cfg)
    specs = expand(grid)
    assert [(s.method, s.setting) for s in specs if s.seed == 0] == [("ce", ""), ("mine", "weight=0.5"),
                                                                      ("mine", "weight=1.0")]
    data = write_blob_volumes(tmp / "data")
    over = {"data_dir": str(data), **tiny_unet_overrides(), "evaluation::lts::iterations": 5,
            "evaluation::noise::sigmas": [0.0], "evaluation::maps::volumes": 0, "output_dir": str(tmp / "runs")}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp}/store.db")
    out = runner.run_comparison("blobs", str(tmp / "grid.yaml"), overrides=over, config_dir=cfg,
                                reports_root=tmp / "reports", quiet=True)
    assert len(out["trained"]) == 6 and not out["failed"]
    client = mlflow.MlflowClient()
    parent = client.get_run(out["parent_run_id"])
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    mine = [r for r in runs if r.data.tags["compare.method"] == "mine"]
    assert len(mine) == 4
    for r in mine:
        assert r.data.params["loss"] == "extlosses.losses.WeightedCE"
        assert r.data.params["loss.smoothing"] == "0.05"
        assert r.data.params["loss.weight"] == r.data.tags["compare.setting"].split("=")[1]
        assert r.data.metrics["test/dsc"] >= 0
    # the two weights are two trainings (different keys), the CE baseline a third
    assert len({r.data.tags["compare.key"] for r in runs}) == 6
    assert "Mine" in out["report"].read_text()


def test_bad_external_losses_are_refused_by_name(package):
    tmp = package
    cfg = make_config_dir(tmp)
    target = "extlosses.losses.WeightedCE"
    for old, new, match in [
        (target, "extlosses.losses.Missing", r"cannot import the loss class 'extlosses.losses.Missing' "
                                             r"\(AttributeError"),
        (target, "nopackage.losses.X", r"cannot import .*ModuleNotFoundError.*PYTHONPATH"),
        (target, "torch.nn.functional.cross_entropy", "is not a torch.nn.Module class"),
        ("_target_: " + target + ", ", "", "needs '_target_: package.module.Class'"),
        ("weight: [0.5", "wieght: [0.5", "method 'mine' has no parameter 'wieght'"),
    ]:
        bad = tmp / "bad.yaml"
        bad.write_text(GRID.replace(old, new))
        with pytest.raises(ValueError, match=match):
            load_grid(str(bad), cfg)


def test_the_sota_grid_loads():
    grid = load_grid("sota")
    assert grid["reference"] == "mbls" and grid["baseline"] == "ce" and grid["profile"]["epochs"] == 100
    names = [m["name"] for m in grid["methods"]]
    assert names == ["ce", "ce_dice", "mbls", "nacl", "crac", "ace_hard", "ace_soft", "acls"]
    assert len(expand(grid, seeds=[0])) == 1 + 1 + 3 + 3 + 3 + 1 + 1 + 1
