"""Marginal L1 average calibration error as a loss (mL1-ACE, Barfoot et al., MICCAI 2024), hard and soft binned.

Per image ``b`` and class ``c`` (background included), with ``p_c`` the softmax probability and ``y_c`` the one-hot
label, ``n_bins`` equal bins on ``[0, 1]``: ``ACE_bc = mean over non-empty bins |mean p_c − mean y_c|``; the loss is
the mean over ``B·K``. An image's absent class contributes 0 but stays in the mean (``ignore_empty_classes``).
As in the released code (``cai4cai/Average-Calibration-Losses``, ``src/losses/hardl1ace.py``, ``softl1ace.py``),
computed here at once for all images and classes instead of in a loop:

- **hard**: a voxel falls in bin ``i`` when ``edge_i < p ≤ edge_{i+1}`` (``torch.bucketize``; the edges
  ``linspace(0, 1 + ε, n_bins + 1)``, ``ε`` float32's machine epsilon; ``p = 0`` in the first bin);
- **soft**: a voxel's weight is split linearly between the two nearest bin centres (all of it to the first or last
  bin beyond the outer centres, with the released code's ±10⁴ sentinels); a bin whose total weight is below
  ``empty_weight`` is empty.

The authors train with ``0.33 · mL1-ACE + 0.33 · Dice + 0.33 · CE``, the Dice MONAI's ``DiceLoss(softmax=True,
include_background=True, squared_pred=True, smooth_nr=0, smooth_dr=1e-5)``: :class:`ACEDiceCE`. On this project's
2D training slices an "image" is a slice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss

from pipeline.losses.base import SegmentationLoss, check_number
from pipeline.tensors import one_hot

BINNINGS = ("hard", "soft")


def _per_bin(index: torch.Tensor, weight: torch.Tensor, p: torch.Tensor, y: torch.Tensor, n_bins: int):
    """Sums over voxels of ``weight``, ``weight·p``, ``weight·y`` per (image, class, bin): ``B×K×n_bins`` each."""
    b, k = p.shape[:2]
    flat = index + n_bins * torch.arange(b * k, device=p.device).reshape(b, k, 1)
    out = []
    for values in (weight, weight * p, weight * y):
        out.append(torch.zeros(b * k * n_bins, dtype=p.dtype, device=p.device)
                   .scatter_add(0, flat.reshape(-1), values.reshape(-1)).reshape(b, k, n_bins))
    return out


def hard_bins(p: torch.Tensor, y: torch.Tensor, n_bins: int = 20):
    """``(filled, mean p, mean y)`` per (image, class, bin) of ``B×K×N`` probabilities and one-hot labels:
    ``filled`` marks the non-empty bins; the means are 0 in empty ones (no NaN, which would poison the gradient)."""
    edges = torch.linspace(0.0, 1.0 + torch.finfo(torch.float32).eps, n_bins + 1, device=p.device, dtype=p.dtype)
    index = torch.bucketize(p.detach(), edges[1:])
    count, sum_p, sum_y = _per_bin(index, torch.ones_like(p), p, y, n_bins)
    filled = count > 0
    count = torch.where(filled, count, 1.0)
    return filled, sum_p / count, sum_y / count


def soft_bins(p: torch.Tensor, y: torch.Tensor, n_bins: int = 20, empty_weight: float = 0.01):
    """``(filled, mean p, mean y)`` per (image, class, bin), the soft binning of the module docstring: a bin is
    filled when its total weight reaches ``empty_weight``; the means are 0 in empty ones. The weights carry the
    gradient of ``p``."""
    halves = torch.linspace(0.0, 1.0 + torch.finfo(torch.float32).eps, 2 * n_bins + 1, device=p.device,
                            dtype=p.dtype)
    centres = halves[1::2]
    half = torch.bucketize(p.detach(), halves[1:])
    left = torch.clamp(half - 1, min=0) // 2
    right = torch.clamp(half + 1, max=2 * n_bins - 1) // 2
    sentinel = torch.tensor([10000.0], device=p.device, dtype=p.dtype)
    anchors = torch.cat((-sentinel, centres.repeat_interleave(2), sentinel))
    left_dist = p - anchors[half]
    right_dist = anchors[half + 2] - p
    total = left_dist + right_dist
    w_left, w_right = right_dist / total, left_dist / total
    sums = [a + b for a, b in zip(_per_bin(left, w_left, p, y, n_bins), _per_bin(right, w_right, p, y, n_bins))]
    weight, sum_p, sum_y = sums
    filled = weight >= empty_weight
    weight = torch.where(filled, weight, 1.0)
    return filled, sum_p / weight, sum_y / weight


def marginal_l1_ace(probs: torch.Tensor, target: torch.Tensor, n_bins: int = 20, binning: str = "hard",
                    ignore_empty_classes: bool = True, empty_weight: float = 0.01) -> torch.Tensor:
    """mL1-ACE of ``B×K×spatial`` probabilities against one-hot labels of the same shape (module docstring)."""
    p, y = probs.flatten(2), target.flatten(2).to(probs.dtype)
    if binning == "hard":
        filled, mean_p, mean_y = hard_bins(p, y, n_bins)
    elif binning == "soft":
        filled, mean_p, mean_y = soft_bins(p, y, n_bins, empty_weight)
    else:
        raise ValueError(f"binning must be one of {', '.join(BINNINGS)}, got {binning!r}")
    gap = (mean_p - mean_y).abs() * filled.to(p.dtype)
    ace = gap.sum(-1) / filled.sum(-1).clamp(min=1)  # the released code's nanmean over the non-empty bins
    if ignore_empty_classes:
        ace = ace * (y.sum(-1) > 0).to(ace.dtype)
    return ace.mean()


class ACEDiceCE(SegmentationLoss):
    """``ace_weight · mL1-ACE + dice_weight · Dice + ce_weight · CE``, as trained by the authors (module docstring).

    ``parts``: ``ace``, ``dice``, ``ce`` (each before its weight).

    Args:
        binning: ``"hard"`` or ``"soft"``.
        n_bins: bins on ``[0, 1]`` (default 20).
        ace_weight, dice_weight, ce_weight: the weights (default 0.33 each, the authors').
        ignore_empty_classes: an image's absent class adds 0 to the mean (default ``True``, the authors').
        empty_weight: the soft binning's floor for an empty bin (default 0.01).

    >>> loss = ACEDiceCE("hard")
    >>> value = loss(torch.zeros(1, 2, 2, 2), torch.tensor([[[0, 1], [1, 0]]]))
    >>> sorted(loss.parts), round(float(loss.parts["ace"]), 4)  # p = 0.5 everywhere, half the voxels of each class
    (['ace', 'ce', 'dice'], 0.0)
    """

    def __init__(self, binning: str = "hard", n_bins: int = 20, ace_weight: float = 0.33, dice_weight: float = 0.33,
                 ce_weight: float = 0.33, ignore_empty_classes: bool = True, empty_weight: float = 0.01) -> None:
        super().__init__()
        if binning not in BINNINGS:
            raise ValueError(f"binning must be one of {', '.join(BINNINGS)}, got {binning!r}")
        if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
            raise ValueError(f"n_bins must be a whole number >= 1, got {n_bins!r}")
        if not isinstance(ignore_empty_classes, bool):
            raise ValueError(f"ignore_empty_classes must be true or false, got {ignore_empty_classes!r}")
        self.binning, self.n_bins, self.ignore_empty_classes = binning, n_bins, ignore_empty_classes
        self.ace_weight = check_number("ace_weight", ace_weight, low=0)
        self.dice_weight = check_number("dice_weight", dice_weight, low=0)
        self.ce_weight = check_number("ce_weight", ce_weight, low=0)
        self.empty_weight = check_number("empty_weight", empty_weight, low=0)
        self.dice = DiceLoss(include_background=True, softmax=True, squared_pred=True, smooth_nr=0.0,
                             smooth_dr=1e-5)

    def _forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        target = one_hot(labels, logits.shape[1], dtype=logits.dtype)
        ce = F.cross_entropy(logits, labels)
        dice = self.dice(logits, target)
        ace = marginal_l1_ace(torch.softmax(logits, 1), target, self.n_bins, self.binning,
                              self.ignore_empty_classes, self.empty_weight)
        self.parts = {"ace": ace.detach(), "dice": dice.detach(), "ce": ce.detach()}
        return self.ace_weight * ace + self.dice_weight * dice + self.ce_weight * ce


class HardACEDiceCE(ACEDiceCE):
    """:class:`ACEDiceCE` with hard binning (``LOSS=ace_hard``)."""

    def __init__(self, n_bins: int = 20, ace_weight: float = 0.33, dice_weight: float = 0.33, ce_weight: float = 0.33,
                 ignore_empty_classes: bool = True) -> None:
        super().__init__("hard", n_bins, ace_weight, dice_weight, ce_weight, ignore_empty_classes)


class SoftACEDiceCE(ACEDiceCE):
    """:class:`ACEDiceCE` with soft binning (``LOSS=ace_soft``)."""

    def __init__(self, n_bins: int = 20, ace_weight: float = 0.33, dice_weight: float = 0.33, ce_weight: float = 0.33,
                 ignore_empty_classes: bool = True, empty_weight: float = 0.01) -> None:
        super().__init__("soft", n_bins, ace_weight, dice_weight, ce_weight, ignore_empty_classes, empty_weight)
