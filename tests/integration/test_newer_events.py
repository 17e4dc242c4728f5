"""Events of a newer release reaching older workers (a rolling upgrade, writers first): not corrupt, never parked.

A read model that does not handle the event's name passes it by; one that does holds the partition, unacked, until
a worker that knows the type takes it over (tests/e2e/test_rolling_upgrade.py runs the whole upgrade).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aio_pika
import pytest

from eventfleet.examples.orders.projections import CustomerStats, OrderSummary
from projections.base import Projection
from store import NO_STREAM, EventStore, RecordedEvent, db
from store.partitions import partition_of
from store.records import record_or_undecodable
from tests.conftest import AMQP_URL, DATABASE_URL, PARTITIONS
from tests.unit.test_projection_fold import paid, placed
from workers import broker, errors
from workers.config import Settings
from workers.projector import checkpoints, parking
from workers.projector.consumer import Consumer
from workers.runtime import health, metrics

NEWER_SHIPPED = "OrderShipped.v9"  # customer_stats does not handle OrderShipped; order_summary does


async def store_newer(pool: db.Pool, stream: str, version: int, event_type: str) -> RecordedEvent:
    """Store an event of a type this code does not know (a newer writer's), as the store's reads return it."""
    async with pool.acquire() as conn:
        row = await conn.fetchrow(
            "INSERT INTO events (event_id, stream_id, version, event_type, data, metadata)"
            " SELECT gen_random_uuid(), $1, $2, $3, data, metadata FROM events LIMIT 1"
            " RETURNING global_position, event_id, stream_id, version, event_type, data, metadata, recorded_at,"
            " transaction_id", stream, version, event_type)
    assert row is not None
    return record_or_undecodable(row)


@pytest.fixture
async def order(pool: db.Pool, event_store: EventStore) -> list[RecordedEvent]:
    """order-1 placed and paid, then shipped by a newer release (version 2), then paid again by this one (3)."""
    await event_store.append("order-1", [placed("1", "c"), paid("1", "c")], NO_STREAM)
    newer = await store_newer(pool, "order-1", 2, NEWER_SHIPPED)
    await event_store.append("order-1", [paid("1", "c", minute=4)], 2)
    stored = await event_store.load("order-1", to_version=1)
    return [*stored, newer, *await event_store.load("order-1", from_version=3)]


async def dead_letters(pool: db.Pool) -> int:
    count: int = await pool.fetchval("SELECT count(*) FROM dead_letters")
    return count


async def test_an_event_of_a_newer_version_a_read_model_does_not_handle_is_passed_by(pool, event_store, order):
    result = await parking.apply_or_park(event_store, CustomerStats(), order)

    # OrderShipped.v2 (version 2) is not customer_stats's: dropped before anything, never decoded (issue 25).
    assert ([e.version for e in result.applied], result.unhandled) == ([0, 1, 3], 1)
    assert (await dead_letters(pool), result.parked) == (0, [])
    assert await pool.fetchval("SELECT version FROM checkpoints WHERE projection = 'customer_stats'") == 3


async def test_an_event_of_a_newer_version_a_read_model_handles_holds_it_and_parks_nothing(pool, event_store,
                                                                                          order):
    with pytest.raises(errors.HeldForNewerCode) as held:
        await parking.apply_or_park(event_store, OrderSummary(), order)

    assert (held.value.event.stream_id, held.value.event.version) == ("order-1", 2)
    assert await dead_letters(pool) == 0
    assert await pool.fetchval("SELECT count(*) FROM checkpoints") == 0  # the batch rolled back whole


async def test_a_newer_event_filled_from_the_store_holds_too(pool, event_store, order):
    await checkpoints.apply_batch(event_store, OrderSummary(), order[:2])

    with pytest.raises(errors.HeldForNewerCode):
        await parking.apply_or_park(event_store, OrderSummary(), order[3:])  # version 2 is a gap to fill

    assert await pool.fetchval("SELECT version FROM checkpoints WHERE projection = 'order_summary'") == 1
    assert await dead_letters(pool) == 0


class EveryEvent(Projection):
    """A generic audit log: it overrides apply and has no handlers, so it takes every event."""

    name = "every_event"
    tables = ()
    ddl = ""

    async def apply(self, conn: db.Conn, event: RecordedEvent) -> None:
        pass


async def test_a_type_this_code_has_never_heard_of_is_passed_by_by_named_read_models_and_held_by_the_rest(
        pool, event_store):
    await event_store.append("order-1", [placed("1", "c")], NO_STREAM)
    (first,) = await event_store.load("order-1")
    unheard = await store_newer(pool, "order-1", 1, "OrderGiftWrapped.v1")

    applied = await checkpoints.apply_batch(event_store, OrderSummary(), [first, unheard])
    with pytest.raises(errors.HeldForNewerCode):
        await checkpoints.apply_batch(event_store, EveryEvent(), [first, unheard])

    assert ([e.version for e in applied.applied], applied.unhandled) == ([0], 1)
    assert (EveryEvent.handled_names(), OrderSummary.handled_names()) == (
        None, frozenset({"OrderPlaced", "OrderPaid", "OrderShipped", "OrderCancelled"}))


@pytest.fixture
async def channel(prefix: str) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    names = broker.Names(prefix)
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        await broker.declare_topology(channel, names, [OrderSummary.name], PARTITIONS)
        try:
            yield channel
        finally:
            await broker.delete_topology(await connection.channel(), names, [OrderSummary.name], PARTITIONS)


async def test_a_consumer_meeting_a_newer_event_holds_its_partition_unacked_and_says_why(pool, event_store,
                                                                                         order, channel, prefix):
    settings = Settings(database_url=DATABASE_URL, amqp_url=AMQP_URL, schema=event_store.schema, prefix=prefix,
                        http_port=0)
    partition = partition_of("order-1", PARTITIONS)
    rows = await pool.fetch("SELECT global_position, event_id, stream_id, version, event_type, data, metadata,"
                            " recorded_at, transaction_id FROM events ORDER BY version")
    queue = broker.Names(prefix).partition_queue(OrderSummary.name, partition)
    await channel.default_exchange.publish(  # as the relay publishes them: from the rows, payloads undecoded
        broker.batch_message(partition, rows, [broker.event_map(r) for r in rows]), routing_key=queue)
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        status = health.Health(postgres=True, rabbitmq=True)
        told: list[tuple[int, str]] = []
        holding = asyncio.Event()

        async def on_hold(partition: int, reason: str) -> None:
            told.append((partition, reason))
            holding.set()

        gauge = metrics.PARTITIONS_HELD_FOR_NEWER_CODE.labels(OrderSummary.name)
        before = gauge._value.get()
        consumer = Consumer(event_store, await connection.channel(), OrderSummary(), partition, settings,
                            health_=status, on_hold=on_hold)
        stop = asyncio.Event()
        running = asyncio.create_task(consumer.run(stop))
        await asyncio.wait_for(holding.wait(), 20)

        assert gauge._value.get() == before + 1
        assert status.reason() == f"order_summary.{partition} held: {consumer.held}"
        assert told == [(partition, str(consumer.held))]
        assert await dead_letters(pool) == 0
        stop.set()
        await running
        await consumer.channel.close()
    for _ in range(200):  # back in the queue for a newer worker (requeued as the channel closes)
        ready = (await channel.declare_queue(queue, passive=True)).declaration_result.message_count
        if ready == 1:
            break
        await asyncio.sleep(0.05)
    assert ready == 1
    assert gauge._value.get() == before
    assert await pool.fetchval("SELECT count(*) FROM checkpoints") == 0

