"""Poison events: retried, then parked per policy (halt or skip) with their message in the DLQ; retry re-drives."""

from __future__ import annotations

import argparse
import logging
from collections.abc import AsyncIterator
from typing import Any, ClassVar, LiteralString

import aio_pika
import msgpack
import pytest
import tenacity

from eventfleet.examples.orders.events import OrderCancelled, OrderPaid, OrderPlaced, OrderShipped
from projections import registry
from projections.base import Policy, Projection, handles
from store import NO_STREAM, EventStore, RecordedEvent, db
from store.partitions import partition_of
from tests.conftest import AMQP_URL, DATABASE_URL, PARTITIONS
from tests.unit.test_projection_fold import cancelled, paid, placed
from workers import broker, projector
from workers.cli import dead_letters as cli_dead_letters
from workers.config import Settings
from workers.errors import HandlerFailed, MalformedMessage, NotRetryable
from workers.projector import lag, parking


class Probe(Projection):
    """Records every event it sees; raises on a cancellation whose reason is 'boom' while broken."""

    name = "poison_probe"
    tables = ("poison_probe",)
    ddl: ClassVar[LiteralString] = (
        "CREATE TABLE IF NOT EXISTS poison_probe (projection text, stream_id text, version bigint, "
        "PRIMARY KEY (projection, stream_id, version))")

    broken = True

    def __init__(self) -> None:
        self.calls = 0

    @handles(OrderPlaced, OrderPaid, OrderShipped, OrderCancelled)
    async def record(self, conn: db.Conn, event: RecordedEvent) -> None:
        if isinstance(event.event, OrderCancelled) and event.event.reason == "boom":
            self.calls += 1
            if self.broken:
                raise ValueError(f"boom at {event.stream_id}@{event.version}")
        await conn.execute("INSERT INTO poison_probe VALUES ($1, $2, $3)", self.name, event.stream_id, event.version)


class SkippingProbe(Probe):
    name = "poison_probe_skip"
    policy: ClassVar[Policy] = "skip"


@pytest.fixture
def settings(schema: str, prefix: str) -> Settings:
    return Settings(database_url=DATABASE_URL, amqp_url=AMQP_URL, schema=schema, prefix=prefix, http_port=0)


@pytest.fixture
async def channel(prefix: str, pool: db.Pool) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    await pool.execute(Probe.ddl)
    names = broker.Names(prefix)
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        ch = await connection.channel()
        await broker.declare_topology(ch, names, [Probe.name, SkippingProbe.name], PARTITIONS)
        yield ch
        await broker.delete_topology(await connection.channel(), names, [Probe.name, SkippingProbe.name], PARTITIONS)


async def history(event_store: EventStore) -> tuple[list[RecordedEvent], list[RecordedEvent]]:
    await event_store.append("order-a", [placed("a", "c"), cancelled("a", "c", "boom"), paid("a", "c")], NO_STREAM)
    await event_store.append("order-b", [placed("b", "c"), paid("b", "c")], NO_STREAM)
    return await event_store.load("order-a"), await event_store.load("order-b")


async def publish(channel: aio_pika.abc.AbstractChannel, prefix: str, events: list[RecordedEvent]) -> None:
    """The events as the relay publishes them: batch messages per partition, in the order given."""
    exchange = await channel.get_exchange(broker.Names(prefix).partitions_exchange, ensure=False)
    grouped: dict[int, list[RecordedEvent]] = {}
    for e in events:
        grouped.setdefault(partition_of(e.stream_id, PARTITIONS), []).append(e)
    for p, found in grouped.items():
        await exchange.publish(broker.events_message(p, found), routing_key=str(p))


async def dlq(channel: aio_pika.abc.AbstractChannel, prefix: str, projection: str) -> list[tuple[str, int]]:
    queue = await channel.get_queue(broker.Names(prefix).dead_letter_queue(projection), ensure=False)
    found = []
    while (m := await queue.get(no_ack=True, fail=False)) is not None:
        body = msgpack.unpackb(m.body, timestamp=3)  # not from_body: a flagged copy is refused by it, on purpose
        found.append((body["stream_id"], body["version"]))
    return found


async def seen(pool: db.Pool, projection: str) -> list[tuple[str, int]]:
    rows = await pool.fetch("SELECT stream_id, version FROM poison_probe WHERE projection = $1 ORDER BY 1, 2",
                            projection)
    return [(r[0], r[1]) for r in rows]


