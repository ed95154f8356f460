"""Ignite engines: MONAI's ``SupervisedTrainer`` on 2D slices, and ONE ``SupervisedEvaluator`` builder on whole 3D
volumes for validation, test and the noise sweep (so validation DSC and test DSC come from the same code).

The evaluator runs the 2D network slice by slice over each volume (:class:`SliceBatchInferer`); its
postprocessing (:class:`EvaluationOutputs`) turns each volume's logits into everything the metrics read
(probabilities, one-hot prediction and label, label indices, and the same after each post-hoc calibrator).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import CalibrationError, LrScheduleHandler, from_engine
from monai.inferers import Inferer, SimpleInferer

from pipeline.metrics.calibration import CalibrationMetrics
from pipeline.metrics.extras import VolumeExtras
from pipeline.metrics.logits import LogitStatistics
from pipeline.metrics.segmentation import asd_handler, dice_handler
from pipeline.tensors import check_slice_axis, class_indices, one_hot, plain

#: post-hoc calibrators that never change the argmax, so their DSC and ASD are those of the uncalibrated network:
#: TS and LTS both divide the logits of a pixel by one positive temperature (LTS's differs from pixel to pixel)
ARGMAX_PRESERVING = ("ts", "lts")


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
        x = plain(inputs)
        axis = self.spatial_dim + 2
        b, c = x.shape[:2]
        moved = x.movedim(axis, 1)  # B×S×C×H×W
        n_slices = moved.shape[1]
        flat = moved.reshape(b * n_slices, c, *moved.shape[3:])
        outs = [network(flat[i : i + self.sw_batch_size], *args, **kwargs)
                for i in range(0, len(flat), self.sw_batch_size)]
        out = torch.cat(outs, 0)
        out = out.reshape(b, n_slices, *out.shape[1:]).movedim(1, axis)
        if hasattr(inputs, "meta"):
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


class LossEpochEnd:
    """The trainer's end-of-epoch call of a loss with training state (e.g. CRaC's multipliers): a loss with an
    ``end_epoch(epoch) -> {name: value}`` method is called with the finished (1-based) epoch in every process, and
    the values it returns go into ``engine.state.metrics`` as ``train/<name>`` (logged with the epoch). The state
    itself is the loss's ``state_dict()``, which the training checkpoint keeps."""

    def __init__(self, loss_fn: torch.nn.Module) -> None:
        self.loss_fn = loss_fn

    def attach(self, engine: Engine) -> None:
        if callable(getattr(self.loss_fn, "end_epoch", None)):
            engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        for k, v in self.loss_fn.end_epoch(engine.state.epoch).items():
            engine.state.metrics[f"train/{k}"] = float(v)


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
    LossEpochEnd(loss_fn).attach(trainer)
    return trainer


class EvaluationOutputs:
    """Postprocessing of one volume's output into everything the evaluation metrics read.

    From the logits under ``pred`` (``K×X×Y×Z``) it makes ``logits``, ``prob`` (softmax), ``pred`` (one-hot argmax,
    ties to the lowest class), ``label`` (one-hot, keeping the label's meta data for the voxel spacing),
    ``label_onehot`` (the same as a plain tensor), ``label_index`` (``1×X×Y×Z``), and for each calibrator
    ``prob_<name>`` (and ``pred_<name>`` when the calibrator can change the argmax). Soft reference labels under
    ``probs`` in the batch, when the dataset has them, are checked and passed on as ``soft``.

    Args:
        num_classes: ``K``.
        calibrators: ``{name: module with calibrate(logits, image, slice_axis)}`` (e.g. TS, LTS).
        slice_axis: the spatial axis the 2D calibrators slice along.
    """

    def __init__(self, num_classes: int, calibrators: Mapping[str, torch.nn.Module] | None = None,
                 slice_axis: int = 2) -> None:
        self.k = num_classes
        self.calibrators = dict(calibrators or {})
        self.slice_axis = slice_axis

    def _onehot(self, index: torch.Tensor) -> torch.Tensor:
        return one_hot(index.reshape(index.shape[-3:] if index.ndim > 3 else index.shape), self.k, dim=0)

    @torch.no_grad()
    def __call__(self, data: dict) -> dict:
        z = plain(data["pred"]).float()
        if z.shape[0] != self.k:
            raise ValueError(f"the network returned {z.shape[0]} channels, expected {self.k} (one per class)")
        label = data["label"]
        index = class_indices(plain(label).round(), self.k)
        out = dict(data)
        out["logits"] = z
        out["prob"] = torch.softmax(z, 0)
        out["pred"] = self._onehot(z.max(0).indices)  # first maximum: ties to the lowest class
        onehot = self._onehot(index).to(z.device)
        out["label_onehot"] = onehot  # plain tensor: cheaper for DSC than a MetaTensor
        out["label"] = MetaTensor(onehot, meta=label.meta) if hasattr(label, "meta") else onehot
        out["label_index"] = index.reshape(1, *z.shape[1:]).to(z.device)
        image = plain(data["image"]).float().to(z.device) if "image" in data else None
        for name, cal in self.calibrators.items():
            zc = cal.calibrate(z[None], None if image is None else image[None], self.slice_axis)[0]
            out[f"prob_{name}"] = torch.softmax(zc, 0)
            if name not in ARGMAX_PRESERVING:
                out[f"pred_{name}"] = self._onehot(zc.max(0).indices)
        if data.get("probs") is not None:
            soft = plain(data["probs"]).float().to(z.device)
            if soft.shape != z.shape:
                raise ValueError(f"soft labels 'probs' of volume {data.get('id', '?')} have shape "
                                 f"{tuple(soft.shape)}, expected {tuple(z.shape)} (one channel per class)")
            out["soft"] = soft
        return out


