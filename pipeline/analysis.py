"""Analyses beyond the paper's ECE/CECE table: adaptive ECE, calibration against soft reference labels, logit
statistics (paper Fig. 4) and robustness to Gaussian noise (paper §5.2.4, Fig. 5).

The maths are plain functions on one volume (``K×spatial`` probabilities or logits); thin Ignite metrics
accumulate them over the volumes of an evaluation, with sums and counts all-reduced across processes.

Voxels kept: as for the paper's ECE (``pipeline.metrics.calibration``), the voxels whose ground-truth label is not
0, unless ``foreground_only=False``. Logit statistics use every voxel (every ground-truth class has its group).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence

import torch
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce
from monai.engines.utils import PrepareBatch

from pipeline.metrics.calibration import NLL_EPS, bin_index, check_inputs, index_labels
from pipeline.tensors import plain


def _kept(probs, labels, foreground_only: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(p K×N, y N, keep mask of spatial)`` for the kept voxels, in float64."""
    probs, labels = check_inputs(probs, labels)
    k = probs.shape[0]
    p, y = probs.reshape(k, -1), labels.reshape(-1)
    keep = y != 0 if foreground_only else torch.ones_like(y, dtype=torch.bool)
    return p[:, keep].double(), y[keep], keep


# --------------------------------------------------------------------------------------------------------------
# adaptive ECE
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


# --------------------------------------------------------------------------------------------------------------
# soft reference labels
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


# --------------------------------------------------------------------------------------------------------------
# logit statistics (paper Fig. 4)
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


# --------------------------------------------------------------------------------------------------------------
# Ignite metrics
class VolumeExtras(Metric):
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
        self.n_bins, self.foreground_only, self.prefix = n_bins, foreground_only, prefix
        super().__init__(output_transform=output_transform, device=device, metrics_result_mode="flatten",
                         skip_unrolling=True)

    @reinit__is_reduced
    def reset(self) -> None:
        self._sum = torch.zeros(len(self.KEYS), dtype=torch.float64, device=self._device)
        self._num = torch.zeros(len(self.KEYS), dtype=torch.float64, device=self._device)
        self.volumes: list[dict] = []

    @reinit__is_reduced
    def update(self, output: Sequence) -> None:
        probs, labels, soft = output
        soft = [None] * len(probs) if soft is None else soft
        for p, t, q in zip(probs, labels, soft):
            p = plain(p).detach()
            t = index_labels(plain(t).detach(), p.shape[0])
            row = {"aece": adaptive_ece(p, t, self.n_bins, self.foreground_only)}
            if q is not None:
                s = soft_label_calibration(p, plain(q).detach().to(p.device), t, self.n_bins, self.foreground_only)
                row.update({f"soft/{k}": v for k, v in s.items()})
            values = torch.tensor([row.get(k, math.nan) for k in self.KEYS], dtype=torch.float64)
            ok = ~torch.isnan(values)
            self._sum += torch.where(ok, values, torch.zeros_like(values)).to(self._device)
            self._num += ok.double().to(self._device)
            self.volumes.append(row)

    @sync_all_reduce("_sum", "_num")
    def compute(self) -> dict[str, float]:
        out = {}
        for i, k in enumerate(self.KEYS):
            if k == "aece" or self._num[i] > 0:
                out[f"{self.prefix}{k}"] = float(self._sum[i] / self._num[i]) if self._num[i] > 0 else math.nan
        return out

    def completed(self, engine, name: str) -> None:
        super().completed(engine, name)
        if not isinstance(getattr(engine.state, "metric_details", None), dict):
            engine.state.metric_details = {}
        engine.state.metric_details[name] = list(self.volumes)


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
        if not isinstance(getattr(engine.state, "metric_details", None), dict):
            engine.state.metric_details = {}
        engine.state.metric_details[name] = self.result


