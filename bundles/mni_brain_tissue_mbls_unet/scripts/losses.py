"""The training objectives of the MbLS pipeline in plain autograd, for a bundle's ``configs/train.json``.

Each class computes the same value and gradient as the pipeline's loss of the same name (the pipeline's tests
check it); a bundle cannot import the pipeline, so the formulas are written out here. Every loss takes logits
``B×K×spatial`` (class axis 1) and integer labels ``B×1×spatial`` or ``B×spatial`` (MONAI style: float tensors of
whole numbers are fine) and returns one scalar; half-precision logits are computed on in float32.

Reference: Murugesan et al., "Calibrating Segmentation Networks with Margin-based Label Smoothing", Medical Image
Analysis 2024 (MbLS, Eq. 7; the other losses are its baselines, Eq. 3-5).

>>> loss = MarginLoss(margin=10.0, alpha=0.1)
>>> float(loss(torch.zeros(1, 2, 1, 1), torch.zeros(1, 1, 1, 1)))  # uniform logits: CE = log 2, no penalty
0.6931471824645996
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from monai.losses import FocalLoss as MonaiFocalLoss
from torch import nn

__all__ = [
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

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = _float(logits)
        dims = logits.ndim - 2
        if dims not in (2, 3):
            raise ValueError(f"SVLS takes B×K×H×W or B×K×D×H×W logits, got shape {tuple(logits.shape)}")
        k = logits.shape[1]
        with torch.no_grad():
            kernel = svls_kernel(dims, self.kernel_size, self.sigma).to(logits.dtype).to(logits.device)
            onehot = _one_hot(index_labels(labels, logits), k, logits.dtype)
            padded = F.pad(onehot, [self.kernel_size // 2] * (2 * dims), mode="replicate")
            target = (F.conv2d if dims == 2 else F.conv3d)(padded, kernel.expand(k, 1, *kernel.shape), groups=k)
        return F.cross_entropy(logits, target)


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
