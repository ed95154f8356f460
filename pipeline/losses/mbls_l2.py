"""MbLS with a quadratic penalty on the logit distances (the paper's Table 4 ablation)."""

from __future__ import annotations

from pipeline.losses.mbls import MarginLoss


class MarginL2Loss(MarginLoss):
    """MbLS with a quadratic penalty: ``CE + alpha · mean_{voxel,class} P(d_k − margin)``, ``d_k = max_j l_j − l_k``.

    Two penalties, chosen by ``one_sided``:

    - ``one_sided=True`` (default): the one-sided hinge ``P(x) = relu(x)²``, the quadratic penalty for the
      inequality constraint ``d ≤ m`` that the paper's text describes (zero while every distance is within the
      margin, like the L1 penalty).
    - ``one_sided=False``: the released code's ``P(x) = x²``, i.e. ``(d_k − m)²``. It also penalises distances
      *below* the margin (pulling every distance towards ``m``, an equality constraint) and adds the constant ``m²``
      for the argmax class (``d = 0``), so its value is at least ``m² / K`` per voxel.

    As for :class:`~pipeline.losses.mbls.MarginLoss`, the mean is over voxel×class (``alpha = K · λ`` of a
    per-voxel sum). ``parts``: ``ce`` and ``penalty`` (the mean before the factor ``alpha``).

    Args:
        margin: the margin ``m`` (default 10; the paper re-tuned it for L2 on the grid 5, 8, 10).
        alpha: the penalty weight (default 0.1, as for L1 in the paper).
        one_sided: ``True`` for ``relu(d − m)²``, ``False`` for the released code's ``(d − m)²`` (default True).

    Raises:
        ValueError: ``margin`` or ``alpha`` negative or not a number; ``one_sided`` not a boolean.

    >>> import torch
    >>> logits = torch.tensor([[[[3.0]], [[0.0]]]])  # distances 0 and 3, margin 1
    >>> hinge, code = MarginL2Loss(margin=1.0, alpha=1.0), MarginL2Loss(margin=1.0, alpha=1.0, one_sided=False)
    >>> _ = hinge(logits, torch.zeros(1, 1, 1, 1)), code(logits, torch.zeros(1, 1, 1, 1))
    >>> float(hinge.parts["penalty"]), float(code.parts["penalty"])  # (0 + 2²) / 2 and ((-1)² + 2²) / 2
    (2.0, 2.5)
    """

    def __init__(self, margin: float = 10.0, alpha: float = 0.1, one_sided: bool = True) -> None:
        super().__init__(margin, alpha)
        if not isinstance(one_sided, bool):
            raise ValueError(f"one_sided must be true or false, got {one_sided!r}")
        self.one_sided = one_sided
        self.penalty = "l2_hinge" if one_sided else "l2_two_sided"
