"""A reactor's rate against a projection's over the same events, and deadlines fired against plain appends.

    python -m bench.reactors [--orders 3000] [--deadlines 10000] [--batch 200] [--writers 8] [--rounds 2]

One run, so each ratio compares figures measured seconds apart on the same noisy machine. In-process, no
broker: both sides go through the worker's exactly-once path (``checkpoints.apply_batch`` in transactions of
``--batch`` events, one after another), as a consumer applies its batches.

1. Reactor against projection. ``--orders`` orders are placed and paid (2 events each). The projection is
   ``customer_stats`` (set-based upserts). The reactor, ``fulfilment``, acts on the same events: on
   ``OrderPlaced`` it schedules a payment deadline, on ``OrderPaid`` it cancels it and ships the order through
   the repository (a load and an append of a follow-up, inside the batch's transaction). Each round resets
   both (checkpoints, read model, deadlines, and the follow-ups are kept: a replay of the same causes would
   append nothing, so each round writes new orders). Target: the reactor at >= 50% of the projection's rate.
2. Deadlines. ``--deadlines`` orders are placed; ``payment_timeout`` schedules one deadline each; all are made
   due at once, and one worker's firing of every partition (a ``Firing`` per partition, the worker's two
   catch-ups' worth of concurrency: ``--writers`` at once) cancels each order through the repository.
   Against it: ``--writers`` writers appending the same events (an ``OrderCancelled`` to each order, at its
   known version) with ``EventStore.append``. Target: firing at >= 50% of the appends' rate.

Servers: ``EVENTFLEET_DATABASE_URL`` (default the test database) and nothing else.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal

from eventfleet.examples.orders import orders
from eventfleet.examples.orders.events import OrderCancelled, OrderPaid, OrderPlaced
from eventfleet.examples.orders.projections import CustomerStats
from eventfleet.examples.orders.reactors import PaymentTimeout
from projections.base import handles
from projections.reactor import Effects, Reactor
from store import NO_STREAM, EventStore, RecordedEvent, db
from store.event_store import record_from_row
from store.partitions import DEFAULT_PARTITIONS
from workers import admin
from workers.projector import checkpoints, deadlines
from workers.runtime import tuning

DATABASE_URL = os.environ.get("EVENTFLEET_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
TARGET = 0.5


class Fulfilment(Reactor):
    """Schedules a payment deadline at placement; at payment cancels it and ships through the repository."""

    name = "fulfilment"

    @handles(OrderPlaced)
    async def placed(self, fx: Effects, event: RecordedEvent) -> None:
        await fx.schedule(event.recorded_at + dt.timedelta(hours=1), event.stream_id)

    @handles(OrderPaid)
    async def paid(self, fx: Effects, event: RecordedEvent) -> None:
        await fx.cancel(event.stream_id)
        await fx.execute(event.stream_id, orders.Order, orders.ship("bench"))


def placed(order: str) -> OrderPlaced:
    item = orders.LineItem("p1", "Product 1", "SKU-1", 1, Decimal("10.00"))
    return OrderPlaced(order, f"c{hash(order) % 97}", (item,), Decimal("10.00"), Decimal(0),
                       Decimal("10.00"), dt.datetime.now(dt.UTC))


def paid(order: str) -> OrderPaid:
    return OrderPaid(order, f"c{hash(order) % 97}", Decimal("10.00"), dt.datetime.now(dt.UTC))


def cancelled(order: str) -> OrderCancelled:
    return OrderCancelled(order, f"c{hash(order) % 97}", "bench", dt.datetime.now(dt.UTC))


@asynccontextmanager
async def deployment() -> AsyncIterator[EventStore]:
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    await admin.run_migrate(DATABASE_URL, schema, partitions=DEFAULT_PARTITIONS)
    try:
        async with db.create_pool(DATABASE_URL, schema, min_size=2, max_size=12) as pool:
            yield EventStore(pool, schema=schema)
    finally:
        conn = await db.connect(DATABASE_URL, schema)
        try:
            await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        finally:
            await conn.close()


async def write(store: EventStore, streams: list[str], events: list[list[object]], writers: int,
                expected: int = NO_STREAM) -> float:
    """Append each stream's events with ``writers`` tasks; return the seconds it took."""
    queue = iter(zip(streams, events, strict=True))

    async def writer() -> None:
        for stream_id, batch in queue:
            await store.append(stream_id, batch, expected)

    started = time.perf_counter()
    await asyncio.gather(*(writer() for _ in range(writers)))
    return time.perf_counter() - started


