import math

import numpy as np
import pytest
import torch

from pipeline.metrics.calibration import (
    CalibrationMetrics,
    bin_edges,
    bin_index,
    brier,
    calibration_statistics,
    cece,
    ece,
    nll,
)

# Five voxels, K = 3. Voxel 0 is background (dropped by the foreground protocol). Voxel 4 is an argmax tie
# between classes 1 and 2, which goes to class 1. No value sits on a bin edge.
PROBS = torch.tensor(
    [
        [0.90, 0.05, 0.05],  # label 0
        [0.12, 0.70, 0.18],  # label 1: pred 1 (0.70) right
        [0.19, 0.19, 0.62],  # label 1: pred 2 (0.62) wrong
        [0.09, 0.09, 0.82],  # label 2: pred 2 (0.82) right
        [0.00, 0.50, 0.50],  # label 2: tie -> pred 1 (0.50) wrong
    ]
).T  # K×N
LABELS = torch.tensor([0, 1, 1, 2, 2])


def test_ece_hand_computed():
    # four kept voxels, each alone in its bin: (|0.70-1| + |0.62-0| + |0.82-1| + |0.50-0|) / 4
    assert ece(PROBS, LABELS) == pytest.approx((0.30 + 0.62 + 0.18 + 0.50) / 4)


def test_cece_hand_computed():
    # p_0 over kept voxels (0.12, 0.19, 0.09, 0.00): 0.12 and 0.09 share bin 1, 0.19 is in bin 2, 0 is in no bin
    sce0 = (abs(0.12 + 0.09 - 0) + abs(0.19 - 0)) / 4
    sce1 = (abs(0.70 - 1) + abs(0.19 - 1) + abs(0.09 - 0) + abs(0.50 - 0)) / 4
    sce2 = (abs(0.18 - 0) + abs(0.62 - 0) + abs(0.82 - 1) + abs(0.50 - 1)) / 4
    assert cece(PROBS, LABELS) == pytest.approx((sce0 + sce1 + sce2) / 3)
    stats = calibration_statistics(PROBS, LABELS)
    assert stats.sce_per_class() == pytest.approx([sce0, sce1, sce2])


def test_per_class_ece_nll_brier_hand_computed():
    stats = calibration_statistics(PROBS, LABELS)
    assert math.isnan(stats.ece_per_class()[0])
    assert stats.ece_per_class()[1:] == pytest.approx([(0.30 + 0.62) / 2, (0.18 + 0.50) / 2])
    p_true = [0.70, 0.19, 0.82, 0.50]
    assert nll(PROBS, LABELS) == pytest.approx(-np.mean(np.log(p_true)))
    kept = PROBS[:, 1:].T.numpy()
    onehot = np.eye(3)[LABELS[1:].numpy()]
    assert brier(PROBS, LABELS) == pytest.approx(((kept - onehot) ** 2).sum(1).mean())


def test_voxels_in_one_bin_are_averaged_before_the_gap():
    # K=2, conf 0.70 right and 0.72 wrong share bin (0.667, 0.733]: |0.71 - 0.5| = 0.21, not (0.30 + 0.72) / 2
    probs = torch.tensor([[0.30, 0.28], [0.70, 0.72]])
    assert ece(probs, torch.tensor([1, 0]), foreground_only=False) == pytest.approx(0.21)


def test_bin_edges_lower_open_upper_closed():
    edges = bin_edges(15)
    assert bin_index(edges, 15).tolist() == [-1] + list(range(15))  # 0 -> no bin; edge_b -> bin b-1
    assert bin_index(torch.tensor([1e-9, 1.0]), 15).tolist() == [0, 14]


def test_value_on_an_edge_goes_to_the_lower_bin():
    e = float(bin_edges(15)[10])  # 2/3
    # voxel A: conf exactly e, correct; voxel B: conf e + 0.01 (the next bin), wrong
    probs = torch.tensor([[1 - e, 1 - e - 0.01], [e, e + 0.01]], dtype=torch.float64)
    labels = torch.tensor([1, 0])
    separate = (abs(e - 1) + abs(e + 0.01)) / 2
    value = ece(probs, labels, foreground_only=False)
    assert value == pytest.approx(separate)
    assert value != pytest.approx(abs((2 * e + 0.01) / 2 - 0.5))


