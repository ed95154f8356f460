"""DSC and ASD per foreground class per volume, with explicit empty-mask rules and the voxel spacing respected.

Empty rules (per volume and class):

* **DSC**: both ground truth and prediction empty → 1.0; only one of them empty → 0.0 (MONAI ``DiceMetric`` with
  ``ignore_empty=False``).
* **ASD** (symmetric average surface distance, in the units of the spacing, mm for medical images): both empty
  → 0.0; only one empty → ``nan`` (no surface to measure against), which the means skip. Reports count these.

The spacing is read from each label's affine (MONAI ``MetaTensor.pixdim``) unless given.
"""

from __future__ import annotations


from collections.abc import Callable, Sequence

import torch
from monai.handlers import IgniteMetricHandler
from monai.metrics import CumulativeIterationMetric, DiceMetric
from monai.metrics.utils import do_metric_reduction

from pipeline.metrics.surface import symmetric_asd


def _spacing_of(y: torch.Tensor, n_spatial: int) -> list[float] | None:
    pixdim = getattr(y, "pixdim", None)
    if pixdim is None:
        return None
    values = [float(v) for v in torch.as_tensor(pixdim).reshape(-1)[:n_spatial]]
    return values if len(values) == n_spatial else None


def average_surface_distance(
    y_pred: torch.Tensor, y: torch.Tensor, spacing: Sequence[float] | None = None, include_background: bool = False
) -> torch.Tensor:
    """Symmetric ASD of one-hot ``B×K×spatial`` masks, ``B×K'`` (K' = K−1 without background), empty rules above.

    Computed by :func:`pipeline.metrics.surface.symmetric_asd`: MONAI's ``compute_average_surface_distance``
    (symmetric, CPU) to float32 precision, all classes at once.
    """
    start = 0 if include_background else 1
    return symmetric_asd(y_pred[:, start:], y[:, start:], spacing)  # applies the empty rules above


class SurfaceDistanceWithSpacing(CumulativeIterationMetric):
    """MONAI cumulative metric: symmetric ASD per (volume, foreground class) using each label's voxel spacing."""

    def __init__(self, include_background: bool = False, reduction: str = "mean") -> None:
        super().__init__()
        self.include_background = include_background
        self.reduction = reduction

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs) -> torch.Tensor:
        spacing = kwargs.get("spacing") or _spacing_of(y, y.ndim - 2)
        return average_surface_distance(y_pred.float(), y.float(), spacing, self.include_background)

    def aggregate(self, reduction: str | None = None):
        f, _ = do_metric_reduction(self.get_buffer(), reduction or self.reduction)
        return f


def dice_handler(output_transform: Callable, save_details: bool = True) -> IgniteMetricHandler:
    """Ignite handler: mean DSC over volumes and foreground classes (per-class details kept)."""
    metric = DiceMetric(include_background=False, reduction="mean", ignore_empty=False)
    return IgniteMetricHandler(metric_fn=metric, output_transform=output_transform, save_details=save_details)


def asd_handler(output_transform: Callable, save_details: bool = True) -> IgniteMetricHandler:
    """Ignite handler: mean symmetric ASD (mm) over volumes and foreground classes, ``nan`` entries skipped."""
    metric = SurfaceDistanceWithSpacing(include_background=False, reduction="mean")
    return IgniteMetricHandler(metric_fn=metric, output_transform=output_transform, save_details=save_details)
