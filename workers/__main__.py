"""``python -m workers``: the eventfleet command line."""

from __future__ import annotations

import sys

from workers.cli import main

sys.exit(main())