async def checkpoint(pool: db.Pool, projection: str, stream_id: str) -> tuple[Any, Any]:
    row = await pool.fetchrow("SELECT version, halted_version FROM checkpoints WHERE projection = $1 "
                              "AND stream_id = $2", projection, stream_id)
    assert row is not None
    return row[0], row[1]


async def test_halt_parks_the_event_stops_its_stream_and_retry_releases_it(pool, event_store, channel, prefix,
                                                                          settings):
    a, b = await history(event_store)
    await publish(channel, prefix, [*a, *b])
    probe = Probe()
    stats = await projector.consume_until_idle(pool, channel, probe, settings)
    assert (stats.applied, stats.dead_lettered, stats.held) == (3, 1, 1)
    assert probe.calls > parking.ATTEMPTS, "retried before parking"
    assert await seen(pool, "poison_probe") == [("order-a", 0), ("order-b", 0), ("order-b", 1)]
    assert await checkpoint(pool, "poison_probe", "order-a") == (0, 1)
    assert await dlq(channel, prefix, "poison_probe") == [("order-a", 1)]
    (row,) = await parking.list_parked(pool, "poison_probe")
    assert (row["stream_id"], row["version"], row["event_type"], row["attempts"]) == (
        "order-a", 1, "OrderCancelled.v1", parking.ATTEMPTS)
    full = await pool.fetchrow("SELECT error, traceback, status FROM dead_letters WHERE id = $1", row["id"])
    assert "boom" in full["error"]
    assert "ValueError" in full["traceback"]
    assert full["status"] == "parked"
    # The halted stream's events count as lag: the parked one and the one waiting behind it.
    assert (await lag.measure(pool, "poison_probe")).lag_events == 2

    # Still broken: the retry fails, changes nothing but the attempts.
    with pytest.raises(HandlerFailed):
        await parking.retry(event_store, row["id"], resolve=lambda _: probe)
    assert (await parking.list_parked(pool))[0]["attempts"] == parking.ATTEMPTS + 1
    assert await checkpoint(pool, "poison_probe", "order-a") == (0, 1)

    probe.broken = False
    done = await parking.retry(event_store, row["id"], resolve=lambda _: probe)
    assert (done.stream_id, done.applied, done.version) == ("order-a", 2, 2)
    assert await checkpoint(pool, "poison_probe", "order-a") == (2, None)
    assert await seen(pool, "poison_probe") == [("order-a", 0), ("order-a", 1), ("order-a", 2),
                                                ("order-b", 0), ("order-b", 1)]
    assert await parking.list_parked(pool) == []
    assert (await lag.measure(pool, "poison_probe")).lag_events == 0
    with pytest.raises(NotRetryable):
        await parking.retry(event_store, row["id"], resolve=lambda _: probe)


async def test_skip_parks_the_event_and_moves_the_stream_past_it(pool, event_store, channel, prefix, settings):
    a, b = await history(event_store)
    # The poison event's own message is lost: it is met while filling the gap, and a copy goes to the DLQ.
    await publish(channel, prefix, [a[0], a[2], *b])
    probe = SkippingProbe()
    stats = await projector.consume_until_idle(pool, channel, probe, settings)
    assert (stats.applied, stats.dead_lettered, stats.held) == (4, 1, 0)
    assert await seen(pool, probe.name) == [("order-a", 0), ("order-a", 2), ("order-b", 0), ("order-b", 1)]
    assert await checkpoint(pool, probe.name, "order-a") == (2, None)
    assert await dlq(channel, prefix, probe.name) == [("order-a", 1)]
    status = await pool.fetchval("SELECT status FROM dead_letters WHERE projection = $1", probe.name)
    assert status == "skipped"
    assert (await lag.measure(pool, probe.name)).lag_events == 0
    dead_id = await pool.fetchval("SELECT id FROM dead_letters WHERE projection = $1", probe.name)
    with pytest.raises(NotRetryable, match="skipped"):
        await parking.retry(event_store, dead_id, resolve=lambda _: probe)


