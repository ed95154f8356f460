"""Checkpoint sensitivity: the test volumes scored with the weights of the last training epoch as well.

The run's reported model is the best checkpoint by validation DSC (the paper's protocol); which checkpoint is
tested moves calibration as much as a loss can, so every run also scores its last-epoch weights on the same test
volumes (DSC, ASD, ECE, CECE, NLL, Brier of the uncalibrated network; no post-hoc fitting). A comparison then
reports its verdict for both (``pipeline.compare``). Logged as ``test_last/<metric>`` and ``per_volume_last.csv``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch

from pipeline.engines import create_evaluator, run_engine
from pipeline.evaluation.results import summarise

LAST_PREFIX = "test_last/"
LAST_METRICS = ("dsc", "asd", "ece", "cece", "nll", "brier")


def evaluate_last_weights(network: torch.nn.Module, state: Mapping, loader, device, class_names: Sequence[str],
                          volume_ids: Sequence[str], slice_axis: int = 2, n_bins: int = 15, amp: bool = False,
                          region_names: Sequence[str] | None = None,
                          regions: Sequence[Sequence[int]] | None = None) -> dict:
    """Score a copy of ``network`` holding ``state`` (the last epoch's weights) on the volumes of ``loader``.

    Returns:
        ``{"mean": {metric: value}, "per_volume": [{"id", "dsc_<region>", "asd_<region>", "ece", "cece",
        "nll", "brier"}, …]}`` (means over volumes as in the main evaluation).
    """
    net = copy.deepcopy(network)
    net.load_state_dict(state)
    net.eval()
    evaluator = create_evaluator(net, loader, device, len(class_names), slice_axis, prefix="", amp=amp,
                                 n_bins=n_bins, regions=regions, surface_distance=True)
    run_engine(evaluator)
    res = summarise(evaluator, class_names, volume_ids, prefix="", region_names=region_names)
    keep = ("id", "ece", "cece", "nll", "brier")
    rows = [{k: v for k, v in row.items() if k in keep or k.startswith(("dsc_", "asd_"))}
            for row in res["per_volume"]]
    return {"mean": {k: float(res["mean"][k]) for k in LAST_METRICS}, "per_volume": rows}
