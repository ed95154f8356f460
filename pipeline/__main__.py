"""``python -m pipeline <command>``."""

import sys

from pipeline.cli import main

if __name__ == "__main__":  # worker processes (``make compare JOBS=n``) import this module without running it
    sys.exit(main())
