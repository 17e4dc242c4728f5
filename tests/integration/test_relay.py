"""The relay against real Postgres and RabbitMQ: what it publishes, when, and what a failure leaves."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any, cast

import aio_pika
import pytest
from aio_pika.abc import AbstractExchange

from eventfleet.examples.orders.projections import CustomerStats
from store import db, outbox
from tests.conftest import AMQP_URL, DATABASE_URL
from workers import broker, projector, relay
from workers.config import Settings
from workers.errors import MalformedMessage, PublishFailed
from workers.runtime import health, metrics

from .test_relay_helpers import (
    PROJECTIONS,
    QUEUE_PROJECTION,
    Collector,
    append_orders,
    declare,
    delete_topology,
    event_ids,
    outbox_count,
    wait_until,
)


@pytest.fixture
async def topology(amqp, prefix):
    """The deployment's exchange and queues, declared on a confirming channel; deleted after the test."""
    _, exchange = await declare(amqp, prefix)
    yield exchange
    await delete_topology(amqp, prefix)


@pytest.fixture
async def collector(amqp, prefix, topology):
    channel = await amqp.channel()
    await channel.set_qos(prefetch_count=1000)
    c = Collector()
    await c.start(await channel.declare_queue(broker.Names(prefix).queue(QUEUE_PROJECTION), passive=True))
    yield c
    await channel.close()


@pytest.fixture
def config(schema, prefix, amqp_url, database_url):
    return relay.RelayConfig(database_url=database_url, schema=schema, amqp_url=amqp_url, prefix=prefix,
                             projections=PROJECTIONS, batch_size=50, poll_interval=0.2,
                             metrics_interval=0.1)


@pytest.fixture
async def running(pool, config):
    """Start run_relay as a task: ``start(config=..., pool=...) -> (task, health, idle)``; cancelled after."""
    tasks: list[asyncio.Task[None]] = []

    def start(cfg=None, relay_pool=None):
        status, idle = health.Health(), asyncio.Event()
        task = asyncio.create_task(relay.run_relay(relay_pool or pool, cfg or config, status, idle=idle))
        tasks.append(task)
        return task, status, idle

    yield start
    for task in tasks:
        task.cancel()
    for task in tasks:
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_every_event_arrives_with_the_contracts_body_and_headers(pool, event_store, topology, collector):
    n = await append_orders(event_store, 7)
    assert await relay.relay_until_idle(pool, topology, batch_size=5) == n
    await collector.wait_for(n)

    # Every stream the appends wrote, loaded by stream: unlike read_all, load is not held back by an
    # unrelated transaction still open elsewhere in the shared cluster.
    streams = await pool.fetch("SELECT DISTINCT stream_id FROM events")
    stored = [e for row in streams for e in await event_store.load(row["stream_id"])]
    by_id = {str(e.event_id): e for e in stored}
    assert len(stored) == n
    assert collector.duplicates == 0
    assert sorted(collector.counts) == sorted(by_id)
    for message in collector.messages:
        expected = by_id[message.message_id]
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert message.routing_key == expected.event_type
        assert message.headers == {"event_type": expected.event_type, "stream_id": expected.stream_id,
                                   "version": expected.version}
        got = broker.from_body(message.body)
        assert (got.event_id, got.stream_id, got.version, got.global_position, got.event_type, got.data,
                got.metadata, got.recorded_at, got.event) == (
            expected.event_id, expected.stream_id, expected.version, expected.global_position,
            expected.event_type, expected.data, expected.metadata, expected.recorded_at, expected.event)
    # One relay: the outbox's position order, hence every stream in version order.
    positions = [broker.from_body(m.body).global_position for m in collector.messages]
    assert positions == sorted(positions)
    assert await outbox_count(pool) == 0


async def test_a_batch_is_published_pipelined_not_one_confirm_at_a_time(pool, event_store, topology):
    await append_orders(event_store, 20)  # 60 events

    class Spy:
        """The real exchange, counting publishes started but not yet confirmed."""

        def __init__(self, inner: Any) -> None:
            self.inner, self.in_flight, self.most = inner, 0, 0
            self.name = inner.name

        async def publish(self, *args: Any, **kwargs: Any) -> Any:
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
            try:
                return await self.inner.publish(*args, **kwargs)
            finally:
                self.in_flight -= 1

    spy = Spy(topology)
    assert await relay.publish_batch(pool, cast(AbstractExchange, spy), 40) == 40
    assert spy.most == 40


