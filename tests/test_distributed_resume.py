"""Two gloo processes (CPU, torchrun) killed mid-epoch and started again with the same command end as an
uninterrupted two-process run, bit for bit: each rank's own random states (augmentation, shuffling, dropout) are
saved in ``last.pt`` and restored into that rank.

Two torchrun launches run together (the uninterrupted reference, and the run that is killed: SIGKILL to its whole
process group when both ranks have stalled in epoch 3), then the killed one is launched again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch

from pipeline.checkpoints import LAST
from tests.helpers import make_config_dir, state_dict_equal, tiny_unet_overrides, write_blob_volumes
from tests.resume_helpers import AT_ENV, MARKER_ENV

ROOT = Path(__file__).resolve().parent.parent
EPOCHS = 3
ITERATIONS = 3  # 18 training slices, 9 per process, batches of 3
OVERRIDES = {**tiny_unet_overrides(), "loss": {"_target_": "tests.resume_helpers.StallingCrossEntropy"},
             "epochs": EPOCHS, "batch_size": 3, "val_interval": 1, "lr": 0.01,
             "evaluation::noise::sigmas": [], "evaluation::posthoc": [], "evaluation::maps::volumes": 0,
             "evaluation::maps::slices": 0, "evaluation::logits": False, "evaluation::last_weights": False,
             "evaluation::monai_calibration_error": False}


def _launch(folder: Path, data: Path, config_dir: Path, extra_env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder}/mlruns.db", "OMP_NUM_THREADS": "1",
           **(extra_env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "distributed_worker.py"), str(folder), str(data), str(config_dir), "unet",
           json.dumps(OVERRIDES)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group: the test kills all of it at once


def _history(folder: Path) -> dict:
    uri = f"sqlite:///{folder}/mlruns.db"
    run_id = json.loads((folder / "runs" / "ddp" / "run.json").read_text())["run_id"]
    client = mlflow.MlflowClient(tracking_uri=uri)
    keys = [k for k in client.get_run(run_id).data.metrics if not k.startswith("time/")]
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}


def _weights(folder: Path) -> dict:
    checkpoints = folder / "runs" / "ddp" / "checkpoints"
    (best,) = checkpoints.glob("best*.pt")
    return {"last": torch.load(checkpoints / LAST, weights_only=True),
            "best": torch.load(best, weights_only=True), "best_name": best.name}


@pytest.mark.usefixtures("one_thread")
def test_two_processes_killed_mid_epoch_continue_to_the_uninterrupted_run(tmp_path):
    data, config_dir = write_blob_volumes(tmp_path / "data"), make_config_dir(tmp_path)
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    reference.mkdir()
    killed.mkdir()
    markers = killed / "stalled"
    procs = {"reference": _launch(reference, data, config_dir),
             "killed": _launch(killed, data, config_dir, {MARKER_ENV: str(markers),
                                                          AT_ENV: str(2 * ITERATIONS + 2)})}
    deadline = time.time() + 400
    ranks = [Path(f"{markers}.rank{r}") for r in (0, 1)]
    while not all(m.is_file() for m in ranks):  # both ranks stalled in epoch 3, after last.pt of epoch 2
        assert procs["killed"].poll() is None, procs["killed"].communicate()[0][-4000:]
        assert time.time() < deadline, "the run did not reach epoch 3"
        time.sleep(0.2)
    time.sleep(0.5)
    assert torch.load(killed / "runs" / "ddp" / "checkpoints" / LAST, weights_only=True)["epoch"] == 2
    for m in ranks:  # both training processes die at once, as on a node failure; torchrun then ends
        os.kill(int(m.read_text()), signal.SIGKILL)
    procs["killed"].communicate(timeout=120)
    assert procs["killed"].returncode != 0
    log, _ = procs["reference"].communicate(timeout=600)
    assert procs["reference"].returncode == 0, log[-4000:]

    again = _launch(killed, data, config_dir)  # the same command, without the stall
    log, _ = again.communicate(timeout=600)
    assert again.returncode == 0, log[-4000:]
    assert "resumed ddp from" in log and f"epochs 1-2 of {EPOCHS} were done, continuing with epoch 3" in log

    got, ref = _weights(killed), _weights(reference)
    assert got["last"]["epoch"] == EPOCHS and got["best_name"] == ref["best_name"]
    assert state_dict_equal(got["last"]["network"], ref["last"]["network"])
    assert state_dict_equal(got["best"], ref["best"])
    ranks = got["last"]["rng_ranks"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["generator"], ranks[1]["generator"])  # each rank's own
    history = _history(killed)
    assert history == _history(reference)  # one value per step, the uninterrupted run's (test metrics included)
    assert [s for s, _ in history["train/loss"]] == list(range(1, EPOCHS + 1))