async def read_since(store: EventStore, streams: list[str]) -> list[RecordedEvent]:
    rows = await store.pool.fetch(
        "SELECT global_position, event_id, stream_id, version, event_type, data, metadata, recorded_at, "
        "transaction_id FROM events WHERE stream_id = ANY($1) ORDER BY global_position", streams)
    return [record_from_row(r) for r in rows]


async def apply_all(store: EventStore, projection: CustomerStats | Reactor, events: list[RecordedEvent],
                    batch: int) -> float:
    """Apply the events in batches through the exactly-once path; return events per second."""
    started = time.perf_counter()
    for start in range(0, len(events), batch):
        await checkpoints.apply_batch(store, projection, events[start:start + batch])
    return len(events) / (time.perf_counter() - started)


async def reactor_against_projection(store: EventStore, orders_: int, batch: int, writers: int,
                                     rounds: int) -> list[tuple[float, float]]:
    results = []
    for round_ in range(rounds):
        ids = [f"r{round_}-{i}" for i in range(orders_)]
        streams = [f"order-{i}" for i in ids]
        await write(store, streams, [[placed(i), paid(i)] for i in ids], writers)
        events = await read_since(store, streams)
        projection = await apply_all(store, CustomerStats(), events, batch)
        reactor = Fulfilment()
        reactor.bind(store, await store.partitions())
        reacting = await apply_all(store, reactor, events, batch)
        shipped = await store.pool.fetchval(
            "SELECT count(*) FROM events WHERE stream_id = ANY($1) AND event_type LIKE 'OrderShipped%'", streams)
        if shipped != orders_:
            raise RuntimeError(f"the reactor shipped {shipped} of {orders_} orders")
        results.append((projection, reacting))
        print(f"  round {round_ + 1}: projection {projection:,.0f} events/s, reactor {reacting:,.0f} events/s "
              f"({reacting / projection:.2f})")
    return results


async def deadlines_against_appends(store: EventStore, count: int, writers: int) -> tuple[float, float]:
    ids = [f"d-{i}" for i in range(count)]
    streams = [f"order-{i}" for i in ids]
    await write(store, streams, [[placed(i)] for i in ids], writers)
    timeout = PaymentTimeout()
    partitions = await store.partitions()
    timeout.bind(store, partitions)
    events = await read_since(store, streams)
    for start in range(0, len(events), 500):
        await checkpoints.apply_batch(store, timeout, events[start:start + 500])
    await store.pool.execute("UPDATE deadlines SET due_at = clock_timestamp() - interval '1 second'")
    limit = asyncio.Semaphore(writers)

    async def fire(partition: int) -> int:
        async with limit:
            return (await deadlines.Firing(store, timeout, partition).round()).fired

    started = time.perf_counter()
    fired = sum(await asyncio.gather(*(fire(p) for p in range(partitions))))
    firing = fired / (time.perf_counter() - started)
    if fired != count:
        raise RuntimeError(f"{fired} of {count} deadlines fired")
    plain_ids = [f"a-{i}" for i in range(count)]
    plain = [f"order-{i}" for i in plain_ids]
    await write(store, plain, [[placed(i)] for i in plain_ids], writers)
    seconds = await write(store, plain, [[cancelled(i)] for i in plain_ids], writers, expected=0)
    return firing, count / seconds


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


async def run(args: argparse.Namespace) -> None:
    tuning.pin_mmap_threshold()
    tuning.tune_gc()
    print(f"command: python -m bench.reactors {' '.join(sys.argv[1:])}")
    async with deployment() as store:
        print(f"1. reactor (fulfilment) against projection (customer_stats), {2 * args.orders:,} events, "
              f"batches of {args.batch}:")
        rounds = await reactor_against_projection(store, args.orders, args.batch, args.writers, args.rounds)
        ratio = statistics.median(r / p for p, r in rounds)
        print(f"   reactor / projection: {ratio:.2f} (median of {len(rounds)})  "
              f"{verdict(ratio >= TARGET)} (target >= {TARGET})")
    async with deployment() as store:
        print(f"2. {args.deadlines:,} deadlines due at once against {args.writers} writers' plain appends of the "
              "same events:")
        firing, appending = await deadlines_against_appends(store, args.deadlines, args.writers)
        print(f"   fired {firing:,.0f}/s, appended {appending:,.0f}/s: {firing / appending:.2f}  "
              f"{verdict(firing / appending >= TARGET)} (target >= {TARGET})")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.reactors", description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", type=int, default=3000)
    parser.add_argument("--deadlines", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
