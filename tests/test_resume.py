"""A killed training continues where it stopped: real training processes killed mid-epoch (SIGKILL, SIGTERM) and
started again end in the same run folder and MLflow run with the weights of an uninterrupted run, bit for bit."""

import json
import os
import re
import signal
import subprocess
import time

import mlflow
import pytest
import torch
import yaml
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser

import pipeline.training as training
from pipeline import cli
from pipeline.checkpoints import (
    LAST,
    TrainingCheckpoint,
    TrainingTerminated,
    random_transforms,
    rng_states,
    set_rng_states,
)
from pipeline.config import REPO_ROOT, load_config
from pipeline.data.loading import train_loader
from pipeline.engines import NonFiniteLossError
from pipeline.locks import FileLock
from pipeline.resume import RunBusyError, config_differences, plan_run, write_record
from pipeline.tracking import RUN_LOCK, RunTracker
from pipeline.training import run_training
from tests.helpers import make_config_dir, state_dict_equal, tiny_unet_overrides, write_blob_volumes
from tests.resume_helpers import AT_ENV, MARKER_ENV, train_command
from tests.tracking_helpers import ready_store

EPOCHS = 3
ITERATIONS_PER_EPOCH = 5  # 18 training slices of the blob data, batch 4
LOSS = {"_target_": "tests.resume_helpers.StallingCrossEntropy"}
CHEAP_EVALUATION = {"evaluation::noise::sigmas": [0.0], "evaluation::lts::iterations": 5}


# the processes these tests compare with run with one thread: so does the reference computed here
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    return tmp, write_blob_volumes(tmp / "data"), make_config_dir(tmp)


def _overrides(blobs) -> dict:
    tmp, data, _ = blobs
    return {"data_dir": str(data), "output_dir": str(tmp / "runs"), **tiny_unet_overrides(), "loss": LOSS,
            "epochs": EPOCHS, **CHEAP_EVALUATION}


def _parser(blobs, **extra):
    return load_config("blobs", "ce", "unet", overrides={**_overrides(blobs), **extra}, config_dir=blobs[2])


def _weights(run_dir) -> dict:
    folder = run_dir / "checkpoints"
    (best,) = folder.glob("best*.pt")
    return {"last": torch.load(folder / LAST, weights_only=True), "best": torch.load(best, weights_only=True),
            "best_name": best.name}  # best: a bare state dict (pipeline.checkpoints.BestWeights)


