"""The training objectives of the MbLS pipeline in plain autograd, for a bundle's ``configs/train.json``.

Each class computes the same value and gradient as the pipeline's loss of the same name (the pipeline's tests
check it); a bundle cannot import the pipeline, so the formulas are written out here. Every loss takes logits
``B×K×spatial`` (class axis 1) and integer labels ``B×1×spatial`` or ``B×spatial`` (MONAI style: float tensors of
whole numbers are fine) and returns one scalar; half-precision logits are computed on in float32.

Reference: Murugesan et al., "Calibrating Segmentation Networks with Margin-based Label Smoothing", Medical Image
Analysis 2024 (MbLS, Eq. 7; the other losses are its baselines, Eq. 3-5). Since then: NACL (Murugesan et al.,
MICCAI 2023), mL1-ACE (Barfoot et al., MICCAI 2024), ACLS (Park et al., ICCV 2023).

>>> loss = MarginLoss(margin=10.0, alpha=0.1)
>>> float(loss(torch.zeros(1, 2, 1, 1), torch.zeros(1, 1, 1, 1)))  # uniform logits: CE = log 2, no penalty
0.6931471824645996
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss, NACLLoss
from monai.losses import FocalLoss as MonaiFocalLoss
from monai.networks.layers import MeanFilter
from torch import nn

__all__ = [
    "AdaptiveConditionalLabelSmoothing",
    "HardACEDiceCE",
    "NeighbourAwareCalibration",
    "SoftACEDiceCE",
    "CEDice",
    "ConfidencePenalty",
    "CrossEntropy",
    "Focal",
    "LabelSmoothing",
    "MarginDiceLoss",
    "MarginL2Loss",
    "MarginLoss",
    "SpatiallyVaryingLabelSmoothing",
    "index_labels",
]


def index_labels(labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``labels`` (``B×1×spatial`` or ``B×spatial``) as ``long`` class indices ``B×spatial`` matching ``logits``.

    Raises:
        ValueError: shapes that do not match, labels that are not whole numbers, or a label outside ``[0, K)``.
    """
    if logits.ndim < 3 or logits.shape[1] < 2:
        raise ValueError(f"logits must be B×K×spatial with K >= 2, got shape {tuple(logits.shape)}")
    labels = labels.as_subclass(torch.Tensor) if type(labels) is not torch.Tensor else labels
    if labels.ndim == logits.ndim and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.shape != logits.shape[:1] + logits.shape[2:]:
        expected = (logits.shape[0], *logits.shape[2:])
        raise ValueError(f"labels have shape {tuple(labels.shape)}, expected {(expected[0], 1, *expected[1:])} or "
                         f"{expected} for logits of shape {tuple(logits.shape)}")
    if labels.is_floating_point() and not torch.equal(labels, labels.round()):
        raise ValueError("labels must be whole numbers (class indices)")
    out = labels.long()
    if out.numel() and (out.min() < 0 or out.max() >= logits.shape[1]):
        raise ValueError(f"labels must lie in [0, {logits.shape[1]}), got [{int(out.min())}, {int(out.max())}]")
    return out