def item_keys(*keys: str, optional: Sequence[str] = ()) -> Callable:
    """``output_transform`` reading ``keys`` from each decollated item (``None`` for absent optional keys)."""

    def transform(output):
        items = output if isinstance(output, list) else [output]
        vals = [[item[k] for item in items] for k in keys]
        for k in optional:
            got = [item.get(k) for item in items]
            vals.append(None if all(g is None for g in got) else got)
        return tuple(vals)

    return transform


def evaluation_metrics(
    num_classes: int,
    prefix: str = "val/",
    methods: Sequence[str] = ("pre",),
    n_bins: int = 15,
    regions: Sequence[Sequence[int]] | None = None,
    surface_distance: bool = False,
    extras: bool = False,
    logits: bool = False,
    monai_calibration_error: bool = False,
) -> dict:
    """The Ignite metrics of an evaluation, named ``<prefix>dsc``, ``<prefix>ece``, … (for a post-hoc method ``m``,
    ``<prefix><m>/ece``, …), reading :class:`EvaluationOutputs`.

    Per method: DSC (and ASD with ``surface_distance``) unless the method keeps the argmax; the paper's
    ECE/CECE/NLL/Brier (:class:`CalibrationMetrics`); with ``extras`` the adaptive and soft-label measures.
    For the uncalibrated network only: MONAI's ``CalibrationErrorMetric`` and the logit statistics.
    ``regions`` (sets of training classes, e.g. BraTS ET/TC/WT) makes DSC and ASD per region.
    """
    metrics: dict = {}
    for method in methods:
        p = prefix if method == "pre" else f"{prefix}{method}/"
        prob = "prob" if method == "pre" else f"prob_{method}"
        pred = "pred" if method == "pre" else f"pred_{method}"
        if method == "pre" or method not in ARGMAX_PRESERVING:
            metrics[f"{p}dsc"] = dice_handler(from_engine([pred, "label_onehot"]), regions=regions)
            if surface_distance:
                metrics[f"{p}asd"] = asd_handler(from_engine([pred, "label"]), regions=regions)
        metrics[f"{p}calibration"] = CalibrationMetrics(n_bins=n_bins, prefix=p, num_classes=num_classes,
                                                        output_transform=from_engine([prob, "label_index"]))
        if extras:
            metrics[f"{p}extras"] = VolumeExtras(n_bins=n_bins, prefix=p,
                                                 output_transform=item_keys(prob, "label_index", optional=["soft"]))
    if monai_calibration_error:
        metrics[f"{prefix}monai_calibration_error"] = CalibrationError(
            num_bins=n_bins, include_background=False, calibration_reduction="expected", metric_reduction="mean",
            output_transform=from_engine(["prob", "label_onehot"]), save_details=False)
    if logits:
        metrics[f"{prefix}logit_statistics"] = LogitStatistics(
            num_classes, prefix=prefix, output_transform=from_engine(["logits", "label_index"]))
    return metrics


