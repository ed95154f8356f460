"""The one-line cause of a failed multi-process job (:func:`pipeline.launch.failure_line`), the collective timeout's
config check, and tracking URIs' passwords: masked in what is printed (make's echo, error lines) and stored
(``run.json``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from datetime import timedelta

import pytest
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from pipeline import resume
from pipeline.config import REPO_ROOT
from pipeline.distributed import DistributedRun, collective_timeout
from pipeline.launch import ERRORS_ENV, failure_line, note_error, read_notes
from pipeline.resume import plan_run, read_record
from pipeline.tracking_store import TrackingStoreError, mask_uri

SECRET = "s3cret-Pw"


def _failure(rank: int, pid: int, exitcode: int, timestamp: int):
    failure = ProcessFailure(rank, pid, exitcode, "")  # no error file: the processes note their errors themselves
    failure.timestamp = timestamp
    return failure


def test_a_killed_process_is_the_cause_of_the_lost_connections_of_the_others():
    error = ChildFailedError("train", {0: _failure(0, 100, 1, 1000), 1: _failure(1, 101, -signal.SIGKILL, 1001)})
    line = failure_line(error, 2, {0: "RuntimeError: Connection closed by peer [127.0.0.1]:5"})
    assert line == "process 1 of 2 (pid 101) was killed by SIGKILL; the other 1 process(es) ended with it"


def test_a_timed_out_collective_is_the_cause_when_the_frozen_process_was_killed_later():
    error = ChildFailedError("train", {0: _failure(0, 100, 1, 1000),
                                       1: _failure(1, 101, -signal.SIGKILL, 1031)})  # the agent's SIGKILL, 30 s later
    line = failure_line(error, 2, {0: "RuntimeError: [gloo] Timed out waiting 6000ms for recv"})
    assert line.startswith("process 0 of 2 (pid 100) exited with code 1: RuntimeError: [gloo] Timed out")
    assert "distributed_timeout" in line


def test_a_process_stopped_by_the_agent_is_not_the_cause():
    error = ChildFailedError("train", {0: _failure(0, 100, -signal.SIGTERM, 1000), 1: _failure(1, 101, 3, 1000)})
    assert failure_line(error, 2, {1: "ValueError: bad"}).startswith(
        "process 1 of 2 (pid 101) exited with code 3: ValueError: bad")


def test_a_process_notes_the_last_line_of_its_error_whole_and_masked(tmp_path, monkeypatch):
    monkeypatch.setenv(ERRORS_ENV, str(tmp_path))
    monkeypatch.setenv("RANK", "1")
    note_error(f"Traceback …\n  File x\nRuntimeError: store http://u:{SECRET}@h:5000 down\n")
    assert read_notes(tmp_path) == {1: "RuntimeError: store http://u:***@h:5000 down"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1.txt"]


@pytest.mark.parametrize("value", [0, -1, "abc", None, True, float("inf"), float("nan")])
def test_the_collective_timeout_must_be_a_positive_number_of_minutes(value):
    with pytest.raises(ValueError, match=r"distributed_timeout must be a positive number of minutes"):
        DistributedRun.start("cpu", value)


def test_the_collective_timeout_is_in_minutes():
    assert collective_timeout(30) == timedelta(minutes=30) and collective_timeout(0.1) == timedelta(seconds=6)


@pytest.mark.parametrize("uri, masked", [
    ("postgresql://mlflow:s3cret@db.example.org:5432/mlflow", "postgresql://mlflow:***@db.example.org:5432/mlflow"),
    ("see http://u:p%40ss@h:5000 and https://:tok@h/x", "see http://u:***@h:5000 and https://:***@h/x"),
    ("sqlite:////tmp/mlruns.db", "sqlite:////tmp/mlruns.db"), ("http://user@h:5000", "http://user@h:5000")])
def test_mask_uri(uri, masked):
    assert mask_uri(uri) == masked
    assert str(TrackingStoreError(f"store {uri} down")) == f"store {masked} down"


def test_a_password_in_the_tracking_uri_is_not_echoed_by_make_nor_printed_by_an_error():
    uri = f"http://mlflow:{SECRET}@127.0.0.1:9/"  # port 9 (discard): nothing listens
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    targets = ["train", "evaluate", "sync-mlflow", "export", "compare", "ui", "bench-evaluation", "shipped-bundle"]
    echo = subprocess.run(["make", "-n", *targets, "RUN=x", f"STAMP={REPO_ROOT / 'Makefile'}"], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True)
    assert echo.returncode == 0, echo.stderr
    assert "-m pipeline train" in echo.stdout and SECRET not in echo.stdout + echo.stderr
    run = subprocess.run([sys.executable, "-m", "pipeline", "train", "--epochs", "1"], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "error: the MLflow tracking server http://mlflow:***@127.0.0.1:9/" in run.stderr
    assert SECRET not in run.stdout + run.stderr


def test_run_json_holds_the_tracking_uri_without_its_password_and_the_run_still_resumes(tmp_path, monkeypatch):
    class Tracker:  # the MLflow side (a store with a password needs a server); what run.json gets is under test
        run_id = "0123abcd"

        def __init__(self, *args, **kwargs) -> None:
            pass

    monkeypatch.setattr(resume, "RunTracker", Tracker)
    uri = f"postgresql://mlflow:{SECRET}@db.example.org:5432/mlflow"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("seed: 0\n")
    start = resume.RunStart(tmp_path / "run", resume=False)
    start.open_tracker("e", "run", {}, uri)
    text = (tmp_path / "run" / "run.json").read_text()
    assert SECRET not in text and read_record(tmp_path / "run")["tracking_uri"] == mask_uri(uri)
    again = plan_run({"seed": 0}, tmp_path / "run", uri)  # the same store: the masked record matches it
    again.release()
    assert again.resume and again.run_id == "0123abcd"
    with pytest.raises(ValueError, match=r"tracked in postgresql://mlflow:\*\*\*@db.example.org:5432/mlflow, not in "
                                         r"postgresql://mlflow:\*\*\*@other"):
        plan_run({"seed": 0}, tmp_path / "run", f"postgresql://mlflow:{SECRET}@other/mlflow")
