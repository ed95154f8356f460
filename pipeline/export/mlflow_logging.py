"""The MLflow side of an export: the bundle as an artifact of its run, the shipped model as a logged model.

The TorchScript model (``models/model.ts``) is logged with ``mlflow.pytorch.log_model`` into the run that trained
it, in the run's experiment, with an input example (one random ``1×C×64×64`` slice) from which MLflow infers the
signature: it appears under the run's "Logged models" and can be registered
(``mlflow.register_model("models:/<model id>", name)``). A TorchScript model is saved by MLflow with
``torch.jit.save``, so loading it needs neither this project nor pickled Python classes. The bundle folder itself
is logged under the run's artifacts ``bundle/<name>/``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path

import mlflow
import numpy as np
import torch

from pipeline.tracking import tracking_uri


@contextlib.contextmanager
def _tracking(uri: str, experiment_id: str):
    """``MLFLOW_TRACKING_URI`` and ``MLFLOW_EXPERIMENT_ID`` set for the block: MLflow's model logging resolves the
    store, and the experiment its logged model belongs to, from them (else the model lands in ``Default``)."""
    wanted = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_ID": str(experiment_id)}
    previous = {k: os.environ.get(k) for k in (*wanted, "MLFLOW_EXPERIMENT_NAME")}
    os.environ.pop("MLFLOW_EXPERIMENT_NAME", None)  # it would override the id
    os.environ.update(wanted)
    try:
        yield
    finally:
        for k, v in previous.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def quiet_loggers(names, level: int = logging.ERROR):
    """The loggers ``names`` report only ``level`` and above for the block."""
    loggers = [logging.getLogger(n) for n in names]
    before = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, old in zip(loggers, before):
            lg.setLevel(old)


def input_example(in_channels: int, size: int = 64, seed: int = 0) -> np.ndarray:
    """A ``1×C×size×size`` float32 slice with values in [0, 1] (fixed seed)."""
    return np.random.default_rng(seed).random((1, in_channels, size, size), dtype=np.float32)


def log_bundle(run_id: str, bundle_dir: str | Path, model: torch.jit.ScriptModule, in_channels: int,
               uri: str | None = None) -> dict:
    """Log ``bundle_dir`` as artifacts ``bundle/<name>/`` of ``run_id`` and ``model`` as its logged model ``<name>``.

    Args:
        run_id: the MLflow run of the exported network.
        bundle_dir: the bundle folder.
        model: the shipped TorchScript model.
        in_channels: ``C`` of its input slices.
        uri: the tracking URI (default :func:`pipeline.tracking.tracking_uri`).

    Returns:
        ``{"artifact_path", "model_id", "model_uri"}``.
    """
    uri = uri or tracking_uri()
    bundle_dir = Path(bundle_dir)
    client = mlflow.MlflowClient(tracking_uri=uri)
    artifact_path = f"bundle/{bundle_dir.name}"
    client.log_artifacts(run_id, str(bundle_dir), artifact_path)
    requirements = [f"torch=={torch.__version__.split('+')[0]}"]  # a TorchScript model needs nothing else
    # quiet: mlflow.pytorch warns about pickled Python models, but a TorchScript model is saved with torch.jit.save
    experiment_id = client.get_run(run_id).info.experiment_id
    with _tracking(uri, experiment_id), quiet_loggers(["mlflow.pytorch"]), warnings.catch_warnings():
        # MLflow checks the input example by loading the model with torch.load, which finds a TorchScript archive
        warnings.filterwarnings("ignore", message=".*looks like a TorchScript archive.*")
        info = mlflow.pytorch.log_model(
            model, name=bundle_dir.name, input_example=input_example(in_channels), pip_requirements=requirements,
            serialization_format="pickle", metadata={"bundle": artifact_path}, run_id=run_id,
        )
    return {"artifact_path": artifact_path, "model_id": info.model_id, "model_uri": info.model_uri}
