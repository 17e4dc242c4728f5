"""The hand-written baselines of ``bench.pipeline``: a minimal pipeline, and the ceiling of batched upserts.

    python -m bench.pipeline_handwritten relay --schema S --prefix P      (started by bench.pipeline)
    python -m bench.pipeline_handwritten consumer --schema S --prefix P

Minimal pipeline, as anyone would write it without the guarantees: writers append with one statement (a
CTE inserting the event and its outbox row, payload encoded up front); one relay claims 500 outbox rows
per transaction (``FOR UPDATE SKIP LOCKED``), publishes them pipelined with publisher confirms, deletes
them and commits, polling every 5 ms when idle; one consumer process takes each read model's queue on
its own channel (prefetch 500), batches 100 deliveries per transaction (set-based upserts of the read
model, blind checkpoint upserts, the applied count) and acks them with one multiple-ack after commit.
No duplicate or gap detection, no dead letters, no reconnects, no metrics.

Ceiling: the same transaction per batch from pre-decoded events, no broker at all (``ceiling``).
Servers: ``EVENTFLEET_DATABASE_URL`` and ``EVENTFLEET_AMQP_URL``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import time
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import aio_pika
import msgpack
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from pamqp import commands as spec

from bench.append import BASELINE_APPEND
from eventfleet.examples.orders.events import OrderCancelled, OrderPaid, OrderPlaced, OrderShipped
from store import codec, db
from workers import broker
from workers.config import Settings
from workers.runtime import lifecycle, tuning

#: (stream_id, version, decoded payload): what a consumer has after decoding a delivery.
Event = tuple[str, int, Any]

APPEND = BASELINE_APPEND  # the same one-statement append as bench.append's baseline
CLAIM = """
SELECT o.global_position, e.stream_id, e.version, e.event_type, e.data, e.recorded_at
FROM outbox AS o JOIN events AS e ON e.global_position = o.global_position
ORDER BY o.global_position LIMIT $1
FOR UPDATE OF o SKIP LOCKED
"""
DELETE = "DELETE FROM outbox WHERE global_position = ANY($1::bigint[])"
PLACED = """
INSERT INTO order_summary AS s (order_id, customer_id, status, item_count, total, placed_at, updated_at)
SELECT u.o, u.c, 'placed', u.n, u.t, u.at, u.at
FROM unnest($1::text[], $2::text[], $3::integer[], $4::numeric[], $5::timestamptz[]) AS u(o, c, n, t, at)
ON CONFLICT (order_id) DO UPDATE SET customer_id = EXCLUDED.customer_id, item_count = EXCLUDED.item_count,
    total = EXCLUDED.total, placed_at = EXCLUDED.placed_at
"""
STATUS = """
UPDATE order_summary AS s SET status = u.status, updated_at = u.at
FROM unnest($1::text[], $2::text[], $3::timestamptz[]) AS u(o, status, at) WHERE s.order_id = u.o
"""
STATS = """
INSERT INTO customer_stats AS c (customer_id, orders_placed, orders_cancelled, total_spent)
SELECT * FROM unnest($1::text[], $2::integer[], $3::integer[], $4::numeric[]) ORDER BY 1
ON CONFLICT (customer_id) DO UPDATE SET orders_placed = c.orders_placed + EXCLUDED.orders_placed,
    orders_cancelled = c.orders_cancelled + EXCLUDED.orders_cancelled,
    total_spent = c.total_spent + EXCLUDED.total_spent
