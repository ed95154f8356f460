"""The shape every per-volume Ignite metric of the pipeline shares: one value per volume, the mean over volumes.

A volume whose value is ``nan`` (e.g. no ground-truth foreground for the paper's ECE) is skipped by the mean, never
counted as 0. Sums and counts are all-reduced across processes, so the means are exact in a multi-process
evaluation; the per-volume rows of every process, gathered in rank order, go to
``engine.state.metric_details[name]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from ignite.engine import Engine
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced

from pipeline.collectives import gather_in_rank_order


def put_details(engine: Engine, name: str, details) -> None:
    """Store ``details`` under ``engine.state.metric_details[name]`` (creating the dict on first use)."""
    if not isinstance(getattr(engine.state, "metric_details", None), dict):
        engine.state.metric_details = {}
    engine.state.metric_details[name] = details


class PerVolumeMetric(Metric):
    """Ignite metric: a row of values per volume (:attr:`KEYS`), then the NaN-skipping mean over volumes.

    Subclasses implement :meth:`volume_row` (one volume's values, a dict with at least :attr:`KEYS`) and may
    extend :meth:`reset`, :meth:`update` and :meth:`compute` for state of their own. The engine output is mapped
    by ``output_transform`` to a tuple of per-volume sequences (``B×…`` tensors or lists), zipped item by item.

    Args:
        prefix: prepended to every result name (e.g. ``"test/"``).
        output_transform: maps ``engine.state.output`` to the tuple :meth:`volume_row` takes.
        device: where the sums live (``cpu`` by default; all-reduced across processes).
    """

    KEYS: tuple[str, ...] = ()

    def __init__(self, prefix: str = "", output_transform: Callable = lambda x: x,
                 device: str | torch.device = "cpu") -> None:
        self.prefix = prefix
        super().__init__(output_transform=output_transform, device=device, metrics_result_mode="flatten",
                         skip_unrolling=True)

    def volume_row(self, *item) -> dict:  # pragma: no cover - defined by every subclass
        raise NotImplementedError

    @reinit__is_reduced
    def reset(self) -> None:
        self._sum = torch.zeros(len(self.KEYS), dtype=torch.float64, device=self._device)
        self._num = torch.zeros(len(self.KEYS), dtype=torch.float64, device=self._device)
        self.volumes: list[dict] = []

    @reinit__is_reduced
    def update(self, output: Sequence) -> None:
        for item in zip(*output):
            row = self.volume_row(*item)
            values = torch.tensor([row.get(k, math.nan) for k in self.KEYS], dtype=torch.float64)
            ok = ~torch.isnan(values)
            self._sum += torch.where(ok, values, torch.zeros_like(values)).to(self._device)
            self._num += ok.double().to(self._device)
            self.volumes.append(row)

    def means(self) -> dict[str, float]:
        """``{key: mean over the volumes that have a value}`` (``nan`` where none has), after reduction."""
        return {k: float(self._sum[i] / self._num[i]) if self._num[i] > 0 else math.nan
                for i, k in enumerate(self.KEYS)}

    def details(self):
        """What goes to ``engine.state.metric_details[name]`` (default: the per-volume rows)."""
        return list(self.volumes)

    def completed(self, engine: Engine, name: str) -> None:
        super().completed(engine, name)
        self.volumes = gather_in_rank_order(self.volumes)  # every process's rows (a no-op in one process)
        put_details(engine, name, self.details())
