"""The shipped model as one TorchScript file: padding + backbone + post-hoc calibration.

``models/model.ts`` of a bundle is :class:`CalibratedNetwork` compiled with ``torch.jit.script``: its ``network``
is the run's backbone inside its padding wrapper (scripted), its ``calibration`` the fitted calibrator with the
network taken out, as a function of ``(logits, image)`` (scripted when TorchScript can compile it, else traced).
The file needs no Python source to run: MONAI's inference configs load it with ``torch.jit.load`` and nothing of
this project.

The calibration step is built generically from any calibrator with ``calibrate(logits, image)`` (TS, LTS or
another :class:`pipeline.posthoc.Calibrator`), so a changed calibrator model needs no change here; a traced one is
checked against the eager calibrator on inputs of another size before it is accepted.
"""

from __future__ import annotations

import copy
import io
import os
import warnings
import zipfile

import torch
from torch import nn

#: slices the compiled model is checked on against the eager one: (batch, height, width); odd sizes exercise the
#: padding, and none equals the trace's example size
CHECK_SIZES = ((2, 37, 29), (1, 64, 80))
TRACE_SIZE = (2, 48, 40)


class Uncalibrated(nn.Module):
    """The calibration step of a bundle without calibration: ``(logits, image) → logits``."""

    def forward(self, logits: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return logits


class CalibrationStep(nn.Module):
    """``(logits, image) → calibrator.calibrate(logits, image)``: a fitted calibrator as a function of the network's
    ``B×K×H×W`` logits and its ``B×C×H×W`` input slices.

    Args:
        calibrator: a post-hoc calibrator (TS, LTS, …) whose wrapped network has been replaced (see
            :func:`calibration_step`), so that the step carries only the calibration's own weights.
    """

    def __init__(self, calibrator: nn.Module) -> None:
        super().__init__()
        self.calibrator = calibrator

    def forward(self, logits: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return self.calibrator.calibrate(logits, image)


class CalibratedNetwork(nn.Module):
    """``x → calibration(network(x), x)``: calibrated logits ``B×K×H×W`` of ``B×C×H×W`` slices.

    Args:
        network: the padded backbone (``network_def`` of the run), scripted.
        calibration: ``(logits, image) → logits`` (:class:`Uncalibrated` or a :class:`CalibrationStep`), scripted
            or traced.
    """

    def __init__(self, network: nn.Module, calibration: nn.Module) -> None:
        super().__init__()
        self.network = network
        self.calibration = calibration

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.calibration(self.network(x), x)


def detached_calibrator(calibrator: nn.Module, network: nn.Module) -> nn.Module:
    """A copy of ``calibrator`` in which every reference to ``network`` is an ``nn.Identity`` (so that compiling
    it does not copy the network's weights a second time)."""
    return copy.deepcopy(calibrator, memo={id(network): nn.Identity()})


def _examples(in_channels: int, num_classes: int, size: tuple[int, int, int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b, h, w = size
    return torch.randn(b, num_classes, h, w, generator=g) * 4, torch.rand(b, in_channels, h, w, generator=g)


def calibration_step(calibrator: nn.Module | None, network: nn.Module, in_channels: int, num_classes: int
                     ) -> tuple[torch.jit.ScriptModule, str]:
    """The compiled calibration step of ``calibrator`` (``None``: no calibration) and how it was compiled.

    Returns:
        ``(module, how)`` with ``how`` one of ``"none"``, ``"scripted"``, ``"traced"``.

    Raises:
        ValueError: a traced step that does not reproduce the eager calibrator on inputs of other sizes.
    """
    if calibrator is None:
        return torch.jit.script(Uncalibrated()), "none"
    step = CalibrationStep(detached_calibrator(calibrator, network)).eval()
    try:
        compiled, how = torch.jit.script(step), "scripted"
    except Exception:  # noqa: BLE001 - TorchScript raises many kinds of errors for code it cannot compile
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            compiled = torch.jit.trace(step, _examples(in_channels, num_classes, TRACE_SIZE), check_trace=False)
        how = "traced"
    with torch.no_grad():
        for i, size in enumerate(CHECK_SIZES):
            z, x = _examples(in_channels, num_classes, size, seed=i + 1)
            expected, got = step(z, x), compiled(z, x)
            if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
                raise ValueError(f"the {how} calibration step of {type(calibrator).__name__} differs from the eager "
                                 f"calibrator on {size[1]}×{size[2]} slices; it cannot be exported as TorchScript")
    return compiled, how


def shipped_model(network: nn.Module, calibrator: nn.Module | None, in_channels: int, num_classes: int
                  ) -> tuple[torch.jit.ScriptModule, str]:
    """``network`` (the padded backbone with the run's weights) and its fitted ``calibrator`` as one scripted
    :class:`CalibratedNetwork`, checked against the eager modules on slices of several sizes.

    Returns:
        ``(model, how)``: the TorchScript module (in eval mode, on the CPU) and how the calibration was compiled.

    Raises:
        ValueError: the compiled model's output differs from the eager one (names the slice size).
        RuntimeError: from TorchScript, when the network itself cannot be scripted.
    """
    network = network.cpu().eval()
    calibrator = None if calibrator is None else calibrator.cpu().eval()
    step, how = calibration_step(calibrator, network, in_channels, num_classes)
    model = torch.jit.script(CalibratedNetwork(torch.jit.script(network), step)).eval()
    eager = network if calibrator is None else calibrator
    with torch.no_grad():
        for i, (b, h, w) in enumerate(CHECK_SIZES):
            x = torch.rand(b, in_channels, h, w, generator=torch.Generator().manual_seed(10 + i))
            expected, got = eager(x), model(x)
            if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-4, atol=1e-4):
                raise ValueError(f"the TorchScript model differs from the eager network on {h}×{w} slices "
                                 f"(largest difference {float((got - expected).abs().max()):.3g})")
    return model, how


def save_portable(model: torch.jit.ScriptModule, path: str | os.PathLike) -> None:
    """``torch.jit.save(model, path)`` without the archive's ``*.debug_pkl`` records.

    Those records map the compiled code back to its Python source: they hold the absolute paths of the source files
    on the exporting machine (the project's and its site-packages'). ``torch.jit.load`` does not need them; without
    them an error inside the model names no source line.
    """
    buffer = io.BytesIO()
    torch.jit.save(model, buffer)
    buffer.seek(0)
    with zipfile.ZipFile(buffer) as zin, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            if not info.filename.endswith(".debug_pkl"):
                zout.writestr(info, zin.read(info.filename))