# --------------------------------------------------------------------------------------------------------------
# robustness to noise (paper §5.2.4)
def noise_seed(seed: int, sigma: float, key: str) -> int:
    """The seed of the noise added to one volume: a stable hash of (seed, sigma, volume id)."""
    return zlib.crc32(f"{int(seed)}/{float(sigma):.6g}/{key}".encode())


class GaussianNoiseBatch(PrepareBatch):
    """MONAI ``prepare_batch``: ``image + N(0, sigma²)`` noise, seeded per volume, and the label.

    The noise of a volume depends only on ``(seed, sigma, its id)`` (the batch's ``id`` entries; the running batch
    position when there are none), so a sweep gives the same images in any order and on any device.

    Args:
        sigma: the standard deviation (in the units of the preprocessed image, e.g. [0, 1]); 0 adds nothing.
        seed: the base seed (default 0).
    """

    def __init__(self, sigma: float, seed: int = 0) -> None:
        if not sigma >= 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        self.sigma, self.seed, self.position = float(sigma), int(seed), 0

    def noisy(self, image: torch.Tensor, ids: Sequence | None) -> torch.Tensor:
        """``image`` (``B×C×spatial``) plus this sigma's noise for each item."""
        x = image.as_tensor() if hasattr(image, "as_tensor") else image
        if self.sigma == 0:
            self.position += len(x)
            return x
        out = []
        for i in range(len(x)):
            key = str(ids[i]) if ids is not None else f"#{self.position}"
            g = torch.Generator().manual_seed(noise_seed(self.seed, self.sigma, key))
            noise = torch.randn(x[i].shape, generator=g, dtype=torch.float32) * self.sigma
            out.append(x[i] + noise.to(x.device, x.dtype))
            self.position += 1
        return torch.stack(out)

    def __call__(self, batchdata: dict, device=None, non_blocking: bool = False, **kwargs):
        ids = batchdata.get("id")
        if isinstance(ids, str):
            ids = [ids]
        image = self.noisy(batchdata["image"], ids).to(device=device, non_blocking=non_blocking)
        label = batchdata["label"].to(device=device, non_blocking=non_blocking)
        return image, label


def noise_sweep(
    network: torch.nn.Module,
    loader,
    device: torch.device,
    num_classes: int,
    slice_axis: int = 2,
    sigmas: Sequence[float] = (0.0, 0.01, 0.02, 0.03, 0.04, 0.05),
    seed: int = 0,
    n_bins: int = 15,
    amp: bool = False,
    regions: Sequence[Sequence[int]] | None = None,
) -> list[dict]:
    """DSC and foreground ECE of ``network`` on the volumes of ``loader`` with Gaussian noise of each ``sigma``
    added to the images (paper §5.2.4, Fig. 5). Metrics as in the main evaluation: mean over volumes (and
    foreground classes for DSC, or the evaluation ``regions`` when given, e.g. BraTS ET/TC/WT).

    Returns:
        one row per sigma: ``{"sigma", "dsc", "ece", "cece"}``.
    """
    from monai.engines import SupervisedEvaluator
    from monai.handlers import from_engine

    from pipeline.engines import SliceBatchInferer, postprocessing
    from pipeline.metrics.calibration import CalibrationMetrics
    from pipeline.metrics.segmentation import dice_handler

    rows = []
    for sigma in sigmas:
        evaluator = SupervisedEvaluator(
            device=device, val_data_loader=loader, network=network, prepare_batch=GaussianNoiseBatch(sigma, seed),
            inferer=SliceBatchInferer(spatial_dim=slice_axis), postprocessing=postprocessing(num_classes),
            key_val_metric={"dsc": dice_handler(from_engine(["pred", "label"]), save_details=False, regions=regions)},
            additional_metrics={"calibration": CalibrationMetrics(
                n_bins=n_bins, output_transform=from_engine(["prob", "label"]))},
            amp=amp,
        )
        evaluator.run()
        m = evaluator.state.metrics
        rows.append({"sigma": float(sigma), "dsc": float(m["dsc"]), "ece": float(m["ece"]), "cece": float(m["cece"])})
    return rows
