"""The environment failing is not the event's fault: a lock timeout or a read-only database parks nothing and
everything is applied once it passes; a handler's own OSError is its failure, parked per policy, not an outage;
and every dead letter can be re-driven, one holding a whole batch message too (exactly once, from the store)."""

from __future__ import annotations

import argparse
import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import ClassVar, LiteralString

import aio_pika
import asyncpg
import pytest

from eventfleet.examples.orders.events import OrderCancelled, OrderPaid, OrderPlaced, OrderShipped
from projections import registry
from projections.base import Projection, handles
from store import NO_STREAM, EventStore, RecordedEvent, db, names
from store.partitions import partition_of
from tests.conftest import AMQP_URL, DATABASE_URL, PARTITIONS
from tests.integration.test_dead_letters import publish
from tests.unit.test_projection_fold import cancelled, paid, placed, shipped
from workers import broker
from workers.cli import dead_letters as cli_dead_letters
from workers.config import Settings
from workers.errors import NotRetryable
from workers.projector import parking
from workers.projector.consumer import Consumer
from workers.runtime import health


class Counter(Projection):
    """Counts the events applied per stream; a cancellation whose reason is 'no file' opens a missing file."""

    name = "env_probe"
    tables = ("env_probe",)
    ddl: ClassVar[LiteralString] = (
        "CREATE TABLE IF NOT EXISTS env_probe (stream_id text PRIMARY KEY, applied int NOT NULL)")

    @handles(OrderPlaced, OrderPaid, OrderShipped, OrderCancelled)
    async def count(self, conn: db.Conn, event: RecordedEvent) -> None:
        if isinstance(event.event, OrderCancelled) and event.event.reason == "no file":
            open(f"/nonexistent/{uuid.uuid4().hex}")  # noqa: SIM115, ASYNC230 - it raises FileNotFoundError
        await conn.execute("INSERT INTO env_probe VALUES ($1, 1) ON CONFLICT (stream_id) "
                           "DO UPDATE SET applied = env_probe.applied + 1", event.stream_id)


@pytest.fixture
def settings(schema: str, prefix: str) -> Settings:
    return Settings(database_url=DATABASE_URL, amqp_url=AMQP_URL, schema=schema, prefix=prefix, http_port=0)


@pytest.fixture
async def channel(prefix: str, pool: db.Pool) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    await pool.execute(Counter.ddl)
    topology = broker.Names(prefix)
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        ch = await connection.channel()
        await broker.declare_topology(ch, topology, [Counter.name], PARTITIONS)
        yield ch
        await broker.delete_topology(await connection.channel(), topology, [Counter.name], PARTITIONS)


