"""Margin-based label smoothing (MbLS), Liu et al. CVPR 2022 / Murugesan et al. MedIA 2024, Eq. 7.

The penalties act on the logit distances ``d_k = max_j l_j − l_k`` (Eq. 1). ``CE + penalty`` is computed by one
fused autograd function (:func:`ce_and_margin_penalty`): the cross-entropy and the penalty share the shifted logits
``l − max_j l_j``, work in place in scratch buffers kept from one step to the next (:class:`MarginWorkspace`) and form
both gradients in the forward, instead of autograd's chain of fresh temporaries, boolean masks and gathers
(``make bench-losses`` measures the cost against plain cross-entropy).
"""

from __future__ import annotations

import functools
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
    """Four logits-sized scratch tensors that :func:`ce_and_margin_penalty` reuses from one training step to the next.

    Allocating fresh logits-sized temporaries at every step can cost more than the arithmetic done on them (new
    memory is zero-filled page by page by the operating system). The buffers are lent to one autograd graph at a
    time: a call made while an earlier graph still holds them (its backward has not run, and the graph is alive)
    gets fresh tensors instead, so results never depend on the reuse. Once its backward has run, a graph gives the
    buffers back: a second backward through it (``retain_graph=True``) after a newer call has reused them is refused
    by autograd ("modified by an inplace operation") rather than computed from overwritten values.
    """

    n_buffers = 4

    def __init__(self) -> None:
        self._buffers: tuple[torch.Tensor, ...] | None = None
        self._owner = None  # weak reference to the autograd context that holds the buffers

    def acquire(self, like: torch.Tensor, ctx) -> tuple[torch.Tensor, ...]:
        """:attr:`n_buffers` contiguous tensors shaped like ``like``: the reused ones when free, else new ones."""
        if self._owner is not None and self._owner() is not None:
            return _scratch(like)
        b = self._buffers
        if b is None or b[0].shape != like.shape or b[0].dtype != like.dtype or b[0].device != like.device:
            b = self._buffers = _scratch(like)
        self._owner = weakref.ref(ctx)
        return b

    def release(self, ctx) -> None:
        if self._owner is not None and self._owner() is ctx:
            self._owner = None

    def __getstate__(self) -> dict:  # copies and pickles start empty: scratch values are never worth keeping
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


_LOG2E = 1.4426950408889634  # e^x = 2^(x·log2 e)


