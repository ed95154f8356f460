"""Losses: small hand-computed values, scale against MONAI/torch, gradients, stability, bad input."""

import doctest
import math

import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from monai.losses import FocalLoss as MonaiFocalLoss

import pipeline.losses
from pipeline.losses import (
    LOSSES,
    CrossEntropy,
    MarginL2Loss,
    MarginLoss,
    SpatiallyVaryingLabelSmoothing,
    build_loss,
    margin_penalty,
    svls_kernel,
)
from pipeline.registry import UnknownNameError

COMPOSITE_PARTS = {
    "ce_dice": {"ce", "dice"},
    "ecp": {"ce", "entropy"},
    "mbls": {"ce", "penalty"},
    "mbls_l2": {"ce", "penalty"},
    "mbls_dice": {"ce", "dice", "penalty"},
    "nacl": {"ce", "penalty"},
    "crac": {"ce", "penalty", "constraint"},
    "ace_hard": {"ace", "dice", "ce"},
    "ace_soft": {"ace", "dice", "ce"},
    "acls": {"ce", "penalty"},
}


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


# ---------------------------------------------------------------- hand-computed values


def test_ce_hand_computed():
    # one voxel, logits (2, 0): p_0 = e^2 / (e^2 + 1)
    logits = torch.tensor([2.0, 0.0]).reshape(1, 2, 1, 1)
    value = CrossEntropy()(logits, torch.zeros(1, 1, 1, 1))
    assert value.item() == pytest.approx(-math.log(math.exp(2) / (math.exp(2) + 1)), rel=1e-6)


def test_labels_b1hw_and_bhw_agree():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, 4)
    labels = torch.randint(0, 3, (2, 5, 4))
    for name in LOSSES:
        a = build_loss(name)(logits, labels)
        b = build_loss(name)(logits, labels[:, None].float())
        assert a.item() == pytest.approx(b.item()), name


def test_ce_dice_hand_computed_and_equal_to_monai_dicece():
    # 2 voxels, uniform p = 1/2, labels (0, 1): CE = log 2; per class tp = 1/2, sum p = 1, sum y = 1
    loss = build_loss("ce_dice")
    value = loss(torch.zeros(1, 2, 1, 2), torch.tensor([[[[0, 1]]]]))
    dice = 1 - (2 * 0.5 + 1e-5) / (1 + 1 + 1e-5)
    assert loss.parts["ce"].item() == pytest.approx(math.log(2), rel=1e-6)
    assert loss.parts["dice"].item() == pytest.approx(dice, rel=1e-6)
    assert value.item() == pytest.approx(math.log(2) + dice, rel=1e-6)
    torch.manual_seed(3)
    logits, labels = torch.randn(2, 4, 6, 5) * 3, torch.randint(0, 4, (2, 1, 6, 5))
    monai = DiceCELoss(to_onehot_y=True, softmax=True)(logits, labels)
    assert loss(logits, labels).item() == pytest.approx(monai.item(), rel=1e-6)


def test_focal_hand_computed_and_k_times_monai_mean():
    # logits (2, 0), label 0: p = sigmoid(2); gamma 3
    p = _sigmoid(2.0)
    value = build_loss("focal")(torch.tensor([2.0, 0.0]).reshape(1, 2, 1, 1), torch.zeros(1, 1, 1, 1))
    assert value.item() == pytest.approx(-((1 - p) ** 3) * math.log(p), rel=1e-5)
    # MONAI's reduction="mean" also averages over the K classes: the convention is K times larger
    torch.manual_seed(4)
    k = 4
    logits, labels = torch.randn(2, k, 6, 5) * 3, torch.randint(0, k, (2, 1, 6, 5))
    monai_mean = MonaiFocalLoss(use_softmax=True, to_onehot_y=True, gamma=2.0)(logits, labels)
    ours = build_loss("focal", gamma=2)(logits, labels)
    assert ours.item() == pytest.approx(k * monai_mean.item(), rel=1e-5)
    # gamma = 0 is cross-entropy
    assert build_loss("focal", gamma=0)(logits, labels).item() == pytest.approx(
        F.cross_entropy(logits, labels[:, 0]).item(), rel=1e-5)


