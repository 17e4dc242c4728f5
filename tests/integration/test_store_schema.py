"""``EventStore(pool, schema=...)`` works in its schema over any asyncpg pool, whatever the search_path says.

Two pools: a plain ``asyncpg.create_pool`` (the server's default search_path, which holds no store tables),
and a pool whose search_path names another migrated schema with tables of its own, where an unqualified
statement would land silently.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

import projections
from projections import wait
from store import NO_STREAM, EventStore, NewEvent, Position, Repository, VersionConflict, db, names, queries
from tests.conftest import Cleanup, new_schema
from tests.contract.counters import REG, Counter, CounterState, Incremented, increment
from tests.unit.test_projection_fold import paid, placed
from workers import admin

TABLES = ("events", "outbox", "snapshots", "checkpoints")


@pytest.fixture
async def plain_pool(database_url: str) -> AsyncIterator[db.Pool]:
    """An asyncpg pool as a user makes it: no server_settings, so the server's default search_path."""
    async with asyncpg.create_pool(database_url, min_size=1, max_size=4) as p:
        yield p


@pytest.fixture
async def other_schema(database_url: str, cleanup: Cleanup) -> str:
    """A second migrated schema, with its own events, outbox, snapshots and checkpoints; dropped after."""
    name = new_schema()

    async def drop() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute(f"DROP SCHEMA IF EXISTS {names.quote(name)} CASCADE")
        finally:
            await conn.close()

    cleanup(drop)
    await admin.run_migrate(database_url, name)
    return name


@pytest.fixture
async def other_pool(database_url: str, other_schema: str) -> AsyncIterator[db.Pool]:
    """A pool whose search_path names the other schema."""
    async with db.create_pool(database_url, other_schema, min_size=1, max_size=4) as p:
        yield p


async def rows(database_url: str, schema: str) -> dict[str, int]:
    """How many rows each store table of ``schema`` holds, counted on a connection of its own."""
    conn = await asyncpg.connect(database_url)
    try:
        return {t: await conn.fetchval(f"SELECT count(*) FROM {names.quote(schema)}.{t}") for t in TABLES}
    finally:
        await conn.close()


def counted(events: int = 0, outbox: int = 0, snapshots: int = 0, checkpoints: int = 0) -> dict[str, int]:
    return {"events": events, "outbox": outbox, "snapshots": snapshots, "checkpoints": checkpoints}


async def set_checkpoint(database_url: str, schema: str, stream_id: str, version: int) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(f"INSERT INTO {names.quote(schema)}.checkpoints (projection, stream_id, version)"
                           " VALUES ('order_summary', $1, $2)", stream_id, version)
    finally:
        await conn.close()


# --- a plain pool: nothing on the search_path ---------------------------------------------------------

async def test_every_bound_statement_prepares_on_a_connection_without_a_search_path(database_url, schema):
    conn = await asyncpg.connect(database_url, server_settings={"search_path": "pg_catalog"})
    try:
        bound = {**queries.bind(queries.TEMPLATES, schema), **queries.bind(wait.SQL, schema)}
        assert len(bound) == len(queries.TEMPLATES) + len(wait.SQL)
        for sql in bound.values():
            await conn.prepare(sql)
    finally:
        await conn.close()


async def test_append_over_a_plain_pool_writes_events_and_outbox_rows_in_the_schema(plain_pool, schema,
                                                                                   database_url):
    store = EventStore(plain_pool, schema=schema)
    one = await store.append("order-1", [placed("1", "c", 2, "10.00")], NO_STREAM)
    two = await store.append("order-1", [paid("1", "c", "10.00"), paid("1", "c", "1.00")], 0)
    assert (one.first_version, one.last_version, len(one.global_positions)) == (0, 0, 1)
    assert (two.first_version, two.last_version, len(two.global_positions)) == (1, 2, 2)
    assert await rows(database_url, schema) == counted(events=3, outbox=3)


async def test_append_batch_over_a_plain_pool_writes_every_stream_in_the_schema(plain_pool, schema, database_url):
    store = EventStore(plain_pool, schema=schema)
    done = await store.append_batch([("order-1", [placed("1", "c", 1, "5.00")], NO_STREAM),
                                     ("order-2", [placed("2", "c", 1, "6.00"), paid("2", "c", "6.00")], NO_STREAM)])
    assert [(r.stream_id, r.first_version, r.last_version) for r in done] == [("order-1", 0, 0), ("order-2", 0, 1)]
    assert await rows(database_url, schema) == counted(events=3, outbox=3)


async def test_a_version_conflict_over_a_plain_pool_names_the_schemas_actual_version(plain_pool, schema):
    store = EventStore(plain_pool, schema=schema)
    await store.append("order-1", [placed("1", "c", 1, "5.00"), paid("1", "c", "5.00")], NO_STREAM)
    with pytest.raises(VersionConflict) as info:
        await store.append("order-1", [paid("1", "c", "1.00")], 0)
    assert (info.value.stream_id, info.value.expected, info.value.actual) == ("order-1", 0, 1)


async def test_a_retried_append_over_a_plain_pool_returns_the_original_result(plain_pool, schema, database_url):
    store = EventStore(plain_pool, schema=schema)
    events = [NewEvent(placed("1", "c", 1, "5.00"), uuid.uuid4()), NewEvent(paid("1", "c", "5.00"), uuid.uuid4())]
    first = await store.append("order-1", events, NO_STREAM)
    assert await store.append("order-1", events, NO_STREAM) == first
    assert await rows(database_url, schema) == counted(events=2, outbox=2)


