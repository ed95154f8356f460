"""Margin-based label smoothing (MbLS), Liu et al. CVPR 2022 / Murugesan et al. MedIA 2024, Eq. 7.

The penalties act on the logit distances ``d_k = max_j l_j − l_k`` (Eq. 1), written as plain autograd operations:
``F.cross_entropy(l, y) + alpha · relu(d − m).mean()``. A fused autograd function of CE and penalty once made the
loss alone as cheap as CE, but ``make bench-losses`` measured a whole training step of the default run only 1-3 %
faster with it (the loss is a few percent of a step), so the plain expression was kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.losses.base import SegmentationLoss, check_number

#: the penalties of :func:`margin_penalty`: L1 ``relu(d − m)`` (Eq. 7), the one-sided quadratic hinge
#: ``relu(d − m)²`` and the released code's two-sided ``(d − m)²``
PENALTIES = ("l1", "l2_hinge", "l2_two_sided")


def logit_distances(logits: torch.Tensor) -> torch.Tensor:
    """``d_k = max_j l_j − l_k`` along the class axis 1 (the argmax class has distance 0); Eq. 1."""
    return logits.amax(dim=1, keepdim=True) - logits


def margin_penalty(logits: torch.Tensor, margin: float, penalty: str = "l1") -> torch.Tensor:
    """Mean over (voxel, class) of a penalty on ``d_k − margin``.

    Args:
        logits: ``B×K×spatial``.
        margin: ``m >= 0``; for the one-sided penalties, distances up to ``m`` cost nothing.
        penalty: ``"l1"``: ``relu(d − m)`` (the released code's MbLS); ``"l2_hinge"``: ``relu(d − m)²``;
            ``"l2_two_sided"``: ``(d − m)²`` (the released code's L2 variant, which also penalises distances below
            the margin and adds ``m²`` for the argmax class).
    """
    excess = logit_distances(logits) - margin
    if penalty == "l1":
        return F.relu(excess).mean()
    if penalty == "l2_hinge":
        return F.relu(excess).square().mean()
    if penalty == "l2_two_sided":
        return excess.square().mean()
    raise ValueError(f"penalty must be one of {', '.join(PENALTIES)}, got {penalty!r}")


def check_margin_alpha(margin: float, alpha: float) -> tuple[float, float]:
    """``(margin, alpha)`` as floats; both must be numbers ``>= 0``."""
    return check_number("margin", margin, low=0), check_number("alpha", alpha, low=0)


class MarginLoss(SegmentationLoss):
    """MbLS with the L1 (ReLU) penalty: ``CE + alpha · mean_{voxel,class} relu(max_j l_j − l_k − margin)``.

    The mean over classes follows the released code, so its ``alpha`` relates to Eq. 7's per-voxel sum
    ``λ Σ_k relu(…)`` by ``λ_Eq7 = alpha / K``: ``alpha=0.1`` here equals ``λ=0.1/K`` in the paper's text.
    The max is over the raw logits of all classes, argmax class included (its distance is 0, so it adds 0).
    ``parts``: ``ce`` and ``penalty`` (the mean before the factor ``alpha``).

    Args:
        margin: the margin ``m`` on logit distances (default 10; the paper's grid is 5, 8, 10).
        alpha: the penalty weight (default 0.1, fixed in the paper).

    Raises:
        ValueError: when ``margin`` or ``alpha`` is negative or not a number.

    >>> loss = MarginLoss(margin=1.0, alpha=0.5)
    >>> logits = torch.tensor([[[[3.0]], [[0.0]]]])  # distances 0 and 3: penalty (0 + 2) / 2 = 1
    >>> round(float(loss(logits, torch.zeros(1, 1, 1, 1))) - float(loss.parts["ce"]), 4)
    0.5
    """

    penalty = "l1"

    def __init__(self, margin: float = 10.0, alpha: float = 0.1) -> None:
        super().__init__()
        self.margin, self.alpha = check_margin_alpha(margin, alpha)

    def _forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits, labels)
        penalty = margin_penalty(logits, self.margin, self.penalty)
        self.parts = {"ce": ce.detach(), "penalty": penalty.detach()}
        return ce + self.alpha * penalty
