"""MbLS added to the CE + Dice objective (the paper's segmentation-loss combination)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss

from pipeline.losses.base import SegmentationLoss
from pipeline.losses.mbls import check_margin_alpha, margin_penalty
from pipeline.tensors import one_hot


class MarginDiceLoss(SegmentationLoss):
    """``CE + Dice + alpha · mean_{voxel,class} relu(max_j l_j − l_k − margin)``.

    The Dice term excludes the background class (MONAI ``DiceLoss(include_background=False, softmax=True)``, soft
    Dice per image and foreground class with ``smooth_nr = smooth_dr = 1e-5``, mean over images and classes), as in
    the released code for this combination; CE and the L1 margin penalty are those of
    :class:`~pipeline.losses.mbls.MarginLoss` (``alpha = K · λ`` of Eq. 7). ``parts``: ``ce``, ``dice``,
    ``penalty``.

    Args:
        margin: the margin ``m`` (default 10; the paper's grid is 5, 8, 10).
        alpha: the penalty weight (default 0.1).

    Raises:
        ValueError: ``margin`` or ``alpha`` negative or not a number.

    >>> loss = MarginDiceLoss()
    >>> _ = loss(torch.zeros(1, 3, 2, 2), torch.zeros(1, 1, 2, 2))
    >>> sorted(loss.parts)
    ['ce', 'dice', 'penalty']
    """

    def __init__(self, margin: float = 10.0, alpha: float = 0.1) -> None:
        super().__init__()
        self.margin, self.alpha = check_margin_alpha(margin, alpha)
        self.dice = DiceLoss(include_background=False, softmax=True, smooth_nr=1e-5, smooth_dr=1e-5)

    def _forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits, labels)
        penalty = margin_penalty(logits, self.margin, "l1")
        dice = self.dice(logits, one_hot(labels, logits.shape[1], dtype=logits.dtype))
        self.parts = {"ce": ce.detach(), "dice": dice.detach(), "penalty": penalty.detach()}
        return ce + self.alpha * penalty + dice
