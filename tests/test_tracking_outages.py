"""Tracking store outages: a store that cannot take a run fails fast before any data work; a store locked during
training does not stop it (the metrics wait in the run folder for `make sync-mlflow`); two first runs on a fresh
SQLite store both finish."""

import json
import multiprocessing
import socket
import sqlite3
import time

import mlflow
import pytest
from ignite.engine import Events

import pipeline.training as training
from pipeline import cli
from pipeline.journal import JOURNAL, SYNCED, read_entries
from pipeline.tracking_store import HTTP_DEFAULTS, TrackingStoreError, check_store
from tests.helpers import make_config_dir, tiny_unet_overrides, write_blob_volumes
from tests.tracking_helpers import first_run, ready_store


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("outages")
    return write_blob_volumes(tmp / "data"), make_config_dir(tmp)


def _train_args(blobs, runs, name: str) -> list[str]:
    root, _ = blobs
    sets = {"data_dir": root, "output_dir": runs, **{k: json.dumps(v) for k, v in tiny_unet_overrides().items()},
            "evaluation::noise::sigmas": "[]", "evaluation::lts::iterations": 5}
    return ["train", "--dataset", "blobs", "--loss", "ce", "--epochs", "2", "--run-name", name, "--quiet",
            *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]


def _no_data_work(*_args, **_kwargs):
    raise AssertionError("the data were read before the tracking store was checked")


def test_an_unreachable_server_fails_fast_before_any_data_work(blobs, tmp_path, monkeypatch, capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for k, v in HTTP_DEFAULTS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr("pipeline.config.CONFIG_DIR", blobs[1])
    monkeypatch.setattr(training, "prepare_data", _no_data_work)
    t0 = time.monotonic()
    assert cli.main(_train_args(blobs, tmp_path / "runs", "unreachable")) == 2
    assert time.monotonic() - t0 < 15
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err  # one line
    assert err.startswith(f"error: the MLflow tracking server {uri} is unreachable (") and "refused" in err
    assert "start it" in err and "MLFLOW_TRACKING_URI" in err
    assert not (tmp_path / "runs").exists()


def test_a_locked_read_only_or_foreign_sqlite_store_is_named(tmp_path):
    db = tmp_path / "mlruns.db"
    ready_store(tmp_path)
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    t0 = time.monotonic()
    with pytest.raises(TrackingStoreError, match=f"the MLflow store {db} is locked by another process"):
        check_store(f"sqlite:///{db}", wait_s=0.5)
    assert time.monotonic() - t0 < 5
    holder.rollback()
    check_store(f"sqlite:///{db}", wait_s=0.5)  # free again
    holder.close()
    foreign = tmp_path / "notes.db"
    foreign.write_text("not a database " * 100)
    with pytest.raises(TrackingStoreError, match=f"{foreign} is not an MLflow SQLite store"):
        check_store(f"sqlite:///{foreign}")
    with pytest.raises(TrackingStoreError, match="cannot create the MLflow store .* is not a folder"):
        check_store(f"sqlite:///{foreign}/sub/mlruns.db")


def test_a_store_locked_during_training_keeps_the_metrics_for_sync(blobs, tmp_path, monkeypatch, capsys):
    db = tmp_path / "mlruns.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", ready_store(tmp_path))
    monkeypatch.setattr("pipeline.config.CONFIG_DIR", blobs[1])
    holder = []
    create_trainer = training.create_trainer

    def take_the_store(_engine):
        holder.append(sqlite3.connect(db, isolation_level=None))
        holder[0].execute("BEGIN EXCLUSIVE")

    def locked_from_the_start(*args, **kwargs):  # another program takes the store once training has begun
        trainer = create_trainer(*args, **kwargs)
        trainer.add_event_handler(Events.STARTED, take_the_store)
        return trainer

    monkeypatch.setattr(training, "create_trainer", locked_from_the_start)
    assert cli.main(_train_args(blobs, tmp_path / "runs", "locked")) == 0  # training and evaluation finished
    holder[0].rollback()
    holder[0].close()
    run_dir = tmp_path / "runs" / "locked"
    assert (run_dir / "metrics.json").is_file() and "MLflow run" in capsys.readouterr().out
    pending = read_entries(run_dir / JOURNAL)
    logged = {(k, s) for e in pending if e["op"] == "metrics" for k, _, _, s in e["metrics"]}
    assert {("train/loss", 1), ("train/loss", 2), ("val/dsc", 1), ("val/dsc", 2), ("test/dsc", 0)} <= logged
    assert pending[-1]["op"] == "status" and pending[-1]["status"] == "FINISHED"
    run_id = pending[0]["run_id"]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    assert "train/loss" not in client.get_run(run_id).data.metrics

    assert cli.main(["sync-mlflow", str(run_dir)]) == 0
    assert f"synced {len(pending)} pending write(s)" in capsys.readouterr().out
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1, 2]
    assert [m.step for m in client.get_metric_history(run_id, "val/dsc")] == [1, 2]
    assert "test/dsc" in run.data.metrics and "val/best_dsc" in run.data.metrics
    assert "metrics.json" in {a.path for a in client.list_artifacts(run_id)}
    assert not (run_dir / JOURNAL).exists() and len(read_entries(run_dir / SYNCED)) == len(pending)
    assert cli.main(["sync-mlflow", str(run_dir)]) == 0 and "nothing to sync" in capsys.readouterr().out


def test_two_first_runs_on_a_fresh_sqlite_store_both_finish(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=first_run, args=(uri, f"run{i}", barrier)) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    assert [p.exitcode for p in procs] == [0, 0]
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("first-runs").experiment_id])
    assert sorted((r.info.run_name, r.info.status) for r in runs) == [("run0", "FINISHED"), ("run1", "FINISHED")]
