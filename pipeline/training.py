"""``run_training``: the whole path from a config to a trained, evaluated and logged model.

data (source → validation → split → cached volumes → 2D slices) → network → loss → Ignite trainer with
validation, best-checkpoint and MLflow handlers → test evaluation (:func:`pipeline.evaluation.evaluate_trained`:
post-hoc calibration, metrics, analyses, reports) → table, files, MLflow.
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

from pipeline.data.loading import train_loader, volume_loader
from pipeline.data.prepare import PreparedData, data_fingerprint, prepare_data
from pipeline.engines import PeriodicValidation, create_evaluator, create_trainer
from pipeline.evaluation import evaluate_trained
from pipeline.io import write_json_atomic
from pipeline.runs import best_checkpoint, load_weights
from pipeline.tracking import RunTracker, flatten, git_commit

log = logging.getLogger("pipeline")


def run_training(parser, run_name: str | None = None, quiet: bool = False, tags: dict | None = None) -> dict:
    """Train, validate, test and log one run described by ``parser`` (a MONAI ``ConfigParser``).

    Args:
        parser: the run's merged config (:func:`pipeline.config.load_config`).
        run_name: the run folder's and MLflow run's name (default ``<dataset>-<loss>-<backbone>-<time>-<id>``).
        quiet: no progress bar and no per-validation lines.
        tags: extra MLflow tags of the run (e.g. ``mlflow.parentRunId`` for a run of a comparison).

    Returns:
        ``{"run_id", "run_dir", "results", "table", "posthoc_table", "noise_table", "best_checkpoint", "plot",
        "evaluation"}``.

    Raises:
        ValueError: an empty train, val or test split.
        FileExistsError: a run folder of that name exists.
    """

    def value(key: str):
        return parser.get_parsed_content(key)

    seed = int(value("seed"))
    set_determinism(seed=seed)
    names = {k: parser[f"{k}_name"] for k in ("dataset", "loss", "backbone")}
    run_name = run_name or "-".join([*names.values(), time.strftime("%Y%m%d-%H%M%S"), uuid.uuid4().hex[:4]])

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

    run_dir = Path(value("output_dir")) / run_name
    run_dir.mkdir(parents=True, exist_ok=False)
    ConfigParser.export_config_file(parser.get(), str(run_dir / "config.yaml"), fmt="yaml", sort_keys=False)
    write_json_atomic(run_dir / "splits.json", data.split)

    with RunTracker(value("experiment_name"), run_name, tags={**names, **(tags or {})}) as tracker:
        tracker.log_params(_params(parser, names, data, loader, run_dir, device, amp))
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
        CheckpointSaver(
            save_dir=str(run_dir / "checkpoints"), save_dict={"network": network, "optimizer": optimizer},
            save_final=True, final_filename="last.pt",
        ).attach(trainer)
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

        t0 = time.time()
        trainer.run()
        train_s = time.time() - t0

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
