"""``run_training``: the whole path from a config to a trained, evaluated and logged model.

data (source → validation → split → cached volumes → 2D slices) → network → loss → Ignite trainer with
validation, best-checkpoint and MLflow handlers → test evaluation (``pipeline.evaluate.evaluate_trained``:
post-hoc calibration, metrics, analyses, reports) → table, files, MLflow.
"""

from __future__ import annotations

import logging
import math
import sys
import time
import uuid
from pathlib import Path

from pipeline.data.prepare import prepare_data
from pipeline.io import write_json_atomic

log = logging.getLogger("pipeline")


def run_training(parser, run_name: str | None = None, quiet: bool = False) -> dict:
    """Train, validate, test and log one run described by ``parser`` (a MONAI ``ConfigParser``).

    Returns:
        ``{"run_id", "run_dir", "results", "table", "best_checkpoint"}``.
    """
    from ignite.engine import Events
    from ignite.handlers import ProgressBar
    from monai.bundle import ConfigParser
    from monai.handlers import CheckpointSaver
    from monai.utils import set_determinism

    from pipeline.data.loading import train_loader, volume_loader
    from pipeline.engines import create_evaluator, create_trainer
    from pipeline.evaluate import evaluate_trained
    from pipeline.runs import best_checkpoint, load_weights
    from pipeline.tracking import RunTracker, flatten, git_commit

    def value(key: str):
        return parser.get_parsed_content(key)

    seed = int(value("seed"))
    set_determinism(seed=seed)
    names = {k: parser[f"{k}_name"] for k in ("dataset", "loss", "backbone")}
    run_name = run_name or "-".join([*names.values(), time.strftime("%Y%m%d-%H%M%S"), uuid.uuid4().hex[:4]])

    data = prepare_data(parser)
    dataset = data["dataset"]
    class_names = list(dataset["class_names"])
    slice_axis = int(dataset["slice_axis"])
    regions = dict(dataset.get("eval_regions") or {})  # e.g. BraTS: DSC/ASD on ET/TC/WT, not the training classes
    device = parser.get_parsed_content("device")
    epochs = int(value("epochs"))
    for part in ("train", "val", "test"):
        if part not in data["volumes"]:
            raise ValueError(f"the '{part}' split of the {names['dataset']} dataset is empty")

    loader = train_loader(
        data["volumes"]["train"], slice_axis, value("augment"), int(value("batch_size")), int(value("num_workers")), bool(dataset.get("skip_empty_slices", False)), seed,
    )
    network = parser.get_parsed_content("network")
    loss_fn = parser.get_parsed_content("loss").to(device)
    optimizer = parser.get_parsed_content("optimizer")
    scheduler = parser.get_parsed_content("lr_scheduler")
    amp = bool(value("amp")) and device.type == "cuda"

    run_dir = Path(value("output_dir")) / run_name
    run_dir.mkdir(parents=True, exist_ok=False)
    ConfigParser.export_config_file(parser.get(), str(run_dir / "config.yaml"), fmt="yaml", sort_keys=False)
    write_json_atomic(run_dir / "splits.json", data["split"])

    tracker = RunTracker(value("experiment_name"), run_name, tags={
        "dataset": names["dataset"], "loss": names["loss"], "backbone": names["backbone"],
    })
    params = {
        **names,
        **flatten("loss", parser.get("loss")),
        **flatten("backbone", parser.get("backbone")),
        "epochs": epochs, "seed": seed, "batch_size": value("batch_size"), "lr": value("lr"),
        "git_commit": git_commit(), "device": str(device), "amp": amp,
        "n_train_volumes": len(data["cases"]["train"]), "n_val_volumes": len(data["cases"]["val"]),
        "n_test_volumes": len(data["cases"]["test"]), "n_train_slices": len(loader.dataset),
        "class_names": ",".join(class_names), "run_dir": str(run_dir),
        "split": data["split_origin"], "cache": data["cache"],
    }
    tracker.log_params(params)
    tracker.log_artifact(run_dir / "config.yaml")
    tracker.log_artifact(run_dir / "splits.json")

    trainer = create_trainer(network, loss_fn, optimizer, loader, device, epochs, scheduler, amp)
    val_loader = volume_loader(data["volumes"]["val"])
    evaluator = create_evaluator(network, val_loader, device, len(class_names), slice_axis, prefix="val/",
                                 n_bins=int(value("n_bins")), amp=amp, regions=list(regions.values()) or None)
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

    val_every = max(1, int(value("val_interval")))
    # the bar redraws in place: only on a terminal; epoch summaries are printed either way
    pbar = ProgressBar(persist=False, desc="train", disable=quiet or not sys.stderr.isatty())
    pbar.attach(trainer, output_transform=lambda out: {"loss": float(out["loss"].detach())})

    def validate(engine) -> None:
        evaluator.run(engine.state.epoch)
        m = evaluator.state.metrics
        msg = (f"epoch {engine.state.epoch}/{epochs}: train loss {engine.state.metrics.get('train/loss', math.nan):.4f}"
               f" | val DSC {m['val/dsc']:.4f} ECE {m['val/ece']:.4f} CECE {m['val/cece']:.4f}"
               f" | best DSC {evaluator.state.best_metric:.4f} (epoch {evaluator.state.best_metric_epoch})")
        if not quiet:
            pbar.log_message(msg) if sys.stderr.isatty() else print(msg, flush=True)
        log.info(msg)

    trainer.add_event_handler(
        Events.EPOCH_COMPLETED(event_filter=lambda _, ep: ep % val_every == 0 or ep == epochs), validate
    )

    t0 = time.time()
    try:
        trainer.run()
    except BaseException:
        tracker.finish("FAILED")
        raise
    train_s = time.time() - t0

    best = best_checkpoint(best_saver)
    if best is not None:
        load_weights(network, best)
    training = {"best_val_dsc": float(evaluator.state.best_metric), "best_epoch": int(evaluator.state.best_metric_epoch),
                "train_seconds": train_s}
    tracker.log_metrics({"val/best_dsc": training["best_val_dsc"], "best_epoch": training["best_epoch"],
                         "time/train_s": train_s})
    if best is not None:
        tracker.log_artifact(best, "checkpoints")
        tracker.set_tags({"best_checkpoint": str(best)})
    try:
        out = evaluate_trained(parser, network, data, run_dir, tracker, step=0, checkpoint=best,
                               extra_summary=training, quiet=quiet)
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish()
    return {"run_id": tracker.run_id, "run_dir": run_dir, "results": out["results"], "table": out["table"],
            "posthoc_table": out["posthoc_table"], "noise_table": out["noise_table"],
            "best_checkpoint": best, "plot": out["plot"], "evaluation": out}
