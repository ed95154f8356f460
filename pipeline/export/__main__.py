"""``python -m pipeline.export <bundle>`` (``make verify-bundle NAME=<bundle>``): verify an exported bundle."""

import sys

from pipeline.export.verify import main

sys.exit(main())
