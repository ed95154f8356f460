"""Adaptive and conditional label smoothing (ACLS, Park et al., ICCV 2023), per voxel.

As the released code (``cvlab-yonsei/ACLS``, ``calibrate/losses/acls.py``), whose classification loss is applied to
every voxel by flattening the spatial axes: with ``z`` a voxel's logits and ``z* = max_k z_k``,

``L = CE + alpha · [pos_lambda · Σ_{i,k: z_ik = z*_i} relu(z*_i − m)² / N
+ neg_lambda · Σ_{i,k: z_ik ≠ z*_i} relu(sg(z*_i) − z_ik − m)² / (N(K − 1))]``

(``sg``: stop-gradient). Ties as in the code: every class whose logit equals the maximum is *positive* (the
indicator ``z* == z``), so a voxel with ``t`` tied maxima adds ``t`` positive terms and ``K − t`` negative ones,
while the positive terms' gradient reaches the maximum's first index only (``torch.max``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.losses.base import SegmentationLoss, check_number


def acls_regulariser(logits: torch.Tensor, margin: float, pos_lambda: float, neg_lambda: float) -> torch.Tensor:
    """The bracket of the module docstring for ``B×K×spatial`` logits (``N`` = voxels of the batch)."""
    k = logits.shape[1]
    n = logits.numel() // k
    top = logits.max(dim=1, keepdim=True).values  # gradient to the first maximal index, as the released code
    positive = (top.detach() == logits.detach()).to(logits.dtype)
    pos = positive * F.relu(top - margin).square()
    neg = (1.0 - positive) * F.relu(top.detach() - logits - margin).square()
    return pos_lambda * pos.sum() / n + neg_lambda * neg.sum() / (n * (k - 1.0))


class AdaptiveConditionalLabelSmoothing(SegmentationLoss):
    """ACLS: ``CE + alpha · regulariser`` (:func:`acls_regulariser`); ``parts``: ``ce`` and ``penalty`` (the
    regulariser before the factor ``alpha``).

    Args:
        alpha: the regulariser's weight (default 0.1, the authors').
        pos_lambda, neg_lambda: the weights of the positive and negative terms (defaults 1.0 and 0.1).
        margin: ``m`` (default 10).

    >>> loss = AdaptiveConditionalLabelSmoothing(alpha=1.0, margin=1.0)
    >>> logits = torch.tensor([[[[3.0]], [[0.0]]]])  # positive relu(3 − 1)² = 4, negative relu(3 − 0 − 1)² · 0.1
    >>> round(float(loss(logits, torch.zeros(1, 1, 1, dtype=torch.long))) - float(loss.parts["ce"]), 4)
    4.4
    """

    def __init__(self, alpha: float = 0.1, pos_lambda: float = 1.0, neg_lambda: float = 0.1,
                 margin: float = 10.0) -> None:
        super().__init__()
        self.alpha = check_number("alpha", alpha, low=0)
        self.pos_lambda = check_number("pos_lambda", pos_lambda, low=0)
        self.neg_lambda = check_number("neg_lambda", neg_lambda, low=0)
        self.margin = check_number("margin", margin, low=0)

    def _forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits, labels)
        penalty = acls_regulariser(logits, self.margin, self.pos_lambda, self.neg_lambda)
        self.parts = {"ce": ce.detach(), "penalty": penalty.detach()}
        return ce + self.alpha * penalty
