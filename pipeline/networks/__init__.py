"""Backbones and the wrapper that lets any of them take inputs of any size.

The backbones are chosen by ``configs/backbone/<name>.yaml``: MONAI networks where MONAI has them (``UNet``,
``AttentionUnet``, ``BasicUNetPlusPlus``), and here, from MONAI parts, what it lacks: :class:`PlainUNet` (the
paper's UNet) and :class:`TransUNet`. The base config wraps the chosen one in :class:`PadToMultiple`, so an input
whose size is not a multiple of the network's total stride is padded and the output cropped back: never silently
resized.
"""

from __future__ import annotations

from pipeline.networks.padding import PadToMultiple
from pipeline.networks.transunet import TransUNet
from pipeline.networks.unet import PlainUNet

__all__ = ["PadToMultiple", "PlainUNet", "TransUNet"]
