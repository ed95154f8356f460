"""A multi-process job fails fast and as one: ``python -m pipeline train --nproc 2`` (``make train NPROC=2``) on two
gloo processes, in its second epoch: rank 0 killed (SIGKILL: no process is left to end its MLflow run), or rank 1
frozen (SIGSTOP: rank 0 waits in a gradient exchange).

Every job ends (the frozen one within the config's ``distributed_timeout``, here 1 min, plus the agent's 30 s
grace before it kills the frozen process), prints the cause in one line, leaves its MLflow run KILLED or FAILED
with the cause as the tag ``failure``, and is continued by ``train --resume <run> --nproc 2`` from its checkpoint.
While the jobs run, every socket their processes listen on is bound to the loopback interface.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest

from pipeline.config import REPO_ROOT
from pipeline.launch import FAILURE_TAG
from pipeline.resume import read_record
from tests.fault_helpers import AT_ENV, MARKER_ENV, PAUSE_ENV, RANK_ENV
from tests.helpers import make_config_dir, tiny_unet_overrides, write_blob_volumes
from tests.tracking_helpers import ready_store

TIMEOUT_MIN = 1.0  # longer than the 4 s pause and than rank 0's start-up on a busy machine: only the signal ends a job
PAUSE_S = 4.0
GRACE_S = 30  # torch's elastic agent: SIGTERM, then SIGKILL 30 s later (a frozen process ignores SIGTERM)
SLACK_S = 300  # start-up and shut-down of the launcher and the processes on a heavily loaded 2-core machine
EPOCHS = 3
AT = 5  # 18 slices, 9 per process, batch 4: 3 iterations per epoch; the 5th call is in epoch 2
SETTINGS = {**tiny_unet_overrides(), "loss": {"_target_": "tests.fault_helpers.PausingCrossEntropy"},
            "distributed_timeout": TIMEOUT_MIN, "val_interval": 1, "evaluation::noise::sigmas": [],
            "evaluation::posthoc": [], "evaluation::maps::volumes": 0, "evaluation::maps::slices": 0}


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", "train", "--nproc", "2", *args]


def _listening(pids: list[int]) -> list[str]:
    """The local addresses (hex, as /proc/net/tcp writes them) of the TCP sockets that ``pids`` listen on."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                out.append(fields[1])
    return out


