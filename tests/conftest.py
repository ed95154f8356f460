"""Fixtures shared by the test modules that ask for them by name."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """Torch on one thread for the test, as in the subprocesses (OMP_NUM_THREADS=1) a test compares with: the thread
    count changes the rounding of convolutions, so a reference computed here must use the same count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
