"""Metrics for the dataset-specific cases: one-slice volumes (BUSI) measured in 2D, and evaluation regions (BraTS)."""

import pytest
import torch
from ignite.engine import Engine
from monai.handlers import from_engine
from monai.metrics import compute_average_surface_distance

from pipeline.metrics.segmentation import average_surface_distance, dice_handler, region_masks


def _square(shift: int) -> torch.Tensor:
    m = torch.zeros(1, 1, 20, 20)
    m[:, :, 4 + shift : 14 + shift, 4:14] = 1
    return torch.cat([1 - m, m], 1)


def test_asd_of_a_one_slice_volume_is_the_2d_asd():
    pred, gt = _square(2), _square(0)
    two_d = average_surface_distance(pred, gt)
    assert two_d.item() == pytest.approx(1.0)
    assert average_surface_distance(pred[..., None], gt[..., None]).item() == pytest.approx(two_d.item())
    assert average_surface_distance(pred[:, :, None], gt[:, :, None]).item() == pytest.approx(two_d.item())
    # MONAI on the raw one-slice volume takes every voxel for surface, which understates the distance
    assert compute_average_surface_distance(pred[..., None], gt[..., None], symmetric=True).item() < 0.5


def test_one_slice_asd_uses_the_in_plane_spacing():
    # two one-pixel-wide lines 3 pixels apart along x: every surface point is 3 pixels from the other line
    pred, gt = torch.zeros(1, 1, 12, 10, 1), torch.zeros(1, 1, 12, 10, 1)
    pred[0, 0, 2, 1:8], gt[0, 0, 5, 1:8] = 1, 1
    pred, gt = torch.cat([1 - pred, pred], 1), torch.cat([1 - gt, gt], 1)
    assert average_surface_distance(pred, gt, spacing=[0.5, 1.0, 7.0]).item() == pytest.approx(1.5)


def test_region_masks_make_brats_regions_from_training_classes():
    label = torch.tensor([0, 1, 2, 3, 3, 2]).reshape(1, 6, 1, 1)
    onehot = torch.nn.functional.one_hot(label[0].long(), 4).permute(3, 0, 1, 2).float()  # 4×6×1×1
    regions = region_masks(onehot, [[3], [1, 3], [1, 2, 3]])
    assert regions[:, :, 0, 0].tolist() == [
        [1, 0, 0, 0, 0, 0],    # in no region
        [0, 0, 0, 1, 1, 0],    # ET
        [0, 1, 0, 1, 1, 0],    # TC
        [0, 1, 1, 1, 1, 1],    # WT
    ]
    with pytest.raises(ValueError, match=r"must list training classes in \[1, 3\]"):
        region_masks(onehot, [[4]])


def test_dice_handler_scores_regions_not_classes():
    gt = torch.tensor([0, 1, 1, 2, 2, 3, 3, 0]).reshape(8, 1, 1)
    pred = torch.tensor([0, 2, 2, 2, 2, 2, 2, 0]).reshape(8, 1, 1)  # the whole tumour found, as edema
    onehot = lambda x: torch.nn.functional.one_hot(x.long(), 4).permute(3, 0, 1, 2).float()  # noqa: E731
    outputs = [{"pred": onehot(pred), "label": onehot(gt)}]

    def score(regions):
        engine = Engine(lambda e, b: outputs)
        dice_handler(from_engine(["pred", "label"]), regions=regions).attach(engine, "dsc")
        engine.run([0], max_epochs=1)
        return engine.state.metrics["dsc"], engine.state.metric_details["dsc"]

    mean, details = score([[3], [1, 3], [1, 2, 3]])
    assert details.tolist() == [[0.0, 0.0, 1.0]]            # ET 0, TC 0, WT 1
    assert mean == pytest.approx(1 / 3)
    _, classes = score(None)
    assert classes.tolist() == [[0.0, pytest.approx(2 * 2 / (2 + 6)), 0.0]]  # per class: 1, 2, 3
