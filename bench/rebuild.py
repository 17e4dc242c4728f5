"""Rebuild rate against the raw ceiling of reading the same events with ``read_all``, in one run.

    python -m bench.rebuild [--events 200000] [--batch 5000] [--rounds 2]

Seeds a fresh schema (dropped at the end) with order lives (placed with items, then paid, shipped or
cancelled) until it holds ``--events`` events. Then, ``--rounds`` times and alternating so drift of this
shared machine hits both sides alike: read every event with ``EventStore.read_all`` in batches of
``--batch`` (decoded, as the rebuild reads them: the ceiling), and rebuild each orders projection
(``order_summary``, ``customer_stats``) from scratch, swap included. Prints events/s of each and the
ratio of every rebuild to the mean read rate. Database: ``EVENTFLEET_DATABASE_URL``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import functools
import os
import random
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any, TypeVar

import asyncpg

from eventfleet.examples.orders.events import LineItem, OrderCancelled, OrderPaid, OrderPlaced, OrderShipped
from eventfleet.examples.orders.projections import CustomerStats, OrderSummary
from projections.base import Projection
from store import NO_STREAM, EventStore, Position, TransientError, VersionConflict, db, names
from workers import admin, rebuild
from workers.config import DEFAULT_DATABASE_URL

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
T = TypeVar("T")


def order_life(i: int, rng: random.Random) -> list[Any]:
    """An order of one to four events, like the load's."""
    order_id, customer_id = f"o{i}", f"c{rng.randrange(5000)}"
    items = tuple(LineItem(f"p{k}", f"Product {k}", f"SKU-{k}", rng.randint(1, 3), Decimal("9.99"))
                  for k in range(rng.randint(1, 3)))
    total = sum((item.unit_price * item.quantity for item in items), Decimal(0))
    events: list[Any] = [OrderPlaced(order_id, customer_id, items, total, Decimal(0), total, T0)]
    if rng.random() < 0.15:
        return [*events, OrderCancelled(order_id, customer_id, "changed mind", T0)]
    if rng.random() < 0.85:
        events.append(OrderPaid(order_id, customer_id, total, T0))
        if rng.random() < 0.8:
            events.append(OrderShipped(order_id, customer_id, "ups", T0))
    return events


async def seed(store: EventStore, events: int, writers: int = 4) -> int:
    """Append order lives until ``events`` are stored, 200 streams per transaction, ``writers`` at once."""
    rng = random.Random(7)
    batches: list[list[tuple[str, list[Any], int]]] = []
    written, i = 0, 0
    while written < events:
        batch: list[tuple[str, list[Any], int]] = []
        while len(batch) < 200 and written < events:
            life = order_life(i, rng)[: events - written]
            batch.append((f"order-o{i}", life, NO_STREAM))
            written, i = written + len(life), i + 1
        batches.append(batch)

    async def writer(share: list[list[tuple[str, list[Any], int]]]) -> None:
        for batch in share:
            while True:
                try:
                    await store.append_batch(batch)
                    break
                except TransientError:
                    await asyncio.sleep(1)  # Postgres restarted (other people's fault tests): again
                except VersionConflict:
                    break  # the lost acknowledgement was of a commit

    await asyncio.gather(*(writer(batches[w::writers]) for w in range(writers)))
    return written


async def read_ceiling(store: EventStore, batch: int) -> tuple[int, float]:
    """Read (and decode) every event with read_all; return (events, seconds)."""
    started, count, cursor = time.perf_counter(), 0, Position.START
    while events := await store.read_all(cursor, limit=batch):
        count += len(events)
        cursor = events[-1].position
    return count, time.perf_counter() - started


async def fresh_rebuild(pool: db.Pool, store: EventStore, projection: type[Projection],
                        batch: int, progress: rebuild.Progress | None = None) -> rebuild.RebuildResult:
    """A rebuild from scratch (a shadow left by a run a restart cut short is dropped first)."""
    shadow = rebuild.shadow_schema(store.schema, projection.name)
    await pool.execute(f"DROP SCHEMA IF EXISTS {names.quote(shadow)} CASCADE")
    return await rebuild.rebuild(pool, store, projection, batch_size=batch, progress=progress)


