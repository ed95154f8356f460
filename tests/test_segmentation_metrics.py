import math

import pytest
import torch
from monai.data import MetaTensor
from monai.metrics import DiceMetric

from pipeline.metrics.segmentation import SurfaceDistanceWithSpacing, average_surface_distance


def _onehot(mask: torch.Tensor) -> torch.Tensor:
    """B×1×spatial 0/1 mask -> B×2×spatial one-hot."""
    return torch.cat([1 - mask, mask], dim=1)


def _cube(shift: int = 0) -> torch.Tensor:
    m = torch.zeros(1, 1, 12, 12, 12)
    m[:, :, 3 + shift : 8 + shift, 3:8, 3:8] = 1
    return m


def test_asd_scales_with_spacing():
    pred, gt = _onehot(_cube(1)), _onehot(_cube(0))
    unit = average_surface_distance(pred, gt)
    assert unit.shape == (1, 1) and unit.item() > 0
    assert average_surface_distance(pred, gt, spacing=[2.0, 2.0, 2.0]).item() == pytest.approx(2 * unit.item())
    # a shift along x only: stretching y and z changes distances less than stretching x
    assert average_surface_distance(pred, gt, spacing=[3.0, 1.0, 1.0]).item() > unit.item()


def test_asd_reads_spacing_from_the_label_affine():
    pred, gt = _onehot(_cube(1)), _onehot(_cube(0))
    affine = torch.diag(torch.tensor([2.5, 2.5, 2.5, 1.0]))
    metric = SurfaceDistanceWithSpacing()
    metric([pred[0]], [MetaTensor(gt[0], affine=affine)])
    assert metric.aggregate().item() == pytest.approx(2.5 * average_surface_distance(pred, gt).item())


def test_empty_mask_rules():
    empty = _onehot(torch.zeros(1, 1, 12, 12, 12))
    full = _onehot(_cube(0))
    assert average_surface_distance(empty, empty).item() == 0.0
    assert math.isnan(average_surface_distance(empty, full).item())
    assert math.isnan(average_surface_distance(full, empty).item())
    dice = DiceMetric(include_background=False, reduction="none", ignore_empty=False)
    assert dice(empty, empty).item() == 1.0
    assert dice(full, empty).item() == 0.0
