"""Padding any backbone to its total stride: inputs of any size, never silently resized.

This module imports only ``torch``: exported MONAI bundles carry a verbatim copy of it in their ``scripts/``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class PadToMultiple(nn.Module):
    """Pad the spatial dims of ``B×C×spatial`` inputs up to a multiple of ``divisor``, run ``net``, crop back.

    Padding is split evenly on both sides (the extra voxel at the end) with ``mode`` (default replicate, so the
    padded border looks like the image edge). Networks that return a list or tuple (deep supervision, e.g. MONAI's
    ``BasicUNetPlusPlus``) are reduced to their last output. Scriptable with ``torch.jit.script`` when ``net`` is.

    Args:
        net: the backbone, ``B×C×spatial → B×K×spatial``.
        divisor: an int for every spatial dim, or one per dim.
        mode: ``torch.nn.functional.pad`` mode.

    Raises:
        ValueError: (in ``forward``) a per-dim ``divisor`` whose length differs from the input's spatial dims.

    >>> m = PadToMultiple(nn.Conv2d(1, 2, 1), divisor=16)
    >>> m(torch.zeros(1, 1, 37, 50)).shape
    torch.Size([1, 2, 37, 50])
    """

    def __init__(self, net: nn.Module, divisor: int | Sequence[int] = 16, mode: str = "replicate") -> None:
        super().__init__()
        self.net = net
        self.divisor = [int(divisor)] if isinstance(divisor, int) else [int(d) for d in divisor]
        self.per_dim = not isinstance(divisor, int)
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial: list[int] = list(x.shape[2:])
        div = self.divisor if self.per_dim else self.divisor * len(spatial)
        if len(div) != len(spatial):
            raise ValueError(f"divisor {self.divisor} does not match the {len(spatial)} spatial dims of the input")
        extra: list[int] = []
        for s, d in zip(spatial, div):
            extra.append((d - s % d) % d)
        padded = sum(extra) > 0
        if padded:
            pad: list[int] = []
            for i in range(len(extra) - 1, -1, -1):  # F.pad takes the last dim first
                pad += [extra[i] // 2, extra[i] - extra[i] // 2]
            x = F.pad(x, pad, mode=self.mode)
        raw = self.net(x)
        if isinstance(raw, list):
            out = raw[-1]
        elif isinstance(raw, tuple):
            out = raw[-1]
        else:
            out = raw
        if padded:
            for i in range(len(extra)):
                out = out.narrow(i + 2, extra[i] // 2, spatial[i])
        return out
