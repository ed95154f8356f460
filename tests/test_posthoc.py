"""Post-hoc calibration: temperature scaling and local temperature scaling (pipeline.posthoc)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.evaluation import default_settings
from pipeline.posthoc import (
    LocalTemperatureScaling,
    ReferenceTemperatureNet,
    SliceSet,
    TemperatureScaling,
    check_lts_settings,
    collect_slices,
    fit_calibrators,
)
from pipeline.registry import UnknownNameError

LTS = default_settings()["lts"]


def lts_settings(block):
    return check_lts_settings(block, LTS)


def overconfident_slices(scale: float = 4.0, n: int = 6, k: int = 3, size=(12, 10), seed: int = 0) -> SliceSet:
    """Labels drawn from softmax(z) (calibrated at T = 1), logits reported as ``scale · z`` (over-confident)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, *size, generator=g) * 1.5
    p = torch.softmax(z, 1).permute(0, 2, 3, 1).reshape(-1, k)
    y = torch.multinomial(p, 1, generator=g).reshape(n, *size)
    x = torch.rand(n, 1, *size, generator=g)
    return SliceSet([scale * z[:3], scale * z[3:]], [x[:3], x[3:]], [y[:3], y[3:]])


def nll(logits_list, labels_list) -> float:
    z = torch.cat([t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]) for t in logits_list])
    y = torch.cat([t.reshape(-1) for t in labels_list])
    return float(F.cross_entropy(z, y))


# ---------------------------------------------------------------------------------------------- TS
def test_ts_lowers_nll_of_an_overconfident_case_and_keeps_the_argmax():
    data = overconfident_slices(scale=4.0)
    ts = TemperatureScaling(nn.Identity())
    info = ts.fit(data)
    assert 3.0 < ts.temperature < 5.5  # the logits were scaled by 4
    assert info["val_nll_after"] < info["val_nll_before"] - 0.1
    with torch.no_grad():
        calibrated = [ts.calibrate(z) for z in data.logits]
    assert nll(calibrated, data.labels) == pytest.approx(info["val_nll_after"], rel=1e-5)
    for z, c in zip(data.logits, calibrated):
        assert torch.equal(z.argmax(1), c.argmax(1))


def test_ts_of_a_calibrated_case_stays_near_one():
    ts = TemperatureScaling(nn.Identity())
    ts.fit(overconfident_slices(scale=1.0))
    assert 0.8 < ts.temperature < 1.25


def test_ts_forward_divides_the_network_output():
    net = nn.Conv2d(1, 3, 1)
    ts = TemperatureScaling(net, temperature=2.5)
    x = torch.randn(2, 1, 4, 4)
    assert torch.allclose(ts(x), net(x) / 2.5)
    assert ts.temperature_map(net(x)).shape == (2, 1, 4, 4)


def test_ts_foreground_only_ignores_background_voxels():
    data = overconfident_slices(scale=4.0)
    # make background voxels perfectly confident and right: with them counted, T must move towards 1
    for z, y in zip(data.logits, data.labels):
        bg = (y == 0)[:, None].expand_as(z)
        z[bg] = torch.tensor([30.0, 0.0, 0.0])[:, None, None, None].expand(z.shape[0], 3, *z.shape[2:])[bg]
    all_voxels, fg_only = TemperatureScaling(nn.Identity()), TemperatureScaling(nn.Identity())
    all_voxels.fit(data)
    fg_only.fit(data, foreground_only=True)
    assert fg_only.temperature > all_voxels.temperature


def test_ts_save_and_load(tmp_path):
    ts = TemperatureScaling(nn.Identity())
    ts.fit(overconfident_slices())
    path = ts.save_calibrator(tmp_path / "posthoc" / "ts.pt")
    again = TemperatureScaling.load_calibrator(nn.Identity(), path)
    assert again.temperature == pytest.approx(ts.temperature, rel=1e-6)


def test_ts_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        TemperatureScaling(nn.Identity(), temperature=0)
    empty = SliceSet([torch.zeros(1, 2, 3, 3)], [torch.zeros(1, 1, 3, 3)], [torch.zeros(1, 3, 3, dtype=torch.long)])
    with pytest.raises(ValueError, match="no validation voxel"):
        TemperatureScaling(nn.Identity()).fit(empty, foreground_only=True)
    nan = SliceSet([torch.full((1, 2, 3, 3), math.nan)], [torch.zeros(1, 1, 3, 3)],
                   [torch.ones(1, 3, 3, dtype=torch.long)])
    with pytest.raises(ValueError, match="NaN or infinite"):
        TemperatureScaling(nn.Identity()).fit(nan)


