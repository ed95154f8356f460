"""``python -m pipeline train`` in a process that a test kills at a chosen instant: the environment's
:data:`STALL_ENV` names it, and the process writes its id to :data:`tests.resume_helpers.MARKER_ENV`'s file and
sleeps there until it is killed.

* ``write-last:N`` / ``write-best:N``: in the middle of the N-th write of ``last.pt`` / of a best-weights file (half
  of its bytes are in the temporary file, the destination is as it was);
* ``evaluation``: when the test evaluation begins, after the last epoch;
* a stall inside an epoch is :class:`tests.resume_helpers.StallingCrossEntropy`'s (``MBLS_TEST_STALL_AT``).

Usage: ``python tests/resume_worker.py <arguments of python -m pipeline train>``
"""

from __future__ import annotations

import io
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import pipeline.checkpoints as checkpoints  # noqa: E402
import pipeline.training as training  # noqa: E402
from pipeline import cli  # noqa: E402
from pipeline.io import atomic_path  # noqa: E402
from tests.resume_helpers import MARKER_ENV, STALL_ENV  # noqa: E402


def stall() -> None:
    Path(os.environ[MARKER_ENV]).write_text(str(os.getpid()))
    time.sleep(600)


def stall_in_write(kind: str, at: int) -> None:
    """Make the ``at``-th :func:`pipeline.checkpoints.save_durably` of ``kind`` (last, best) stop half-way."""
    save, calls = checkpoints.save_durably, []

    def save_durably(obj, path):
        path = Path(path)
        if (path.name == checkpoints.LAST) == (kind == "last"):
            calls.append(path)
            if len(calls) == at:
                buffer = io.BytesIO()
                torch.save(obj, buffer)
                with atomic_path(path) as tmp:
                    tmp.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                    stall()
        return save(obj, path)

    checkpoints.save_durably = save_durably


def main(argv: list[str]) -> int:
    where = os.environ.get(STALL_ENV, "")
    if where.startswith("write-"):
        kind, at = where.removeprefix("write-").split(":")
        stall_in_write(kind, int(at))
    elif where == "evaluation":
        training.evaluate_trained = lambda *args, **kwargs: stall()
    return cli.main(["train", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
