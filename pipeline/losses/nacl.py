"""Neighbor-Aware CaLibration (NACL, Murugesan et al., MICCAI 2023 "Trust your neighbours"; MedIA extension).

``L = CE(l, y) + alpha · mean |τ − l|`` (or the squared distance), the penalty on the **raw logits** and the mean over
every element ``B·K·spatial``; ``τ`` is the neighbourhood class proportions of the label map. As in the released
code (``Bala93/MarginLoss``, ``calibrate/losses/spatial_adaptive_margin.py``, 2D only) by default:

- ``kernel="mean"``: ``τ_k`` = the share of class ``k`` among the ``k×k`` window's cells, the cells past the image
  border counted as class 0 (the released ``Unfold``'s zero padding), :func:`~pipeline.losses.neighbours.
  class_proportions`;
- ``kernel="gaussian"``: the SVLS kernel (centre weight ½, replicate padding) of :mod:`pipeline.losses.svls`, which
  is the released code's ``get_svls_filter_2d`` for its 3×3 kernel (for larger kernels the released code replaces
  the weight at index ``[1, 1]``, not the centre's; the centre is used here).

``variant="monai"`` takes ``τ`` from ``monai.losses.NACLLoss`` instead; it differs at the border (its mean filter
pads with zeros that belong to no class, so ``Σ_k τ_k < 1`` there) and its "gaussian" is a plain Gaussian of
standard deviation ``sigma`` truncated at 4σ (a 9×9 kernel for σ = 1), not the SVLS kernel. In 3D the same
conventions with ``k×k×k`` windows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import NACLLoss

from pipeline.losses.base import SegmentationLoss, check_number
from pipeline.losses.neighbours import class_proportions
from pipeline.losses.svls import SpatiallyVaryingLabelSmoothing

KERNELS = ("mean", "gaussian")
DISTANCES = ("l1", "l2")
VARIANTS = ("released", "monai")


def _choice(name: str, value, options: tuple) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(options)}, got {value!r}")
    return value


class NeighbourAwareCalibration(SegmentationLoss):
    """NACL: ``CE + alpha · mean_{voxel,class} |τ − l|`` (``distance="l2"``: ``(τ − l)²``).

    ``parts``: ``ce`` and ``penalty`` (the mean distance, before the factor ``alpha``).

    Args:
        alpha: the penalty weight λ (default 0.1, the authors').
        kernel: ``"mean"`` (default) or ``"gaussian"``, how the label map is smoothed into ``τ``.
        distance: ``"l1"`` (default) or ``"l2"``.
        kernel_size: odd window width (default 3).
        sigma: the Gaussian's standard deviation in voxels (default 1.0; ``kernel="gaussian"`` only).
        variant: ``"released"`` (default, the authors' code) or ``"monai"`` (``monai.losses.NACLLoss``'s ``τ``).

    Raises:
        ValueError: an option not in the lists above, or a number out of range.

    >>> loss = NeighbourAwareCalibration(alpha=1.0)
    >>> logits = torch.zeros(1, 2, 3, 3)  # τ = (1, 0) everywhere for an all-0 label map: penalty mean (1 + 0) / 2
    >>> round(float(loss(logits, torch.zeros(1, 3, 3, dtype=torch.long))) - float(loss.parts["ce"]), 4)
    0.5
    """

    def __init__(self, alpha: float = 0.1, kernel: str = "mean", distance: str = "l1", kernel_size: int = 3,
                 sigma: float = 1.0, variant: str = "released") -> None:
        super().__init__()
        self.alpha = check_number("alpha", alpha, low=0)
        self.kernel = _choice("kernel", kernel, KERNELS)
        self.distance = _choice("distance", distance, DISTANCES)
        self.variant = _choice("variant", variant, VARIANTS)
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 3 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd integer >= 3, got {kernel_size!r}")
        self.kernel_size = kernel_size
        self.sigma = check_number("sigma", sigma, low=0, low_open=True)
        self.svls = (SpatiallyVaryingLabelSmoothing(kernel_size, self.sigma)
                     if kernel == "gaussian" and variant == "released" else None)
        self._monai: dict[tuple[int, int], NACLLoss] = {}

    def targets(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """``τ``, ``B×K×spatial`` in the dtype of ``logits``, for ``B×spatial`` class indices."""
        k, dims = logits.shape[1], logits.ndim - 2
        if dims not in (2, 3):
            raise ValueError(f"NACL takes B×K×H×W or B×K×D×H×W logits, got shape {tuple(logits.shape)}")
        if self.variant == "monai":
            if (k, dims) not in self._monai:
                self._monai[(k, dims)] = NACLLoss(k, dims, self.kernel_size, self.kernel, self.distance,
                                                  self.alpha, self.sigma)
            return self._monai[(k, dims)].get_constr_target(labels).to(device=logits.device, dtype=logits.dtype)
        if self.kernel == "mean":
            return class_proportions(labels, k, self.kernel_size, logits.dtype)
        return self.svls.to(logits.device).soft_labels(labels, logits)

    def _forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits, labels)
        with torch.no_grad():
            tau = self.targets(labels, logits)
        diff = tau - logits
        penalty = diff.abs().mean() if self.distance == "l1" else diff.square().mean()
        self.parts = {"ce": ce.detach(), "penalty": penalty.detach()}
        return ce + self.alpha * penalty