"""
CHECKPOINTS = """
WITH moved AS (
    INSERT INTO checkpoints AS c (projection, stream_id, version)
    SELECT $1, * FROM unnest($2::text[], $3::bigint[]) ORDER BY 1
    ON CONFLICT (projection, stream_id) DO UPDATE SET version = EXCLUDED.version, updated_at = clock_timestamp()
)
INSERT INTO projection_status AS s (projection, applied) VALUES ($1, $4)
ON CONFLICT (projection) DO UPDATE SET applied = s.applied + EXCLUDED.applied
"""
READ_MODELS = ("order_summary", "customer_stats")
RELAY_BATCH, CONSUMER_BATCH, PREFETCH, IDLE_POLL = 500, 100, 500, 0.005


# --- the read models, set-based, with checkpoints: the baseline consumer's and the ceiling's transaction ---


async def apply_order_summary(conn: db.Conn, events: Sequence[Event]) -> None:
    placed: dict[str, OrderPlaced] = {}
    status: dict[str, tuple[str, dt.datetime]] = {}
    for _, _, e in events:
        if isinstance(e, OrderPlaced):
            placed[e.order_id] = e
        elif isinstance(e, OrderPaid):
            status[e.order_id] = ("paid", e.paid_at)
        elif isinstance(e, OrderShipped):
            status[e.order_id] = ("shipped", e.shipped_at)
        elif isinstance(e, OrderCancelled):
            status[e.order_id] = ("cancelled", e.cancelled_at)
    if placed:
        rows = list(placed.values())
        await conn.execute(PLACED, [e.order_id for e in rows], [e.customer_id for e in rows],
                           [sum(i.quantity for i in e.items) for e in rows], [e.total for e in rows],
                           [e.placed_at for e in rows])
    if status:
        await conn.execute(STATUS, list(status), [s for s, _ in status.values()], [a for _, a in status.values()])


async def apply_customer_stats(conn: db.Conn, events: Sequence[Event]) -> None:
    sums: dict[str, list[Any]] = {}
    for _, _, e in events:
        if isinstance(e, OrderPlaced | OrderPaid | OrderCancelled):
            row = sums.setdefault(e.customer_id, [0, 0, Decimal(0)])
            if isinstance(e, OrderPlaced):
                row[0] += 1
            elif isinstance(e, OrderCancelled):
                row[1] += 1
            else:
                row[2] += e.amount
    if sums:
        await conn.execute(STATS, list(sums), *([r[k] for r in sums.values()] for k in range(3)))


async def apply_batch(conn: db.Conn, read_model: str, events: Sequence[Event]) -> None:
    """One transaction: the read model's upserts, each stream's checkpoint, the applied count."""
    last: dict[str, int] = {}
    for stream_id, version, _ in events:
        last[stream_id] = max(version, last.get(stream_id, -1))
    async with conn.transaction():
        if read_model == "order_summary":
            await apply_order_summary(conn, events)
        else:
            await apply_customer_stats(conn, events)
        await conn.execute(CHECKPOINTS, read_model, list(last), list(last.values()), len(events))


async def ceiling(dsn: str, schema: str, events: Sequence[Event], batch: int) -> float:
    """Both read models from pre-decoded events, one connection each, side by side; return events/s."""
    conns = [await db.connect(dsn, schema) for _ in READ_MODELS]
    try:
        async def loop(conn: db.Conn, read_model: str) -> None:
            for i in range(0, len(events), batch):
                await apply_batch(conn, read_model, events[i:i + batch])

        started = time.perf_counter()
        await asyncio.gather(*(loop(c, m) for c, m in zip(conns, READ_MODELS, strict=True)))
        return len(events) / (time.perf_counter() - started)
    finally:
        for conn in conns:
            await conn.close()


# --- the minimal pipeline's writer, relay and consumer --------------------------------------------------


async def append(conn: db.Conn, stream_id: str, expected: int, event_id: Any, event_type: str, data: bytes) -> None:
    """The writer's one statement (the payload was encoded up front)."""
    position = await conn.fetchval(APPEND, stream_id, expected, event_id, event_type, data, codec.packb({}))
    if position is None:
        raise RuntimeError(f"{stream_id} was not at version {expected}")


async def run_relay(settings: Settings) -> None:
    """Claim, publish with pipelined confirms, delete, commit; poll when idle. Until cancelled."""
    conn = await db.connect(settings.database_url, settings.schema, application_name="bench handwritten relay")
    connection = await aio_pika.connect(settings.amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(broker.Names(settings.prefix).exchange, ensure=False)
        print("ready", flush=True)
        while True:
            async with conn.transaction():
                rows = await conn.fetch(CLAIM, RELAY_BATCH)
                if rows:
                    confirms = await asyncio.gather(*(
                        exchange.publish(aio_pika.Message(
                            msgpack.packb((r["stream_id"], r["version"], r["event_type"], r["data"])),
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT), routing_key=r["event_type"])
                        for r in rows))
                    if not all(isinstance(c, spec.Basic.Ack) for c in confirms):
                        raise RuntimeError("the broker did not ack every message")
                    await conn.execute(DELETE, [r["global_position"] for r in rows])
            if len(rows) < RELAY_BATCH:
                await asyncio.sleep(IDLE_POLL)
    finally:
        await connection.close()
        await conn.close()


async def consume(settings: Settings, channel: AbstractChannel, read_model: str) -> None:
    """One read model's queue: batches of up to 100 in one transaction each, one multiple-ack after commit."""
    conn = await db.connect(settings.database_url, settings.schema, application_name="bench handwritten consumer")
    try:
        await channel.set_qos(prefetch_count=PREFETCH)
        queue = await channel.get_queue(broker.Names(settings.prefix).queue(read_model), ensure=False)
        buffer: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        await queue.consume(buffer.put)
        while True:
            batch = [await buffer.get()]
            while len(batch) < CONSUMER_BATCH and not buffer.empty():
                batch.append(buffer.get_nowait())
            events = []
            for message in batch:
                stream_id, version, event_type, data = msgpack.unpackb(message.body)
                events.append((stream_id, version, codec.REGISTRY.decode(event_type, data)))
            await apply_batch(conn, read_model, events)
            await batch[-1].ack(multiple=True)
    finally:
        await conn.close()


async def run_consumer(settings: Settings) -> None:
    connection = await aio_pika.connect(settings.amqp_url)
    try:
        channels = [await connection.channel() for _ in READ_MODELS]
        tasks = [asyncio.ensure_future(consume(settings, c, m)) for c, m in zip(channels, READ_MODELS, strict=True)]
        print("ready", flush=True)
        await asyncio.gather(*tasks)
    finally:
        await connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.pipeline_handwritten", description=__doc__.split("\n\n")[0])
    parser.add_argument("role", choices=["relay", "consumer"])
    parser.add_argument("--schema", required=True)
    parser.add_argument("--prefix", required=True)
    args = parser.parse_args()
    settings = Settings.from_env()
    settings = Settings(database_url=settings.database_url, amqp_url=settings.amqp_url, schema=args.schema,
                        prefix=args.prefix)
    job = run_relay(settings) if args.role == "relay" else run_consumer(settings)
    tuning.tune_gc()  # the process settings of eventfleet's own commands (workers.cli), for a fair comparison
    asyncio.run(lifecycle.run_until_stopped(job))


if __name__ == "__main__":
    main()
