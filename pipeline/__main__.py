"""``python -m pipeline <command>``."""

import os
import sys

from pipeline.cli import main

if __name__ == "__main__":  # worker processes (``make compare JOBS=n``) import this module without running it
    if "TORCHELASTIC_ERROR_FILE" in os.environ:  # a process of `train --nproc n`: its error goes to the launcher
        from torch.distributed.elastic.multiprocessing.errors import record

        main = record(main)
    sys.exit(main())
