"""A loss that pauses one process of a multi-process run for a few seconds at a known training step, so that a test
can signal that process there (``tests/test_distributed_faults.py``)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from pipeline.losses import CrossEntropy

#: environment: the marker file written when the pause starts, the rank that pauses, its call, the pause in seconds
MARKER_ENV, RANK_ENV, AT_ENV, PAUSE_ENV = ("MBLS_TEST_PAUSE_MARKER", "MBLS_TEST_PAUSE_RANK", "MBLS_TEST_PAUSE_AT",
                                           "MBLS_TEST_PAUSE_S")


class PausingCrossEntropy(CrossEntropy):
    """Cross-entropy. In the process whose ``RANK`` is the environment's :data:`RANK_ENV`, the :data:`AT_ENV`-th call
    (counted from 1) writes the process id to :data:`MARKER_ENV` and sleeps :data:`PAUSE_ENV` seconds, then goes on;
    the other processes wait for it in the next gradient exchange. Without the variables, plain cross-entropy."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def _forward(self, logits, labels):
        self.calls += 1
        marker, at = os.environ.get(MARKER_ENV), os.environ.get(AT_ENV)
        if marker and at and self.calls == int(at) and os.environ.get("RANK") == os.environ.get(RANK_ENV):
            Path(marker).write_text(str(os.getpid()))
            time.sleep(float(os.environ.get(PAUSE_ENV, "4")))
        return super()._forward(logits, labels)
