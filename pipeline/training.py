"""``run_training``: the whole path from a config to a trained, evaluated and logged model.

data (source → validation → split → cached volumes → 2D slices) → network → loss → Ignite trainer with
validation, best-checkpoint and MLflow handlers → test evaluation (:func:`pipeline.evaluation.evaluate_trained`:
post-hoc calibration, metrics, analyses, reports) → table, files, MLflow.

A run folder that exists is continued from its ``checkpoints/last.pt`` in the same MLflow run (:mod:`pipeline.resume`,
:mod:`pipeline.checkpoints`); SIGTERM stops the run cleanly (MLflow status KILLED, the last checkpoint kept).
"""

from __future__ import annotations

import logging
import sys
import time
import uuid
from pathlib import Path

import torch
from ignite.handlers import ProgressBar
from monai.bundle import ConfigParser
from monai.handlers import CheckpointSaver
from monai.utils import set_determinism

from pipeline.checkpoints import LAST, TrainingCheckpoint, stop_on_sigterm
from pipeline.data.loading import train_loader, volume_loader
from pipeline.data.prepare import PreparedData, data_fingerprint, prepare_data
from pipeline.engines import PeriodicValidation, create_evaluator, create_trainer
from pipeline.evaluation import evaluate_trained
from pipeline.io import write_json_atomic
from pipeline.resume import plan_run, write_record
from pipeline.runs import best_checkpoint, load_weights
from pipeline.tracking import flatten, git_commit, tracking_uri
from pipeline.tracking_store import check_store

log = logging.getLogger("pipeline")


