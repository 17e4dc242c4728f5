"""Shared pieces of the relay tests (no tests here): events to append, topology, counting deliveries."""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import time
import uuid
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange, AbstractQueue

from eventfleet.examples.orders.events import LineItem, OrderPaid, OrderPlaced, OrderShipped
from projections import registry
from store import db
from store.event_store import EventStore
from workers import broker

PROJECTIONS = tuple(registry.load([registry.EXAMPLE]))
QUEUE_PROJECTION = "order_summary"


def order_events(order_id: str) -> list[Any]:
    """An order's life: placed, paid, shipped (three events, three types)."""
    now = dt.datetime.now(dt.UTC)
    item = LineItem("p1", "Widget", "W-1", 2, Decimal("4.50"))
    return [
        OrderPlaced(order_id, "c1", (item,), Decimal("9.00"), Decimal("0.90"), Decimal("9.90"), now),
        OrderPaid(order_id, "c1", Decimal("9.90"), now),
        OrderShipped(order_id, "c1", "ups", now),
    ]


async def append_orders(event_store: EventStore, orders: int, *, per_batch: int = 500) -> int:
    """Append ``orders`` orders of three events each in few transactions; return the event count."""
    streams = [(f"order-{uuid.uuid4().hex[:12]}", i) for i in range(orders)]
    for start in range(0, len(streams), per_batch):
        chunk = streams[start:start + per_batch]
        await event_store.append_batch([(sid, order_events(sid[6:]), -1) for sid, _ in chunk])
    return orders * 3


async def outbox_count(pool: db.Pool) -> int:
    count: int = await pool.fetchval("SELECT count(*) FROM outbox")
    return count


async def wait_until(predicate: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
    """Poll predicate until it holds; fail with ``what`` after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.05)


async def declare(connection: AbstractConnection, prefix: str) -> tuple[AbstractChannel, AbstractExchange]:
    """A confirming channel (returns raise) with the deployment's topology declared, as the relay has."""
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    exchange = await broker.declare_topology(channel, broker.Names(prefix), PROJECTIONS)
    return channel, exchange


async def delete_topology(connection: AbstractConnection, prefix: str) -> None:
    names = broker.Names(prefix)
    channel = await connection.channel()
    await broker.delete_topology(channel, names, PROJECTIONS)
    await channel.close()


class Collector:
    """Consumes a queue and keeps every delivery (auto-ack); counts per message id."""

    def __init__(self) -> None:
        self.messages: list[aio_pika.abc.AbstractIncomingMessage] = []
        self.counts: collections.Counter[str] = collections.Counter()

    async def on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self.messages.append(message)
        assert message.message_id is not None
        self.counts[message.message_id] += 1

    async def start(self, queue: AbstractQueue) -> None:
        await queue.consume(self.on_message, no_ack=True)

    async def wait_for(self, distinct: int, within: float = 30) -> None:
        async def enough() -> bool:
            return len(self.counts) >= distinct
        await wait_until(enough, within, f"{distinct} distinct messages (have {len(self.counts)})")

    @property
    def duplicates(self) -> int:
        return sum(self.counts.values()) - len(self.counts)


async def drain_queue(connection: AbstractConnection, queue_name: str, within: float = 60) -> Collector:
    """Take every message now in the queue (the publishers are done), counting ids."""
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=1000)
    queue = await channel.declare_queue(queue_name, passive=True)
    assert queue.declaration_result.message_count is not None
    expected = queue.declaration_result.message_count
    collector = Collector()
    await collector.start(queue)

    async def all_taken() -> bool:
        return len(collector.messages) >= expected
    await wait_until(all_taken, within, f"{expected} messages from {queue_name}")
    await channel.close()
    return collector


async def event_ids(pool: db.Pool) -> set[str]:
    return {str(r["event_id"]) for r in await pool.fetch("SELECT event_id FROM events")}


async def unpublished_ids(pool: db.Pool) -> set[str]:
    rows = await pool.fetch("SELECT e.event_id FROM outbox o JOIN events e USING (global_position)")
    return {str(r["event_id"]) for r in rows}
