"""Every loss against an independent reference of the released code's convention (docs/reference-conventions.md).

The references below are plain torch formulas written from the conventions, sharing no code with
``pipeline.losses``; they run in float64. Each loss must match to a relative 1e-5 on random 2D and 3D inputs,
value and gradient.
"""

import itertools
import math

import pytest
import torch

from pipeline.losses import build_loss

torch.set_default_dtype(torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# references (float64; logits B×K×spatial, labels B×spatial long)


def _onehot(labels, k):
    return torch.stack([(labels == c).double() for c in range(k)], dim=1)


def _logp(logits):
    return logits - torch.logsumexp(logits, dim=1, keepdim=True)


def ref_ce(logits, labels):
    logp = _logp(logits)
    return -(logp * _onehot(labels, logits.shape[1])).sum(1).mean()


def _soft_dice(p, t, smooth=1e-5):
    axes = tuple(range(2, p.ndim))
    inter = (p * t).sum(axes)
    return (1 - (2 * inter + smooth) / (p.sum(axes) + t.sum(axes) + smooth)).mean()


def ref_ce_dice(logits, labels):
    p = torch.softmax(logits, 1)
    return ref_ce(logits, labels) + _soft_dice(p, _onehot(labels, logits.shape[1]))


def ref_focal(logits, labels, gamma=3.0):
    p_y = (torch.softmax(logits, 1) * _onehot(labels, logits.shape[1])).sum(1)
    return (-((1 - p_y) ** gamma) * torch.log(p_y)).mean()


def ref_ls(logits, labels, alpha=0.1):
    k = logits.shape[1]
    target = _onehot(labels, k) * (1 - alpha) + alpha / k
    return -(target * _logp(logits)).sum(1).mean()


def ref_ecp(logits, labels, alpha=0.1):
    p = torch.softmax(logits, 1).clamp(1e-10, 1 - 1e-10)
    return ref_ce(logits, labels) - alpha * (-p * torch.log(p)).mean()


def ref_svls_kernel(dims, size=3, sigma=1.0):
    """The conventions' recipe step by step, with its two divisions kept separate."""
    half = size // 2
    offsets = list(itertools.product(range(-half, half + 1), repeat=dims))
    g = {o: math.exp(-sum(v * v for v in o) / (2 * sigma**2)) for o in offsets}
    total = sum(g.values())
    g = {o: v / total for o, v in g.items()}
    centre = (0,) * dims
    neighbours = sum(v for o, v in g.items() if o != centre)
    g[centre] = neighbours
    g = {o: v / neighbours for o, v in g.items()}
    return g, sum(g.values())  # weights by offset, and the kernel sum (2) that divides the convolution output


def ref_svls_targets(labels, k, size=3, sigma=1.0):
    dims = labels.ndim - 1
    weights, kernel_sum = ref_svls_kernel(dims, size, sigma)
    onehot = _onehot(labels, k)
    spatial = labels.shape[1:]
    out = torch.zeros_like(onehot)
    for offset, w in weights.items():
        # replicate padding = clamping the shifted index into the volume
        idx = [torch.arange(n).add(o).clamp(0, n - 1) for n, o in zip(spatial, offset)]
        shifted = onehot
        for axis, ix in enumerate(idx):
            shifted = shifted.index_select(axis + 2, ix)
        out = out + w * shifted
    return out / kernel_sum


def ref_svls(logits, labels, kernel_size=3, sigma=1.0):
    t = ref_svls_targets(labels, logits.shape[1], kernel_size, sigma)
    return -(t * _logp(logits)).sum(1).mean()


def _distances(logits):
    return logits.max(dim=1, keepdim=True).values - logits


def ref_mbls(logits, labels, margin=10.0, alpha=0.1):
    return ref_ce(logits, labels) + alpha * torch.relu(_distances(logits) - margin).mean()


def ref_mbls_l2(logits, labels, margin=10.0, alpha=0.1, one_sided=True):
    x = _distances(logits) - margin
    pen = torch.relu(x) ** 2 if one_sided else x**2
    return ref_ce(logits, labels) + alpha * pen.mean()


def ref_mbls_dice(logits, labels, margin=10.0, alpha=0.1):
    p = torch.softmax(logits, 1)
    dice = _soft_dice(p[:, 1:], _onehot(labels, logits.shape[1])[:, 1:])
    return ref_ce(logits, labels) + dice + alpha * torch.relu(_distances(logits) - margin).mean()


CASES = [
    ("ce", {}, ref_ce),
    ("ce_dice", {}, ref_ce_dice),
    ("focal", {}, ref_focal),
    ("focal", {"gamma": 1}, ref_focal),
    ("focal", {"gamma": 2.0}, ref_focal),
    ("ecp", {}, ref_ecp),
    ("ecp", {"alpha": 0.3}, ref_ecp),
    ("ls", {}, ref_ls),
    ("ls", {"alpha": 0.3}, ref_ls),
    ("svls", {}, ref_svls),
    ("svls", {"kernel_size": 5, "sigma": 0.7}, ref_svls),
    ("mbls", {}, ref_mbls),
    ("mbls", {"margin": 5, "alpha": 0.2}, ref_mbls),
    ("mbls_l2", {}, ref_mbls_l2),
    ("mbls_l2", {"margin": 5, "one_sided": False}, ref_mbls_l2),
    ("mbls_dice", {}, ref_mbls_dice),
    ("mbls_dice", {"margin": 8}, ref_mbls_dice),
]


def _inputs(shape, seed):
    g = torch.Generator().manual_seed(seed)
    b, k, *spatial = shape
    # scale 8: many logit distances exceed the margins 5-10, so the penalties are active
    logits = torch.randn(shape, generator=g) * 8
    labels = torch.randint(0, k, (b, 1, *spatial), generator=g)
    return logits, labels


@pytest.mark.parametrize("shape", [(2, 4, 12, 10), (2, 3, 5, 6, 7)], ids=["2d", "3d"])
@pytest.mark.parametrize(("name", "params", "ref"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_value_and_gradient_match_reference(name, params, ref, shape):
    logits, labels = _inputs(shape, seed=len(name) + len(shape))
    x = logits.clone().requires_grad_(True)
    value = build_loss(name, **params)(x, labels)
    value.backward()

    x_ref = logits.double().requires_grad_(True)
    expected = ref(x_ref, labels[:, 0], **params)
    expected.backward()

    assert value.dtype == torch.float32 and value.ndim == 0
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    # gradients: float32 against float64, relative to the largest entry
    scale = x_ref.grad.abs().max().item()
    assert scale > 0
    assert torch.allclose(x.grad.double(), x_ref.grad, rtol=1e-4, atol=1e-5 * scale)


def test_penalties_are_active_in_the_fidelity_inputs():
    # guards the test above against comparing only the CE part
    logits, _ = _inputs((2, 4, 12, 10), 0)
    d = _distances(logits.double())
    assert ((d > 10) & (d > 0)).double().mean() > 0.2
    assert ((d > 0) & (d < 10)).double().mean() > 0.2


def test_reference_svls_kernel_gives_the_documented_weights():
    w2, s2 = ref_svls_kernel(2)
    assert s2 == pytest.approx(2.0)
    assert w2[(0, 0)] / s2 == pytest.approx(0.5)
    assert w2[(0, 1)] / s2 == pytest.approx(0.077807, abs=1e-6)
    assert w2[(1, 1)] / s2 == pytest.approx(0.047193, abs=1e-6)
    w3, s3 = ref_svls_kernel(3)
    assert [w3[o] / s3 for o in [(0, 0, 0), (0, 0, 1), (0, 1, 1), (1, 1, 1)]] == pytest.approx(
        [0.5, 0.030823, 0.018695, 0.011339], abs=1e-6
    )
