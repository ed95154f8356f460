"""A run killed at any instant continues with the same command, and the continued run is the uninterrupted run, bit
for bit: its weights (last and best), its test metrics and its MLflow history (one value per step, the same values).

Real training processes are killed (SIGKILL, or SIGTERM where noted) at each instant that once lost or changed a
run, on blob data whose 18 training slices are a multiple of the batch size (3) and on the same data with batch 4:

* before the first checkpoint (the run restarts from epoch 1 and logs no epoch twice);
* after a better validation wrote a new best-weights file, before the next ``last.pt`` (which still names the old
  file: MONAI's saver deleted it, and every resume failed);
* in the middle of the write of a best-weights file, and of ``last.pt`` (temporary files are tidied away);
* during the test evaluation, after the last epoch (SIGTERM: the run is KILLED, and continues with the evaluation).
"""

import json
import os
import signal
import subprocess
import time

import mlflow
import pytest
import torch

from pipeline.checkpoints import LAST
from pipeline.config import REPO_ROOT, load_config
from pipeline.training import run_training
from tests.helpers import make_config_dir, state_dict_equal, tiny_unet_overrides, write_blob_volumes
from tests.resume_helpers import AT_ENV, MARKER_ENV, STALL_ENV, train_command
from tests.tracking_helpers import ready_store

EPOCHS = 4
LOSS = {"_target_": "tests.resume_helpers.StallingCrossEntropy"}
CHEAP_EVALUATION = {"evaluation::noise::sigmas": [], "evaluation::posthoc": ["ts"], "evaluation::ts::max_iter": 5,
                    "evaluation::maps::volumes": 0, "evaluation::maps::slices": 0, "evaluation::logits": False,
                    "evaluation::monai_calibration_error": False, "evaluation::last_weights": False}
ITERATIONS = {3: 6, 4: 5}  # 18 training slices: 6 full batches of 3, or 4 of 4 and one of 2
#: name: (batch size, checkpoint_interval, where it stalls, signal)
KILLS = {
    "before-first-checkpoint": (3, 3, {AT_ENV: str(ITERATIONS[3] + 2)}, signal.SIGKILL),
    "after-improvement": (3, 2, {AT_ENV: str(3 * ITERATIONS[3] + 2)}, signal.SIGKILL),
    "writing-best": (3, 1, {STALL_ENV: "write-best:2"}, signal.SIGKILL),
    "writing-last": (4, 1, {STALL_ENV: "write-last:2"}, signal.SIGKILL),
    "evaluation": (4, 1, {STALL_ENV: "evaluation"}, signal.SIGTERM),
}

# the processes these tests compare with run with one thread: so does the reference computed here
pytestmark = pytest.mark.usefixtures("one_thread")


def _overrides(batch_size: int) -> dict:
    return {**tiny_unet_overrides(), "loss": LOSS, "batch_size": batch_size, "val_interval": 1, "lr": 0.01,
            **CHEAP_EVALUATION}


def _parser(tmp, config_dir, batch_size: int, **extra):
    overrides = {"data_dir": str(tmp / "data"), "output_dir": str(tmp / "runs"), "epochs": EPOCHS,
                 **_overrides(batch_size), **extra}
    return load_config("blobs", "ce", "unet", overrides=overrides, config_dir=config_dir)


def _history(uri: str, run_id: str) -> dict:
    """Every metric of the run (timings left out) as ``[(step, value), …]`` in step order."""
    client = mlflow.MlflowClient(tracking_uri=uri)
    keys = [k for k in client.get_run(run_id).data.metrics if not k.startswith("time/")]
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}


