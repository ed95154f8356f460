"""Starting a training run again: a run folder that exists is continued, not replaced.

``make train … ARGS="--run-name X"`` run a second time (after a kill, a preemption, a crash), or ``make train
RESUME=<run folder | MLflow run id | run name>``, continues run ``X`` in its own folder and its own MLflow run from
its last checkpoint (:mod:`pipeline.checkpoints`), provided that

* its saved ``config.yaml`` equals the new config, apart from :data:`MACHINE_KEYS` (the keys that differ are named);
* no live process trains it (the run folder's lock, :data:`pipeline.tracking.RUN_LOCK`, is free);
* it has not finished (``run.json`` records how the run ended).

``run.json`` in the run folder records the MLflow run (id, tracking URI) and, at the end, ``finished``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow.exceptions import MlflowException

from pipeline.checkpoints import LAST
from pipeline.config import REPO_ROOT, ConfigLoader, load_yaml
from pipeline.io import write_json_atomic
from pipeline.journal import JOURNAL
from pipeline.locks import FileLock, LockTimeout
from pipeline.tracking import RUN_LOCK, RunTracker
from pipeline.tracking_store import mask_uri, prepare_store

log = logging.getLogger("pipeline")

RUN_RECORD = "run.json"
#: config keys that do not change what a run computes: they may differ between a run and its resumption
MACHINE_KEYS = ("cache", "cache_dir", "cache_memory_fraction", "checkpoint_interval", "distributed_timeout",
                "output_dir")


class RunBusyError(FileExistsError):
    """The run folder exists and another live process trains its run."""


@dataclass
class RunStart:
    """Where a training run starts: a new run folder, or a run to continue.

    Attributes:
        run_dir: the run folder.
        resume: whether the folder existed (a run to continue).
        run_id: the MLflow run to reopen (``None``: a new MLflow run).
        checkpoint: the ``last.pt`` to load (``None``: from the first epoch).
        lock: the run folder's lock, held by this process until :meth:`release`.
    """

    run_dir: Path
    resume: bool
    run_id: str | None = None
    checkpoint: Path | None = None
    lock: FileLock | None = None

    def create(self) -> None:
        """Create the new run folder (refusing an existing one) and take its lock."""
        self.run_dir.mkdir(parents=True, exist_ok=False)
        self.lock = _take_lock(self.run_dir)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def __enter__(self) -> RunStart:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def check_split(self, split: dict) -> None:
        """On a resumed run, refuse data whose split differs from the run's ``splits.json``.

        Raises:
            ValueError: naming the parts whose case ids differ.
        """
        path = self.run_dir / "splits.json"
        if not self.resume or not path.is_file():
            return
        saved = json.loads(path.read_text())
        parts = sorted(k for k in set(saved) | set(split) if list(saved.get(k, [])) != list(split.get(k, [])))
        if parts:
            raise ValueError(f"cannot resume the run in {self.run_dir}: the data's {', '.join(parts)} split differs "
                             f"from its splits.json (the dataset changed?); start a new run")

    def open_tracker(self, experiment: str, run_name: str, tags: dict, uri: str) -> RunTracker:
        """The MLflow run of this start: the run's own (RUNNING again, with this process's tags) when it is resumed
        and recorded in ``run.json``, else a new one, recorded there. Failed writes go to the run folder's
        ``metrics.jsonl``. When a new run cannot be created, a new run folder is removed again.
        """
        journal = self.run_dir / JOURNAL
        if self.resume and self.run_id:
            tracker = RunTracker.resume(self.run_id, uri, restart=True)
            tracker.journal = journal
            tracker.set_tags({"resumed": f"from {self.checkpoint.name if self.checkpoint else 'the start'} at "
                                         f"{time.strftime('%Y-%m-%d %H:%M:%S')}"})
            return tracker
        try:
            tracker = RunTracker(experiment, run_name, uri=uri, tags=tags, journal=journal)
        except BaseException:
            if not self.resume:
                self.release()
                shutil.rmtree(self.run_dir, ignore_errors=True)
            raise
        write_record(self.run_dir, run_id=tracker.run_id, tracking_uri=mask_uri(uri), experiment=experiment)
        return tracker


def _take_lock(run_dir: Path) -> FileLock:
    try:
        return FileLock(run_dir / RUN_LOCK, timeout_s=0).acquire()
    except LockTimeout:
        raise RunBusyError(f"the run in {run_dir} is being trained by another live process; wait for it to end, "
                           "or stop it first") from None


def normalized(config: dict) -> dict:
    """``config`` as it reads back from the run folder's ``config.yaml`` (tuples become lists, and so on)."""
    return yaml.load(yaml.safe_dump(config, sort_keys=False), ConfigLoader)


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}::{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def config_differences(saved: dict, new: dict, ignore: tuple[str, ...] = MACHINE_KEYS) -> list[str]:
    """The keys (``a::b`` paths) whose values differ between two configs, as ``"key: old → new"`` lines; top-level
    keys in ``ignore`` are left out.

    >>> config_differences({"lr": 0.001, "loss": {"margin": 10}}, {"lr": 0.01, "loss": {"margin": 10}})
    ['lr: 0.001 → 0.01']
    """
    a, b = _flat(saved), _flat(new)
    out = []
    for key in sorted(set(a) | set(b)):
        if key.split("::", 1)[0] in ignore:
            continue
        if key not in a:
            out.append(f"{key}: (absent) → {b[key]!r}")
        elif key not in b:
            out.append(f"{key}: {a[key]!r} → (absent)")
        elif a[key] != b[key] or type(a[key]) is not type(b[key]):
            out.append(f"{key}: {a[key]!r} → {b[key]!r}")
    return out


def read_record(run_dir: Path) -> dict:
    """``run.json`` of a run folder (``{}`` when absent)."""
    path = run_dir / RUN_RECORD
    return json.loads(path.read_text()) if path.is_file() else {}


def write_record(run_dir: Path, **values) -> None:
    """Add ``values`` to ``run.json`` (atomically)."""
    write_json_atomic(run_dir / RUN_RECORD, {**read_record(run_dir), **values})


def plan_run(config: dict, run_dir: str | os.PathLike, uri: str) -> RunStart:
    """Decide how a training run starts in ``run_dir``, before any data work.

    A missing folder: a new run (created later by :meth:`RunStart.create`). An existing one: the run to continue, its
    lock taken now.

    Args:
        config: the new run's config (``parser.get()``).
        run_dir: the run folder.
        uri: the tracking URI now in use.

    Raises:
        FileExistsError: the folder is not a run folder, or its run finished.
        ValueError: the saved config differs (naming the keys), or the run was tracked in another store.
        RunBusyError: a live process trains it.
    """
    run_dir = Path(run_dir).resolve()
    if not run_dir.exists():
        return RunStart(run_dir, resume=False)
    if not (run_dir / "config.yaml").is_file():
        raise FileExistsError(f"{run_dir} exists and is not a run folder (no config.yaml): choose another --run-name")
    record = read_record(run_dir)
    if record.get("finished"):
        raise FileExistsError(
            f"the run in {run_dir} finished already (MLflow run {record.get('run_id')}): evaluate it again with "
            f"`make evaluate RUN={run_dir}`, or choose another --run-name for a new run")
    diffs = config_differences(normalized(load_yaml(run_dir / "config.yaml")), normalized(config))
    if diffs:
        raise ValueError(
            f"cannot resume the run in {run_dir}: its config.yaml differs from this command's config in "
            f"{len(diffs)} key(s): " + "; ".join(diffs)
            + ". Repeat the run's own settings, or choose another --run-name for a new run")
    if record.get("tracking_uri") and record["tracking_uri"] not in (uri, mask_uri(uri)):  # run.json: masked
        raise ValueError(f"the run in {run_dir} is tracked in {record['tracking_uri']}, not in {mask_uri(uri)}: set "
                         f"MLFLOW_TRACKING_URI={record['tracking_uri']} to resume it")
    lock = _take_lock(run_dir)
    last = run_dir / "checkpoints" / LAST
    return RunStart(run_dir, resume=True, run_id=record.get("run_id"), checkpoint=last if last.is_file() else None,
                    lock=lock)


def find_run_folder(run: str, uri: str, runs_root: str | os.PathLike | None = None) -> Path:
    """The folder of a run named by its folder, its MLflow run id or run name, or its name under ``runs_root``
    (default ``runs/``).

    Raises:
        FileNotFoundError: nothing matches, naming what was tried.
    """
    path = Path(run).expanduser()
    if path.is_dir():
        return path.resolve()
    prepare_store(uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    found = []
    try:
        found = [client.get_run(run)]
    except MlflowException:
        for exp in client.search_experiments():
            found += client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{run}'")
    folders = {r.data.params.get("run_dir") for r in found} - {None}
    if len(folders) > 1:
        raise ValueError(f"{len(found)} MLflow runs are named '{run}'; pass the run id or the run folder instead")
    if folders and Path(next(iter(folders))).is_dir():
        return Path(next(iter(folders))).resolve()
    local = Path(runs_root or REPO_ROOT / "runs") / run
    if local.is_dir():
        return local.resolve()
    raise FileNotFoundError(f"RUN '{run}' is neither a run folder, nor an MLflow run id or name in {uri} whose folder "
                            f"exists, nor a folder {local}")
