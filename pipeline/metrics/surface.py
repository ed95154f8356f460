"""Symmetric average surface distance of one-hot masks, all classes of a volume at once.

The same definition as MONAI's ``compute_average_surface_distance(symmetric=True)`` (MONAI 1.6, CPU path), computed
without its per-class crop and transform machinery:

* **edges** of a mask: its voxels that have at least one face neighbour outside it, voxels beyond the volume's
  border counting as outside (``scipy.ndimage.binary_erosion`` with the cross structuring element and
  ``border_value=0``, XOR the mask); computed for every class with tensor shifts;
* **distances**: from each predicted edge voxel to the nearest ground-truth edge voxel and back, Euclidean between
  voxel centres scaled by the spacing (a KD-tree, as MONAI does on CPU);
* **ASD**: the mean of both sets of distances together (each distance rounded to float32 as MONAI does; the sum
  in float64, so results agree with MONAI's to float32 precision). Edge voxels shared by both masks are at
  distance 0 and are not looked up.

Masks that are both empty give 0 and masks of which exactly one is empty give ``nan`` (the rules of
``pipeline.metrics.segmentation``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.spatial import cKDTree

from pipeline.tensors import plain


def mask_edges(masks) -> np.ndarray:
    """Edge voxels of binary masks ``N×spatial`` (any number of spatial dims), as a bool array of the same shape.

    Computed with numpy views of a zero-padded copy (several times faster than the same with torch on CPU).

    >>> m = np.zeros((1, 5, 5), dtype=bool); m[0, 1:4, 1:4] = True
    >>> mask_edges(m)[0].astype(int).tolist()[2]  # the middle row: only the centre voxel is interior
    [0, 1, 0, 1, 0]
    """
    m = np.asarray(masks.numpy() if isinstance(masks, torch.Tensor) else masks, dtype=bool)
    nd = m.ndim - 1
    padded = np.pad(m, [(0, 0)] + [(1, 1)] * nd)  # outside the volume: not in the mask
    core = (slice(None),) + (slice(1, -1),) * nd
    interior = m.copy()
    for d in range(1, m.ndim):
        for lo, hi in ((2, None), (0, -2)):  # the neighbour after and before along axis d
            index = list(core)
            index[d] = slice(lo, hi)
            interior &= padded[tuple(index)]
    return m & ~interior


def _nearest(tree_points: np.ndarray, query_points: np.ndarray) -> np.ndarray:
    """Distance (float32, as MONAI) from each query point to the nearest tree point; both ``n×d`` arrays."""
    if len(query_points) == 0:
        return np.zeros(0)
    # an unbalanced tree without node compaction builds about twice as fast and answers the same queries
    tree = cKDTree(tree_points, leafsize=32, balanced_tree=False, compact_nodes=False)
    return tree.query(query_points, k=1)[0].astype(np.float32).astype(np.float64)


def symmetric_asd(y_pred: torch.Tensor, y: torch.Tensor, spacing: Sequence[float] | None = None) -> torch.Tensor:
    """Symmetric average surface distance of one-hot masks ``B×C×spatial`` → ``B×C`` (float32).

    Args:
        y_pred, y: binary masks of the same shape (any numeric or bool dtype; non-zero is inside).
        spacing: voxel size per spatial dim (default 1).

    Raises:
        ValueError: shapes differ, or the spacing does not have one value per spatial dim.
    """
    if y_pred.shape != y.shape:
        raise ValueError(f"y_pred and y should have the same shape, got {tuple(y_pred.shape)} and {tuple(y.shape)}")
    b, c = y_pred.shape[:2]
    spatial = y_pred.ndim - 2
    scale = np.ones(spatial) if spacing is None else np.asarray(spacing, dtype=np.float64).reshape(-1)
    if scale.size == 1:
        scale = np.full(spatial, float(scale[0]))
    if scale.size != spatial:
        raise ValueError(f"spacing {list(scale)} does not match the {spatial} spatial dims of the masks")
    pred = (plain(y_pred).detach().reshape(b * c, *y_pred.shape[2:]) != 0).cpu().numpy()
    true = (plain(y).detach().reshape(b * c, *y.shape[2:]) != 0).cpu().numpy()
    edges_pred, edges_true = mask_edges(pred), mask_edges(true)
    has_p = edges_pred.reshape(b * c, -1).any(1)
    has_t = edges_true.reshape(b * c, -1).any(1)
    out = torch.full((b * c,), float("nan"), dtype=torch.float32)
    out[torch.from_numpy(~has_p & ~has_t)] = 0.0
    both = np.flatnonzero(has_p & has_t)
    if len(both):
        # one KD-tree query per direction for all (volume, class) pairs: each pair is moved along an extra axis
        # by more than any distance inside the volume, so a nearest neighbour is always of its own pair
        ep, et = edges_pred[both], edges_true[both]
        gap = 2.0 * float(np.sqrt(((np.asarray(ep.shape[1:]) * scale) ** 2).sum())) + 1.0
        cp, ct = np.argwhere(ep), np.argwhere(et)  # (pair, voxel index…) of every edge voxel
        xp = np.concatenate([cp[:, :1] * gap, cp[:, 1:] * scale], axis=1)
        xt = np.concatenate([ct[:, :1] * gap, ct[:, 1:] * scale], axis=1)
        only_p, only_t = ~et[tuple(cp.T)], ~ep[tuple(ct.T)]  # shared edge voxels are at distance 0
        d1, i1 = _nearest(xt, xp[only_p]), cp[only_p, 0]  # predicted edge voxels → ground-truth edges
        d2, i2 = _nearest(xp, xt[only_t]), ct[only_t, 0]  # and back
        n = np.bincount(cp[:, 0], minlength=len(both)) + np.bincount(ct[:, 0], minlength=len(both))
        total = np.bincount(i1, weights=d1, minlength=len(both)) + np.bincount(i2, weights=d2, minlength=len(both))
        out[torch.from_numpy(both)] = torch.from_numpy(total / n).float()
    return out.reshape(b, c).to(y_pred.device)
