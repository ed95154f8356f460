"""Explicit confidence penalty (Pereyra et al. 2017): cross-entropy minus a weighted entropy of the prediction."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.losses.base import SegmentationLoss, check_number

#: probabilities are clamped to [EPS, 1 - EPS] before ``p log p``, as in the released code
EPS = 1e-10


def mean_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean over (voxel, class) of ``-p log p`` with ``p = softmax(logits)`` clamped to ``[1e-10, 1 - 1e-10]``.

    That is the per-voxel entropy ``H(p) = -Σ_k p_k log p_k`` divided by ``K``, averaged over voxels.

    Args:
        logits: ``B×K×spatial``.
    """
    p = torch.softmax(logits, dim=1).clamp(EPS, 1.0 - EPS)
    return -(p * p.log()).mean()


class ConfidencePenalty(SegmentationLoss):
    """ECP: ``CE − α · mean_{voxel,class}(−p log p)``, with ``p`` clamped to ``[1e-10, 1 − 1e-10]``.

    The paper writes the penalty as ``−H(s)`` per voxel (the ECP form of Eq. 5's bound); the released code averages
    ``−p log p`` over classes too, so its ``α`` is ``K`` times the weight of a per-voxel entropy:
    ``α_code = K · β`` in ``CE − β H(s)``. ``parts``: ``ce`` and ``entropy`` (the mean over voxel×class above).

    Args:
        alpha: the penalty weight α (default 0.1; the paper's grid is 0.1, 0.2, 0.3).

    Raises:
        ValueError: ``alpha`` is negative or not a number.

    >>> loss = ConfidencePenalty(alpha=0.5)
    >>> v = loss(torch.zeros(1, 2, 1, 1), torch.zeros(1, 1, 1, 1))  # p = (½, ½): CE = log 2, entropy = ½ log 2
    >>> round(float(v), 6), round(float(loss.parts["entropy"]), 6)
    (0.51986, 0.346574)
    """

    def __init__(self, alpha: float = 0.1) -> None:
        super().__init__()
        self.alpha = check_number("alpha", alpha, low=0)

    def _forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits, labels)
        entropy = mean_entropy(logits)
        self.parts = {"ce": ce.detach(), "entropy": entropy.detach()}
        return ce - self.alpha * entropy