def _number(name: str, value, low: float = 0.0, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{name} must be a number in [{low:g}, {high:g}], got {value!r}")
    return float(value)


def _one_hot(labels: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """``B×spatial`` class indices → ``B×K×spatial`` one-hot."""
    return F.one_hot(labels, num_classes).movedim(-1, 1).to(dtype)


def _float(logits: torch.Tensor) -> torch.Tensor:
    logits = logits.as_subclass(torch.Tensor) if type(logits) is not torch.Tensor else logits
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def margin_penalty(logits: torch.Tensor, margin: float, penalty: str = "l1") -> torch.Tensor:
    """Mean over (voxel, class) of a penalty on the logit distances ``d_k = max_j l_j − l_k`` minus ``margin``.

    ``penalty``: ``"l1"`` ``relu(d − m)`` (Eq. 7), ``"l2_hinge"`` ``relu(d − m)²``, ``"l2_two_sided"`` ``(d − m)²``.
    """
    excess = logits.amax(dim=1, keepdim=True) - logits - margin
    if penalty == "l1":
        return F.relu(excess).mean()
    if penalty == "l2_hinge":
        return F.relu(excess).square().mean()
    if penalty == "l2_two_sided":
        return excess.square().mean()
    raise ValueError(f"penalty must be l1, l2_hinge or l2_two_sided, got {penalty!r}")


class CrossEntropy(nn.Module):
    """Mean over all voxels of ``−log p_y`` (background included)."""

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = _float(logits)
        return F.cross_entropy(logits, index_labels(labels, logits))


class CEDice(nn.Module):
    """``CE + Dice`` 1:1, MONAI's soft Dice over all classes including the background (smooth 1e-5)."""

    def __init__(self) -> None:
        super().__init__()
        self.dice = DiceLoss(include_background=True, softmax=True)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = _float(logits)
        y = index_labels(labels, logits)
        return F.cross_entropy(logits, y) + self.dice(logits, _one_hot(y, logits.shape[1], logits.dtype))


class Focal(nn.Module):
    """Mean over voxels of ``−(1 − p_y)^γ log p_y`` on the softmax (Eq. 5; no class weighting).

    Args:
        gamma: the focusing parameter γ, 0 or >= 1 (default 3).
    """

    def __init__(self, gamma: float = 3.0) -> None:
        super().__init__()
        self.gamma = _number("gamma", gamma)
        if 0 < self.gamma < 1:
            raise ValueError(f"gamma must be 0 or >= 1, got {gamma} (infinite gradients at p = 1 otherwise)")
        self.focal = MonaiFocalLoss(include_background=True, use_softmax=True, gamma=self.gamma, reduction="none")

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = _float(logits)
        onehot = _one_hot(index_labels(labels, logits), logits.shape[1], logits.dtype)
        return self.focal(logits, onehot).sum(dim=1).mean()


class ConfidencePenalty(nn.Module):
    """ECP: ``CE − α · mean_{voxel,class}(−p log p)``, ``p`` clamped to ``[1e-10, 1 − 1e-10]``.

    Args:
        alpha: the penalty weight α >= 0 (default 0.1).
    """

    def __init__(self, alpha: float = 0.1) -> None:
        super().__init__()
        self.alpha = _number("alpha", alpha)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = _float(logits)
        p = torch.softmax(logits, dim=1).clamp(1e-10, 1.0 - 1e-10)
        return F.cross_entropy(logits, index_labels(labels, logits)) + self.alpha * (p * p.log()).mean()


class LabelSmoothing(nn.Module):
    """Cross-entropy against ``y_k (1 − α) + α / K`` (Eq. 3), mean over voxels.

    Args:
        alpha: the smoothing α in [0, 1] (default 0.1).
    """

    def __init__(self, alpha: float = 0.1) -> None:
        super().__init__()
        self.alpha = _number("alpha", alpha, high=1.0)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = _float(logits)
        return F.cross_entropy(logits, index_labels(labels, logits), label_smoothing=self.alpha)


def svls_kernel(spatial_dims: int, kernel_size: int = 3, sigma: float = 1.0) -> torch.Tensor:
    """The SVLS smoothing kernel (Islam and Glocker, 2021): centre weight ½, the neighbours share the other ½ in
    proportion to a Gaussian ``exp(−r² / 2σ²)`` of their integer offset ``r``. float64, ``(kernel_size,) * dims``."""
    half = kernel_size // 2
    offsets = torch.arange(-half, half + 1, dtype=torch.float64)
    grids = torch.meshgrid(*([offsets] * spatial_dims), indexing="ij")
    gauss = torch.exp(-sum(g**2 for g in grids) / (2.0 * sigma**2))
    centre = (half,) * spatial_dims
    kernel = gauss.clone()
    kernel[centre] = 0.0
    kernel = kernel / (2.0 * kernel.sum())
    kernel[centre] = 0.5
    return kernel


class SpatiallyVaryingLabelSmoothing(nn.Module):
    """SVLS: cross-entropy against one-hot labels smoothed by :func:`svls_kernel` (replicate padding).

    Args:
        kernel_size: odd width >= 3 (default 3).
        sigma: Gaussian standard deviation in voxels, > 0 (default 1.0).
    """

    def __init__(self, kernel_size: int = 3, sigma: float = 1.0) -> None:
        super().__init__()
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 3 or not kernel_size % 2:
            raise ValueError(f"kernel_size must be an odd integer >= 3, got {kernel_size!r}")
        if not _number("sigma", sigma) > 0:
            raise ValueError(f"sigma must be > 0, got {sigma!r}")
        self.kernel_size, self.sigma = kernel_size, float(sigma)

    @torch.no_grad()
    def soft_labels(self, y: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The smoothed one-hot labels of the ``long`` labels ``y``, shaped and typed like ``logits``."""
        dims = logits.ndim - 2
        if dims not in (2, 3):
            raise ValueError(f"SVLS takes B×K×H×W or B×K×D×H×W logits, got shape {tuple(logits.shape)}")
        k = logits.shape[1]
        kernel = svls_kernel(dims, self.kernel_size, self.sigma).to(logits.dtype).to(logits.device)
        padded = F.pad(_one_hot(y, k, logits.dtype), [self.kernel_size // 2] * (2 * dims), mode="replicate")
        return (F.conv2d if dims == 2 else F.conv3d)(padded, kernel.expand(k, 1, *kernel.shape), groups=k)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = _float(logits)
        return F.cross_entropy(logits, self.soft_labels(index_labels(labels, logits), logits))


class MarginLoss(nn.Module):
    """MbLS (Eq. 7, L1 penalty): ``CE + alpha · mean_{voxel,class} relu(max_j l_j − l_k − margin)``.

    The mean over classes follows the paper's released code: ``alpha = K · λ`` of Eq. 7.

    Args:
        margin: the margin ``m`` on logit distances, >= 0 (default 10).
        alpha: the penalty weight, >= 0 (default 0.1).
    """

    penalty = "l1"

    def __init__(self, margin: float = 10.0, alpha: float = 0.1) -> None:
        super().__init__()
        self.margin, self.alpha = _number("margin", margin), _number("alpha", alpha)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = _float(logits)
        ce = F.cross_entropy(logits, index_labels(labels, logits))
        return ce + self.alpha * margin_penalty(logits, self.margin, self.penalty)


class MarginL2Loss(MarginLoss):
    """MbLS with a quadratic penalty: ``relu(d − m)²`` (``one_sided=True``, default) or ``(d − m)²`` (the released
    code's variant), mean over (voxel, class).

    Args:
        margin: default 10. alpha: default 0.1. one_sided: default True.
    """

    def __init__(self, margin: float = 10.0, alpha: float = 0.1, one_sided: bool = True) -> None:
        super().__init__(margin, alpha)
        if not isinstance(one_sided, bool):
            raise ValueError(f"one_sided must be true or false, got {one_sided!r}")
        self.penalty = "l2_hinge" if one_sided else "l2_two_sided"


class MarginDiceLoss(MarginLoss):
    """``CE + Dice + alpha · mean relu(d − m)``; MONAI's soft Dice over the foreground classes (smooth 1e-5).

    Args:
        margin: default 10. alpha: default 0.1.
    """

    def __init__(self, margin: float = 10.0, alpha: float = 0.1) -> None:
        super().__init__(margin, alpha)
        self.dice = DiceLoss(include_background=False, softmax=True, smooth_nr=1e-5, smooth_dr=1e-5)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = _float(logits)
        y = index_labels(labels, logits)
        dice = self.dice(logits, _one_hot(y, logits.shape[1], logits.dtype))
        return F.cross_entropy(logits, y) + dice + self.alpha * margin_penalty(logits, self.margin, "l1")


class NeighbourAwareCalibration(nn.Module):
    """NACL: ``CE + alpha · mean_{voxel,class} |τ − l|`` (``distance="l2"``: squared), ``τ`` the labels' class
    proportions in each voxel's window: ``kernel="mean"``, cells past the border counted as class 0;
    ``kernel="gaussian"``, the SVLS kernel with replicate padding; ``variant="monai"``: MONAI ``NACLLoss``'s ``τ``."""

    def __init__(self, alpha: float = 0.1, kernel: str = "mean", distance: str = "l1", kernel_size: int = 3,
                 sigma: float = 1.0, variant: str = "released") -> None:
        super().__init__()
        if kernel not in ("mean", "gaussian") or distance not in ("l1", "l2") or variant not in ("released", "monai"):
            raise ValueError(f"bad NACL option: kernel={kernel!r}, distance={distance!r}, variant={variant!r}")
        self.alpha, self.kernel, self.distance, self.variant = _number("alpha", alpha), kernel, distance, variant
        self.kernel_size, self.sigma = int(kernel_size), _number("sigma", sigma)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = _float(logits)
        y, (k, dims) = index_labels(labels, logits), (logits.shape[1], logits.ndim - 2)
        with torch.no_grad():
            if self.variant == "monai":
                tau = NACLLoss(k, dims, self.kernel_size, self.kernel, self.distance, self.alpha,
                               self.sigma).get_constr_target(y).to(logits)
            elif self.kernel == "mean":
                counts = MeanFilter(spatial_dims=dims, size=self.kernel_size)(_one_hot(y, k, logits.dtype).contiguous())
                counts[:, 0] += self.kernel_size**dims - counts.sum(1)
                tau = counts / self.kernel_size**dims
            else:
                tau = SpatiallyVaryingLabelSmoothing(self.kernel_size, self.sigma).soft_labels(y, logits)
        diff = tau - logits
        return F.cross_entropy(logits, y) + self.alpha * (diff.abs() if self.distance == "l1" else diff**2).mean()


class AdaptiveConditionalLabelSmoothing(nn.Module):
    """ACLS per voxel: ``CE + alpha · (pos_lambda · Σ relu(z* − m)² / N + neg_lambda · Σ relu(sg(z*) − z_k − m)² /
    (N(K − 1)))``, positives the classes tied for the largest logit ``z*``."""

    def __init__(self, alpha: float = 0.1, pos_lambda: float = 1.0, neg_lambda: float = 0.1,
                 margin: float = 10.0) -> None:
        super().__init__()
        self.alpha, self.pos_lambda = _number("alpha", alpha), _number("pos_lambda", pos_lambda)
        self.neg_lambda, self.margin = _number("neg_lambda", neg_lambda), _number("margin", margin)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = _float(logits)
        k = logits.shape[1]
        n = logits.numel() // k
        top = logits.max(dim=1, keepdim=True).values
        pos = (top.detach() == logits.detach()).to(logits.dtype)
        reg = (self.pos_lambda * (pos * F.relu(top - self.margin) ** 2).sum() / n
               + self.neg_lambda * ((1 - pos) * F.relu(top.detach() - logits - self.margin) ** 2).sum() / (n * (k - 1)))
        return F.cross_entropy(logits, index_labels(labels, logits)) + self.alpha * reg


def _bin_sums(index, weight, p, y, n_bins):
    b, k = p.shape[:2]
    flat = (index + n_bins * torch.arange(b * k, device=p.device).reshape(b, k, 1)).reshape(-1)
    return [torch.zeros(b * k * n_bins, dtype=p.dtype, device=p.device).scatter_add(0, flat, v.reshape(-1))
            .reshape(b, k, n_bins) for v in (weight, weight * p, weight * y)]


class HardACEDiceCE(nn.Module):
    """``0.33 · mL1-ACE + 0.33 · Dice + 0.33 · CE``; mL1-ACE per image and class over ``n_bins`` bins of ``[0, 1]``
    (``lo < p ≤ hi``), the mean over non-empty bins of ``|mean p − mean y|``; an absent class adds 0."""

    soft = False

    def __init__(self, n_bins: int = 20, ace_weight: float = 0.33, dice_weight: float = 0.33, ce_weight: float = 0.33,
                 ignore_empty_classes: bool = True, empty_weight: float = 0.01) -> None:
        super().__init__()
        self.n_bins, self.ignore_empty_classes = int(n_bins), bool(ignore_empty_classes)
        self.empty_weight = _number("empty_weight", empty_weight)
        self.weights = (_number("ace_weight", ace_weight), _number("dice_weight", dice_weight),
                        _number("ce_weight", ce_weight))
        self.dice = DiceLoss(include_background=True, softmax=True, squared_pred=True, smooth_nr=0.0, smooth_dr=1e-5)

    def ace(self, p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        nb, eps = self.n_bins, torch.finfo(torch.float32).eps
        if not self.soft:
            edges = torch.linspace(0.0, 1.0 + eps, nb + 1, device=p.device, dtype=p.dtype)
            weight, sp, sy = _bin_sums(torch.bucketize(p.detach(), edges[1:]), torch.ones_like(p), p, y, nb)
            filled = weight > 0
        else:
            halves = torch.linspace(0.0, 1.0 + eps, 2 * nb + 1, device=p.device, dtype=p.dtype)
            half = torch.bucketize(p.detach(), halves[1:])
            big = torch.tensor([10000.0], device=p.device, dtype=p.dtype)
            anchors = torch.cat((-big, halves[1::2].repeat_interleave(2), big))
            ld, rd = p - anchors[half], anchors[half + 2] - p
            left = _bin_sums(torch.clamp(half - 1, min=0) // 2, rd / (ld + rd), p, y, nb)
            right = _bin_sums(torch.clamp(half + 1, max=2 * nb - 1) // 2, ld / (ld + rd), p, y, nb)
            weight, sp, sy = (a + b for a, b in zip(left, right))
            filled = weight >= self.empty_weight
        safe = torch.where(filled, weight, 1.0)
        gap = ((sp - sy) / safe).abs() * filled.to(p.dtype)
        ace = gap.sum(-1) / filled.sum(-1).clamp(min=1)
        if self.ignore_empty_classes:
            ace = ace * (y.sum(-1) > 0).to(ace.dtype)
        return ace.mean()

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = _float(logits)
        y = index_labels(labels, logits)
        target = _one_hot(y, logits.shape[1], logits.dtype)
        ace = self.ace(torch.softmax(logits, 1).flatten(2), target.flatten(2))
        a, d, c = self.weights
        return a * ace + d * self.dice(logits, target) + c * F.cross_entropy(logits, y)


class SoftACEDiceCE(HardACEDiceCE):
    """:class:`HardACEDiceCE` with soft binning: a voxel's weight split linearly between its two nearest bin
    centres; a bin of total weight below ``empty_weight`` is empty."""

    soft = True