async def test_an_unroutable_message_rolls_the_batch_back(pool, event_store, amqp, prefix, topology):
    # An exchange nothing is bound to: mandatory publishing makes the broker return the messages.
    channel = await amqp.channel(publisher_confirms=True, on_return_raises=True)
    lonely = await channel.declare_exchange(f"{prefix}.lonely", aio_pika.ExchangeType.TOPIC, auto_delete=False)
    try:
        n = await append_orders(event_store, 2)
        with pytest.raises(PublishFailed, match="unroutable"):
            await relay.publish_batch(pool, lonely, 100)
        assert await outbox_count(pool) == n
        assert await relay.relay_until_idle(pool, topology) == n
    finally:
        await lonely.delete()


async def test_a_nacked_message_rolls_the_batch_back(pool, event_store, amqp, prefix, topology):
    # A queue that rejects publishes beyond 2 messages makes the broker nack the rest.
    channel = await amqp.channel(publisher_confirms=True, on_return_raises=True)
    exchange = await channel.declare_exchange(f"{prefix}.small", aio_pika.ExchangeType.TOPIC)
    queue = await channel.declare_queue(f"{prefix}.small", arguments={"x-max-length": 2,
                                                                      "x-overflow": "reject-publish"})
    await queue.bind(exchange, "#")
    try:
        n = await append_orders(event_store, 2)
        with pytest.raises(PublishFailed, match="nacked"):
            await relay.publish_batch(pool, exchange, 100)
        assert await outbox_count(pool) == n
    finally:
        await queue.delete(if_unused=False, if_empty=False)
        await exchange.delete()


async def test_concurrent_relays_publish_every_row_exactly_once(pool, event_store, amqp, prefix, topology,
                                                               collector):
    n = await append_orders(event_store, 300)  # 900 events
    channels = [await amqp.channel(publisher_confirms=True, on_return_raises=True) for _ in range(3)]
    exchanges = [await broker.declare_exchange(c, broker.Names(prefix)) for c in channels]
    published = await asyncio.gather(*(relay.relay_until_idle(pool, x, batch_size=20) for x in exchanges))
    # SKIP LOCKED: no row is claimed by two relays at once, so no event is published twice.
    assert sum(published) == n
    await collector.wait_for(n)
    assert len(collector.counts) == n
    assert collector.duplicates == 0
    assert set(collector.counts) == await event_ids(pool)


async def test_notify_wakes_the_relay(pool, event_store, config, running, collector):
    # A poll so slow it never fires within the test: only the NOTIFY can wake the relay.
    _, status, idle = running(cfg=dataclasses.replace(config, poll_interval=3600))
    await asyncio.wait_for(idle.wait(), 30)
    assert status.ready()
    n = await append_orders(event_store, 3)
    await collector.wait_for(n)


async def test_rows_inserted_without_notify_are_published_by_the_poll(pool, event_store, running, collector):
    event_store.notifier.enabled = False  # appends send no NOTIFY from now on
    _, _, idle = running()
    await asyncio.wait_for(idle.wait(), 30)  # listening, drained, asleep: only the poll can find rows now
    n = await append_orders(event_store, 3)
    await collector.wait_for(n)
    assert await outbox_count(pool) == 0


async def test_metrics_count_publishes_and_show_the_backlog(pool, event_store, running, collector):
    published_before = metrics.RELAY_PUBLISHED._value.get()
    batches_before = _histogram_count()
    n = await append_orders(event_store, 40)  # 120 events, batches of 50
    backlog = await relay.refresh_backlog(pool)
    assert backlog.pending == n
    assert metrics.OUTBOX_PENDING._value.get() == n
    assert metrics.OUTBOX_OLDEST_AGE._value.get() > 0
    _, _, idle = running()
    await collector.wait_for(n)
    await asyncio.wait_for(idle.wait(), 30)

    async def gauges_refreshed() -> bool:
        return bool(metrics.OUTBOX_PENDING._value.get() == 0 and metrics.OUTBOX_OLDEST_AGE._value.get() == 0)
    await wait_until(gauges_refreshed, 10, "the relay to refresh the backlog gauges")
    assert metrics.RELAY_PUBLISHED._value.get() - published_before == n
    assert _histogram_count() - batches_before >= 3


async def test_a_terminated_backend_is_an_outage_logged_once_and_outlived(
        pool, event_store, config, running, collector, database_url, caplog):
    caplog.set_level(logging.WARNING, logger="workers.runtime.health")
    n = await append_orders(event_store, 400)  # 1200 events, batches of 50
    async with relay.open_pool(config) as relay_pool:
        _, status, idle = running(relay_pool=relay_pool)
        await collector.wait_for(100)
        killed = await pool.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
            relay.application_name(config.schema))
        assert killed >= 2  # the LISTEN connection and the pool's batch connection
        await collector.wait_for(n, within=60)
        await asyncio.wait_for(idle.wait(), 30)
        assert status.ready()
    assert set(collector.counts) == await event_ids(pool)
    # A batch cut off before its commit is published again, the only source of duplicates.
    assert collector.duplicates <= config.batch_size
    # Per service: another engineer's fault test may disturb RabbitMQ meanwhile on this shared machine.
    assert [r.service for r in caplog.records if r.getMessage() == "outage"].count("postgres") == 1
    assert [r.service for r in caplog.records if r.getMessage() == "recovered"].count("postgres") == 1


