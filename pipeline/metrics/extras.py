"""Calibration measures beyond the paper's ECE/CECE: adaptive (equal-mass) ECE, and calibration against soft
reference labels (e.g. tissue probability maps) for datasets that carry them.

Voxels kept: as for the paper's ECE (:mod:`pipeline.metrics.calibration`), the voxels whose ground-truth label is
not 0, unless ``foreground_only=False``. The maths are plain functions on one volume (``K×spatial``); the Ignite
metric :class:`VolumeExtras` averages them over volumes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce

from pipeline.metrics.calibration import NLL_EPS, bin_index, check_inputs, index_labels
from pipeline.metrics.volume import PerVolumeMetric
from pipeline.tensors import plain


def _kept(probs, labels, foreground_only: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(p K×N, y N, keep mask of spatial)`` for the kept voxels, in float64."""
    probs, labels = check_inputs(probs, labels)
    k = probs.shape[0]
    p, y = probs.reshape(k, -1), labels.reshape(-1)
    keep = y != 0 if foreground_only else torch.ones_like(y, dtype=torch.bool)
    return p[:, keep].double(), y[keep], keep


def adaptive_ece(probs, labels, n_bins: int = 15, foreground_only: bool = True) -> float:
    """Top-label ECE with equal-mass bins (adaptive ECE; Nixon et al., 2019) of one volume.

    The kept voxels are sorted by confidence (max probability, stable sort) and cut into ``n_bins`` groups whose
    sizes differ by at most one; ``aECE = Σ_b (n_b / N) |mean conf_b − mean acc_b|`` with ``acc = [argmax ==
    label]`` (ties to the lowest class). Empty groups (fewer voxels than bins) add nothing.

    Args:
        probs: ``K×spatial`` probabilities. labels: ``spatial`` or ``1×spatial`` class indices.
        n_bins: default 15. foreground_only: keep ground-truth foreground voxels only (default True).

    Returns:
        the aECE, ``nan`` when no voxel is kept.

    >>> p = torch.tensor([[0.1, 0.4, 0.3, 0.2], [0.9, 0.6, 0.7, 0.8]])  # K=2, four voxels, all predicted 1
    >>> # sorted by confidence: (0.6, right), (0.7, wrong) | (0.8, right), (0.9, right): (|1.3 − 1| + |1.7 − 2|) / 4
    >>> round(adaptive_ece(p, torch.tensor([1, 1, 0, 1]), n_bins=2, foreground_only=False), 6)
    0.15
    """
    p, y, _ = _kept(probs, labels, foreground_only)
    n = y.numel()
    if n == 0:
        return math.nan
    conf, pred = p.max(0)
    order = torch.argsort(conf, stable=True)
    conf, correct = conf[order], (pred == y).double()[order]
    total = 0.0
    for c, a in zip(torch.tensor_split(conf, n_bins), torch.tensor_split(correct, n_bins)):
        if c.numel():
            total += float((c.sum() - a.sum()).abs())
    return total / n


