"""Trained runs on disk and in MLflow: find a run's folder, its weights and its MLflow run; load the weights.

A run is named by an MLflow run id or run name, a run folder ``runs/<name>``, or a checkpoint file inside one.

A run folder's ``config.yaml`` is code: its ``$`` expressions run as Python when it is read. :func:`check_trusted`
lets a command read it only when it is the config the tracking store's MLflow run of that folder holds (the copy
logged when this store's training started it), or after an explicit ``--trust``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import mlflow
import torch
from mlflow.exceptions import MlflowException

from pipeline.config import REPO_ROOT
from pipeline.tracking import tracking_uri


def load_weights(network: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load a checkpoint written by the trainer (a bare state dict or ``{"network": state dict}``)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "network" in state and isinstance(state["network"], dict):
        state = state["network"]
    network.load_state_dict(state)


def find_checkpoint(run_dir: Path) -> Path:
    """The newest best-weights file (``checkpoints/best*.pt``) of a run folder; raises naming what is there."""
    folder = run_dir / "checkpoints"
    best = sorted(folder.glob("best*.pt"), key=lambda p: p.stat().st_mtime)
    if best:
        return best[-1]
    there = sorted(p.name for p in folder.glob("*")) if folder.is_dir() else []
    raise FileNotFoundError(
        f"no best checkpoint (best*.pt) in {folder}; found {there or 'nothing'}. Pass a checkpoint file as RUN to "
        "evaluate other weights.")


def _runs_with_dir(client, run_dir: Path) -> list:
    out = []
    for exp in client.search_experiments():
        for value in {str(run_dir), str(run_dir.resolve())}:
            out += client.search_runs([exp.experiment_id], filter_string=f"params.run_dir = '{value}'")
    seen, unique = set(), []
    for r in out:
        if r.info.run_id not in seen:
            seen.add(r.info.run_id)
            unique.append(r)
    return unique


def resolve_run(run: str, uri: str | None = None, runs_root: Path | None = None) -> dict:
    """Find the run folder, the weights and the MLflow run of ``run`` (an MLflow run id or name, a run folder, or
    a checkpoint file).

    An MLflow run whose folder is gone is restored from its artifacts (``config.yaml``, ``splits.json``,
    ``checkpoints/``) into ``runs_root/<run name>``.

    Returns:
        ``{"run_dir", "checkpoint", "run_id" (None when no MLflow run records the folder), "how"}`` (``how`` says
        in words what was found).

    Raises:
        FileNotFoundError: nothing matches ``run``, no config.yaml or no checkpoint.
    """
    uri = uri or tracking_uri()
    client = mlflow.MlflowClient(tracking_uri=uri)
    path = Path(run).expanduser()
    if path.exists():
        if path.is_file():
            checkpoint = path.resolve()
            run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
        else:
            run_dir = path.resolve()
            checkpoint = find_checkpoint(run_dir)
        found = _runs_with_dir(client, run_dir)
        if found:
            found.sort(key=lambda r: r.info.start_time or 0)
            return {"run_dir": run_dir, "checkpoint": checkpoint, "run_id": found[-1].info.run_id,
                    "how": f"MLflow run {found[-1].info.run_id} records the run folder {run_dir}"}
        return {"run_dir": run_dir, "checkpoint": checkpoint, "run_id": None,
                "how": f"no MLflow run in {uri} records the run folder {run_dir}"}
    try:
        mlrun = client.get_run(str(run))
    except MlflowException:
        matches = []
        for exp in client.search_experiments():
            matches += client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{run}'")
        if not matches:
            raise FileNotFoundError(
                f"RUN '{run}' is neither an existing checkpoint file or run folder nor an MLflow run id or run name "
                f"in {uri}") from None
        if len(matches) > 1:
            raise ValueError(f"{len(matches)} MLflow runs are named '{run}'; pass the run id instead: "
                             + ", ".join(r.info.run_id for r in matches)) from None
        mlrun = matches[0]
    run_id = mlrun.info.run_id
    recorded = mlrun.data.params.get("run_dir")
    run_dir = Path(recorded) if recorded else None
    how = f"MLflow run {run_id}"
    if run_dir is None or not (run_dir / "config.yaml").is_file():
        run_dir = Path(runs_root or REPO_ROOT / "runs") / (mlrun.info.run_name or run_id)
        run_dir.mkdir(parents=True, exist_ok=True)
        for artifact in ("config.yaml", "splits.json", "checkpoints"):
            try:
                client.download_artifacts(run_id, artifact, str(run_dir))
            except (MlflowException, OSError):
                pass
        how += f"; its run folder {recorded} is missing, restored from its artifacts into {run_dir}"
    return {"run_dir": run_dir, "checkpoint": find_checkpoint(run_dir), "run_id": run_id, "how": how}


class UntrustedRunConfig(ValueError):
    """A run folder's ``config.yaml`` that this tracking store did not record: it is not read without ``--trust``."""


def check_trusted(run_dir: Path, run_id: str | None, uri: str | None = None, trust: bool = False) -> None:
    """Allow reading ``run_dir/config.yaml`` (which runs its ``$`` expressions) only when ``trust`` is set or when it
    is byte for byte the ``config.yaml`` artifact of the MLflow run ``run_id`` in the store ``uri``: the store is
    this machine's record of the runs it trained, so a folder from elsewhere (or a config edited since) is refused.

    Raises:
        UntrustedRunConfig: naming the file, why it is not trusted, and the flag that runs it anyway.
    """
    if trust:
        return
    config = Path(run_dir) / "config.yaml"
    reason = None
    if run_id is None:
        reason = "no MLflow run of this tracking store records the folder"
    else:
        with tempfile.TemporaryDirectory(prefix="mbls-config-") as tmp:
            try:
                logged = Path(mlflow.MlflowClient(tracking_uri=uri or tracking_uri()).download_artifacts(
                    run_id, "config.yaml", tmp))
                if logged.read_bytes() != config.read_bytes():
                    reason = f"it differs from the config.yaml its MLflow run {run_id} logged when it was trained"
            except (MlflowException, OSError):
                reason = f"its MLflow run {run_id} holds no config.yaml artifact to compare it with"
    if reason:
        raise UntrustedRunConfig(
            f"{config} is not a config this machine's MLflow store recorded ({reason}). A run folder's config.yaml is "
            "code: its `$` expressions run as Python when it is read. Read it first; if you trust it, repeat the "
            "command with --trust (make … ARGS=\"--trust\")")


def next_step(client, run_id: str) -> int:
    """The MLflow step of a run's next test evaluation (0 at training, then one more per re-evaluation)."""
    history = client.get_metric_history(run_id, "test/dsc")
    return 1 + max((m.step for m in history), default=-1)
