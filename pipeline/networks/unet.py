"""The paper's UNet as released with it, built from MONAI's ``TwoConv`` blocks and plain torch layers.

The MbLS release trains a TernausNet-style UNet (Iglovikov & Shvets, 2018, without the pretrained VGG encoder):
five levels of widths 32-512, two 3×3 convolutions + ReLU per level and no normalisation, as in Ronneberger et
al. (2015), but with a 4×4 max-pooling into the bottom level (total stride 32) and nearest-neighbour up-sampling
instead of transposed convolutions; the up-sampled features come before the skip in each concatenation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.networks.layers.factories import Conv, Pool
from monai.networks.nets.basic_unet import TwoConv
from torch import nn


class UpConcat(nn.Module):
    """Nearest-neighbour up-sampling by ``factor``, concatenation ``[up, skip]`` (up-sampled features first), two
    3×3 convolutions (MONAI ``TwoConv``) from ``in_low + in_skip`` to ``out`` channels."""

    def __init__(self, spatial_dims: int, factor: int, in_low: int, in_skip: int, out: int, act, norm, bias: bool,
                 dropout: float | None) -> None:
        super().__init__()
        self.up = nn.Upsample(scale_factor=float(factor), mode="nearest")
        self.convs = TwoConv(spatial_dims, in_low + in_skip, out, act, norm, bias, dropout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.convs(torch.cat([self.up(x), skip], dim=1))


class PlainUNet(nn.Module):
    """The UNet of the MbLS release (the paper's main network, §5.1.2): per level two 3×3 convolutions
    (zero padding 1) + activation and no normalisation; max-pooling down by ``pools`` (default 2, 2, 2 and 4 into
    the bottom level), nearest-neighbour up-sampling by the same factors, concatenation ``[up, skip]``, two 3×3
    convolutions to the level's width (e.g. 512 + 256 → 256, …, 64 + 32 → 32), and a final 1×1 convolution to the
    ``K`` logits (no softmax).

    The total stride is the product of ``pools`` (32 by default): every spatial size must be a multiple of it
    (the base config's ``PadToMultiple`` with ``backbone_divisor`` ensures it); the output has the input's size.

    Args:
        spatial_dims: 2 for images (default), 3 for volumes.
        in_channels: input channels C.
        out_channels: output channels K (classes).
        features: widths of the levels, top first. Default ``(32, 64, 128, 256, 512)``.
        pools: the pooling (and up-sampling) factor between consecutive levels, one fewer than ``features``.
            Default ``(2, 2, 2, 4)``.
        act: MONAI activation name or ``(name, args)``. Default ReLU.
        norm: MONAI normalisation name or ``(name, args)``, or ``None`` (default) for none.
        bias: convolution biases (default True).
        dropout: dropout after each convolution (default 0).

    Raises:
        ValueError: fewer than two widths, a ``pools`` of the wrong length or with a factor below 2; (in
            ``forward``) a spatial size that is not a multiple of the total stride.

    >>> net = PlainUNet(in_channels=1, out_channels=4, features=(4, 8, 16), pools=(2, 4))
    >>> net(torch.zeros(2, 1, 32, 48)).shape
    torch.Size([2, 4, 32, 48])
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 2,
        features: Sequence[int] = (32, 64, 128, 256, 512),
        pools: Sequence[int] = (2, 2, 2, 4),
        act: str | tuple = ("relu", {"inplace": True}),
        norm: str | tuple | None = None,
        bias: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        features, pools = [int(f) for f in features], [int(p) for p in pools]
        if len(features) < 2:
            raise ValueError(f"PlainUNet needs at least two widths (one down-sampling), got features={features}")
        if len(pools) != len(features) - 1 or min(pools) < 2:
            raise ValueError(f"pools needs {len(features) - 1} factors >= 2 (one between each two of the "
                             f"{len(features)} levels), got pools={pools}")
        self.stride = math.prod(pools)
        dropout = dropout or None  # no Dropout layers at all without dropout
        self.encoder = nn.ModuleList([TwoConv(spatial_dims, in_channels, features[0], act, norm, bias, dropout)])
        for f_in, f_out, p in zip(features[:-1], features[1:], pools):
            self.encoder.append(nn.Sequential(Pool[Pool.MAX, spatial_dims](kernel_size=p),
                                              TwoConv(spatial_dims, f_in, f_out, act, norm, bias, dropout)))
        self.decoder = nn.ModuleList([
            UpConcat(spatial_dims, p, f_low, f_skip, f_skip, act, norm, bias, dropout)
            for f_low, f_skip, p in zip(reversed(features[1:]), reversed(features[:-1]), reversed(pools))
        ])
        self.final_conv = Conv[Conv.CONV, spatial_dims](features[0], out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B×C×spatial → B×K×spatial`` logits (every spatial size a multiple of :attr:`stride`)."""
        for s in x.shape[2:]:
            if s % self.stride != 0:
                raise ValueError(f"PlainUNet needs spatial sizes that are multiples of {self.stride}, got input "
                                 f"shape {list(x.shape)} (wrap it in PadToMultiple)")
        skips: list[torch.Tensor] = []
        for enc in self.encoder:
            x = enc(x)
            skips.append(x)
        n = len(skips)
        for i, dec in enumerate(self.decoder):
            x = dec(x, skips[n - 2 - i])
        return self.final_conv(x)
