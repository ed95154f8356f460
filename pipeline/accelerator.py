"""The GPU path: mixed precision, the channels-last memory layout and data-loading workers, chosen for the device.

The base config turns ``amp`` and ``channels_last`` on when the run's device is CUDA and leaves them off on the
CPU, where the pipeline runs as it always has (float32, contiguous NCHW, loading in the training process):

* ``amp``: MONAI's trainer runs the forward pass under ``torch.autocast("cuda")``, in bfloat16 where the GPU
  supports it (no loss scaling needed: bfloat16 has float32's range), else in float16 with a ``GradScaler``
  (:func:`amp_dtype`, :func:`configure_amp`). Validation and test evaluation autocast the network in MONAI's
  default, float16 (more mantissa bits than bfloat16 for the probabilities the calibration metrics bin); the metrics
  read float32 probabilities.
* ``channels_last``: the network's 4D weights in NHWC order (:func:`to_channels_last`), which cuDNN's tensor-core
  convolutions prefer; the inputs follow the weights' layout.
* ``num_workers``: :func:`default_workers` data-loading processes per training process on CUDA, 0 on the CPU; with
  a CUDA device the slices come through a ``ThreadDataLoader`` with pinned memory
  (:func:`pipeline.data.sharding.slice_loader`).
"""

from __future__ import annotations

import os

import torch
from ignite.engine import Engine, Events


def amp_dtype(device: torch.device | str) -> torch.dtype:
    """``torch.bfloat16`` on a CUDA device that supports it, else ``torch.float16``."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def uses_scaler(dtype: torch.dtype) -> bool:
    """Whether mixed precision in ``dtype`` needs loss scaling (float16's small range does; bfloat16's does not)."""
    return dtype == torch.float16


def configure_amp(dtype: torch.dtype, *engines: Engine) -> None:
    """Autocast MONAI ``engines`` (trainers and evaluators built with ``amp=True``) to ``dtype``.

    MONAI's trainer makes a ``GradScaler`` at each run; for bfloat16 it is replaced, when the run starts, by a
    disabled one (its ``scale``/``step``/``update`` then pass through), since bfloat16 gradients do not underflow.
    """
    for engine in engines:
        engine.amp_kwargs = {**getattr(engine, "amp_kwargs", {}), "dtype": dtype}
        if hasattr(engine, "optimizer") and not uses_scaler(dtype):
            engine.add_event_handler(Events.STARTED, _disable_scaler)


def _disable_scaler(engine: Engine) -> None:
    engine.scaler = torch.amp.GradScaler("cuda", enabled=False)


def to_channels_last(network: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """``network`` with its 4D parameters and buffers in channels-last order when ``enabled`` (in place)."""
    return network.to(memory_format=torch.channels_last) if enabled else network


def cpus_per_process() -> int:
    """CPU cores this process may use, shared with the other training processes of the node (``LOCAL_WORLD_SIZE``,
    set by ``torchrun``)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def default_workers(device: torch.device | str, most: int = 4) -> int:
    """Data-loading worker processes per training process: 0 on the CPU (augmentation in the training process, as
    in every CPU run), on CUDA up to ``most`` (default 4), leaving one core of the process's share to it.

    >>> default_workers("cpu")
    0
    """
    if torch.device(device).type != "cuda":
        return 0
    return max(0, min(int(most), cpus_per_process() - 1))