def test_ls_hand_computed_and_equal_to_torch_label_smoothing():
    # logits (1, 0), label 0, alpha 0.2, K = 2: targets (0.9, 0.1)
    value = build_loss("ls", alpha=0.2)(torch.tensor([1.0, 0.0]).reshape(1, 2, 1, 1), torch.zeros(1, 1, 1, 1))
    p = _sigmoid(1.0)
    assert value.item() == pytest.approx(-0.9 * math.log(p) - 0.1 * math.log(1 - p), rel=1e-6)
    torch.manual_seed(5)
    logits, labels = torch.randn(2, 3, 4, 4, 3), torch.randint(0, 3, (2, 4, 4, 3))
    torch_ls = torch.nn.CrossEntropyLoss(label_smoothing=0.3)(logits, labels)
    assert build_loss("ls", alpha=0.3)(logits, labels).item() == pytest.approx(torch_ls.item(), rel=1e-6)
    assert build_loss("ls", alpha=0)(logits, labels).item() == pytest.approx(F.cross_entropy(logits, labels).item())


def test_ecp_hand_computed_and_clamped():
    # uniform p over K = 2: entropy term = (-2 * 1/2 log 1/2) / 2 = log(2) / 2
    loss = build_loss("ecp", alpha=0.5)
    value = loss(torch.zeros(1, 2, 1, 1), torch.zeros(1, 1, 1, 1))
    assert loss.parts["entropy"].item() == pytest.approx(math.log(2) / 2, rel=1e-6)
    assert value.item() == pytest.approx(math.log(2) - 0.5 * math.log(2) / 2, rel=1e-6)
    # logits (50, -50) in float64: p = (1, e^-100) is clamped to (1 - 1e-10, 1e-10)
    loss = build_loss("ecp", alpha=1.0)
    loss(torch.tensor([50.0, -50.0], dtype=torch.float64).reshape(1, 2, 1, 1), torch.zeros(1, 1, 1, 1))
    q = 1e-10
    expected = -((1 - q) * math.log(1 - q) + q * math.log(q)) / 2
    assert loss.parts["entropy"].item() == pytest.approx(expected, rel=1e-6)


def test_svls_kernel_weights_2d_and_3d():
    k2 = svls_kernel(2)
    assert k2.sum().item() == pytest.approx(1.0)
    assert k2[1, 1].item() == pytest.approx(0.5)
    assert k2[0, 1].item() == pytest.approx(0.077807, abs=1e-6) and k2[1, 0].item() == k2[0, 1].item()
    assert k2[0, 0].item() == pytest.approx(0.047193, abs=1e-6) and k2[2, 2].item() == k2[0, 0].item()
    k3 = svls_kernel(3)
    assert k3.sum().item() == pytest.approx(1.0)
    assert [k3[1, 1, 1].item(), k3[1, 1, 0].item(), k3[1, 0, 0].item(), k3[0, 0, 0].item()] == pytest.approx(
        [0.5, 0.030823, 0.018695, 0.011339], abs=1e-6)
    # wider kernel: the centre still weighs 1/2
    assert svls_kernel(2, 5, 2.0)[2, 2].item() == pytest.approx(0.5)


def test_svls_replicate_padding_at_the_border():
    # one foreground voxel in the corner of a 3×3 image: replicate padding repeats it outside the image
    labels = torch.zeros(1, 3, 3, dtype=torch.long)
    labels[0, 0, 0] = 1
    loss = SpatiallyVaryingLabelSmoothing()
    t = loss.soft_labels(labels, torch.zeros(1, 2, 3, 3))
    edge, corner = 0.077807, 0.047193
    expected = torch.tensor([[0.5 + 2 * edge + corner, edge + corner, 0.0],
                             [edge + corner, corner, 0.0],
                             [0.0, 0.0, 0.0]])
    assert torch.allclose(t[0, 1], expected, atol=1e-6)
    assert torch.allclose(t.sum(1), torch.ones(1, 3, 3))  # targets sum to 1 per voxel
    # loss with p = (1 - s, s), s = sigmoid(1) everywhere: mean over voxels of -(t0 log(1 - s) + t1 log s)
    logits = torch.zeros(1, 2, 3, 3)
    logits[:, 1] = 1.0
    s = _sigmoid(1.0)
    t1 = expected.double()
    manual = -(t1 * math.log(s) + (1 - t1) * math.log(1 - s)).mean().item()
    assert loss(logits, labels).item() == pytest.approx(manual, rel=1e-5)


def test_svls_3d_targets_around_a_single_voxel():
    labels = torch.zeros(1, 3, 3, 3, dtype=torch.long)
    labels[0, 1, 1, 1] = 1
    t = SpatiallyVaryingLabelSmoothing().soft_labels(labels, torch.zeros(1, 2, 3, 3, 3))[0, 1]
    assert [t[1, 1, 1].item(), t[1, 1, 2].item(), t[1, 2, 2].item(), t[2, 2, 2].item()] == pytest.approx(
        [0.5, 0.030823, 0.018695, 0.011339], abs=1e-6)


