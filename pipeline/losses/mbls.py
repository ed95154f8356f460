"""Margin-based label smoothing (MbLS), Liu et al. CVPR 2022 / Murugesan et al. MedIA 2024, Eq. 7.

The penalties act on the logit distances ``d_k = max_j l_j − l_k`` (Eq. 1). ``CE + penalty`` is computed by one
fused autograd function (:func:`ce_and_margin_penalty`): the penalty reuses the cross-entropy's log-softmax and
the gradients of both terms are written into one buffer in a few in-place float passes, instead of autograd's chain
of temporaries and boolean masks; this keeps MbLS close to the cost of plain cross-entropy (``make bench-losses``).
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
    """Mean over (voxel, class) of a penalty on ``d_k − margin`` (plain autograd; see :func:`ce_and_margin_penalty`).

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


class _NLLMargin(torch.autograd.Function):
    """Mean NLL and mean margin penalty of log-probabilities ``logp``; both gradients written into one buffer.

    Distances are taken on ``logp = log_softmax(l)``: ``max_j logp_j − logp_k = max_j l_j − l_k`` (the log-sum-exp
    cancels). With ``N`` voxels, ``K`` classes and ``w_k = ∂P/∂d_k`` of the per-element penalty ``P``:
    ``∂NLL/∂logp = −onehot(y) / N`` and ``∂pen/∂logp = (−w + e_argmax · Σ_k w_k) / (N·K)`` (the max receives what
    the distances lose; argmax ties share it equally, like the gradient of ``torch.amax``). Autograd's
    log-softmax backward turns this into the gradient with respect to the logits. Every elementwise step is a
    float op, in place where possible: comparisons into boolean masks cost far more on CPU.
    """

    @staticmethod
    def forward(ctx, logp: torch.Tensor, labels: torch.Tensor, margin: float, penalty: str):
        nll = F.nll_loss(logp, labels)
        dist = torch.sub(logp.amax(dim=1, keepdim=True), logp)
        is_max = torch.sign(dist).neg_().add_(1.0)  # 1 at the max (and at ties), 0 elsewhere
        excess = dist.sub_(margin)
        if penalty == "l1":
            excess.clamp_min_(0.0)
            value = excess.mean()
            w = excess.sign_()
        elif penalty == "l2_hinge":
            excess.clamp_min_(0.0)
            value = excess.square().mean()
            w = excess.mul_(2.0)
        else:
            value = excess.square().mean()
            w = excess.mul_(2.0)
        share = w.sum(dim=1, keepdim=True).div_(is_max.sum(dim=1, keepdim=True))
        ctx.save_for_backward(labels, w, is_max, share)
        return nll, value

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_nll: torch.Tensor, grad_pen: torch.Tensor):
        labels, w, is_max, share = ctx.saved_tensors
        n = labels.numel()
        c = grad_pen / (n * w.shape[1])
        grad = torch.mul(w, -c)
        grad.addcmul_(is_max, share * c)
        index = labels.unsqueeze(1)
        grad.scatter_add_(1, index, (-grad_nll / n).to(grad.dtype).expand(index.shape))
        return grad, None, None, None


def ce_and_margin_penalty(logits: torch.Tensor, labels: torch.Tensor, margin: float, penalty: str = "l1"):
    """``(CE, penalty)``: the mean cross-entropy and :func:`margin_penalty`, computed together for speed.

    Args:
        logits: ``B×K×spatial`` (float32 or float64).
        labels: ``B×spatial`` ``long`` class indices.
        margin: ``m >= 0``.
        penalty: one of :data:`PENALTIES`.

    Returns:
        two scalars, both differentiable with respect to ``logits`` (first-order gradients only).
    """
    if penalty not in PENALTIES:
        raise ValueError(f"penalty must be one of {', '.join(PENALTIES)}, got {penalty!r}")
    return _NLLMargin.apply(torch.log_softmax(logits, dim=1), labels, float(margin), penalty)


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
        ce, penalty = ce_and_margin_penalty(logits, labels, self.margin, self.penalty)
        self.parts = {"ce": ce.detach(), "penalty": penalty.detach()}
        return ce + self.alpha * penalty
