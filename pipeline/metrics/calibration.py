"""The paper's calibration metrics: foreground ECE and classwise ECE (CECE), with NLL and Brier beside them.

Protocol (``shared/docs/reference-conventions.md``, paper Eqs. 8-9):

* **Kept voxels**: those whose *ground-truth* label is not 0 (``foreground_only=True``); the softmax is still over
  all ``K`` classes. With ``foreground_only=False`` every voxel is kept.
* **Bins**: ``n_bins`` equal-width bins on [0, 1] with edges ``torch.linspace(0, 1, n_bins + 1)`` in float64; a
  value ``v`` falls in bin ``b`` when ``edge_b < v <= edge_{b+1}``: ``v = 0`` falls in no bin, ``v = 1`` in the last.
  Empty bins add nothing.
* **ECE** (top-label): ``Σ_b (n_b / N) |mean conf_b − mean acc_b|`` with conf the max probability and acc
  ``[argmax == label]``; argmax ties go to the lowest class index. ``N`` is the number of kept voxels.
* **CECE** (classwise): for each channel ``j``, bin ``p_j`` over the kept voxels with accuracy ``[label == j]``;
  ``sce_j = Σ_b (n_bj / N) |mean p_j − acc_bj|``; CECE is the **mean over all K channels** (Eq. 9 prints a sum; the
  released code averages over the classes present, this project over all K channels).
* **Per-class ECE** (a breakdown for reports, not in the paper): the top-label ECE restricted to the kept voxels
  whose ground truth is class ``j``.
* **NLL** ``mean −log max(p_y, 1e-12)`` and **Brier** ``mean Σ_k (p_k − [y = k])²`` over the same kept voxels.
* **Aggregation**: one value per 3D volume, then the mean over volumes. A volume with no kept voxel has no value
  (every function returns ``nan`` for it) and is skipped by the mean; :class:`CalibrationMetrics` counts such
  volumes in ``skipped``.

All statistics are sums (counts, sums of confidence, sums of accuracy per bin), so they add exactly across
volumes and processes: :class:`CalibrationStats` is what an Ignite metric accumulates and all-reduces.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce

from pipeline.collectives import gather_values, world_size
from pipeline.metrics.volume import PerVolumeMetric
from pipeline.tensors import class_indices, plain

NLL_EPS = 1e-12


def check_inputs(probs, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """``(probs K×spatial, labels spatial)`` as plain tensors, the labels checked to be class indices of ``probs``.

    Args:
        probs: ``K×spatial`` probabilities (or logits). labels: ``spatial`` or ``1×spatial`` class indices.

    Raises:
        ValueError: labels of another shape, non-integer labels, or labels outside ``[0, K)``.
    """
    probs, labels = plain(probs), plain(labels)
    if probs.ndim < 2:
        raise ValueError(f"probs must be K×spatial, got shape {tuple(probs.shape)}")
    n_classes = probs.shape[0]
    if labels.ndim == probs.ndim and labels.shape[0] == 1:
        labels = labels[0]
    if labels.shape != probs.shape[1:]:
        raise ValueError(
            f"labels have shape {tuple(labels.shape)}, expected {tuple(probs.shape[1:])} or "
            f"{(1, *probs.shape[1:])} to match probs of shape {tuple(probs.shape)}"
        )
    labels = class_indices(labels, n_classes, "probability channels")
    return probs, labels


def bin_edges(n_bins: int, device=None) -> torch.Tensor:
    """The ``n_bins + 1`` equal-width edges on [0, 1] (float64) that every binning of this module uses."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    return torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64, device=device)


