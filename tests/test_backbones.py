"""Backbones: every configs/backbone file builds, takes any input size, channel and class count, trains, scripts.

Shape, training and TorchScript tests use each config with small widths (overrides below) so they stay fast; the
real configs are built and run once on a small input.
"""

import pytest
import torch
from monai.data import DataLoader, Dataset, list_data_collate
from monai.networks.nets import BasicUNetPlusPlus
from torch import nn

from pipeline.config import available, load_config
from pipeline.engines import create_evaluator
from pipeline.networks import PadToMultiple, PlainUNet, TransUNet

TINY_TRANSUNET = {
    "backbone::layers": [1, 1, 1], "backbone::block_inplanes": [4, 4, 8], "backbone::stem_channels": 4,
    "backbone::hidden_size": 8, "backbone::num_layers": 1, "backbone::num_heads": 2, "backbone::mlp_dim": 16,
    "backbone::head_channels": 8, "backbone::decoder_channels": [8, 8, 4, 4], "backbone::pos_grid": [2, 2],
    "backbone::dropout_rate": 0.0,
}
# small widths per backbone, keeping each config's structure (blocks, normalisation, activation)
TINY = {
    "unet": {"backbone::channels": [4, 8, 16], "backbone::strides": [2, 2], "backbone::num_res_units": 1,
             "backbone_divisor": 4},
    "unet_paper": {"backbone::features": [8, 8, 16, 16, 16]},  # the paper's pools (2, 2, 2, 4), stride 32
    "attunet": {"backbone::channels": [4, 8, 16], "backbone::strides": [2, 2], "backbone_divisor": 4},
    "unetpp": {"backbone::features": [4, 4, 8, 8, 8, 4]},
    "transunet": TINY_TRANSUNET,
    "transunet_paper": TINY_TRANSUNET,
}
BACKBONES = sorted(TINY)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny networks gain nothing from intra-op threads, and lose much when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(name: str, tiny: bool = True, **overrides) -> nn.Module:
    """``network_def`` (the backbone wrapped in PadToMultiple) of ``name`` on the default dataset, on the CPU."""
    parser = load_config("mni", "ce", name, {**(TINY[name] if tiny else {}), "device": "$torch.device('cpu')",
                                            **overrides})
    return parser.get_parsed_content("network")


def test_every_backbone_config_is_tested():
    assert available("backbone") == BACKBONES


@pytest.mark.parametrize("name", BACKBONES)
def test_odd_sizes_channels_and_classes(name):
    torch.manual_seed(0)
    net = build(name).eval()
    with torch.no_grad():
        assert net(torch.rand(2, 1, 37, 50)).shape == (2, 4, 37, 50)  # default dataset: 1 channel, 4 classes
        net4 = build(name, in_channels=4, num_classes=3).eval()
        assert net4(torch.rand(3, 4, 37, 50)).shape == (3, 3, 37, 50)
        assert net4(torch.rand(1, 4, 64, 64)).shape == (1, 3, 64, 64)  # already a multiple of the stride


@pytest.mark.parametrize("name", BACKBONES)
def test_trains_with_the_config_loss_and_optimizer(name):
    torch.manual_seed(0)
    parser = load_config("mni", "mbls", name, {**TINY[name], "device": "$torch.device('cpu')", "lr": 0.01,
                                               "in_channels": 2, "num_classes": 3})
    net, loss_fn, opt = (parser.get_parsed_content(k) for k in ("network", "loss", "optimizer"))
    # 3 classes in 4×4 blocks (no full-resolution detail: TransUNet has no full-resolution skip), readable from
    # the two channels: class 1 lights channel 0, class 2 channel 1
    y = torch.randint(0, 3, (4, 1, 6, 7)).repeat_interleave(4, 2).repeat_interleave(4, 3)[..., :21, :26]
    x = torch.cat([y == 1, y == 2], 1).float() + 0.1 * torch.randn(4, 2, 21, 26)
    net.train()
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("name", BACKBONES)
def test_torchscript_export_matches_eager(name):
    torch.manual_seed(0)
    net = build(name, in_channels=2, num_classes=3).eval()
    scripted = torch.jit.script(net)
    x = torch.rand(2, 2, 37, 50)
    with torch.no_grad():
        assert torch.allclose(scripted(x), net(x), atol=1e-5)


@pytest.mark.parametrize("name", [n for n in BACKBONES if n != "transunet_paper"])
def test_real_config_runs(name):
    torch.manual_seed(0)
    net = build(name, tiny=False).eval()
    with torch.no_grad():
        assert net(torch.rand(1, 1, 37, 50)).shape == (1, 4, 37, 50)


