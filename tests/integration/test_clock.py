"""The store's transaction clock (store/clock.py) on the machine's cluster: an event holding an id far ahead of the
cluster's stands for a store restored from another cluster (tests/cluster/test_moved_store.py moves one for real).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid

import pytest

from store import NO_STREAM, EventStore, clock, db, errors
from store.records import Position
from tests.conftest import AMQP_URL, DATABASE_URL
from tests.unit.test_projection_fold import paid, placed
from workers import admin

AHEAD = 10**9  # ids the cluster hands out only after a billion more transactions


async def store_an_event_from_another_cluster(pool: db.Pool) -> int:
    """Insert one event whose writing transaction's id is AHEAD above this cluster's next; return that id."""
    async with pool.acquire() as conn:
        ahead = int(await conn.fetchval("SELECT store_xmax()::text::bigint")) + AHEAD
        await conn.execute(
            "INSERT INTO events (event_id, stream_id, version, event_type, data, metadata, transaction_id)"
            " SELECT $1, 'order-old', 0, event_type, data, metadata, $2::text::xid8 FROM events LIMIT 1",
            uuid.uuid4(), str(ahead))
    return ahead


@pytest.fixture
async def behind(pool: db.Pool, event_store: EventStore) -> int:
    await event_store.append("order-1", [placed("1", "c")], NO_STREAM)
    return await store_an_event_from_another_cluster(pool)


async def test_a_store_holding_ids_ahead_of_its_cluster_refuses_appends_naming_migrate(pool, schema, behind):
    fresh = EventStore(pool, schema=schema)
    with pytest.raises(errors.ClockBehind, match="run `eventfleet migrate`"):
        await fresh.append("order-2", [placed("2", "c")], NO_STREAM)


async def test_status_refuses_a_store_whose_clock_is_behind(run_cli, schema, prefix, behind):
    ran = await run_cli("status", schema=schema, prefix=prefix)

    assert (ran.code, ran.err) == (1, f"eventfleet status: {errors.ClockBehind.__doc__}\n")


async def test_migrate_moves_the_clock_past_the_newest_stored_id_and_new_events_read_after_it(pool, schema,
                                                                                             behind):
    await admin.run_migrate(DATABASE_URL, schema)
    store = EventStore(pool, schema=schema)
    await store.append("order-1", [paid("1", "c")], 0)

    async with pool.acquire() as conn:
        reading = await clock.read(conn, schema)
    events = await store.read_all(Position.START, 10)
    assert reading.behind is False
    assert reading.shift >= AHEAD
    assert [(e.stream_id, e.version) for e in events] == [("order-1", 0), ("order-old", 0), ("order-1", 1)]
    assert events[-1].position.transaction_id > behind


async def test_migrate_leaves_a_clock_that_is_not_behind_alone(pool, schema, event_store):
    await event_store.append("order-1", [placed("1", "c")], NO_STREAM)

    await admin.run_migrate(DATABASE_URL, schema)

    async with pool.acquire() as conn:
        assert (await clock.read(conn, schema)).shift == 0



async def test_a_worker_refuses_to_start_on_a_store_whose_clock_is_behind(schema, prefix, behind):
    env = {**os.environ, "EVENTFLEET_DATABASE_URL": DATABASE_URL, "EVENTFLEET_AMQP_URL": AMQP_URL,
           "EVENTFLEET_SCHEMA": schema, "EVENTFLEET_PREFIX": prefix, "EVENTFLEET_HTTP_PORT": "0"}
    worker = await asyncio.create_subprocess_exec(sys.executable, "-m", "workers", "worker", env=env,
                                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = await asyncio.wait_for(worker.communicate(), 60)

    assert (worker.returncode, err.decode().splitlines()[-1]) == (
        1, f"eventfleet worker: {errors.ClockBehind.__doc__}")
