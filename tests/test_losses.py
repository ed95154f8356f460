import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.losses import LOSSES, CrossEntropy, MarginLoss, build_loss, margin_penalty
from pipeline.registry import UnknownNameError


def test_ce_hand_computed():
    # one voxel, logits (2, 0): p_0 = e^2 / (e^2 + 1)
    logits = torch.tensor([2.0, 0.0]).reshape(1, 2, 1, 1)
    value = CrossEntropy()(logits, torch.zeros(1, 1, 1, 1))
    assert value.item() == pytest.approx(-math.log(math.exp(2) / (math.exp(2) + 1)), rel=1e-6)


def test_labels_b1hw_and_bhw_agree():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, 4)
    labels = torch.randint(0, 3, (2, 5, 4))
    a = build_loss("mbls", margin=0.5)(logits, labels)
    b = build_loss("mbls", margin=0.5)(logits, labels[:, None].float())
    assert a.item() == pytest.approx(b.item())


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


def test_mbls_gradient_matches_autograd_numerically():
    torch.manual_seed(2)
    logits = (torch.randn(1, 3, 3, 3, dtype=torch.float64) * 20).requires_grad_(True)
    labels = torch.randint(0, 3, (1, 3, 3))
    loss = MarginLoss(margin=5, alpha=0.3)
    assert torch.autograd.gradcheck(lambda x: loss(x, labels).double(), (logits,), eps=1e-6, atol=1e-4)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_large_logits_and_ties_are_finite(name):
    logits = torch.zeros(2, 4, 3, 3)
    logits[0, 0] = 50.0
    logits[0, 1] = -50.0
    logits[1] = 7.0  # all tied
    logits.requires_grad_(True)
    labels = torch.randint(0, 4, (2, 1, 3, 3))
    value = build_loss(name)(logits, labels)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mbls_under_low_precision_logits(dtype):
    logits = (torch.randn(2, 4, 5, 5) * 40).to(dtype).requires_grad_(True)
    value = build_loss("mbls")(logits, torch.randint(0, 4, (2, 5, 5)))
    value.backward()
    assert value.dtype == torch.float32 and torch.isfinite(value) and torch.isfinite(logits.grad.float()).all()


def test_bad_inputs_raise_clear_errors():
    loss = build_loss("ce")
    with pytest.raises(ValueError, match="labels have shape"):
        loss(torch.zeros(1, 3, 4, 4), torch.zeros(1, 1, 4, 5))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\].*\[0, 3\]"):
        loss(torch.zeros(1, 3, 2, 2), torch.tensor([[[[0, 3], [1, 2]]]]))
    with pytest.raises(ValueError, match="whole class indices"):
        loss(torch.zeros(1, 3, 1, 1), torch.full((1, 1, 1, 1), 0.5))
    with pytest.raises(ValueError, match="margin must be >= 0"):
        build_loss("mbls", margin=-1)
    with pytest.raises(ValueError, match="has no parameter 'gama'.*margin, alpha"):
        build_loss("mbls", gama=2)
    with pytest.raises(UnknownNameError, match="Did you mean 'mbls'.*ce, mbls"):
        build_loss("mbsl")
