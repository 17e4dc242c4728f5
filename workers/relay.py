"""Placeholder: implemented by its issue."""

from __future__ import annotations

import argparse

from workers.config import Settings


async def cmd_relay(settings: Settings, args: argparse.Namespace) -> int:
    """Not implemented yet."""
    print("not implemented yet")
    return 1