def test_transunet_paper_size():
    """The published R50-ViT-B/16 size: ResNet-50 stages 3, 4, 9, ViT-B (768 wide, 12 layers, 12 heads)."""
    net = build("transunet_paper", tiny=False)
    backbone = net.net
    assert isinstance(backbone, TransUNet)
    assert [len(s) for s in backbone.stages] == [3, 4, 9]
    assert len(backbone.blocks) == 12 and backbone.norm.normalized_shape == (768,)
    assert backbone.blocks[0].attn.num_heads == 12
    n_params = sum(p.numel() for p in net.parameters())
    assert 100e6 < n_params < 110e6, n_params  # TransUNet reports 105 M


def test_unet_paper_is_the_released_network():
    """Hand count for 1 → 4 channels, widths 32-512: 3×3 convs (9·in·out + out), decoder convs reading
    [up, skip] (up first: 512 + 256 → 256, …, 64 + 32 → 32), a final 1×1 conv; no transposed convolution, no
    normalisation, ReLU only; max-pooling 2, 2, 2 then 4 (stride 32), nearest up-sampling 4, 2, 2, 2."""
    wrapped = build("unet_paper", tiny=False)
    net = wrapped.net
    widths = [32, 64, 128, 256, 512]

    def conv3(i, o):
        return 9 * i * o + o

    expected = conv3(1, 32) + conv3(32, 32)
    expected += sum(conv3(a, b) + conv3(b, b) for a, b in zip(widths[:-1], widths[1:]))  # encoder
    expected += sum(conv3(b + a, a) + conv3(a, a) for a, b in zip(widths[:-1], widths[1:]))  # decoder
    expected += 32 * 4 + 4  # final 1×1
    assert expected == 7_846_180
    assert sum(p.numel() for p in net.parameters()) == expected
    kinds = {type(m).__name__ for m in net.modules()}
    assert not kinds & {"BatchNorm2d", "InstanceNorm2d", "GroupNorm", "LayerNorm", "ConvTranspose2d", "Dropout"}
    assert {type(m) for m in net.modules() if "LU" in type(m).__name__} == {nn.ReLU}
    assert [m.kernel_size for m in net.modules() if isinstance(m, nn.MaxPool2d)] == [2, 2, 2, 4]
    ups = [m for m in net.modules() if isinstance(m, nn.Upsample)]
    assert [(m.scale_factor, m.mode) for m in ups] == [(4.0, "nearest"), (2.0, "nearest"), (2.0, "nearest"),
                                                      (2.0, "nearest")]
    assert [dec.convs.conv_0.conv.in_channels for dec in net.decoder] == [768, 384, 192, 96]
    assert net.final_conv.kernel_size == (1, 1) and net.stride == 32 and wrapped.divisor == [32]
    net.eval()
    scripted = torch.jit.script(wrapped.eval())
    with torch.no_grad():
        assert net(torch.rand(2, 1, 64, 96)).shape == (2, 4, 64, 96)  # multiples of 32: no wrapper needed
        x = torch.rand(1, 1, 80, 96)  # a slice of the default dataset: padded to 96×96 and cropped back
        out = wrapped(x)
        assert out.shape == (1, 4, 80, 96)
        assert torch.allclose(scripted(x), out, atol=1e-5)
        with pytest.raises(ValueError, match="multiples of 32"):
            net(x)


def test_unet_paper_concatenates_the_upsampled_features_before_the_skip():
    """One decoder level by hand: nearest up-sampling, [up, skip], two 3×3 conv + ReLU."""
    torch.manual_seed(0)
    net = PlainUNet(2, 1, 2, features=(2, 3), pools=(4,)).eval()
    x = torch.rand(1, 1, 8, 12)
    dec = net.decoder[0]
    with torch.no_grad():
        skip = net.encoder[0](x)
        low = net.encoder[1](skip)
        assert low.shape == (1, 3, 2, 3)  # 4×4 max-pooling
        up = low.repeat_interleave(4, 2).repeat_interleave(4, 3)
        c0, c1 = dec.convs.conv_0.conv, dec.convs.conv_1.conv
        h = torch.relu(c1(torch.relu(c0(torch.cat([up, skip], 1)))))
        assert torch.allclose(net(x), net.final_conv(h), atol=1e-6)
        assert not torch.allclose(net(x), net.final_conv(torch.relu(c1(torch.relu(c0(torch.cat([skip, up], 1)))))))


