"""Test helpers for MLflow stores: a ready SQLite store in a moment, and one short run for separate processes
(this module imports no MONAI, so such a process starts in seconds)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import mlflow

from pipeline.tracking import RunTracker

_template: list[Path] = []


def ready_store(folder: Path) -> str:
    """The URI of an MLflow SQLite store in ``folder`` with its tables made: a copy of one made once per test
    process (MLflow's table creation takes seconds). Tests of a store's creation need a fresh one instead."""
    if not _template:
        db = Path(tempfile.mkdtemp(prefix="mlflow-template-")) / "mlruns.db"
        mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments(max_results=1)
        _template.append(db)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_template[0], folder / "mlruns.db")
    return f"sqlite:///{folder / 'mlruns.db'}"


def first_run(uri: str, name: str, barrier) -> None:
    """Wait for the other processes at ``barrier``, then create, fill and finish one run in the store ``uri``."""
    barrier.wait(timeout=120)
    with RunTracker("first-runs", name, uri=uri) as tracker:
        tracker.log_metrics({"x": 1.0}, step=1)
