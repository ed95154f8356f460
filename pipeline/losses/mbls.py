"""Margin-based label smoothing (MbLS), Liu et al. CVPR 2022 / Murugesan et al. MedIA 2024, Eq. 7."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.losses.base import SegmentationLoss


def logit_distances(logits: torch.Tensor) -> torch.Tensor:
    """``d_k = max_j l_j − l_k`` along the class axis 1 (the argmax class has distance 0)."""
    return logits.amax(dim=1, keepdim=True) - logits


def margin_penalty(logits: torch.Tensor, margin: float) -> torch.Tensor:
    """Mean over (voxel, class) of ``relu(max_j l_j − l_k − margin)``: the released code's L1 penalty.

    Args:
        logits: ``B×K×spatial``.
        margin: ``m >= 0``; distances up to ``m`` cost nothing.
    """
    return F.relu(logit_distances(logits) - margin).mean()


def _check_margin(margin: float, alpha: float) -> None:
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")


class MarginLoss(SegmentationLoss):
    """MbLS with the L1 (ReLU) penalty: ``CE + alpha · mean_{voxel,class} relu(max_j l_j − l_k − margin)``.

    The mean over classes follows the released code, so its ``alpha`` relates to Eq. 7's per-voxel sum
    ``λ Σ_k relu(…)`` by ``λ_Eq7 = alpha / K``: ``alpha=0.1`` here equals ``λ=0.1/K`` in the paper's text.
    The max is over the raw logits of all classes, argmax class included (its distance is 0, so it adds 0).

    Args:
        margin: the margin ``m`` on logit distances (default 10; the paper's grid is 5, 8, 10).
        alpha: the penalty weight (default 0.1, fixed in the paper).

    Raises:
        ValueError: when ``margin`` or ``alpha`` is negative.

    >>> loss = MarginLoss(margin=1.0, alpha=0.5)
    >>> logits = torch.tensor([[[[3.0]], [[0.0]]]])  # distances 0 and 3: penalty (0 + 2) / 2 = 1
    >>> round(float(loss(logits, torch.zeros(1, 1, 1, 1))) - float(loss.parts["ce"]), 4)
    0.5
    """

    def __init__(self, margin: float = 10.0, alpha: float = 0.1) -> None:
        super().__init__()
        _check_margin(margin, alpha)
        self.margin = float(margin)
        self.alpha = float(alpha)

    def _forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits, labels)
        penalty = margin_penalty(logits, self.margin)
        self.parts = {"ce": ce.detach(), "penalty": penalty.detach()}
        return ce + self.alpha * penalty
