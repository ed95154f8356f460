"""Post-hoc calibration: temperature scaling and local temperature scaling (pipeline.posthoc)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.posthoc import (
    LocalTemperatureScaling,
    SliceSet,
    TemperatureNet,
    TemperatureScaling,
    collect_slices,
)


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
def test_temperature_net_starts_at_the_identity_and_at_a_given_constant():
    net = TemperatureNet(num_classes=3, image_channels=1)
    z, x = torch.randn(2, 3, 9, 7), torch.rand(2, 1, 9, 7)
    t = net(z, x)
    assert t.shape == (2, 1, 9, 7)
    # zero-initialised leaves: x = 0, T = relu(0 + 1) + 1e-8 = 1 (not 2) everywhere
    assert torch.allclose(t, torch.full_like(t, 1.0 + 1e-8), atol=0, rtol=0)
    lts = LocalTemperatureScaling(nn.Identity(), net)
    assert torch.allclose(lts.calibrate(z, x), z)
    net.init_constant(2.5)
    assert torch.allclose(net(z, x), torch.full((2, 1, 9, 7), 2.5), atol=1e-6)


def test_lts_fits_saves_loads_and_reproduces(tmp_path):
    torch.manual_seed(0)
    data = overconfident_slices(scale=3.0)
    net = nn.Conv2d(1, 3, 3, padding=1)
    lts = LocalTemperatureScaling(net, TemperatureNet(3, image_channels=1, hidden=4))
    info = lts.fit(data, iterations=40, lr=0.01, batch_slices=3, eval_every=5, seed=0)
    assert info["val_nll_after"] < info["val_nll_before"] - 0.05
    assert 0 < info["best_iteration"] <= 40
    lts.eval()
    z, x = data.logits[0], data.images[0]
    expected_nll = nll([lts.calibrate(zz, xx).detach() for zz, xx in zip(data.logits, data.images)], data.labels)
    assert expected_nll == pytest.approx(info["val_nll_after"], rel=1e-4)

    path = lts.save_calibrator(tmp_path / "lts.pt")
    again = LocalTemperatureScaling.load_calibrator(net, path).eval()
    assert again.temperature_net.config == lts.temperature_net.config
    with torch.no_grad():
        assert torch.equal(again.calibrate(z, x), lts.calibrate(z, x))
        image = torch.rand(2, 1, 12, 10)
        assert torch.equal(again(image), lts(image))  # wraps the network: image → calibrated logits


def test_lts_fitting_is_reproducible():
    data = overconfident_slices(scale=3.0)
    states = []
    for _ in range(2):
        torch.manual_seed(1)
        lts = LocalTemperatureScaling(nn.Identity(), TemperatureNet(3, image_channels=0, hidden=4))
        lts.fit(data, iterations=10, lr=0.01, batch_slices=2, eval_every=5, seed=3)
        states.append(lts.calibrator_state()["state_dict"])
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_lts_calibrates_volumes_slice_by_slice():
    torch.manual_seed(0)
    tnet = TemperatureNet(2, image_channels=1, hidden=3)
    with torch.no_grad():
        for p in tnet.parameters():
            p.normal_(0, 0.3)
    lts = LocalTemperatureScaling(nn.Identity(), tnet)
    z, x = torch.randn(1, 2, 8, 9, 5), torch.rand(1, 1, 8, 9, 5)
    with torch.no_grad():
        out = lts.calibrate(z, x, slice_axis=1)
        for s in range(9):
            assert torch.allclose(out[:, :, :, s], lts.calibrate(z[:, :, :, s], x[:, :, :, s]), atol=1e-6)
    with pytest.raises(ValueError, match="slice_axis 0, 1 or 2"):
        lts.calibrate(z, x)


def test_lts_bad_inputs(tmp_path):
    net = TemperatureNet(3, image_channels=1)
    with pytest.raises(ValueError, match=r"expected logits B×3×H×W, got shape \(1, 2, 5, 5\)"):
        net(torch.zeros(1, 2, 5, 5), torch.zeros(1, 1, 5, 5))
    with pytest.raises(ValueError, match="takes an image"):
        net(torch.zeros(1, 3, 5, 5), None)
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        TemperatureNet(1)
    ts_file = TemperatureScaling(nn.Identity()).save_calibrator(tmp_path / "ts.pt")
    with pytest.raises(ValueError, match="expected a 'lts' calibrator"):
        LocalTemperatureScaling.load_calibrator(nn.Identity(), ts_file)
    with pytest.raises(FileNotFoundError, match="no calibrator file"):
        LocalTemperatureScaling.load_calibrator(nn.Identity(), tmp_path / "missing.pt")
    (tmp_path / "broken.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="broken.pt is not a readable calibrator file"):
        TemperatureScaling.load_calibrator(nn.Identity(), tmp_path / "broken.pt")
    with pytest.raises(ValueError, match="iterations >= 0"):
        LocalTemperatureScaling(nn.Identity(), net).fit(overconfident_slices(), iterations=-1)


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
