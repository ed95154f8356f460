"""A tiny train + evaluate run in-process on generated data, and what it leaves in MLflow and on disk."""

import json

import mlflow
import pytest

from pipeline.config import load_config
from pipeline.engines import NonFiniteLossError
from pipeline.params import protocol_params, resolved_params
from pipeline.runs import load_weights
from pipeline.tracking import runs_table_links
from pipeline.training import run_training
from tests.helpers import make_config_dir, tiny_unet_overrides, write_blob_volumes


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("blobs")
    return write_blob_volumes(tmp / "data"), make_config_dir(tmp)


def _parser(blobs, tmp_path, **extra):
    root, config_dir = blobs
    overrides = {"data_dir": str(root), "output_dir": str(tmp_path / "runs"), **tiny_unet_overrides(), **extra}
    return load_config("blobs", "mbls", "unet", overrides=overrides, config_dir=config_dir)


def test_train_evaluate_and_mlflow_record(blobs, tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = run_training(_parser(blobs, tmp_path), quiet=True)

    results = out["results"]
    assert results["n_volumes"] == 2
    for name in ("outer", "inner"):
        assert 0.0 <= results["per_class"][name]["dsc"] <= 1.0
    assert 0.0 <= results["mean"]["ece"] <= 1.0 and 0.0 <= results["mean"]["cece"] <= 1.0
    assert "outer" in out["table"] and "mean" in out["table"]

    run_dir = out["run_dir"]
    for f in ("config.yaml", "splits.json", "metrics.json", "per_volume.csv", "results.txt"):
        assert (run_dir / f).is_file(), f
    assert (run_dir / "reliability.png").stat().st_size > 5000
    assert json.loads((run_dir / "splits.json").read_text())["test"] == ["case04", "case05"]
    assert len((run_dir / "per_volume.csv").read_text().strip().splitlines()) == 3
    assert out["best_checkpoint"].is_file()

    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run(out["run_id"])
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["dataset"] == "blobs" and params["loss"] == "mbls" and params["backbone"] == "unet"
    assert params["loss.margin"] == "10" and params["loss.alpha"] == "0.1"
    assert params["mbls.margin"] == "10" and params["mbls.alpha"] == "0.1"  # the loss's own names, unambiguous
    assert not [k for k, v in params.items() if v.startswith(("@", "$"))]  # references resolved
    assert params["backbone.in_channels"] == "1"
    assert params["protocol.val_interval"] and params["protocol.optimizer"] == "Adam"
    assert "protocol.augment" in params
    assert params["epochs"] == "2" and params["seed"] == "0" and params["git_commit"]
    metrics = run.data.metrics
    for key in ("test/dsc", "test/asd", "test/ece", "test/cece", "test/nll", "test/brier", "test/dsc/outer",
                "test/sce/inner", "val/best_dsc"):
        assert key in metrics, key
    assert metrics["test/dsc"] == pytest.approx(results["mean"]["dsc"])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2]
    assert len(client.get_metric_history(run.info.run_id, "train/penalty")) == 2
    assert len(client.get_metric_history(run.info.run_id, "val/dsc")) == 2
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"reliability.png", "config.yaml", "splits.json", "metrics.json", "checkpoints"} <= artifacts


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_checkpoints(blobs, tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # 18 training slices / batch 4 = 5 iterations per epoch: NaN at iteration 7, after epoch 1's validation
    parser = _parser(blobs, tmp_path, loss={"_target_": "tests.helpers.NaNAfter", "n": 7})
    with pytest.raises(NonFiniteLossError, match=r"is nan at epoch 2, iteration 7"):
        run_training(parser, run_name="nan-run", quiet=True)
    best = list((tmp_path / "runs" / "nan-run" / "checkpoints").glob("best*.pt"))
    assert len(best) == 1
    net = _parser(blobs, tmp_path).get_parsed_content("network")
    load_weights(net, best[0])  # intact and loadable
    client = mlflow.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs(client.get_experiment_by_name("mbls").experiment_id)
    assert run.info.status == "FAILED"


def test_existing_run_folder_is_never_overwritten(blobs, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlruns.db")
    existing = tmp_path / "runs" / "taken"
    existing.mkdir(parents=True)
    (existing / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        run_training(_parser(blobs, tmp_path, epochs=1), run_name="taken", quiet=True)
    assert (existing / "keep.txt").read_text() == "x"


def test_run_params_resolve_references_and_name_the_protocol():
    parser = load_config("mni", "mbls", "unet")
    backbone = resolved_params(parser, "backbone")
    assert backbone["backbone.in_channels"] == 1 and backbone["backbone.out_channels"] == 4  # not "@in_channels"
    protocol = protocol_params(parser)
    assert protocol["protocol.augment"].startswith("RandFlipd,") and protocol["protocol.lr_step"] == 100
    assert protocol["protocol.val_interval"] == 5 and protocol["protocol.lr_scheduler"] == "StepLR"


def test_ui_links_open_each_experiment_on_its_runs_table(tmp_path):
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/links.db")
    exp = client.create_experiment("compare")
    links = runs_table_links(client, "127.0.0.1", 5001)
    assert f"experiment 'compare': http://127.0.0.1:5001/#/experiments/{exp}/runs?workflowType=machine_learning" \
        in links
