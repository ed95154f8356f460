"""A TransUNet-style hybrid (Chen et al., 2021) built from MONAI parts; MONAI has no TransUNet.

CNN encoder (MONAI ``ResNetBlock`` / ``ResNetBottleneck`` stages after a 7×7 stride-2 stem and a max pool) →
Vision Transformer on the bottleneck features, one token per feature-map pixel (MONAI ``TransformerBlock``) →
cascaded up-sampling decoder with skip connections from the CNN stages (MONAI ``UpCat``: bilinear ×2, concatenate,
two 3×3 conv + norm + ReLU) → 3×3 segmentation head. Trained from scratch: no pretrained weights are loaded.

Differences from the published model, besides the weights: the encoder uses MONAI's ResNet blocks with batch norm
(TransUNet: ResNet-v2 with group norm and weight-standardised convolutions), MONAI's transformer block applies its
dropout rate to the attention weights as well as to the MLP, and the position embedding is learnt on a fixed grid
(``pos_grid``) and resized bilinearly to the token grid of each input, so any input size (a multiple of the total
stride) works.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, TransformerBlock
from monai.networks.layers.factories import Conv, Pool
from monai.networks.layers.utils import get_norm_layer
from monai.networks.nets.basic_unet import UpCat
from monai.networks.nets.resnet import ResNetBlock, ResNetBottleneck
from torch import nn

BLOCKS = {"basic": ResNetBlock, "bottleneck": ResNetBottleneck}


class TransUNet(nn.Module):
    """Hybrid CNN–Transformer UNet, ``B×C×spatial → B×K×spatial`` logits, stride ``2 ** (len(layers) + 1)``.

    With ``len(layers) == 3`` (default) the stride is 16: stem (1/2) → max pool and stage 1 (1/4) → stage 2
    (1/8) → stage 3 (1/16) → transformer → 4 up-samplings with skips from stage 2, stage 1 and the stem, and none
    at full resolution. The defaults are the published R50-ViT-B/16 sizes (ResNet-50 stages 3, 4, 9; hidden 768,
    12 layers, 12 heads, MLP 3072; decoder 256, 128, 64, 16), about 105 M parameters.

    Args:
        in_channels: input channels C.
        out_channels: output channels K (classes).
        spatial_dims: 2 (default) or 3.
        block: ``"bottleneck"`` (default, ×4 channel expansion) or ``"basic"`` MONAI ResNet blocks.
        layers: blocks per CNN stage (default ``(3, 4, 9)``); stage ``i`` > 0 halves the resolution.
        block_inplanes: inner widths of the stages (default ``(64, 128, 256)``); stage outputs are these × the
            block's expansion.
        stem_channels: width of the 7×7 stride-2 stem (default 64).
        hidden_size: transformer width (default 768).
        num_layers: transformer blocks (default 12).
        num_heads: attention heads (default 12); must divide ``hidden_size``.
        mlp_dim: transformer MLP width (default 3072).
        dropout_rate: dropout in the transformer (default 0.1).
        pos_grid: grid of the learnt position embedding (default ``(14, 14)``, the token grid of a 224×224 input);
            resized bilinearly (trilinearly in 3D) to each input's token grid.
        head_channels: width of the 3×3 convolution between the transformer and the decoder (default 512).
        decoder_channels: widths of the up-sampling blocks, one more than ``layers`` (default ``(256, 128, 64,
            16)``).
        norm: MONAI normalisation of the CNN parts (default batch).

    Raises:
        ValueError: inconsistent lengths, an unknown block, or ``hidden_size`` not divisible by ``num_heads``.

    >>> net = TransUNet(1, 3, block="basic", layers=(1, 1, 1), block_inplanes=(8, 8, 8), stem_channels=8,
    ...                 hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32, head_channels=8,
    ...                 decoder_channels=(8, 8, 8, 8), pos_grid=(2, 2))
    >>> net(torch.zeros(2, 1, 48, 64)).shape
    torch.Size([2, 3, 48, 64])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        spatial_dims: int = 2,
        block: str = "bottleneck",
        layers: Sequence[int] = (3, 4, 9),
        block_inplanes: Sequence[int] = (64, 128, 256),
        stem_channels: int = 64,
        hidden_size: int = 768,
        num_layers: int = 12,
        num_heads: int = 12,
        mlp_dim: int = 3072,
        dropout_rate: float = 0.1,
        pos_grid: Sequence[int] = (14, 14),
        head_channels: int = 512,
        decoder_channels: Sequence[int] = (256, 128, 64, 16),
        norm: str | tuple = "batch",
    ) -> None:
        super().__init__()
        if block not in BLOCKS:
            raise ValueError(f"unknown block '{block}': expected one of {sorted(BLOCKS)}")
        if len(layers) != len(block_inplanes) or not layers:
            raise ValueError(f"layers {list(layers)} and block_inplanes {list(block_inplanes)} need the same length")
        if len(decoder_channels) != len(layers) + 1:
            raise ValueError(
                f"decoder_channels needs {len(layers) + 1} widths (one per up-sampling) for {len(layers)} CNN "
                f"stages, got {list(decoder_channels)}"
            )
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if len(pos_grid) != spatial_dims:
            raise ValueError(f"pos_grid {list(pos_grid)} needs {spatial_dims} sizes")
        blk = BLOCKS[block]
        conv = Conv[Conv.CONV, spatial_dims]
        self.spatial_dims = spatial_dims
        self.interp_mode = "bilinear" if spatial_dims == 2 else "trilinear"

        # --- CNN encoder ---
        self.stem = Convolution(spatial_dims, in_channels, stem_channels, strides=2, kernel_size=7, act="relu",
                                norm=norm, bias=False)
        self.pool = Pool[Pool.MAX, spatial_dims](kernel_size=3, stride=2, padding=1)
        self.stages = nn.ModuleList()
        skip_channels = [stem_channels]
        width = stem_channels
        for i, (n_blocks, planes) in enumerate(zip(layers, block_inplanes)):
            stride = 1 if i == 0 else 2
            out = planes * blk.expansion
            down = None
            if stride != 1 or width != out:
                down = nn.Sequential(conv(width, out, kernel_size=1, stride=stride, bias=False),
                                     get_norm_layer(name=norm, spatial_dims=spatial_dims, channels=out))
            stage = [blk(width, planes, spatial_dims, stride, down, norm=norm)]
            stage += [blk(out, planes, spatial_dims, 1, None, norm=norm) for _ in range(int(n_blocks) - 1)]
            self.stages.append(nn.Sequential(*stage))
            skip_channels.append(out)
            width = out

        # --- transformer on the bottleneck: one token per feature-map pixel (patch size 1) ---
        self.embed = conv(width, hidden_size, kernel_size=1)
        self.pos_embed = nn.Parameter(torch.zeros(1, hidden_size, *[int(g) for g in pos_grid]))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.embed_dropout = nn.Dropout(dropout_rate)
        self.blocks = nn.ModuleList(
            [TransformerBlock(hidden_size, mlp_dim, num_heads, dropout_rate, qkv_bias=True) for _ in range(num_layers)]
        )
        self.norm = nn.LayerNorm(hidden_size)

        # --- decoder: skips from stage n-2 … stage 0, then the stem, then none ---
        self.head_conv = Convolution(spatial_dims, hidden_size, head_channels, kernel_size=3, act="relu", norm=norm,
                                     bias=False)
        skips = list(reversed(skip_channels[:-1])) + [0]
        self.decoder = nn.ModuleList()
        prev = head_channels
        for skip, ch in zip(skips, decoder_channels):
            self.decoder.append(UpCat(spatial_dims, prev, skip, ch, "relu", norm, False, 0.0, upsample="nontrainable",
                                      pre_conv=None, interp_mode=self.interp_mode, align_corners=True))
            prev = ch
        self.n_skips = len(skips) - 1
        self.seg_head = conv(prev, out_channels, kernel_size=3, padding=1)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Bottleneck features ``B×C×grid`` → transformer output ``B×hidden×grid``."""
        emb = self.embed(x)
        grid = emb.shape[2:]
        pos = self.pos_embed
        if pos.shape[2:] != grid:
            pos = F.interpolate(pos, size=grid, mode=self.interp_mode, align_corners=False)
        t = self.embed_dropout((emb + pos).flatten(2).transpose(1, 2))  # B×N×hidden
        for blk in self.blocks:
            t = blk(t)
        t = self.norm(t)
        return t.transpose(1, 2).reshape(emb.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B×C×spatial → B×K×spatial`` logits; spatial sizes must be multiples of the total stride."""
        feats: list[torch.Tensor] = []
        x = self.stem(x)
        feats.append(x)
        x = self.pool(x)
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        x = self.head_conv(self.tokens(x))
        n = len(feats)
        for i, up in enumerate(self.decoder):
            skip: Optional[torch.Tensor] = None  # noqa: UP045 (TorchScript)
            if i < self.n_skips:
                skip = feats[n - 2 - i]
            x = up(x, skip)
        return self.seg_head(x)