@functools.lru_cache(maxsize=32)
def _class_ids_cached(n_classes: int, ndim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.arange(n_classes, dtype=dtype, device=device).view(1, -1, *[1] * (ndim - 2))


def _class_ids(n_classes: int, like: torch.Tensor) -> torch.Tensor:
    """``0, 1, …, K−1`` along axis 1, broadcastable against ``like`` (``B×K×spatial``), in its dtype and device."""
    return _class_ids_cached(n_classes, like.ndim, like.dtype, like.device)


def _scratch(like: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(torch.empty(like.shape, dtype=like.dtype, device=like.device)
                 for _ in range(MarginWorkspace.n_buffers))


class _CEMargin(torch.autograd.Function):
    """``(CE, penalty, CE + alpha · penalty)`` of logits ``l``, and their gradients, in a few passes of float ops.

    With ``M = max_k l_k``, everything follows from the shifted logits ``s = l − M <= 0`` (``s_k = −d_k``, Eq. 1):
    ``softmax = e^s / Z`` with ``Z = Σ_k e^s_k >= 1``, ``CE = mean(log Z − s_y)``, and with ``N`` voxels, ``K``
    classes and ``w_k = ∂P/∂d_k`` of the per-element penalty ``P``::

        ∂CE/∂l  = (softmax − onehot(y)) / N
        ∂pen/∂l = −(w − e_max · Σ_k w_k) / (N·K)

    (the max receives what the distances lose; argmax ties share it equally, like the gradient of ``torch.amax``).
    Neither the log-softmax nor a gather/scatter by label is materialised: the labels enter as a float one-hot
    (one comparison with the class indices), the sums as dot products, and both gradient directions are formed in
    the forward, so that the backward is one multiply-add (a single ``add`` for ``loss.backward()`` on CPU). Every
    step is an elementwise or class-axis float op, in place in the workspace (boolean masks, ``where``, ``argmax``,
    ``gather`` and ``scatter`` cost several times more on CPU). The weighted sum is an output too, which spares
    autograd two nodes.
    """

    @staticmethod
    def forward(ctx, logits, labels, margin: float, alpha: float, penalty: str, workspace: MarginWorkspace | None):
        ctx.set_materialize_grads(False)  # usually only the weighted sum gets a gradient: skip zero tensors
        n_classes = logits.shape[1]
        numel = logits.numel()
        shifted, probs, w, onehot = _scratch(logits) if workspace is None else workspace.acquire(logits, ctx)
        s_flat = shifted.view(-1)
        torch.eq(labels.unsqueeze(1).to(logits.dtype), _class_ids(n_classes, logits), out=onehot)
        max_logit = logits.amax(dim=1, keepdim=True)
        torch.sub(logits, max_logit, out=shifted)  # s = −d
        torch.mul(shifted, _LOG2E, out=probs).exp2_()  # e^s (torch's exp2 is several times faster than its exp)
        z = probs.sum(dim=1, keepdim=True)
        # CE = (Σ_voxels log Z − Σ s_y) / N
        ce = torch.log(z).sum().sub_(torch.dot(s_flat, onehot.view(-1))).mul_(n_classes / numel)
        if penalty == "l1":
            torch.lt(shifted, -margin, out=w)  # w = [d > m]
            count = w.sum(dim=1, keepdim=True)
            # Σ relu(d − m) = Σ w · (−s − m)
            value = torch.dot(w.view(-1), s_flat).add_(count.sum(), alpha=margin).mul_(-1.0 / numel)
        else:
            if penalty == "l2_hinge":
                F.softshrink(shifted, margin, out=w)  # −relu(d − m), as s <= 0
            else:
                torch.add(shifted, margin, out=w)  # −(d − m)
            flat = w.view(-1)
            value = torch.dot(flat, flat).mul_(1.0 / numel)
            w.mul_(-2.0)
        is_max = shifted.eq_(0.0)  # 1 at the max and at tied maxima
        if penalty != "l1":
            if penalty == "l2_two_sided":
                w.add_(is_max, alpha=2.0 * margin)  # the max's own term (d = 0, a constant) has no gradient
            count = w.sum(dim=1, keepdim=True)
        # share = Σ_k w_k / #maxima; w − is_max · share is the penalty's gradient times −N·K
        n_voxels = numel // n_classes
        if is_max.device.type == "cpu" and n_voxels < 2**24 and float(is_max.sum()) == n_voxels:
            neg_share = count.neg_()  # no tie anywhere (checked exactly: a float32 sum of < 2^24 ones; no device sync)
        else:
            neg_share = count.div_(is_max.sum(dim=1, keepdim=True)).neg_()
        negative = torch.addcmul(w, is_max, neg_share, out=w)
        # ∂CE/∂l = (softmax − onehot) / N
        ce_grad = probs.div_(z.mul_(numel / n_classes)).sub_(onehot, alpha=n_classes / numel)
        ctx.save_for_backward(ce_grad, negative)
        ctx.workspace = workspace
        ctx.alpha = alpha
        return ce, value, torch.add(ce, value, alpha=alpha)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_ce, grad_pen, grad_total):
        ce_grad, negative = ctx.saved_tensors
        g_ce, g_pen = grad_ce, grad_pen
        if grad_total is not None:
            g_ce = grad_total if g_ce is None else g_ce + grad_total
            g_pen = grad_total * ctx.alpha if g_pen is None else g_pen + grad_total * ctx.alpha
        # g_ce · ce_grad − g_pen · negative / numel, into a fresh tensor, not a workspace buffer: whoever receives
        # the gradient may keep it (autograd stores it as ``logits.grad`` without a copy when nothing else refers to it)
        out = torch.empty_like(negative)
        if g_pen is None:
            grad = None if g_ce is None else torch.mul(ce_grad, g_ce, out=out)
        else:
            pen_scale = g_pen * (-1.0 / negative.numel())
            if g_ce is None:
                grad = torch.mul(negative, pen_scale, out=out)
            elif out.device.type == "cpu" and float(g_ce) == 1.0:  # loss.backward(): one pass (no device sync on CPU)
                grad = torch.add(ce_grad, negative, alpha=float(pen_scale), out=out)
            else:
                grad = torch.mul(negative, pen_scale, out=out).addcmul_(ce_grad, g_ce)
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
    ce, value, total = _CEMargin.apply(logits, labels, float(margin), float(alpha), penalty, workspace)
    return total, ce, value


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