def test_argmax_tie_goes_to_lowest_class():
    probs = torch.tensor([[0.0], [0.5], [0.5]])
    assert ece(probs, torch.tensor([1])) == pytest.approx(0.5)  # pred 1 right: |0.5 - 1|
    assert ece(probs, torch.tensor([2])) == pytest.approx(0.5)  # pred 1 wrong: |0.5 - 0|
    stats = calibration_statistics(probs, torch.tensor([1]))
    assert stats.top[1, :, 2].sum() == 1  # counted as correct for class 1


def test_no_foreground_gives_nan_not_a_crash():
    probs = torch.softmax(torch.randn(3, 4, 4), 0)
    labels = torch.zeros(4, 4, dtype=torch.long)
    for f in (ece, cece, nll, brier):
        assert math.isnan(f(probs, labels))
    assert not math.isnan(ece(probs, labels, foreground_only=False))


def test_foreground_only_false_keeps_background():
    full = ece(PROBS, LABELS, foreground_only=False)
    # adds voxel 0: conf 0.9 right, alone in bin 13
    assert full == pytest.approx((0.10 + 0.30 + 0.62 + 0.18 + 0.50) / 5)


def test_numpy_and_channel_first_labels():
    assert ece(PROBS.numpy(), LABELS.numpy()[None]) == pytest.approx(ece(PROBS, LABELS))


def test_bad_inputs():
    with pytest.raises(ValueError, match="labels have shape"):
        ece(torch.rand(3, 4, 4), torch.zeros(4, 5))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        ece(torch.rand(3, 2), torch.tensor([0, 3]))


def _volume(seed: int, fg: bool = True):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(3, 6, 5, 4, generator=g) * 3, 0)
    labels = torch.randint(0, 3, (1, 6, 5, 4), generator=g) if fg else torch.zeros(1, 6, 5, 4, dtype=torch.long)
    return probs, labels


def test_ignite_metric_per_volume_mean_and_pooled():
    vols = [_volume(0), _volume(1), _volume(2, fg=False)]
    metric = CalibrationMetrics(prefix="test/")
    metric.reset()
    for p, y in vols:
        metric.update(([p], [y]))
    out = metric.compute()
    assert out["test/ece"] == pytest.approx(np.mean([ece(*vols[0]), ece(*vols[1])]))
    assert out["test/cece"] == pytest.approx(np.mean([cece(*vols[0]), cece(*vols[1])]))
    assert out["test/skipped"] == 1
    pooled_p = torch.cat([vols[0][0], vols[1][0]], dim=-1)
    pooled_y = torch.cat([vols[0][1], vols[1][1]], dim=-1)
    assert out["test/ece_pooled"] == pytest.approx(ece(pooled_p, pooled_y))
    assert out["test/cece_pooled"] == pytest.approx(cece(pooled_p, pooled_y))


def test_ignite_metric_accepts_one_hot_labels_batched():
    p, y = _volume(3)
    onehot = torch.nn.functional.one_hot(y[0], 3).permute(3, 0, 1, 2).float()
    metric = CalibrationMetrics()
    metric.reset()
    metric.update((p[None], onehot[None]))
    assert metric.compute()["ece"] == pytest.approx(ece(p, y))


def _distributed_worker(local_rank: int, queue):
    import ignite.distributed as idist

    metric = CalibrationMetrics()
    metric.reset()
    p, y = _volume(10 + idist.get_rank())
    metric.update(([p], [y]))
    queue.put((idist.get_rank(), metric.compute()))


def test_two_process_gloo_reduction_is_exact():
    import ignite.distributed as idist
    import torch.multiprocessing as mp

    queue = mp.get_context("spawn").Queue()
    with idist.Parallel(backend="gloo", nproc_per_node=2) as parallel:
        parallel.run(_distributed_worker, queue)
    results = dict(queue.get(timeout=60) for _ in range(2))
    vols = [_volume(10), _volume(11)]
    expected_mean = np.mean([ece(*v) for v in vols])
    pooled_p = torch.cat([v[0] for v in vols], -1)
    pooled_y = torch.cat([v[1] for v in vols], -1)
    for rank in (0, 1):
        assert results[rank]["ece"] == pytest.approx(expected_mean)
        assert results[rank]["ece_pooled"] == pytest.approx(ece(pooled_p, pooled_y))
