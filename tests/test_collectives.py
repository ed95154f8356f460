"""What processes exchange (:mod:`pipeline.collectives`) and a calibration metric in a process without volumes, in
two gloo processes. This module imports little, so that the spawned processes start fast."""

from __future__ import annotations

import pytest
import torch

from pipeline.collectives import broadcast_text, gather_in_rank_order, mean_across
from pipeline.metrics.calibration import CalibrationMetrics, ece


def _volume(seed: int, k: int = 3):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(k, 6, 5, 4, generator=g), 0)
    return p, torch.randint(0, k, (6, 5, 4), generator=g)


def _two_process_worker(local_rank: int, queue):
    import ignite.distributed as idist

    rank = idist.get_rank()
    # rank 1 scores no volume, and the metric does not know the number of classes: it takes rank 0's size
    metric = CalibrationMetrics()
    metric.reset()
    if rank == 0:
        for seed in (1, 2):
            metric.update(([_volume(seed)[0]], [_volume(seed)[1]]))
    result = metric.compute()
    rows = gather_in_rank_order([f"r{rank}a", f"r{rank}b"][: 2 - rank])
    queue.put((rank, result, [r["ece"] for r in metric.volumes] if hasattr(metric, "volumes") else None, rows,
               mean_across({"loss": float(rank + 1)}), broadcast_text(f"name{rank}")))


def test_two_processes_exchange_in_rank_order_and_an_empty_process_takes_part():
    import ignite.distributed as idist
    import torch.multiprocessing as mp

    queue = mp.get_context("spawn").Queue()
    with idist.Parallel(backend="gloo", nproc_per_node=2) as parallel:
        parallel.run(_two_process_worker, queue)
    results = {r[0]: r[1:] for r in (queue.get(timeout=60) for _ in range(2))}
    expected = sum(ece(*_volume(s)) for s in (1, 2)) / 2
    for rank in (0, 1):
        metrics, _, rows, mean, name = results[rank]
        assert metrics["ece"] == pytest.approx(expected, rel=1e-12)
        assert rows == ["r0a", "r0b", "r1a"]
        assert mean == {"loss": 1.5} and name == "name0"