# ---------------------------------------------------------------------------------------------- LTS
RELEASED_CONVS = ("conv1", "conv2", "conv3", "conv4", "param1", "param2", "param3", "conv_img", "param_img")
RELEASED_KEYS = [f"temperature_level_2_{n}.{p}" for n in RELEASED_CONVS for p in ("weight", "bias")]


def random_reference(k: int = 3, c: int = 2, scale: float = 0.3, seed: int = 0) -> ReferenceTemperatureNet:
    net = ReferenceTemperatureNet(k, c)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return net


def reference_formula(net: ReferenceTemperatureNet, z: torch.Tensor, x: torch.Tensor, mode: str = "reflect"):
    """The released LTS written out: every convolution 5×5, dilation 2, on inputs padded by 4 (``mode``)."""

    def conv(name, inp):
        sd = net.state_dict()
        w, b = sd[f"temperature_level_2_{name}.weight"], sd[f"temperature_level_2_{name}.bias"]
        return F.conv2d(F.pad(inp, (4, 4, 4, 4), mode=mode), w, b, dilation=2)

    t1, t2, t3, t4 = (conv(f"conv{i}", z) + 1 for i in (1, 2, 3, 4))
    p1, p2, p3 = (torch.sigmoid(conv(f"param{j}", z)) for j in (1, 2, 3))
    a = t1 * p1 + t2 * (1 - p1)
    b = t3 * p2 + t4 * (1 - p2)
    m_l = a * p3 + b * (1 - p3)
    m_x = conv("conv_img", x) + 1
    g = torch.sigmoid(conv("param_img", z))
    return torch.relu(m_l * g + m_x * (1 - g) + 1) + 1e-8


def test_reference_lts_forward_is_the_released_formula():
    net = random_reference(k=3, c=2)
    z, x = torch.randn(2, 3, 9, 11) * 3, torch.rand(2, 2, 9, 11)
    with torch.no_grad():
        t = net(z, x)
        expected = reference_formula(net, z, x)
    assert t.shape == (2, 1, 9, 11)
    assert t.std() > 0.1  # the random weights make a temperature that varies per pixel
    assert torch.allclose(t, expected, atol=1e-5, rtol=1e-5)
    # the same convolutions as torch's own reflect-padded Conv2d
    ref = nn.Conv2d(3, 1, 5, dilation=2, padding=4, padding_mode="reflect")
    ref.load_state_dict(net.temperature_level_2_conv1.state_dict())
    with torch.no_grad():
        assert torch.allclose(net.temperature_level_2_conv1(z), ref(z), atol=1e-6)
    lts = LocalTemperatureScaling(nn.Identity(), net)
    with torch.no_grad():
        assert torch.allclose(lts.calibrate(z, x), z / expected, atol=1e-5, rtol=1e-4)


def test_reference_lts_pads_tiny_inputs_by_replication():
    """Reflect padding by 4 needs sides of at least 5; smaller slices are padded by replication instead."""
    net = random_reference(k=2, c=1)
    z, x = torch.randn(1, 2, 3, 7), torch.rand(1, 1, 3, 7)
    with torch.no_grad():
        assert torch.allclose(net(z, x), reference_formula(net, z, x, mode="replicate"), atol=1e-5)
        z5, x5 = torch.randn(1, 2, 5, 7), torch.rand(1, 1, 5, 7)
        assert torch.allclose(net(z5, x5), reference_formula(net, z5, x5, mode="reflect"), atol=1e-5)
        assert not torch.allclose(net(z5, x5), reference_formula(net, z5, x5, mode="replicate"), atol=1e-5)


def test_reference_lts_starts_at_two_and_at_any_constant():
    net = ReferenceTemperatureNet(num_classes=3, image_channels=1)
    assert all(float(p.detach().abs().sum()) == 0 for p in net.parameters())  # the released all-zero initialisation
    z, x = torch.randn(2, 3, 9, 7) * 5, torch.rand(2, 1, 9, 7)
    with torch.no_grad():
        assert torch.equal(net(z, x), torch.full((2, 1, 9, 7), 2.0 + 1e-8))
        lts = LocalTemperatureScaling(nn.Identity(), net)
        assert torch.allclose(lts.calibrate(z, x), z / 2)
        net.init_constant(1.0)
        assert torch.allclose(lts.calibrate(z, x), z)
        net.init_constant(0.7)
        assert torch.allclose(net(z, x), torch.full((2, 1, 9, 7), 0.7), atol=1e-6) and net.init_temperature == 0.7
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        net.init_constant(0)


