"""The plain UNet of the paper, built from MONAI's ``BasicUNet`` parts.

MONAI's ``BasicUNet`` comes close but differs at the top level: its last up-sampling keeps the channel count
(``halves=False``), so the last two convolutions see ``2·f1 + f0`` channels instead of ``2·f0``. This module uses
the same MONAI blocks (``TwoConv``, ``Down``, ``UpCat``) with the channels halved at every up-sampling, as in
Ronneberger et al. (2015).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.layers.factories import Conv
from monai.networks.nets.basic_unet import Down, TwoConv, UpCat
from torch import nn


class PlainUNet(nn.Module):
    """UNet with two 3×3 convolutions (+ activation, optional normalisation) per level, 2×2 max pooling down,
    2×2 transposed convolution up (halving the channels), skip concatenation and a final 1×1 convolution.

    The paper's network (MbLS, Murugesan et al., 2024, §5.1.2, after Ronneberger et al., 2015) is the default:
    widths 32, 64, 128, 256, 512, ReLU, no normalisation. Convolutions are zero-padded ("same"), so the output
    has the input's size when every spatial size is a multiple of ``2 ** (len(features) - 1)`` (the base config's
    ``PadToMultiple`` ensures it); Ronneberger et al. used unpadded convolutions and cropped the skips.

    Args:
        spatial_dims: 2 for images (default), 3 for volumes.
        in_channels: input channels C.
        out_channels: output channels K (classes).
        features: widths of the levels, top first; the total stride is ``2 ** (len(features) - 1)``.
            Default ``(32, 64, 128, 256, 512)`` (stride 16).
        act: MONAI activation name or ``(name, args)``. Default ReLU.
        norm: MONAI normalisation name or ``(name, args)``, or ``None`` (default) for none.
        bias: convolution biases (default True).
        dropout: dropout after each convolution (default 0).

    Raises:
        ValueError: fewer than two widths.

    >>> net = PlainUNet(in_channels=1, out_channels=4, features=(4, 8, 16))
    >>> net(torch.zeros(2, 1, 32, 48)).shape
    torch.Size([2, 4, 32, 48])
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 2,
        features: Sequence[int] = (32, 64, 128, 256, 512),
        act: str | tuple = ("relu", {"inplace": True}),
        norm: str | tuple | None = None,
        bias: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        features = [int(f) for f in features]
        if len(features) < 2:
            raise ValueError(f"PlainUNet needs at least two widths (one down-sampling), got features={features}")
        self.encoder = nn.ModuleList([TwoConv(spatial_dims, in_channels, features[0], act, norm, bias, dropout)])
        for f_in, f_out in zip(features[:-1], features[1:]):
            self.encoder.append(Down(spatial_dims, f_in, f_out, act, norm, bias, dropout))
        self.decoder = nn.ModuleList()
        for f_low, f_skip in zip(reversed(features[1:]), reversed(features[:-1])):
            # UpCat: transposed conv f_low → f_low // 2, concatenation with the f_skip skip, TwoConv → f_skip
            self.decoder.append(UpCat(spatial_dims, f_low, f_skip, f_skip, act, norm, bias, dropout, "deconv"))
        self.final_conv = Conv[Conv.CONV, spatial_dims](features[0], out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B×C×spatial → B×K×spatial`` logits."""
        skips: list[torch.Tensor] = []
        for enc in self.encoder:
            x = enc(x)
            skips.append(x)
        n = len(skips)
        for i, dec in enumerate(self.decoder):
            x = dec(x, skips[n - 2 - i])
        return self.final_conv(x)
