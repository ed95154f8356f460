"""Integer class labels: the one check shared by the losses, the metrics and the evaluation."""

from __future__ import annotations

import torch


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
    if type(labels) is not torch.Tensor:
        labels = labels.as_subclass(torch.Tensor)
    if labels.is_floating_point() and not torch.equal(labels, labels.round()):
        raise ValueError("labels must be whole class indices, got non-integer values")
    labels = labels.long()
    if labels.numel():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= n_classes:
            raise ValueError(f"labels must lie in [0, {n_classes - 1}] for {n_classes} {what}, got values in "
                             f"[{lo}, {hi}]")
    return labels
