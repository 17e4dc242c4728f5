"""Catch-up from the store: a projection far behind reads its backlog with read_all, exactly once, and the
deliveries it settled are acked with no database work."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import aio_pika
import pytest

from eventfleet.examples.orders.projections import CustomerStats, OrderSummary
from store import NO_STREAM, EventStore, Position, RecordedEvent, db
from tests.conftest import AMQP_URL, DATABASE_URL
from tests.integration.test_dead_letters import Probe, checkpoint, dlq, seen
from tests.integration.test_worker_consumer import append_orders, counter, publish
from tests.unit.test_projection_fold import cancelled, fold, paid, placed, read_models
from workers import broker, locks, projector
from workers.config import Settings
from workers.projector import catchup, checkpoints, consumer, lag
from workers.runtime import health


@pytest.fixture
def settings(schema: str, prefix: str) -> Settings:
    return Settings(database_url=DATABASE_URL, amqp_url=AMQP_URL, schema=schema, prefix=prefix, http_port=0,
                    prefetch=100, batch_size=50, catchup_threshold=100, catchup_batch_size=70)


@pytest.fixture
async def connection(prefix: str) -> AsyncIterator[aio_pika.abc.AbstractConnection]:
    """A broker connection; the prefix's exchanges and the queues of the projections used are deleted after."""
    conn = await aio_pika.connect(AMQP_URL)
    async with conn:
        yield conn
        channel = await conn.channel()
        await broker.delete_topology(channel, broker.Names(prefix),
                                     [CustomerStats.name, OrderSummary.name, Probe.name])


async def consumers_for(event_store: EventStore, connection: aio_pika.abc.AbstractConnection, settings: Settings,
                        *projections: type) -> list[consumer.Consumer]:
    found = []
    for cls in projections:
        c = consumer.Consumer(event_store, await connection.channel(), cls(), settings)
        await c.open_queue()
        found.append(c)
    return found


async def visible(event_store: EventStore, events: list[RecordedEvent]) -> list[RecordedEvent]:
    """Wait until read_all can show every event: a transaction of another test still running anywhere in the
    cluster holds its horizon back for a moment (see EventStore.read_all)."""
    await below_horizon(event_store.pool, len(events))
    return events


async def below_horizon(pool: db.Pool, count: int) -> None:
    for _ in range(400):
        if await pool.fetchval("SELECT count(*) FROM events "
                               "WHERE transaction_id < pg_snapshot_xmin(pg_current_snapshot())") >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the events never went below read_all's horizon")


async def applied_count(pool: db.Pool, projection: str) -> int:
    return int(await pool.fetchval("SELECT coalesce((SELECT applied FROM projection_status WHERE projection = $1), 0)",
                                   projection))


async def test_a_catch_up_applies_the_backlog_from_the_store_exactly_once(pool, event_store, connection, settings):
    events = await visible(event_store, await append_orders(event_store, 60, 5))  # 300 events
    head = sorted(events, key=lambda e: e.position)[:90]
    await checkpoints.apply_batch(event_store, CustomerStats(), head)  # a consumer got this far before
    stats, summary = await consumers_for(event_store, connection, settings, CustomerStats, OrderSummary)

    read = await catchup.CatchUp(event_store, settings).catch_up([stats, summary])

    assert read == {"customer_stats": 300, "order_summary": 300}  # no watermark yet: both read from the start
    assert await applied_count(pool, "customer_stats") == 300
    assert await applied_count(pool, "order_summary") == 300
    assert stats.stats.applied == 210
    assert summary.stats.applied == 300
    assert stats.stats.duplicates == summary.stats.duplicates == 0  # events read again are no duplicate deliveries
    async with pool.acquire() as conn:
        assert await read_models(conn) == fold(e.event for e in events)


async def test_batches_applied_at_once_that_share_streams_apply_every_event_once(pool, event_store, connection,
                                                                                settings):
    events = await visible(event_store, await append_orders(event_store, 30, 5))  # 150 events
    small = dataclasses.replace(settings, catchup_batch_size=4)  # an order's events span two batches in flight
    stats, summary = await consumers_for(event_store, connection, small, CustomerStats, OrderSummary)

    read = await catchup.CatchUp(event_store, small).catch_up([stats, summary])

    assert read == {"customer_stats": 150, "order_summary": 150}
    assert (stats.stats.applied, summary.stats.applied) == (150, 150)
    assert stats.cursor == max(e.position for e in events)
    async with pool.acquire() as conn:
        assert await read_models(conn) == fold(e.event for e in events)


async def test_a_catch_up_starts_at_the_projections_low_watermark(pool, event_store, connection, settings):
    events = sorted(await visible(event_store, await append_orders(event_store, 60, 5)), key=lambda e: e.position)
    await checkpoints.apply_batch(event_store, CustomerStats(), events[:100])
    await lag.advance(pool, "customer_stats")
    row = await pool.fetchrow("SELECT watermark_txid, watermark_position FROM projection_status "
                              "WHERE projection = 'customer_stats'")
    assert Position(row[0], row[1]) == events[99].position
    (stats,) = await consumers_for(event_store, connection, settings, CustomerStats)

    read = await catchup.CatchUp(event_store, settings).catch_up([stats])

    assert read == {"customer_stats": 200}
    assert stats.stats.applied == 200
    async with pool.acquire() as conn:
        assert (await read_models(conn)).customer_stats == fold(e.event for e in events).customer_stats


