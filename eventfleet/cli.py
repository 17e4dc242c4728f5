"""The ``eventfleet`` command (``import eventfleet`` has checked that its own packages are the ones imported)."""

from __future__ import annotations

from collections.abc import Sequence

from workers.cli import main as _main


def main(argv: Sequence[str] | None = None) -> int:
    """``eventfleet ...``: parse, configure, run the subcommand (``workers.cli.main``)."""
    return _main(argv)
