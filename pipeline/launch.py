"""``make train NPROC=n``: ``n`` training processes on this machine, started by PyTorch's elastic agent (the engine
of ``torchrun``), with every socket of the job on the loopback interface, and a job that ends as one.

* **loopback only**: ``torchrun --standalone`` (and an explicit ``--rdzv-endpoint=127.0.0.1:…``) makes the agent's
  TCP store listen on every interface. Here the store is a :class:`torch.distributed.TCPStore` served on a socket
  this process binds to ``127.0.0.1`` on a port the system picks (:class:`LoopbackRendezvous`, registered with
  torch's rendezvous registry as ``loopback``); the processes join it as clients, and their gloo and NCCL sockets
  use the ``lo`` interface (``GLOO_SOCKET_IFNAME``, ``NCCL_SOCKET_IFNAME``, unless already set).
* **one failure ends the job**: when a process dies (a signal, an error, a collective that timed out after the
  config's ``distributed_timeout`` because a peer froze) the agent stops the others (SIGTERM, then SIGKILL after its
  30 s grace). The cause is printed in one line and the run's MLflow run, if a process left it RUNNING (rank 0
  itself was killed), is marked KILLED; either way it gets the tag ``failure`` with that line. The run folder keeps
  its last checkpoint: ``make train RESUME=<run> NPROC=n`` continues it.

Across machines, ``torchrun`` itself is used (README, "Distributed training and GPUs").
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import tempfile
import uuid
from datetime import timedelta
from pathlib import Path

import mlflow
from torch.distributed import PrefixStore, TCPStore
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.elastic.rendezvous import (
    RendezvousHandler,
    RendezvousInfo,
    RendezvousParameters,
    RendezvousStoreInfo,
    rendezvous_handler_registry,
)
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from pipeline.distributed import TIMEOUT_KEY
from pipeline.resume import read_record
from pipeline.tracking import mark_if_dead, tracking_uri
from pipeline.tracking_store import mask_uri

LOOPBACK = "127.0.0.1"
BACKEND = "loopback"
#: the environment variable naming the folder where each process notes its error (``<rank>.txt``, one line)
ERRORS_ENV = "MBLS_PROCESS_ERRORS"
#: failures this close to the first one (seconds) are taken as one event when the cause is chosen
CAUSE_WINDOW_S = 5
#: the tag of a run whose multi-process job failed: the cause, in one line
FAILURE_TAG = "failure"


class LoopbackRendezvous(RendezvousHandler):
    """The rendezvous of one node's processes: a TCP store that listens on ``127.0.0.1`` only, on a port the system
    assigns when the socket is bound (no race for a "free" port), shared by the agent and its processes."""

    def __init__(self, run_id: str, timeout: timedelta = timedelta(minutes=10)) -> None:
        self.run_id, self.timeout = run_id, timeout
        self._socket: socket.socket | None = None
        self._store: TCPStore | None = None

    @property
    def port(self) -> int | None:
        return None if self._socket is None else self._socket.getsockname()[1]

    def _serve(self) -> TCPStore:
        if self._store is None:
            self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self._socket.bind((LOOPBACK, 0))
            self._socket.listen(128)
            self._store = TCPStore(LOOPBACK, self.port, None, True, self.timeout, multi_tenant=True,
                                   master_listen_fd=self._socket.fileno())
        return self._store

    def next_rendezvous(self) -> RendezvousInfo:
        store = self._serve()
        return RendezvousInfo(PrefixStore(self.run_id, store), 0, 1, RendezvousStoreInfo(LOOPBACK, self.port))

    @property
    def use_agent_store(self) -> bool:  # the processes connect to this store (TORCHELASTIC_USE_AGENT_STORE)
        return True

    def get_backend(self) -> str:
        return BACKEND

    def is_closed(self) -> bool:
        return False

    def set_closed(self) -> None:
        pass

    def num_nodes_waiting(self) -> int:
        return 0

    def get_run_id(self) -> str:
        return self.run_id

    def shutdown(self) -> bool:
        return True


def _handler(params: RendezvousParameters) -> RendezvousHandler:
    return LoopbackRendezvous(params.run_id)


rendezvous_handler_registry.register(BACKEND, _handler)


def note_error(message: str) -> None:
    """In a process of :func:`launch`: note the error that ends it (the last line of its message) for the launcher's
    one-line cause. Written whole or not at all (a process may be killed while writing); nothing elsewhere."""
    folder, rank = os.environ.get(ERRORS_ENV), os.environ.get("RANK")
    if not folder or rank is None:
        return
    lines = [ln.strip() for ln in mask_uri(message).splitlines() if ln.strip()]
    tmp = Path(folder) / f".{rank}.tmp"
    tmp.write_text(lines[-1] if lines else "")
    os.replace(tmp, Path(folder) / f"{rank}.txt")


def read_notes(folder: Path) -> dict[int, str]:
    """The errors the processes noted (:func:`note_error`), by rank."""
    return {int(p.stem): p.read_text() for p in folder.glob("*.txt") if p.stem.isdigit()}


def failure_line(error: ChildFailedError, nproc: int, notes: dict[int, str] | None = None) -> str:
    """The cause of a failed job in one line: the process that failed first, its pid, and the signal that killed it
    or the error it noted (``notes``, by rank: :func:`note_error`; naming the config key when the error is a
    collective's timeout); then how many others were stopped. Within :data:`CAUSE_WINDOW_S` of the first failure, a
    process killed by a signal is the cause of the others' errors (their connection to it closed), and one ended by
    SIGTERM was stopped by the agent."""
    notes = notes or {}
    if not error.failures:
        return f"the job of {nproc} processes failed"
    first = min(f.timestamp for f in error.failures.values())

    def order(item):  # a kill by a signal comes before the errors it causes in the others (lost connections)
        rank, f = item
        kind = 2 if f.exitcode == -signal.SIGTERM else 0 if f.exitcode < 0 else 1
        return (f.timestamp - first > CAUSE_WINDOW_S, kind, f.timestamp, rank)

    failures = sorted(error.failures.items(), key=order)
    rank, failure = failures[0]
    line = f"process {rank} of {nproc} (pid {failure.pid})"
    if failure.exitcode < 0:
        line += f" was killed by {failure.signal_name()}"
    else:
        message = notes.get(rank, "")
        line += f" exited with code {failure.exitcode}" + (f": {message[:300]}" if message else "")
        if "timed out" in message.lower() or "timeout" in message.lower():
            line += f" (another process did not answer within the config's {TIMEOUT_KEY}: stopped or stalled?)"
    if len(failures) > 1:
        line += f"; the other {len(failures) - 1} process(es) ended with it"
    return line


def record_failure(run_dir: Path, cause: str) -> str | None:
    """Mark the MLflow run of ``run_dir`` (from its ``run.json``) KILLED if no process is left to end it, and tag
    it with ``cause``. Returns the MLflow run's final status, ``None`` when there is no run yet."""
    record = read_record(run_dir) if run_dir.is_dir() else {}
    if not record.get("run_id"):
        return None
    client = mlflow.MlflowClient(tracking_uri=tracking_uri())  # the processes' store (run.json's URI is masked)
    run = client.get_run(record["run_id"])
    mark_if_dead(client, run, run_dir)
    client.set_tag(run.info.run_id, FAILURE_TAG, cause[:5000])
    return client.get_run(run.info.run_id).info.status


def launch(nproc: int, argv: list[str], run_dir: Path, resume_hint: str) -> int:
    """Run ``python -m pipeline <argv>`` in ``nproc`` processes on this machine (one run, rank 0 writing it) and
    wait for them. Returns the exit code: 0, 143 when this launcher got SIGTERM/SIGINT, else 1 (the cause and the
    command that continues the run printed in one line)."""
    for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        os.environ.setdefault(name, "lo")
    with tempfile.TemporaryDirectory(prefix="mbls-errors-") as errors:
        os.environ[ERRORS_ENV] = errors
        try:
            return _launch(nproc, argv, run_dir, resume_hint, Path(errors))
        finally:
            os.environ.pop(ERRORS_ENV, None)


def _launch(nproc: int, argv: list[str], run_dir: Path, resume_hint: str, errors: Path) -> int:
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"mbls-{uuid.uuid4().hex[:8]}",
                          rdzv_backend=BACKEND, rdzv_endpoint=f"{LOOPBACK}:0", max_restarts=0,
                          monitor_interval=0.5, start_method="spawn")
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "pipeline", *argv)
        return 0
    except ChildFailedError as e:
        cause, code = failure_line(e, nproc, read_notes(errors)), 1
    except SignalException as e:
        cause, code = f"the launcher received {signal.Signals(e.sigval).name} and stopped all processes", 143
    status = None
    try:
        status = record_failure(run_dir, cause)
    except Exception as e:  # noqa: BLE001 (the store may be what failed; the cause is printed either way)
        cause += f" (the MLflow run could not be updated: {mask_uri(str(e).splitlines()[0][:200])})"
    run = f"; the MLflow run is {status}" if status else ""
    print(f"error: training stopped: {cause}{run}. Continue it with "
          f"`make train RESUME={resume_hint} NPROC={nproc}`", file=sys.stderr, flush=True)
    return code
