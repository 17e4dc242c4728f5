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
from store.partitions import partition_of
from store.records import Undecodable
from tests.conftest import AMQP_URL, DATABASE_URL, PARTITIONS
from workers import broker, projector, relay
from workers.config import Settings
from workers.errors import PublishFailed
from workers.runtime import health, metrics

from .test_relay_helpers import (
    PROJECTIONS,
    Collector,
    append_orders,
    collect,
    declare,
    delete_topology,
    event_ids,
    outbox_count,
    partition_queues,
    wait_until,
)


@pytest.fixture
async def topology(amqp, prefix):
    """The deployment's partitions exchange and queues, declared on a confirming channel; deleted after the
    test. Yields the relay's targets."""
    _, targets = await declare(amqp, prefix)
    yield targets
    await delete_topology(amqp, prefix)


@pytest.fixture
async def collector(amqp, prefix, topology):
    """Every event delivered to one projection's partition queues."""
    channel, c = await collect(amqp, partition_queues(prefix))
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


async def test_every_event_arrives_once_in_a_batch_message_of_its_partition(pool, event_store, prefix,
                                                                             topology, collector):
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
    assert [a.event for a in collector.arrived] == [by_id[str(a.event.event_id)] for a in collector.arrived]
    assert collector.misplaced(prefix) == []
    assert await outbox_count(pool) == 0


async def test_a_batch_message_carries_the_contracts_properties_and_headers(pool, event_store, topology,
                                                                            collector):
    n = await append_orders(event_store, 7)
    assert await relay.relay_until_idle(pool, topology, batch_size=5) == n
    await collector.wait_for(n)

    for message in collector.messages:
        events = [a.event for a in collector.arrived if a.message is message]
        partition = partition_of(events[0].stream_id, PARTITIONS)
        assert {partition_of(e.stream_id, PARTITIONS) for e in events} == {partition}
        assert (message.type, message.content_type, message.delivery_mode, message.routing_key) == (
            broker.BATCH_TYPE, "application/msgpack", aio_pika.DeliveryMode.PERSISTENT, str(partition))
        assert message.headers == {"partition": partition, "count": len(events),
                                   "first_position": events[0].global_position,
                                   "last_position": events[-1].global_position}
        assert message.message_id == f"{events[0].event_id}+{len(events)}"


async def test_one_relay_delivers_each_partition_in_position_order(pool, event_store, topology, collector):
    n = await append_orders(event_store, 30)
    assert await relay.relay_until_idle(pool, topology, batch_size=7) == n
    await collector.wait_for(n)

    for queue in {a.queue for a in collector.arrived}:
        positions = [a.event.global_position for a in collector.arrived if a.queue == queue]
        assert positions == sorted(positions), queue
    assert len({a.queue for a in collector.arrived}) == PARTITIONS  # 30 orders fill every partition


async def test_with_the_events_exchange_each_event_is_also_published_alone_in_the_per_event_format(
        pool, event_store, amqp, prefix, topology, delete_prefixed):
    names = broker.Names(prefix)
    _, targets = await declare(amqp, prefix, events_exchange=True)
    assert targets.events_exchange is not None
    # Other consumers bind queues of their own to the events exchange; no queue of the deployment is bound.
    channel = await amqp.channel()
    delete_prefixed([f"{prefix}.other"], [])
    queue = await channel.declare_queue(f"{prefix}.other", exclusive=True)
    await queue.bind(names.exchange, routing_key="#")
    others = Collector()
    await others.start(queue)

    n = await append_orders(event_store, 4)
    assert await relay.relay_until_idle(pool, targets, batch_size=5) == n
    await others.wait_for(n)

    streams = await pool.fetch("SELECT DISTINCT stream_id FROM events")
    by_id = {str(e.event_id): e for row in streams for e in await event_store.load(row["stream_id"])}
    assert len(others.messages) == n
    assert others.duplicates == 0
    for message in others.messages:
        expected = by_id[str(message.message_id)]
        assert (message.type, message.delivery_mode, message.routing_key) == (
            None, aio_pika.DeliveryMode.PERSISTENT, expected.event_type)
        assert message.headers == {"event_type": expected.event_type, "stream_id": expected.stream_id,
                                   "version": expected.version}
        assert broker.from_body(message.body) == expected
    # One relay: the outbox's position order, hence every stream in version order.
    positions = [broker.from_body(m.body).global_position for m in others.messages]
    assert positions == sorted(positions)