def test_killed_runs_resume_to_the_weights_of_an_uninterrupted_run(blobs, monkeypatch, capsys):
    tmp, data, config_dir = blobs
    uri = f"sqlite:///{tmp}/mlruns.db"  # fresh: the two processes below are its first runs, at the same time
    env = {**os.environ, "MBLS_CONFIG_DIR": str(config_dir), "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1",
           AT_ENV: str(ITERATIONS_PER_EPOCH + 2)}  # stall at the 2nd iteration of epoch 2
    overrides = {k: v for k, v in _overrides(blobs).items() if k not in ("data_dir", "output_dir", "epochs")}
    procs = {}
    for name in ("sigkill", "sigterm"):
        cmd = train_command(config_dir, data, tmp / "runs", name, EPOCHS,
                            {k: json.dumps(v) for k, v in overrides.items()})
        procs[name] = subprocess.Popen(cmd, cwd=REPO_ROOT, env={**env, MARKER_ENV: str(tmp / f"{name}.stalled")},
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    # the uninterrupted reference, in this process (1 thread, as the killed processes), in its own store
    assert torch.get_num_threads() == 1
    monkeypatch.setenv("MLFLOW_TRACKING_URI", ready_store(tmp / "reference"))
    reference = run_training(_parser(blobs), run_name="reference", quiet=True)

    deadline = time.time() + 300
    for name, proc in procs.items():  # the test hook: the loss has stalled mid-epoch 2, after last.pt of epoch 1
        while not (tmp / f"{name}.stalled").is_file():
            assert proc.poll() is None, f"{name} ended early: {proc.communicate()[1][-3000:]}"
            assert time.time() < deadline, f"{name} did not reach epoch 2"
            time.sleep(0.2)
        assert torch.load(tmp / "runs" / name / "checkpoints" / LAST, weights_only=True)["epoch"] == 1
    procs["sigkill"].send_signal(signal.SIGKILL)
    procs["sigterm"].send_signal(signal.SIGTERM)
    outputs = {name: proc.communicate(timeout=120) for name, proc in procs.items()}
    assert procs["sigkill"].returncode == -signal.SIGKILL
    assert procs["sigterm"].returncode == 143, outputs["sigterm"][1][-3000:]
    assert "stopped by SIGTERM" in outputs["sigterm"][1] and "marked KILLED" in outputs["sigterm"][1]

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    run_ids = {name: json.loads((tmp / "runs" / name / "run.json").read_text())["run_id"] for name in procs}
    assert client.get_run(run_ids["sigterm"]).info.status == "KILLED"
    assert client.get_run(run_ids["sigkill"]).info.status == "RUNNING"  # nobody could mark it
    RunTracker.resume(run_ids["sigkill"], uri)  # touching it (as `make evaluate` does) finds its process gone
    assert client.get_run(run_ids["sigkill"]).info.status == "KILLED"

    ref = _weights(reference["run_dir"])
    for name in procs:
        if name == "sigkill":  # the same config and run name: resumed
            out = run_training(_parser(blobs), run_name=name, quiet=True)
            assert out["table"] == reference["table"] and out["posthoc_table"] == reference["posthoc_table"]
        else:  # make train RESUME=<run name>: the run's own config
            assert cli.main(["train", "--resume", name, "--quiet"]) == 0
            printed = capsys.readouterr().out
            assert reference["table"] in printed and reference["posthoc_table"] in printed
            out = {"run_dir": tmp / "runs" / name, "run_id": run_ids[name]}
            assert f"run folder : {out['run_dir']}" in printed and f"MLflow run : {run_ids[name]}" in printed
        assert out["run_dir"] == tmp / "runs" / name and out["run_id"] == run_ids[name]
        run = client.get_run(run_ids[name])
        assert run.info.status == "FINISHED" and "resumed" in run.data.tags
        assert run.data.tags["process.pid"] == str(os.getpid())
        assert len(client.search_runs([run.info.experiment_id], f"attributes.run_name = '{name}'")) == 1
        assert [m.step for m in client.get_metric_history(run_ids[name], "train/loss")] == [1, 2, 3]
        got = _weights(out["run_dir"])
        assert got["last"]["epoch"] == EPOCHS and got["best_name"] == ref["best_name"]
        assert state_dict_equal(got["last"]["network"], ref["last"]["network"]), name
        assert state_dict_equal(got["best"], ref["best"]), name
    with pytest.raises(FileExistsError, match="finished already"):
        run_training(_parser(blobs), run_name="sigterm", quiet=True)


def test_a_run_stopped_in_its_evaluation_resumes_without_training_again(blobs, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", ready_store(tmp_path))
    parser = _parser(blobs, output_dir=str(tmp_path / "runs"), epochs=2)
    evaluate_trained = training.evaluate_trained

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt("stopped during the evaluation")

    monkeypatch.setattr(training, "evaluate_trained", stopped)
    with pytest.raises(KeyboardInterrupt):
        run_training(parser, run_name="late", quiet=True)
    last = tmp_path / "runs" / "late" / "checkpoints" / LAST
    stamp = last.stat().st_mtime_ns
    monkeypatch.setattr(training, "evaluate_trained", evaluate_trained)
    out = run_training(_parser(blobs, output_dir=str(tmp_path / "runs"), epochs=2), run_name="late", quiet=True)
    assert last.stat().st_mtime_ns == stamp  # nothing trained again
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlruns.db")
    assert [m.step for m in client.get_metric_history(out["run_id"], "train/loss")] == [1, 2]
    assert client.get_run(out["run_id"]).info.status == "FINISHED" and out["results"]["n_volumes"] == 2


def test_a_checkpoint_holds_every_random_state_and_restores_it(blobs):
    parser = _parser(blobs)
    transforms = parser.get_parsed_content("augment")
    found = random_transforms(transforms)
    assert {"0", "1", "1.rand_affine", "1.rand_affine.rand_affine_grid", "2", "3"} <= set(found)
    generator = torch.Generator().manual_seed(3)
    saved = rng_states(generator, transforms)
    draws = [torch.rand(2), torch.randint(9, (3,), generator=generator), [t.R.rand() for t in found.values()]]
    set_rng_states(saved, generator, transforms)
    again = [torch.rand(2), torch.randint(9, (3,), generator=generator), [t.R.rand() for t in found.values()]]
    assert torch.equal(draws[0], again[0]) and torch.equal(draws[1], again[1]) and draws[2] == again[2]
    with pytest.raises(ValueError, match="augmentation transforms"):
        set_rng_states(saved, generator, transforms[:2])


def test_a_nan_weight_never_overwrites_the_last_checkpoint(tmp_path):
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(net.parameters())
    ckpt = TrainingCheckpoint(tmp_path / LAST, net, opt)
    trainer = type("T", (), {})()
    trainer.state = type("S", (), {"epoch": 1, "iteration": 5, "max_epochs": 3, "epoch_length": 5})()
    ckpt.save(trainer)
    good = torch.load(tmp_path / LAST, weights_only=True)
    with torch.no_grad():
        net.weight[0, 0] = float("nan")
    trainer.state.epoch = 2
    with pytest.raises(NonFiniteLossError, match="after epoch 2 .*weight.*last good checkpoint"):
        ckpt.save(trainer)
    kept = torch.load(tmp_path / LAST, weights_only=True)
    assert kept["epoch"] == 1 and state_dict_equal(kept["network"], good["network"])
    assert [p.name for p in tmp_path.iterdir()] == [LAST]  # no temporary file left


def _run_folder(blobs, name: str, **extra):
    run_dir = blobs[0] / "plans" / name
    run_dir.mkdir(parents=True)
    ConfigParser.export_config_file(_parser(blobs, **extra).get(), str(run_dir / "config.yaml"), fmt="yaml",
                                    sort_keys=False)
    return run_dir


def test_resuming_with_another_config_names_the_keys_that_differ(blobs):
    run_dir = _run_folder(blobs, "other-config")
    uri = "sqlite:///unused.db"
    parser = _parser(blobs, lr=0.002, **{"loss::_target_": LOSS["_target_"], "cache": "disk"})
    with pytest.raises(ValueError, match=r"differs .* in 1 key\(s\): lr: 0\.001 → 0\.002\. Repeat"):
        plan_run(parser.get(), run_dir, uri)
    start = plan_run(_parser(blobs, cache="disk").get(), run_dir, uri)  # cache: a machine key, allowed to differ
    assert start.resume and start.checkpoint is None and start.lock.held
    with pytest.raises(RunBusyError, match="being trained by another live process"):
        plan_run(_parser(blobs).get(), run_dir, uri)
    start.release()
    write_record(run_dir, run_id="abc", tracking_uri="sqlite:///elsewhere.db")
    with pytest.raises(ValueError, match="tracked in sqlite:///elsewhere.db"):
        plan_run(_parser(blobs).get(), run_dir, uri)
    write_record(run_dir, finished="today")
    with pytest.raises(FileExistsError, match="finished already"):
        plan_run(_parser(blobs).get(), run_dir, uri)


def test_config_differences_reads_back_as_the_run_folder_does():
    saved = yaml.safe_load("lr: 0.001\nloss: {margin: 10, alpha: 0.1}\nlist: [1, 2]\ncache: memory\n")
    assert config_differences(saved, {"lr": 1e-3, "loss": {"margin": 10, "alpha": 0.1}, "list": [1, 2],
                                      "cache": "disk"}) == []
    assert config_differences(saved, {"lr": 1e-3, "loss": {"margin": 8}, "list": [1, 2]}) == [
        "loss::alpha: 0.1 → (absent)", "loss::margin: 10 → 8"]


def test_a_run_whose_process_is_gone_is_marked_killed_when_touched(tmp_path):
    uri = ready_store(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lock = FileLock(run_dir / RUN_LOCK).acquire()  # a live training holds its folder's lock
    tracker = RunTracker("e", "r", uri=uri)
    tracker.log_params({"run_dir": str(run_dir)})
    client = mlflow.MlflowClient(tracking_uri=uri)
    RunTracker.resume(tracker.run_id, uri)
    assert client.get_run(tracker.run_id).info.status == "RUNNING"  # its process lives: left alone
    lock.release()  # the process is gone
    RunTracker.resume(tracker.run_id, uri)
    assert client.get_run(tracker.run_id).info.status == "KILLED"
    other = RunTracker("e", "no-folder", uri=uri, tags={"process.pid": "999999999"})  # no lock file: by pid
    RunTracker.resume(other.run_id, uri)
    assert client.get_run(other.run_id).info.status == "KILLED"


@pytest.mark.parametrize("n_slices, batch_size", [(18, 4), (18, 3), (16, 4)])
def test_the_shuffle_state_saved_after_an_epoch_is_the_next_epochs(n_slices, batch_size):
    """The training loader's generator, saved at an epoch's end and restored into a new loader, gives the next
    epochs the batches of an uninterrupted run, whether or not the batch size divides the number of slices (PyTorch's
    RandomSampler made its last draw of an epoch lazily, at the next epoch's start when it divides)."""
    volumes = [{"image": torch.zeros(1, 2, 2, n_slices // 2), "label": torch.zeros(1, 2, 2, n_slices // 2),
                "id": name} for name in ("a", "b")]

    def batches(resume_after=None, saved=None):
        loader = train_loader(volumes, 2, None, batch_size)
        seen, states = [], {}
        engine = Engine(lambda e, b: seen.append((e.state.epoch, list(b["id"]), b["slice"].tolist())))
        engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: states.update({e.state.epoch:
                                                                                  loader.generator.get_state()}))
        if resume_after:
            loader.generator.set_state(saved)
            engine.load_state_dict({"epoch": resume_after, "max_epochs": 4, "epoch_length": len(loader)})
        engine.run(loader, max_epochs=4)
        return seen, states

    uninterrupted, states = batches()
    for epoch in (1, 2):
        resumed, _ = batches(epoch, states[epoch])
        assert resumed == [b for b in uninterrupted if b[0] > epoch], (epoch, n_slices, batch_size)


def test_a_stopped_run_without_a_name_is_named_in_the_line_to_continue_it(monkeypatch, capsys):
    def stopped(parser, run_name=None, quiet=False):
        raise TrainingTerminated("stopped by SIGTERM")

    monkeypatch.setattr(training, "run_training", stopped)
    assert cli.main(["train", "--epochs", "1", "--quiet"]) == 143
    err = capsys.readouterr().err
    assert "RESUME=None" not in err
    assert re.search(r"`make train RESUME=mni-mbls-unet-\d{8}-\d{6}-[0-9a-f]{4}`", err), err
