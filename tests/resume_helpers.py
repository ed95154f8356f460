"""Test helpers for interrupted runs: a loss that stops at a known training step so that a test can kill its process
there, and the command line of a tiny training run on the generated blob data."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from pipeline.losses import CrossEntropy

#: environment of :class:`StallingCrossEntropy`: the marker file it writes, and the call at which it stalls
MARKER_ENV, AT_ENV = "MBLS_TEST_STALL_MARKER", "MBLS_TEST_STALL_AT"
#: environment of ``tests/resume_worker.py``: where else it stalls (``write-last:N``, ``write-best:N``, ``evaluation``)
STALL_ENV = "MBLS_TEST_STALL_IN"
WORKER = Path(__file__).resolve().parent / "resume_worker.py"


class StallingCrossEntropy(CrossEntropy):
    """Cross-entropy. When the environment sets :data:`MARKER_ENV` and :data:`AT_ENV`, its ``AT``-th call (counted
    from 1 in this process) writes the process id to the marker file (``<marker>.rank<r>`` under torchrun) and sleeps,
    mid-epoch, until it is killed.
    Without them it is plain cross-entropy, so a run under test and its reference compute the same."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def _forward(self, logits, labels):
        self.calls += 1
        marker, at = os.environ.get(MARKER_ENV), os.environ.get(AT_ENV)
        if marker and at and self.calls == int(at):
            rank = os.environ.get("RANK")  # under torchrun: one marker per process, <marker>.rank<r>
            Path(marker if rank is None else f"{marker}.rank{rank}").write_text(str(os.getpid()))
            time.sleep(600)
        return super()._forward(logits, labels)


def train_command(config_dir: Path, data_dir: Path, runs: Path, run_name: str, epochs: int,
                  overrides: dict, worker: bool = False) -> list[str]:
    """``python -m pipeline train`` of a tiny blob run (stalling cross-entropy) with ``overrides`` as ``--set``;
    ``worker``: the same through ``tests/resume_worker.py`` (which can also stall in a write or the evaluation)."""
    sets = [f"{k}={v}" for k, v in {"data_dir": data_dir, "output_dir": runs, **overrides}.items()]
    start = [sys.executable, str(WORKER)] if worker else [sys.executable, "-m", "pipeline", "train"]
    return [*start, "--dataset", "blobs", "--loss", "ce", "--epochs", str(epochs),
            "--run-name", run_name, "--quiet", *[a for s in sets for a in ("--set", s)]]
