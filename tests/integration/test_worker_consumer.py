"""The consumer over real RabbitMQ: partition batch messages, undecodable messages to the DLQ, stop, reconnects."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import random
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import aio_pika
import msgpack
import pytest

from eventfleet.examples.orders.projections import CustomerStats
from store import NO_STREAM, EventStore, RecordedEvent, db
from store.partitions import partition_of
from tests.conftest import AMQP_URL, DATABASE_URL, PARTITIONS
from tests.unit.test_projection_fold import fold, order_life, read_models
from workers import broker, projector
from workers.cli import dead_letters as cli_dead_letters
from workers.config import Settings
from workers.projector import checkpoints, lag
from workers.projector.batcher import Batcher, Stats
from workers.projector.consumer import Consumer
from workers.projector.deliveries import Delivery
from workers.projector.worker import Progress
from workers.runtime import health, metrics

Declare = Callable[[list[str]], Awaitable[aio_pika.abc.AbstractExchange]]


@pytest.fixture
def settings(schema: str, prefix: str) -> Settings:
    return Settings(database_url=DATABASE_URL, amqp_url=AMQP_URL, schema=schema, prefix=prefix, http_port=0,
                    prefetch=100, batch_size=50, message_events=10)


@pytest.fixture
async def connection() -> AsyncIterator[aio_pika.abc.AbstractConnection]:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        yield connection


@pytest.fixture
async def channel(connection: aio_pika.abc.AbstractConnection) -> aio_pika.abc.AbstractChannel:
    return await connection.channel()


@pytest.fixture
async def declare(prefix: str) -> AsyncIterator[Declare]:
    """Declare the partition topology of some projections (P = the schema's); return the partitions exchange;
    delete their queues and exchanges after the test."""
    names, declared = broker.Names(prefix), []
    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel()

    async def run(projections: list[str]) -> aio_pika.abc.AbstractExchange:
        declared.extend(projections)
        return (await broker.declare_topology(channel, names, projections, PARTITIONS)).partitions_exchange

    yield run
    cleanup = await connection.channel()
    await broker.delete_topology(cleanup, names, declared, PARTITIONS)
    await connection.close()


async def append_orders(event_store: EventStore, orders: int, length: int, seed: int = 1) -> list[RecordedEvent]:
    rng = random.Random(seed)
    batch = [(f"order-{i}", order_life(str(i), f"c{i % 7}", length, rng), NO_STREAM) for i in range(orders)]
    await event_store.append_batch(batch)
    return [e for stream, _, _ in batch for e in await event_store.load(stream)]


def partition(event: RecordedEvent) -> int:
    return partition_of(event.stream_id, PARTITIONS)


def batches(events: Sequence[RecordedEvent], per_message: int = 100) -> list[tuple[int, list[RecordedEvent]]]:
    """The events as the relay groups them: per partition, in the order given, up to ``per_message`` a message."""
    grouped: dict[int, list[RecordedEvent]] = {}
    for event in events:
        grouped.setdefault(partition(event), []).append(event)
    return [(p, found[i:i + per_message]) for p, found in grouped.items() for i in range(0, len(found), per_message)]


async def publish(exchange: aio_pika.abc.AbstractExchange, events: Sequence[RecordedEvent], *,
                  per_message: int = 100) -> int:
    """Publish the events to the partitions exchange as the relay does (``batches``), one message after the
    other so each partition's stay in order; return how many messages."""
    messages = batches(events, per_message)
    for p, chunk in messages:
        await exchange.publish(broker.events_message(p, chunk), routing_key=str(p))
    return len(messages)


async def drain(channel: aio_pika.abc.AbstractChannel, queue: str) -> list[bytes]:
    """Every message of a queue that allows basic.get (a dead-letter queue; not the single-active-consumer
    partition queues)."""
    q = await channel.get_queue(queue, ensure=False)
    bodies = []
    while (m := await q.get(no_ack=True, fail=False)) is not None:
        bodies.append(m.body)
    return bodies


def counter(name: str, projection: str) -> float:
    return metrics.registry.get_sample_value(name, {"projection": projection}) or 0.0


async def test_until_idle_applies_everything_in_batches_and_counts(pool, event_store, channel, declare, settings):
    exchange = await declare(["customer_stats"])
    events = await append_orders(event_store, 30, 4)
    messages = await publish(exchange, events, per_message=10)
    messages += await publish(exchange, events[:10], per_message=10)  # ten redeliveries
    names = ("eventfleet_projection_duplicates_total", "eventfleet_projection_applied_total",
             "eventfleet_end_to_end_seconds_count", "eventfleet_projection_apply_seconds_count",
             "eventfleet_projection_unhandled_total")
    before = {n: counter(n, "customer_stats") for n in names}
    stats = await projector.consume_until_idle(pool, channel, CustomerStats(), settings)
    # customer_stats does not handle OrderShipped: those 20 are acked, never applied (issue 25).
    assert (stats.applied, stats.unhandled, stats.duplicates, stats.messages) == (100, 20, 10, messages)
    # Every partition's queue is applied in transactions of its own; several messages may share one.
    assert len({p for p, _ in batches(events)}) <= stats.batches <= messages
    delta = {n: counter(n, "customer_stats") - before[n] for n in names}
    assert delta == {names[0]: 10, names[1]: 100, names[2]: 100, names[3]: stats.batches, names[4]: 20}
    async with pool.acquire() as conn:
        assert (await read_models(conn)).customer_stats == fold(e.event for e in events).customer_stats


async def test_the_bounded_twin_applies_through_the_batcher_the_fleet_uses(pool, event_store, channel, connection,
                                                                          declare, settings):
    """``until_idle`` hands its deliveries to the projection's batcher, the apply step ``run`` uses: every
    partition's consumer given the worker's shared one applies through it, and it counts what they all did."""
    exchange = await declare(["customer_stats"])
    events = await append_orders(event_store, 20, 3)
    messages = await publish(exchange, events, per_message=10)
    projection = CustomerStats()
    batcher = Batcher(event_store, projection, settings)
    async with batcher.running():
        consumers = [Consumer(event_store, await connection.channel(), projection, p, settings, batcher=batcher)
                     for p in range(PARTITIONS)]
        await asyncio.gather(*(c.until_idle() for c in consumers))
    await batcher.close()

    # customer_stats does not handle OrderShipped: those are acked, never applied (issue 25).
    assert (batcher.stats.applied, batcher.stats.unhandled, batcher.stats.messages) == (
        _handled(events), len(events) - _handled(events), messages)
    assert all(c.stats is batcher.stats for c in consumers)
    async with pool.acquire() as conn:
        assert (await read_models(conn)).customer_stats == fold(e.event for e in events).customer_stats


async def test_a_transaction_takes_whole_messages_until_it_holds_batch_size_events(event_store, channel, settings):
    (event,) = await append_orders(event_store, 1, 1)
    consumer = Consumer(event_store, channel, CustomerStats(), 0, settings)  # batch_size=50
    buffer: asyncio.Queue[Delivery | None] = asyncio.Queue()
    sizes = [30, 15, 10, 40, 1]
    deliveries = [Delivery(tag, b"", None, broker.Batch([event] * n)) for tag, n in enumerate(sizes, 1)]
    for d in (deliveries[1], deliveries[2], deliveries[4]):
        buffer.put_nowait(d)

    first = consumer._take(deliveries[0], buffer)  # 30 + 15 < 50: one more whole message, 55 events
    second = consumer._take(deliveries[3], buffer)  # 40 + 1, the buffer is empty

    assert ([d.tag for d in first], [d.tag for d in second]) == ([1, 2, 3], [4, 5])
    buffer.put_nowait(None)  # a wake-up (stop, a catch-up due) ends the take
    buffer.put_nowait(deliveries[1])
    assert [d.tag for d in consumer._take(deliveries[0], buffer)] == [1]
    assert buffer.get_nowait() is deliveries[1]


async def test_garbage_goes_to_the_dlq_while_good_events_are_applied(pool, event_store, channel, declare, settings,
                                                                       capsys):
    exchange = await declare(["customer_stats"])
    names = broker.Names(settings.prefix)
    good = await append_orders(event_store, 5, 2)
    garbage = [b"\xc1 not msgpack", msgpack.packb({"only": "this"}),
               broker.to_message(good[0]).body,  # one event's map, not an array of them: the per-event format
               msgpack.packb([{"only": "this"}, 7]),  # an array, but not of maps only
               b"\x00" * (broker.MAX_MESSAGE_BYTES + 1)]
    await publish(exchange, good[:5])
    for i, body in enumerate(garbage):  # straight to the queues, as a foreign publisher would
        queue = names.partition_queue("customer_stats", i % PARTITIONS)
        await channel.default_exchange.publish(aio_pika.Message(body), routing_key=queue)
    await publish(exchange, good[5:])
    before = counter("eventfleet_projection_dead_lettered_total", "customer_stats")
    stats = await projector.consume_until_idle(pool, channel, CustomerStats(), settings)
    assert (stats.applied, stats.undecodable, stats.dead_lettered) == (10, 5, 5)
    assert counter("eventfleet_projection_dead_lettered_total", "customer_stats") - before == 5
    assert sorted(await drain(channel, names.dead_letter_queue("customer_stats"))) == sorted(garbage)
    rows = await pool.fetch("SELECT body, status, stream_id FROM dead_letters ORDER BY id")
    assert sorted(r["body"] for r in rows) == sorted(garbage)
    assert {(r["status"], r["stream_id"]) for r in rows} == {("parked", None)}
    await cli_dead_letters.cmd_dead_letters(settings, _ns(action="list", projection=None))
    assert "5 parked" in capsys.readouterr().out
    async with pool.acquire() as conn:
        assert (await read_models(conn)).customer_stats == fold(e.event for e in good).customer_stats


async def test_run_consumer_stops_after_committing_the_batch_in_flight(pool, event_store, connection, declare,
                                                                       settings):
    exchange = await declare(["customer_stats"])
    events = await append_orders(event_store, 20, 3)
    stop = asyncio.Event()
    task = asyncio.create_task(projector.run_consumer(pool, connection, CustomerStats(), settings, stop=stop))
    await publish(exchange, events, per_message=5)
    handled = _handled(events)
    await _until(lambda: _applied(pool, handled), 60)
    stop.set()
    stats = await asyncio.wait_for(task, 10)
    assert (stats.applied, stats.unhandled) == (handled, 60 - handled)
    assert not connection.is_closed  # the caller's; the consumers' own channels are closed
    names = broker.Names(settings.prefix)
    for p in range(PARTITIONS):
        declared = await broker.passive_queue(connection, names.partition_queue("customer_stats", p))
        assert declared is not None
        assert (declared.consumer_count, declared.message_count) == (0, 0), p


async def test_the_lag_monitor_refreshes_the_gauges(pool, event_store):
    events = await append_orders(event_store, 3, 2)
    gauge = metrics.LAG_EVENTS.labels("customer_stats")
    monitor = asyncio.create_task(lag.run_lag_monitor(pool, ["customer_stats"], interval=0.05))
    try:
        await _until(lambda: _true(gauge._value.get() == 6), 30)
        await checkpoints.apply_batch(event_store, CustomerStats(), events)
        await _until(lambda: _true(gauge._value.get() == 0), 30)
    finally:
        monitor.cancel()


@pytest.mark.slow
async def test_worker_survives_postgres_and_rabbitmq_outages(pool, event_store, declare, settings, caplog):
    caplog.set_level(logging.WARNING, logger="workers.runtime.health")
    exchange = await declare(["customer_stats"])
    events = await append_orders(event_store, 40, 3)
    h, stop = health.Health(), asyncio.Event()
    async with db.create_pool(DATABASE_URL, settings.schema, min_size=2, max_size=4) as worker_pool:
        task = asyncio.create_task(projector.run_worker(settings, [CustomerStats()], h, stop, pool=worker_pool))
        await publish(exchange, events[:60])
        await _until(lambda: _applied(pool, _handled(events[:60])), 60)
        assert h.ready()
        # Postgres drops every connection of the worker; RabbitMQ closes its connection.
        holders = worker_pool._holders  # type: ignore[attr-defined]
        pids = [holder._con.get_server_pid() for holder in holders if holder._con is not None]
        await pool.execute("SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) AS pid", pids)
        _close_amqp_connection(f"eventfleet worker {socket.gethostname()}:{os.getpid()}")
        await publish(exchange, events[60:])
        await _until(lambda: _applied(pool, _handled(events)), 90)
        await _until(lambda: _true(h.ready()), 30)
        stop.set()
        stats = await asyncio.wait_for(task, 15)
    assert stats["customer_stats"].applied == _handled(events)
    assert any(getattr(r, "service", None) == "rabbitmq" for r in caplog.records if r.getMessage() == "outage")
    async with pool.acquire() as conn:
        assert (await read_models(conn)).customer_stats == fold(e.event for e in events).customer_stats


def _close_amqp_connection(name: str) -> None:
    out = subprocess.run(["rabbitmqctl", "-q", "list_connections", "pid", "client_properties"],
                         check=True, capture_output=True, text=True, timeout=60).stdout
    pids = [line.split("\t")[0] for line in out.splitlines() if f'{{"connection_name","{name}"}}' in line]
    assert pids, f"no connection named {name!r}"
    for pid in pids:
        subprocess.run(["rabbitmqctl", "-q", "close_connection", pid, "test outage"], check=True, timeout=60)


async def _applied(pool: db.Pool, n: int = 60) -> bool:
    """Whether customer_stats applied n events (those it handles: checkpoints stop at its last one)."""
    total = await pool.fetchval("SELECT coalesce(sum(applied), 0) FROM projection_status WHERE projection = 'customer_stats'")
    return bool(total >= n)


def _handled(events: Sequence[RecordedEvent]) -> int:
    """How many of the events customer_stats handles (every order event but OrderShipped)."""
    return sum(CustomerStats().handles_type(e.event_type) for e in events)


async def _true(value: bool) -> bool:
    return value


async def _until(check: Callable[[], Awaitable[bool]], within: float) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def _ns(**kwargs: Any) -> argparse.Namespace:
    return argparse.Namespace(**kwargs)



async def test_a_running_worker_logs_its_progress_per_projection(pool, event_store, declare, settings, caplog):
    caplog.set_level(logging.INFO, logger="workers.projector.worker")
    exchange = await declare(["customer_stats"])
    events = await append_orders(event_store, 5, 2)
    h, stop = health.Health(), asyncio.Event()
    chatty = dataclasses.replace(settings, progress_seconds=1)
    task = asyncio.create_task(projector.run_worker(chatty, [CustomerStats()], h, stop))
    try:
        await publish(exchange, events)
        await _until(lambda: _applied(pool, 10), 60)
        await _until(lambda: _true(any(getattr(r, "applied_total", 0) == 10 for r in caplog.records)), 30)
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
    lines = [r for r in caplog.records if r.getMessage() == "progress"]
    last = lines[-1]
    assert (last.levelname, last.projection, last.applied_total) == ("INFO", "customer_stats", 10)
    assert sum(r.applied for r in lines) == 10


async def test_a_failing_lag_monitor_is_logged_and_ends_the_worker(pool, declare, settings, caplog, monkeypatch):
    """A background task that fails is no outage: it must not die unseen while the worker runs on without it."""
    caplog.set_level(logging.ERROR, logger="workers.projector.worker")
    await declare(["customer_stats"])

    async def broken(pool: db.Pool, projection: str) -> lag.Lag:
        raise RuntimeError("a bug in the lag monitor")

    monkeypatch.setattr(lag, "measure", broken)
    stop = asyncio.Event()
    with pytest.raises(RuntimeError, match="a bug in the lag monitor"):
        await asyncio.wait_for(projector.run_worker(settings, [CustomerStats()], health.Health(), stop, pool=pool), 30)
    assert not stop.is_set()
    (record,) = [r for r in caplog.records if r.name == "workers.projector.worker"]
    assert (record.levelname, record.getMessage(), record.task) == (
        "ERROR", "background task failed; the worker stops", "lag monitor")
    assert record.exc_info is not None
    assert str(record.exc_info[1]) == "a bug in the lag monitor"
    assert await pool.fetchval("SELECT count(*) FROM workers") == 0  # it left the fleet on its way out


def test_progress_says_what_was_applied_since_the_last_line_and_the_lag(caplog):
    caplog.set_level(logging.INFO, logger="workers.projector.worker")
    stats = {"customer_stats": Stats(applied=7)}
    progress = Progress(stats)
    progress.lags["customer_stats"] = lag.Lag(lag_events=3, lag_seconds=1.25, horizon_age_seconds=0.0)
    progress.report()
    stats["customer_stats"].applied = 10
    progress.report()
    assert [(r.applied, r.applied_total, r.lag_events, r.lag_seconds) for r in caplog.records] == [
        (7, 7, 3, 1.2), (3, 10, 3, 1.2)]
