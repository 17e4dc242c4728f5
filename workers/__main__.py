"""``python -m workers``: the eventfleet command line."""

from __future__ import annotations

import sys

from eventfleet.cli import main

sys.exit(main())
