import pytest
import torch
from monai.inferers import SliceInferer
from torch import nn

from pipeline.engines import SliceBatchInferer
from pipeline.networks import PadToMultiple


class _Strided(nn.Module):
    """Fails unless the input is a multiple of 8, like a UNet with three stride-2 levels."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)

    def forward(self, x):
        if any(s % 8 for s in x.shape[2:]):
            raise RuntimeError(f"size {tuple(x.shape)} not divisible by 8")
        return [self.conv(x) * 0, self.conv(x)]


def test_pad_to_multiple_pads_and_crops_back():
    torch.manual_seed(0)
    net = _Strided()
    x = torch.randn(2, 2, 21, 30)
    out = PadToMultiple(net, divisor=8)(x)
    assert out.shape == (2, 3, 21, 30)
    # the interior, away from the padded border, equals the plain convolution of the input
    assert torch.allclose(out[..., 2:-2, 2:-2], net.conv(x)[..., 2:-2, 2:-2], atol=1e-6)
    with pytest.raises(ValueError, match="does not match"):
        PadToMultiple(net, divisor=(8, 8, 8))(x)


def test_slice_batch_inferer_matches_monai_slice_inferer():
    torch.manual_seed(0)
    net = nn.Conv2d(1, 4, 3, padding=1)
    vol = torch.randn(1, 1, 10, 12, 7)
    for axis in (0, 1, 2):
        ours = SliceBatchInferer(spatial_dim=axis, sw_batch_size=3)(vol, net)
        roi = [s for i, s in enumerate(vol.shape[2:]) if i != axis]
        ref = SliceInferer(spatial_dim=axis, roi_size=roi, sw_batch_size=3)(vol, net)
        assert ours.shape == (1, 4, 10, 12, 7)
        assert torch.allclose(ours, ref, atol=1e-5)
