"""The losses published since the paper (NACL, CRaC's constraint, mL1-ACE, ACLS): values and gradients on
hand-computed cases and against the formulas written out here with plain loops, 2D and 3D."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from monai.losses import NACLLoss

from pipeline.benchmarks.boundaries import count
from pipeline.config import load_config
from pipeline.losses import (
    ACEDiceCE,
    AdaptiveConditionalLabelSmoothing,
    NeighbourAwareCalibration,
    boundary_mask,
    build_loss,
    class_proportions,
    marginal_l1_ace,
    phr,
)
from pipeline.losses.svls import svls_kernel
from tests.helpers import make_config_dir, write_blob_volumes

# a label map touching the border on every side, with class 2 absent
BORDER = torch.tensor([[[1, 1, 0, 0],
                        [1, 1, 0, 3],
                        [0, 0, 0, 3]]])


def proportions_by_loops(labels: torch.Tensor, k: int, size: int = 3) -> torch.Tensor:
    """τ by the definition: each class's share of the window's cells, cells past the border counted as class 0."""
    half = size // 2
    spatial = labels.shape[1:]
    out = torch.zeros(labels.shape[0], k, *spatial, dtype=torch.float64)
    for b in range(labels.shape[0]):
        for pos in itertools.product(*[range(n) for n in spatial]):
            for off in itertools.product(range(-half, half + 1), repeat=len(spatial)):
                q = tuple(p + o for p, o in zip(pos, off))
                inside = all(0 <= v < n for v, n in zip(q, spatial))
                c = int(labels[(b, *q)]) if inside else 0
                out[(b, c, *pos)] += 1.0 / size ** len(spatial)
    return out


def boundary_by_loops(labels: torch.Tensor, size: int = 3) -> torch.Tensor:
    tau = proportions_by_loops(labels, int(labels.max()) + 1, size)
    return tau.amax(dim=1) < 1.0


def blobs(shape, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    field = F.avg_pool2d(torch.randn(1, 1, *shape, generator=g), 5, 1, 2)[0, 0] if len(shape) == 2 else \
        F.avg_pool3d(torch.randn(1, 1, *shape, generator=g), 3, 1, 1)[0, 0]
    edges = torch.quantile(field.flatten(), torch.linspace(0, 1, k + 1)[1:-1])
    return torch.bucketize(field, edges)[None]


# ---------------------------------------------------------------- neighbourhoods


@pytest.mark.parametrize("labels", [BORDER, blobs((7, 9), 4, 0), blobs((4, 5, 6), 3, 1)])
def test_class_proportions_and_boundaries_follow_the_definition(labels):
    k = int(labels.max()) + 1
    assert torch.equal(class_proportions(labels, k).double(), proportions_by_loops(labels, k).float().double())
    assert torch.equal(boundary_mask(labels), boundary_by_loops(labels))


def test_border_proportions_by_hand():
    tau = class_proportions(BORDER, 4)
    # corner (0, 0): 5 cells past the border (class 0) + its 4 cells in the image, all class 1
    assert tau[0, :, 0, 0].tolist() == pytest.approx([5 / 9, 4 / 9, 0, 0])
    # (2, 3), bottom-right corner: cells past the border 5, image cells (1, 2)=0 (2, 2)=0 (1, 3)=3 (2, 3)=3
    assert tau[0, :, 2, 3].tolist() == pytest.approx([7 / 9, 0, 0, 2 / 9])
    assert tau[0, 2].abs().sum() == 0  # the absent class
    # every pixel of a label map touching the border with a non-zero class is a boundary pixel there
    assert bool(boundary_mask(BORDER)[0, 0, 0])
    assert not bool(boundary_mask(torch.zeros(1, 3, 3, dtype=torch.long)).any())


def test_released_boundary_test_is_the_released_expression():
    # the released code's lines, re-typed: Unfold (zero padding), mean over the cells, sum of (mean − cell) ≠ 0
    labels = torch.cat([blobs((40, 48), 4, s) for s in range(3)])
    cells = torch.nn.Unfold(kernel_size=(3, 3), padding=1)(labels[:, None].float())
    expected = ((cells.mean(dim=1, keepdim=True) - cells).sum(dim=1, keepdim=True) != 0).reshape(labels.shape)
    assert torch.equal(boundary_mask(labels, test="released"), expected)


def test_released_boundary_test_only_misses_boundary_pixels():
    labels = torch.cat([blobs((64, 64), 4, s) for s in range(4)])
    exact, released = boundary_mask(labels), boundary_mask(labels, test="released")
    assert not (released & ~exact).any()  # never an interior pixel called boundary
    assert (exact & ~released).any()  # but some boundary pixels called interior (float rounding)
    with pytest.raises(ValueError, match="boundary test"):
        boundary_mask(labels, test="approx")


# ---------------------------------------------------------------- NACL


@pytest.mark.parametrize("distance", ["l1", "l2"])
def test_nacl_value_and_gradient_on_a_border_map(distance):
    logits = torch.randn(1, 4, 3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
    logits.requires_grad_(True)
    loss = NeighbourAwareCalibration(alpha=0.3, distance=distance)
    value = loss(logits, BORDER)
    tau = proportions_by_loops(BORDER, 4)
    diff = tau - logits
    expected = F.cross_entropy(logits, BORDER) + 0.3 * (diff.abs() if distance == "l1" else diff ** 2).mean()
    assert float(value) == pytest.approx(float(expected), rel=1e-12)
    (grad,) = torch.autograd.grad(value, logits)
    p = torch.softmax(logits.detach(), 1)
    ce_grad = (p - F.one_hot(BORDER, 4).permute(0, 3, 1, 2)) / 12
    n = logits.numel()
    pen_grad = (torch.sign(logits.detach() - tau) if distance == "l1" else 2 * (logits.detach() - tau)) / n
    assert torch.allclose(grad, ce_grad + 0.3 * pen_grad, atol=1e-12)


@pytest.mark.parametrize("kernel,distance,shape", [
    ("mean", "l1", (2, 3, 6, 7)), ("gaussian", "l2", (2, 3, 6, 7)),
    ("mean", "l2", (1, 3, 4, 5, 6)), ("gaussian", "l1", (1, 3, 4, 5, 6))])
def test_nacl_monai_variant_equals_monai_nacl_loss(kernel, distance, shape):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(*shape, generator=g)
    labels = torch.randint(0, 3, (shape[0], *shape[2:]), generator=g)
    ours = NeighbourAwareCalibration(alpha=0.2, kernel=kernel, distance=distance, variant="monai")(logits, labels)
    monai = NACLLoss(classes=3, dim=len(shape) - 2, kernel_ops=kernel, distance_type=distance, alpha=0.2)(logits,
                                                                                                           labels)
    assert float(ours) == pytest.approx(float(monai), rel=1e-6)


def test_nacl_released_and_monai_differ_at_the_border_only():
    labels = blobs((8, 8), 3, 5)
    logits = torch.zeros(1, 3, 8, 8)
    released = NeighbourAwareCalibration().targets(labels, logits)
    monai = NeighbourAwareCalibration(variant="monai").targets(labels, logits)
    assert torch.allclose(released[..., 1:-1, 1:-1], monai[..., 1:-1, 1:-1], atol=1e-6)
    assert not torch.allclose(released[..., 0, :], monai[..., 0, :])  # MONAI's zero padding belongs to no class
    assert torch.allclose(released.sum(1), torch.ones(1, 8, 8))


def test_nacl_gaussian_is_the_svls_kernel_with_replicate_padding():
    labels = BORDER
    tau = NeighbourAwareCalibration(kernel="gaussian").targets(labels, torch.zeros(1, 4, 3, 4))
    kernel = svls_kernel(2)
    onehot = F.pad(F.one_hot(labels, 4).permute(0, 3, 1, 2).double(), [1, 1, 1, 1], mode="replicate")
    expected = F.conv2d(onehot, kernel.expand(4, 1, 3, 3), groups=4)
    assert torch.allclose(tau.double(), expected, atol=1e-6)


def test_nacl_rejects_bad_options():
    for kwargs, match in [({"kernel": "box"}, "kernel"), ({"distance": "l3"}, "distance"),
                          ({"variant": "paper"}, "variant"), ({"kernel_size": 4}, "kernel_size"),
                          ({"alpha": -1}, "alpha")]:
        with pytest.raises(ValueError, match=match):
            NeighbourAwareCalibration(**kwargs)


# ---------------------------------------------------------------- CRaC's loss


def test_crac_value_on_a_border_map_by_the_formula():
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(1, 4, 3, 4, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    loss = build_loss("crac", num_classes=4, margin=5.0, rho=0.5)
    lambd = torch.linspace(0.1, 0.8, 8, dtype=torch.float64)
    loss.lambd.copy_(lambd)
    value = loss(logits, BORDER)
    tau = proportions_by_loops(BORDER, 4)
    bnd = boundary_by_loops(BORDER)[:, None]
    h = torch.where(bnd, (tau - logits).abs(), (5 * tau - logits).abs())
    total = 0
    for c in range(4):
        for r, mask in enumerate((bnd, ~bnd)):
            lam, rho = lambd[r * 4 + c], 0.5
            hc = h[:, c:c + 1] * mask
            total = total + ((lam + rho * hc) ** 2 - lam ** 2).sum() / (2 * rho)
    expected = F.cross_entropy(logits, BORDER) + total / (12 * 8)
    assert float(value) == pytest.approx(float(expected), rel=1e-10)
    (grad,) = torch.autograd.grad(value, logits)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    assert torch.allclose(grad, expected_grad, atol=1e-12)
    assert float(loss.parts["constraint"]) == pytest.approx(float(h.mean()), rel=1e-10)


def test_phr_by_hand():
    value, grad = phr(torch.tensor([0.0, 2.0, -3.0]), torch.tensor(1.0), torch.tensor(0.5))
    # x = 1 + 0.5 h: 1, 2, -0.5 -> ((x² − 1) / 1, …), the last below 0: −λ² / (2ρ)
    assert value.tolist() == pytest.approx([0.0, 3.0, -1.0])
    assert grad.tolist() == pytest.approx([1.0, 2.0, 0.0])


# ---------------------------------------------------------------- mL1-ACE


def ace_by_loops(p: torch.Tensor, y: torch.Tensor, n_bins: int, soft: bool, ignore_empty: bool = True) -> float:
    """The shared doc's mL1-ACE: per (image, class), mean over non-empty bins of |mean p − mean y|."""
    total = 0.0
    b_, k_ = p.shape[:2]
    centres = [(i + 0.5) / n_bins for i in range(n_bins)]
    for b in range(b_):
        for c in range(k_):
            pv, yv = p[b, c].flatten().tolist(), y[b, c].flatten().tolist()
            w = [[0.0] * n_bins for _ in range(3)]
            for pi, yi in zip(pv, yv):
                if soft:
                    if pi <= centres[0]:
                        parts = [(0, 1.0)]
                    elif pi >= centres[-1]:
                        parts = [(n_bins - 1, 1.0)]
                    else:
                        j = max(i for i in range(n_bins) if centres[i] <= pi)
                        t = (pi - centres[j]) * n_bins
                        parts = [(j, 1 - t), (j + 1, t)]
                else:
                    j = next(i for i in range(n_bins) if pi <= (i + 1) / n_bins * (1 + 1.2e-7)) if pi > 0 else 0
                    parts = [(j, 1.0)]
                for j, wt in parts:
                    w[0][j] += wt
                    w[1][j] += wt * pi
                    w[2][j] += wt * yi
            gaps = [abs(w[1][j] / w[0][j] - w[2][j] / w[0][j]) for j in range(n_bins) if w[0][j] >= (0.01 if soft
                                                                                                    else 1e-12)]
            ace = sum(gaps) / len(gaps)
            total += 0.0 if ignore_empty and sum(yv) == 0 else ace
    return total / (b_ * k_)


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("shape", [(2, 4, 3, 4), (1, 3, 3, 4, 5)])
def test_ace_matches_the_formula_with_an_absent_class(soft, shape):
    g = torch.Generator().manual_seed(7)
    probs = torch.softmax(torch.randn(*shape, generator=g, dtype=torch.float64) * 2, 1)
    labels = torch.randint(0, shape[1] - 1, (shape[0], *shape[2:]), generator=g)  # the last class absent
    target = F.one_hot(labels, shape[1]).movedim(-1, 1).double()
    value = marginal_l1_ace(probs, target, 20, "soft" if soft else "hard")
    # within 1e-6: the released code's edges end at 1 + ε and its outer bins' ±10⁴ sentinels leave ~1e-5 of a
    # voxel's weight to the neighbouring bin, which the loops above (the formula) do not
    assert float(value) == pytest.approx(ace_by_loops(probs, target, 20, soft), rel=1e-6, abs=1e-12)
    kept = marginal_l1_ace(probs, target, 20, "soft" if soft else "hard", ignore_empty_classes=False)
    assert float(kept) == pytest.approx(ace_by_loops(probs, target, 20, soft, ignore_empty=False), rel=1e-6)
    assert float(kept) > float(value)


