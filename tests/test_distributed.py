"""Two gloo processes (CPU) train on the generated blob data under torchrun, and what they leave is checked against a
one-process evaluation of the saved weights.

Two runs, started together (each ``torchrun`` process imports MONAI once):

* ``unet``, 2 epochs, the blob split (3 training volumes, 1 validation volume: process 1 validates none, 2 test
  volumes), TS fitted after training;
* ``unetpp`` (parameters without gradients: DDP needs the backbone's ``find_unused_parameters``), 1 epoch, a split
  file with 2 training, 3 validation (process 0 scores 2, process 1 one) and 1 test volume.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch

from pipeline.config import load_config
from pipeline.data.loading import volume_loader
from pipeline.data.prepare import prepare_data
from pipeline.engines import create_evaluator
from pipeline.evaluation import evaluate_trained
from pipeline.runs import load_weights
from tests.helpers import make_config_dir, tiny_unet_overrides, write_blob_volumes

ROOT = Path(__file__).resolve().parent.parent
QUICK_EVALUATION = {"evaluation::noise::sigmas": [], "evaluation::maps::volumes": 0, "evaluation::maps::slices": 0}
RUNS = {
    "unet": {**tiny_unet_overrides(), **QUICK_EVALUATION, "epochs": 2, "evaluation::posthoc": ["ts"]},
    "unetpp": {"backbone::features": [4, 4, 8, 8, 8, 4], **QUICK_EVALUATION, "epochs": 1, "evaluation::posthoc": []},
}
SPLIT = {"train": ["case00", "case01"], "val": ["case02", "case03", "case04"], "test": ["case05"]}


# the processes these tests compare with run with one thread: so does the reference computed here
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both torchrun runs: ``{backbone: {"dir", "uri", "overrides", "config_dir", "data", "ranks": [records]}}``."""
    tmp = tmp_path_factory.mktemp("ddp")
    data, config_dir = write_blob_volumes(tmp / "data"), make_config_dir(tmp)
    (tmp / "split.json").write_text(json.dumps(SPLIT))
    RUNS["unetpp"]["split_file"] = str(tmp / "split.json")
    out, procs = {}, {}
    for backbone, overrides in RUNS.items():
        folder = tmp / backbone
        folder.mkdir()
        uri = f"sqlite:///{folder}/mlruns.db"
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "tests" / "distributed_worker.py"), str(folder), str(data), str(config_dir), backbone,
               json.dumps(overrides)]
        procs[backbone] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                           text=True)
        out[backbone] = {"dir": folder, "uri": uri, "overrides": overrides, "config_dir": config_dir, "data": data}
    for backbone, proc in procs.items():
        log, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"torchrun {backbone} failed:\n{log[-5000:]}"
        out[backbone]["ranks"] = [json.loads((out[backbone]["dir"] / f"rank{r}.json").read_text()) for r in (0, 1)]
    return out


def _parser(run: dict, backbone: str):
    overrides = {"data_dir": str(run["data"]), "output_dir": str(run["dir"] / "single"), **run["overrides"]}
    return load_config("blobs", "ce", backbone, overrides=overrides, config_dir=run["config_dir"])


def _validate_alone(run: dict, backbone: str):
    """A one-process validation of the weights the run saved last (``last.pt``, the weights of its last
    validation): the evaluator and its data as a plain run builds them."""
    parser = _parser(run, backbone)
    data = prepare_data(parser)
    network = parser.get_parsed_content("network")
    load_weights(network, run["dir"] / "runs" / "ddp" / "checkpoints" / "last.pt")
    evaluator = create_evaluator(network, volume_loader(data.volumes["val"]), torch.device("cpu"),
                                 len(data.class_names), data.slice_axis, prefix="val/",
                                 n_bins=int(parser.get_parsed_content("n_bins")))
    evaluator.run()
    return evaluator, data