async def test_without_the_events_exchange_the_relay_declares_none(pool, event_store, amqp, prefix, running,
                                                                   collector):
    _, _, idle = running()
    await asyncio.wait_for(idle.wait(), 30)
    n = await append_orders(event_store, 1)
    await collector.wait_for(n)
    assert not await broker.exchange_exists(amqp, broker.Names(prefix).exchange)


async def test_a_batch_is_published_pipelined_not_one_confirm_at_a_time(pool, event_store, topology):
    await append_orders(event_store, 20)  # 60 events

    class Spy:
        """The real exchange, counting publishes started but not yet confirmed."""

        def __init__(self, inner: Any) -> None:
            self.inner, self.in_flight, self.most, self.published = inner, 0, 0, 0
            self.name = inner.name

        async def publish(self, *args: Any, **kwargs: Any) -> Any:
            self.in_flight += 1
            self.published += 1
            self.most = max(self.most, self.in_flight)
            try:
                return await self.inner.publish(*args, **kwargs)
            finally:
                self.in_flight -= 1

    spy = Spy(topology.partitions_exchange)
    # One event per message: 40 messages for the 40 rows claimed.
    targets = dataclasses.replace(topology, partitions_exchange=cast(AbstractExchange, spy), message_events=1)
    assert await relay.publish_batch(pool, targets, 40) == 40
    assert (spy.published, spy.most) == (40, 40)


async def test_an_unroutable_message_rolls_the_batch_back(pool, event_store, amqp, prefix, topology):
    # An exchange nothing is bound to: mandatory publishing makes the broker return the messages.
    channel = await amqp.channel(publisher_confirms=True, on_return_raises=True)
    lonely = await channel.declare_exchange(f"{prefix}.lonely", aio_pika.ExchangeType.DIRECT, auto_delete=False)
    try:
        n = await append_orders(event_store, 2)
        with pytest.raises(PublishFailed, match="unroutable"):
            await relay.publish_batch(pool, broker.Targets(lonely, PARTITIONS), 100)
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
        n = await append_orders(event_store, 2)  # 6 events, one per message
        with pytest.raises(PublishFailed, match="nacked"):
            await relay.publish_batch(pool, broker.Targets(exchange, PARTITIONS, message_events=1), 100)
        assert await outbox_count(pool) == n
    finally:
        await queue.delete(if_unused=False, if_empty=False)
        await exchange.delete()


async def test_concurrent_relays_publish_every_row_exactly_once(pool, event_store, amqp, prefix, topology,
                                                               collector):
    n = await append_orders(event_store, 300)  # 900 events
    targets = [(await declare(amqp, prefix))[1] for _ in range(3)]  # a confirming channel each
    published = await asyncio.gather(*(relay.relay_until_idle(pool, t, batch_size=20) for t in targets))
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


async def test_a_claim_cut_by_its_byte_budget_is_followed_by_the_next_at_once_not_at_the_poll(
        pool, event_store, config, running, collector):
    # A poll that never fires within the test and a budget of one event per claim: one NOTIFY must carry all.
    _, _, idle = running(cfg=dataclasses.replace(config, poll_interval=3600, batch_bytes=1))
    await asyncio.wait_for(idle.wait(), 30)
    n = await append_orders(event_store, 2)  # one transaction, one NOTIFY, 6 claims of one event

    await collector.wait_for(n)

    assert await outbox_count(pool) == 0


async def test_rows_inserted_without_notify_are_published_by_the_poll(pool, event_store, running, collector):
    event_store.notifier.enabled = False  # appends send no NOTIFY from now on
    _, _, idle = running()
    await asyncio.wait_for(idle.wait(), 30)  # listening, drained, asleep: only the poll can find rows now
    n = await append_orders(event_store, 3)
    await collector.wait_for(n)
    assert await outbox_count(pool) == 0