def test_unetpp_uses_the_full_depth_output():
    """With deep supervision on, MONAI's UNet++ returns [X01, X02, X03, X04]; PadToMultiple keeps X04, which is
    also the one output of the configured network (deep supervision off)."""
    torch.manual_seed(0)
    kw = dict(spatial_dims=2, in_channels=1, out_channels=3, features=(4, 4, 8, 8, 8, 4))
    plain, deep = BasicUNetPlusPlus(**kw, deep_supervision=False), BasicUNetPlusPlus(**kw, deep_supervision=True)
    deep.load_state_dict(plain.state_dict())
    x = torch.rand(1, 1, 37, 50)
    with torch.no_grad():
        outs = deep.eval()(torch.nn.functional.pad(x, (7, 7, 5, 6), mode="replicate"))  # 37×50 → 48×64
        a, b = PadToMultiple(plain.eval(), 16)(x), PadToMultiple(deep, 16)(x)
    assert len(outs) == 4
    assert torch.equal(a, b)
    assert torch.allclose(b, outs[3][..., 5:42, 7:57])
    assert not torch.allclose(b, outs[0][..., 5:42, 7:57])


def test_slice_by_slice_evaluation_of_a_3d_volume():
    """A 2D backbone runs over an odd-sized volume slice by slice in the evaluator, with every metric."""
    torch.manual_seed(0)
    net = build("transunet", in_channels=1, num_classes=3)
    image = torch.rand(1, 21, 19, 5)
    label = (image > 0.3).float() + (image > 0.8).float()
    loader = DataLoader(Dataset([{"image": image, "label": label}]), batch_size=1, collate_fn=list_data_collate)
    evaluator = create_evaluator(net, loader, torch.device("cpu"), num_classes=3, slice_axis=2, prefix="t/",
                                 surface_distance=True)
    evaluator.run()
    metrics = evaluator.state.metrics
    for key in ("t/dsc", "t/asd", "t/ece", "t/cece"):
        assert key in metrics and torch.isfinite(torch.tensor(float(metrics[key]))), (key, metrics)
    assert evaluator.state.output[0]["prob"].shape == (3, 21, 19, 5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"block": "wide"}, "unknown block 'wide'"),
        ({"layers": (1, 1)}, "same length"),
        ({"decoder_channels": (8, 8, 8)}, "decoder_channels needs 4 widths"),
        ({"hidden_size": 10, "num_heads": 4}, "not divisible by num_heads 4"),
        ({"pos_grid": (2, 2, 2)}, "pos_grid"),
    ],
)
def test_transunet_bad_arguments(kwargs, match):
    base = dict(block="basic", layers=(1, 1, 1), block_inplanes=(4, 4, 4), stem_channels=4, hidden_size=8,
                num_layers=1, num_heads=2, mlp_dim=8, head_channels=4, decoder_channels=(4, 4, 4, 4), pos_grid=(2, 2))
    with pytest.raises(ValueError, match=match):
        TransUNet(1, 2, **{**base, **kwargs})


def test_plain_unet_bad_arguments():
    with pytest.raises(ValueError, match="at least two widths"):
        PlainUNet(features=[8])
    with pytest.raises(ValueError, match=r"pools needs 2 factors >= 2 .*got pools=\[2, 2, 4\]"):
        PlainUNet(features=[4, 8, 16], pools=[2, 2, 4])
    with pytest.raises(ValueError, match="pools needs 1 factors >= 2"):
        PlainUNet(features=[4, 8], pools=[1])


def test_benchmark_measure_in_process():
    from pipeline.benchmarks.backbones import measure

    r = measure("unet", (37, 50), batch=2, repeats=2, warmup=1, device="cpu")
    assert r["params"] == sum(p.numel() for p in build("unet", tiny=False).parameters())
    assert len(r["step_ms_all"]) == 2 and r["step_ms"] > 0 and r["peak_mib"] >= r["delta_mib"] >= 0


def test_plain_unet_and_transunet_in_3d():
    tiny = dict(block="basic", layers=(1, 1, 1), block_inplanes=(4, 4, 4), stem_channels=4, hidden_size=8,
                num_layers=1, num_heads=2, mlp_dim=8, head_channels=4, decoder_channels=(4, 4, 4, 4))
    x = torch.rand(1, 2, 19, 21, 9)
    with torch.no_grad():
        net = PadToMultiple(TransUNet(2, 3, spatial_dims=3, pos_grid=(2, 2, 2), **tiny), 16)
        assert net(x).shape == (1, 3, 19, 21, 9)
        assert PadToMultiple(PlainUNet(3, 2, 3, features=(4, 8), pools=(2,)), 2)(x).shape == (1, 3, 19, 21, 9)
