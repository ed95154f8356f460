"""Logit statistics (paper Fig. 4): the mean logit vector per ground-truth class and the logit distances
``max_j l_j − l_k`` that MbLS constrains, pooled over every voxel of every volume (no voxel is dropped: every
ground-truth class has its group).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce

from pipeline.metrics.calibration import check_inputs, index_labels
from pipeline.metrics.volume import put_details
from pipeline.tensors import plain


def logit_sums(logits, labels) -> dict[str, torch.Tensor]:
    """Additive logit statistics of one volume (``K×spatial`` logits, ``spatial`` labels), every voxel kept.

    Returns:
        ``class_sum`` ``K×K`` (row ``j``: sum of the logit vectors of the voxels of ground-truth class ``j``),
        ``class_count`` ``K``, ``dist_sum`` (sum over voxels and the ``K − 1`` non-winning classes of the logit
        distance ``d_k = max_j l_j − l_k``), ``dist_count`` (their number), ``dist_max`` (the largest ``d_k``).
    """
    logits, labels = check_inputs(logits, labels)
    k = logits.shape[0]
    z = logits.reshape(k, -1).double()
    y = labels.reshape(-1)
    class_sum = torch.zeros(k, k, dtype=torch.float64, device=z.device).index_add_(0, y, z.T)
    class_count = torch.bincount(y, minlength=k).double()
    d = z.max(0, keepdim=True).values - z  # the winner contributes 0
    return {
        "class_sum": class_sum,
        "class_count": class_count,
        "dist_sum": d.sum(),
        "dist_count": torch.tensor(float(z.shape[1] * (k - 1)), dtype=torch.float64, device=z.device),
        "dist_max": d.max() if d.numel() else torch.tensor(0.0, dtype=torch.float64, device=z.device),
    }


def logit_statistics(logits, labels) -> dict:
    """Logit statistics of one volume: ``mean_logits`` ``K×K`` (row ``j``: the mean logit vector of ground-truth
    class ``j``; ``nan`` rows for absent classes), ``distance_mean`` and ``distance_max`` of ``max_j l_j − l_k``
    over the non-winning classes ``k`` of every voxel.

    >>> s = logit_statistics(torch.tensor([[3.0, 0.0], [1.0, 2.0]]), torch.tensor([0, 1]))
    >>> s["mean_logits"].tolist(), s["distance_mean"], s["distance_max"]
    ([[3.0, 1.0], [0.0, 2.0]], 2.0, 2.0)
    """
    return _finish_logits(logit_sums(logits, labels))


def _finish_logits(s: dict) -> dict:
    count = s["class_count"].cpu()
    mean = s["class_sum"].cpu() / count[:, None].clamp_min(1)
    mean[count == 0] = math.nan
    n = float(s["dist_count"])
    return {
        "mean_logits": mean.numpy(),
        "class_count": count.numpy(),
        "distance_mean": float(s["dist_sum"]) / n if n else math.nan,
        "distance_max": float(s["dist_max"]) if n else math.nan,
    }


class LogitStatistics(Metric):
    """Ignite metric: the mean logit vector per ground-truth class and the logit-distance statistics, pooled over
    every voxel of every volume (:func:`logit_sums`; sums and the maximum are all-reduced).

    ``output_transform`` maps the engine output to ``(logits, labels)`` (``B×K×spatial`` logits, labels as indices
    or one-hot). Results (under ``prefix``): ``logits/distance_mean``, ``logits/distance_max``; the full
    statistics (``mean_logits`` ``K×K``, ``class_count``) go to ``engine.state.metric_details[name]``.
    """

    def __init__(self, num_classes: int, prefix: str = "", output_transform: Callable = lambda x: x,
                 device: str | torch.device = "cpu") -> None:
        self.num_classes, self.prefix = num_classes, prefix
        super().__init__(output_transform=output_transform, device=device, metrics_result_mode="flatten",
                         skip_unrolling=True)

    @reinit__is_reduced
    def reset(self) -> None:
        k = self.num_classes
        self._sums = torch.zeros(k * k + k + 2, dtype=torch.float64, device=self._device)
        self._max = torch.tensor(-math.inf, dtype=torch.float64, device=self._device)

    @reinit__is_reduced
    def update(self, output: Sequence) -> None:
        for z, t in zip(output[0], output[1]):
            z = plain(z).detach()
            if z.shape[0] != self.num_classes:
                raise ValueError(f"expected {self.num_classes} logit channels, got shape {tuple(z.shape)}")
            s = logit_sums(z, index_labels(plain(t).detach(), z.shape[0]))
            flat = torch.cat([s["class_sum"].reshape(-1), s["class_count"], s["dist_sum"][None], s["dist_count"][None]])
            self._sums += flat.to(self._device)
            self._max = torch.maximum(self._max, s["dist_max"].to(self._device))

    @sync_all_reduce("_sums", "_max:MAX")
    def compute(self) -> dict[str, float]:
        k = self.num_classes
        s = {"class_sum": self._sums[: k * k].reshape(k, k), "class_count": self._sums[k * k : k * k + k],
             "dist_sum": self._sums[-2], "dist_count": self._sums[-1], "dist_max": self._max}
        self.result = _finish_logits(s)
        return {f"{self.prefix}logits/distance_mean": self.result["distance_mean"],
                f"{self.prefix}logits/distance_max": self.result["distance_max"]}

    def completed(self, engine, name: str) -> None:
        super().completed(engine, name)
        put_details(engine, name, self.result)