def run_training(parser, run_name: str | None = None, quiet: bool = False, tags: dict | None = None) -> dict:
    """Train, validate, test and log one run described by ``parser`` (a MONAI ``ConfigParser``).

    Args:
        parser: the run's merged config (:func:`pipeline.config.load_config`).
        run_name: the run folder's and MLflow run's name (default ``<dataset>-<loss>-<backbone>-<time>-<id>``).
        quiet: no progress bar and no per-validation lines.
        tags: extra MLflow tags of the run (e.g. ``mlflow.parentRunId`` for a run of a comparison).
            An existing run folder ``<output_dir>/<run_name>`` is resumed (same config required).

    Returns:
        ``{"run_id", "run_dir", "results", "table", "posthoc_table", "noise_table", "best_checkpoint", "plot",
        "evaluation"}``.

    Raises:
        ValueError: an empty train, val or test split; a run to resume whose config or split differs.
        FileExistsError: a run folder of that name that is not a run's, or whose run finished.
        pipeline.tracking_store.TrackingStoreError: the tracking store cannot take the run (before any data work).
        pipeline.checkpoints.TrainingTerminated: SIGTERM stopped the run (its MLflow run is marked KILLED).
    """

    def value(key: str):
        return parser.get_parsed_content(key)

    seed = int(value("seed"))
    set_determinism(seed=seed)
    names = {k: parser[f"{k}_name"] for k in ("dataset", "loss", "backbone")}
    run_name = run_name or "-".join([*names.values(), time.strftime("%Y%m%d-%H%M%S"), uuid.uuid4().hex[:4]])
    uri = tracking_uri()
    check_store(uri)  # a store that cannot take the run fails now, in seconds, before any data work
    start = plan_run(parser.get(), Path(value("output_dir")) / run_name, uri)  # new, or resumed in its folder

    data = prepare_data(parser)
    device = value("device")
    epochs = int(value("epochs"))
    for part in ("train", "val", "test"):
        if part not in data.volumes:
            raise ValueError(f"the '{part}' split of the {names['dataset']} dataset is empty")

    loader = train_loader(data.volumes["train"], data.slice_axis, value("augment"), int(value("batch_size")),
                          int(value("num_workers")), bool(data.dataset.get("skip_empty_slices", False)), seed)
    network = value("network")
    loss_fn = value("loss").to(device)
    optimizer = value("optimizer")
    scheduler = value("lr_scheduler")
    amp = bool(value("amp")) and device.type == "cuda"

    run_dir = start.run_dir
    start.check_split(data.split)
    if not start.resume:
        start.create()
        ConfigParser.export_config_file(parser.get(), str(run_dir / "config.yaml"), fmt="yaml", sort_keys=False)
        write_json_atomic(run_dir / "splits.json", data.split)

    tracker = start.open_tracker(value("experiment_name"), run_name, {**names, **(tags or {})}, uri)
    with tracker, start, stop_on_sigterm():
        tracker.log_params(_params(parser, names, data, loader, run_dir, device, amp), skip_logged=start.resume)
        tracker.log_dataset(names["dataset"], data_fingerprint(parser), str(value("data_dir")))
        tracker.log_artifact(run_dir / "config.yaml")
        tracker.log_artifact(run_dir / "splits.json")

        trainer = create_trainer(network, loss_fn, optimizer, loader, device, epochs, scheduler, amp)
        evaluator = create_evaluator(network, volume_loader(data.volumes["val"]), device, len(data.class_names),
                                     data.slice_axis, prefix="val/", amp=amp, n_bins=int(value("n_bins")),
                                     regions=list(data.regions.values()) or None)
        best_saver = CheckpointSaver(
            save_dir=str(run_dir / "checkpoints"), save_dict={"network": network}, save_key_metric=True,
            key_metric_name="val/dsc", key_metric_n_saved=1, file_prefix="best",
        )
        best_saver.attach(evaluator)
        tracker.engine_handler().attach(trainer)
        tracker.engine_handler().attach(evaluator)
        # the bar redraws in place: only on a terminal; validation lines are printed either way
        pbar = ProgressBar(persist=False, desc="train", disable=quiet or not sys.stderr.isatty())
        pbar.attach(trainer, output_transform=lambda out: {"loss": float(out["loss"].detach())})

        def report(line: str) -> None:
            if not quiet:
                pbar.log_message(line) if sys.stderr.isatty() else print(line, flush=True)
            log.info(line)

        PeriodicValidation(evaluator, int(value("val_interval")), epochs, report).attach(trainer)
        checkpoint = TrainingCheckpoint(  # last of the epoch's handlers: saves the epoch as finished
            run_dir / "checkpoints" / LAST, network, optimizer, scheduler, evaluator, best_saver, loader.generator,
            loader.dataset.transform, int(value("checkpoint_interval")))
        checkpoint.attach(trainer)
        if start.checkpoint is not None:
            done = checkpoint.load(trainer, start.checkpoint)["epoch"]
            report(f"resumed {run_dir.name} after epoch {done}/{epochs} from {start.checkpoint}")

        if trainer.state.epoch < epochs:
            trainer.run()
        train_s = checkpoint.train_seconds()

        best = best_checkpoint(best_saver)
        if best is not None:
            load_weights(network, best)
        training = {"best_val_dsc": float(evaluator.state.best_metric),
                    "best_epoch": int(evaluator.state.best_metric_epoch), "train_seconds": train_s}
        tracker.log_metrics({"val/best_dsc": training["best_val_dsc"], "best_epoch": training["best_epoch"],
                             "time/train_s": train_s})
        if best is not None:
            tracker.log_artifact(best, "checkpoints")
            tracker.set_tags({"best_checkpoint": str(best)})
        out = evaluate_trained(parser, network, data, run_dir, tracker, step=0, checkpoint=best,
                               extra_summary=training, quiet=quiet)
        write_record(run_dir, finished=time.strftime("%Y-%m-%d %H:%M:%S"))
    return {"run_id": tracker.run_id, "run_dir": run_dir, "results": out["results"], "table": out["table"],
            "posthoc_table": out["posthoc_table"], "noise_table": out["noise_table"],
            "best_checkpoint": best, "plot": out["plot"], "evaluation": out}


def _params(parser, names: dict, data: PreparedData, loader, run_dir: Path, device, amp: bool) -> dict:
    """The MLflow parameters of a training run."""
    return {
        **names,
        **flatten("loss", parser.get("loss")),
        **flatten("backbone", parser.get("backbone")),
        "epochs": int(parser.get_parsed_content("epochs")), "seed": int(parser.get_parsed_content("seed")),
        "batch_size": parser.get_parsed_content("batch_size"), "lr": parser.get_parsed_content("lr"),
        "git_commit": git_commit(), "device": str(device), "amp": amp,
        "n_train_volumes": len(data.cases["train"]), "n_val_volumes": len(data.cases["val"]),
        "n_test_volumes": len(data.cases["test"]), "n_train_slices": len(loader.dataset),
        "class_names": ",".join(data.class_names), "run_dir": str(run_dir),
        "split": data.split_origin, "cache": data.cache, "torch_threads": torch.get_num_threads(),
    }
