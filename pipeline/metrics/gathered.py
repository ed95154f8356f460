"""MONAI's Ignite metric handler, with its per-volume values gathered across processes in rank order.

MONAI's ``Cumulative`` metrics all-gather their buffers when computed, but a process that scored no volume has no
buffer and skips the all-gather, leaving the others waiting (an unpadded split of fewer volumes than processes has
such processes). :class:`GatheredMetricHandler` keeps each process's per-volume values beside the metric's buffer and
gathers them itself, empty lists included; it then reduces them as the metric does. In a one-process run it is
MONAI's handler unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from monai.handlers import IgniteMetricHandler
from monai.metrics import CumulativeIterationMetric
from monai.metrics.utils import do_metric_reduction

from pipeline.collectives import gather_in_rank_order, world_size


class GatheredMetricHandler(IgniteMetricHandler):
    """``IgniteMetricHandler`` for a per-volume ``CumulativeIterationMetric`` whose ``aggregate`` is
    ``do_metric_reduction(buffer, metric.reduction)`` (MONAI's ``DiceMetric`` with ``get_not_nans=False``, this
    project's surface distance).

    With several processes, :meth:`compute` gathers every process's per-volume rows (``B×C`` per batch) in rank
    order, reduces them with the metric's ``reduction`` and, with ``save_details``, puts the gathered ``N×C`` rows in
    ``engine.state.metric_details[name]`` on every process.

    Args:
        metric_fn: the MONAI metric (one row per volume).
        output_transform: maps the engine output to ``(y_pred, y)``.
        save_details: keep the per-volume rows in ``engine.state.metric_details``.

    Raises:
        TypeError: a metric without a ``reduction``.
    """

    def __init__(self, metric_fn: CumulativeIterationMetric, output_transform: Callable = lambda x: x,
                 save_details: bool = True) -> None:
        if not hasattr(metric_fn, "reduction"):
            raise TypeError(f"{type(metric_fn).__name__} has no 'reduction': GatheredMetricHandler reduces the "
                            "gathered rows with it")
        self.rows: list[torch.Tensor] = []
        super().__init__(metric_fn=metric_fn, output_transform=output_transform, save_details=save_details)

    def reset(self) -> None:
        super().reset()
        self.rows = []

    def update(self, output: Sequence[torch.Tensor]) -> None:
        if len(output) != 2:
            raise ValueError(f"output must have length 2 (y_pred, y), got {len(output)}")
        value = self.metric_fn(*output)
        self.rows.append((value[0] if isinstance(value, (tuple, list)) else value).detach().cpu())

    def compute(self):
        if world_size() < 2:
            return super().compute()
        rows = gather_in_rank_order(self.rows)
        if not rows:
            raise RuntimeError(f"{type(self.metric_fn).__name__}: no process scored a volume")
        data = torch.cat(rows, 0)
        result, _ = do_metric_reduction(data.clone(), self.metric_fn.reduction)
        self._is_reduced = True
        if self.save_details:
            if self._engine is None or self._name is None:
                raise RuntimeError("please call the attach() function to connect expected engine first.")
            self._engine.state.metric_details[self._name] = data
        if isinstance(result, torch.Tensor):
            result = result.squeeze()
            if result.ndim == 0:
                result = result.item()
        return result
