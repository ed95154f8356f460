"""Label smoothing (Szegedy et al. 2016), the paper's Eq. 3."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.losses.base import SegmentationLoss, check_number


class LabelSmoothing(SegmentationLoss):
    """Mean over voxels of the cross-entropy against ``y_k (1 - α) + α / K`` (Eq. 3 exactly).

    Computed by ``torch.nn.functional.cross_entropy(label_smoothing=α)``, whose targets are exactly Eq. 3's.

    Args:
        alpha: the smoothing α in [0, 1] (default 0.1; the paper's grid is 0.1, 0.2, 0.3). ``α = 0`` is CE.

    Raises:
        ValueError: ``alpha`` is outside [0, 1] or not a number.

    >>> round(float(LabelSmoothing(0.2)(torch.tensor([[[[1.0]], [[0.0]]]]), torch.zeros(1, 1, 1, 1))), 6)
    0.413262
    """

    def __init__(self, alpha: float = 0.1) -> None:
        super().__init__()
        self.alpha = check_number("alpha", alpha, low=0, high=1)

    def _forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels, label_smoothing=self.alpha)