async def analyze(pool: db.Pool) -> None:
    """VACUUM and ANALYZE the seeded events, as autovacuum would have on a store in service (it is off on this
    machine's cluster): without it the first rebuild to read every row sets their hint bits, and one round of
    bench.typefilter at 300,000 events read all types in 176.8 s against 12.6 s in the next."""
    async with db.translate_errors():
        await pool.execute("VACUUM (ANALYZE) events")


async def redo_on_restart(measure: Callable[[], Awaitable[T]]) -> T:
    """Run a measurement; if Postgres restarts under it (others' fault tests), wait and run it again."""
    while True:
        try:
            return await measure()
        except TransientError as exc:
            print(f"  (Postgres went away: {exc}; measuring again)")
            await asyncio.sleep(3)


async def main(args: argparse.Namespace) -> None:
    dsn = os.environ.get("EVENTFLEET_DATABASE_URL", DEFAULT_DATABASE_URL)
    schema = f"bench_rebuild_{uuid.uuid4().hex[:8]}"
    await admin.run_migrate(dsn, schema)
    try:
        async with db.create_pool(dsn, schema, min_size=2, max_size=6) as pool:
            store = EventStore(pool, schema=schema)
            started = time.perf_counter()
            total = await seed(store, args.events)
            print(f"seeded {total:,} events in {time.perf_counter() - started:.1f}s ({schema})")
            await redo_on_restart(lambda: analyze(pool))
            reads: list[float] = []
            rebuilds: dict[str, list[float]] = {}
            for round_ in range(1, args.rounds + 1):
                for projection in (OrderSummary, CustomerStats):
                    count, seconds = await redo_on_restart(lambda: read_ceiling(store, args.batch))
                    reads.append(count / seconds)
                    print(f"round {round_}: read_all   {count:,} events in {seconds:.2f}s = {count / seconds:,.0f}/s")
                    result = await redo_on_restart(functools.partial(fresh_rebuild, pool, store, projection,
                                                                     args.batch))
                    rate = result.events / result.seconds
                    rebuilds.setdefault(projection.name, []).append(rate)
                    print(f"round {round_}: rebuild {projection.name:<14} {result.events:,} events in "
                          f"{result.seconds:.2f}s = {rate:,.0f}/s")
            ceiling = statistics.mean(reads)
            print(f"\nread_all ceiling (mean of {len(reads)}): {ceiling:,.0f} events/s")
            for name, rates in rebuilds.items():
                rate = statistics.mean(rates)
                print(f"rebuild {name:<14} (mean of {len(rates)}): {rate:,.0f} events/s = "
                      f"{100 * rate / ceiling:.0f}% of the read ceiling (target >= 50%)")
    finally:
        await drop_schema(dsn, schema)


async def drop_schema(dsn: str, schema: str) -> None:
    """Drop the bench schema, waiting out a Postgres restart (others may run fault tests meanwhile)."""
    for _ in range(30):
        try:
            conn = await asyncpg.connect(dsn)
        except (OSError, asyncpg.PostgresError):
            await asyncio.sleep(2)
            continue
        try:
            # The bench's shadows go too: a rebuild cut short by a restart leaves its shadow behind.
            for row in await conn.fetch("SELECT nspname FROM pg_namespace WHERE nspname LIKE $1", f"{schema}\\_%"):
                await conn.execute(f'DROP SCHEMA IF EXISTS "{row["nspname"]}" CASCADE')
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()
        return
    print(f"could not drop schema {schema}; drop it by hand")


def cli() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.rebuild", description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=rebuild.BATCH_SIZE)
    parser.add_argument("--rounds", type=int, default=2)
    asyncio.run(main(parser.parse_args()))


if __name__ == "__main__":
    cli()
