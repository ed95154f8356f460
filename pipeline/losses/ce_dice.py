"""Cross-entropy + Dice, the segmentation baseline of the paper's comparison (released code: 1:1, background kept)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss

from pipeline.losses.base import SegmentationLoss
from pipeline.tensors import one_hot


class CEDice(SegmentationLoss):
    """``CE + Dice`` with weights 1:1, the Dice over all classes **including the background**.

    The Dice term is MONAI's ``DiceLoss(to_onehot_y=True, softmax=True, include_background=True)`` with its
    defaults (soft Dice per image and class, ``smooth_nr = smooth_dr = 1e-5``, mean over images and classes); the
    CE term is the mean over voxels of ``-log p_y``. The sum equals MONAI's ``DiceCELoss(to_onehot_y=True,
    softmax=True)``; it is computed in two parts so that both can be logged (``parts``: ``ce``, ``dice``). The
    released code passed ``include_background=False`` to a loss that ignored it, so its numbers include the
    background; this class reproduces that.

    >>> loss = CEDice()
    >>> value = loss(torch.zeros(1, 2, 2, 2), torch.tensor([[[[0, 1], [1, 0]]]]))
    >>> sorted(loss.parts)
    ['ce', 'dice']
    """

    def __init__(self) -> None:
        super().__init__()
        self.dice = DiceLoss(include_background=True, softmax=True)

    def _forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits, labels)
        dice = self.dice(logits, one_hot(labels, logits.shape[1], dtype=logits.dtype))
        self.parts = {"ce": ce.detach(), "dice": dice.detach()}
        return ce + dice