def create_evaluator(
    network: torch.nn.Module,
    loader,
    device: torch.device,
    num_classes: int,
    slice_axis: int = 2,
    prefix: str = "val/",
    calibrators: Mapping[str, torch.nn.Module] | None = None,
    prepare_batch: Callable | None = None,
    amp: bool = False,
    sw_batch_size: int = 32,
    **metric_options,
) -> SupervisedEvaluator:
    """A ``SupervisedEvaluator`` over whole volumes, DSC as its key metric: validation, test and noise alike.

    Args:
        network: the 2D network (``B×C×H×W → B×K×H×W``), run slice by slice along ``slice_axis``.
        loader: volumes ``{"image": C×X×Y×Z, "label": 1×X×Y×Z, ...}``, one per batch item.
        calibrators: post-hoc calibrators scored from the same logits (``{"ts": …, "lts": …}``).
        prepare_batch: a MONAI ``PrepareBatch`` (e.g. Gaussian noise on the images); default image and label.
        metric_options: :func:`evaluation_metrics` options (``n_bins``, ``regions``, ``surface_distance``,
            ``extras``, ``logits``, ``monai_calibration_error``).

    Per-volume values land in ``engine.state.metric_details`` under the metric names.
    """
    calibrators = dict(calibrators or {})
    metrics = evaluation_metrics(num_classes, prefix, ["pre", *calibrators], **metric_options)
    key = f"{prefix}dsc"
    extra = {} if prepare_batch is None else {"prepare_batch": prepare_batch}
    return SupervisedEvaluator(
        device=device,
        val_data_loader=loader,
        network=network,
        inferer=SliceBatchInferer(spatial_dim=slice_axis, sw_batch_size=sw_batch_size),
        postprocessing=EvaluationOutputs(num_classes, calibrators, slice_axis),
        key_val_metric={key: metrics.pop(key)},
        additional_metrics=metrics,
        amp=amp,
        **extra,
    )


def run_engine(engine: Engine, *args) -> None:
    """``engine.run()``, with a ``ValueError`` raised inside a MONAI transform re-raised as itself (MONAI wraps it in
    a ``RuntimeError`` "applying transform …" that hides the message naming the bad value)."""
    try:
        engine.run(*args)
    except RuntimeError as e:
        cause = e
        while cause.__cause__ is not None and isinstance(cause, RuntimeError) and "applying transform" in str(cause):
            cause = cause.__cause__
        if isinstance(cause, ValueError):
            raise cause from None
        raise


class PeriodicValidation:
    """Ignite handler: run ``evaluator`` after every ``interval``-th training epoch and after the last one, and
    report one line (training loss, validation DSC/ECE/CECE, best DSC so far).

    Args:
        evaluator: the validation engine (its metrics named ``<prefix>dsc``, ``<prefix>ece``, ``<prefix>cece``).
        interval: validate every ``interval`` epochs (at least 1).
        epochs: the last epoch (always validated).
        report: called with each line (e.g. ``print``); ``None`` for silence.
        prefix: the evaluator's metric prefix.
    """

    def __init__(self, evaluator: SupervisedEvaluator, interval: int, epochs: int,
                 report: Callable[[str], None] | None = None, prefix: str = "val/") -> None:
        self.evaluator, self.interval, self.epochs = evaluator, max(1, int(interval)), int(epochs)
        self.report, self.prefix = report, prefix

    def attach(self, trainer: Engine) -> None:
        trainer.add_event_handler(Events.EPOCH_COMPLETED(event_filter=self.due), self)

    def due(self, _engine, epoch: int) -> bool:
        return epoch % self.interval == 0 or epoch == self.epochs

    def __call__(self, trainer: Engine) -> None:
        self.evaluator.run(trainer.state.epoch)
        m, p = self.evaluator.state.metrics, self.prefix
        line = (f"epoch {trainer.state.epoch}/{self.epochs}: train loss "
                f"{trainer.state.metrics.get('train/loss', math.nan):.4f} | val DSC {m[f'{p}dsc']:.4f} "
                f"ECE {m[f'{p}ece']:.4f} CECE {m[f'{p}cece']:.4f} | best DSC {self.evaluator.state.best_metric:.4f} "
                f"(epoch {self.evaluator.state.best_metric_epoch})")
        if self.report is not None:
            self.report(line)
