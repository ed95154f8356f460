"""Margin-based label smoothing (MbLS), Liu et al. CVPR 2022 / Murugesan et al. MedIA 2024, Eq. 7.

The penalties act on the logit distances ``d_k = max_j l_j − l_k`` (Eq. 1). ``CE + penalty`` is computed by one
fused autograd function (:func:`ce_and_margin_penalty`): the penalty reuses the cross-entropy's log-softmax, works
in place in two scratch buffers kept from one step to the next (:class:`MarginWorkspace`) and writes the gradients
of both terms into one of them, instead of autograd's chain of fresh temporaries and boolean masks
(``make bench-losses`` measures the cost against plain cross-entropy).
"""

from __future__ import annotations

import weakref

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


class MarginWorkspace:
    """Two logits-sized scratch tensors that :func:`ce_and_margin_penalty` reuses from one training step to the next.

    Allocating fresh logits-sized temporaries at every step can cost more than the arithmetic done on them (new
    memory is zero-filled page by page by the operating system). The buffers are lent to one autograd graph at a
    time: a call made while an earlier graph still holds them (its backward has not run, and the graph is alive)
    gets fresh tensors instead, so results never depend on the reuse. Once its backward has run, a graph gives the
    buffers back: a second backward through it (``retain_graph=True``) after a newer call has reused them is refused
    by autograd ("modified by an inplace operation") rather than computed from overwritten values.
    """

    def __init__(self) -> None:
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        self._owner = None  # weak reference to the autograd context that holds the buffers

    def acquire(self, like: torch.Tensor, ctx) -> tuple[torch.Tensor, torch.Tensor]:
        """Two contiguous tensors shaped like ``like``: the reused ones when free, else new ones."""
        if self._owner is not None and self._owner() is not None:
            return _empty2(like)
        b = self._buffers
        if b is None or b[0].shape != like.shape or b[0].dtype != like.dtype or b[0].device != like.device:
            b = self._buffers = _empty2(like)
        self._owner = weakref.ref(ctx)
        return b

    def release(self, ctx) -> None:
        if self._owner is not None and self._owner() is ctx:
            self._owner = None

    def __getstate__(self) -> dict:  # copies and pickles start empty: scratch values are never worth keeping
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


def _empty2(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty(like.shape, dtype=like.dtype, device=like.device),
            torch.empty(like.shape, dtype=like.dtype, device=like.device))


