"""``run_training``: the whole path from a config to a trained, evaluated and logged model.

data (source → validation → split → cached volumes → 2D slices) → network → loss → Ignite trainer with
validation, best-checkpoint and MLflow handlers → test evaluation (:func:`pipeline.evaluation.evaluate_trained`:
post-hoc calibration, metrics, analyses, reports) → table, files, MLflow.

Under torchrun the same function runs in every process (:mod:`pipeline.distributed`): each trains on its share of
the slices, rank 0 alone keeps the run folder, the MLflow run and the checkpoints, and evaluates. A run folder
that exists is continued from its ``checkpoints/last.pt`` in the same MLflow run (:mod:`pipeline.resume`,
:mod:`pipeline.checkpoints`); SIGTERM stops the run cleanly (MLflow status KILLED, the last checkpoint kept).
"""

from __future__ import annotations

import logging
import sys
import time
import uuid
from contextlib import nullcontext
from pathlib import Path

import torch
from ignite.handlers import ProgressBar
from monai.bundle import ConfigParser
from monai.utils import set_determinism

from pipeline.accelerator import amp_dtype, configure_amp, to_channels_last
from pipeline.checkpoints import LAST, BestWeights, TrainingCheckpoint, stop_on_sigterm
from pipeline.collectives import barrier
from pipeline.config import check_training_values
from pipeline.data.prepare import PreparedData, data_fingerprint, prepare_data, split_cases
from pipeline.distributed import DistributedRun, NullTracker
from pipeline.engines import PeriodicValidation, create_evaluator, create_trainer
from pipeline.evaluation import evaluate_trained
from pipeline.io import write_json_atomic
from pipeline.params import protocol_params, resolved_params
from pipeline.resume import plan_run, write_record
from pipeline.runs import load_weights
from pipeline.tracking import git_commit, tracking_uri
from pipeline.tracking_store import check_store

log = logging.getLogger("pipeline")


