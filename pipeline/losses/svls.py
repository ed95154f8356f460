"""Spatially varying label smoothing (SVLS, Islam and Glocker, IPMI 2021), in 2D and 3D."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.losses.base import SegmentationLoss, check_number
from pipeline.tensors import one_hot


def svls_kernel(spatial_dims: int, kernel_size: int = 3, sigma: float = 1.0) -> torch.Tensor:
    """The effective SVLS smoothing kernel, ``kernel_size^spatial_dims`` weights that sum to 1.

    Built as in the released code: a Gaussian ``exp(−r² / 2σ²)`` on the grid of integer offsets, normalised to sum
    1; the centre weight replaced by the sum of the neighbour weights; the kernel divided by that sum; and the
    smoothed labels divided by the kernel's sum (2). Net effect: the centre weighs ½ and the neighbours share the
    other ½ in proportion to the Gaussian. For ``σ = 1``, ``kernel_size = 3``: 2D centre 0.5, edge 0.077807,
    corner 0.047193; 3D centre 0.5, face 0.030823, edge 0.018695, corner 0.011339.

    Args:
        spatial_dims: 2 or 3.
        kernel_size: odd width ``>= 3`` (default 3).
        sigma: Gaussian standard deviation in voxels, ``> 0`` (default 1.0).

    Returns:
        float64 tensor of shape ``(kernel_size,) * spatial_dims``.

    >>> svls_kernel(2)[1]
    tensor([0.0778, 0.5000, 0.0778], dtype=torch.float64)
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"SVLS supports 2D and 3D inputs (spatial_dims 2 or 3), got spatial_dims={spatial_dims}")
    half = kernel_size // 2
    offsets = torch.arange(-half, half + 1, dtype=torch.float64)
    grids = torch.meshgrid(*([offsets] * spatial_dims), indexing="ij")
    r2 = sum(g**2 for g in grids)
    gauss = torch.exp(-r2 / (2.0 * sigma**2))
    gauss = gauss / gauss.sum()
    centre = (half,) * spatial_dims
    neighbours = gauss.sum() - gauss[centre]
    kernel = gauss.clone()
    kernel[centre] = neighbours
    kernel = kernel / neighbours
    return kernel / kernel.sum()


class SpatiallyVaryingLabelSmoothing(SegmentationLoss):
    """SVLS: CE against soft labels obtained by smoothing the one-hot labels with :func:`svls_kernel`.

    Each class map of the one-hot label is convolved with the kernel (depthwise, replicate padding at the border),
    giving targets ``t`` that sum to 1 per voxel; the loss is the mean over voxels of ``Σ_k −t_k log p_k``. Inputs
    ``B×K×H×W`` use the 2D kernel, ``B×K×D×H×W`` the 3D one.

    Args:
        kernel_size: odd kernel width ``>= 3`` (default 3, the paper's setting).
        sigma: Gaussian standard deviation in voxels, ``> 0`` (default 1.0).

    Raises:
        ValueError: a bad ``kernel_size`` or ``sigma``; at call time, inputs that are neither 2D nor 3D.

    >>> loss = SpatiallyVaryingLabelSmoothing()
    >>> round(float(loss(torch.zeros(1, 2, 3, 3), torch.zeros(1, 1, 3, 3))), 6)  # uniform p: log 2
    0.693147
    """

    def __init__(self, kernel_size: int = 3, sigma: float = 1.0) -> None:
        super().__init__()
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 3 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd integer >= 3, got {kernel_size!r}")
        self.kernel_size = kernel_size
        self.sigma = check_number("sigma", sigma, low=0, low_open=True)
        # float32 copies that follow .to(device); not part of the state dict
        self.register_buffer("kernel2d", svls_kernel(2, kernel_size, self.sigma).float(), persistent=False)
        self.register_buffer("kernel3d", svls_kernel(3, kernel_size, self.sigma).float(), persistent=False)

    def soft_labels(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The SVLS targets ``B×K×spatial`` for ``B×spatial`` class indices, in the dtype of ``logits``."""
        spatial_dims = logits.ndim - 2
        if spatial_dims not in (2, 3):
            raise ValueError(
                f"SVLS takes B×K×H×W or B×K×D×H×W logits, got shape {tuple(logits.shape)} ({spatial_dims} spatial dims)"
            )
        k = logits.shape[1]
        kernel = (self.kernel2d if spatial_dims == 2 else self.kernel3d).to(logits.dtype)
        weight = kernel.expand(k, 1, *kernel.shape)
        pad = [self.kernel_size // 2] * (2 * spatial_dims)
        target = F.pad(one_hot(labels, logits.shape[1], dtype=logits.dtype), pad, mode="replicate")
        conv = F.conv2d if spatial_dims == 2 else F.conv3d
        return conv(target, weight, groups=k)

    def _forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = self.soft_labels(labels, logits)
        return F.cross_entropy(logits, target)