def test_reference_lts_loads_weights_with_the_released_names():
    net = random_reference(k=4, c=1)
    assert list(net.state_dict()) == RELEASED_KEYS
    released = {k: v.clone() for k, v in net.state_dict().items()}  # e.g. a checkpoint of the released code
    fresh = ReferenceTemperatureNet(4, 1)
    fresh.load_state_dict(released, strict=True)
    again = ReferenceTemperatureNet.from_state_dict(released)
    assert again.config == {"num_classes": 4, "image_channels": 1}
    z, x = torch.randn(1, 4, 8, 8), torch.rand(1, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(again(z, x), net(z, x)) and torch.equal(fresh(z, x), net(z, x))

    renamed = {k.replace("param_img", "gate_img"): v for k, v in released.items()}
    with pytest.raises(ValueError, match=r"missing \['temperature_level_2_param_img.bias', "
                                         r"'temperature_level_2_param_img.weight'\]; unexpected \["):
        ReferenceTemperatureNet.from_state_dict(renamed, "lts_checkpoint.pth")
    with pytest.raises(ValueError, match="weights in lts_checkpoint.pth do not match"):
        fresh.load_checked(renamed, "lts_checkpoint.pth")
    prefixed = {f"module.{k}": v for k, v in released.items()}
    with pytest.raises(ValueError, match="expected keys: temperature_level_2_conv1.weight, "):
        fresh.load_checked(prefixed)
    with pytest.raises(ValueError, match=r"temperature_level_2_conv1.weight has shape \(1, 4, 5, 5\), expected "
                                         r"\(1, 3, 5, 5\)"):
        ReferenceTemperatureNet(3, 1).load_checked(released)


def test_lts_never_changes_the_argmax():
    """One positive temperature per pixel, shared by the classes: ``l / T`` keeps each pixel's argmax, however
    much T varies between pixels."""
    net = random_reference(k=4, c=1, scale=0.5)
    z, x = torch.randn(3, 4, 16, 12) * 4, torch.rand(3, 1, 16, 12)
    with torch.no_grad():
        t = net(z, x)
        out = LocalTemperatureScaling(nn.Identity(), net).calibrate(z, x)
    assert float(t.max() / t.min()) > 10
    assert torch.equal(out.argmax(1), z.argmax(1))
    assert not torch.allclose(torch.softmax(out, 1).amax(1), torch.softmax(z, 1).amax(1), atol=1e-3)


def test_lts_fits_saves_loads_and_reproduces(tmp_path):
    torch.manual_seed(0)
    data = overconfident_slices(scale=3.0)
    net = nn.Conv2d(1, 3, 3, padding=1)
    tnet = ReferenceTemperatureNet(3, image_channels=1)
    tnet.init_constant(1.0)
    lts = LocalTemperatureScaling(net, tnet)
    info = lts.fit(data, iterations=40, lr=1e-3, batch_slices=3, eval_every=5, seed=0)
    assert info["val_nll_after"] < info["val_nll_before"] - 0.1
    assert 0 < info["best_iteration"] <= 40
    lts.eval()
    z, x = data.logits[0], data.images[0]
    expected_nll = nll([lts.calibrate(zz, xx).detach() for zz, xx in zip(data.logits, data.images)], data.labels)
    assert expected_nll == pytest.approx(info["val_nll_after"], rel=1e-4)

    path = lts.save_calibrator(tmp_path / "lts.pt")
    saved = torch.load(path, weights_only=True)
    assert saved["kind"] == "lts" and saved["model"] == "reference" and list(saved["state_dict"]) == RELEASED_KEYS
    again = LocalTemperatureScaling.load_calibrator(net, path).eval()
    assert again.temperature_net.config == lts.temperature_net.config
    with torch.no_grad():
        assert torch.equal(again.calibrate(z, x), lts.calibrate(z, x))
        image = torch.rand(2, 1, 12, 10)
        assert torch.equal(again(image), lts(image))  # wraps the network: image → calibrated logits
    other = LocalTemperatureScaling(net, ReferenceTemperatureNet(3, 1))
    other.load_calibrator_state(saved)
    with torch.no_grad():
        assert torch.equal(other.calibrate(z, x), lts.calibrate(z, x))


def test_lts_from_a_constant_start_keeps_its_tree_symmetric():
    """Equal leaves and gates at 0.5: the leaves get equal gradients and the gates none, whatever the fit."""
    data = overconfident_slices(scale=3.0)
    tnet = ReferenceTemperatureNet(3, 1)
    LocalTemperatureScaling(nn.Identity(), tnet).fit(data, iterations=20, lr=0.01, batch_slices=3, eval_every=5)
    sd = tnet.state_dict()
    assert float(sd["temperature_level_2_conv1.weight"].abs().max()) > 1e-3  # the leaves did move
    for i in (2, 3, 4):
        for p in ("weight", "bias"):
            assert torch.equal(sd[f"temperature_level_2_conv{i}.{p}"], sd[f"temperature_level_2_conv1.{p}"])
    for j in (1, 2, 3):
        assert float(sd[f"temperature_level_2_param{j}.weight"].abs().max()) == 0
    assert float(sd["temperature_level_2_param_img.weight"].abs().max()) > 0  # the image gate is fitted


def test_lts_fitting_is_reproducible():
    data = overconfident_slices(scale=3.0)
    states = []
    for _ in range(2):
        lts = LocalTemperatureScaling(nn.Identity(), random_reference(3, 1, scale=0.05))
        lts.fit(data, iterations=10, lr=0.01, batch_slices=2, eval_every=5, seed=3)
        states.append(lts.calibrator_state()["state_dict"])
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_lts_calibrates_volumes_slice_by_slice():
    lts = LocalTemperatureScaling(nn.Identity(), random_reference(2, 1))
    z, x = torch.randn(1, 2, 8, 9, 6), torch.rand(1, 1, 8, 9, 6)
    with torch.no_grad():
        out = lts.calibrate(z, x, slice_axis=1)
        for s in range(9):
            assert torch.allclose(out[:, :, :, s], lts.calibrate(z[:, :, :, s], x[:, :, :, s]), atol=1e-6)
        assert not torch.allclose(out, lts.calibrate(z, x, slice_axis=2), atol=1e-4)
    with pytest.raises(ValueError, match="slice_axis 0, 1 or 2"):
        lts.calibrate(z, x)


def test_fit_calibrators_starts_lts_at_the_ts_temperature(tmp_path):
    torch.manual_seed(0)
    network = nn.Conv2d(1, 3, 3, padding=1)
    with torch.no_grad():
        network.weight.mul_(20)  # over-confident
    vols = [{"image": torch.rand(1, 12, 10, 4), "label": torch.randint(0, 3, (1, 12, 10, 4)).float()} for _ in range(2)]
    settings = {"posthoc": ["ts", "lts"], "fit_foreground_only": False, "max_val_slices": None,
                "ts": {"max_iter": 50}, "lts": lts_settings({"iterations": 20})}
    assert settings["lts"]["init"] == "ts"
    cals, info = fit_calibrators(network, vols, settings, 3, 1, 2, "cpu", folder=tmp_path, say=lambda _: None)
    assert info["lts"]["init_temperature"] == pytest.approx(info["ts"]["temperature"]) and info["ts"]["temperature"] > 2
    assert info["lts"]["val_nll_before"] == pytest.approx(info["ts"]["val_nll_after"], rel=1e-5)
    assert info["lts"]["val_nll_after"] <= info["ts"]["val_nll_after"] + 1e-6
    assert info["lts"]["model"] == "reference"
    again = LocalTemperatureScaling.load_calibrator(network, tmp_path / "lts.pt")
    x = vols[0]["image"][None, ..., 0]
    with torch.no_grad():
        assert torch.equal(again(x), cals["lts"](x))
    _, identity = fit_calibrators(network, vols, {**settings, "posthoc": ["lts"],
                                                  "lts": lts_settings({"init": "identity", "iterations": 0})},
                                  3, 1, 2, "cpu", say=lambda _: None)
    assert identity["lts"]["init_temperature"] == 1.0 and "ts" not in identity


def test_lts_settings_are_checked():
    assert lts_settings(None) == LTS
    older = lts_settings({"iterations": 100, "lr": 0.001, "batch_slices": 16, "eval_every": 10,
                                "use_image": True, "hidden": 4, "init": "identity"})  # a config saved before
    assert older == {**LTS, "init": "identity"}
    assert lts_settings({"lr": "1e-4"})["lr"] == 1e-4  # YAML reads 1e-4 as a string
    with pytest.raises(UnknownNameError, match="Did you mean 'iterations'"):
        lts_settings({"iteration": 5})
    with pytest.raises(UnknownNameError, match="unknown LTS initialisation 'zero'"):
        lts_settings({"init": "zero"})
    with pytest.raises(ValueError, match="evaluation::lts::iterations must be a whole number >= 0, got -1"):
        lts_settings({"iterations": -1})
    with pytest.raises(ValueError, match="evaluation::lts::batch_slices must be a whole number >= 1, got 0"):
        lts_settings({"batch_slices": 0})
    with pytest.raises(ValueError, match="evaluation::lts::lr must be a number > 0, got 'fast'"):
        lts_settings({"lr": "fast"})
    with pytest.raises(ValueError, match="evaluation::lts must be a mapping"):
        lts_settings(3)


def test_lts_bad_inputs(tmp_path):
    net = ReferenceTemperatureNet(3, image_channels=1)
    with pytest.raises(ValueError, match=r"expected logits B×3×H×W, got shape \(1, 2, 5, 5\)"):
        net(torch.zeros(1, 2, 5, 5), torch.zeros(1, 1, 5, 5))
    with pytest.raises(ValueError, match=r"takes the image 1×1×\(5, 5\) with the logits, got None"):
        net(torch.zeros(1, 3, 5, 5), None)
    with pytest.raises(ValueError, match=r"got \(1, 1, 5, 4\)"):
        net(torch.zeros(1, 3, 5, 5), torch.zeros(1, 1, 5, 4))
    with pytest.raises(ValueError, match="need num_classes >= 2 and image_channels >= 1"):
        ReferenceTemperatureNet(1)
    ts_file = TemperatureScaling(nn.Identity()).save_calibrator(tmp_path / "ts.pt")
    with pytest.raises(ValueError, match="expected a 'lts' calibrator"):
        LocalTemperatureScaling.load_calibrator(nn.Identity(), ts_file)
    with pytest.raises(FileNotFoundError, match="no calibrator file"):
        LocalTemperatureScaling.load_calibrator(nn.Identity(), tmp_path / "missing.pt")
    (tmp_path / "broken.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="broken.pt is not a readable calibrator file"):
        TemperatureScaling.load_calibrator(nn.Identity(), tmp_path / "broken.pt")
    older = {"kind": "lts", "config": {"num_classes": 3, "image_channels": 1, "hidden": 4}, "state_dict": {}}
    torch.save(older, tmp_path / "older.pt")  # written before the model was recorded: the former network
    with pytest.raises(ValueError, match="model None, expected one of \\['reference'\\].*fit LTS again"):
        LocalTemperatureScaling.load_calibrator(nn.Identity(), tmp_path / "older.pt")
    with pytest.raises(ValueError, match="iterations >= 0"):
        LocalTemperatureScaling(nn.Identity(), net).fit(overconfident_slices(), iterations=-1)
    with pytest.raises(ValueError, match="lr > 0"):
        LocalTemperatureScaling(nn.Identity(), net).fit(overconfident_slices(), lr=0)


# ---------------------------------------------------------------------------------------------- slices
def test_collect_slices_runs_the_network_per_slice_and_draws_reproducibly():
    net = nn.Conv2d(1, 2, 1)
    vols = [{"image": torch.rand(1, 6, 5, 4), "label": torch.randint(0, 2, (1, 6, 5, 4)).float()} for _ in range(3)]
    all_ = collect_slices(net, vols, slice_axis=2)
    assert all_.n_slices == 12 and all_.logits[0].shape == (4, 2, 6, 5) and all_.labels[0].dtype == torch.long
    with torch.no_grad():
        assert torch.allclose(all_.logits[1][2], net(vols[1]["image"][None, :, :, :, 2])[0], atol=1e-6)
    a = collect_slices(net, vols, slice_axis=0, max_slices=7, seed=5)
    b = collect_slices(net, vols, slice_axis=0, max_slices=7, seed=5)
    assert a.n_slices == 7 and all(torch.equal(x, y) for x, y in zip(a.images, b.images))
    with pytest.raises(ValueError, match="expected an image C×X×Y×Z"):
        collect_slices(net, [{"image": torch.zeros(5, 4), "label": torch.zeros(5, 4)}])