def run_training(parser, run_name: str | None = None, quiet: bool = False, tags: dict | None = None) -> dict:
    """Train, validate, test and log one run described by ``parser`` (a MONAI ``ConfigParser``).

    Args:
        parser: the run's merged config (:func:`pipeline.config.load_config`).
        run_name: the run folder's and MLflow run's name (default ``<dataset>-<loss>-<backbone>-<time>-<id>``).
            An existing run folder ``<output_dir>/<run_name>`` is resumed (same config required).
        quiet: no progress bar and no per-validation lines.
        tags: extra MLflow tags of the run (e.g. ``mlflow.parentRunId`` for a run of a comparison).

    Returns:
        ``{"run_id", "run_dir", "primary", "results", "table", "posthoc_table", "noise_table", "best_checkpoint",
        "plot", "evaluation"}``; a torchrun process other than rank 0 returns ``{"run_id": None, "run_dir",
        "primary": False}`` after training.

    Raises:
        ValueError: an empty train, val or test split; a run to resume whose config or split differs.
        FileExistsError: a run folder of that name that is not a run's, or whose run finished.
        pipeline.tracking_store.TrackingStoreError: the tracking store cannot take the run (before any data work).
        pipeline.checkpoints.TrainingTerminated: SIGTERM stopped the run (its MLflow run is marked KILLED).
    """

    def value(key: str):
        return parser.get_parsed_content(key)

    check_training_values(parser)  # a bad number fails now, before any folder, MLflow run or data work
    seed = int(value("seed"))
    set_determinism(seed=seed)
    names = {k: parser[f"{k}_name"] for k in ("dataset", "loss", "backbone")}
    run_name = run_name or default_run_name(parser)
    # joins torchrun's processes (one process: a plain run)
    dist = DistributedRun.start(value("device"), parser.get_parsed_content("distributed_timeout", default=30))
    run_name, quiet = dist.same_text(run_name), quiet or not dist.is_primary
    uri = tracking_uri()
    start = None
    if dist.is_primary:
        check_store(uri)  # a store that cannot take the run fails now, in seconds, before any data work
        start = plan_run(parser.get(), Path(value("output_dir")) / run_name, uri)  # new, or resumed in its folder
    # every process continues from the same checkpoint (rank 0 decides)
    resume_from = dist.same_text(str(start.checkpoint) if start is not None and start.checkpoint else "")
    dist.rank_zero_first(lambda: split_cases(parser))  # a source writing its files on first use (mni) writes once

    data = prepare_data(parser, dist.share, dist.local_world_size)
    device = value("device")
    epochs = int(value("epochs"))
    for part in ("train", "val", "test"):
        if not data.cases[part]:
            raise ValueError(f"the '{part}' split of the {names['dataset']} dataset is empty")

    loader = dist.train_loader(data.volumes["train"], data.slice_axis, value("augment"), int(value("batch_size")),
                               int(value("num_workers")), bool(data.dataset.get("skip_empty_slices", False)), seed,
                               device)
    channels_last = bool(parser.get_parsed_content("channels_last", default=False)) and device.type == "cuda"
    network = to_channels_last(value("network"), channels_last)
    loss_fn = value("loss").to(device)
    optimizer = value("optimizer")
    scheduler = value("lr_scheduler")
    amp = bool(value("amp")) and device.type == "cuda"

    run_dir = start.run_dir if start is not None else (Path(value("output_dir")) / run_name).resolve()
    tracker = NullTracker()
    if start is not None:
        start.check_split(data.split)
        if not start.resume:
            start.create()
            ConfigParser.export_config_file(parser.get(), str(run_dir / "config.yaml"), fmt="yaml",
                                            sort_keys=False)
            write_json_atomic(run_dir / "splits.json", data.split)
        tracker = start.open_tracker(value("experiment_name"), run_name, {**names, **(tags or {})}, uri)
        if start.resume:
            tracker.skip_logged_steps()  # the epochs done again after the last checkpoint: one value per step
    with tracker, start or nullcontext(), stop_on_sigterm():
        tracker.log_params({**_params(parser, names, data, loader, run_dir, device, amp), **dist.params()},
                           skip_logged=start is not None and start.resume)
        tracker.log_dataset(names["dataset"], data_fingerprint(parser), str(value("data_dir")))
        tracker.log_artifact(run_dir / "config.yaml")
        tracker.log_artifact(run_dir / "splits.json")

        barrier()  # the run folder and the MLflow run exist before any process trains
        unused = bool(parser.get_parsed_content("find_unused_parameters", default=False))  # a backbone's flag
        trainer = create_trainer(dist.wrap(network, seed, unused), loss_fn, optimizer, loader, device, epochs,
                                 scheduler, amp)
        evaluator = create_evaluator(network, dist.validation_loader(data.volumes.get("val")), device,
                                     len(data.class_names), data.slice_axis, prefix="val/", amp=amp,
                                     n_bins=int(value("n_bins")), regions=list(data.regions.values()) or None)
        dist.attach(trainer, evaluator, network)
        if amp:
            configure_amp(amp_dtype(device), trainer)
        best_saver = BestWeights(run_dir / "checkpoints", network, "val/dsc")
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

        def announce(line: str) -> None:  # how the run starts: printed even when quiet, by rank 0
            if dist.is_primary:
                print(line, file=sys.stderr, flush=True)
            log.info(line)

        PeriodicValidation(evaluator, int(value("val_interval")), epochs, report).attach(trainer)
        checkpoint = TrainingCheckpoint(  # the last of the epoch's handlers: it saves the epoch as finished
            run_dir / "checkpoints" / LAST, network, optimizer, scheduler, evaluator, best_saver,
            getattr(loader, "generator", None), getattr(loader.dataset, "transform", None),
            int(value("checkpoint_interval")), loss_fn)
        checkpoint.attach(trainer)  # every process: each one's random states are kept; rank 0 writes
        if resume_from:
            done = checkpoint.load(trainer, resume_from)["epoch"]
            announce(f"resumed {run_dir.name} from {resume_from}: epochs 1-{done} of {epochs} were done, "
                     + (f"continuing with epoch {done + 1}" if done < epochs else "continuing with the evaluation"))
            if checkpoint.warning:
                announce(f"warning: {checkpoint.warning}")
        elif start is not None and start.resume:
            announce(f"restarting {run_dir.name} from epoch 1: it stopped before its first checkpoint "
                     f"({run_dir / 'checkpoints' / LAST} is written every {checkpoint.interval} epoch(s)); the "
                     "epochs it logged are not logged again")
        if dist.is_primary:
            checkpoint.tidy()  # best-weights files last.pt does not name, temporary files of interrupted writes

        if trainer.state.epoch < epochs:
            trainer.run()
        train_s = checkpoint.train_seconds()
        if not dist.finish_training():  # rank 0 alone goes on to post-hoc fitting, test evaluation and reports
            return {"run_id": None, "run_dir": run_dir, "primary": False}

        best = best_saver.path
        last_state = {k: v.detach().clone() for k, v in network.state_dict().items()}  # the last epoch's weights
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
                               extra_summary=training, last_state=last_state, quiet=quiet)
        write_record(run_dir, finished=time.strftime("%Y-%m-%d %H:%M:%S"))
    return {"run_id": tracker.run_id, "run_dir": run_dir, "primary": True, "results": out["results"],
            "table": out["table"], "posthoc_table": out["posthoc_table"], "noise_table": out["noise_table"],
            "best_checkpoint": best, "plot": out["plot"], "evaluation": out}


def default_run_name(parser) -> str:
    """A new run's name: ``<dataset>-<loss>-<backbone>-<date>-<time>-<4 hex digits>``."""
    names = [parser[f"{k}_name"] for k in ("dataset", "loss", "backbone")]
    return "-".join([*names, time.strftime("%Y%m%d-%H%M%S"), uuid.uuid4().hex[:4]])


def _params(parser, names: dict, data: PreparedData, loader, run_dir: Path, device, amp: bool) -> dict:
    """The MLflow parameters of a training run: references resolved, each loss parameter also under the loss's
    own name, and the training protocol."""
    loss_params = resolved_params(parser, "loss")
    return {
        **names,
        **loss_params,
        **{f"{names['loss']}.{k[len('loss.'):]}": v for k, v in loss_params.items()
           if k != "loss.name"},  # unambiguous: mbls.alpha is MbLS's weight, ls.alpha LS's smoothing
        **resolved_params(parser, "backbone"),
        **protocol_params(parser),
        "epochs": int(parser.get_parsed_content("epochs")), "seed": int(parser.get_parsed_content("seed")),
        "batch_size": parser.get_parsed_content("batch_size"), "lr": parser.get_parsed_content("lr"),
        "git_commit": git_commit(), "device": str(device), "amp": amp,
        "n_train_volumes": len(data.cases["train"]), "n_val_volumes": len(data.cases["val"]),
        "n_test_volumes": len(data.cases["test"]), "n_train_slices": len(loader.dataset),
        "class_names": ",".join(data.class_names), "run_dir": str(run_dir),
        "split": data.split_origin, "cache": data.cache, "torch_threads": torch.get_num_threads(),
    }
