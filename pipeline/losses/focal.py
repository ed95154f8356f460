"""Focal loss on the softmax (Lin et al. 2017), as used for calibration by Mukhoti et al. 2020 (paper Eq. 5)."""

from __future__ import annotations

import torch
from monai.losses import FocalLoss as MonaiFocalLoss

from pipeline.losses.base import SegmentationLoss, check_number
from pipeline.tensors import one_hot


class Focal(SegmentationLoss):
    """Mean over voxels of ``-(1 - p_y)^γ log p_y`` (softmax over the classes, no α class weighting).

    This is Eq. 5's ``-Σ_k (1 - s_k)^γ y_k log s_k`` averaged over voxels, as in the released code. The per-class
    terms come from MONAI's ``FocalLoss(use_softmax=True)``; they are summed over classes (only the true class is
    non-zero) and averaged over voxels. MONAI's own ``reduction="mean"`` averages over classes as well, which
    would make the loss ``K`` times smaller than the convention.

    Args:
        gamma: the focusing parameter γ (default 3; the paper's grid is 1, 2, 3). ``γ = 0`` is cross-entropy.
            Values in (0, 1) are rejected: the derivative of ``(1 - p)^γ`` is infinite at ``p = 1``, which a
            confident network reaches in float32, and training would stop on NaN gradients.

    Raises:
        ValueError: ``gamma`` is negative, in (0, 1), or not a number.

    >>> round(float(Focal(gamma=2)(torch.zeros(1, 2, 1, 1), torch.zeros(1, 1, 1, 1))), 6)  # 0.5² · log 2
    0.173287
    """

    def __init__(self, gamma: float = 3.0) -> None:
        super().__init__()
        self.gamma = check_number("gamma", gamma, low=0)
        if 0 < self.gamma < 1:
            raise ValueError(
                f"gamma must be 0 or >= 1, got {gamma}: for 0 < gamma < 1 the gradient of (1 - p)^gamma is "
                "infinite at p = 1"
            )
        self.focal = MonaiFocalLoss(include_background=True, use_softmax=True, gamma=self.gamma, reduction="none")

    def _forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # B×K×spatial, zero except at the true class
        per_class = self.focal(logits, one_hot(labels, logits.shape[1], dtype=logits.dtype))
        return per_class.sum(dim=1).mean()