def _descendants(pid: int) -> list[int]:
    """``pid`` and the processes it started, and theirs (``[]`` once it is gone)."""
    try:
        children = [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return [pid] + [d for c in children for d in _descendants(c)]


def _kill_if_ours(pid: int, mark: str) -> None:
    """SIGKILL ``pid`` if it still runs a command line naming ``mark`` (this test's folder: not a reused pid)."""
    try:
        if mark in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
            os.kill(pid, signal.SIGKILL)
    except (OSError, ProcessLookupError):
        pass


def _signal_and_wait(jobs: dict) -> None:
    """Wait for each job's pause, note its listening sockets, send its signal; then wait for every job's end."""
    deadline = time.time() + 600
    for job in jobs.values():
        while not job["marker"].is_file() or not job["marker"].read_text():
            assert job["proc"].poll() is None, f"the job ended before the pause:\n{job['proc'].communicate()[0]}"
            assert time.time() < deadline, "no process reached the pause"
            time.sleep(0.05)
        job["pids"] = _descendants(job["proc"].pid)
        job["listening"] = _listening(job["pids"])
        os.kill(int(job["marker"].read_text()) if job["target"] == "rank" else job["proc"].pid, job["sig"])
        job["signalled"] = time.monotonic()

    def wait(job):  # each job's own end time
        job["log"] = job["proc"].communicate()[0]
        job["elapsed"] = time.monotonic() - job["signalled"]

    waiting = [threading.Thread(target=wait, args=(job,)) for job in jobs.values()]
    for thread in waiting:
        thread.start()
    for thread in waiting:
        thread.join(timeout=TIMEOUT_MIN * 60 + GRACE_S + SLACK_S + 60)
    assert all(job["proc"].poll() is not None for job in jobs.values()), "a job did not end"


#: job name: (the rank that pauses, the signal, sent to that rank or to the launcher)
JOBS = {"SIGKILL": ("0", signal.SIGKILL, "rank"), "SIGSTOP": ("1", signal.SIGSTOP, "rank")}


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """The jobs, started together, each with its own store: ``{name: {"proc", "dir", "uri", "elapsed", "log",
    "listening", "marker", "env"}}``."""
    tmp = tmp_path_factory.mktemp("faults")
    data, config_dir = write_blob_volumes(tmp / "data"), make_config_dir(tmp)
    sets = {"data_dir": str(data), "output_dir": str(tmp / "runs"), **SETTINGS}
    args = ["--dataset", "blobs", "--loss", "ce", "--epochs", str(EPOCHS),
            *[a for k, v in sets.items() for a in ("--set", f"{k}={json.dumps(v) if not isinstance(v, str) else v}")]]
    out = {}
    for name, (rank, sig, target) in JOBS.items():
        marker, uri = tmp / f"{name}.paused", ready_store(tmp / f"store-{name}")
        env = {**os.environ, "MBLS_CONFIG_DIR": str(config_dir), "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1",
               RANK_ENV: rank, AT_ENV: str(AT), PAUSE_ENV: str(PAUSE_S), MARKER_ENV: str(marker)}
        proc = subprocess.Popen(_command(*args, "--run-name", name), cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        out[name] = {"proc": proc, "marker": marker, "sig": sig, "target": target, "dir": tmp / "runs" / name,
                     "uri": uri, "env": env}
    try:
        _signal_and_wait(out)
    finally:  # whatever failed, leave no process behind (the agent starts each process in a session of its own)
        for job in out.values():
            for pid in reversed(_descendants(job["proc"].pid) + job.get("pids", [])):
                _kill_if_ours(pid, str(tmp))
            job["proc"].wait()
    return out


@pytest.mark.parametrize("name", list(JOBS))
def test_a_killed_or_frozen_process_ends_the_job_in_time_with_the_cause_in_one_line(jobs, name):
    job = jobs[name]
    assert job["proc"].returncode == (143 if name == "SIGTERM" else 1), job["log"][-3000:]
    # none hangs: a frozen process is found after the timeout and killed after the agent's grace; a death or a stop
    # at once (how soon depends on the machine's load: the launcher then imports MLflow to mark the run)
    assert job["elapsed"] < TIMEOUT_MIN * 60 + GRACE_S + SLACK_S, job["elapsed"]
    if name == "SIGSTOP":
        assert job["elapsed"] >= TIMEOUT_MIN * 60, job["elapsed"]
    lines = [ln for ln in job["log"].splitlines() if ln.startswith("error: training stopped")]
    assert len(lines) == 1, job["log"][-3000:]
    pid = job["marker"].read_text()
    if name == "SIGKILL":
        assert f"process 0 of 2 (pid {pid}) was killed by SIGKILL" in lines[0]
    elif name == "SIGSTOP":  # the survivor's collective timed out: it names the wait
        assert "process 0 of 2" in lines[0] and "exited with code 1" in lines[0]
        assert "Timed out" in lines[0] and "distributed_timeout" in lines[0], lines[0]
    else:
        assert "the launcher received SIGTERM and stopped all processes" in lines[0]
    if name != "SIGTERM":
        assert "the other 1 process(es) ended with it" in lines[0]
    assert f"make train RESUME={name} NPROC=2" in lines[0]


@pytest.mark.parametrize("name", list(JOBS))
def test_the_mlflow_run_is_not_left_running_and_names_the_cause(jobs, name):
    job = jobs[name]
    run = mlflow.MlflowClient(tracking_uri=job["uri"]).get_run(read_record(job["dir"])["run_id"])
    # rank 0 ends it FAILED (its exchange failed) or KILLED (SIGTERM); killed itself, the launcher marks it KILLED
    assert run.info.status == {"SIGKILL": "KILLED", "SIGSTOP": "FAILED", "SIGTERM": "KILLED"}[name]
    line = next(ln for ln in job["log"].splitlines() if ln.startswith("error: training stopped"))
    assert run.data.tags[FAILURE_TAG] in line
    assert f"the MLflow run is {run.info.status}" in line


def test_every_socket_of_the_job_listens_on_loopback_only(jobs):
    for job in jobs.values():
        assert job["listening"], "no listening socket found (the rendezvous store should be one)"
        # 127.0.0.1 (0100007F) in /proc/net/tcp; ::1 or ::ffff:127.0.0.1 in tcp6
        loopback = ("0100007F:", "00000000000000000000000001000000:", "0000000000000000FFFF00000100007F:")
        assert all(a.startswith(loopback) for a in job["listening"]), job["listening"]


def test_the_same_command_continues_the_failed_run(jobs):
    procs = {}
    for name, job in jobs.items():
        env = {k: v for k, v in job["env"].items() if k not in (RANK_ENV, AT_ENV)}  # no pause this time
        procs[name] = subprocess.Popen(_command("--resume", str(job["dir"])), cwd=REPO_ROOT, env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for name, proc in procs.items():
        log, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, log[-3000:]
        assert f"resumed {name} from " in log and f"epochs 1-1 of {EPOCHS} were done, continuing with epoch 2" in log
        job = jobs[name]
        run = mlflow.MlflowClient(tracking_uri=job["uri"]).get_run(read_record(job["dir"])["run_id"])
        assert run.info.status == "FINISHED"
        assert run.data.metrics["best_epoch"] >= 1 and "test/dsc" in run.data.metrics
