"""One training run on the generated blob data, started by ``torchrun`` from ``tests/test_distributed.py``.

Each process runs :func:`pipeline.training.run_training` as ``python -m pipeline train`` does, and writes to
``<out>/rank<r>.json`` what it saw: the (epoch, volume id, slice) of every training item, and after each validation
the evaluator's means, per-volume rows and gathered volume ids.

Usage: ``torchrun --nproc_per_node=2 tests/distributed_worker.py <out> <data dir> <config dir> <backbone>
<json overrides>``
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from ignite.engine import Events

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pipeline.training as training  # noqa: E402
from pipeline.config import load_config  # noqa: E402


def plain(value):
    """JSON-friendly: tensors as lists."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items() if k != "pooled"}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def main(out: str, data_dir: str, config_dir: str, backbone: str, overrides: str) -> None:
    rank = int(os.environ["RANK"])
    record = {"rank": rank, "seen": [], "validations": []}
    create_trainer, create_evaluator = training.create_trainer, training.create_evaluator

    def recording_trainer(*args, **kwargs):
        trainer = create_trainer(*args, **kwargs)

        def seen(engine):
            batch = engine.state.batch
            record["seen"] += [[engine.state.epoch, i, int(s)] for i, s in zip(batch["id"], batch["slice"])]

        trainer.add_event_handler(Events.ITERATION_STARTED, seen)
        return trainer

    def recording_evaluator(*args, **kwargs):
        evaluator = create_evaluator(*args, **kwargs)

        def validated(engine):
            record["validations"].append({
                "epoch": engine.state.epoch, "metrics": plain(engine.state.metrics),
                "ids": list(getattr(engine.state, "volume_ids", [])),
                "details": {k: plain(v) for k, v in engine.state.metric_details.items()}})

        evaluator.add_event_handler(Events.COMPLETED, validated)
        return evaluator

    training.create_trainer, training.create_evaluator = recording_trainer, recording_evaluator
    options = {"data_dir": data_dir, "output_dir": str(Path(out) / "runs"), **json.loads(overrides)}
    parser = load_config("blobs", "ce", backbone, overrides=options, config_dir=Path(config_dir))
    result = training.run_training(parser, run_name="ddp", quiet=True)
    record.update(primary=result["primary"], run_id=result["run_id"])
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(*sys.argv[1:6])
