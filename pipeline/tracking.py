"""MLflow tracking: one SQLite database for every run, so the MLflow UI can compare them.

The store is ``sqlite:///<repo>/mlruns.db`` with artifacts in ``<repo>/mlruns/`` unless ``MLFLOW_TRACKING_URI`` is
set. Everything a run writes (params, per-epoch metrics of the engines through :class:`EpochMetricsLogger`, test
metrics, artifacts, status) goes through :class:`RunTracker`, whose writes survive an outage of the store: each is
retried briefly, then kept in the run folder's ``metrics.jsonl`` (:mod:`pipeline.journal`) for ``make sync-mlflow``,
and training goes on. A run records the host and process that train it (tags ``process.host``, ``process.pid``,
``process.start``), so that a run left RUNNING by a killed process is marked KILLED when next touched
(:func:`mark_if_dead`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import requests
import sqlalchemy
import torch
from ignite.engine import Engine, Events
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param
from mlflow.exceptions import MlflowException

from pipeline.config import REPO_ROOT
from pipeline.journal import JOURNAL, append_entry
from pipeline.locks import held_elsewhere
from pipeline.tracking_store import mask_uri, prepare_store

DEFAULT_DB = REPO_ROOT / "mlruns.db"
#: what a failing store raises (a locked SQLite file, an unreachable server, a full disk)
TRACKING_ERRORS = (MlflowException, OSError, sqlalchemy.exc.SQLAlchemyError, requests.RequestException)
#: the lock a training process holds on its run folder (:mod:`pipeline.locks`)
RUN_LOCK = ".lock"

#: MLflow's SQL store logs a traceback for each failed write
STORE_LOGGER = "mlflow.store.db.utils"

log = logging.getLogger("pipeline")


@contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Silence the logger ``name`` (below CRITICAL) within the block."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the repository's SQLite database."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_DB}"


def artifact_root(uri: str) -> str | None:
    """For a SQLite store, the ``mlruns/`` folder next to the database file (as a file URI)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).resolve().parent / "mlruns").as_uri()
    return None