async def test_a_halted_stream_holds_later_events_while_other_streams_flow(pool, event_store, channel, prefix,
                                                                           settings, monkeypatch, capsys):
    a, b = await history(event_store)
    probe = Probe()
    await publish(channel, prefix, a[:2])
    await projector.consume_until_idle(pool, channel, probe, settings)
    # Later events of the halted stream arrive in their own batches: held, acked, counted as lag.
    await event_store.append("order-a", [paid("a", "c", "1.00")], 2)
    later = await event_store.load("order-a", 2)
    await publish(channel, prefix, [*later, *b])
    stats = await projector.consume_until_idle(pool, channel, probe, settings)
    assert (stats.applied, stats.held, stats.dead_lettered) == (2, 2, 0)
    assert (await lag.measure(pool, "poison_probe")).lag_events == 3
    # The command line, with the projection registered as a deployment would have it.
    monkeypatch.setitem(registry.REGISTRY, Probe.name, Probe)
    monkeypatch.setattr(Probe, "broken", False)
    dead_id = (await parking.list_parked(pool))[0]["id"]
    assert await cli_dead_letters.cmd_dead_letters(settings, argparse.Namespace(action="retry", id=dead_id)) == 0
    assert "applied 3 events of order-a" in capsys.readouterr().out
    assert (await lag.measure(pool, "poison_probe")).lag_events == 0


async def test_a_stored_event_this_code_cannot_decode_halts_its_stream_not_the_worker(pool, event_store, prefix,
                                                                                      settings, channel):
    """Corrupt bytes stored around the store's API (its own message lost here): when a later event of its stream
    needs it filled in from the store, the stream halts there as at a poison event; the worker and other streams
    go on. (A type this code does not know is no corruption: see the next test and test_newer_events.py.)"""
    await event_store.append("order-u", [placed("u", "cu")], NO_STREAM)
    await pool.execute("INSERT INTO events (event_id, stream_id, version, event_type, data, metadata) "
                       "VALUES (gen_random_uuid(), 'order-u', 1, 'OrderPaid.v1', '\\x80', '\\x80')")
    await event_store.append("order-u", [paid("u", "cu")], 1)
    await event_store.append("order-v", [placed("v", "cv")], NO_STREAM)
    async with pool.acquire() as conn:
        (u0,) = await event_store.load_range(conn, "order-u", 0, 0)
    (u2,) = await event_store.load("order-u", 2)
    (v0,) = await event_store.load("order-v")
    await publish(channel, prefix, [u0, u2, v0])
    stats = await projector.consume_until_idle(pool, channel, Probe(), settings)
    assert (stats.applied, stats.dead_lettered, stats.held) == (2, 1, 1)
    assert await checkpoint(pool, "poison_probe", "order-u") == (0, 1)
    row = await pool.fetchrow("SELECT event_type, error FROM dead_letters WHERE stream_id = 'order-u'")
    assert row["event_type"] == "OrderPaid.v1"
    assert row["error"].startswith("EventSchemaMismatch: ")
    assert await seen(pool, "poison_probe") == [("order-u", 0), ("order-v", 0)]


async def test_a_stored_event_of_a_type_this_code_never_heard_of_is_passed_by_a_read_model_of_named_types(pool, event_store, prefix,
                                                                                      settings, channel):
    """A newer writer's event type (its own message lost here), filled in from the store: the probe handles the
    order events by name, so it is none of its business (test_newer_events.py: one that handles it holds)."""
    await event_store.append("order-u", [placed("u", "cu")], NO_STREAM)
    await pool.execute("INSERT INTO events (event_id, stream_id, version, event_type, data, metadata) "
                       "VALUES (gen_random_uuid(), 'order-u', 1, 'Mystery.v1', '\\x80', '\\x80')")
    await event_store.append("order-u", [paid("u", "cu")], 1)
    await event_store.append("order-v", [placed("v", "cv")], NO_STREAM)
    async with pool.acquire() as conn:
        (u0,) = await event_store.load_range(conn, "order-u", 0, 0)
    (u2,) = await event_store.load("order-u", 2)
    (v0,) = await event_store.load("order-v")
    await publish(channel, prefix, [u0, u2, v0])
    stats = await projector.consume_until_idle(pool, channel, Probe(), settings)
    # order-u's version 1 is not read from the store at all: its checkpoint moves over it (issue 25).
    assert (stats.applied, stats.gaps_filled, stats.dead_lettered, stats.held) == (3, 0, 0, 0)
    assert await checkpoint(pool, "poison_probe", "order-u") == (2, None)
    assert await pool.fetchval("SELECT count(*) FROM dead_letters") == 0
    assert await seen(pool, "poison_probe") == [("order-u", 0), ("order-u", 2), ("order-v", 0)]