async def test_deliveries_a_catch_up_settled_are_acked_without_database_work(pool, event_store, connection, settings):
    events = await visible(event_store, await append_orders(event_store, 40, 5))
    (stats,) = await consumers_for(event_store, connection, settings, CustomerStats)
    await catchup.CatchUp(event_store, settings).catch_up([stats])
    touched = await pool.fetchval("SELECT max(updated_at) FROM checkpoints")
    exchange = await stats.channel.get_exchange(broker.Names(settings.prefix).exchange, ensure=False)
    await publish(exchange, events)

    drained = await stats.until_idle()

    assert drained.duplicates == 200
    assert drained.applied == 200  # all by the catch-up
    assert await pool.fetchval("SELECT max(updated_at) FROM checkpoints") == touched  # no checkpoint claimed
    assert await applied_count(pool, "customer_stats") == 200
    queue = await stats.channel.declare_queue(broker.Names(settings.prefix).queue("customer_stats"), passive=True)
    assert queue.declaration_result.message_count == 0


async def test_a_delivery_without_a_transaction_id_is_never_taken_as_settled(event_store, connection, settings):
    (stats,) = await consumers_for(event_store, connection, settings, CustomerStats)
    await event_store.append("order-x", [placed("x", "c")], NO_STREAM)
    (event,) = await event_store.load("order-x")
    stats.settled(Position(2**62, 2**62))
    older_relay = dataclasses.replace(event, position=Position(0, event.global_position))

    assert stats.is_settled(event)
    assert not stats.is_settled(older_relay)


async def test_only_one_process_catches_a_projection_up_at_a_time(pool, event_store, connection, settings, schema):
    await visible(event_store, await append_orders(event_store, 10, 3))
    (stats,) = await consumers_for(event_store, connection, settings, CustomerStats)
    async with pool.acquire() as other:  # another worker process holds the catch-up
        await other.fetchval("SELECT pg_advisory_lock(hashtextextended($1, 0))",
                             locks.catchup(schema, "customer_stats"))
        assert await catchup.CatchUp(event_store, settings).catch_up([stats]) == {}
        await other.fetchval("SELECT pg_advisory_unlock(hashtextextended($1, 0))",
                             locks.catchup(schema, "customer_stats"))
    assert await applied_count(pool, "customer_stats") == 0
    assert await catchup.CatchUp(event_store, settings).catch_up([stats]) == {"customer_stats": 30}


async def test_a_projection_being_rebuilt_is_left_to_its_consumers(pool, event_store, connection, settings):
    await visible(event_store, await append_orders(event_store, 10, 3))
    await pool.execute("INSERT INTO projection_status (projection, state) VALUES ('customer_stats', 'rebuilding') "
                       "ON CONFLICT (projection) DO UPDATE SET state = 'rebuilding'")
    (stats,) = await consumers_for(event_store, connection, settings, CustomerStats)

    assert await catchup.CatchUp(event_store, settings).catch_up([stats]) == {}
    assert await applied_count(pool, "customer_stats") == 0


async def test_a_poison_event_met_by_a_catch_up_is_parked_with_a_copy_in_the_dlq(pool, event_store, connection,
                                                                                   settings, prefix):
    await pool.execute(Probe.ddl)
    await event_store.append("order-a", [placed("a", "c"), cancelled("a", "c", "boom"), paid("a", "c")], NO_STREAM)
    await event_store.append("order-b", [placed("b", "c"), paid("b", "c")], NO_STREAM)
    await visible(event_store, await event_store.load("order-a") + await event_store.load("order-b"))
    (probe,) = await consumers_for(event_store, connection, settings, Probe)

    assert await catchup.CatchUp(event_store, settings).catch_up([probe]) == {"poison_probe": 5}

    assert await seen(pool, "poison_probe") == [("order-a", 0), ("order-b", 0), ("order-b", 1)]
    assert await checkpoint(pool, "poison_probe", "order-a") == (0, 1)  # halted at the parked event
    assert await dlq(probe.channel, prefix, "poison_probe") == [("order-a", 1)]
    assert probe.stats.dead_lettered == 1
    assert probe.stats.held == 1


def delivery(tag: int, event: RecordedEvent) -> consumer.Delivery:
    return consumer.Delivery(tag, b"", None, event)


async def test_while_catching_up_a_consumer_holds_its_deliveries_until_the_catch_up_passes_them(
        event_store, connection, settings):
    await event_store.append("order-x", [placed("x", "c"), paid("x", "c")], NO_STREAM)
    first, second = await event_store.load("order-x")
    (stats,) = await consumers_for(event_store, connection, settings, CustomerStats)
    stats.begin_catch_up(Position.START)
    stop = asyncio.Event()
    waiting = asyncio.create_task(stats._until_settled([delivery(1, first), delivery(2, second)], stop))

    await asyncio.sleep(0.05)
    assert not waiting.done()  # still behind the frontier: hold everything
    stats.settled(second.position)
    await asyncio.sleep(0.05)
    assert not waiting.done()  # settled, but the catch-up has not reached the frontier yet
    stats.at_frontier()
    assert await asyncio.wait_for(waiting, 5) is True


