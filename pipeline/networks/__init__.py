"""Backbones and the wrapper that lets any of them take inputs of any size.

The backbones themselves are MONAI networks chosen by ``configs/backbone/<name>.yaml``; the base config wraps
the chosen one in :class:`PadToMultiple`, so an input whose size is not a multiple of the network's total stride
is padded and the output cropped back: never silently resized.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class PadToMultiple(nn.Module):
    """Pad the spatial dims of ``B×C×spatial`` inputs up to a multiple of ``divisor``, run ``net``, crop back.

    Padding is split evenly on both sides (the extra voxel at the end) with ``mode`` (default replicate, so the
    padded border looks like the image edge). Networks that return a list or tuple (deep supervision) are
    reduced to their last output.

    Args:
        net: the backbone, ``B×C×spatial → B×K×spatial``.
        divisor: an int for every spatial dim, or one per dim.
        mode: ``torch.nn.functional.pad`` mode.

    >>> m = PadToMultiple(nn.Conv2d(1, 2, 1), divisor=16)
    >>> m(torch.zeros(1, 1, 37, 50)).shape
    torch.Size([1, 2, 37, 50])
    """

    def __init__(self, net: nn.Module, divisor: int | Sequence[int] = 16, mode: str = "replicate") -> None:
        super().__init__()
        self.net = net
        self.divisor = divisor
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = x.shape[2:]
        div = [self.divisor] * len(spatial) if isinstance(self.divisor, int) else list(self.divisor)
        if len(div) != len(spatial):
            raise ValueError(f"divisor {self.divisor} does not match the {len(spatial)} spatial dims of the input")
        extra = [(-s) % d for s, d in zip(spatial, div)]
        if any(extra):
            pad: list[int] = []
            for e in reversed(extra):  # F.pad takes the last dim first
                pad += [e // 2, e - e // 2]
            x = F.pad(x, pad, mode=self.mode)
        out = self.net(x)
        if isinstance(out, (list, tuple)):
            out = out[-1]
        if any(extra):
            index = [slice(None), slice(None)] + [slice(e // 2, e // 2 + s) for e, s in zip(extra, spatial)]
            out = out[tuple(index)]
        return out
