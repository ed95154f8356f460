"""Small tensor helpers shared by the data, losses, metrics, post-hoc calibration and evaluation.

Tensor convention: class axis 1 in batches (``B×K×spatial``), axis 0 in single items (``K×spatial``); spatial
volumes ``X×Y×Z``, 2D slices taken along one of those three axes.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def plain(t) -> torch.Tensor:
    """A plain ``torch.Tensor`` view of a tensor, MONAI ``MetaTensor`` or NumPy array (no copy where possible).

    >>> type(plain(np.zeros(2))).__name__
    'Tensor'
    """
    if isinstance(t, np.ndarray):
        return torch.from_numpy(t)
    if isinstance(t, torch.Tensor):
        return t if type(t) is torch.Tensor else t.as_subclass(torch.Tensor)
    return torch.as_tensor(t)


def one_hot(labels: torch.Tensor, num_classes: int, dim: int = 1, dtype: torch.dtype = torch.float32
            ) -> torch.Tensor:
    """Integer class indices → a one-hot tensor with the class axis inserted at ``dim``.

    Args:
        labels: class indices in ``[0, num_classes)`` (any shape; ``long`` or whole-valued).
        num_classes: ``K``.
        dim: where the class axis goes (default 1: ``B×spatial → B×K×spatial``; 0 for one item).
        dtype: the result's dtype (default float32).

    >>> one_hot(torch.tensor([[1, 0]]), 2).tolist()
    [[[0.0, 1.0], [1.0, 0.0]]]
    """
    return torch.nn.functional.one_hot(plain(labels).long(), num_classes).movedim(-1, dim).to(dtype)


def check_slice_axis(axis) -> int:
    """``axis`` as an int if it names a spatial axis of a volume (0, 1 or 2); else a ``ValueError`` naming it."""
    if isinstance(axis, bool) or axis not in (0, 1, 2):
        raise ValueError(f"expected slice_axis 0, 1 or 2 (a spatial axis of the volume), got {axis!r}")
    return int(axis)


def class_indices(labels: torch.Tensor, n_classes: int, what: str = "classes") -> torch.Tensor:
    """``labels`` as a plain ``long`` tensor of class indices, checked to be whole numbers in ``[0, n_classes)``.

    Args:
        labels: class indices of any shape; float tensors must hold whole numbers.
        n_classes: ``K``.
        what: what the ``K`` channels are, for the message (e.g. ``"probability channels"``).

    Raises:
        ValueError: non-integer values, or a label outside ``[0, K)`` (the message gives the range found).

    >>> class_indices(torch.tensor([0.0, 2.0]), 3).tolist()
    [0, 2]
    """
    labels = plain(labels)
    if labels.is_floating_point() and not torch.equal(labels, labels.round()):
        raise ValueError("labels must be whole class indices, got non-integer values")
    labels = labels.long()
    if labels.numel():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= n_classes:
            raise ValueError(f"labels must lie in [0, {n_classes - 1}] for {n_classes} {what}, got values in "
                             f"[{lo}, {hi}]")
    return labels


def nanmean(values) -> float:
    """The mean of ``values`` skipping NaN; NaN when there is no value (no warning).

    >>> nanmean([1.0, float("nan"), 3.0])
    2.0
    """
    arr = np.asarray(values, dtype=float)
    return float(np.nanmean(arr)) if arr.size and not np.all(np.isnan(arr)) else math.nan