async def test_load_and_load_range_over_a_plain_pool_read_the_schemas_stream(plain_pool, schema):
    store = EventStore(plain_pool, schema=schema)
    written = [placed("1", "c", 1, "5.00"), paid("1", "c", "5.00"), paid("1", "c", "1.00")]
    await store.append("order-1", written, NO_STREAM)
    assert [(e.version, e.event) for e in await store.load("order-1")] == list(enumerate(written))
    assert [e.event for e in await store.load("order-1", 2)] == written[2:]
    async with plain_pool.acquire() as conn:
        assert [e.version for e in await store.load_range(conn, "order-1", 1, 2)] == [1, 2]


async def test_read_all_over_a_plain_pool_returns_the_schemas_events_below_the_horizon(plain_pool, schema):
    store = EventStore(plain_pool, schema=schema)
    one = await store.append("order-1", [placed("1", "c", 1, "5.00")], NO_STREAM)
    two = await store.append("order-2", [placed("2", "c", 1, "6.00")], NO_STREAM)
    read = await store.read_all(Position.START, limit=10)
    assert [(e.stream_id, e.global_position) for e in read] == [
        ("order-1", one.global_positions[0]), ("order-2", two.global_positions[0])]
    horizon = await store.horizon()
    assert all(e.position.transaction_id < horizon.xmin for e in read)
    assert await store.read_all(read[-1].position, limit=10) == []


async def test_snapshots_over_a_plain_pool_keep_the_newest_in_the_schema(plain_pool, schema, database_url):
    store = EventStore(plain_pool, schema=schema, registry=REG)
    assert await store.save_snapshot("counter-1", 5, CounterState(6)) is True
    assert await store.save_snapshot("counter-1", 2, CounterState(3)) is False  # older: kept the newer
    snapshot = await store.load_snapshot("counter-1")
    assert snapshot is not None
    assert (snapshot.version, snapshot.snapshot_type, snapshot.state) == (5, "CounterState.v1", CounterState(6))
    assert await rows(database_url, schema) == counted(snapshots=1)


async def test_repository_execute_over_a_plain_pool_snapshots_and_reloads_in_the_schema(plain_pool, schema,
                                                                                        database_url):
    repository = Repository(EventStore(plain_pool, schema=schema, registry=REG), Counter, snapshot_every=3)
    for writer in range(4):
        done = await repository.execute("counter-1", increment(writer))
    assert (done.aggregate.count, done.aggregate.version, done.attempts) == (4, 3, 1)
    assert (await repository.load("counter-1")).count == 4  # the snapshot at version 2, then the tail
    assert await rows(database_url, schema) == counted(events=4, outbox=4, snapshots=1)


async def test_wait_for_over_a_plain_pool_reads_the_schemas_checkpoint(plain_pool, schema, database_url):
    await set_checkpoint(database_url, schema, "order-1", 3)
    assert await projections.wait_for(plain_pool, "order_summary", "order-1", 3, 0, schema=schema) == 3


# --- a pool whose search_path names another schema ----------------------------------------------------

async def test_writes_over_another_schemas_pool_land_in_the_named_schema_only(other_pool, schema, other_schema,
                                                                              database_url):
    store = EventStore(other_pool, schema=schema, registry=REG)
    await store.append("counter-1", [Incremented(0, 1)], NO_STREAM)
    await store.append("counter-2", [Incremented(0, 1), Incremented(1, 2)], NO_STREAM)
    await store.append_batch([("counter-3", [Incremented(0, 1)], NO_STREAM), ("counter-1", [Incremented(1, 2)], 0)])
    await store.save_snapshot("counter-1", 1, CounterState(2))
    assert await rows(database_url, schema) == counted(events=5, outbox=5, snapshots=1)
    assert await rows(database_url, other_schema) == counted()


async def test_reads_over_another_schemas_pool_see_the_named_schema_only(other_pool, other_schema, event_store,
                                                                         schema):
    mine = [placed("1", "c", 1, "5.00"), paid("1", "c", "5.00")]
    await event_store.append("order-1", mine, NO_STREAM)  # the conftest pool: search_path is the schema
    await EventStore(other_pool, schema=other_schema).append("order-1", [placed("9", "x", 9, "9.00")], NO_STREAM)
    store = EventStore(other_pool, schema=schema)
    assert [e.event for e in await store.load("order-1")] == mine
    assert [e.event for e in await store.read_all(Position.START, limit=10)] == mine
    assert await store.stream_version("order-1") == 1


async def test_wait_for_over_another_schemas_pool_reads_the_named_schemas_checkpoint(other_pool, schema,
                                                                                    other_schema, database_url):
    await set_checkpoint(database_url, other_schema, "order-1", 9)
    await set_checkpoint(database_url, schema, "order-1", 1)
    assert await projections.wait_for(other_pool, "order_summary", "order-1", 1, 0, schema=schema) == 1
    with pytest.raises(projections.WaitTimeout, match="up to version 1, not 2"):
        await projections.wait_for(other_pool, "order_summary", "order-1", 2, 0, schema=schema)