@pytest.fixture
async def role(schema: str, pool: db.Pool) -> AsyncIterator[str]:
    """A login role of this test's own, with every privilege on its schema; dropped after (its settings too)."""
    name = f"{schema}_env"
    await pool.execute(Counter.ddl)
    quoted, schema_ = names.quote(name), names.quote(schema)
    await pool.execute(f"CREATE ROLE {quoted} LOGIN")
    try:
        await pool.execute(f"GRANT USAGE ON SCHEMA {schema_} TO {quoted}; "
                           f"GRANT ALL ON ALL TABLES IN SCHEMA {schema_} TO {quoted}; "
                           f"GRANT ALL ON ALL SEQUENCES IN SCHEMA {schema_} TO {quoted}")
        yield name
    finally:
        await pool.execute(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{name}'")
        await pool.execute(f"DROP OWNED BY {quoted}; DROP ROLE {quoted}")


def as_role(url: str, role: str) -> str:
    return url.replace("postgres@", f"{role}@", 1)


async def history(event_store: EventStore) -> list[RecordedEvent]:
    """Two orders of one partition, three events each."""
    await event_store.append("order-a", [placed("a", "c"), paid("a", "c"), cancelled("a", "c")], NO_STREAM)
    return [*await event_store.load("order-a"), *await other_order(event_store)]


async def other_order(event_store: EventStore) -> list[RecordedEvent]:
    """Another order of order-a's partition, three events."""
    partition = partition_of("order-a", PARTITIONS)
    b = next(f"order-{i}" for i in range(1, 1000) if partition_of(f"order-{i}", PARTITIONS) == partition)
    await event_store.append(b, [placed(b, "c"), paid(b, "c"), cancelled(b, "c")], NO_STREAM)
    return await event_store.load(b)


async def applied(pool: db.Pool) -> dict[str, int]:
    return {r["stream_id"]: r["applied"] for r in await pool.fetch("SELECT stream_id, applied FROM env_probe")}


async def until_reported(health_: health.Health, sqlstate: str) -> None:
    """Wait until the consumer reports the database condition (bounded: a hang fails the test, it is no timing)."""
    async def reported() -> None:
        while sqlstate not in health_.reason():  # noqa: ASYNC110 - Health has no event to wait on
            await asyncio.sleep(0.02)
    await asyncio.wait_for(reported(), 30)


def consumer(pool: db.Pool, schema: str, channel: aio_pika.abc.AbstractChannel, settings: Settings,
             health_: health.Health) -> Consumer:
    """The consumer of order-a's partition, on a store over ``pool``."""
    store = EventStore(pool, schema=schema)
    return Consumer(store, channel, Counter(), partition_of("order-a", PARTITIONS), settings, health_=health_)


@pytest.mark.parametrize("locked", ["read model row", "checkpoint row"])
async def test_a_lock_held_past_lock_timeout_parks_nothing_and_everything_applies_once_it_goes(
        pool, event_store, schema, channel, prefix, settings, locked):
    events = await history(event_store)
    await pool.execute("INSERT INTO env_probe VALUES ('order-a', 0)")
    await pool.execute("INSERT INTO checkpoints (projection, stream_id, version) VALUES ($1, 'order-a', -1)",
                       Counter.name)
    await publish(channel, prefix, events)
    health_ = health.Health()
    async with db.create_pool(f"{DATABASE_URL}?lock_timeout=100", schema) as short_locks:
        holder = await asyncpg.connect(DATABASE_URL, server_settings={"search_path": schema})
        try:
            lock = holder.transaction()
            await lock.start()
            if locked == "read model row":
                await holder.execute("SELECT 1 FROM env_probe WHERE stream_id = 'order-a' FOR UPDATE")
            else:
                await holder.execute("SELECT 1 FROM checkpoints WHERE stream_id = 'order-a' FOR UPDATE")
            run = asyncio.ensure_future(consumer(short_locks, schema, channel, settings, health_).until_idle())
            await until_reported(health_, "55P03")
            assert "lock_timeout" in health_.reason()
            assert not health_.ready()
            assert await pool.fetchval("SELECT count(*) FROM dead_letters") == 0
            await lock.rollback()
            stats = await asyncio.wait_for(run, 60)
        finally:
            await holder.close()
    assert (stats.applied, stats.dead_lettered) == (6, 0)
    assert await pool.fetchval("SELECT count(*) FROM dead_letters") == 0
    assert set((await applied(pool)).values()) == {3}
    assert health_.postgres


async def test_a_read_only_database_parks_nothing_and_everything_applies_once_it_is_writable(
        pool, event_store, schema, channel, prefix, settings, role):
    events = await history(event_store)
    await publish(channel, prefix, events)
    quoted = names.quote(role)
    await pool.execute(f"ALTER ROLE {quoted} SET default_transaction_read_only = on")
    health_ = health.Health()
    async with db.create_pool(as_role(DATABASE_URL, role), schema) as worker_pool:
        run = asyncio.ensure_future(consumer(worker_pool, schema, channel, settings, health_).until_idle())
        await until_reported(health_, "25006")
        assert "read-only" in health_.reason()
        assert await pool.fetchval("SELECT count(*) FROM dead_letters") == 0
        await pool.execute(f"ALTER ROLE {quoted} RESET default_transaction_read_only")
        await worker_pool.expire_connections()  # new sessions read the role's settings again
        stats = await asyncio.wait_for(run, 60)
    assert (stats.applied, stats.dead_lettered) == (6, 0)
    assert await pool.fetchval("SELECT count(*) FROM dead_letters") == 0
    assert set((await applied(pool)).values()) == {3}


async def test_a_missing_privilege_parks_nothing_fails_readiness_and_everything_applies_once_granted(
        pool, event_store, schema, channel, prefix, settings, role):
    events = await history(event_store)
    await publish(channel, prefix, events)
    table, quoted = f"{names.quote(schema)}.env_probe", names.quote(role)
    await pool.execute(f"REVOKE ALL ON {table} FROM {quoted}")
    health_ = health.Health()
    async with db.create_pool(as_role(DATABASE_URL, role), schema) as worker_pool:
        run = asyncio.ensure_future(consumer(worker_pool, schema, channel, settings, health_).until_idle())
        await until_reported(health_, "42501")
        assert "GRANT" in health_.reason()
        assert not health_.ready()
        assert await pool.fetchval("SELECT count(*) FROM dead_letters") == 0
        await pool.execute(f"GRANT ALL ON {table} TO {quoted}")
        stats = await asyncio.wait_for(run, 60)
    assert (stats.applied, stats.dead_lettered) == (6, 0)
    assert await pool.fetchval("SELECT count(*) FROM dead_letters") == 0
    assert set((await applied(pool)).values()) == {3}


async def test_a_handler_raising_file_not_found_is_parked_per_policy_and_other_streams_flow(
        pool, event_store, schema, channel, prefix, settings):
    await event_store.append("order-a", [placed("a", "c"), cancelled("a", "c", "no file"), paid("a", "c")],
                             NO_STREAM)
    events = [*await event_store.load("order-a"), *await other_order(event_store)]
    await publish(channel, prefix, events)
    health_ = health.Health()
    stats = await asyncio.wait_for(consumer(pool, schema, channel, settings, health_).until_idle(), 30)
    assert (stats.applied, stats.dead_lettered, stats.held) == (4, 1, 1)
    (row,) = await parking.list_parked(pool, Counter.name)
    assert (row["stream_id"], row["version"], row["attempts"]) == ("order-a", 1, parking.ATTEMPTS)
    assert row["error"].startswith("FileNotFoundError")
    assert await applied(pool) == {"order-a": 1, events[-1].stream_id: 3}
    assert health_.postgres, "no outage"


async def test_a_batch_message_dead_letter_is_re_driven_and_its_events_applied_exactly_once(
        pool, event_store, schema, channel, prefix, settings, monkeypatch, capsys):
    b = await other_order(event_store)
    await event_store.append("order-a", [placed("a", "c"), paid("a", "c"), shipped("a", "c")], NO_STREAM)
    a = await event_store.load("order-a")
    partition = partition_of("order-a", PARTITIONS)
    consumer = Consumer(event_store, channel, Counter(), partition, settings, health_=health.Health())
    await publish(channel, prefix, b)
    await consumer.until_idle()
    # A worker could not decode this batch message at the time (an older release: over its body limit, or a
    # type it did not know) and dead-lettered it whole, its body kept, as the undecodable are.
    body = broker.events_message(partition, [b[1], *a]).body
    await parking.record_undecodable(pool, Counter.name, [("MalformedMessage: body over the worker's limit", body)])
    (row,) = await parking.list_parked(pool, Counter.name)
    assert row["undecodable"]
    assert await applied(pool) == {b[0].stream_id: 3}

    # The writers went on (versions 3 and 4); the dead letter is re-driven after the fix.
    await event_store.append("order-a", [paid("a", "c", "1.00"), paid("a", "c", "2.00")], 2)
    monkeypatch.setitem(registry.REGISTRY, Counter.name, Counter)
    capsys.readouterr()
    assert await cli_dead_letters.cmd_dead_letters(settings, argparse.Namespace(action="retry", id=row["id"])) == 0
    assert capsys.readouterr().out == (f"dead letter {row['id']}: batch message re-driven: applied 5 events of "
                                       f"2 streams to {Counter.name}; streams released\n")
    assert await applied(pool) == {b[0].stream_id: 3, "order-a": 5}
    assert await parking.list_parked(pool) == []
    assert await pool.fetchval("SELECT status FROM dead_letters WHERE id = $1", row["id"]) == "retried"
    with pytest.raises(NotRetryable):
        await parking.retry(event_store, row["id"], resolve=lambda _: Counter())


async def test_a_batch_message_re_driven_leaves_a_stream_halted_by_another_dead_letter_to_it(pool, event_store):
    b = await other_order(event_store)
    await event_store.append("order-a", [placed("a", "c")], NO_STREAM)
    a = await event_store.load("order-a")
    await pool.execute(Counter.ddl)
    await pool.execute("INSERT INTO checkpoints (projection, stream_id, version, halted_version) "
                       "VALUES ($1, $2, 0, 1)", Counter.name, b[0].stream_id)
    body = _batch_body([*a, *b])
    (dead_id,) = await parking.record_undecodable(pool, Counter.name, [("GapNotInStore: ...", body)])
    done = await parking.retry(event_store, dead_id, resolve=lambda _: Counter())
    assert (done.applied, done.streams, done.held) == (1, ("order-a",), (b[0].stream_id,))
    assert await applied(pool) == {"order-a": 1}
    assert await pool.fetchval("SELECT halted_version FROM checkpoints WHERE stream_id = $1", b[0].stream_id) == 1


def _batch_body(events: list[RecordedEvent]) -> bytes:
    return broker.events_message(partition_of(events[0].stream_id, PARTITIONS), events).body
