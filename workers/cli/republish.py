"""``eventfleet republish NAME --from POSITION``: a publication publishes again from a global position."""

from __future__ import annotations

import argparse

from workers.config import Settings
from workers.publication.republish import republish
from workers.runtime import lifecycle


def position(value: str) -> int:
    """``--from``: a global position (an event's ``position`` attribute), or ``start`` (every event)."""
    if value == "start":
        return 0
    try:
        found = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a global position: {value!r} (a number, or start)") from None
    if found < 0:
        raise argparse.ArgumentTypeError(f"a global position is 0 or more, not {found}")
    return found


async def cmd_republish(settings: Settings, args: argparse.Namespace) -> int:
    """``eventfleet republish NAME --from POSITION``."""
    async with lifecycle.open_pool(settings, min_size=1, max_size=2) as pool:
        done = await republish(lifecycle.open_store(pool, settings), args.name, args.from_position)
    print(f"republish {done.publication} from position {done.from_position}: {done.streams:,} streams moved back, "
          f"{done.events:,} events to publish again; the workers running it publish them within seconds")
    return 0
