"""Training objectives of the paper, built by name.

>>> loss = build_loss("mbls", margin=10, alpha=0.1)
>>> sorted(LOSSES)[:2]
['ce', 'mbls']
"""

from __future__ import annotations

import inspect

from torch import nn

from pipeline.losses.base import SegmentationLoss, as_index_labels
from pipeline.losses.ce import CrossEntropy
from pipeline.losses.mbls import MarginLoss, logit_distances, margin_penalty
from pipeline.registry import check_name

#: name -> loss class; every entry has a ``configs/loss/<name>.yaml``.
LOSSES: dict[str, type[nn.Module]] = {
    "ce": CrossEntropy,
    "mbls": MarginLoss,
}


def build_loss(name: str, **params) -> nn.Module:
    """Build a registered loss by name with its parameters.

    Args:
        name: one of :data:`LOSSES`.
        params: the loss's keyword parameters (e.g. ``margin``, ``alpha`` for ``mbls``).

    Raises:
        ValueError: an unknown loss name (with "did you mean …" and the list), or an unknown parameter name.
    """
    cls = LOSSES[check_name(name, LOSSES, "loss")]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(
            f"loss '{name}' has no parameter {', '.join(repr(u) for u in unknown)}; "
            f"its parameters are: {', '.join(accepted) or '(none)'}"
        )
    return cls(**params)


__all__ = [
    "LOSSES",
    "build_loss",
    "SegmentationLoss",
    "as_index_labels",
    "CrossEntropy",
    "MarginLoss",
    "logit_distances",
    "margin_penalty",
]
