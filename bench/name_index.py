"""What events_name_idx (the index of event names, issue 25 item 4) costs the appends, in one run.

    python -m bench.name_index [--seconds 2] [--rounds 4] [--writers 8]

bench.append's store segments (``append`` of one event at ``--writers`` writers, ``append_batch`` of 100
events at one writer) in a fresh schema (dropped at the end), alternating (ABBA) between the index present and
dropped, so drift of this shared machine hits both sides alike. Prints each side and the ratio.
Database: ``EVENTFLEET_DATABASE_URL``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import uuid
from collections.abc import Awaitable, Callable

import asyncpg

from bench.append import Sample, alternate, store_append, store_batch
from store import EventStore, db
from workers import admin
from workers.config import DEFAULT_DATABASE_URL

_CREATE = "CREATE INDEX IF NOT EXISTS events_name_idx ON events (split_part(event_type, '.v', 1), transaction_id, global_position)"
_DROP = "DROP INDEX IF EXISTS events_name_idx"


def with_index(pool: db.Pool, present: bool, measure: Callable[[], Awaitable[Sample]]) -> Callable[[], Awaitable[Sample]]:
    """The segment ``measure`` with the index made present or absent first (not timed)."""

    async def segment() -> Sample:
        await pool.execute(_CREATE if present else _DROP)
        return await measure()

    return segment


def line(label: str, indexed: Sample, bare: Sample) -> str:
    return (f"{label:<28} with the index {indexed.rate:8.0f} ev/s p50 {indexed.pct(0.5):6.3f} ms"
            f" | without {bare.rate:8.0f} ev/s p50 {bare.pct(0.5):6.3f} ms"
            f" | rate with / without {indexed.rate / bare.rate:5.3f}")


async def main(args: argparse.Namespace) -> None:
    dsn = os.environ.get("EVENTFLEET_DATABASE_URL", DEFAULT_DATABASE_URL)
    schema = f"bench_name_index_{uuid.uuid4().hex[:8]}"
    await admin.run_migrate(dsn, schema)
    try:
        async with db.create_pool(dsn, schema, min_size=args.writers + 1, max_size=args.writers + 1) as pool:
            store = EventStore(pool, schema=schema)
            await store_append(store, args.writers, 1000, 0.3)  # warm-up: plans, caches

            def one(present: bool) -> Callable[[], Awaitable[Sample]]:
                return with_index(pool, present, lambda: store_append(store, args.writers, 1000, args.seconds))

            def batch(present: bool) -> Callable[[], Awaitable[Sample]]:
                return with_index(pool, present, lambda: store_batch(store, args.seconds))

            indexed, bare = await alternate(args.rounds, one(True), one(False))
            print(line(f"append x1, {args.writers} writers", indexed, bare), flush=True)
            indexed, bare = await alternate(args.rounds, batch(True), batch(False))
            print(line("append_batch x100, 1 writer", indexed, bare), flush=True)
            await store.notifier.flush()
    finally:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()


def cli() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.name_index", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--writers", type=int, default=8)
    asyncio.run(main(parser.parse_args()))


if __name__ == "__main__":
    cli()
