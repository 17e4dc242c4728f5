"""A worker group's queue feeding several read models (workers/projector/feed.py) over real RabbitMQ and Postgres:
the broker's ack waits for every read model, a read model's dead letter is its own, and a group worker applies
every event once to each read model while garbage goes to each one's DLQ."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aio_pika
import aiormq.abc
import pytest

from eventfleet.examples.orders.projections import CustomerStats, OrderSummary
from store import db
from store.event_store import EventStore
from tests.conftest import AMQP_URL, DATABASE_URL, PARTITIONS
from tests.integration.test_worker_consumer import append_orders, drain, publish
from tests.unit.test_projection_fold import fold, read_models
from workers import broker
from workers.config import Settings
from workers.projector import dlq
from workers.projector.feed import GroupFeed
from workers.projector.worker import run_worker
from workers.runtime import health

GROUP = "main"
MODELS = ["customer_stats", "order_summary"]


@pytest.fixture
async def connection(prefix: str) -> AsyncIterator[aio_pika.abc.AbstractConnection]:
    """A connection, with the group's topology for MODELS declared; the group's queues deleted after."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        await broker.declare_group(channel, broker.Names(prefix), GROUP, MODELS, PARTITIONS)
        yield connection
        await broker.delete_group(await connection.channel(), broker.Names(prefix), GROUP, PARTITIONS)


async def ready(connection: aio_pika.abc.AbstractConnection, queue: str) -> int:
    declared = await broker.passive_queue(connection, queue)
    assert declared is not None
    return declared.message_count or 0


async def fed(connection: aio_pika.abc.AbstractConnection, prefix: str, messages: int
              ) -> tuple[GroupFeed, dict[str, list[int]], aio_pika.abc.AbstractChannel, dlq.DeadLetterCopies]:
    """``messages`` messages in the group's queue of partition 0, delivered to a view per read model."""
    names = broker.Names(prefix)
    queue = names.group_queue(GROUP, 0)
    publisher = await connection.channel()
    for i in range(messages):
        await publisher.default_exchange.publish(aio_pika.Message(f"m{i}".encode(), message_id=f"m{i}"),
                                                 routing_key=queue)
    copies = dlq.DeadLetterCopies([AMQP_URL], prefix)
    channel = await connection.channel()
    feed = GroupFeed(channel, queue, MODELS, group=GROUP, prefetch=10, copies=copies)
    received: dict[str, list[int]] = {m: [] for m in MODELS}
    for model in MODELS:
        async def receive(message: aiormq.abc.DeliveredMessage, model: str = model) -> None:
            assert message.delivery_tag is not None
            received[model].append(message.delivery_tag)
        await feed.views[model].basic_consume(queue, receive)
    for _ in range(200):
        if all(len(tags) == messages for tags in received.values()):
            break
        await asyncio.sleep(0.01)
    return feed, received, channel, copies


async def test_every_read_model_of_the_group_receives_every_delivery(connection, prefix):
    _, received, channel, copies = await fed(connection, prefix, 3)
    assert received == {m: [1, 2, 3] for m in MODELS}
    await channel.close()
    await copies.close()


async def test_the_broker_gets_its_ack_only_up_to_the_last_delivery_every_read_model_settled(connection, prefix):
    feed, _, channel, copies = await fed(connection, prefix, 3)
    await feed.views["customer_stats"].basic_ack(3, multiple=True)
    await feed.views["order_summary"].basic_ack(1, multiple=True)
    await channel.close()  # what was not acked returns to the queue
    assert await ready(connection, feed.queue) == 2
    await copies.close()


async def test_once_every_read_model_settled_a_delivery_it_is_gone_from_the_queue(connection, prefix):
    feed, _, channel, copies = await fed(connection, prefix, 3)
    await feed.views["order_summary"].basic_ack(3, multiple=True)
    await feed.views["customer_stats"].basic_ack(3, multiple=True)
    await channel.close()
    assert await ready(connection, feed.queue) == 0
    await copies.close()