def _files(run_dir) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def _weights(run_dir) -> dict:
    folder = run_dir / "checkpoints"
    (best,) = folder.glob("best*.pt")
    return {"last": torch.load(folder / LAST, weights_only=True)["network"],
            "best": torch.load(best, weights_only=True), "best_name": best.name}


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """The killed runs (``{name: {"dir", "uri", "seen" (what the folder held when it was killed), "stderr"}}``) and
    the uninterrupted references (``{batch size: {"out", "uri", "history"}}``)."""
    tmp = tmp_path_factory.mktemp("instants")
    write_blob_volumes(tmp / "data")
    config_dir = make_config_dir(tmp)
    procs, runs = {}, {}
    for name, (batch, interval, stall, _) in KILLS.items():
        uri = f"sqlite:///{tmp}/{name}.db"
        overrides = {**_overrides(batch), "checkpoint_interval": interval}
        cmd = train_command(config_dir, tmp / "data", tmp / "runs", name, EPOCHS,
                            {k: json.dumps(v) for k, v in overrides.items()}, worker=True)
        env = {**os.environ, "MBLS_CONFIG_DIR": str(config_dir), "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1",
               MARKER_ENV: str(tmp / f"{name}.stalled"), **stall}
        procs[name] = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True)
        runs[name] = {"dir": tmp / "runs" / name, "uri": uri}

    references = {}
    threads = torch.get_num_threads()
    for batch in ITERATIONS:  # in this process, meanwhile, each in its own store
        uri = ready_store(tmp / f"reference{batch}")
        os.environ["MLFLOW_TRACKING_URI"] = uri
        torch.set_num_threads(1)  # as the killed processes (OMP_NUM_THREADS=1): a module fixture runs before
        try:                      # the tests' one_thread fixture, so it sets the count itself
            out = run_training(_parser(tmp, config_dir, batch), run_name=f"reference{batch}", quiet=True)
        finally:
            del os.environ["MLFLOW_TRACKING_URI"]
            torch.set_num_threads(threads)
        references[batch] = {"out": out, "uri": uri, "history": _history(uri, out["run_id"])}

    deadline = time.time() + 400
    for name, proc in procs.items():
        while not (tmp / f"{name}.stalled").is_file():
            assert proc.poll() is None, f"{name} ended early: {proc.communicate()[1][-3000:]}"
            assert time.time() < deadline, f"{name} did not reach its instant"
            time.sleep(0.2)
        time.sleep(0.2)  # the marker is written just before the stall
        runs[name]["seen"] = {"files": _files(runs[name]["dir"]) if (runs[name]["dir"] / "checkpoints").is_dir()
                              else [], "last": (torch.load(runs[name]["dir"] / "checkpoints" / LAST,
                                                           weights_only=True)
                                                if (runs[name]["dir"] / "checkpoints" / LAST).is_file() else None)}
        proc.send_signal(KILLS[name][3])
    for name, proc in procs.items():
        runs[name]["stderr"] = proc.communicate(timeout=120)[1]
        runs[name]["returncode"] = proc.returncode
    return {"tmp": tmp, "config_dir": config_dir, "runs": runs, "references": references}


def test_what_each_kill_left_behind(killed):
    runs = killed["runs"]
    assert runs["before-first-checkpoint"]["seen"]["last"] is None
    seen = runs["after-improvement"]["seen"]
    best = [f for f in seen["files"] if f.startswith("best_")]
    assert seen["last"]["epoch"] == 2 and len(best) == 2, seen["files"]  # epoch 3 improved on epochs 1-2
    assert seen["last"]["best"]["saver"]["_saved"][0][1] in best
    seen = runs["writing-best"]["seen"]
    assert [f for f in seen["files"] if f.startswith(".tmp-") and "best_" in f], seen["files"]
    assert len([f for f in seen["files"] if f.startswith("best_")]) == 1  # the previous best, whole
    seen = runs["writing-last"]["seen"]
    assert [f for f in seen["files"] if f.startswith(".tmp-") and f.endswith("-last.pt")]
    assert seen["last"]["epoch"] == 1
    assert runs["evaluation"]["seen"]["last"]["epoch"] == EPOCHS
    for name, (*_, sig) in KILLS.items():
        if sig == signal.SIGKILL:
            assert runs[name]["returncode"] == -signal.SIGKILL
    assert runs["evaluation"]["returncode"] == 143
    assert "Continue it with the same command, or `make train RESUME=evaluation`" in runs["evaluation"]["stderr"]


@pytest.mark.parametrize("name", list(KILLS))
def test_the_same_command_continues_to_the_uninterrupted_run(killed, name, monkeypatch, capsys):
    run = killed["runs"][name]
    batch = KILLS[name][0]
    reference = killed["references"][batch]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", run["uri"])
    parser = _parser(killed["tmp"], killed["config_dir"], batch, checkpoint_interval=KILLS[name][1])
    out = run_training(parser, run_name=name, quiet=True)
    said = capsys.readouterr().err
    if name == "before-first-checkpoint":
        assert f"restarting {name} from epoch 1: it stopped before its first checkpoint" in said
    elif name == "evaluation":
        assert f"epochs 1-{EPOCHS} of {EPOCHS} were done, continuing with the evaluation" in said
    else:
        done = run["seen"]["last"]["epoch"]
        assert f"epochs 1-{done} of {EPOCHS} were done, continuing with epoch {done + 1}" in said

    assert out["run_dir"] == run["dir"]
    assert [f for f in _files(run["dir"]) if f != LAST] == [_weights(reference["out"]["run_dir"])["best_name"]]
    got, ref = _weights(run["dir"]), _weights(reference["out"]["run_dir"])
    assert state_dict_equal(got["last"], ref["last"]) and state_dict_equal(got["best"], ref["best"])
    assert out["table"] == reference["out"]["table"] and out["posthoc_table"] == reference["out"]["posthoc_table"]
    history = _history(run["uri"], out["run_id"])
    assert history == reference["history"]  # each step once, with the uninterrupted run's value
    assert [s for s, _ in history["train/loss"]] == list(range(1, EPOCHS + 1))
    assert mlflow.MlflowClient(tracking_uri=run["uri"]).get_run(out["run_id"]).info.status == "FINISHED"