def test_mbls_hand_computed_2d():
    # voxel logits (4, 1, 0), margin 2: distances (0, 3, 4) -> relu(d - 2) = (0, 1, 2); mean over classes = 1
    logits = torch.tensor([4.0, 1.0, 0.0]).reshape(1, 3, 1, 1)
    loss = MarginLoss(margin=2.0, alpha=0.1)
    value = loss(logits, torch.zeros(1, 1, 1, 1))
    ce = F.cross_entropy(logits, torch.zeros(1, 1, 1, dtype=torch.long))
    assert loss.parts["penalty"].item() == pytest.approx(1.0)
    assert value.item() == pytest.approx(ce.item() + 0.1 * 1.0, rel=1e-6)


def test_mbls_3d_input():
    logits = torch.zeros(1, 2, 2, 2, 2)
    logits[:, 0] = 20.0  # distance 20 for class 1 everywhere
    loss = MarginLoss(margin=10, alpha=1.0)
    loss(logits, torch.zeros(1, 1, 2, 2, 2))
    assert loss.parts["penalty"].item() == pytest.approx((20 - 10) / 2)  # mean over 2 classes


def test_mbls_l2_hand_computed_both_variants():
    # voxel logits (4, 1, 0), margin 2: d - m = (-2, 1, 2)
    logits = torch.tensor([4.0, 1.0, 0.0]).reshape(1, 3, 1, 1)
    hinge, code = MarginL2Loss(margin=2.0), MarginL2Loss(margin=2.0, one_sided=False)
    hinge(logits, torch.zeros(1, 1, 1, 1))
    code(logits, torch.zeros(1, 1, 1, 1))
    assert hinge.parts["penalty"].item() == pytest.approx((0 + 1 + 4) / 3)
    assert code.parts["penalty"].item() == pytest.approx((4 + 1 + 4) / 3)
    # within the margin the hinge costs nothing, the released code's variant still m^2 / K per voxel at least
    small = torch.tensor([0.5, 0.0, 0.0]).reshape(1, 3, 1, 1)
    hinge(small, torch.zeros(1, 1, 1, 1))
    code(small, torch.zeros(1, 1, 1, 1))
    assert hinge.parts["penalty"].item() == 0.0
    assert code.parts["penalty"].item() == pytest.approx((4 + 1.5**2 * 2) / 3)


def test_mbls_dice_excludes_background_from_the_dice():
    # uniform p = 1/3 over 3 classes, 2 voxels labelled (1, 2): foreground dice per class = 1 - (2/3) / (2/3 + 1)
    loss = build_loss("mbls_dice")
    value = loss(torch.zeros(1, 3, 1, 2), torch.tensor([[[[1, 2]]]]))
    fg = 1 - (2 / 3 + 1e-5) / (2 / 3 + 1 + 1e-5)
    assert loss.parts["dice"].item() == pytest.approx(fg, rel=1e-6)  # background (absent) would add 1 - 1e-5/(2/3)
    assert loss.parts["penalty"].item() == 0.0
    assert value.item() == pytest.approx(math.log(3) + fg, rel=1e-6)


def test_composite_losses_record_their_parts():
    torch.manual_seed(6)
    logits, labels = torch.randn(2, 3, 4, 4) * 20, torch.randint(0, 3, (2, 1, 4, 4))
    for name in LOSSES:
        loss = build_loss(name)
        value = loss(logits, labels)
        assert set(loss.parts) == COMPOSITE_PARTS.get(name, set()), name
        for part in loss.parts.values():
            assert part.ndim == 0 and not part.requires_grad
        if name in ("mbls", "mbls_l2"):
            assert value.item() == pytest.approx(loss.parts["ce"].item() + 0.1 * loss.parts["penalty"].item(), rel=1e-6)


# ---------------------------------------------------------------- gradients


def test_mbls_no_penalty_below_margin():
    torch.manual_seed(1)
    logits = torch.rand(2, 4, 6, 6) * 5  # every distance < 5 < margin 10
    logits.requires_grad_(True)
    labels = torch.randint(0, 4, (2, 1, 6, 6))
    mbls = MarginLoss(margin=10, alpha=0.1)
    value = mbls(logits, labels)
    assert mbls.parts["penalty"].item() == 0.0
    (g_mbls,) = torch.autograd.grad(value, logits)
    logits2 = logits.detach().clone().requires_grad_(True)
    (g_ce,) = torch.autograd.grad(CrossEntropy()(logits2, labels), logits2)
    assert torch.allclose(g_mbls, g_ce)