async def test_pending_backlog_query(pool, event_store):
    assert await outbox.backlog(pool) == outbox.Backlog(0, 0.0)
    await append_orders(event_store, 1)
    backlog = await outbox.backlog(pool)
    assert backlog.pending == 3
    assert backlog.oldest_age_seconds > 0


async def append_corrupt_metadata_event(pool: db.Pool) -> str:
    """An event (with its outbox row) whose metadata is not msgpack, written with raw SQL as a careless
    script would; its data is a real OrderPlaced payload. Returns its event id."""
    event_id: str = str(await pool.fetchval(
        "WITH bad AS (INSERT INTO events (event_id, stream_id, version, event_type, data, metadata) "
        "SELECT gen_random_uuid(), 'order-corrupt', 0, event_type, data, '\\xc1'::bytea FROM events "
        "WHERE event_type = 'OrderPlaced.v2' ORDER BY global_position LIMIT 1 "
        "RETURNING event_id, global_position), "
        "queued AS (INSERT INTO outbox (global_position) SELECT global_position FROM bad) "
        "SELECT event_id FROM bad"))
    return event_id


async def test_a_row_whose_metadata_cannot_be_decoded_is_published_flagged_and_the_rows_behind_it_follow(
        pool, event_store, running, collector):
    undecodable_before = (metrics.registry.get_sample_value("eventfleet_relay_undecodable_total") or 0.0)
    before = await append_orders(event_store, 2)
    bad_id = await append_corrupt_metadata_event(pool)
    after = await append_orders(event_store, 3)
    task, status, idle = running()
    await collector.wait_for(before + 1 + after)
    await asyncio.wait_for(idle.wait(), 30)
    assert not task.done()
    assert status.ready()
    assert await outbox_count(pool) == 0
    assert set(collector.counts) == await event_ids(pool)
    [bad] = [m for m in collector.messages if m.message_id == bad_id]
    assert bad.headers["stream_id"] == "order-corrupt"
    assert "corrupt msgpack" in str(bad.headers[broker.UNDECODABLE_HEADER])
    with pytest.raises(MalformedMessage, match=f"relay could not encode event {bad_id}"):
        broker.from_body(bad.body)
    assert (metrics.registry.get_sample_value("eventfleet_relay_undecodable_total") or 0.0) - undecodable_before == 1


async def test_workers_dead_letter_the_undecodable_row_and_apply_the_rest(pool, event_store, topology, prefix,
                                                                          schema):
    n = await append_orders(event_store, 2)
    bad_id = await append_corrupt_metadata_event(pool)
    n += await append_orders(event_store, 1)
    assert await relay.relay_until_idle(pool, topology) == n + 1
    settings = Settings(database_url=DATABASE_URL, amqp_url=AMQP_URL, schema=schema, prefix=prefix, http_port=0)
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        stats = await projector.consume_until_idle(pool, await connection.channel(), CustomerStats(), settings)
    assert (stats.applied, stats.undecodable) == (n, 1)
    rows = await pool.fetch("SELECT status, error, body FROM dead_letters WHERE projection = 'customer_stats'")
    assert [r["status"] for r in rows] == ["parked"]
    assert f"relay could not encode event {bad_id}" in rows[0]["error"]
    assert rows[0]["body"] is not None


def _histogram_count() -> float:
    for metric in metrics.RELAY_BATCH_SECONDS.collect():
        for sample in metric.samples:
            if sample.name.endswith("_count"):
                return sample.value
    return 0.0


def test_config_reads_the_relay_knobs_from_the_environment():
    settings = Settings.from_env({"EVENTFLEET_RELAY_BATCH_SIZE": "250", "EVENTFLEET_RELAY_POLL_MS": "1500",
                                  "EVENTFLEET_SCHEMA": "s1", "EVENTFLEET_PREFIX": "p1"})
    config = relay.RelayConfig.from_settings(settings)
    assert (config.batch_size, config.poll_interval, config.schema, config.prefix) == (250, 1.5, "s1", "p1")
    assert set(config.projections) == set(PROJECTIONS)
    assert relay.RelayConfig.from_settings(Settings()).batch_size == 1000
