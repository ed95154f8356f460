"""Training objectives of the paper and of the methods since (NACL, CRaC, mL1-ACE, ACLS), built by name.

>>> loss = build_loss("mbls", margin=10, alpha=0.1)
>>> ' '.join(sorted(LOSSES))
'ace_hard ace_soft acls ce ce_dice crac ecp focal ls mbls mbls_dice mbls_l2 nacl svls'
"""

from __future__ import annotations

import inspect

from torch import nn

from pipeline.losses.ace import ACEDiceCE, HardACEDiceCE, SoftACEDiceCE, marginal_l1_ace
from pipeline.losses.acls import AdaptiveConditionalLabelSmoothing, acls_regulariser
from pipeline.losses.base import SegmentationLoss, as_index_labels, check_number
from pipeline.losses.ce import CrossEntropy
from pipeline.losses.ce_dice import CEDice
from pipeline.losses.crac import ClassRegionConstraints, phr
from pipeline.losses.ecp import ConfidencePenalty, mean_entropy
from pipeline.losses.focal import Focal
from pipeline.losses.ls import LabelSmoothing
from pipeline.losses.mbls import PENALTIES, MarginLoss, logit_distances, margin_penalty
from pipeline.losses.mbls_dice import MarginDiceLoss
from pipeline.losses.mbls_l2 import MarginL2Loss
from pipeline.losses.nacl import NeighbourAwareCalibration
from pipeline.losses.neighbours import BOUNDARY_TESTS, boundary_mask, class_proportions
from pipeline.losses.svls import SpatiallyVaryingLabelSmoothing, svls_kernel
from pipeline.registry import check_name

#: name -> loss class; every entry has a ``configs/loss/<name>.yaml``.
LOSSES: dict[str, type[nn.Module]] = {
    "ce": CrossEntropy,
    "ce_dice": CEDice,
    "focal": Focal,
    "ecp": ConfidencePenalty,
    "ls": LabelSmoothing,
    "svls": SpatiallyVaryingLabelSmoothing,
    "mbls": MarginLoss,
    "mbls_l2": MarginL2Loss,
    "mbls_dice": MarginDiceLoss,
    "nacl": NeighbourAwareCalibration,
    "crac": ClassRegionConstraints,
    "ace_hard": HardACEDiceCE,
    "ace_soft": SoftACEDiceCE,
    "acls": AdaptiveConditionalLabelSmoothing,
}


def build_loss(name: str, **params) -> nn.Module:
    """Build a registered loss by name with its parameters.

    Args:
        name: one of :data:`LOSSES`.
        params: the loss's keyword parameters (e.g. ``margin``, ``alpha`` for ``mbls``); each loss's docstring and
            ``configs/loss/<name>.yaml`` list them with their defaults.

    Raises:
        ValueError: an unknown loss name (with "did you mean …" and the list), an unknown parameter name, or a
            parameter value out of range (from the loss).
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
    "check_number",
    "CrossEntropy",
    "CEDice",
    "Focal",
    "ConfidencePenalty",
    "mean_entropy",
    "LabelSmoothing",
    "SpatiallyVaryingLabelSmoothing",
    "svls_kernel",
    "MarginLoss",
    "MarginL2Loss",
    "MarginDiceLoss",
    "PENALTIES",
    "logit_distances",
    "margin_penalty",
    "NeighbourAwareCalibration",
    "ClassRegionConstraints",
    "phr",
    "BOUNDARY_TESTS",
    "boundary_mask",
    "class_proportions",
    "ACEDiceCE",
    "HardACEDiceCE",
    "SoftACEDiceCE",
    "marginal_l1_ace",
    "AdaptiveConditionalLabelSmoothing",
    "acls_regulariser",
]