def test_mbls_exact_gradient_above_margin():
    # 1 voxel, K=3, logits (30, 5, 18), margin 10: distances (0, 25, 12) -> both non-argmax classes exceed.
    logits = torch.tensor([30.0, 5.0, 18.0]).reshape(1, 3, 1, 1).requires_grad_(True)
    margin_penalty(logits, 10.0).backward()
    k = 3
    # d/dl_0 = +2/K (it is the max for both), d/dl_1 = d/dl_2 = -1/K
    expected = torch.tensor([2 / k, -1 / k, -1 / k]).reshape(1, 3, 1, 1)
    assert torch.allclose(logits.grad, expected)


# focal: see below; acls: its negative term's stop-gradient max makes its gradient differ from the derivative of its
# value by design (checked by hand in tests/test_losses_since.py)
@pytest.mark.parametrize("name", sorted(set(LOSSES) - {"focal", "acls"}))
def test_gradcheck(name):
    torch.manual_seed(2)
    logits = (torch.randn(1, 3, 3, 4, dtype=torch.float64) * 6).requires_grad_(True)
    labels = torch.randint(0, 3, (1, 3, 4))
    params = {"margin": 4.0} if name.startswith("mbls") else {}
    loss = build_loss(name, **params)
    assert torch.autograd.gradcheck(lambda x: loss(x, labels), (logits,), eps=1e-6, atol=1e-6)


def test_focal_gradient_matches_analytic():
    # MONAI computes the focal loss in float32, so gradcheck's float64 finite differences do not apply; check
    # d/dl of -(1 - p)^γ log p for one voxel against the closed form instead.
    gamma = 2.0
    logits = torch.tensor([1.5, -0.5, 0.25]).reshape(1, 3, 1, 1).requires_grad_(True)
    build_loss("focal", gamma=gamma)(logits, torch.zeros(1, 1, 1, 1)).backward()
    p = torch.softmax(logits.detach().flatten().double(), 0)
    py = p[0]
    dfdp = gamma * (1 - py) ** (gamma - 1) * torch.log(py) - (1 - py) ** gamma / py  # d/dp_y
    onehot = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    expected = dfdp * py * (onehot - p)  # dp_y/dl_k = p_y (δ_yk − p_k)
    assert torch.allclose(logits.grad.flatten().double(), expected, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- numerical stability


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("dims", [2, 3])
def test_large_logits_and_ties_are_finite(name, dims):
    spatial = (3, 3) if dims == 2 else (2, 3, 3)
    logits = torch.zeros(3, 4, *spatial)
    logits[0, 0] = 50.0
    logits[0, 1] = -50.0
    logits[1] = 7.0  # all tied
    logits[2, :2] = 50.0  # two tied at +50, two at -50
    logits[2, 2:] = -50.0
    logits.requires_grad_(True)
    labels = torch.randint(0, 4, (3, 1, *spatial))
    labels[0] = 1  # the -50 class: CE about 100
    value = build_loss(name)(logits, labels)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits(name, dtype):
    torch.manual_seed(7)
    logits = (torch.randn(2, 4, 5, 5) * 40).to(dtype).requires_grad_(True)
    labels = torch.randint(0, 4, (2, 5, 5))
    value = build_loss(name)(logits, labels)
    value.backward()
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert logits.grad.dtype == dtype and torch.isfinite(logits.grad.float()).all()
    # same value as from the float32 copy of the same half-precision numbers
    assert value.item() == pytest.approx(build_loss(name)(logits.detach().float(), labels).item(), rel=1e-6)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_cpu_bfloat16_autocast(name):
    torch.manual_seed(8)
    net = torch.nn.Conv2d(1, 4, 3, padding=1)
    image = torch.randn(2, 1, 8, 8) * 30
    labels = torch.randint(0, 4, (2, 1, 8, 8))
    loss_fn = build_loss(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = net(image)
        assert logits.dtype == torch.bfloat16
        value = loss_fn(logits, labels)
    value.backward()
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_bad_labels_raise_clear_errors(name):
    loss = build_loss(name)
    with pytest.raises(ValueError, match="labels have shape"):
        loss(torch.zeros(1, 3, 4, 4), torch.zeros(1, 1, 4, 5))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\].*\[0, 3\]"):
        loss(torch.zeros(1, 3, 2, 2), torch.tensor([[[[0, 3], [1, 2]]]]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\].*\[-1, 2\]"):
        loss(torch.zeros(1, 3, 2, 2), torch.tensor([[[[0, -1], [1, 2]]]]))
    with pytest.raises(ValueError, match="whole class indices"):
        loss(torch.zeros(1, 3, 1, 1), torch.full((1, 1, 1, 1), 0.5))


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("mbls", {"margin": -1}, "margin must be a number >= 0, got -1"),
        ("mbls_l2", {"margin": -0.5}, "margin must be a number >= 0, got -0.5"),
        ("mbls_dice", {"margin": -1}, "margin must be a number >= 0"),
        ("mbls", {"alpha": -0.1}, "alpha must be a number >= 0"),
        ("mbls", {"margin": "ten"}, "margin must be a number >= 0, got 'ten'"),
        ("mbls", {"margin": float("nan")}, "margin must be a number >= 0, got nan"),
        ("mbls_l2", {"one_sided": "yes"}, "one_sided must be true or false, got 'yes'"),
        ("ecp", {"alpha": -0.1}, "alpha must be a number >= 0"),
        ("ls", {"alpha": 1.5}, r"alpha must be a number >= 0 and <= 1, got 1.5"),
        ("focal", {"gamma": -1}, "gamma must be a number >= 0"),
        ("focal", {"gamma": 0.5}, r"gamma must be 0 or >= 1, got 0.5"),
        ("svls", {"kernel_size": 4}, "kernel_size must be an odd integer >= 3, got 4"),
        ("svls", {"kernel_size": 1}, "kernel_size must be an odd integer >= 3, got 1"),
        ("svls", {"sigma": 0}, "sigma must be a number > 0, got 0"),
    ],
)
def test_bad_parameters_raise_clear_errors(name, params, message):
    with pytest.raises(ValueError, match=message):
        build_loss(name, **params)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_unknown_parameter_name(name):
    with pytest.raises(ValueError, match=f"loss '{name}' has no parameter 'gama'; its parameters are: "):
        build_loss(name, gama=2)


