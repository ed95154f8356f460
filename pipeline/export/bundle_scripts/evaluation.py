"""What a bundle's ``configs/evaluate.json`` needs beyond MONAI: the MbLS paper's calibration metrics as MONAI
metrics, and per-case CSV files whose columns are named by class.

MONAI's ``CalibrationError`` (which the evaluation also reports) bins each class channel over every voxel. The
paper's (Murugesan et al., MedIA 2024, Eqs. 8-9) keep only the voxels whose ground-truth label is foreground
(not class 0), with the softmax still over all K classes, and 15 equal-width bins where a value ``v`` is in bin
``b`` when ``lower_b < v <= upper_b``:

* **foreground ECE** (top-label): ``Σ_b (n_b / N) |mean confidence_b − accuracy_b|``, the confidence being the
  largest probability and the accuracy ``[argmax == label]`` (argmax ties go to the lowest class);
* **CECE** (classwise): for each class ``j`` the same sum over the bins of ``p_j`` against ``[label == j]``, then
  the mean over all K classes.

One value per volume, then the mean over volumes (a volume without foreground voxels has none and is skipped).
These are the definitions behind the ``ece`` and ``cece`` of the bundle's ``eval_metrics``; the MbLS pipeline's
tests check that they give its values.

>>> p = torch.tensor([[[0.1, 0.8]], [[0.9, 0.2]]]).reshape(1, 2, 2)  # B×K×N: 2 classes, 2 voxels
>>> y = torch.tensor([[[0.0, 1.0]], [[1.0, 0.0]]]).reshape(1, 2, 2)  # one-hot: voxel 0 is class 1, voxel 1 class 0
>>> round(float(ForegroundECE()(p, y)[0, 0]), 6)  # only voxel 0 is foreground: confidence 0.9, correct
0.1
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from monai.handlers import MetricsSaver
from monai.metrics import CumulativeIterationMetric
from monai.metrics.utils import do_metric_reduction


def _binned_gap(values: torch.Tensor, targets: torch.Tensor, n_bins: int) -> torch.Tensor:
    """``Σ_b |Σ_{v in b} v − Σ_{v in b} target|`` over equal-width ``(lower, upper]`` bins (values ``<= 0`` in
    none)."""
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64, device=values.device)
    index = (torch.bucketize(values, edges, right=False) - 1).clamp(max=n_bins - 1)
    inside = index >= 0
    index, values, targets = index[inside], values[inside], targets[inside]
    sums = torch.zeros(n_bins, dtype=torch.float64, device=values.device).index_add_(0, index, values)
    hits = torch.zeros(n_bins, dtype=torch.float64, device=values.device).index_add_(0, index, targets)
    return (sums - hits).abs().sum()


class ForegroundECE(CumulativeIterationMetric):
    """The paper's foreground ECE (``classwise=False``) or CECE (``classwise=True``) of each volume.

    Called with ``y_pred`` probabilities ``B×K×spatial`` and ``y`` the one-hot ground truth ``B×K×spatial``
    (MONAI's usual metric inputs); :meth:`aggregate` gives the mean over volumes, skipping volumes without
    foreground.

    Args:
        num_bins: the number of equal-width bins (the paper's 15).
        classwise: CECE instead of the top-label ECE.
    """

    def __init__(self, num_bins: int = 15, classwise: bool = False) -> None:
        super().__init__()
        self.num_bins, self.classwise = int(num_bins), bool(classwise)

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs) -> torch.Tensor:
        if y_pred.shape != y.shape or y_pred.ndim < 3:
            raise ValueError(f"expected probabilities and a one-hot label of one shape B×K×spatial, got "
                             f"{tuple(y_pred.shape)} and {tuple(y.shape)}")
        out = []
        for p, onehot in zip(y_pred, y):
            k = p.shape[0]
            p, labels = p.reshape(k, -1).double(), onehot.reshape(k, -1).argmax(0)
            keep = labels != 0
            p, labels = p[:, keep], labels[keep]
            n = labels.numel()
            if n == 0:
                out.append(torch.tensor(float("nan"), dtype=torch.float64))
                continue
            if self.classwise:
                truth = torch.zeros_like(p).scatter_(0, labels[None], 1.0)
                value = torch.stack([_binned_gap(p[j], truth[j], self.num_bins) for j in range(k)]).mean() / n
            else:
                confidence, predicted = p.max(0)
                value = _binned_gap(confidence, (predicted == labels).double(), self.num_bins) / n
            out.append(value.cpu())
        return torch.stack(out).reshape(-1, 1)

    def aggregate(self, reduction: str = "mean"):
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError("no volume was evaluated")
        return do_metric_reduction(data, reduction)[0]


class NamedMetricsSaver(MetricsSaver):
    """MONAI's ``MetricsSaver`` whose per-case files ``<metric>_raw.csv`` name their columns by class
    (``filename,CSF,GM,WM,mean``) instead of ``class0, class1, …``.

    Args:
        class_names: ``{metric name: [column names]}`` for the metrics of ``metric_details``; a metric not listed
            keeps MONAI's names.
        **kwargs: ``MetricsSaver``'s arguments.
    """

    def __init__(self, class_names: dict[str, Sequence[str]], **kwargs) -> None:
        super().__init__(**kwargs)
        self.class_names = {k: [str(c) for c in v] for k, v in class_names.items()}

    def __call__(self, engine) -> None:
        super().__call__(engine)
        for metric, names in self.class_names.items():
            path = os.path.join(self.save_dir, f"{metric}_raw.csv")
            if not os.path.isfile(path):
                continue
            with open(path) as f:
                lines = f.read().split("\n")
            header = lines[0].split(self.deli)
            if len(header) != len(names) + 2:  # filename, one column per class, mean
                raise ValueError(f"{path}: {len(header) - 2} class columns, but {len(names)} class names given "
                                 f"({', '.join(names)})")
            lines[0] = self.deli.join([header[0], *names, header[-1]])
            with open(path, "w") as f:
                f.write("\n".join(lines))