async def test_a_consumer_holding_deliveries_lets_them_go_when_the_catch_up_ends(event_store, connection, settings):
    await event_store.append("order-x", [placed("x", "c")], NO_STREAM)
    (event,) = await event_store.load("order-x")
    (stats,) = await consumers_for(event_store, connection, settings, CustomerStats)
    stats.begin_catch_up(Position.START)
    waiting = asyncio.create_task(stats._until_settled([delivery(1, event)], asyncio.Event()))

    stats.end_catch_up()

    assert await asyncio.wait_for(waiting, 5) is True
    assert not stats.is_settled(event)  # it goes the checkpoint way


async def test_a_worker_far_behind_catches_up_from_the_store_and_drains_its_queue(pool, event_store, connection,
                                                                                   settings):
    events = await visible(event_store, await append_orders(event_store, 100, 6))  # 600 events, lag far above the threshold of 100
    channel = await connection.channel()
    exchange = await broker.declare_topology(channel, broker.Names(settings.prefix), ["customer_stats"])
    await publish(exchange, events)
    caught_up_before = counter("eventfleet_projection_caught_up_total", "customer_stats")
    stop = asyncio.Event()
    async with db.create_pool(DATABASE_URL, settings.schema, min_size=1, max_size=8) as worker_pool:
        worker = asyncio.create_task(projector.run_worker(settings, [CustomerStats()], health.Health(), stop,
                                                         pool=worker_pool))
        queue = broker.Names(settings.prefix).queue("customer_stats")
        for _ in range(600):
            declared = await channel.declare_queue(queue, passive=True)
            if await applied_count(pool, "customer_stats") == 600 and not declared.declaration_result.message_count:
                break
            await asyncio.sleep(0.05)
        stop.set()
        stats = (await asyncio.wait_for(worker, 15))["customer_stats"]
    assert stats.applied == 600
    assert stats.caught_up > 0
    assert counter("eventfleet_projection_caught_up_total", "customer_stats") - caught_up_before == stats.caught_up
    async with pool.acquire() as conn:
        assert (await read_models(conn)).customer_stats == fold(e.event for e in events).customer_stats


async def test_a_catch_up_that_meets_an_undecodable_stored_event_stops_and_pauses_catch_ups(
        pool, event_store, connection, settings):
    await event_store.append("order-ok", [placed("ok", "c"), paid("ok", "c")], NO_STREAM)
    # Written around the store's API: a real payload, but metadata that is not msgpack.
    await pool.execute("INSERT INTO events (event_id, stream_id, version, event_type, data, metadata) "
                       "SELECT gen_random_uuid(), 'order-corrupt', 0, event_type, data, '\\xc1'::bytea "
                       "FROM events WHERE stream_id = 'order-ok' AND version = 0")
    await below_horizon(pool, 3)
    (stats,) = await consumers_for(event_store, connection, settings, CustomerStats)
    catch_up, stop = catchup.CatchUp(event_store, settings), asyncio.Event()
    catch_up.attach([stats])
    running = asyncio.create_task(catch_up.run(stop))

    catch_up.note_lag("customer_stats", lag.Lag(1000, 1.0, 0.0))
    for _ in range(200):
        if catch_up._pause_until:
            break
        await asyncio.sleep(0.05)
    catch_up.note_lag("customer_stats", lag.Lag(1000, 1.0, 0.0))  # paused: not taken up again

    assert catch_up._pause_until > 0
    assert not running.done()  # the worker goes on
    assert catch_up._due == set()
    assert not stats.catching_up  # its consumer is no longer held
    stop.set()
    await asyncio.wait_for(running, 5)


async def test_every_replica_acks_copies_up_to_the_watermark_without_database_work(pool, event_store, connection,
                                                                                     settings):
    """Another process applied the events; this one only learns the watermark from its lag monitor."""
    events = await visible(event_store, await append_orders(event_store, 20, 5))
    await checkpoints.apply_batch(event_store, CustomerStats(), events)
    measured = await lag.measure(pool, "customer_stats")
    assert measured.watermark == max(e.position for e in events)
    (stats,) = await consumers_for(event_store, connection, settings, CustomerStats)
    replica = catchup.CatchUp(event_store, dataclasses.replace(settings, catchup_threshold=0))
    replica.attach([stats])
    replica.note_lag("customer_stats", measured)
    touched = await pool.fetchval("SELECT max(updated_at) FROM checkpoints")
    exchange = await stats.channel.get_exchange(broker.Names(settings.prefix).exchange, ensure=False)
    await publish(exchange, events)

    drained = await stats.until_idle()

    assert (drained.duplicates, drained.applied) == (100, 0)
    assert await pool.fetchval("SELECT max(updated_at) FROM checkpoints") == touched
    assert replica._due == set()  # catch-ups off: nothing requested