def test_unknown_parameter_lists_the_valid_ones():
    with pytest.raises(ValueError, match="has no parameter 'gama'.*margin, alpha, one_sided"):
        build_loss("mbls_l2", gama=2)
    with pytest.raises(ValueError, match=r"its parameters are: \(none\)"):
        build_loss("ce", alpha=0.1)


def test_unknown_loss_name():
    with pytest.raises(UnknownNameError, match="Did you mean 'mbls'.*ce, ce_dice, crac, ecp, focal"):
        build_loss("mbsl")


def test_svls_rejects_1d_inputs():
    with pytest.raises(ValueError, match=r"SVLS takes B×K×H×W or B×K×D×H×W logits, got shape \(1, 2, 5\)"):
        build_loss("svls")(torch.zeros(1, 2, 5), torch.zeros(1, 1, 5))


def test_docstring_examples():
    names = ("base", "ce", "ce_dice", "ecp", "focal", "ls", "svls", "mbls", "mbls_l2", "mbls_dice")
    modules = [pipeline.losses] + [getattr(pipeline.losses, m) for m in names]
    for module in modules:
        result = doctest.testmod(module, extraglobs={"torch": torch})
        assert result.attempted > 0 and result.failed == 0, module.__name__


# ---------------------------------------------------------------- MbLS scratch buffers


def test_losses_can_be_copied_and_pickled_after_use():
    import copy
    import pickle

    torch.manual_seed(11)
    logits, labels = torch.randn(1, 3, 4, 4) * 20, torch.randint(0, 3, (1, 1, 4, 4))
    for name in LOSSES:
        loss = build_loss(name)
        x = logits.clone().requires_grad_(True)
        value = loss(x, labels)  # with its graph alive
        for clone in (copy.deepcopy(loss), pickle.loads(pickle.dumps(loss))):
            assert clone(logits, labels).item() == pytest.approx(value.item(), rel=1e-6), name
        value.backward()


def test_mbls_retain_graph_second_backward():
    torch.manual_seed(10)
    logits, labels = torch.randn(1, 3, 4, 4) * 20, torch.randint(0, 3, (1, 1, 4, 4))
    loss = build_loss("mbls", margin=5)
    x = logits.clone().requires_grad_(True)
    value = loss(x, labels)
    (g1,) = torch.autograd.grad(value, x, retain_graph=True)
    (g2,) = torch.autograd.grad(value, x, retain_graph=True)
    assert torch.equal(g1, g2)
    loss(logits * 2, labels)  # a newer call leaves the old graph intact
    (g3,) = torch.autograd.grad(value, x)
    assert torch.equal(g1, g3)
