"""Shared pieces of the relay tests (no tests here): events to append, topology, counting delivered events."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime as dt
import time
import uuid
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractQueue

from eventfleet.examples.orders.events import LineItem, OrderPaid, OrderPlaced, OrderShipped
from projections import registry
from store import db
from store.event_store import EventStore, RecordedEvent
from store.partitions import partition_of
from tests.conftest import PARTITIONS
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


async def declare(connection: AbstractConnection, prefix: str, *,
                  events_exchange: bool = False) -> tuple[AbstractChannel, broker.Targets]:
    """A confirming channel (returns raise) with the deployment's topology declared, as the relay has: the
    partitions exchange, every projection's partition queues and dead-letter queue (and, with
    ``events_exchange``, the per-event exchange)."""
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    targets = await broker.declare_topology(channel, broker.Names(prefix), PROJECTIONS, PARTITIONS,
                                            events_exchange=events_exchange)
    return channel, targets


async def delete_topology(connection: AbstractConnection, prefix: str) -> None:
    """Delete everything ``declare`` (or a relay or worker of the deployment) declares."""
    names = broker.Names(prefix)
    channel = await connection.channel()
    await broker.delete_topology(channel, names, PROJECTIONS, PARTITIONS)
    await channel.close()


def topology_names(prefix: str, projections: tuple[str, ...] = PROJECTIONS) -> tuple[list[str], list[str]]:
    """(queues, exchanges) a relay or worker of the deployment may declare, for ``delete_prefixed``."""
    names = broker.Names(prefix)
    queues = [q for p in projections
              for q in (*(names.partition_queue(p, n) for n in range(PARTITIONS)), names.dead_letter_queue(p))]
    return queues, [names.partitions_exchange, names.exchange, names.dead_letter_exchange]


def partition_queues(prefix: str, projection: str = QUEUE_PROJECTION) -> list[str]:
    """One projection's queue of each partition, in partition order."""
    return [broker.Names(prefix).partition_queue(projection, n) for n in range(PARTITIONS)]


@dataclasses.dataclass(frozen=True, slots=True)
class Arrived:
    """One event as delivered: the queue it came from, its message and the event decoded from it."""

    queue: str
    message: aio_pika.abc.AbstractIncomingMessage
    event: RecordedEvent


class Collector:
    """Consumes queues (auto-ack) and keeps every delivered event, decoded from batch messages (or from
    per-event messages); counts deliveries per event id."""

    def __init__(self) -> None:
        self.messages: list[aio_pika.abc.AbstractIncomingMessage] = []
        self.arrived: list[Arrived] = []
        self.counts: collections.Counter[str] = collections.Counter()

    def receive(self, queue: str, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self.messages.append(message)
        if message.type == broker.BATCH_TYPE:
            events = broker.from_batch_body(message.body).events
        else:
            events = [broker.from_body(message.body)]
        for event in events:
            self.arrived.append(Arrived(queue, message, event))
            self.counts[str(event.event_id)] += 1

    async def start(self, queue: AbstractQueue) -> None:
        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            self.receive(queue.name, message)

        await queue.consume(on_message, no_ack=True)

    async def wait_for(self, distinct: int, within: float = 30) -> None:
        """Until ``distinct`` different events have arrived."""
        async def enough() -> bool:
            return len(self.counts) >= distinct
        await wait_until(enough, within, f"{distinct} distinct events (have {len(self.counts)})")

    @property
    def duplicates(self) -> int:
        """Events delivered more than once: every delivery after an event's first."""
        return sum(self.counts.values()) - len(self.counts)

    def misplaced(self, prefix: str, projection: str = QUEUE_PROJECTION) -> list[str]:
        """Events that arrived in another queue than their stream's partition's (empty when every one is right)."""
        names = broker.Names(prefix)
        return [f"{a.event.stream_id}@{a.event.version} in {a.queue}" for a in self.arrived
                if a.queue != names.partition_queue(projection, partition_of(a.event.stream_id, PARTITIONS))]


async def collect(connection: AbstractConnection, queue_names: list[str]) -> tuple[AbstractChannel, Collector]:
    """A collector consuming the given queues on a channel of its own (close it after)."""
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=1000)
    collector = Collector()
    for name in queue_names:
        await collector.start(await channel.declare_queue(name, passive=True))
    return channel, collector


async def drain_queues(connection: AbstractConnection, queue_names: list[str], within: float = 60) -> Collector:
    """Take every message now in the queues (the publishers are done), counting event ids."""
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=1000)
    collector = Collector()
    expected = 0
    for name in queue_names:
        queue = await channel.declare_queue(name, passive=True)
        assert queue.declaration_result.message_count is not None
        expected += queue.declaration_result.message_count
        await collector.start(queue)

    async def all_taken() -> bool:
        return len(collector.messages) >= expected
    await wait_until(all_taken, within, f"{expected} messages from {queue_names}")
    await channel.close()
    return collector


async def event_ids(pool: db.Pool) -> set[str]:
    return {str(r["event_id"]) for r in await pool.fetch("SELECT event_id FROM events")}


async def unpublished_ids(pool: db.Pool) -> set[str]:
    rows = await pool.fetch("SELECT e.event_id FROM outbox o JOIN events e USING (global_position)")
    return {str(r["event_id"]) for r in rows}
