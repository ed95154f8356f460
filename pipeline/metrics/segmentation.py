"""DSC and ASD per foreground class per volume, with explicit empty-mask rules and the voxel spacing respected.

Empty rules (per volume and class):

* **DSC**: both ground truth and prediction empty → 1.0; only one of them empty → 0.0 (MONAI ``DiceMetric`` with
  ``ignore_empty=False``).
* **ASD** (symmetric average surface distance, in the units of the spacing, mm for medical images): both empty
  → 0.0; only one empty → ``nan`` (no surface to measure against), which the means skip. Reports count these.

The spacing is read from each label's affine (MONAI ``MetaTensor.pixdim``) unless given.

**Singleton axes**: a volume one voxel thick along an axis (a 2D image stored as a one-slice volume, e.g. BUSI) is
measured in the remaining axes. MONAI's surface extraction on such a volume would take every voxel for surface
(their neighbours across the missing axis are outside), which makes ASD far too small.

**Evaluation regions** (e.g. BraTS: ET = {3}, TC = {1, 3}, WT = {1, 2, 3} in training classes): the handlers accept
``regions``, a sequence of sets of training classes; DSC and ASD are then computed per region instead of per class
(:func:`region_masks`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from monai.data import MetaTensor
from monai.metrics import CumulativeIterationMetric, DiceMetric
from monai.metrics.utils import do_metric_reduction

from pipeline.metrics.gathered import GatheredMetricHandler
from pipeline.metrics.surface import symmetric_asd
from pipeline.tensors import plain


def spacing_of(y: torch.Tensor, n_spatial: int) -> list[float] | None:
    """The voxel spacing of a MONAI ``MetaTensor`` (its ``pixdim``), or ``None`` when it carries none."""
    pixdim = getattr(y, "pixdim", None)
    if pixdim is None:
        return None
    values = [float(v) for v in torch.as_tensor(pixdim).reshape(-1)[:n_spatial]]
    return values if len(values) == n_spatial else None


def region_masks(onehot: torch.Tensor, regions: Sequence[Sequence[int]]) -> torch.Tensor:
    """One-hot class masks of 3D volumes, ``K×X×Y×Z`` or ``B×K×X×Y×Z`` → region masks with ``1 + R`` channels.

    Channel ``r + 1`` is the union of the classes of ``regions[r]``; channel 0 is the rest (in no region), so that
    ``include_background=False`` metrics see exactly the regions. MetaTensor meta data (the affine) are kept.

    >>> region_masks(torch.eye(4)[:, :, None, None], [[3], [1, 3]])[:, :, 0, 0].tolist()
    [[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 1.0]]

    Raises:
        ValueError: a region naming a class outside ``[1, K - 1]``.
    """
    if onehot.ndim not in (4, 5):
        raise ValueError(f"expected one-hot volumes K×X×Y×Z or B×K×X×Y×Z, got shape {tuple(onehot.shape)}")
    axis = onehot.ndim - 4
    k = onehot.shape[axis]
    x = plain(onehot)
    channels = []
    for region in regions:
        bad = [c for c in region if not 1 <= int(c) < k]
        if bad or not region:
            raise ValueError(f"evaluation region {list(region)} must list training classes in [1, {k - 1}]")
        channels.append(x.index_select(axis, torch.as_tensor([int(c) for c in region], device=x.device))
                        .amax(axis, keepdim=True))
    fg = torch.cat(channels, axis)
    out = torch.cat([1 - fg.amax(axis, keepdim=True), fg], axis)
    if hasattr(onehot, "meta"):
        out = MetaTensor(out, meta=onehot.meta)
    return out


def _with_regions(output_transform: Callable, regions: Sequence[Sequence[int]] | None) -> Callable:
    if not regions:
        return output_transform

    def transform(output):
        y_pred, y = output_transform(output)
        convert = (lambda t: [region_masks(v, regions) for v in t]) if isinstance(y, (list, tuple)) else (
            lambda t: region_masks(t, regions))
        return convert(y_pred), convert(y)

    return transform


def _drop_singleton_axes(y_pred: torch.Tensor, y: torch.Tensor, spacing):
    """Remove spatial axes of length 1 (and their spacing) so that a one-slice volume is measured in 2D."""
    spatial = y_pred.shape[2:]
    keep = [i for i, n in enumerate(spatial) if n > 1]
    if len(keep) == len(spatial) or not keep:
        return y_pred, y, spacing
    drop = [i + 2 for i, n in enumerate(spatial) if n == 1]
    y_pred, y = plain(y_pred).squeeze(drop), plain(y).squeeze(drop)
    if spacing is not None and not isinstance(spacing, (int, float)):
        spacing = [float(spacing[i]) for i in keep]
    return y_pred, y, spacing


def average_surface_distance(
    y_pred: torch.Tensor, y: torch.Tensor, spacing: Sequence[float] | None = None, include_background: bool = False
) -> torch.Tensor:
    """Symmetric ASD of one-hot ``B×K×spatial`` masks, ``B×K'`` (K' = K−1 without background), empty rules above.

    Spatial axes of length 1 are dropped first (a one-slice volume is measured as a 2D image). Computed by
    :func:`pipeline.metrics.surface.symmetric_asd`: MONAI's ``compute_average_surface_distance`` (symmetric, CPU)
    to float32 precision, all classes at once.
    """
    y_pred, y, spacing = _drop_singleton_axes(y_pred, y, spacing)
    start = 0 if include_background else 1
    return symmetric_asd(y_pred[:, start:], y[:, start:], spacing)  # applies the empty rules above


class SurfaceDistanceWithSpacing(CumulativeIterationMetric):
    """MONAI cumulative metric: symmetric ASD per (volume, foreground class) using each label's voxel spacing."""

    def __init__(self, include_background: bool = False, reduction: str = "mean") -> None:
        super().__init__()
        self.include_background = include_background
        self.reduction = reduction

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs) -> torch.Tensor:
        spacing = kwargs.get("spacing") or spacing_of(y, y.ndim - 2)
        return average_surface_distance(y_pred.float(), y.float(), spacing, self.include_background)

    def aggregate(self, reduction: str | None = None):
        f, _ = do_metric_reduction(self.get_buffer(), reduction or self.reduction)
        return f


def dice_handler(output_transform: Callable, save_details: bool = True,
                 regions: Sequence[Sequence[int]] | None = None) -> GatheredMetricHandler:
    """Ignite handler: mean DSC over volumes and foreground classes (per-class details kept), or over the
    evaluation ``regions`` (sets of training classes) when given."""
    metric = DiceMetric(include_background=False, reduction="mean", ignore_empty=False)
    return GatheredMetricHandler(metric_fn=metric, output_transform=_with_regions(output_transform, regions),
                                 save_details=save_details)


def asd_handler(output_transform: Callable, save_details: bool = True,
                regions: Sequence[Sequence[int]] | None = None) -> GatheredMetricHandler:
    """Ignite handler: mean symmetric ASD (mm) over volumes and foreground classes, ``nan`` entries skipped; over
    the evaluation ``regions`` (sets of training classes) when given."""
    metric = SurfaceDistanceWithSpacing(include_background=False, reduction="mean")
    return GatheredMetricHandler(metric_fn=metric, output_transform=_with_regions(output_transform, regions),
                                 save_details=save_details)
