"""Catch-up per partition: a consumer whose partition is far behind reads that partition's backlog from the
store (``EventStore.read_partition``) and applies it exactly once; the deliveries it passed are then acked
with no database work."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import aio_pika
import pytest

from eventfleet.examples.orders import projections as orders
from projections.base import Projection
from store import NO_STREAM, EventStore, Position, RecordedEvent, db
from store.partitions import partition_of
from tests.conftest import AMQP_URL, DATABASE_URL, PARTITIONS
from tests.integration.test_dead_letters import Probe, SkippingProbe, checkpoint, dlq, seen
from tests.integration.test_worker_consumer import append_orders, counter, partition, publish
from tests.unit.test_projection_fold import cancelled, fold, paid, placed, read_models
from workers import broker, projector
from workers.config import Settings
from workers.projector import checkpoints, lag
from workers.projector.catchup import STALL_SECONDS
from workers.projector.consumer import Consumer
from workers.runtime import health

Declare = Callable[[list[str]], Awaitable[aio_pika.abc.AbstractExchange]]


class CustomerStats(orders.CustomerStats):
    """customer_stats over every event: these tests are of the catch-up's reads and counts, each event of the
    partition once (a read model's own types only: tests/integration/test_type_filter.py)."""

    all_events = True


@pytest.fixture
def settings(schema: str, prefix: str) -> Settings:
    return Settings(database_url=DATABASE_URL, amqp_url=AMQP_URL, schema=schema, prefix=prefix, http_port=0,
                    prefetch=100, batch_size=50, catchup_threshold=100, catchup_batch_size=70)


@pytest.fixture
async def connection() -> AsyncIterator[aio_pika.abc.AbstractConnection]:
    conn = await aio_pika.connect(AMQP_URL)
    async with conn:
        yield conn


@pytest.fixture
async def declare(prefix: str) -> AsyncIterator[Declare]:
    """Declare the partition topology of some projections; return the partitions exchange; delete it all after."""
    names, declared = broker.Names(prefix), []
    conn = await aio_pika.connect(AMQP_URL)
    async with conn:
        channel = await conn.channel()

        async def run(projections: list[str]) -> aio_pika.abc.AbstractExchange:
            declared.extend(projections)
            return (await broker.declare_topology(channel, names, projections, PARTITIONS)).partitions_exchange

        yield run
        await broker.delete_topology(await conn.channel(), names, declared, PARTITIONS)


async def consumer_of(event_store: EventStore, connection: aio_pika.abc.AbstractConnection, settings: Settings,
                      projection: Projection, partition_: int, catchups: asyncio.Semaphore | None = None) -> Consumer:
    """An opened consumer of one partition on a channel of its own."""
    found = Consumer(event_store, await connection.channel(), projection, partition_, settings, catchups=catchups)
    await found.open()
    return found


async def visible(event_store: EventStore, events: list[RecordedEvent]) -> list[RecordedEvent]:
    """Wait until the store's reads can show every event (sorted in read order): a transaction of another test
    still running anywhere in the cluster holds its horizon back for a moment (see EventStore.read_all)."""
    await below_horizon(event_store.pool, len(events))
    return sorted(events, key=lambda e: e.position)


async def below_horizon(pool: db.Pool, count: int) -> None:
    for _ in range(400):
        if await pool.fetchval("SELECT count(*) FROM events "
                               "WHERE transaction_id < pg_snapshot_xmin(pg_current_snapshot())") >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the events never went below the store's horizon")


def of_partition(events: list[RecordedEvent], p: int) -> list[RecordedEvent]:
    return [e for e in events if partition(e) == p]


def busiest(events: list[RecordedEvent]) -> int:
    """The partition with the most events (every partition has some with the histories used here)."""
    return max(range(PARTITIONS), key=lambda p: len(of_partition(events, p)))


async def applied_count(pool: db.Pool, projection: str) -> int:
    return int(await pool.fetchval("SELECT coalesce((SELECT applied FROM projection_status WHERE projection = $1), 0)",
                                   projection))


async def queues_empty(connection: aio_pika.abc.AbstractConnection, prefix: str, projection: str) -> bool:
    """No message ready in any of the projection's partition queues (a passive declare counts ready ones)."""
    names = broker.Names(prefix)
    for p in range(PARTITIONS):
        declared = await broker.passive_queue(connection, names.partition_queue(projection, p))
        if declared is None or declared.message_count:
            return False
    return True


async def test_a_catch_up_reads_in_reads_bounded_in_bytes_and_applies_the_whole_backlog(
        pool, event_store, connection, declare, settings):
    await declare([CustomerStats.name])
    events = await visible(event_store, await append_orders(event_store, 60, 5))  # 300 events
    p = busiest(events)
    mine = of_partition(events, p)
    c = await consumer_of(event_store, connection, dataclasses.replace(settings, read_bytes=1024), CustomerStats(), p)
    reads: list[int] = []
    read_partition = event_store.read_partition

    async def counting(*args, **kwargs):
        events = await read_partition(*args, **kwargs)
        reads.append(len(events))
        return events

    event_store.read_partition = counting

    read = await c.catchup.run(Position.START)

    assert read == len(mine)
    assert await applied_count(pool, "customer_stats") == len(mine)
    assert max(reads) < 70  # the byte budget cut every read before catchup_batch_size
    assert sum(reads) == len(mine)


async def test_a_catch_up_applies_its_partitions_backlog_from_the_store_exactly_once(pool, event_store, connection,
                                                                                     declare, settings):
    await declare([CustomerStats.name])
    events = await visible(event_store, await append_orders(event_store, 60, 5))  # 300 events
    p = busiest(events)
    mine = of_partition(events, p)
    await checkpoints.apply_batch(event_store, CustomerStats(), mine[:20])  # a consumer got this far before
    c = await consumer_of(event_store, connection, settings, CustomerStats(), p)

    read = await c.catchup.run(Position.START)  # no watermark yet: from the start

    assert read == len(mine)
    assert (c.stats.applied, c.stats.caught_up, c.stats.duplicates) == (len(mine) - 20, len(mine), 0)
    assert await applied_count(pool, "customer_stats") == len(mine)
    async with pool.acquire() as conn:
        assert (await read_models(conn)).customer_stats == fold(e.event for e in mine).customer_stats


async def test_a_catch_up_reads_only_its_partitions_streams(pool, event_store, connection, declare, settings):
    await declare([CustomerStats.name])
    events = await visible(event_store, await append_orders(event_store, 40, 3))
    p = busiest(events)
    c = await consumer_of(event_store, connection, settings, CustomerStats(), p)

    await c.catchup.run(Position.START)

    streams = {r["stream_id"] for r in await pool.fetch("SELECT stream_id FROM checkpoints")}
    assert streams == {e.stream_id for e in of_partition(events, p)}
    measured = await lag.measure(pool, "customer_stats", event_names=None)
    assert measured.partitions == {q: len(of_partition(events, q)) for q in range(PARTITIONS) if q != p}


async def test_two_partitions_catch_up_at_once_each_its_own_in_reads_that_split_streams(pool, event_store,
                                                                                        connection, declare, settings):
    await declare([CustomerStats.name])
    events = await visible(event_store, await append_orders(event_store, 30, 5))  # 150 events
    small = dataclasses.replace(settings, catchup_batch_size=4)  # an order's 5 events span two reads
    at_once = asyncio.Semaphore(2)  # a worker's catch-ups at once (workers.projector.fleet)
    first, second = [await consumer_of(event_store, connection, small, CustomerStats(), p, catchups=at_once)
                     for p in (0, 1)]

    read = await asyncio.gather(first.catchup.run(Position.START), second.catchup.run(Position.START))

    both = of_partition(events, 0), of_partition(events, 1)
    assert tuple(read) == (len(both[0]), len(both[1]))
    assert (first.stats.applied, second.stats.applied) == (len(both[0]), len(both[1]))
    async with pool.acquire() as conn:
        assert (await read_models(conn)).customer_stats == fold(e.event for e in both[0] + both[1]).customer_stats


async def test_a_catch_up_waits_while_the_workers_catch_ups_at_once_are_taken(pool, event_store, connection,
                                                                              declare, settings):
    await declare([CustomerStats.name])
    events = await visible(event_store, await append_orders(event_store, 10, 3))
    taken = asyncio.Semaphore(1)
    c = await consumer_of(event_store, connection, settings, CustomerStats(), busiest(events), catchups=taken)
    async with taken:  # another partition of this worker is catching up
        waiting = asyncio.create_task(c.catchup.run(Position.START))
        done, _ = await asyncio.wait({waiting}, timeout=0.3)
        assert not done
        assert await applied_count(pool, "customer_stats") == 0
    assert await asyncio.wait_for(waiting, 10) == len(of_partition(events, busiest(events)))


async def test_a_catch_up_starts_after_the_position_it_is_given(pool, event_store, connection, declare, settings):
    await declare([CustomerStats.name])
    events = await visible(event_store, await append_orders(event_store, 60, 5))
    await checkpoints.apply_batch(event_store, CustomerStats(), events[:100])
    await lag.advance(pool, "customer_stats", event_names=None)
    watermark = (await lag.measure(pool, "customer_stats", event_names=None)).watermark
    assert watermark == events[99].position
    p = busiest(events)
    after = [e for e in of_partition(events, p) if e.position > watermark]
    c = await consumer_of(event_store, connection, settings, CustomerStats(), p)

    assert await c.catchup.run(watermark) == len(after)

    assert c.stats.applied == len(after)
    async with pool.acquire() as conn:
        assert (await read_models(conn)).customer_stats == fold(e.event for e in events[:100] + after).customer_stats


async def test_the_lag_monitor_asks_a_catch_up_from_the_watermark_at_the_threshold(
        event_store, connection, declare, settings):
    await declare([CustomerStats.name])
    c = await consumer_of(event_store, connection, settings, CustomerStats(), 0)  # catchup_threshold=100
    mark = Position(10, 20)

    c.note_lag(99, mark)
    assert c.catchup.due_from is None
    c.note_lag(100, mark)
    assert c.catchup.due_from == mark
    never = await consumer_of(event_store, connection, dataclasses.replace(settings, catchup_threshold=0),
                              CustomerStats(), 0)
    never.note_lag(10**6, mark)
    assert never.catchup.due_from is None


async def test_a_running_consumer_told_it_is_far_behind_catches_up_from_the_store(pool, event_store, connection,
                                                                                 declare, settings):
    await declare([CustomerStats.name])
    events = await visible(event_store, await append_orders(event_store, 40, 5))  # nothing on the broker
    p = busiest(events)
    mine = of_partition(events, p)
    measured = await lag.measure(pool, "customer_stats", event_names=None)
    assert measured.partitions[p] == len(mine)
    low = dataclasses.replace(settings, catchup_threshold=len(mine))
    c = Consumer(event_store, await connection.channel(), CustomerStats(), p, low)
    stop = asyncio.Event()
    running = asyncio.create_task(c.run(stop))
    await asyncio.sleep(0.1)  # consuming its empty queue

    c.note_lag(measured.partitions[p], measured.watermark)
    for _ in range(200):
        if c.stats.caught_up >= len(mine):
            break
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(running, 10)

    assert (c.stats.caught_up, c.stats.applied) == (len(mine), len(mine))
    assert await applied_count(pool, "customer_stats") == len(mine)


@pytest.mark.parametrize("state", ["backfilling", "rebuilding"])
async def test_a_projection_a_backfill_or_rebuild_fills_is_left_to_its_consumers(pool, event_store, connection,
                                                                                declare, settings, state):
    await declare([CustomerStats.name])
    events = await visible(event_store, await append_orders(event_store, 40, 5))
    await pool.execute("UPDATE projection_status SET state = $1 WHERE projection = 'customer_stats'", state)
    p = busiest(events)
    mine = of_partition(events, p)
    c = Consumer(event_store, await connection.channel(), CustomerStats(), p,
                 dataclasses.replace(settings, catchup_threshold=len(mine)))
    stop = asyncio.Event()
    running = asyncio.create_task(c.run(stop))
    await asyncio.sleep(0.1)

    c.note_lag(len(mine), Position.START)  # far behind: the shadow is what fills it
    await asyncio.sleep(1)
    stop.set()
    await asyncio.wait_for(running, 10)

    assert (c.stats.caught_up, await applied_count(pool, "customer_stats")) == (0, 0)


async def test_deliveries_a_catch_up_passed_are_acked_as_duplicates_of_their_checkpoints(
        pool, event_store, connection, declare, settings, prefix):
    exchange = await declare([CustomerStats.name])
    events = await visible(event_store, await append_orders(event_store, 40, 5))
    p = busiest(events)
    mine = of_partition(events, p)
    c = await consumer_of(event_store, connection, settings, CustomerStats(), p)
    await c.catchup.run(Position.START)
    await publish(exchange, mine)

    drained = await c.until_idle()

    assert (drained.duplicates, drained.applied) == (len(mine), len(mine))  # all applied by the catch-up
    assert await applied_count(pool, "customer_stats") == len(mine)
    assert await queues_empty(connection, prefix, CustomerStats.name)


async def test_deliveries_a_catch_up_passed_are_no_handover_duplicates(pool, event_store, connection, declare,
                                                                       settings):
    exchange = await declare([CustomerStats.name])
    events = await visible(event_store, await append_orders(event_store, 10, 5))
    p = busiest(events)
    c = await consumer_of(event_store, connection, settings, CustomerStats(), p)
    await c.catchup.run(Position.START)
    before = counter("eventfleet_projection_handover_duplicates_total", "customer_stats")
    await publish(exchange, of_partition(events, p))

    drained = await c.until_idle()

    assert drained.duplicates == len(of_partition(events, p))
    assert drained.handover_duplicates == 0  # not the previous owner's unacked batch: this consumer's catch-up
    assert counter("eventfleet_projection_handover_duplicates_total", "customer_stats") == before


async def test_a_catch_up_does_not_pass_over_an_event_whose_partition_is_not_recorded(pool, event_store, connection,
                                                                                     declare, settings):
    exchange = await declare([CustomerStats.name])
    assert partition_of("order-ok", PARTITIONS) == partition_of("order-x", PARTITIONS) == 1
    await event_store.append("order-ok", [placed("ok", "c")], NO_STREAM)
    # As a writer of before partitions still running in a rolling upgrade writes it: without its partition.
    await pool.execute("INSERT INTO events (event_id, stream_id, version, event_type, data, metadata) "
                       "SELECT gen_random_uuid(), 'order-x', 0, event_type, data, metadata "
                       "FROM events WHERE stream_id = 'order-ok'")
    await event_store.append("order-ok", [paid("ok", "c")], 0)
    await below_horizon(pool, 3)
    c = await consumer_of(event_store, connection, settings, CustomerStats(), 1)
    await c.catchup.run(Position.START)
    await publish(exchange, await event_store.load("order-x"))  # the relay routes it by its stream's partition

    await c.until_idle()

    assert await pool.fetchval("SELECT version FROM checkpoints WHERE stream_id = 'order-x'") == 0
    assert await applied_count(pool, "customer_stats") == 3


async def test_a_new_owner_takes_copies_below_the_watermark_as_duplicates_of_their_checkpoints(
        pool, event_store, connection, declare, settings):
    """The previous owner applied the events; the watermark this consumer hears of acks nothing by itself
    (a position is a transaction id, which a moved store or a failover hands out again): the checkpoints do."""
    exchange = await declare([CustomerStats.name])
    events = await visible(event_store, await append_orders(event_store, 20, 5))
    await checkpoints.apply_batch(event_store, CustomerStats(), events)
    measured = await lag.measure(pool, "customer_stats", event_names=None)
    assert (measured.watermark, measured.partitions) == (events[-1].position, {})
    p = busiest(events)
    c = await consumer_of(event_store, connection, dataclasses.replace(settings, catchup_threshold=0),
                          CustomerStats(), p)
    c.note_lag(measured.partitions.get(p, 0), measured.watermark)
    await publish(exchange, of_partition(events, p))

    drained = await c.until_idle()

    assert (drained.duplicates, drained.applied, drained.caught_up) == (len(of_partition(events, p)), 0, 0)
    assert await applied_count(pool, "customer_stats") == len(events)


@pytest.mark.parametrize(("probe", "seen_after", "stream_checkpoint", "held", "status"), [
    (Probe, [("order-a", 0), ("order-b", 0), ("order-b", 1)], (0, 1), 1, "parked"),
    (SkippingProbe, [("order-a", 0), ("order-a", 2), ("order-b", 0), ("order-b", 1)], (2, None), 0, "skipped"),
])
async def test_a_poison_event_met_by_a_catch_up_is_parked_per_policy_with_a_copy_in_the_dlq(
        pool, event_store, connection, declare, settings, prefix, probe, seen_after, stream_checkpoint, held,
        status):
    await declare([probe.name])
    await pool.execute(Probe.ddl)
    await event_store.append("order-a", [placed("a", "c"), cancelled("a", "c", "boom"), paid("a", "c")], NO_STREAM)
    await event_store.append("order-b", [placed("b", "c"), paid("b", "c")], NO_STREAM)
    events = await visible(event_store, await event_store.load("order-a") + await event_store.load("order-b"))
    assert {partition(e) for e in events} == {3}  # one partition, one catch-up
    c = await consumer_of(event_store, connection, settings, probe(), 3)

    assert await c.catchup.run(Position.START) == 5
    await c.batcher.close()  # the DLQ copies go out behind the acks, on their own connection

    assert await seen(pool, probe.name) == seen_after
    assert await checkpoint(pool, probe.name, "order-a") == stream_checkpoint
    assert isinstance(c.channel, aio_pika.abc.AbstractChannel)  # a queue of its own (not a worker group's view)
    assert await dlq(c.channel, prefix, probe.name) == [("order-a", 1)]
    assert (c.stats.dead_lettered, c.stats.held) == (1, held)
    assert await pool.fetchval("SELECT status FROM dead_letters WHERE projection = $1", probe.name) == status


async def test_a_catch_up_that_meets_an_undecodable_stored_event_stops_and_the_queue_carries_on(
        pool, event_store, connection, declare, settings, caplog):
    exchange = await declare([CustomerStats.name])
    await event_store.append("order-ok", [placed("ok", "c"), paid("ok", "c")], NO_STREAM)
    # Written around the store's API, in the same partition: a real payload, but metadata that is not msgpack.
    assert partition_of("order-x", PARTITIONS) == partition_of("order-ok", PARTITIONS) == 1
    await pool.execute("INSERT INTO events (event_id, stream_id, version, event_type, data, metadata, partition) "
                       "SELECT gen_random_uuid(), 'order-x', 0, event_type, data, '\\xc1'::bytea, partition "
                       "FROM events WHERE stream_id = 'order-ok' AND version = 0")
    await below_horizon(pool, 3)
    c = Consumer(event_store, await connection.channel(), CustomerStats(), 1, settings)
    stop = asyncio.Event()
    caplog.set_level(logging.WARNING, logger="workers.projector.catchup")
    running = asyncio.create_task(c.run(stop))
    await asyncio.sleep(0.1)

    c.note_lag(1000, Position.START)
    for _ in range(200):
        if any(r.getMessage().startswith("catch-up stopped at an event it cannot decode") for r in caplog.records):
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("the catch-up did not stop at the undecodable event")
    await publish(exchange, await event_store.load("order-ok"))
    for _ in range(200):
        if c.stats.applied == 2:
            break
        await asyncio.sleep(0.05)

    assert not running.done()  # the consumer goes on
    assert (c.stats.applied, c.stats.caught_up) == (2, 0)  # from its queue: the catch-up's read failed whole
    stop.set()
    await asyncio.wait_for(running, 10)


async def test_a_worker_far_behind_catches_its_partitions_up_from_the_store_and_acks_their_copies(
        pool, event_store, connection, declare, settings, prefix):
    exchange = await declare([CustomerStats.name])
    # This customer_stats takes every event: its tables are recorded as built so (migrate recorded the example's
    # types; a worker whose code adds types would rebuild it from the store first: workers/rebuild/typebook.py).
    await pool.execute("UPDATE read_model_types SET handled = NULL WHERE projection = $1", CustomerStats.name)
    # 600 events the queues never got (the lag, about 150 per partition, is above the threshold of 100).
    events = await visible(event_store, await append_orders(event_store, 100, 6))
    caught_up_before = counter("eventfleet_projection_caught_up_total", "customer_stats")
    stop = asyncio.Event()
    async with db.create_pool(DATABASE_URL, settings.schema, min_size=1, max_size=12) as worker_pool:
        worker = asyncio.create_task(projector.run_worker(settings, [CustomerStats()], health.Health(), stop,
                                                         pool=worker_pool))
        try:
            for _ in range(600):
                if await applied_count(pool, "customer_stats") == 600:
                    break
                assert not worker.done(), worker
                await asyncio.sleep(0.05)
            duplicates_before = counter("eventfleet_projection_duplicates_total", "customer_stats")
            await publish(exchange, events)  # late copies of it all
            for _ in range(600):
                if counter("eventfleet_projection_duplicates_total", "customer_stats") - duplicates_before >= 600:
                    break
                await asyncio.sleep(0.05)
        finally:
            stop.set()
            stats = (await asyncio.wait_for(worker, 15))["customer_stats"]
    assert stats.applied == 600
    assert stats.caught_up >= 600  # a catch-up asked again meanwhile reads some again
    assert stats.duplicates == 600  # the copies: acked with no database work
    assert await queues_empty(connection, prefix, CustomerStats.name)
    assert counter("eventfleet_projection_caught_up_total", "customer_stats") - caught_up_before == stats.caught_up
    assert await applied_count(pool, "customer_stats") == 600
    async with pool.acquire() as conn:
        assert (await read_models(conn)).customer_stats == fold(e.event for e in events).customer_stats


async def test_a_partition_whose_oldest_unapplied_event_waited_too_long_catches_up_however_few_it_lags(
        event_store, connection, declare, settings):
    """News that never comes (an apply lost with a primary after its message was acked, a dropped message): the
    store is the truth, so a stalled partition reads it, whatever catchup_threshold says (100 here)."""
    await declare([CustomerStats.name])
    c = await consumer_of(event_store, connection, settings, CustomerStats(), 0)
    mark = Position(10, 20)

    c.note_lag(3, mark, oldest_age=STALL_SECONDS - 0.1)
    assert c.catchup.due_from is None
    c.note_lag(3, mark, oldest_age=STALL_SECONDS)
    assert c.catchup.due_from == mark
    off = await consumer_of(event_store, connection, dataclasses.replace(settings, catchup_threshold=0),
                            CustomerStats(), 0)
    off.note_lag(3, mark, oldest_age=10 * STALL_SECONDS)
    assert off.catchup.due_from is None
