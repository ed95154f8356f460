"""Neighbourhood statistics of a label map, shared by NACL and CRaC (2D and 3D).

Both released codes (2D only) read each pixel's ``k×k`` window with ``torch.nn.Unfold(padding=k // 2)``, which pads
the label map with zeros, so a window that reaches past the image border counts the missing cells as class 0 (the
background). The functions here keep that convention in 2D and carry it to 3D (``k×k×k`` windows).

>>> labels = torch.tensor([[[0, 1], [1, 1]]])
>>> class_proportions(labels, 2)[0, 1]  # each window: 3 of its 9 cells labelled 1, the 5 past the border 0
tensor([[0.3333, 0.3333],
        [0.3333, 0.3333]])
>>> boundary_mask(labels).int()[0]
tensor([[1, 1],
        [1, 1]], dtype=torch.int32)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.layers import MeanFilter

from pipeline.tensors import one_hot

#: how a pixel is decided to lie on a boundary (its window holds more than one label): ``"exact"`` compares the
#: window's largest and smallest label; ``"released"`` is the released CRaC code's ``Σ_j (mean(u) − u_j) ≠ 0``
BOUNDARY_TESTS = ("exact", "released")


def _spatial_dims(labels: torch.Tensor) -> int:
    dims = labels.ndim - 1
    if dims not in (2, 3):
        raise ValueError(f"labels must be B×H×W or B×D×H×W (2 or 3 spatial dims), got shape {tuple(labels.shape)}")
    return dims


def class_proportions(labels: torch.Tensor, num_classes: int, kernel_size: int = 3,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``τ``: each class's share of the ``kernel_size^d`` cells of every voxel's window, ``B×K×spatial``.

    Cells past the image border count as class 0 (the released codes' zero padding), so ``Σ_k τ_k = 1`` everywhere.
    Computed as MONAI's ``MeanFilter`` (an unnormalised box filter with zero padding: the per-class counts) of the
    one-hot labels, the missing cells added to class 0, divided by ``kernel_size^d`` (exactly the released
    ``Σ_j [u_j = k] / k^d``).

    Args:
        labels: ``B×spatial`` class indices (``long``).
        num_classes: ``K``.
        kernel_size: odd window width (default 3).
    """
    dims = _spatial_dims(labels)
    cells = kernel_size**dims
    counts = MeanFilter(spatial_dims=dims, size=kernel_size)(one_hot(labels, num_classes, dtype=dtype).contiguous())
    missing = cells - counts.sum(dim=1)
    counts[:, 0] += missing
    return counts / cells


def windows(labels: torch.Tensor, kernel_size: int = 3) -> torch.Tensor:
    """The cells of every voxel's zero-padded window, ``B×kernel_size^d×spatial`` (float), the released codes'
    ``Unfold`` output in 2D (same cell order), its analogue in 3D."""
    dims = _spatial_dims(labels)
    half = kernel_size // 2
    padded = F.pad(labels.float(), [half] * (2 * dims))
    spatial = labels.shape[1:]
    cells = []
    for offset in torch.cartesian_prod(*[torch.arange(kernel_size)] * dims).reshape(-1, dims).tolist():
        index = tuple(slice(o, o + n) for o, n in zip(offset, spatial))
        cells.append(padded[(slice(None), *index)])
    return torch.stack(cells, dim=1)


def boundary_mask(labels: torch.Tensor, kernel_size: int = 3, test: str = "exact") -> torch.Tensor:
    """``True`` where the zero-padded window of a voxel holds more than one label (a *boundary* voxel), ``B×spatial``.

    Args:
        labels: ``B×spatial`` class indices.
        kernel_size: odd window width (default 3).
        test: ``"exact"`` (default): window max ≠ window min, exact in any arithmetic. ``"released"``: the released
            CRaC code's ``Σ_j (mean(u) − u_j) ≠ 0`` in float32, which is 0 in exact arithmetic and nonzero only
            through rounding: it misses boundary voxels (never the reverse), a share that depends on the labels'
            values and the hardware's summation order.
    """
    dims = _spatial_dims(labels)
    if test == "exact":
        half = kernel_size // 2
        padded = F.pad(labels.float(), [half] * (2 * dims))[:, None]
        pool = F.max_pool2d if dims == 2 else F.max_pool3d
        high = pool(padded, kernel_size, stride=1)
        low = -pool(-padded, kernel_size, stride=1)
        return (high != low)[:, 0]
    if test == "released":
        cells = windows(labels, kernel_size)
        mean = torch.mean(cells, dim=1, keepdim=True)
        return (mean - cells).sum(dim=1) != 0
    raise ValueError(f"boundary test must be one of {', '.join(BOUNDARY_TESTS)}, got {test!r}")
