"""Cross-entropy, the paper's baseline objective."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.losses.base import SegmentationLoss


class CrossEntropy(SegmentationLoss):
    """Mean over all voxels (background included) of ``-log p_y``.

    >>> float(CrossEntropy()(torch.zeros(1, 2, 1, 1), torch.zeros(1, 1, 1, 1)))  # log 2
    0.6931471824645996
    """

    def _forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels)
