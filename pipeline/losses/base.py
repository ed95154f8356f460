"""Shared input handling for the segmentation losses.

Every loss of :mod:`pipeline.losses` takes logits ``BKH W[D]`` (class axis 1) and integer labels ``B1HW[D]`` (MONAI
style) or ``BHW[D]``, and returns one scalar. This module turns the labels into a ``long`` index tensor and
rejects inputs that do not fit, naming the bad value and what was expected.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.tensors import class_indices


def as_index_labels(labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Return ``labels`` as a ``long`` tensor of shape ``B×spatial`` that matches ``logits`` (``B×K×spatial``).

    Args:
        labels: class indices, ``B×1×spatial`` or ``B×spatial``; float tensors must hold whole numbers.
        logits: network output, ``B×K×spatial`` with ``K >= 2``.

    Returns:
        ``torch.long`` labels of shape ``logits.shape[:1] + logits.shape[2:]``.

    Raises:
        ValueError: when the shapes do not match, the labels are not whole numbers, or a label is outside
            ``[0, K)``.

    >>> as_index_labels(torch.tensor([[[[1, 0]]]]), torch.zeros(1, 2, 1, 2)).shape
    torch.Size([1, 1, 2])
    """
    if logits.ndim < 3:
        raise ValueError(f"logits must be B×K×spatial (at least 3 dimensions), got shape {tuple(logits.shape)}")
    n_classes = logits.shape[1]
    if n_classes < 2:
        raise ValueError(f"logits must have at least 2 classes on axis 1, got shape {tuple(logits.shape)}")
    spatial = logits.shape[2:]
    if labels.ndim == logits.ndim and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.shape[:1] != logits.shape[:1] or labels.shape[1:] != spatial:
        raise ValueError(
            f"labels have shape {tuple(labels.shape)}, expected {(logits.shape[0], 1, *spatial)} or "
            f"{(logits.shape[0], *spatial)} to match logits of shape {tuple(logits.shape)}"
        )
    return class_indices(labels, n_classes)


def check_number(name: str, value, low: float | None = None, high: float | None = None,
                 low_open: bool = False) -> float:
    """Return ``value`` as a float if it is a real number in the given range; otherwise raise naming it.

    Args:
        name: the parameter's name, for the message.
        value: the value to check (an ``int`` or ``float``; ``bool`` and strings are rejected).
        low, high: inclusive bounds (``None``: unbounded); ``low_open=True`` makes the lower bound exclusive.

    Raises:
        ValueError: ``value`` is not a finite number, or outside the range.

    >>> check_number("margin", 10, low=0)
    10.0
    """
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        bounds = []
        if low is not None:
            bounds.append(f"{'>' if low_open else '>='} {low:g}")
        if high is not None:
            bounds.append(f"<= {high:g}")
        raise ValueError(f"{name} must be a number {' and '.join(bounds) or ''}".rstrip() + f", got {value!r}")
    return float(value)


class SegmentationLoss(nn.Module):
    """Base class: subclasses implement ``_forward(logits, labels)`` with validated ``long`` labels.

    Composite losses record their parts (detached scalars, e.g. ``{"ce": …, "penalty": …}``) in ``self.parts``
    after each call, so that a training handler can log them without changing what the trainer receives.
    Half-precision logits (float16/bfloat16, e.g. under autocast) are computed on in float32, for finite values
    and gradients.
    """

    parts: dict[str, torch.Tensor]

    def __init__(self) -> None:
        super().__init__()
        self.parts = {}

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Validate the inputs and return the loss (a scalar, float32 for half-precision logits).

        Args:
            logits: ``B×K×H×W`` or ``B×K×D×H×W`` network outputs (any floating dtype).
            labels: integer class indices ``B×1×…`` or ``B×…`` in ``[0, K)``.

        Raises:
            ValueError: from :func:`as_index_labels` (shape, non-integer or out-of-range labels).
        """
        logits = logits.as_subclass(torch.Tensor) if type(logits) is not torch.Tensor else logits
        labels = as_index_labels(labels, logits)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        # the loss itself always runs at the logits' precision, even inside an autocast region (where e.g. the
        # SVLS convolution would otherwise drop to bfloat16)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            return self._forward(logits, labels)

    def _forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError
