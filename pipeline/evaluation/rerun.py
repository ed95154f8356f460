"""``make evaluate RUN=…``: evaluate a trained run again, from its saved config, split and weights, into its own
MLflow run (test metrics at the next step) and run folder."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import torch
from monai.bundle import ConfigParser
from monai.utils import set_determinism

from pipeline.checkpoints import LAST
from pipeline.config import apply_overrides
from pipeline.data.prepare import prepare_data
from pipeline.evaluation.evaluate import evaluate_trained
from pipeline.evaluation.settings import evaluation_settings
from pipeline.runs import check_trusted, load_weights, next_step, resolve_run
from pipeline.tracking import RunTracker, tracking_uri
from pipeline.tracking_store import mask_uri


def evaluate_run(run: str, overrides: Mapping | None = None, quiet: bool = False,
                 runs_root: str | Path | None = None, trust: bool = False) -> dict:
    """``make evaluate RUN=…``: rebuild a trained run's network and data from its saved config, load its best
    weights, evaluate on the test volumes and log everything into the same MLflow run.

    Args:
        run: an MLflow run id (or run name), a run folder ``runs/<name>``, or a checkpoint file (its run folder is
            the folder above ``checkpoints/``). A run folder that no MLflow run records gets a new MLflow run
            (with ``trust`` only).
        overrides: config overrides (``{"evaluation::noise::sigmas": []}``); ``evaluation`` settings missing from an
            older run's config take their defaults.
        runs_root: where a run folder that is gone is restored from MLflow (default: ``runs/`` of the repository).
        trust: read the run folder's ``config.yaml`` (code: its ``$`` expressions run) even when the tracking store
            did not record it (a folder from elsewhere; :func:`pipeline.runs.check_trusted`).

    Returns:
        what :func:`pipeline.evaluation.evaluate.evaluate_trained` returns, plus ``run_id``, ``run_dir``,
        ``checkpoint``, ``how``, ``step``.

    Raises:
        pipeline.runs.UntrustedRunConfig: the config was not recorded by this store and ``trust`` is not set.
    """
    uri = tracking_uri()
    found = resolve_run(run, uri, Path(runs_root) if runs_root else None)
    run_dir, checkpoint = Path(found["run_dir"]), Path(found["checkpoint"])
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"no config.yaml in the run folder {run_dir}: cannot rebuild the network and data")
    check_trusted(run_dir, found["run_id"], uri, trust)  # its `$` expressions are code
    parser = ConfigParser()
    parser.read_config(str(config))
    parser["evaluation"] = evaluation_settings(parser.get("evaluation") if "evaluation" in parser.get() else None)
    if (run_dir / "splits.json").is_file():
        parser["split_file"] = str(run_dir / "splits.json")  # exactly the run's split
    apply_overrides(parser, overrides, "the run's config")
    settings = evaluation_settings(parser["evaluation"])
    set_determinism(seed=int(parser.get_parsed_content("seed")))

    data = prepare_data(parser)
    network = parser.get_parsed_content("network")
    load_weights(network, checkpoint)
    last = run_dir / "checkpoints" / LAST
    last_state = torch.load(last, map_location="cpu", weights_only=True).get("network") if last.is_file() else None

    created = found["run_id"] is None
    if created:  # a run folder no MLflow run records: a new run of its own, ended by the `with` below
        names = {k: parser.get(f"{k}_name", "?") for k in ("dataset", "loss", "backbone")}
        tracker = RunTracker(parser.get("experiment_name", "mbls"), f"{run_dir.name}-eval",
                             tags={**names, "evaluated_checkpoint": str(checkpoint)})
        tracker.log_params({**names, "run_dir": str(run_dir), "checkpoint": str(checkpoint)})
        tracker.log_artifact(config)
        found["how"] += f"; created MLflow run {tracker.run_id} ({run_dir.name}-eval)"
    else:  # the training's own run: its status stays what the training left
        tracker = RunTracker.resume(found["run_id"], uri)
    with tracker:
        step = next_step(tracker.client, tracker.run_id)
        if not quiet:
            print(mask_uri(found["how"]), flush=True)
            print(f"weights: {checkpoint}", flush=True)
        out = evaluate_trained(parser, network, data, run_dir, tracker, step=step, checkpoint=checkpoint,
                               settings=settings, last_state=last_state, quiet=quiet)
        tracker.set_tags({"evaluated_checkpoint": str(checkpoint), "evaluation_step": step,
                          "evaluated_at": time.strftime("%Y-%m-%d %H:%M:%S")})
    out.update(run_id=tracker.run_id, run_dir=run_dir, checkpoint=checkpoint, how=found["how"], step=step,
               created_run=created)
    return out
