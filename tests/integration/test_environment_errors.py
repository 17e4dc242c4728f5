"""The environment failing is not the event's fault: a lock timeout or a read-only database parks nothing and
everything is applied once it passes; a handler's own OSError is its failure, parked per policy, not an outage."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import ClassVar, LiteralString

import aio_pika
import asyncpg
import pytest

from eventfleet.examples.orders.events import OrderCancelled, OrderPaid, OrderPlaced
from projections.base import Projection, handles
from store import NO_STREAM, EventStore, RecordedEvent, db, names
from store.partitions import partition_of
from tests.conftest import AMQP_URL, DATABASE_URL, PARTITIONS
from tests.integration.test_dead_letters import publish
from tests.unit.test_projection_fold import cancelled, paid, placed
from workers import broker
from workers.config import Settings
from workers.projector import parking
from workers.projector.consumer import Consumer
from workers.runtime import health


class Counter(Projection):
    """Counts the events applied per stream; a cancellation whose reason is 'no file' opens a missing file."""

    name = "env_probe"
    tables = ("env_probe",)
    ddl: ClassVar[LiteralString] = (
        "CREATE TABLE IF NOT EXISTS env_probe (stream_id text PRIMARY KEY, applied int NOT NULL)")

    @handles(OrderPlaced, OrderPaid, OrderCancelled)
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
        while sqlstate not in health_.reason():
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

