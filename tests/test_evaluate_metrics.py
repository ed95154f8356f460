"""Evaluation building blocks: reliability binning, adaptive and soft-label ECE, logit statistics, the noise sweep,
the test evaluator, settings, metric names and the figures."""

import math

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from pipeline import report
from pipeline.config import CONFIG_DIR
from pipeline.engines import run_engine
from pipeline.evaluation import create_test_evaluator, default_settings, evaluation_settings
from pipeline.evaluation.noise import GaussianNoiseBatch, noise_sweep
from pipeline.evaluation.results import mlflow_metrics, summarise
from pipeline.io import write_nifti
from pipeline.metrics.calibration import bin_index, calibration_statistics
from pipeline.metrics.extras import adaptive_ece, soft_label_calibration
from pipeline.metrics.logits import LogitStatistics, logit_statistics
from pipeline.posthoc import LocalTemperatureScaling, ReferenceTemperatureNet, TemperatureScaling
from pipeline.registry import UnknownNameError


def random_case(k=4, shape=(6, 5, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(k, *shape, generator=g) * 2, 0)
    labels = torch.randint(0, k, shape, generator=g)
    return probs, labels


# ------------------------------------------------------------------------------------- reliability binning
def test_reliability_curves_use_exactly_the_ece_binning():
    probs, labels = random_case()
    stats = calibration_statistics(probs, labels, n_bins=15)
    keep = labels.reshape(-1) != 0
    p = probs.reshape(4, -1)[:, keep].double()
    conf, pred = p.max(0)
    b = bin_index(conf, 15)
    curve = stats.reliability()
    np.testing.assert_array_equal(curve["count"], np.bincount(b.numpy(), minlength=15))
    filled = curve["count"] > 0
    sums = np.bincount(b.numpy(), weights=conf.numpy(), minlength=15)
    np.testing.assert_allclose(curve["confidence"][filled], sums[filled] / curve["count"][filled], rtol=1e-12)
    assert report.curve_ece(curve) == pytest.approx(stats.ece(), abs=1e-12)
    for j in range(1, 4):
        c = report.class_reliability(stats, j)
        assert c["count"].sum() == int((labels == j).sum())
        np.testing.assert_array_equal(c["edges"], curve["edges"])
        assert report.curve_ece(c) == pytest.approx(stats.ece_per_class()[j], abs=1e-12)


# ------------------------------------------------------------------------------------- adaptive ECE
AECE_CASES = [
    # probs (K×N), labels, bins, foreground_only, expected
    ([[0.1, 0.4, 0.3, 0.2], [0.9, 0.6, 0.7, 0.8]], [1, 1, 0, 1], 2, False, 0.15),
    ([[0.1, 0.4, 0.3, 0.2], [0.9, 0.6, 0.7, 0.8]], [1, 1, 0, 1], 1, False, abs(3.0 - 3) / 4),
    # foreground only: the label-0 voxel is dropped; conf 0.6, 0.8, 0.9 all right, 3 bins: (0.4 + 0.2 + 0.1) / 3
    ([[0.1, 0.4, 0.3, 0.2], [0.9, 0.6, 0.7, 0.8]], [1, 1, 0, 1], 3, True, 0.7 / 3),
]


@pytest.mark.parametrize("probs,labels,n_bins,fg,expected", AECE_CASES)
def test_adaptive_ece_hand_cases(probs, labels, n_bins, fg, expected):
    p = torch.tensor(probs, dtype=torch.float64)
    assert adaptive_ece(p, torch.tensor(labels), n_bins, fg) == pytest.approx(expected, abs=1e-12)


def test_adaptive_ece_empty_and_bad_input():
    assert math.isnan(adaptive_ece(torch.tensor([[0.5], [0.5]]), torch.tensor([0])))
    with pytest.raises(ValueError, match="labels must lie in"):
        adaptive_ece(torch.tensor([[0.5], [0.5]]), torch.tensor([2]))


# ------------------------------------------------------------------------------------- soft labels
def test_soft_label_metrics_reduce_to_the_hard_ones_for_one_hot_references():
    probs, labels = random_case()
    onehot = torch.nn.functional.one_hot(labels, 4).movedim(-1, 0).float()
    soft = soft_label_calibration(probs, onehot, labels)
    stats = calibration_statistics(probs, labels)
    assert soft["brier"] == pytest.approx(stats.brier(), rel=1e-9)
    assert soft["kl"] == pytest.approx(stats.nll(), rel=1e-6)  # KL(onehot ‖ p) = −log p_y
    assert soft["ece"] == pytest.approx(stats.ece(), abs=1e-12)


def test_soft_label_hand_case():
    p = torch.tensor([[0.2, 0.6], [0.8, 0.4]])  # voxel 0 predicts 1 (conf 0.8), voxel 1 predicts 0 (conf 0.6)
    q = torch.tensor([[0.5, 1.0], [0.5, 0.0]])
    out = soft_label_calibration(p, q, torch.tensor([1, 1]), n_bins=10)
    assert out["brier"] == pytest.approx(((0.09 + 0.09) + (0.16 + 0.16)) / 2)
    kl0 = 0.5 * math.log(0.5 / 0.2) + 0.5 * math.log(0.5 / 0.8)
    kl1 = 1.0 * math.log(1.0 / 0.6)
    assert out["kl"] == pytest.approx((kl0 + kl1) / 2)
    assert out["ece"] == pytest.approx((abs(0.8 - 0.5) + abs(0.6 - 1.0)) / 2)  # different bins


def test_soft_label_bad_input():
    p = torch.full((2, 3), 0.5)
    with pytest.raises(ValueError, match=r"soft labels have shape \(3, 3\), expected \(2, 3\)"):
        soft_label_calibration(p, torch.full((3, 3), 1 / 3), torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        soft_label_calibration(p, torch.full((2, 3), 1.5), torch.ones(3, dtype=torch.long))


# ------------------------------------------------------------------------------------- logits
def test_logit_statistics_pool_over_volumes():
    g = torch.Generator().manual_seed(1)
    vols = [(torch.randn(3, 4, 5, generator=g), torch.randint(0, 3, (4, 5), generator=g)) for _ in range(2)]
    metric = LogitStatistics(3)
    metric.update(([v[0] for v in vols], [v[1][None] for v in vols]))
    got = metric.compute()
    joint = logit_statistics(torch.cat([v[0] for v in vols], 1), torch.cat([v[1] for v in vols], 0))
    assert got["logits/distance_mean"] == pytest.approx(joint["distance_mean"])
    assert got["logits/distance_max"] == pytest.approx(joint["distance_max"])
    np.testing.assert_allclose(metric.result["mean_logits"], joint["mean_logits"], rtol=1e-12)
    s = logit_statistics(torch.tensor([[3.0, 0.0, 1.0], [1.0, 2.0, 1.0]]), torch.tensor([0, 1, 0]))
    np.testing.assert_allclose(s["mean_logits"], [[2.0, 1.0], [0.0, 2.0]])
    assert s["distance_mean"] == pytest.approx((2 + 2 + 0) / 3) and s["distance_max"] == 2.0


# ------------------------------------------------------------------------------------- noise
def test_noise_is_seeded_per_volume_and_order_free():
    batch = {"image": torch.zeros(2, 1, 4, 4, 3), "label": torch.zeros(2, 1, 4, 4, 3), "id": ["a", "b"]}
    x1, _ = GaussianNoiseBatch(0.02, seed=3)(batch)
    swapped = {"image": batch["image"].flip(0), "label": batch["label"], "id": ["b", "a"]}
    x2, _ = GaussianNoiseBatch(0.02, seed=3)(swapped)
    assert torch.equal(x1[0], x2[1]) and torch.equal(x1[1], x2[0])
    assert not torch.equal(x1[0], x1[1])
    assert 0.01 < float(x1.std()) < 0.03
    x3, _ = GaussianNoiseBatch(0.02, seed=4)(batch)
    assert not torch.equal(x1, x3)
    x0, _ = GaussianNoiseBatch(0.0)(batch)
    assert torch.equal(x0, batch["image"])
    with pytest.raises(ValueError, match="sigma must be >= 0, got -0.1"):
        GaussianNoiseBatch(-0.1)


class TinyNet(nn.Module):
    def __init__(self, k=3):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, k, 3, padding=1)

    def forward(self, x):
        return self.conv(x) * 4


def tiny_volumes(n=2, k=3, shape=(10, 9, 4), soft=False):
    from monai.data import MetaTensor

    g = torch.Generator().manual_seed(7)
    out = []
    for i in range(n):
        label = torch.randint(0, k, (1, *shape), generator=g).float()
        image = label / k + 0.1 * torch.randn(1, *shape, generator=g)
        affine = torch.diag(torch.tensor([1.5, 1.5, 3.0, 1.0], dtype=torch.float64))
        item = {"image": MetaTensor(image, affine=affine), "label": MetaTensor(label, affine=affine), "id": f"v{i}"}
        if soft:
            q = torch.softmax(torch.nn.functional.one_hot(label[0].long(), k).movedim(-1, 0).float() * 2, 0)
            item["probs"] = MetaTensor(q, affine=affine)
        out.append(item)
    return out


def loader(vols):
    from pipeline.data.loading import volume_loader

    return volume_loader(vols)


def test_noise_sweep_is_reproducible_and_sigma_zero_is_the_clean_evaluation():
    net, vols = TinyNet().eval(), tiny_volumes()
    a = noise_sweep(net, loader(vols), torch.device("cpu"), 3, 2, sigmas=[0.0, 0.05], seed=0)
    b = noise_sweep(net, loader(vols), torch.device("cpu"), 3, 2, sigmas=[0.0, 0.05], seed=0)
    assert a == b and [r["sigma"] for r in a] == [0.0, 0.05]
    c = noise_sweep(net, loader(vols), torch.device("cpu"), 3, 2, sigmas=[0.05], seed=1)
    assert c[0] != a[1]
    ev = create_test_evaluator(net, loader(vols), torch.device("cpu"), 3, 2)
    ev.run()
    assert a[0]["dsc"] == pytest.approx(ev.state.metrics["test/dsc"], abs=1e-6)
    assert a[0]["ece"] == pytest.approx(ev.state.metrics["test/ece"], abs=1e-12)


def test_noise_sweep_scores_the_evaluation_regions_like_the_test_table():
    net, vols = TinyNet().eval(), tiny_volumes()
    regions = [[2], [1, 2]]  # e.g. BraTS: DSC on unions of training classes
    clean = noise_sweep(net, loader(vols), torch.device("cpu"), 3, 2, sigmas=[0.0], seed=0, regions=regions)[0]
    by_class = noise_sweep(net, loader(vols), torch.device("cpu"), 3, 2, sigmas=[0.0], seed=0)[0]
    ev = create_test_evaluator(net, loader(vols), torch.device("cpu"), 3, 2, regions=regions)
    ev.run()
    assert clean["dsc"] == pytest.approx(ev.state.metrics["test/dsc"], abs=1e-6)
    assert clean["dsc"] != pytest.approx(by_class["dsc"], abs=1e-6)


# ------------------------------------------------------------------------------------- the test evaluator
def test_test_evaluator_matches_the_calibration_module_and_scores_each_method():
    net, vols = TinyNet().eval(), tiny_volumes(soft=True)
    ts = TemperatureScaling(net, temperature=2.0).eval()
    lts = LocalTemperatureScaling(net, ReferenceTemperatureNet(3, image_channels=1)).eval()
    lts.temperature_net.init_constant(1.0)  # T = 1: the identity
    ev = create_test_evaluator(net, loader(vols), torch.device("cpu"), 3, 2, calibrators={"ts": ts, "lts": lts})
    ev.run()
    res = summarise(ev, ["bg", "a", "b"], ["v0", "v1"], methods=["pre", "ts", "lts"])

    expected, expected_ts = None, None
    soft_ece = []
    with torch.no_grad():
        for v in vols:
            z = net(v["image"].as_tensor().movedim(-1, 0))  # 4 slices × K × X × Y
            z = z.movedim(0, -1)  # K × X × Y × Z
            s = calibration_statistics(torch.softmax(z, 0), v["label"].as_tensor())
            s_ts = calibration_statistics(torch.softmax(z / 2.0, 0), v["label"].as_tensor())
            expected = s if expected is None else expected + s
            expected_ts = s_ts if expected_ts is None else expected_ts + s_ts
            soft_ece.append(soft_label_calibration(torch.softmax(z, 0), v["probs"].as_tensor(),
                                                   v["label"].as_tensor())["ece"])
    pooled = res["methods"]["pre"]["stats"]
    for a, b in zip(pooled.astuple(), expected.astuple()):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(res["reliability"]["count"], expected.reliability()["count"])
    assert res["methods"]["ts"]["mean"]["ece_pooled"] == pytest.approx(expected_ts.ece(), abs=1e-9)
    # LTS at its identity start scores exactly like pre, DSC included; TS keeps the argmax (same DSC)
    for key in ("dsc", "asd", "ece", "cece", "nll", "aece", "soft/ece"):
        assert res["methods"]["lts"]["mean"][key] == pytest.approx(res["mean"][key], rel=1e-6, nan_ok=True)
    assert res["methods"]["ts"]["mean"]["dsc"] == res["mean"]["dsc"]
    assert res["methods"]["ts"]["mean"]["ece"] != pytest.approx(res["mean"]["ece"])
    assert res["mean"]["soft/ece"] == pytest.approx(np.mean(soft_ece), rel=1e-9)
    assert 0 <= res["mean"]["monai_calibration_error"] <= 1
    assert res["logits"]["mean_logits"].shape == (3, 3)
    assert len(res["per_volume"]) == 2 and "lts_ece" in res["per_volume"][0] and "ts_ece" in res["per_volume"][0]


def test_soft_labels_of_the_wrong_shape_are_named():
    net, vols = TinyNet().eval(), tiny_volumes(soft=True)
    vols[0]["probs"] = vols[0]["probs"][:2]
    ev = create_test_evaluator(net, loader(vols), torch.device("cpu"), 3, 2)
    with pytest.raises(ValueError, match=r"soft labels 'probs' of volume v0 have shape \(2, 10, 9, 4\)"):
        run_engine(ev)


# ------------------------------------------------------------------------------------- settings and names
def test_default_settings_are_the_base_config_block():
    base = yaml.safe_load((CONFIG_DIR / "base.yaml").read_text())
    assert default_settings() == base["evaluation"]
    assert evaluation_settings(None) == base["evaluation"]


def test_settings_are_checked():
    s = evaluation_settings({"lts": {"iterations": 5}, "noise": {"sigmas": []}})
    assert s["lts"]["iterations"] == 5 and s["lts"]["lr"] == default_settings()["lts"]["lr"]
    assert s["noise"]["sigmas"] == []
    older = {"iterations": 100, "lr": 0.001, "batch_slices": 16, "eval_every": 10, "use_image": True, "hidden": 4}
    assert evaluation_settings({"lts": older})["lts"] == default_settings()["lts"]  # a config of an older version
    with pytest.raises(UnknownNameError, match="Did you mean 'posthoc'"):
        evaluation_settings({"posthok": []})
    with pytest.raises(UnknownNameError, match="unknown post-hoc method 'tss'"):
        evaluation_settings({"posthoc": ["tss"]})
    with pytest.raises(ValueError, match="evaluation::lts::iterations must be a whole number >= 0, got -1"):
        evaluation_settings({"lts": {"iterations": -1}})
    with pytest.raises(ValueError, match="sigmas must be a list of numbers >= 0"):
        evaluation_settings({"noise": {"sigmas": [0.1, -0.2]}})
    with pytest.raises(ValueError, match="evaluation::lts must be a mapping"):
        evaluation_settings({"lts": 3})


def test_mlflow_metric_names():
    results = {
        "mean": {"dsc": 0.8, "ece": 0.1, "aece": 0.12, "soft/ece": 0.2},
        "per_class": {"bg": {"dsc": math.nan, "sce": 0.01}, "GM": {"dsc": 0.8, "ece": 0.1}},
        "methods": {
            "pre": {"mean": {"dsc": 0.8, "ece": 0.1}, "per_class": {"GM": {"dsc": 0.8, "ece": 0.1}}},
            "ts": {"mean": {"dsc": 0.8, "ece": 0.05}, "per_class": {"GM": {"dsc": 0.8, "ece": 0.05}}},
            "lts": {"mean": {"dsc": 0.79, "ece": 0.04}, "per_class": {"GM": {"dsc": 0.79, "ece": 0.04}}},
        },
        "logits": {"distance_mean": 5.0, "distance_max": 20.0},
        "noise": [{"sigma": 0.0, "dsc": 0.8, "ece": 0.1, "cece": 0.1}, {"sigma": 0.02, "dsc": 0.7, "ece": 0.2,
                                                                        "cece": 0.2}],
    }
    m = mlflow_metrics(results)
    assert m["test/ece"] == 0.1 and m["test/ts/ece"] == 0.05 and m["test/lts/dsc"] == 0.79
    assert m["test/lts/ece/GM"] == 0.04 and m["test/ts/ece/GM"] == 0.05 and "test/ts/dsc/GM" not in m
    assert m["test/noise_0.02/dsc"] == 0.7 and m["test/noise_0/ece"] == 0.1
    assert m["test/logits/distance_mean"] == 5.0
    assert "test/dsc/bg" not in m  # nan values are not logged


# ------------------------------------------------------------------------------------- figures and maps
def _png(path):
    data = path.read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_figures_are_written_and_not_empty(tmp_path):
    probs, labels = random_case()
    stats = calibration_statistics(probs, labels)
    names = ["bg", "CSF", "GM", "WM"]
    assert _png(report.reliability_per_class({"pre": stats, "TS": stats}, names, tmp_path / "pc.png", "t"))
    rows = [{"id": "v", "slice": 1, "image": np.random.rand(6, 5), "label": labels[:, :, 1].numpy(),
             "pred": probs.argmax(0)[:, :, 1].numpy(), "maxprob": probs.max(0).values[:, :, 1].numpy()}]
    assert _png(report.confidence_maps(rows, names, tmp_path / "maps.png", "t"))
    assert _png(report.logit_plot(np.arange(16.0).reshape(4, 4), names, tmp_path / "logits.png", "t"))
    assert _png(report.noise_plot([{"sigma": s, "dsc": 0.8 - s, "ece": 0.1 + s} for s in (0, 0.01)],
                                  tmp_path / "noise.png", "t"))
    assert _png(report.reliability_diagram(stats.reliability(), tmp_path / "rel.png", "t", stats.ece()))
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind
    with pytest.raises(ValueError, match="mean logits must be 4×4"):
        report.logit_plot(np.zeros((3, 3)), names, tmp_path / "x.png")


def test_nifti_maps_keep_the_affine(tmp_path):
    import nibabel as nib

    affine = np.array([[2.0, 0, 0, -10], [0, 2, 0, 5], [0, 0, 3, 1], [0, 0, 0, 1]])
    vol = np.random.rand(4, 5, 6)
    path = write_nifti(vol, affine, tmp_path / "m_maxprob.nii.gz")
    img = nib.load(path)
    np.testing.assert_allclose(img.affine, affine)
    np.testing.assert_allclose(img.get_fdata(), vol.astype(np.float32))
    with pytest.raises(ValueError, match="expected an X×Y×Z volume"):
        write_nifti(np.zeros((2, 2)), affine, tmp_path / "bad.nii.gz")


# ------------------------------------------------------------------------------------- surface distance
@pytest.mark.parametrize("shape,spacing", [((9, 7, 5), (1.5, 0.7, 3.0)), ((12, 10), (2.0, 1.0)), ((6, 2, 5), None),
                                           ((20, 18, 3), (2.0, 2.0, 2.0))])
def test_fast_surface_distance_equals_monai(shape, spacing):
    import warnings

    from monai.metrics import compute_average_surface_distance

    from pipeline.metrics.surface import mask_edges, symmetric_asd

    g = torch.Generator().manual_seed(len(shape))
    pred = (torch.rand(2, 3, *shape, generator=g) > 0.5).float()
    true = (torch.rand(2, 3, *shape, generator=g) > 0.4).float()
    true[1, 2] = 0  # one empty ground truth
    pred[1, 2] = 0  # ... with an empty prediction: 0 by the rules
    pred[0, 1] = 0  # an empty prediction against a non-empty truth: nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = compute_average_surface_distance(pred, true, include_background=True, symmetric=True, spacing=spacing)
    got = symmetric_asd(pred, true, spacing)
    finite = torch.isfinite(ref)
    assert torch.allclose(got[finite], ref[finite], rtol=1e-5)
    assert got[1, 2] == 0 and math.isnan(float(got[0, 1]))
    import scipy.ndimage as ndi

    m = true[0, 0].bool().numpy()
    np.testing.assert_array_equal(mask_edges(true[0, :1].bool())[0], m ^ ndi.binary_erosion(m))
    with pytest.raises(ValueError, match="does not match the"):
        symmetric_asd(pred, true, (1.0, 2.0, 3.0, 4.0))