def git_commit() -> str:
    """The repository's commit, with ``-dirty`` when tracked files are modified; ``unknown`` outside git."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT, capture_output=True, text=True,
            timeout=10,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(prefix: str, value: Any) -> dict[str, Any]:
    """``flatten("loss", {"margin": 10, "_target_": …})`` → ``{"loss.margin": 10}`` (``_target_`` dropped)."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if str(k).startswith("_"):
                continue
            out.update(flatten(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    return {prefix: value}


def runs_table_links(client, host: str = "127.0.0.1", port: int = 5000) -> list[str]:
    """One line per experiment of the store: its name and the UI address that opens its runs table (MLflow 3 opens
    an experiment on its GenAI overview otherwise).

    >>> from types import SimpleNamespace as N
    >>> runs_table_links(N(search_experiments=lambda: [N(name="compare", experiment_id="1")]))
    ["experiment 'compare': http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning"]
    """
    return [f"experiment '{e.name}': http://{host}:{port}/#/experiments/{e.experiment_id}/runs"
            "?workflowType=machine_learning" for e in client.search_experiments()]


#: the MLflow UI opens an experiment of this kind on its runs table (not on the GenAI trace overview)
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def ensure_experiment(client, name: str, uri: str) -> str:
    """The id of experiment ``name``, created when missing (artifacts beside a SQLite store), tagged as a model
    development experiment so that the UI lands on its runs."""
    exp = client.get_experiment_by_name(name)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(
        name, artifact_location=artifact_root(uri))
    if exp is None or any(exp.tags.get(k) != v for k, v in EXPERIMENT_KIND.items()):
        for k, v in EXPERIMENT_KIND.items():
            client.set_experiment_tag(exp_id, k, v)
    return exp_id


def source_tags() -> dict[str, str]:
    """MLflow's source tags of a run started here: the command (``mlflow.source.name``), its type and the commit."""
    command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "python"
    tags = {"mlflow.source.name": command[:500], "mlflow.source.type": "LOCAL"}
    commit = git_commit()
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit.removesuffix("-dirty")
    return tags


def _start_ticks(pid: int) -> str:
    """When process ``pid`` started (clock ticks since boot, from ``/proc``); ``""`` where unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def process_tags() -> dict[str, str]:
    """The tags naming this process: ``process.host``, ``process.pid`` and ``process.start`` (tells a live process
    from a later one that reuses its pid)."""
    return {"process.host": socket.gethostname(), "process.pid": str(os.getpid()),
            "process.start": _start_ticks(os.getpid())}


def process_alive(tags: Mapping[str, str]) -> bool | None:
    """Whether the process named by :func:`process_tags` still runs; ``None`` when it cannot be told (another host,
    no tags). This process itself counts as gone (a run it left RUNNING is not being trained)."""
    pid, host = tags.get("process.pid"), tags.get("process.host")
    if not pid or host != socket.gethostname():
        return None
    try:
        pid = int(pid)
        os.kill(pid, 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        pass
    if pid == os.getpid():
        return False
    started = tags.get("process.start")
    return not started or _start_ticks(pid) in ("", started)


def mark_if_dead(client, run, run_dir: str | os.PathLike | None = None) -> bool:
    """Mark a RUNNING run KILLED when the process that trained it is gone; returns whether it did.

    Gone: its run folder's lock (:data:`RUN_LOCK`, held by a training process for its lifetime) is free, or, without
    a lock file, its ``process.pid`` on this host is no longer that process. A run on another host without a
    reachable lock file is left alone (it cannot be told).
    """
    if run.info.status != "RUNNING":
        return False
    folder = Path(run_dir or run.data.params.get("run_dir") or "")
    lock = folder / RUN_LOCK if str(folder) not in ("", ".") else None
    if lock is not None and lock.is_file():
        dead = not held_elsewhere(lock)
    else:
        dead = process_alive(run.data.tags) is False
    if dead:
        client.set_terminated(run.info.run_id, "KILLED")
        client.set_tag(run.info.run_id, "process.end", f"found gone at {time.strftime('%Y-%m-%d %H:%M:%S')}")
        log.warning("MLflow run %s was left RUNNING by a process that is gone: marked KILLED", run.info.run_id)
    return dead


class RunTracker:
    """Create and fill one MLflow run; as a context manager it ends the run it created.

    ``with RunTracker(...) as tracker:`` marks the run FINISHED when the block completes, FAILED when it raises
    (KILLED on ``KeyboardInterrupt``, which includes a SIGTERM stop), so no run is left RUNNING by an error. A run
    reopened with :meth:`resume` keeps its status (re-evaluating a finished run does not change how its training
    ended), unless ``restart=True`` (a resumed training: RUNNING again, ended by the block).

    Writes survive an outage of the store: each is tried :attr:`attempts` times, :attr:`retry_wait_s` apart (once
    when a SQLite store stayed locked through MLflow's 20 s busy timeout); then it is appended to :attr:`journal` (the
    run folder's ``metrics.jsonl``) and the caller goes on. For :attr:`outage_s` after such a failure, writes go
    straight to the journal (a training loop is not held up by a store that is down); then the store is tried again.
    Without a journal a failed write raises.

    Args:
        experiment: the MLflow experiment name (created when missing).
        run_name: the run's display name.
        uri: the tracking URI (default :func:`tracking_uri`).
        tags: the run's tags (with :func:`source_tags` and :func:`process_tags`).
        journal: where failed writes go (default none: they raise).
    """

    ends_run = True
    attempts = 2
    retry_wait_s = 2.0
    outage_s = 300.0

    def __init__(self, experiment: str, run_name: str, uri: str | None = None, tags: dict | None = None,
                 journal: str | os.PathLike | None = None) -> None:
        self.uri = uri or tracking_uri()
        prepare_store(self.uri)  # before the first client: MLflow opens (and creates) the store in its constructor
        self.client = mlflow.MlflowClient(tracking_uri=self.uri)
        self.experiment_name = experiment
        self.experiment_id = ensure_experiment(self.client, experiment, self.uri)
        tags = {**source_tags(), **process_tags(), **(tags or {})}
        self.run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        self.run_id = self.run.info.run_id
        self._init_writes(journal)

    def _init_writes(self, journal) -> None:
        self.journal = None if journal is None else Path(journal)
        self.journaled = 0
        self._outage_until = 0.0
        self.logged_steps: dict[str, set[int]] = {}  # (metric, step) pairs log_metrics leaves out

    def skip_logged_steps(self) -> int:
        """From now on leave out of :meth:`log_metrics` every (metric, step) the run's MLflow history has already
        (a continued run computes its lost epochs again: each step stays one value). Returns how many there are."""
        try:
            keys = list(self.client.get_run(self.run_id).data.metrics)
            self.logged_steps = {k: {m.step for m in self.client.get_metric_history(self.run_id, k)} for k in keys}
        except TRACKING_ERRORS:
            self.logged_steps = {}  # the store is down: the journal keeps the writes; the sync adds them
        return sum(len(v) for v in self.logged_steps.values())

    @classmethod
    def resume(cls, run_id: str, uri: str | None = None, restart: bool = False) -> RunTracker:
        """Reopen an existing run (e.g. to add evaluation results to it, or to go on training it).

        A RUNNING run whose process is gone is first marked KILLED (:func:`mark_if_dead`). Failed writes go to the
        journal of the run folder recorded in the run's ``run_dir`` parameter, when that folder exists.

        Args:
            run_id: the MLflow run id.
            uri: the tracking URI (default :func:`tracking_uri`).
            restart: set the run RUNNING again with this process's tags, and end it with the ``with`` block.
        """
        self = cls.__new__(cls)
        self.uri = uri or tracking_uri()
        prepare_store(self.uri)
        self.client = mlflow.MlflowClient(tracking_uri=self.uri)
        self.run = self.client.get_run(run_id)
        self.run_id = run_id
        self.experiment_id = self.run.info.experiment_id
        self.experiment_name = self.client.get_experiment(self.experiment_id).name
        mark_if_dead(self.client, self.run)
        folder = Path(self.run.data.params.get("run_dir", ""))
        self._init_writes(folder / JOURNAL if folder.name and folder.is_dir() else None)
        self.ends_run = restart
        if restart:
            self.client.update_run(run_id, status="RUNNING")
            self.set_tags(process_tags())
        return self

    def __enter__(self) -> RunTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.ends_run:
            if exc_type is None:
                self.finish()
            else:
                self.finish("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")
        return False

    def _write(self, op: str, entry: dict, call: Callable[[], Any]) -> bool:
        """Run ``call`` (one MLflow write) with retries; on failure journal ``entry``. Returns whether MLflow got it."""
        if self.journal is not None and time.monotonic() < self._outage_until:
            self._to_journal(op, entry)
            return False
        error: BaseException | None = None
        for attempt in range(max(1, self.attempts)):
            try:
                with _quiet(STORE_LOGGER):  # one warning below instead of MLflow's traceback per attempt
                    call()
                return True
            except TRACKING_ERRORS as e:
                error = e
                if "database is locked" in str(e):  # MLflow's SQLite busy timeout (20 s) was the retry
                    break
                if attempt + 1 < self.attempts:
                    time.sleep(self.retry_wait_s)
        if self.journal is None:
            raise error
        log.warning("MLflow store %s failed (%s); going on, pending writes kept in %s: sync them later with "
                    "`make sync-mlflow RUN=%s`", mask_uri(self.uri), mask_uri(str(error).splitlines()[0][:200]),
                    self.journal,
                    self.journal.parent)
        self._outage_until = time.monotonic() + self.outage_s
        self._to_journal(op, entry)
        return False

    def _to_journal(self, op: str, entry: dict) -> None:
        append_entry(self.journal, {"run_id": self.run_id, "op": op, **entry})
        self.journaled += 1

    def engine_handler(self) -> EpochMetricsLogger:
        """An Ignite handler logging an engine's epoch metrics into this run (:class:`EpochMetricsLogger`)."""
        return EpochMetricsLogger(self)

    def log_params(self, params: Mapping[str, Any], skip_logged: bool = False) -> None:
        """Log parameters (values cut to 6000 characters); ``skip_logged``: leave out those the run already has
        (MLflow refuses to change a parameter, e.g. on a resumed run)."""
        items = {str(k): str(v)[:6000] for k, v in params.items()}
        if skip_logged:
            try:
                logged = self.client.get_run(self.run_id).data.params
            except TRACKING_ERRORS:
                logged = {}  # journaled whole: the sync leaves out those the run has
            items = {k: v for k, v in items.items() if k not in logged}
        if not items:
            return
        batch = [Param(k, v) for k, v in items.items()]

        def call():
            for i in range(0, len(batch), 100):
                self.client.log_batch(self.run_id, params=batch[i : i + 100])

        self._write("params", {"params": items}, call)

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0, finite_only: bool = True) -> None:
        """Log metrics at ``step``; ``finite_only``: leave out NaN and infinite values."""
        now = int(time.time() * 1000)
        values = {str(k): float(v) for k, v in metrics.items()
                  if v is not None and step not in self.logged_steps.get(str(k), ())}
        items = [Metric(k, v, now, step) for k, v in values.items() if math.isfinite(v) or not finite_only]
        if not items:
            return

        def call():
            for i in range(0, len(items), 500):
                self.client.log_batch(self.run_id, metrics=items[i : i + 500])

        self._write("metrics", {"metrics": [[m.key, m.value, m.timestamp, m.step] for m in items]}, call)

    def log_dataset(self, name: str, digest: str, source: str, context: str = "training") -> None:
        """Record the run's dataset as an MLflow input (name, fingerprint, where it lives), so the UI groups runs
        by dataset."""
        dataset = Dataset(name=name, digest=digest, source_type="local", source=json.dumps({"uri": source}))
        self._write("dataset", {"name": name, "digest": digest, "source": source, "context": context},
                    lambda: self.client.log_inputs(self.run_id, datasets=[
                        DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])]))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        values = {str(k): str(v) for k, v in tags.items()}

        def call():
            for k, v in values.items():
                self.client.set_tag(self.run_id, k, v)

        self._write("tags", {"tags": values}, call)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        path = str(Path(path).resolve())
        self._write("artifact", {"path": path, "artifact_path": artifact_path},
                    lambda: self.client.log_artifact(self.run_id, path, artifact_path))

    def finish(self, status: str = "FINISHED") -> None:
        self._write("status", {"status": status}, lambda: self.client.set_terminated(self.run_id, status))


class EpochMetricsLogger:
    """Ignite handler: at each epoch's end, log the engine's ``state.metrics`` (numbers, and nested dicts of them
    flattened) into a :class:`RunTracker` run at step ``state.epoch`` (an evaluator run as ``evaluator.run(epoch)``
    logs at the training epoch).

    It replaces MONAI's ``MLFlowHandler``, which writes through a bare ``MlflowClient`` inside the engine: a store
    that is locked for longer than SQLite's busy timeout, or a server that is down, raises there and kills the
    training at its next epoch. Here each write goes through the tracker's guarded writes (retried briefly, then
    kept in the run folder's ``metrics.jsonl``), and training goes on.

    Args:
        tracker: the run to log into.
    """

    def __init__(self, tracker: RunTracker) -> None:
        self.tracker = tracker

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        values = _numbers(engine.state.metrics)
        if values:
            self.tracker.log_metrics(values, step=int(engine.state.epoch), finite_only=False)


def _numbers(metrics: Mapping[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if isinstance(v, Mapping):
            out.update(_numbers(v))
        elif isinstance(v, torch.Tensor) and v.numel() == 1:
            out[str(k)] = float(v)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[str(k)] = float(v)
    return out
