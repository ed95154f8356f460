"""``make bench``'s measurements, in-process with one process: the step timer, the bare network's rate, and a whole
row on the embedded dataset with a tiny UNet (the launcher's subprocesses and torchrun rows are not run here)."""

from __future__ import annotations

import time

import pytest
import torch
from ignite.engine import Engine

from pipeline.benchmarks.training import HEADER, StepTimer, bare_rate, measure, row_text
from tests.helpers import tiny_unet_overrides


def test_step_timer_counts_only_the_timed_epochs():
    def step(engine, batch):
        time.sleep(0.002)

    class Batches:  # three batches of 4 slices, each 1 ms late
        def __len__(self):
            return 3

        def __iter__(self):
            for _ in range(3):
                time.sleep(0.001)
                yield {"image": torch.zeros(4, 1, 2, 2)}

    engine = Engine(step)
    timer = StepTimer(torch.device("cpu"), warmup=1)
    timer.attach(engine)
    engine.run(Batches(), max_epochs=3)
    t = timer.totals
    assert t["slices"] == 2 * 3 * 4 and t["iterations"] == 6  # epochs 2 and 3 only
    assert t["step_s"] >= 6 * 0.002 and t["data_s"] >= 6 * 0.001
    assert t["data_s"] + t["step_s"] <= t["wall_s"]


def test_bare_rate_is_slices_per_second():
    net = torch.nn.Conv2d(1, 3, 3, padding=1)
    rate = bare_rate(net, (2, 1, 8, 8), 3, torch.device("cpu"), amp=False, steps=3, warmup=1)
    assert 0 < rate < 1e7
    assert net.weight.grad is None  # measured on a copy


def test_one_process_row(tmp_path):
    row = measure("mni", "ce", "unet", epochs=2, amp=False, bare_steps=2,
                  overrides={"data_dir": str(tmp_path / "mni"), **tiny_unet_overrides()})
    assert row["processes"] == 1 and row["amp"] == "off" and not row["channels_last"]
    assert row["batch_shape"] == [4, 1, 80, 96]  # batch 4 of the mni slices
    p = row["per_process"][0]
    assert (p["slices"], p["iterations"]) == (40, 10)  # one timed epoch: the 40 training slices of mni, batch 4
    assert row["slices_per_s"] == pytest.approx(p["slices"] / p["wall_s"])
    assert row["ratio"] == pytest.approx(row["slices_per_s"] / row["bare_slices_per_s"])
    assert 0 <= row["data_wait"] < 1
    line = row_text(row)
    assert len(line.split()) == len(HEADER.split()) - 2  # "bare fwd+bwd" and "data wait": one column, two words
