"""Partitions of streams: one function in Python and in SQL, recorded at migrate, carried by every event."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import asyncpg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from store import NO_STREAM, EventStore, db, errors, migrate, names
from store.partitions import partition_of
from tests.conftest import DATABASE_URL, PARTITIONS, new_schema
from tests.unit.test_projection_fold import paid, placed

STREAM_IDS = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), min_size=1,
                     max_size=80)


async def _sql_partitions(pairs: list[tuple[str, int]], schema: str) -> list[int]:
    conn = await asyncpg.connect(DATABASE_URL)
    try:
        rows = await conn.fetch(f"SELECT {names.quote(schema)}.stream_partition(s, p) AS partition"
                                " FROM unnest($1::text[], $2::int[]) WITH ORDINALITY AS u(s, p, i) ORDER BY i",
                                [s for s, _ in pairs], [p for _, p in pairs])
    finally:
        await conn.close()
    return [r["partition"] for r in rows]


@pytest.fixture(scope="module")
def function_schema() -> Iterator[str]:
    """A migrated schema whose stream_partition function the property compares against."""
    name = new_schema()

    async def setup() -> None:
        conn = await db.connect(DATABASE_URL, name)
        try:
            await migrate.migrate(conn, name)
        finally:
            await conn.close()

    asyncio.run(setup())
    yield name

    async def drop() -> None:
        conn = await asyncpg.connect(DATABASE_URL)
        try:
            await conn.execute(f"DROP SCHEMA {names.quote(name)} CASCADE")
        finally:
            await conn.close()

    asyncio.run(drop())


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(STREAM_IDS, st.integers(min_value=1, max_value=4096)), min_size=1, max_size=40))
def test_python_and_sql_put_every_stream_in_the_same_partition(function_schema: str,
                                                                pairs: list[tuple[str, int]]) -> None:
    assert asyncio.run(_sql_partitions(pairs, function_schema)) == [partition_of(s, p) for s, p in pairs]


def test_the_partition_function_is_fixed() -> None:
    # Pinned values: a change of the function would move every stream of every deployment.
    assert [partition_of(s, 16) for s in ("order-1", "order-2", "account-42", "ünïcode-☃")] == [9, 13, 11, 3]
    assert partition_of("order-1", 4096) == 1449


async def test_every_appended_event_carries_its_streams_partition(pool: db.Pool, event_store: EventStore) -> None:
    streams = [f"order-{i}" for i in range(40)]
    for sid in streams[:20]:
        await event_store.append(sid, [placed(sid, "c"), paid(sid, "c")], NO_STREAM)
    await event_store.append_batch([(sid, [placed(sid, "c")], NO_STREAM) for sid in streams[20:]])
    rows = await pool.fetch("SELECT stream_id, partition FROM events")
    assert len(rows) == 60
    assert {(r["stream_id"], r["partition"]) for r in rows} == {(s, partition_of(s, PARTITIONS)) for s in streams}


@pytest.fixture
async def conn_on(cleanup) -> tuple[str, asyncpg.Connection]:
    name = new_schema()
    conn = await db.connect(DATABASE_URL, name)

    async def drop() -> None:
        await conn.execute(f"DROP SCHEMA IF EXISTS {names.quote(name)} CASCADE")
        await conn.close()

    cleanup(drop)
    return name, conn


async def test_a_new_schema_asked_for_no_number_records_sixteen_partitions(conn_on) -> None:
    name, conn = conn_on
    await migrate.migrate(conn, name)
    assert await conn.fetchval("SELECT partitions FROM partitioning") == 16


async def test_partitions_asked_for_are_recorded_for_a_new_schema(conn_on) -> None:
    name, conn = conn_on
    await migrate.migrate(conn, name, partitions=8)
    assert await conn.fetchval("SELECT partitions FROM partitioning") == 8


async def test_other_partitions_for_a_migrated_schema_are_refused_with_the_steps(conn_on) -> None:
    name, conn = conn_on
    await migrate.migrate(conn, name, partitions=8)
    with pytest.raises(errors.PartitionsMismatch) as refused:
        await migrate.migrate(conn, name, partitions=32)
    assert str(refused.value) == (
        f"schema {name} has 8 partitions, not 32 (EVENTFLEET_PARTITIONS): the number is fixed when a schema is "
        "first migrated, because every event carries its partition. Unset EVENTFLEET_PARTITIONS or set it to 8; "
        "for another number, migrate a new schema with it and move the writers there (their projections rebuild "
        "from its store)")
    assert await conn.fetchval("SELECT partitions FROM partitioning") == 8
    assert await migrate.migrate(conn, name) == []  # unset: the schema's own


async def test_events_older_than_partitions_get_theirs_at_migrate(conn_on, monkeypatch) -> None:
    name, conn = conn_on
    async with conn.transaction():  # the schema as migrations 1-4 left it, with events written then
        await conn.execute(f"CREATE SCHEMA {names.quote(name)}")
        await conn.execute("CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
                           " applied_at timestamptz NOT NULL DEFAULT clock_timestamp())")
        for m in migrate.store_migrations():
            if m.version < 5:
                await conn.execute(m.sql)
                await conn.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", m.version,
                                   m.name)
        await conn.execute(
            "INSERT INTO events (event_id, stream_id, version, event_type, data, metadata)"
            " SELECT gen_random_uuid(), 'order-' || (g % 300), g / 300, 'OrderPaid.v1', '\\x80', '\\x80'"
            " FROM generate_series(0, 2999) AS g")
    monkeypatch.setattr(migrate, "FILL_BATCH", 700)  # several batches
    assert await migrate.migrate(conn, name, partitions=4) == [m.version for m in migrate.store_migrations()
                                                               if m.version >= 5]
    rows = await conn.fetch("SELECT stream_id, partition FROM events")
    assert len(rows) == 3000
    assert [r for r in rows if r["partition"] != partition_of(r["stream_id"], 4)] == []
    assert await conn.fetchval("SELECT count(*) FROM pg_indexes WHERE schemaname = $1"
                               " AND indexname = 'events_partition_idx'", name) == 1


async def test_events_stay_immutable_but_for_a_missing_partition(pool: db.Pool, event_store: EventStore) -> None:
    await event_store.append("order-1", [placed("order-1", "c")], NO_STREAM)
    for change in ("partition = partition + 1", "partition = NULL", "stream_id = 'order-2'"):
        with pytest.raises(asyncpg.RestrictViolationError):
            await pool.execute(f"UPDATE events SET {change}")
