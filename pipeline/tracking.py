"""MLflow tracking: one SQLite database for every run, so the MLflow UI can compare them.

The store is ``sqlite:///<repo>/mlruns.db`` with artifacts in ``<repo>/mlruns/`` unless ``MLFLOW_TRACKING_URI`` is
set. Engines log through MONAI's ``MLFlowHandler`` (per-epoch training loss and validation metrics); everything
else (params, test metrics, artifacts, status) goes through :class:`RunTracker`.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param
from monai.handlers import MLFlowHandler

from pipeline.config import REPO_ROOT

DEFAULT_DB = REPO_ROOT / "mlruns.db"


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


class RunTracker:
    """Create and fill one MLflow run; as a context manager it ends the run it created.

    ``with RunTracker(...) as tracker:`` marks the run FINISHED when the block completes, FAILED when it raises
    (KILLED on ``KeyboardInterrupt``), so no run is left RUNNING by an error. A run reopened with :meth:`resume`
    keeps its status (re-evaluating a finished run does not change how its training ended).

    Args:
        experiment: the MLflow experiment name (created when missing).
        run_name: the run's display name.
        uri: the tracking URI (default :func:`tracking_uri`).
        tags: the run's tags.
    """

    ends_run = True

    def __init__(self, experiment: str, run_name: str, uri: str | None = None, tags: dict | None = None) -> None:
        self.uri = uri or tracking_uri()
        self.client = mlflow.MlflowClient(tracking_uri=self.uri)
        self.experiment_name = experiment
        self.experiment_id = ensure_experiment(self.client, experiment, self.uri)
        tags = {**source_tags(), **(tags or {})}
        self.run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        self.run_id = self.run.info.run_id

    @classmethod
    def resume(cls, run_id: str, uri: str | None = None) -> RunTracker:
        """Reopen an existing run (e.g. to add evaluation results to it)."""
        self = cls.__new__(cls)
        self.uri = uri or tracking_uri()
        self.client = mlflow.MlflowClient(tracking_uri=self.uri)
        self.run = self.client.get_run(run_id)
        self.run_id = run_id
        self.experiment_id = self.run.info.experiment_id
        self.experiment_name = self.client.get_experiment(self.experiment_id).name
        self.ends_run = False
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

    def engine_handler(self, **kwargs):
        """A MONAI ``MLFlowHandler`` that writes into this run (epoch-level logging by default)."""
        kwargs.setdefault("iteration_log", False)
        kwargs.setdefault("epoch_log", True)
        handler = MLFlowHandler(tracking_uri=self.uri, experiment_name=self.experiment_name, **kwargs)
        handler.cur_run = self.client.get_run(self.run_id)  # log into this run, not a new one
        return handler

    def log_params(self, params: Mapping[str, Any]) -> None:
        items = [Param(str(k), str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:

        now = int(time.time() * 1000)
        items = [Metric(str(k), float(v), now, step) for k, v in metrics.items()
                 if v is not None and math.isfinite(float(v))]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i : i + 500])

    def log_dataset(self, name: str, digest: str, source: str, context: str = "training") -> None:
        """Record the run's dataset as an MLflow input (name, fingerprint, where it lives), so the UI groups runs
        by dataset."""
        dataset = Dataset(name=name, digest=digest, source_type="local", source=json.dumps({"uri": source}))
        self.client.log_inputs(self.run_id, datasets=[
            DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)