def test_hard_bins_put_a_probability_on_an_edge_in_the_lower_bin():
    # p = 0.5 sits on the edge between bins 9 and 10: lo < p <= hi puts it in bin 9, with p = 0.45 (bin 8 ends
    # at 0.45 + rounding: bin 8 or 9) ... so a single voxel per bin gives a gap |p − y| exactly
    p = torch.tensor([[[0.5, 0.0, 1.0]], [[0.5, 1.0, 0.0]]]).reshape(1, 2, 3)
    y = torch.tensor([[[1.0, 0.0, 1.0]], [[0.0, 1.0, 0.0]]]).reshape(1, 2, 3)
    # class 0: bins {0.5} gap 0.5, {0.0} gap 0, {1.0} gap 0 -> 1/6; class 1: {0.5} gap 0.5, {1.0} 0, {0.0} 0 -> 1/6
    assert float(marginal_l1_ace(p, y, 20, "hard")) == pytest.approx(1 / 6)
    # two voxels tied at 0.5 share the bin: class 0 then has one bin 0.5 vs 0.5 -> 0
    p2, y2 = torch.full((1, 1, 2), 0.5), torch.tensor([[[1.0, 0.0]]])
    assert float(marginal_l1_ace(p2, y2, 20, "hard")) == 0.0