async def test_the_parking_log_line_names_the_poison_events_correlation_and_cause(pool, event_store, caplog):
    await pool.execute(Probe.ddl)
    await event_store.append("order-a", [placed("a", "c"), cancelled("a", "c", "boom")], NO_STREAM,
                             correlation_id="request-1", causation_id="command-1")
    with caplog.at_level(logging.WARNING, logger="workers.projector.parking"):
        await parking.apply_or_park(event_store, Probe(), await event_store.load("order-a"),
                                    wait=tenacity.wait_none())
    (line,) = [r for r in caplog.records if r.getMessage() == "parking poison event"]
    assert (line.stream_id, line.version, line.correlation_id, line.causation_id) == (
        "order-a", 1, "request-1", "command-1")


@pytest.mark.parametrize(("probe", "seen_after", "stream_checkpoint", "held"), [
    (Probe, [("order-a", 0), ("order-b", 0), ("order-b", 1)], (0, 1), 1),
    (SkippingProbe, [("order-a", 0), ("order-a", 2), ("order-b", 0), ("order-b", 1)], (2, None), 0),
])
async def test_an_event_of_a_batch_that_cannot_be_decoded_is_parked_alone_and_the_rest_applies(
        pool, event_store, channel, prefix, settings, probe, seen_after, stream_checkpoint, held):
    await event_store.append("order-a", [placed("a", "c")], NO_STREAM)
    # Written around the store's API: a real payload, but metadata that is not msgpack. The relay sends it
    # flagged in its partition's batch (broker.event_map).
    await pool.execute("INSERT INTO events (event_id, stream_id, version, event_type, data, metadata, partition) "
                       "SELECT gen_random_uuid(), 'order-a', 1, event_type, data, '\\xc1'::bytea, partition "
                       "FROM events WHERE stream_id = 'order-a'")
    await event_store.append("order-a", [paid("a", "c")], 1)
    await event_store.append("order-b", [placed("b", "c"), paid("b", "c")], NO_STREAM)
    rows = await pool.fetch("SELECT global_position, event_id, stream_id, version, event_type, data, metadata, "
                            "recorded_at, transaction_id, partition FROM events ORDER BY global_position")
    assert {r["partition"] for r in rows} == {3}  # one batch message
    exchange = await channel.get_exchange(broker.Names(prefix).partitions_exchange, ensure=False)
    await exchange.publish(broker.batch_message(3, rows, [broker.event_map(r) for r in rows]), routing_key="3")

    stats = await projector.consume_until_idle(pool, channel, probe(), settings)

    assert (stats.applied, stats.dead_lettered, stats.held, stats.undecodable) == (len(seen_after), 1, held, 0)
    assert await seen(pool, probe.name) == seen_after
    assert await checkpoint(pool, probe.name, "order-a") == stream_checkpoint
    row = await pool.fetchrow("SELECT stream_id, version, status, error FROM dead_letters WHERE projection = $1",
                              probe.name)
    assert (row["stream_id"], row["version"], row["status"]) == ("order-a", 1, "parked" if held else "skipped")
    assert f"the relay could not encode event {rows[1]['event_id']}: CorruptEvent" in row["error"]
    assert await dlq(channel, prefix, probe.name) == [("order-a", 1)]  # a copy of it alone


async def test_the_dlq_copy_of_an_event_parked_as_undecodable_stays_undecodable(pool, event_store, channel, prefix,
                                                                                settings):
    await event_store.append("order-a", [placed("a", "c")], NO_STREAM)
    await pool.execute("INSERT INTO events (event_id, stream_id, version, event_type, data, metadata, partition) "
                       "SELECT gen_random_uuid(), 'order-a', 1, event_type, data, '\\xc1'::bytea, partition "
                       "FROM events WHERE stream_id = 'order-a'")
    rows = await pool.fetch("SELECT global_position, event_id, stream_id, version, event_type, data, metadata, "
                            "recorded_at, transaction_id FROM events ORDER BY global_position")
    exchange = await channel.get_exchange(broker.Names(prefix).partitions_exchange, ensure=False)
    await exchange.publish(broker.batch_message(3, rows, [broker.event_map(r) for r in rows]), routing_key="3")
    await projector.consume_until_idle(pool, channel, Probe(), settings)
    queue = await channel.get_queue(broker.Names(prefix).dead_letter_queue(Probe.name), ensure=False)
    copy = await queue.get(no_ack=True, timeout=5)

    # As the relay's flagged message (broker.encode_undecodable_row): refused, never an event with empty metadata.
    with pytest.raises(MalformedMessage):
        broker.from_body(copy.body)