def bin_index(values: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Bin of each value under the ``(lower, upper]`` rule: ``-1`` for values ``<= 0``, else ``0..n_bins-1``."""
    idx = torch.bucketize(values.double(), bin_edges(n_bins, values.device), right=False) - 1
    return idx.clamp(max=n_bins - 1)


def _grouped_bins(group: torch.Tensor, values: torch.Tensor, targets: torch.Tensor, n_groups: int, n_bins: int):
    """Sum count, value and target per (group, bin): a ``n_groups × n_bins × 3`` float64 tensor."""
    b = bin_index(values, n_bins)
    size = n_groups * n_bins
    # values in no bin (<= 0) go to an extra slot that is dropped: no boolean indexing (the slow part on CPU)
    flat = torch.where(b >= 0, group.long() * n_bins + b, size)
    out = torch.stack(
        [
            torch.bincount(flat, minlength=size + 1).double(),
            torch.bincount(flat, weights=values.double(), minlength=size + 1),
            torch.bincount(flat, weights=targets.double(), minlength=size + 1),
        ],
        dim=-1,
    )
    return out[:size].reshape(n_groups, n_bins, 3)


@dataclass
class CalibrationStats:
    """Additive calibration statistics of one or more volumes (all float64).

    Attributes:
        top: ``K × n_bins × 3``; for each ground-truth class ``j``, top-label bins: count, sum of confidence,
            sum of correctness.
        classwise: ``K × n_bins × 3``; for each channel ``j``, bins of ``p_j`` over all kept voxels: count,
            sum of ``p_j``, sum of ``[label == j]``.
        n_kept: ``K``; the number of kept voxels per ground-truth class.
        nll_sum: sum over kept voxels of ``−log max(p_y, 1e-12)``.
        brier_sum: sum over kept voxels of ``Σ_k (p_k − [y = k])²``.
    """

    top: torch.Tensor
    classwise: torch.Tensor
    n_kept: torch.Tensor
    nll_sum: torch.Tensor
    brier_sum: torch.Tensor

    @property
    def n(self) -> float:
        return float(self.n_kept.sum())

    def __add__(self, other: CalibrationStats) -> CalibrationStats:
        return CalibrationStats(*(a + b for a, b in zip(self.astuple(), other.astuple())))

    def astuple(self) -> tuple[torch.Tensor, ...]:
        return (self.top, self.classwise, self.n_kept, self.nll_sum, self.brier_sum)

    # --- the metrics, from the sums -------------------------------------------------------------------------
    def ece(self) -> float:
        """Top-label ECE over all kept voxels; ``nan`` when none is kept."""
        if self.n == 0:
            return math.nan
        pooled = self.top.sum(0)
        return float((pooled[:, 1] - pooled[:, 2]).abs().sum() / self.n)

    def ece_per_class(self) -> list[float]:
        """Top-label ECE on the kept voxels of each ground-truth class (``nan`` for a class with none)."""
        gaps = (self.top[:, :, 1] - self.top[:, :, 2]).abs().sum(1)
        return [float(g / n) if n > 0 else math.nan for g, n in zip(gaps, self.n_kept)]

    def sce_per_class(self) -> list[float]:
        """Classwise calibration error of each channel ``j`` (``nan`` for all when no voxel is kept)."""
        if self.n == 0:
            return [math.nan] * self.classwise.shape[0]
        return [float(v) for v in (self.classwise[:, :, 1] - self.classwise[:, :, 2]).abs().sum(1) / self.n]

    def cece(self) -> float:
        """Mean over all K channels of :meth:`sce_per_class`."""
        return float(np.mean(self.sce_per_class())) if self.n else math.nan

    def nll(self) -> float:
        return float(self.nll_sum / self.n) if self.n else math.nan

    def brier(self) -> float:
        return float(self.brier_sum / self.n) if self.n else math.nan

    def reliability(self) -> dict[str, np.ndarray]:
        """Top-label reliability curve: per bin its count, mean confidence and accuracy (``nan`` where empty)."""
        pooled = self.top.sum(0).cpu().numpy()
        count = pooled[:, 0]
        with np.errstate(invalid="ignore", divide="ignore"):
            return {
                "edges": bin_edges(self.top.shape[1]).numpy(),
                "count": count,
                "confidence": np.where(count > 0, pooled[:, 1] / count, np.nan),
                "accuracy": np.where(count > 0, pooled[:, 2] / count, np.nan),
            }


def calibration_statistics(probs, labels, n_bins: int = 15, foreground_only: bool = True) -> CalibrationStats:
    """Bin statistics of one volume.

    Args:
        probs: class probabilities ``K×spatial`` (torch or numpy).
        labels: ground-truth class indices ``spatial`` or ``1×spatial``.
        n_bins: the number of equal-width bins (paper: 15).
        foreground_only: keep only voxels whose ground truth is not 0 (the paper's protocol).

    Raises:
        ValueError: mismatched shapes or labels outside ``[0, K)``.
    """
    probs, labels = check_inputs(probs, labels)
    n_classes = probs.shape[0]
    p = probs.reshape(n_classes, -1)
    y = labels.reshape(-1)
    if foreground_only:
        keep = y != 0
        p, y = p[:, keep], y[keep]
    p = p.double()
    # max over dim 0 gives the first maximal index (ties go to the lowest class), and is several times faster on CPU
    # than argmax over the leading dim
    conf, pred = p.max(0)
    correct = (pred == y).double()
    top = _grouped_bins(y, conf, correct, n_classes, n_bins)
    onehot = torch.zeros_like(p)
    onehot.scatter_(0, y[None], 1.0)
    group = torch.arange(n_classes, device=p.device)[:, None].expand_as(p)
    classwise = _grouped_bins(group.reshape(-1), p.reshape(-1), onehot.reshape(-1), n_classes, n_bins)
    p_true = p.gather(0, y[None])[0] if y.numel() else p.new_zeros(0)
    nll_sum = -(p_true.clamp_min(NLL_EPS).log()).sum()
    brier_sum = ((p - onehot) ** 2).sum()
    n_kept = torch.bincount(y, minlength=n_classes).double()
    return CalibrationStats(top, classwise, n_kept, nll_sum, brier_sum)


def ece(probs, labels, n_bins: int = 15, foreground_only: bool = True) -> float:
    """Top-label expected calibration error of one volume (paper Eq. 8; ``nan`` when no voxel is kept).

    >>> p = torch.tensor([[0.1, 0.8], [0.9, 0.2]])  # K=2, two voxels
    >>> round(ece(p, torch.tensor([1, 1])), 6)  # conf 0.9 right, conf 0.8 wrong: (0.1 + 0.8) / 2
    0.45
    """
    return calibration_statistics(probs, labels, n_bins, foreground_only).ece()


def cece(probs, labels, n_bins: int = 15, foreground_only: bool = True) -> float:
    """Classwise ECE of one volume, the mean over all K channels (paper Eq. 9; ``nan`` when no voxel is kept)."""
    return calibration_statistics(probs, labels, n_bins, foreground_only).cece()


def nll(probs, labels, foreground_only: bool = True) -> float:
    """Mean negative log-likelihood ``−log max(p_y, 1e-12)`` over the kept voxels of one volume."""
    return calibration_statistics(probs, labels, 1, foreground_only).nll()


def brier(probs, labels, foreground_only: bool = True) -> float:
    """Mean multi-class Brier score ``Σ_k (p_k − [y = k])²`` over the kept voxels of one volume."""
    return calibration_statistics(probs, labels, 1, foreground_only).brier()


def index_labels(y: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Integer labels ``1×spatial`` from either integer labels or a one-hot ``K×spatial`` tensor."""
    if y.shape[0] == n_classes and n_classes > 1:
        return y.argmax(0, keepdim=True)
    return y


class CalibrationMetrics(PerVolumeMetric):
    """Ignite metric for ECE, CECE, NLL and Brier on ground-truth foreground voxels, one value per volume.

    Each item of a batch is one volume: ``y_pred`` holds probabilities ``B×K×spatial`` (or a list of ``K×spatial``),
    ``y`` holds integer labels ``B×1×spatial`` or one-hot ``B×K×spatial``. :meth:`compute` returns (flattened into
    ``engine.state.metrics`` under ``prefix``):

    * ``ece``, ``cece``, ``nll``, ``brier``: the mean over volumes of the per-volume values (the paper's protocol);
    * ``ece_pooled``, ``cece_pooled``: from the bin sums of all volumes pooled.

    Sums and counts are all-reduced across processes, so both are exact in multi-process evaluation; a process
    that scored no volume takes part with zeros (sized from ``num_classes``, or like the other processes' sums).
    The per-volume values (with the per-class ECE and SCE; every process's, in rank order) and the pooled
    :class:`CalibrationStats` are put in ``engine.state.metric_details[name]`` as ``{"volumes": [...], "pooled": …}``
    when the metric completes.

    Args:
        n_bins: the number of bins (paper: 15).
        foreground_only: keep only ground-truth foreground voxels (paper: True).
        prefix: prepended to each result key, e.g. ``"val/"``.
        output_transform: maps ``engine.state.output`` to ``(y_pred, y)``.
        num_classes: ``K``, to size the pooled sums before any volume (default ``None``: from the first volume; a
            process without volumes then takes the size of the others' in :meth:`agree_on_shape`).
    """

    KEYS = ("ece", "cece", "nll", "brier")

    def __init__(
        self,
        n_bins: int = 15,
        foreground_only: bool = True,
        prefix: str = "",
        output_transform: Callable = lambda x: x,
        device: str | torch.device = "cpu",
        num_classes: int | None = None,
    ) -> None:
        self.n_bins = n_bins
        self.foreground_only = foreground_only
        self.num_classes = num_classes
        super().__init__(prefix, output_transform, device)

    def stats_shapes(self, k: int) -> list[tuple[int, ...]]:
        """The shapes of the :class:`CalibrationStats` tensors for ``k`` classes."""
        return [(k, self.n_bins, 3), (k, self.n_bins, 3), (k,), (), ()]

    @reinit__is_reduced
    def reset(self) -> None:
        super().reset()
        self._shape = None if self.num_classes is None else self.stats_shapes(int(self.num_classes))
        size = 0 if self._shape is None else sum(int(np.prod(s)) for s in self._shape)
        self._pooled = torch.zeros(size, dtype=torch.float64, device=self._device)
        self._skipped = torch.zeros((), dtype=torch.float64, device=self._device)
        self._n_volumes = torch.zeros((), dtype=torch.float64, device=self._device)

    def volume_row(self, p, t) -> dict:
        p = plain(p).detach()
        t = index_labels(plain(t).detach(), p.shape[0])
        stats = calibration_statistics(p, t, self.n_bins, self.foreground_only)
        row = {"ece": stats.ece(), "cece": stats.cece(), "nll": stats.nll(), "brier": stats.brier(),
               "ece_per_class": stats.ece_per_class(), "sce_per_class": stats.sce_per_class(), "n_kept": stats.n}
        if all(math.isnan(row[k]) for k in self.KEYS):
            self._skipped += 1
        flat = torch.cat([s.reshape(-1).to(self._device) for s in stats.astuple()])
        if self._shape is not None and self._pooled.numel() != flat.numel():
            raise ValueError(f"a volume with {p.shape[0]} probability channels, expected {self._shape[0][0]}")
        self._pooled = flat if float(self._n_volumes) == 0 else self._pooled + flat
        if self._shape is None:
            self._shape = [tuple(s.shape) for s in stats.astuple()]
        self._n_volumes += 1
        return row

    def _unflatten(self, flat: torch.Tensor) -> CalibrationStats:
        parts, start = [], 0
        for shape in self._shape:
            size = int(np.prod(shape)) if shape else 1
            parts.append(flat[start : start + size].reshape(shape).cpu())
            start += size
        return CalibrationStats(*parts)

    def agree_on_shape(self) -> None:
        """With several processes and no ``num_classes``: size the pooled sums of a process without volumes like
        those of the others, so that all-reducing them cannot fail (every process must call this).

        Raises:
            ValueError: processes whose volumes have different numbers of classes.
        """
        shapes = {repr(sh): sh for sh in gather_values(self._shape) if sh is not None}
        if len(shapes) > 1:
            raise ValueError(f"processes scored volumes with different calibration statistics shapes: {list(shapes)}")
        if shapes and self._shape is None:
            self._shape = next(iter(shapes.values()))
            self._pooled = torch.zeros(sum(int(np.prod(sh)) for sh in self._shape), dtype=torch.float64,
                                       device=self._device)

    def compute(self) -> dict[str, float]:
        if world_size() > 1:
            self.agree_on_shape()
        return self.reduced_results()

    @sync_all_reduce("_sum", "_num", "_pooled", "_skipped", "_n_volumes")
    def reduced_results(self) -> dict[str, float]:
        """The results from the sums all-reduced over processes (:meth:`compute` after :meth:`agree_on_shape`)."""
        if float(self._n_volumes) == 0:  # after the reduction: no volume in any process
            raise RuntimeError("CalibrationMetrics must have at least one volume before it can be computed")
        pooled = self._unflatten(self._pooled)
        out = self.means()
        out.update(ece_pooled=pooled.ece(), cece_pooled=pooled.cece(), skipped=float(self._skipped))
        self.pooled_stats = pooled
        return {f"{self.prefix}{k}": v for k, v in out.items()}

    def details(self) -> dict:
        return {"volumes": list(self.volumes), "pooled": self.pooled_stats}