async def test_metrics_count_publishes_and_show_the_backlog(pool, event_store, running, collector):
    published_before = metrics.RELAY_PUBLISHED._value.get()
    messages_before = metrics.RELAY_MESSAGES._value.get()
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
    # Each batch message reaches every projection's queue of its partition once: one projection's queues
    # received exactly the messages counted.
    assert metrics.RELAY_MESSAGES._value.get() - messages_before == len(collector.messages)
    assert len(collector.messages) < n  # several events per message
    assert _histogram_count() - batches_before >= 3


async def test_the_relay_routes_each_event_to_the_partition_its_schema_records(pool, event_store, config,
                                                                              running, prefix, collector):
    assert config.partitions is None  # P comes from the schema, migrated with PARTITIONS
    running()
    n = await append_orders(event_store, 30)
    await collector.wait_for(n)
    assert collector.misplaced(prefix) == []
    assert len({a.queue for a in collector.arrived}) == PARTITIONS


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


async def test_the_relays_sessions_never_scan_the_outbox_sequentially(config):
    async with relay.open_pool(config) as relay_pool:
        assert await relay_pool.fetchval("SHOW enable_seqscan") == "off"


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
    [bad] = [a for a in collector.arrived if str(a.event.event_id) == bad_id]
    assert (bad.event.stream_id, bad.event.version) == ("order-corrupt", 0)
    assert bad.message.headers[broker.UNDECODABLE_HEADER] == 1  # the message's count of flagged events
    assert isinstance(bad.event.event, Undecodable)
    assert f"relay could not encode event {bad_id}" in str(bad.event.event.error)
    assert "corrupt msgpack" in str(bad.event.event.error)
    assert (metrics.registry.get_sample_value("eventfleet_relay_undecodable_total") or 0.0) - undecodable_before == 1


async def test_workers_park_the_undecodable_row_and_apply_the_rest(pool, event_store, topology, prefix, schema):
    n = await append_orders(event_store, 2)
    bad_id = await append_corrupt_metadata_event(pool)
    n += await append_orders(event_store, 1)
    assert await relay.relay_until_idle(pool, topology) == n + 1
    settings = Settings(database_url=DATABASE_URL, amqp_url=AMQP_URL, schema=schema, prefix=prefix, http_port=0)
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        stats = await projector.consume_until_idle(pool, await connection.channel(), CustomerStats(), settings)
    # Each order's OrderShipped is not customer_stats's: acked, never applied (issue 25).
    assert (stats.applied, stats.unhandled, stats.dead_lettered) == (n * 2 // 3, n // 3, 1)
    rows = await pool.fetch("SELECT status, stream_id, version, error FROM dead_letters"
                            " WHERE projection = 'customer_stats'")
    assert [(r["status"], r["stream_id"], r["version"]) for r in rows] == [("parked", "order-corrupt", 0)]
    assert f"relay could not encode event {bad_id}" in rows[0]["error"]


def _histogram_count() -> float:
    for metric in metrics.RELAY_BATCH_SECONDS.collect():
        for sample in metric.samples:
            if sample.name.endswith("_count"):
                return sample.value
    return 0.0


def test_config_reads_the_relay_knobs_from_the_environment():
    settings = Settings.from_env({"EVENTFLEET_RELAY_BATCH_SIZE": "250", "EVENTFLEET_RELAY_POLL_MS": "1500",
                                  "EVENTFLEET_SCHEMA": "s1", "EVENTFLEET_PREFIX": "p1",
                                  "EVENTFLEET_EVENTS_EXCHANGE": "1", "EVENTFLEET_MESSAGE_EVENTS": "25",
                                  "EVENTFLEET_MESSAGE_BYTES": "65536", "EVENTFLEET_RELAY_BATCH_BYTES": "2097152"})
    config = relay.RelayConfig.from_settings(settings)
    assert (config.batch_size, config.poll_interval, config.schema, config.prefix) == (250, 1.5, "s1", "p1")
    assert (config.events_exchange, config.message_events, config.message_bytes) == (True, 25, 65536)
    assert config.batch_bytes == 2 * 1024 * 1024
    assert config.partitions is None  # read from the schema when the relay starts
    assert set(config.projections) == set(PROJECTIONS)
    default = relay.RelayConfig.from_settings(Settings())
    assert (default.batch_size, default.events_exchange, default.message_events, default.message_bytes) == (
        1000, False, 100, 1024 * 1024)