async def test_a_read_models_reject_copies_the_message_to_its_own_dlq_only_and_settles_it_for_that_read_model(
        connection, prefix):
    feed, _, channel, copies = await fed(connection, prefix, 2)
    await feed.views["customer_stats"].basic_reject(1, requeue=False)
    await feed.views["customer_stats"].basic_ack(2, multiple=True)
    await feed.views["order_summary"].basic_ack(2, multiple=True)
    await copies.close()  # published
    await channel.close()
    names = broker.Names(prefix)
    inspect = await connection.channel()
    assert await drain(inspect, names.dead_letter_queue("customer_stats")) == [b"m0"]
    assert await drain(inspect, names.dead_letter_queue("order_summary")) == []
    assert await ready(connection, feed.queue) == 0


async def test_a_group_worker_applies_each_event_once_to_each_read_model_and_dead_letters_garbage_to_each(
        pool: db.Pool, event_store: EventStore, connection, prefix, schema):
    settings = Settings(database_url=DATABASE_URL, amqp_url=AMQP_URL, schema=schema, prefix=prefix, http_port=0,
                        prefetch=100, batch_size=50, message_events=10, group=GROUP, lease_seconds=3,
                        catchup_threshold=0)
    names = broker.Names(prefix)
    exchange = await (await connection.channel()).get_exchange(names.partitions_exchange)
    events = await append_orders(event_store, 20, 3)
    await publish(exchange, events[:30], per_message=5)
    garbage = b"\xc1 not msgpack"
    await (await connection.channel()).default_exchange.publish(aio_pika.Message(garbage),
                                                                routing_key=names.group_queue(GROUP, 3))
    await publish(exchange, events[30:], per_message=5)
    stop = asyncio.Event()
    worker = asyncio.create_task(run_worker(settings, [CustomerStats(), OrderSummary()], health.Health(), stop,
                                            pool=pool))
    try:
        for _ in range(600):
            applied = await pool.fetchval("SELECT count(*) FROM checkpoints")
            parked = await pool.fetchval("SELECT count(*) FROM dead_letters")
            if parked == 2 and applied == 2 * len({e.stream_id for e in events}):
                break
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        stats = await worker
    handled: frozenset[str] = CustomerStats.handled_names() or frozenset()
    assert {name: (s.applied, s.undecodable) for name, s in stats.items()} == {
        "customer_stats": (sum(1 for e in events if e.event_type.split(".v")[0] in handled), 1),
        "order_summary": (len(events), 1)}
    rows = await pool.fetch("SELECT projection, body FROM dead_letters ORDER BY projection")
    assert [(r["projection"], r["body"]) for r in rows] == [("customer_stats", garbage), ("order_summary", garbage)]
    inspect = await connection.channel()
    for model in MODELS:
        assert await drain(inspect, names.dead_letter_queue(model)) == [garbage]
    async with pool.acquire() as conn:
        assert (await read_models(conn)).customer_stats == fold(e.event for e in events).customer_stats
    assert await ready(connection, names.group_queue(GROUP, 3)) == 0


async def test_a_group_worker_deletes_its_read_models_own_partition_queues_left_from_before_groups(
        pool: db.Pool, connection, prefix, schema):
    names = broker.Names(prefix)
    await broker.declare_partitions(await connection.channel(), names, ["customer_stats"], PARTITIONS)
    own = [names.partition_queue("customer_stats", p) for p in range(PARTITIONS)]
    settings = Settings(database_url=DATABASE_URL, amqp_url=AMQP_URL, schema=schema, prefix=prefix, http_port=0,
                        group=GROUP, lease_seconds=3)
    stop = asyncio.Event()
    worker = asyncio.create_task(run_worker(settings, [CustomerStats()], health.Health(), stop, pool=pool))
    try:
        for _ in range(200):
            if [q for q in own if await broker.passive_queue(connection, q) is not None] == []:
                break
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await worker
    assert [q for q in own if await broker.passive_queue(connection, q) is not None] == []
    assert await broker.passive_queue(connection, names.dead_letter_queue("customer_stats")) is not None