@pytest.mark.parametrize("binning", ["hard", "soft"])
def test_ace_loss_gradient_matches_finite_differences(binning):
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(1, 3, 3, 4, generator=g, dtype=torch.float64)).requires_grad_(True)
    labels = torch.randint(0, 3, (1, 3, 4), generator=g)
    loss = ACEDiceCE(binning)
    assert torch.autograd.gradcheck(lambda z: loss(z, labels), (logits,), eps=1e-7, atol=1e-5)
    value = loss(logits, labels)
    parts = loss.parts
    assert float(value) == pytest.approx(0.33 * float(parts["ace"] + parts["dice"] + parts["ce"]), rel=1e-12)


# ---------------------------------------------------------------- ACLS


def test_acls_ties_and_gradient_by_hand():
    # voxel 1: logits (12, 12, 0): two tied maxima, both positive; voxel 2: (0, 11, 20)
    logits = torch.tensor([[[12.0, 0.0], [12.0, 11.0], [0.0, 20.0]]], dtype=torch.float64).reshape(1, 3, 2, 1)
    logits.requires_grad_(True)
    loss = AdaptiveConditionalLabelSmoothing(alpha=1.0, pos_lambda=1.0, neg_lambda=0.5, margin=10.0)
    value = loss(logits, torch.tensor([[[0], [2]]]))
    pos = (2 * 2 ** 2 + 10 ** 2) / 2  # voxel 1: two positives relu(12 − 10)²; voxel 2: relu(20 − 10)²
    neg = (2 ** 2 + 10 ** 2 + 0) / (2 * 2)  # voxel 1: relu(12 − 0 − 10)²; voxel 2: relu(20 − 0 − 10)², relu(−1)²
    assert float(value) - float(loss.parts["ce"]) == pytest.approx(pos + 0.5 * neg)
    logits.grad = None
    (value - F.cross_entropy(logits, torch.tensor([[[0], [2]]]))).backward()
    grad = logits.grad[0, :, :, 0]
    # voxel 1: both positive terms' gradient goes to the first maximum: 2 · 2 · 2 / 2 = 4; the negative term
    # −2 · 0.5 · 2 / 4 = −0.5 on class 2 (its max is stop-gradient)
    assert grad[:, 0].tolist() == pytest.approx([4.0, 0.0, -0.5])
    assert grad[:, 1].tolist() == pytest.approx([-0.5 * 2 * 10 / 4, 0.0, 2 * 10 / 2])


def test_every_new_loss_takes_2d_and_3d_inputs():
    for name in ("nacl", "crac", "ace_hard", "ace_soft", "acls"):
        for shape in [(2, 3, 5, 6), (1, 3, 3, 4, 5)]:
            logits = torch.randn(*shape, requires_grad=True)
            labels = torch.randint(0, 3, (shape[0], 1, *shape[2:]))
            loss = build_loss(name, **({"num_classes": 3} if name == "crac" else {}))
            value = loss(logits, labels)
            value.backward()
            assert value.ndim == 0 and torch.isfinite(logits.grad).all(), (name, shape)


def test_boundary_count_on_a_dataset(tmp_path):
    cfg = make_config_dir(tmp_path)
    data = write_blob_volumes(tmp_path / "data")
    t = count(load_config("blobs", "ce", "unet", {"data_dir": str(data)}, cfg))
    for d in ("2d", "3d"):
        assert t[f"released_only_{d}"] == 0 and t[f"exact_{d}"] - t[f"exact_only_{d}"] == t[f"released_{d}"]
        assert 0 < t[f"exact_{d}"] < t[f"pixels_{d}"]
