"""Fitting the post-hoc calibrators of a run on its validation volumes, and their validation ECE."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.metrics.calibration import calibration_statistics
from pipeline.posthoc.local import LocalTemperatureScaling, ReferenceTemperatureNet
from pipeline.posthoc.settings import LTS_INIT_TEMPERATURES
from pipeline.posthoc.slices import collect_slices
from pipeline.posthoc.temperature import TemperatureScaling
from pipeline.tensors import nanmean


@torch.no_grad()
def validation_ece(slices, calibrator=None) -> float:
    """The paper's foreground ECE on validation slices (one value per volume's slices, then the mean), of the raw
    logits or after ``calibrator.calibrate``."""
    values = []
    for z, x, y in zip(slices.logits, slices.images, slices.labels):
        if calibrator is not None:
            dev = next(calibrator.parameters()).device
            z = calibrator.calibrate(z.to(dev), x.to(dev)).cpu()
        values.append(calibration_statistics(torch.softmax(z.float(), 1).movedim(1, 0), y).ece())
    return nanmean(values)


def fit_calibrators(network, val_volumes, settings: dict, num_classes: int, in_channels: int, slice_axis: int,
                    device, seed: int = 0, folder: Path | None = None, say: Callable = print) -> tuple[dict, dict]:
    """Fit the post-hoc calibrators of ``settings["posthoc"]`` on the validation volumes; save them in ``folder``.

    LTS is the released network (:class:`ReferenceTemperatureNet`) started at the constant temperature of
    ``settings["lts"]["init"]`` (``ts``: TS is fitted first, also when it is not among the calibrators asked for).

    Returns:
        ``({name: fitted wrapper}, {name: fit details})``.
    """
    calibrators, info = {}, {}
    if not settings["posthoc"]:
        return calibrators, info
    t0 = time.time()
    slices = collect_slices(network, val_volumes, slice_axis, device, settings["max_val_slices"], seed)
    collect_s = time.time() - t0
    fg_only = bool(settings["fit_foreground_only"])
    ts = None
    if "ts" in settings["posthoc"] or settings["lts"]["init"] == "ts":
        ts = TemperatureScaling(network).to(device)
        info["ts"] = ts.fit(slices, max_iter=settings["ts"]["max_iter"], foreground_only=fg_only)
        info["ts"]["seconds"] += collect_s
        if "ts" in settings["posthoc"]:
            ts.eval()
            calibrators["ts"] = ts
    if "lts" in settings["posthoc"]:
        cfg = settings["lts"]
        tnet = ReferenceTemperatureNet(num_classes, in_channels).to(device)
        tnet.init_constant(ts.temperature if cfg["init"] == "ts" else LTS_INIT_TEMPERATURES[cfg["init"]])
        lts = LocalTemperatureScaling(network, tnet)
        info["lts"] = lts.fit(slices, iterations=cfg["iterations"], lr=float(cfg["lr"]),
                              batch_slices=cfg["batch_slices"], eval_every=cfg["eval_every"],
                              foreground_only=fg_only, seed=seed)
        info["lts"].update(model=tnet.model, init=cfg["init"], init_temperature=tnet.init_temperature)
        lts.eval()
        calibrators["lts"] = lts
    if "ts" in info and "ts" not in settings["posthoc"]:
        info.pop("ts")
    before = validation_ece(slices)
    for name, cal in calibrators.items():
        d = info[name]
        d.update(val_ece_before=before, val_ece_after=validation_ece(slices, cal))
        extra = f"T = {d['temperature']:.4f}; " if name == "ts" else ""
        if name == "lts":
            extra += (f"from T = {d['init_temperature']:.4f} ({d['init']}), best at step {d['best_iteration']} of "
                      f"{d['iterations']}; ")
        say(f"{name.upper()}: {extra}validation NLL {d['val_nll_before']:.4f} → {d['val_nll_after']:.4f}, "
            f"validation ECE {d['val_ece_before']:.4f} → {d['val_ece_after']:.4f} ({d['seconds']:.1f} s)")
    for k in info:
        info[k]["n_slices"] = slices.n_slices
    if folder is not None:
        for name, cal in calibrators.items():
            info[name]["file"] = str(cal.save_calibrator(Path(folder) / f"{name}.pt"))
    return calibrators, info
