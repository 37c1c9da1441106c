"""``python -m sparseops``: the latency profiler (see sparseops.profile)."""

import sys

from .profile import main

sys.exit(main())