def soft_label_calibration(probs, soft, labels, n_bins: int = 15, foreground_only: bool = True) -> dict[str, float]:
    """Calibration of one volume against soft reference probabilities ``soft`` (e.g. tissue probability maps).

    On the kept voxels (ground-truth ``labels`` not 0, as for the paper's ECE):

    * ``brier``: ``mean Σ_k (p_k − q_k)²``;
    * ``kl``: ``mean KL(q ‖ p) = mean Σ_k q_k (log q_k − log max(p_k, 1e-12))`` (terms with ``q_k = 0`` are 0);
    * ``ece``: top-label ECE where the "accuracy" of a voxel is the reference probability of the predicted class,
      ``q_{argmax p}``: ``Σ_b (n_b / N) |mean conf_b − mean q_pred,b|``, binned exactly as the paper's ECE
      (``n_bins`` equal-width ``(lower, upper]`` bins).

    Args:
        probs: ``K×spatial`` predicted probabilities. soft: ``K×spatial`` reference probabilities.
        labels: ``spatial`` or ``1×spatial`` hard labels (choose the kept voxels).

    Returns:
        ``{"brier", "kl", "ece"}``, each ``nan`` when no voxel is kept.

    Raises:
        ValueError: ``soft`` not of the shape of ``probs``, or outside [0, 1].
    """
    probs, soft = plain(probs), plain(soft)
    if soft.shape != probs.shape:
        raise ValueError(f"soft labels have shape {tuple(soft.shape)}, expected {tuple(probs.shape)} (one channel "
                         "per class, like the probabilities)")
    p, y, keep = _kept(probs, labels, foreground_only)
    if y.numel() == 0:
        return {"brier": math.nan, "kl": math.nan, "ece": math.nan}
    q = soft.reshape(soft.shape[0], -1)[:, keep].double()
    if bool((q < -1e-6).any()) or bool((q > 1 + 1e-6).any()) or not bool(torch.isfinite(q).all()):
        raise ValueError("soft labels must be probabilities in [0, 1]; got values outside that range or non-finite")
    n = y.numel()
    brier = float(((p - q) ** 2).sum() / n)
    logq = torch.where(q > 0, q.clamp_min(1e-300).log(), torch.zeros_like(q))
    kl = float((q * (logq - p.clamp_min(NLL_EPS).log())).sum() / n)
    conf, pred = p.max(0)
    acc = q.gather(0, pred[None])[0]
    b = bin_index(conf, n_bins)
    ok = b >= 0
    count = torch.bincount(b[ok], minlength=n_bins).double()
    gap = torch.bincount(b[ok], weights=conf[ok] - acc[ok], minlength=n_bins)
    ece = float(gap.abs().sum() / n) if count.sum() > 0 else math.nan
    return {"brier": brier, "kl": kl, "ece": ece}


class VolumeExtras(PerVolumeMetric):
    """Ignite metric: adaptive ECE and, when soft reference labels come with a volume, the soft-label Brier, KL and
    ECE (:func:`soft_label_calibration`); one value per volume, then the mean over volumes (``nan`` skipped).

    ``output_transform`` maps the engine output to ``(probs, labels, soft)``: ``B×K×spatial`` probabilities (or a
    list of ``K×spatial``), labels as indices ``B×1×spatial`` or one-hot, and soft labels like the probabilities,
    or ``None`` (a dataset without them: the soft metrics are skipped). Results (under ``prefix``): ``aece``,
    ``soft/brier``, ``soft/kl``, ``soft/ece`` (the last three only when some volume had soft labels). Per-volume
    values go to ``engine.state.metric_details[name]``.
    """

    KEYS = ("aece", "soft/brier", "soft/kl", "soft/ece")

    def __init__(self, n_bins: int = 15, foreground_only: bool = True, prefix: str = "",
                 output_transform: Callable = lambda x: x, device: str | torch.device = "cpu") -> None:
        self.n_bins, self.foreground_only = n_bins, foreground_only
        super().__init__(prefix, output_transform, device)

    @reinit__is_reduced
    def update(self, output: Sequence) -> None:
        probs, labels, soft = output
        super().update((probs, labels, [None] * len(probs) if soft is None else soft))

    def volume_row(self, p, t, q) -> dict:
        p = plain(p).detach()
        t = index_labels(plain(t).detach(), p.shape[0])
        row = {"aece": adaptive_ece(p, t, self.n_bins, self.foreground_only)}
        if q is not None:
            s = soft_label_calibration(p, plain(q).detach().to(p.device), t, self.n_bins, self.foreground_only)
            row.update({f"soft/{k}": v for k, v in s.items()})
        return row

    @sync_all_reduce("_sum", "_num")
    def compute(self) -> dict[str, float]:
        means = self.means()
        return {f"{self.prefix}{k}": v for i, (k, v) in enumerate(means.items()) if k == "aece" or self._num[i] > 0}
