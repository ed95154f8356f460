"""Ignite engines: MONAI's ``SupervisedTrainer`` on 2D slices and ``SupervisedEvaluator`` on whole 3D volumes.

The evaluator runs the 2D network slice by slice over each volume (:class:`SliceBatchInferer`), keeps the softmax
probabilities under ``prob`` for the calibration metrics and turns ``pred``/``label`` into one-hot masks for DSC
and ASD.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from ignite.engine import Engine, Events
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import LrScheduleHandler, from_engine
from monai.inferers import Inferer, SimpleInferer
from monai.transforms import Activationsd, AsDiscreted, Compose, CopyItemsd

from pipeline.metrics.calibration import CalibrationMetrics
from pipeline.metrics.segmentation import asd_handler, dice_handler
from pipeline.tensors import check_slice_axis


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class SliceBatchInferer(Inferer):
    """Run a 2D network over every slice of ``B×C×X×Y×Z`` volumes along ``spatial_dim``, ``sw_batch_size`` slices
    at a time, and stack the outputs back into ``B×K×X×Y×Z``.

    The same result as MONAI's ``SliceInferer`` with a whole-slice ROI, without its per-slice sliding-window
    bookkeeping. The network must accept any slice size (the base config pads to its stride).

    Args:
        spatial_dim: the spatial axis (0, 1 or 2) along which to slice.
        sw_batch_size: slices per forward pass.
    """

    def __init__(self, spatial_dim: int = 2, sw_batch_size: int = 32) -> None:
        super().__init__()
        self.spatial_dim = check_slice_axis(spatial_dim)
        self.sw_batch_size = sw_batch_size

    def __call__(self, inputs: torch.Tensor, network: Callable, *args, **kwargs) -> torch.Tensor:
        if inputs.ndim != 5:
            raise ValueError(f"expected volumes B×C×X×Y×Z, got shape {tuple(inputs.shape)}")
        x = inputs.as_tensor() if hasattr(inputs, "as_tensor") else inputs
        axis = self.spatial_dim + 2
        b, c = x.shape[:2]
        moved = x.movedim(axis, 1)  # B×S×C×H×W
        n_slices = moved.shape[1]
        flat = moved.reshape(b * n_slices, c, *moved.shape[3:])
        outs = [network(flat[i : i + self.sw_batch_size], *args, **kwargs) for i in range(0, len(flat), self.sw_batch_size)]
        out = torch.cat(outs, 0)
        out = out.reshape(b, n_slices, *out.shape[1:]).movedim(1, axis)
        if hasattr(inputs, "meta"):
            from monai.data import MetaTensor

            out = MetaTensor(out, meta=inputs.meta, applied_operations=list(getattr(inputs, "applied_operations", [])))
        return out


class EpochAverages:
    """Per-epoch means of the training loss, of the loss's parts (``loss.parts``) and the learning rate, put in
    ``engine.state.metrics`` as ``train/loss``, ``train/<part>`` and ``train/lr`` at each epoch's end.

    Also stops training with :class:`NonFiniteLossError` at the first NaN or infinite loss, naming the epoch and
    iteration; checkpoints already written are kept.
    """

    def __init__(self, loss_fn: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.loss_fn = loss_fn
        self.optimizer = optimizer

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._update)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._complete)

    def _reset(self, engine: Engine) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0

    def _update(self, engine: Engine) -> None:
        loss = float(engine.state.output["loss"].detach())
        if not math.isfinite(loss):
            raise NonFiniteLossError(
                f"the training loss ({type(self.loss_fn).__name__}) is {loss} at epoch {engine.state.epoch}, "
                f"iteration {engine.state.iteration}; training stopped (checkpoints already written are kept). "
                "Lower the learning rate, check the data for NaN values, or try amp=false."
            )
        values = {"loss": loss, **{k: float(v) for k, v in getattr(self.loss_fn, "parts", {}).items()}}
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1

    def _complete(self, engine: Engine) -> None:
        for k, v in self.sums.items():
            engine.state.metrics[f"train/{k}"] = v / max(self.count, 1)
        if self.optimizer is not None:
            engine.state.metrics["train/lr"] = float(self.optimizer.param_groups[0]["lr"])


def create_trainer(
    network: torch.nn.Module,
    loss_fn: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader,
    device: torch.device,
    epochs: int,
    lr_scheduler=None,
    amp: bool = False,
) -> SupervisedTrainer:
    """A ``SupervisedTrainer`` over 2D slice batches, stepping ``lr_scheduler`` once per epoch."""
    handlers = [] if lr_scheduler is None else [LrScheduleHandler(lr_scheduler, print_lr=False, epoch_level=True)]
    trainer = SupervisedTrainer(
        device=device,
        max_epochs=epochs,
        train_data_loader=loader,
        network=network,
        optimizer=optimizer,
        loss_function=loss_fn,
        inferer=SimpleInferer(),
        amp=amp,
        decollate=False,
        train_handlers=handlers,
    )
    EpochAverages(loss_fn, optimizer).attach(trainer)
    return trainer


def postprocessing(num_classes: int) -> Compose:
    """Softmax into ``prob``; one-hot ``pred`` (argmax, ties to the lowest class) and one-hot ``label``."""
    return Compose(
        [
            Activationsd(keys="pred", softmax=True),
            CopyItemsd(keys="pred", names="prob"),
            AsDiscreted(keys="pred", argmax=True, to_onehot=num_classes),
            AsDiscreted(keys="label", to_onehot=num_classes),
        ]
    )


def create_evaluator(
    network: torch.nn.Module,
    loader,
    device: torch.device,
    num_classes: int,
    slice_axis: int = 2,
    prefix: str = "val/",
    surface_distance: bool = False,
    n_bins: int = 15,
    amp: bool = False,
    sw_batch_size: int = 32,
    regions=None,
) -> SupervisedEvaluator:
    """A ``SupervisedEvaluator`` over whole volumes with DSC (its key metric), ECE/CECE/NLL/Brier and optionally ASD.

    ``regions`` (sets of training classes, e.g. BraTS ET/TC/WT from ``dataset::eval_regions``) makes DSC and ASD
    per region instead of per class; calibration stays on the training classes.

    Metric names carry ``prefix``: ``<prefix>dsc``, ``<prefix>asd``, ``<prefix>ece``, ``<prefix>cece``, … Per-volume
    values land in ``engine.state.metric_details`` under ``<prefix>dsc``, ``<prefix>asd`` and
    ``<prefix>calibration``.
    """
    seg = from_engine(["pred", "label"])
    additional = {f"{prefix}calibration": CalibrationMetrics(n_bins=n_bins, prefix=prefix,
                                                              output_transform=from_engine(["prob", "label"]))}
    if surface_distance:
        additional[f"{prefix}asd"] = asd_handler(seg, regions=regions)
    return SupervisedEvaluator(
        device=device,
        val_data_loader=loader,
        network=network,
        inferer=SliceBatchInferer(spatial_dim=slice_axis, sw_batch_size=sw_batch_size),
        postprocessing=postprocessing(num_classes),
        key_val_metric={f"{prefix}dsc": dice_handler(seg, regions=regions)},
        additional_metrics=additional,
        amp=amp,
    )
