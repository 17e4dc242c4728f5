"""``eventfleet rebuild NAME``: rebuild one projection from the store and swap it in, with a progress line."""

from __future__ import annotations

import argparse
import sys

from projections import registry
from workers.config import Settings
from workers.rebuild import Progress, rebuild, typebook
from workers.runtime import lifecycle


def print_progress(name: str) -> Progress:
    """A progress line on stderr: events done of total, rate and ETA (redrawn in place on a terminal)."""
    tty = sys.stderr.isatty()
    shown = [0.0]

    def show(done: int, total: int, seconds: float) -> None:
        if seconds - shown[0] < 1.0 and done < total:
            return
        shown[0] = seconds
        rate = done / seconds if seconds > 0 else 0.0
        eta = (total - done) / rate if rate > 0 else 0.0
        line = (f"rebuild {name}: {done:,}/{total:,} events ({100 * done / max(total, 1):.0f}%), "
                f"{rate:,.0f} events/s, ETA {eta:.0f}s")
        print(("\r" + line) if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)

    return show


async def cmd_rebuild(settings: Settings, args: argparse.Namespace) -> int:
    """``eventfleet rebuild NAME``."""
    projection = registry.get(args.name)
    async with lifecycle.open_pool(settings, min_size=2, max_size=4) as pool:
        store = lifecycle.open_store(pool, settings)
        # A worker of other code seen after this moment keeps the read model's new types pending (typebook).
        started = await typebook.since(pool, settings.lease_seconds)
        result = await rebuild(pool, store, projection, progress=print_progress(projection.name),
                               batch_bytes=settings.read_bytes)
        async with pool.acquire() as conn:
            others = await typebook.settle(conn, projection, started)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    rate = result.events / result.seconds if result.seconds else 0.0
    print(f"rebuilt {result.projection}: {result.events:,} events in {result.seconds:.1f}s "
          f"({rate:,.0f} events/s){', resumed' if result.resumed else ''}; "
          f"{result.caught_up_streams} streams caught up at the swap")
    if others:
        print(f"  types it handles ({typebook.describe(projection.handled_names())}) not recorded: workers of "
              f"other code ran it meanwhile: {', '.join(map(str, others))}; rebuild it again once they stopped")
    else:
        print(f"  types recorded: {typebook.describe(projection.handled_names())}")
    if result.resolved_dead_letters:
        print(f"  {result.resolved_dead_letters} parked dead letters resolved: the rebuild got past their events")
    if result.skipped or result.halted_streams:
        print(f"  {result.skipped} events skipped by failing handlers; "
              f"{len(result.halted_streams)} streams halted: {', '.join(result.halted_streams[:10])}")
    return 0