class _NLLMargin(torch.autograd.Function):
    """``(NLL, penalty, NLL + alpha · penalty)`` of log-probabilities ``logp``; both gradients in one buffer.

    Distances are taken on ``logp = log_softmax(l)``: ``max_j logp_j − logp_k = max_j l_j − l_k`` (the log-sum-exp
    cancels). With ``N`` voxels, ``K`` classes and ``w_k = ∂P/∂d_k`` of the per-element penalty ``P``:
    ``∂NLL/∂logp = −onehot(y) / N`` and ``∂pen/∂logp = (−w + e_argmax · Σ_k w_k) / (N·K)`` (the max receives what
    the distances lose; argmax ties share it equally, like the gradient of ``torch.amax``). Autograd's
    log-softmax backward turns this into the gradient with respect to the logits.

    Every step is a float op into one of two logits-sized buffers, in place (boolean masks, ``where`` and
    ``argmax`` cost far more on CPU): the distances become the excess over the margin, then ``w``, then
    ``w − (1 − off_max) · share`` (one ``lerp``) with ``off_max = [d > 0]`` and ``share = Σ_k w_k / #maxima``; the
    backward writes that times ``−c`` into the other buffer and adds the NLL's ``−1/N`` at the labels. The weighted
    sum is an output too, which spares autograd two nodes.
    """

    @staticmethod
    def forward(ctx, logp, labels, margin: float, alpha: float, penalty: str, workspace: MarginWorkspace | None):
        ctx.set_materialize_grads(False)  # usually only the weighted sum gets a gradient: skip zero tensors
        index = labels.unsqueeze(1)
        nll = logp.gather(1, index).mean().neg_()
        dist, off_max = _empty2(logp) if workspace is None else workspace.acquire(logp, ctx)
        torch.sub(logp.amax(dim=1, keepdim=True), logp, out=dist)
        torch.sign(dist, out=off_max)  # 0 at the max (and at ties), 1 elsewhere
        if penalty == "l1":
            excess = F.softshrink(dist, margin, out=dist)  # relu(d − m), as d >= 0
            value = excess.mean()
            w = excess.sign_()
        else:
            excess = F.softshrink(dist, margin, out=dist) if penalty == "l2_hinge" else dist.sub_(margin)
            flat = excess.view(-1)
            value = torch.dot(flat, flat).div_(flat.numel())
            w = excess.mul_(2.0)
            if penalty == "l2_two_sided":
                # the max's own term (d = 0, a constant) has no gradient: drop its w = −2m
                w.mul_(off_max)
        # what the distances lose goes to the max, shared by tied maxima: share = Σ_k w_k / (K − Σ_k off_max_k);
        # −share + off_max · (w + share) = w − (1 − off_max) · share is the penalty's gradient times −N·K
        neg_share = w.sum(dim=1, keepdim=True).div_(off_max.sum(dim=1, keepdim=True).sub_(logp.shape[1]))
        negative = torch.lerp(neg_share, w, off_max, out=w)
        ctx.save_for_backward(index, negative)
        ctx.scratch = off_max  # spent: the backward writes into it (the gradient only ever flows into the
        # log-softmax's backward, which does not keep it)
        ctx.workspace = workspace
        ctx.alpha = alpha
        return nll, value, torch.add(nll, value, alpha=alpha)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_nll, grad_pen, grad_total):
        index, negative = ctx.saved_tensors
        g_nll, g_pen = grad_nll, grad_pen
        if grad_total is not None:
            g_nll = grad_total if g_nll is None else g_nll + grad_total
            g_pen = grad_total * ctx.alpha if g_pen is None else g_pen + grad_total * ctx.alpha
        if g_pen is None:
            grad = ctx.scratch.zero_()
        else:
            grad = torch.mul(negative, g_pen * (-1.0 / negative.numel()), out=ctx.scratch)
        if g_nll is not None:
            grad.scatter_add_(1, index, (g_nll * (-1.0 / index.numel())).expand(index.shape))
        if ctx.workspace is not None:
            ctx.workspace.release(ctx)
        return grad, None, None, None, None, None


def ce_and_margin_penalty(logits: torch.Tensor, labels: torch.Tensor, margin: float, alpha: float = 0.1,
                          penalty: str = "l1", workspace: MarginWorkspace | None = None):
    """``(CE + alpha · penalty, CE, penalty)``: the mean cross-entropy and :func:`margin_penalty`, fused for speed.

    Args:
        logits: ``B×K×spatial`` (float32 or float64).
        labels: ``B×spatial`` ``long`` class indices.
        margin: ``m >= 0``.
        alpha: the weight of the penalty in the first output (default 0.1).
        penalty: one of :data:`PENALTIES` (default ``"l1"``).
        workspace: scratch buffers to reuse between calls (a loss module keeps one); ``None``: fresh ones.

    Returns:
        three scalars, all differentiable with respect to ``logits`` (first-order gradients).
    """
    if penalty not in PENALTIES:
        raise ValueError(f"penalty must be one of {', '.join(PENALTIES)}, got {penalty!r}")
    nll, value, total = _NLLMargin.apply(torch.log_softmax(logits, dim=1), labels, float(margin), float(alpha),
                                         penalty, workspace)
    return total, nll, value


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
        self.workspace = MarginWorkspace()

    def _forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        total, ce, penalty = ce_and_margin_penalty(logits, labels, self.margin, self.alpha, self.penalty,
                                                   self.workspace)
        self.parts = {"ce": ce.detach(), "penalty": penalty.detach()}
        return total