@pytest.mark.parametrize("backbone", list(RUNS))
def test_one_run_folder_and_one_mlflow_run_written_by_rank_0(runs, backbone):
    run = runs[backbone]
    assert [p.name for p in (run["dir"] / "runs").iterdir()] == ["ddp"]
    rank0, rank1 = run["ranks"]
    assert rank0["primary"] and not rank1["primary"] and rank1["run_id"] is None
    client = mlflow.MlflowClient(tracking_uri=run["uri"])
    found = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.run_id for r in found] == [rank0["run_id"]]
    assert found[0].info.status == "FINISHED"
    params = found[0].data.params
    assert params["world_size"] == "2" and params["ddp_backend"] == "gloo"
    n_train = len(run["overrides"].get("split_file") and SPLIT["train"] or ["case00", "case01", "case02"])
    assert params["n_train_slices"] == str(6 * n_train)  # 6 slices along z per blob volume
    assert "test/dsc" in found[0].data.metrics
    # one process trained: the per-epoch loss is logged once per epoch
    epochs = run["overrides"]["epochs"]
    assert [m.step for m in client.get_metric_history(rank0["run_id"], "train/loss")] == list(range(1, epochs + 1))


@pytest.mark.parametrize("backbone", list(RUNS))
def test_ranks_train_on_disjoint_slices_in_equal_numbers_shuffled_per_epoch(runs, backbone):
    ranks = runs[backbone]["ranks"]
    seen = [{(vid, s) for _, vid, s in r["seen"]} for r in ranks]
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    volumes = [{vid for vid, _ in s} for s in seen]
    train = SPLIT["train"] if backbone == "unetpp" else ["case00", "case01", "case02"]
    assert volumes == [set(train[0::2]), set(train[1::2])]  # each process its own volumes
    epochs = runs[backbone]["overrides"]["epochs"]
    per_epoch = [[sum(1 for e, _, _ in r["seen"] if e == epoch) for epoch in range(1, epochs + 1)] for r in ranks]
    total = 6 * len(train)
    assert per_epoch[0] == per_epoch[1] == [-(-total // 2)] * epochs
    if epochs > 1:
        order = [[(vid, s) for e, vid, s in ranks[0]["seen"] if e == epoch] for epoch in (1, 2)]
        assert order[0] != order[1]


@pytest.mark.parametrize("backbone", list(RUNS))
def test_validation_equals_one_process_evaluation_of_the_saved_weights(runs, backbone):
    run = runs[backbone]
    last = [r["validations"][-1] for r in run["ranks"]]
    assert last[0] == last[1]  # every process ends a validation with the same gathered results
    evaluator, data = _validate_alone(run, backbone)
    expected_ids = SPLIT["val"] if backbone == "unetpp" else ["case03"]
    assert last[0]["ids"] == expected_ids == [c["id"] for c in data.cases["val"]]
    for key, value in evaluator.state.metrics.items():
        assert last[0]["metrics"][key] == pytest.approx(value, rel=1e-12, abs=1e-15), key
    alone = evaluator.state.metric_details
    assert last[0]["details"]["val/dsc"] == alone["val/dsc"].tolist()
    rows = alone["val/calibration"]["volumes"]
    assert [r["ece"] for r in last[0]["details"]["val/calibration"]["volumes"]] == [r["ece"] for r in rows]
    assert [r["sce_per_class"] for r in last[0]["details"]["val/calibration"]["volumes"]] == [
        r["sce_per_class"] for r in rows]
    client = mlflow.MlflowClient(tracking_uri=run["uri"])
    history = client.get_metric_history(run["ranks"][0]["run_id"], "val/dsc")
    assert history[-1].value == pytest.approx(evaluator.state.metrics["val/dsc"], rel=1e-12)


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("backbone", list(RUNS))
def test_test_metrics_equal_one_process_evaluation_of_the_best_weights(runs, backbone):
    run = runs[backbone]
    run_dir = run["dir"] / "runs" / "ddp"
    summary = json.loads((run_dir / "metrics.json").read_text())
    parser = _parser(run, backbone)
    data = prepare_data(parser)
    network = parser.get_parsed_content("network")
    load_weights(network, summary["checkpoint"])
    out = evaluate_trained(parser, network, data, run["dir"] / "single", quiet=True)
    assert summary["mean"] == pytest.approx(json.loads(json.dumps(out["results"]["mean"])), rel=1e-12)
    per_volume = _csv(run_dir / "per_volume.csv")
    assert [r["id"] for r in per_volume] == [c["id"] for c in data.cases["test"]]
    assert per_volume == _csv(run["dir"] / "single" / "per_volume.csv")
    assert (run_dir / "posthoc").is_dir() == bool(run["overrides"]["evaluation::posthoc"])
