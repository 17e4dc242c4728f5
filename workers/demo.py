"""``eventfleet demo``, interim version until the relay and workers exist: migrate, load, show the store.

The operations issue grows this into the full demo (relay and workers, lag, read models checked against
a replay of the store).
"""

from __future__ import annotations

import argparse

from store import EventStore, db
from store.queries import QUERIES
from workers import commands, load
from workers.config import Settings


async def cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    """Migrate the schema, run a seeded writer load of ``--orders`` orders, print what the store holds."""
    applied = await commands.run_migrate(settings.database_url, settings.schema)
    print(f"schema {settings.schema}: " + (f"applied migrations {applied}" if applied else "up to date"))
    async with db.create_pool(settings.database_url, settings.schema, min_size=1, max_size=9) as pool:
        store = EventStore(pool, schema=settings.schema, max_payload_bytes=settings.max_payload_bytes)
        report = await load.run_load(store, args.orders, concurrency=8, seed=1)
        await store.notifier.flush()
        async with db.translate_errors():
            rows = await pool.fetch(QUERIES["count_events_by_type"])
    print(f"load: {report.events} events for {report.orders} orders in {report.seconds:.2f}s"
          f" ({report.rate:.0f} events/s, {report.conflicts} version conflicts retried)")
    print("the store now holds:")
    for row in rows:
        print(f"  {row['event_type']:<22} {row['events']:>8}")
    return 0
